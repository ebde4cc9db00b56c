"""``clinicfl-client predict``: the exported global model on new studies, at the site, with nothing
sent anywhere.

Studies are read with the training pipeline (same layouts, preprocessing and quarantine rules).
For each study: the calibrated injury probability per label, the decision at the model's
operating threshold, the severity estimate (when the model has that head) and the attention
weight of every image, plus a gradient saliency map of the most attended images. Outputs:
``predictions.csv``, one PNG per study, ``index.html``, ``quarantine.csv`` and, with
``--dicom-out``, a DICOM Secondary Capture of each explanation in the source study.

A model the site cannot reproduce is refused with one line and exit code 2 (``ModelRefused``):
an unknown export format, a label set that differs from the site's, or standardisation
statistics (or biomechanical statistics) that this site does not have for the model's backbone
and preprocessing.
"""

from __future__ import annotations

import csv
import html
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from client.site_stats import load_stats
from common.config import RunConfig
from common.data.errors import DataError
from common.data.site import SiteData, load_for_prediction, load_site
from common.inference import SiteInputs, fit_feature_norm, pick_device, predict, prepare_inputs
from common.metrics.calibration import Calibration
from common.model import EXPORT_FORMAT, InjuryNet, frozen_backbone_hash, load_exported

log = logging.getLogger(__name__)


class ModelRefused(Exception):
    """The model cannot be reproduced here; the message is one line that says what to do."""


@dataclass
class LabelDecision:
    calibration: Calibration
    threshold: float  # on the calibrated probability
    target_sensitivity: float | None
    ece_before: float | None
    ece_after: float | None


@dataclass
class StudyPrediction:
    study: str
    images: int
    raw: list[float]  # per label
    calibrated: list[float]
    decision: list[bool]
    severity: float | None
    attention: list[float]
    figure: str = ""
    dicom: str = ""


@dataclass
class PredictionRun:
    out: Path
    model_path: Path
    meta: dict[str, Any]
    labels: list[str]
    decisions: dict[str, LabelDecision]
    studies: list[StudyPrediction] = field(default_factory=list)
    quarantine: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    known_labels: np.ndarray | None = None  # (n, L) labels from the input's labels.csv, NaN if unknown

    @property
    def studies_per_second(self) -> float:
        return len(self.studies) / self.seconds if self.seconds > 0 else 0.0


def load_model(path: Path) -> tuple[InjuryNet, dict[str, Any], RunConfig]:
    try:
        model, meta = load_exported(path)
    except FileNotFoundError:
        raise ModelRefused(f"model file {path} not found: give a file written by clinicfl-server export") from None
    except Exception as exc:  # noqa: BLE001 - unpickling, zip and key errors all mean "not our export"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ModelRefused(f"{path} is not a clinicfl model export ({EXPORT_FORMAT}): {first}; "
                           "export it again with this version's clinicfl-server export") from None
    return model, meta, RunConfig.from_mapping(meta["config"])


def label_decisions(meta: dict[str, Any], labels: list[str]) -> dict[str, LabelDecision]:
    """The export's calibration and operating point per label (identity and 0.5 when absent)."""
    out = {}
    for label in labels:
        entry = (meta.get("calibration") or {}).get(label) or {}
        calibration = Calibration(**entry["calibration"]) if entry.get("calibration") else Calibration(
            method="identity", note="the export holds no calibration")
        point = entry.get("operating-point") or {}
        out[label] = LabelDecision(calibration, float(point.get("calibrated_threshold", 0.5)),
                                   point.get("target_sensitivity"), entry.get("ece-before"), entry.get("ece-after"))
    return out


def prepare_statistics(model: InjuryNet, config: RunConfig, state_dir: Path | None, stats_from: Path | None,
                       device: torch.device) -> str:
    """Load (or fit) the feature standardisation statistics the model needs at this site; returns
    where they came from. ModelRefused when this site has none for this model."""
    if config.model.feature_norm != "site":
        return "none needed (feature-norm = none)"
    if stats_from is not None:
        site = load_site(stats_from, config.data, config.model.num_labels, progress=False)
        inputs = prepare_inputs(model, site, None, device)
        fit_feature_norm(model, inputs, site.train_index, device)
        return f"fitted on the training studies of {stats_from.name}"
    if config.data.biomech_features:
        raise ModelRefused("this model uses biomechanical series, whose standardisation needs the site's training "
                           "data: give --stats-from SITE_DIR (the site folder this site trains on)")
    backbone_hash = frozen_backbone_hash(model)
    if state_dir is None or load_stats(model, state_dir, backbone_hash, config.data) is None:
        raise ModelRefused(
            f"no feature standardisation statistics for this model's backbone ({backbone_hash[:20]}...) at image size "
            f"{config.data.image_size} and sequence length {config.data.seq_len} in "
            f"{state_dir or 'the state folder'}: give --state-dir of a site that trained with this model's run "
            "config, or --stats-from SITE_DIR to fit them on a labelled site folder")
    return f"this site's training statistics ({state_dir})"


