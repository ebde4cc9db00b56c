"""``clinicfl-client predict``: the exported global model on new studies, at the site, with nothing
sent anywhere.

Studies are read with the training pipeline (same layouts, preprocessing and quarantine rules).
``compute_predictions`` gives, for each study, the calibrated injury probability per label, the
decision at the model's operating threshold, the severity estimate (when the model has that head),
the attention weight of every image and a gradient saliency map of the most attended images. It
writes nothing: ``client.outputs.write_outputs`` writes ``predictions.csv``, one figure per study,
``index.html``, ``quarantine.csv`` and, when asked, a DICOM Secondary Capture of each explanation.

A model the site cannot reproduce is refused with one line and exit code 2 (``ModelRefused``):
an unknown export format, a label set that differs from the site's, or standardisation
statistics (or biomechanical statistics) that this site does not have for the model's backbone
and preprocessing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from client.site_stats import load_stats
from client.text import printable_ascii
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
    pixels: np.ndarray = field(repr=False)  # (images, H, W) in [0, 1]: the images as the model saw them
    # image index -> (H, W) map in [0, 1], for the most attended images only, most attended first
    saliency: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    source_file: Path | None = None  # the study's first input file: the reference of its DICOM capture
    figure: str = ""  # written by client.outputs, relative to the output folder
    dicom: str = ""


@dataclass(frozen=True)
class PredictionRequest:
    """What to score with which model, and where the standardisation statistics come from."""
    model: Path
    input: Path  # a site folder, a studies/ folder or one study's folder
    state_dir: Path | None = None  # a site state folder with this model's statistics
    stats_from: Path | None = None  # or a labelled site folder to fit them on
    layout: str = "auto"
    device: str | None = None  # default: CUDA when there is one
    explained_images: int = 2  # the most attended images of a study that get a saliency map


@dataclass
class PredictionRun:
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


def compute_predictions(request: PredictionRequest, progress: bool = True) -> PredictionRun:
    """Score and explain every usable study of the input; writes nothing (``client.outputs`` does).

    ModelRefused when the model cannot be reproduced here."""
    model, meta, config = load_model(request.model)
    labels = config.model.names()
    device = torch.device(request.device) if request.device else pick_device()
    decisions = label_decisions(meta, labels)
    model.to(device).eval()
    stats_note = prepare_statistics(model, config, request.state_dir, request.stats_from, device)
    try:
        data = load_for_prediction(request.input, config.data, labels, request.layout, progress=progress)
    except DataError as exc:
        if exc.code == "label-set":  # names the model's labels, which the centre chose: one clean line
            raise ModelRefused(printable_ascii(exc, 500)) from None
        raise
    if config.data.biomech_features and data.biomech is None:
        raise ModelRefused("this model uses biomechanical series but the input has none (biomech/<study>.csv)")
    run = PredictionRun(request.model, {**meta, "statistics": stats_note}, labels, decisions,
                        quarantine=list(data.quarantine), device=str(device))
    started = time.perf_counter()
    if len(data.studies):
        inputs = prepare_inputs(model, data, None, device)
        index = np.arange(len(data.studies))
        predicted = predict(model, inputs, index, device)
        run.known_labels = data.labels
        for i in tqdm(index, desc="explaining studies", unit="study", disable=None if progress else True):
            study = _study_prediction(data, i, predicted, decisions, labels)
            saliency = gradient_saliency(model, data, inputs, i, device)
            # Only the maps the figure shows are kept: a map is as large as the image it explains.
            most_attended = np.argsort(study.attention)[::-1][: request.explained_images]
            study.saliency = {int(z): saliency[z].copy() for z in most_attended}
            run.studies.append(study)
    run.seconds = time.perf_counter() - started
    return run


def _study_prediction(data: SiteData, i: int, predicted, decisions: dict[str, LabelDecision],
                      labels: list[str]) -> StudyPrediction:
    raw = predicted.probs[i].numpy().astype(float)
    calibrated = [float(decisions[label].calibration(np.array([p]))[0]) for label, p in zip(labels, raw)]
    n = int(data.mask[i].sum())
    return StudyPrediction(
        study=data.studies[i], images=n, raw=[float(p) for p in raw], calibrated=calibrated,
        decision=[c >= decisions[label].threshold for label, c in zip(labels, calibrated)],
        severity=float(predicted.severity[i]) if predicted.severity is not None else None,
        attention=[float(a) for a in predicted.attention[i][:n]], pixels=data.images[i, :n],
        source_file=data.source_files[i] if i < len(data.source_files) else None)


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
