"""DICOM study -> spatially ordered, windowed, normalised, resized image sequence (pydicom 3).

A study folder may hold several series (localisers, other sequences) in any nesting. We group
files by SeriesInstanceUID, pick one series, order its slices along the slice normal and run the
pixel pipeline: modality LUT (rescale) -> VOI window -> [0, 1] -> MONOCHROME1 inversion ->
pad to square -> resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, apply_voi_lut

from common.data.errors import StudyError


@dataclass(frozen=True)
class SliceHeader:
    path: Path
    series_uid: str
    series_description: str
    position: float | None  # along the slice normal; None when the geometry tags are missing
    instance_number: int


def read_header(path: Path) -> SliceHeader:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise StudyError("unreadable-dicom", f"{path.name}: {type(exc).__name__}") from exc
    if "SeriesInstanceUID" not in ds:
        raise StudyError("missing-series-uid", f"{path.name} has no SeriesInstanceUID")
    return SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        series_description=str(ds.get("SeriesDescription", "")),
        position=_position_along_normal(ds),
        instance_number=int(ds.get("InstanceNumber", 0) or 0),
    )


def _position_along_normal(ds: pydicom.Dataset) -> float | None:
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return float(np.dot(np.asarray(ipp, float), np.cross(row, col)))


def select_series(headers: list[SliceHeader], description: str = "") -> list[SliceHeader]:
    """The series to use, spatially ordered: the one with most images, optionally among those
    whose SeriesDescription contains ``description`` (case-insensitive)."""
    series: dict[str, list[SliceHeader]] = {}
    for h in headers:
        series.setdefault(h.series_uid, []).append(h)
    candidates = list(series.values())
    if description:
        candidates = [s for s in candidates if description.lower() in s[0].series_description.lower()]
        if not candidates:
            raise StudyError("no-matching-series", f"no series description contains {description!r}")
    # Most images first; ties broken by UID so the choice is deterministic.
    chosen = max(candidates, key=lambda s: (len(s), s[0].series_uid))
    if all(h.position is not None for h in chosen):
        return sorted(chosen, key=lambda h: (h.position, h.instance_number))
    return sorted(chosen, key=lambda h: h.instance_number)


def read_pixels(path: Path) -> np.ndarray:
    """One slice as float32 in [0, 1] after rescale, window and MONOCHROME1 inversion."""
    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, RuntimeError) as exc:
        raise StudyError("unreadable-pixels", f"{path.name}: {type(exc).__name__}") from exc
    if stored.ndim != 2:
        raise StudyError("unsupported-pixels", f"{path.name}: pixel array of shape {stored.shape}")
    values = apply_rescale(stored, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        # DICOM PS3.3 C.11.2.1.2 linear window, mapped to [0, 1].
        values = np.clip((values - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5, 0.0, 1.0)
    else:
        if "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds).astype(np.float64)
        lo, hi = np.percentile(values, [0.5, 99.5])
        values = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = 1.0 - values
    return values.astype(np.float32)


def _first(value: object) -> float:
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) -> (n, size, size): zero-pad to a square (keeps the aspect ratio), then resize."""
    n, h, w = images.shape
    side = max(h, w)
    padded = np.zeros((n, side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    padded[:, top:top + h, left:left + w] = images
    tensor = torch.from_numpy(padded).unsqueeze(1)
    if side != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=side > size)
    return tensor.squeeze(1).clamp_(0.0, 1.0).numpy()


def sample_indices(n: int, seq_len: int) -> np.ndarray:
    """Evenly spaced slice indices when a series is longer than the sequence length."""
    if n <= seq_len:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, seq_len)).astype(int)


def load_dicom_study(study_dir: Path, image_size: int, seq_len: int, series_description: str = "") -> np.ndarray:
    """A study folder -> (n, image_size, image_size) float32 with 1 <= n <= seq_len."""
    files = sorted(p for p in study_dir.rglob("*.dcm") if p.is_file())
    if not files:
        raise StudyError("no-dicom-files", "no .dcm files in the study folder")
    ordered = select_series([read_header(p) for p in files], series_description)
    ordered = [ordered[i] for i in sample_indices(len(ordered), seq_len)]
    slices = [read_pixels(h.path) for h in ordered]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise StudyError("inconsistent-geometry", f"slices of one series have shapes {sorted(shapes)}")
    return resize_square(np.stack(slices), image_size)
