"""Writing a scored ``PredictionRun`` (``client.predict``) into the site's output folder:
``predictions.csv``, ``quarantine.csv``, one figure per study under ``studies/``, ``index.html``
and, when asked, a DICOM Secondary Capture per study under ``dicom/`` (``client.pacs``).

A study's files are named by ``study_output_stem``: its row number, a readable ASCII form of its
name and a short hash of the exact name. Two studies never share a file, even when their names
differ only in characters the ASCII form cannot keep ('Müller', 'Möller'). Each capture is built
from its own study's figure in memory, never from a file read back by name.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from client.pacs import write_secondary_capture
from client.predict import PredictionRun, StudyPrediction
from client.text import printable_ascii

FIGURES_DIR = "studies"
DICOM_DIR = "dicom"
READABLE_MAX = 60  # characters of the study name kept in its file names


def study_output_stem(row: int, study: str) -> str:
    """``0007-Muller_Hans-1f3a9c0b``: the study's row, its name in file-safe ASCII and the first
    8 hex digits of the SHA-256 of its exact name. The row makes the stem unique in the run; the
    hash ties it to the exact study, whatever the readable part had to drop."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", printable_ascii(study, READABLE_MAX)).strip("_") or "study"
    # A folder name with bytes that are not UTF-8 holds surrogate escapes: hash its real bytes.
    digest = hashlib.sha256(study.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{row:04d}-{readable}-{digest}"


def model_version(meta: dict[str, Any]) -> str:
    """The export's run name and round, as clean text (the centre names the run)."""
    return f"{printable_ascii(meta.get('run', '?'), 48)} round {printable_ascii(meta.get('round', '?'), 12)}"


def write_outputs(run: PredictionRun, out: Path, dicom_out: bool = False, progress: bool = True) -> None:
    """Every output file of ``run`` into ``out``; sets each study's ``figure`` and ``dicom``."""
    out.mkdir(parents=True, exist_ok=True)
    write_study_files(run, out, dicom_out, progress)
    write_csv(run, out)
    write_quarantine(run, out)
    write_html(run, out)


def write_study_files(run: PredictionRun, out: Path, dicom_out: bool, progress: bool = True) -> None:
    """Per study: its figure, and with ``dicom_out`` its Secondary Capture made from that same figure."""
    version = model_version(run.meta)
    for row, study in enumerate(tqdm(run.studies, desc="writing figures", unit="study",
                                     disable=None if progress else True)):
        stem = study_output_stem(row, study.study)
        png, figure = render_figure(study, version)
        path = out / FIGURES_DIR / f"{stem}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png)
        study.figure = path.relative_to(out).as_posix()
        if dicom_out:
            capture = write_secondary_capture(study.study, study.source_file, figure, study.calibrated[0],
                                              run.labels[0], version, out / DICOM_DIR / stem)
            study.dicom = capture.relative_to(out).as_posix() if capture is not None else ""


def render_figure(study: StudyPrediction, version: str) -> tuple[bytes, np.ndarray]:
    """The study's explanation as PNG bytes and as the (H, W, 3) uint8 array those bytes decode to,
    so that the file on disk and the DICOM capture show the very same pixels."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.patches import Rectangle
    from PIL import Image

    n = study.images
    explained = list(study.saliency)  # most attended first
    weights = np.array(study.attention)
    fig = Figure(figsize=(max(8.0, 1.6 * n), 6.2))
    grid = fig.add_gridspec(2, max(n, 2 * len(explained)), height_ratios=[1, 2.2])
    for z in range(n):
        ax = fig.add_subplot(grid[0, z])
        ax.imshow(study.pixels[z], cmap="gray", vmin=0, vmax=1)
        ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=4,
                               ec=colormaps["inferno"](weights[z] / max(weights.max(), 1e-9))))
        ax.set_title(f"#{z + 1}: {weights[z]:.2f}", fontsize=8)
        ax.axis("off")
    span = max(n, 2 * len(explained)) // max(len(explained), 1)
    for k, z in enumerate(explained):
        ax = fig.add_subplot(grid[1, k * span:(k + 1) * span])
        ax.imshow(study.pixels[z], cmap="gray", vmin=0, vmax=1)
        ax.imshow(study.saliency[z], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(f"image #{z + 1} (attention {weights[z]:.2f}), gradient saliency", fontsize=9)
        ax.axis("off")
    verdict = ", ".join(f"p={c:.2f} ({'positive' if d else 'negative'})" for c, d in zip(study.calibrated, study.decision))
    # parse_math off: a '$' in a folder name is text, not a formula to typeset
    fig.suptitle(f"{study.study}: {verdict} | model {version}\n"
                 "top row: images in order with their attention weight (brighter frame = more weight)", fontsize=10,
                 parse_math=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    png = buffer.getvalue()
    with Image.open(io.BytesIO(png)) as image:
        return png, np.asarray(image.convert("RGB"), dtype=np.uint8)


def _header_lines(run: PredictionRun) -> list[str]:
    """The model and its per-label calibration, one line each; label names and notes come from the
    centre and are cleaned, so that each stays one CSV comment line."""
    lines = [f"model: {run.model_path.name} ({model_version(run.meta)}; "
             f"backbone {printable_ascii(run.meta.get('backbone-hash'), 24)})",
             f"standardisation statistics: {run.meta.get('statistics')}"]
    for label, d in run.decisions.items():
        name, c = printable_ascii(label, 64), d.calibration
        ece = (f"; ECE on the pooled validation statistics {d.ece_before:.4f} before, {d.ece_after:.4f} after"
               if d.ece_before is not None and d.ece_after is not None else "")
        lines.append(f"{name}: calibration {printable_ascii(c.method, 32)} (a={c.a:.4g}, b={c.b:.4g}; "
                     f"{printable_ascii(c.note, 200)}){ece}")
        target = f" for a target sensitivity of {d.target_sensitivity:g}" if d.target_sensitivity else ""
        lines.append(f"{name}: operating threshold {d.threshold:.4f} on the calibrated probability{target}")
    return lines


def write_csv(run: PredictionRun, out: Path) -> Path:
    path = out / "predictions.csv"
    with path.open("w", newline="") as handle:
        for line in _header_lines(run):
            handle.write(f"# {line}\n")
        writer = csv.writer(handle)
        columns = ["study", "images"]
        for label in (printable_ascii(label, 64) for label in run.labels):
            columns += [f"{label}_probability", f"{label}_raw_probability", f"{label}_decision"]
        columns += ["severity", "attention", "figure", "dicom"]
        writer.writerow(columns)
        for s in run.studies:
            row: list[Any] = [s.study, s.images]
            for k in range(len(run.labels)):
                row += [f"{s.calibrated[k]:.6f}", f"{s.raw[k]:.6f}", "positive" if s.decision[k] else "negative"]
            row += ["" if s.severity is None else f"{s.severity:.3f}", ";".join(f"{a:.4f}" for a in s.attention),
                    s.figure, s.dicom]
            writer.writerow(row)
    return path


def write_quarantine(run: PredictionRun, out: Path) -> Path:
    path = out / "quarantine.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows(run.quarantine)
    return path


def model_card_html(summary: dict[str, Any] | None) -> str:
    """The export's model card in brief (``server/model_card.py`` ``card_summary``): what the model
    is for, how well it did on the federation's test splits, under what privacy. Every value comes
    from the centre and is escaped."""
    esc = html.escape
    if not summary:
        return ("<section id='model-card'><h2>Model card</h2><p>This export carries no model card: ask the "
                "coordinating centre for one exported with clinicfl-server export.</p></section>")
    rows = [("Intended use", summary.get("intended-use")), ("Out of scope", summary.get("out-of-scope")),
            ("Test AUC (95% CI)", summary.get("auc")), ("Sensitivity", summary.get("sensitivity")),
            ("Specificity", summary.get("specificity")), ("Round chosen", summary.get("selection")),
            ("Privacy", summary.get("privacy"))]
    cells = "".join(f"<tr><th>{esc(name)}</th><td>{esc(str(value))}</td></tr>" for name, value in rows)
    limits = "".join(f"<li>{esc(str(item))}</li>" for item in summary.get("limitations") or [])
    return (f"<section id='model-card'><h2>Model card: {esc(str(summary.get('title', '')))}</h2>"
            f"<table>{cells}</table><h3>Limitations</h3><ul>{limits}</ul>"
            "<p>The whole card is beside the export at the centre (<code>*.model-card.md</code>).</p></section>")


def write_html(run: PredictionRun, out: Path) -> Path:
    esc = html.escape
    with_dicom = any(s.dicom for s in run.studies)
    rows = []
    for s in run.studies:
        cells = "".join(f"<td>{c:.3f}</td><td class='{'pos' if d else 'neg'}'>{'positive' if d else 'negative'}</td>"
                        for c, d in zip(s.calibrated, s.decision))
        severity = "" if s.severity is None else f"{s.severity:.2f}"
        top = int(np.argmax(s.attention)) + 1
        capture = f"<a href='{esc(s.dicom)}'>Secondary Capture</a>" if s.dicom else ""
        dicom = f"<td>{capture}</td>" if with_dicom else ""
        rows.append(f"<tr><td><a href='{esc(s.figure)}'>{esc(s.study)}</a></td><td>{s.images}</td>{cells}"
                    f"<td>{severity}</td><td>#{top}</td>"
                    f"<td><a href='{esc(s.figure)}'><img src='{esc(s.figure)}' alt='explanation of {esc(s.study)}' "
                    f"height='90'></a></td>{dicom}</tr>")
    label_headers = "".join(f"<th>{esc(label)} probability</th><th>{esc(label)} decision</th>" for label in run.labels)
    dicom_header = "<th>DICOM</th>" if with_dicom else ""
    quarantine = "".join(f"<tr><td>{esc(p)}</td><td>{esc(r)}</td></tr>" for p, r in run.quarantine)
    header = "".join(f"<li>{esc(line)}</li>" for line in _header_lines(run))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>clinicfl predictions</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px}}.pos{{color:#b00;font-weight:bold}}.neg{{color:#060}}</style></head>
<body><h1>Injury predictions</h1>
<p>{len(run.studies)} studies scored on {esc(run.device)} at {run.studies_per_second:.2f} studies/s;
{len(run.quarantine)} quarantine entries. Research use: not a diagnosis.</p>
<ul>{header}</ul>
{model_card_html(run.meta.get("model-card"))}
<h2>Studies</h2>
<table id="predictions"><thead><tr><th>study</th><th>images</th>{label_headers}<th>severity</th>
<th>most attended image</th><th>explanation</th>{dicom_header}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Quarantine</h2>
<table id="quarantine"><thead><tr><th>path</th><th>reason</th></tr></thead><tbody>{quarantine}</tbody></table>
<p><a href="predictions.csv">predictions.csv</a> &middot; <a href="quarantine.csv">quarantine.csv</a></p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