def run_prediction(model_path: Path, input_path: Path, out: Path, state_dir: Path | None = None,
                   stats_from: Path | None = None, layout: str = "auto", device: str | None = None,
                   dicom_out: bool = False, top_images: int = 2, progress: bool = True) -> PredictionRun:
    model, meta, config = load_model(model_path)
    labels = config.model.names()
    torch_device = torch.device(device) if device else pick_device()
    decisions = label_decisions(meta, labels)
    model.to(torch_device).eval()
    stats_note = prepare_statistics(model, config, state_dir, stats_from, torch_device)
    try:
        data = load_for_prediction(input_path, config.data, labels, layout, progress=progress)
    except DataError as exc:
        if exc.code == "label-set":
            raise ModelRefused(str(exc)) from None
        raise
    if config.data.biomech_features and data.biomech is None:
        raise ModelRefused("this model uses biomechanical series but the input has none (biomech/<study>.csv)")
    out.mkdir(parents=True, exist_ok=True)
    run = PredictionRun(out, model_path, {**meta, "statistics": stats_note}, labels, decisions,
                        quarantine=list(data.quarantine), device=str(torch_device))
    started = time.perf_counter()
    if len(data.studies):
        inputs = prepare_inputs(model, data, None, torch_device)
        index = np.arange(len(data.studies))
        predicted = predict(model, inputs, index, torch_device)
        run.known_labels = data.labels
        figures = out / "studies"
        figures.mkdir(exist_ok=True)
        for i in tqdm(index, desc="explaining studies", unit="study", disable=None if progress else True):
            study = _study_prediction(data, i, predicted, decisions, labels)
            saliency = gradient_saliency(model, data, inputs, i, torch_device)
            study.figure = str(write_figure(figures, data, i, study, saliency, top_images, meta).relative_to(out))
            run.studies.append(study)
    run.seconds = time.perf_counter() - started
    if dicom_out and run.studies:
        from client.pacs import write_secondary_captures  # highdicom only when asked for

        write_secondary_captures(run, data)
    write_csv(run)
    write_quarantine(run)
    write_html(run)
    return run


def _study_prediction(data: SiteData, i: int, predicted, decisions: dict[str, LabelDecision],
                      labels: list[str]) -> StudyPrediction:
    raw = predicted.probs[i].numpy().astype(float)
    calibrated = [float(decisions[label].calibration(np.array([p]))[0]) for label, p in zip(labels, raw)]
    return StudyPrediction(
        study=data.studies[i], images=int(data.mask[i].sum()), raw=[float(p) for p in raw], calibrated=calibrated,
        decision=[c >= decisions[label].threshold for label, c in zip(labels, calibrated)],
        severity=float(predicted.severity[i]) if predicted.severity is not None else None,
        attention=[float(a) for a in predicted.attention[i][: int(data.mask[i].sum())]])


def gradient_saliency(model: InjuryNet, data: SiteData, inputs: SiteInputs, i: int, device: torch.device) -> np.ndarray:
    """|d logit / d pixel| of every image of a study (the first label), through the frozen backbone,
    smoothed a little and scaled to [0, 1] per image: (T, H, W)."""
    images = torch.from_numpy(data.images[i : i + 1]).unsqueeze(2).to(device).requires_grad_(True)
    mask = torch.from_numpy(data.mask[i : i + 1]).to(device)
    biomech = inputs.biomech_of(torch.tensor([i]), device)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(images, mask, biomech)
        out.logits[0, 0].backward()
    grad = images.grad[0, :, 0].abs()
    grad = torch.nn.functional.avg_pool2d(grad.unsqueeze(1), 5, stride=1, padding=2).squeeze(1)
    peak = grad.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    model.zero_grad(set_to_none=True)
    return (grad / peak).detach().cpu().numpy()


