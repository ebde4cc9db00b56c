"""Optional biomechanical time series, one CSV per study: ``biomech/<study>.csv`` in the site folder.

Rows are time steps and columns are features (a header row names them). Each series is
resampled by linear interpolation to the study's number of images, so step t of the series sits
beside image t, and standardised with the site's own training statistics (kept at the site).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from common.data.errors import StudyError

BIOMECH_DIR = "biomech"


def biomech_path(site_dir: Path, study: str) -> Path:
    return site_dir / BIOMECH_DIR / f"{study}.csv"


def read_biomech(path: Path, num_features: int) -> np.ndarray:
    """(rows, features) float32; a StudyError with a reason code when the file cannot be used."""
    if not path.is_file():
        raise StudyError("missing-biomech", f"no biomechanical series {path.name}")
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise StudyError("bad-biomech", f"cannot read {path.name}: {type(exc).__name__}") from None
    if rows and not _numeric(rows[0]):
        rows = rows[1:]  # header
    try:
        values = np.array([[float(cell) for cell in row] for row in rows], dtype=np.float64)
    except ValueError:
        raise StudyError("bad-biomech", f"{path.name} has non-numeric or ragged rows") from None
    if values.ndim != 2 or len(values) == 0:
        raise StudyError("bad-biomech", f"{path.name} has no rows")
    if values.shape[1] != num_features:
        raise StudyError("biomech-feature-count", f"{path.name} has {values.shape[1]} columns, "
                                                  f"the run config says biomech-features = {num_features}")
    if not np.isfinite(values).all():
        raise StudyError("bad-biomech", f"{path.name} has missing or infinite values")
    return values.astype(np.float32)


def resample(series: np.ndarray, steps: int) -> np.ndarray:
    """(rows, F) -> (steps, F) by linear interpolation over normalised time."""
    if len(series) == 1:
        return np.repeat(series, steps, axis=0)
    source = np.linspace(0.0, 1.0, len(series))
    target = np.linspace(0.0, 1.0, steps)
    return np.stack([np.interp(target, source, series[:, j]) for j in range(series.shape[1])], axis=1).astype(
        np.float32)


def standardise(biomech: np.ndarray, mask: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """(N, T, F) standardised with the mean and std of the training studies' real steps;
    padding stays zero. A constant feature becomes zero rather than dividing by zero."""
    steps = biomech[train_rows][mask[train_rows]]
    mean = steps.mean(0) if len(steps) else np.zeros(biomech.shape[-1], np.float32)
    std = steps.std(0) if len(steps) else np.ones(biomech.shape[-1], np.float32)
    scale = np.where(std > 1e-8, 1.0 / np.maximum(std, 1e-8), 0.0)
    return (((biomech - mean) * scale) * mask[..., None]).astype(np.float32)


def _numeric(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
        return True
    except ValueError:
        return False
