"""PNG plots of a run: metric curves, ROC of the last round, and, from the server's own
validation set, attention heat-maps and real vs reconstructed images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.config import RunConfig  # noqa: E402
from common.model import build_model, upsample_reconstruction  # noqa: E402
from common.inference import predict  # noqa: E402
from server.evaluation import CentralValidation, central_cache_dir  # noqa: E402
from common.rundir import RunDirectory  # noqa: E402
from rich.console import Console  # noqa: E402
from common.metrics.catalogue import interval_of  # noqa: E402
from server.runs import CI_LABEL, chosen_round, with_interval  # noqa: E402

CURVES = ["auc", "accuracy", "sensitivity", "specificity", "f1", "kappa", "mae", "rmse", "psnr", "ssim", "fid", "is"]


def write_report(run_dir: Path, out_dir: Path | None = None, studies: int = 4) -> list[tuple[str, str]]:
    """Writes the PNGs; returns (file or plot, what happened) for each plot."""
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunDirectory(run_dir)
    records = run.read_metrics()
    if not records:
        raise ValueError(f"{run_dir} has no finished round (its metrics log is empty)")
    done = [("curves.png", _curves(records, out_dir / "curves.png")),
            ("roc.png", _roc(records[-1], out_dir / "roc.png"))]
    config = RunConfig.from_mapping(run.config())
    if not config.eval.server_val_path:
        reason = "not available: the run has no server validation set (server-val-path)"
        return done + [("attention.png", reason), ("reconstructions.png", reason)]
    # The best finished round (checkpoint and metrics both written; as export takes it), loaded as
    # data only.
    last = chosen_round(run)
    arrays, _ = run.load_checkpoint_arrays(last)
    central = CentralValidation(config, Path(config.eval.server_val_path), build_model(config.model),
                                central_cache_dir(run_dir.parent))
    central.evaluate(arrays)
    pred = predict(central.model, central.inputs, central.index, central.device)
    chosen = _pick_studies(central.site.labels[:, 0], studies)
    done.append(("attention.png", _attention(central, pred, chosen, last, out_dir / "attention.png")))
    if pred.reconstruction is None:
        done.append(("reconstructions.png", "not available: reconstruction head disabled"))
    else:
        done.append(("reconstructions.png", _reconstructions(central, pred, chosen, out_dir / "reconstructions.png")))
    return done


def _pick_studies(labels: np.ndarray, k: int) -> list[int]:
    positives, negatives = list(np.flatnonzero(labels == 1)), list(np.flatnonzero(labels == 0))
    half = k // 2
    return sorted(positives[:k - min(half, len(negatives))] + negatives[:half])[:k]


def _curves(records: list[dict[str, Any]], path: Path) -> str:
    rounds = [r["round"] for r in records]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(CURVES) / cols), cols, figsize=(16, 10), constrained_layout=True)
    for ax, name in zip(axes.ravel(), CURVES):
        # FID is computed only in the rounds fid-every names: its lines join those rounds. Any
        # other figure that is not available leaves a gap.
        scheduled = name == "fid"

        def plot(values: list[Any], style: str, **kwargs: Any) -> None:
            points = [(r, v) for r, v in zip(rounds, values) if v is not None or not scheduled]
            ax.plot([r for r, _ in points], [np.nan if v is None else v for _, v in points], style, **kwargs)

        plot([((r.get("catalogue") or {}).get(name) or {}).get("value") for r in records], "o-", lw=2.5,
             color="black", label="global")
        band_rounds, lows, highs = interval_band(records, name)
        if band_rounds:
            ax.fill_between(band_rounds, lows, highs, color="black", alpha=0.15, lw=0, label=f"global {CI_LABEL}")
        sites = sorted({s for r in records for s in (((r.get("catalogue") or {}).get(name) or {}).get("per_site") or {})})
        for site in sites:
            plot([(((r.get("catalogue") or {}).get(name) or {}).get("per_site") or {}).get(site) for r in records],
                 "-", lw=1, alpha=0.7, label=site)
        central = [((r.get("server_validation") or {}).get(name) or {}).get("value") for r in records]
        if any(v is not None for v in central):
            plot(central, "s--", color="tab:red", label="server validation")
        ax.set_title("FID (the rounds that compute it: fid-every)" if scheduled else
                     name.upper() if len(name) <= 4 else name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes.ravel()[0].legend(fontsize=8)
    fig.suptitle(f"Global model per round (pooled over sites), shaded: its {CI_LABEL}; thin lines: each site")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def interval_band(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float], list[float]]:
    """(rounds, lower bounds, upper bounds) of the global figure's confidence interval, over the
    rounds that have one; a round without one breaks the band (NaN)."""
    bands = [interval_of((r.get("catalogue") or {}).get(name)) for r in records]
    if all(bounds is None for bounds in bands):
        return [], [], []
    return ([r["round"] for r in records], [np.nan if b is None else b[0] for b in bands],
            [np.nan if b is None else b[1] for b in bands])


def _roc(record: dict[str, Any], path: Path) -> str:
    roc = record.get("roc") or {}
    if not roc:
        return "not available: the last round has no evaluation"
    fig, ax = plt.subplots(figsize=(5.5, 5))
    auc = ((record.get("catalogue") or {}).get("auc") or {})
    for label, curve in roc.items():
        value = (auc.get("per_label") or {}).get(label, auc.get("value"))
        bounds = interval_of(auc, label=label) if auc.get("per_label") else interval_of(auc)
        ax.plot(curve["fpr"], curve["tpr"], lw=2,
                label=f"{label} (AUC {with_interval(value, bounds)})" if value is not None else label)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, round {record['round']}, pooled over sites")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _attention(central: CentralValidation, pred, chosen: list[int], rnd: int, path: Path) -> str:
    t = central.site.mask.shape[1]
    fig, axes = plt.subplots(len(chosen), t, figsize=(1.6 * t, 1.9 * len(chosen)), squeeze=False)
    for row, i in enumerate(chosen):
        weights = pred.attention[i].numpy()
        for z in range(t):
            ax = axes[row, z]
            ax.axis("off")
            if not central.site.mask[i, z]:
                continue
            ax.imshow(central.site.images[i, z], cmap="gray", vmin=0, vmax=1)
            ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=4,
                                       ec=plt.cm.inferno(weights[z] / max(weights.max(), 1e-9))))
            ax.set_title(f"{weights[z]:.2f}", fontsize=8)
        axes[row, 0].text(-0.1, 0.5, f"label {int(central.site.labels[i, 0])}\np={pred.probs[i, 0]:.2f}",
                          transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(f"Attention per slice (server validation studies, round {rnd}); brighter frame = more weight")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _reconstructions(central: CentralValidation, pred, chosen: list[int], path: Path) -> str:
    size = central.site.images.shape[-1]
    pairs = []
    for i in chosen:
        valid = int(central.site.mask[i].sum())
        z = valid // 2
        pairs.append((central.site.images[i, z],
                      upsample_reconstruction(pred.reconstruction[i, z][None], size)[0].numpy()))
    fig, axes = plt.subplots(2, len(pairs), figsize=(2.2 * len(pairs), 4.6), squeeze=False)
    for col, (real, fake) in enumerate(pairs):
        for row, (image, title) in enumerate(((real, "real"), (fake, "reconstructed"))):
            axes[row, col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_title(title, fontsize=9)
            axes[row, col].axis("off")
    fig.suptitle("Real vs reconstructed (middle slice, server validation studies)")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def print_report(run: RunDirectory, console: Console, out: Path | None = None) -> None:
    """``clinicfl-server report RUN``: writes the run's PNG plots (in RUN_DIR/report unless
    ``out``) and prints what became of each, one line each as print() writes it."""
    for name, outcome in write_report(run.path, out):
        console.out(f"{name:20s} {outcome}", highlight=False)