def safe_name(study: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", study)[:120] or "study"


def write_figure(folder: Path, data: SiteData, i: int, study: StudyPrediction, saliency: np.ndarray, top: int,
                 meta: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = study.images
    order = np.argsort(study.attention)[::-1][: min(top, n)]
    fig = plt.figure(figsize=(max(8.0, 1.6 * n), 6.2))
    grid = fig.add_gridspec(2, max(n, 2 * len(order)), height_ratios=[1, 2.2])
    weights = np.array(study.attention)
    for z in range(n):
        ax = fig.add_subplot(grid[0, z])
        ax.imshow(data.images[i, z], cmap="gray", vmin=0, vmax=1)
        ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=4,
                                   ec=plt.cm.inferno(weights[z] / max(weights.max(), 1e-9))))
        ax.set_title(f"#{z + 1}: {weights[z]:.2f}", fontsize=8)
        ax.axis("off")
    span = max(n, 2 * len(order)) // max(len(order), 1)
    for k, z in enumerate(order):
        ax = fig.add_subplot(grid[1, k * span:(k + 1) * span])
        ax.imshow(data.images[i, z], cmap="gray", vmin=0, vmax=1)
        ax.imshow(saliency[z], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(f"image #{z + 1} (attention {weights[z]:.2f}), gradient saliency", fontsize=9)
        ax.axis("off")
    verdict = ", ".join(f"p={c:.2f} ({'positive' if d else 'negative'})" for c, d in zip(study.calibrated, study.decision))
    fig.suptitle(f"{study.study}: {verdict} | model round {meta.get('round')} of {meta.get('run')}\n"
                 "top row: images in order with their attention weight (brighter frame = more weight)", fontsize=10)
    path = folder / f"{safe_name(study.study)}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def model_version(meta: dict[str, Any]) -> str:
    return f"{meta.get('run', '?')} round {meta.get('round', '?')}"


def _header_lines(run: PredictionRun) -> list[str]:
    lines = [f"model: {run.model_path.name} ({model_version(run.meta)}; backbone {str(run.meta.get('backbone-hash'))[:24]})",
             f"standardisation statistics: {run.meta.get('statistics')}"]
    for label, d in run.decisions.items():
        c = d.calibration
        ece = (f"; ECE on the pooled evaluation statistics {d.ece_before:.4f} before, {d.ece_after:.4f} after"
               if d.ece_before is not None and d.ece_after is not None else "")
        lines.append(f"{label}: calibration {c.method} (a={c.a:.4g}, b={c.b:.4g}; {c.note}){ece}")
        target = f" for a target sensitivity of {d.target_sensitivity:g}" if d.target_sensitivity else ""
        lines.append(f"{label}: operating threshold {d.threshold:.4f} on the calibrated probability{target}")
    return lines


def write_csv(run: PredictionRun) -> Path:
    path = run.out / "predictions.csv"
    with path.open("w", newline="") as handle:
        for line in _header_lines(run):
            handle.write(f"# {line}\n")
        writer = csv.writer(handle)
        columns = ["study", "images"]
        for label in run.labels:
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


def write_quarantine(run: PredictionRun) -> Path:
    path = run.out / "quarantine.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows(run.quarantine)
    return path


def write_html(run: PredictionRun) -> Path:
    esc = html.escape
    rows = []
    for s in run.studies:
        cells = "".join(f"<td>{c:.3f}</td><td class='{'pos' if d else 'neg'}'>{'positive' if d else 'negative'}</td>"
                        for c, d in zip(s.calibrated, s.decision))
        severity = "" if s.severity is None else f"{s.severity:.2f}"
        top = int(np.argmax(s.attention)) + 1
        rows.append(f"<tr><td><a href='{esc(s.figure)}'>{esc(s.study)}</a></td><td>{s.images}</td>{cells}"
                    f"<td>{severity}</td><td>#{top}</td>"
                    f"<td><a href='{esc(s.figure)}'><img src='{esc(s.figure)}' alt='explanation of {esc(s.study)}' "
                    f"height='90'></a></td></tr>")
    label_headers = "".join(f"<th>{esc(label)} probability</th><th>{esc(label)} decision</th>" for label in run.labels)
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
<table id="predictions"><thead><tr><th>study</th><th>images</th>{label_headers}<th>severity</th>
<th>most attended image</th><th>explanation</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Quarantine</h2>
<table id="quarantine"><thead><tr><th>path</th><th>reason</th></tr></thead><tbody>{quarantine}</tbody></table>
<p><a href="predictions.csv">predictions.csv</a> &middot; <a href="quarantine.csv">quarantine.csv</a></p>
</body></html>
"""
    path = run.out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
