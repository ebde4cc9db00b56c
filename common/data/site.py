"""A site directory: ``labels.csv`` plus ``studies/<study>/**/*.dcm``, loaded into arrays.

labels.csv columns: ``study`` (the folder name), ``label`` (0/1) or several ``label_<name>``
columns (multi-label), and optional ``split`` (train/test), ``patient`` and ``target``
(continuous severity). Without ``split``, a deterministic split keeps all studies of a
patient (or each study, when there is no patient column) on one side.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import DataConfig
from common.data.dicom import load_dicom_study
from common.data.errors import DataError, StudyError

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
STUDIES_DIR = "studies"


@dataclass(frozen=True)
class StudyLabel:
    study: str
    labels: tuple[float, ...]
    split: str | None = None
    patient: str | None = None
    target: float | None = None


@dataclass
class SiteData:
    """A site's studies as arrays; index i of every array is the same study."""

    studies: list[str]
    images: np.ndarray  # (N, T, H, W) float32 in [0, 1], zero after each study's last image
    mask: np.ndarray  # (N, T) bool, a prefix of True per study
    labels: np.ndarray  # (N, L) float32 in {0, 1}
    targets: np.ndarray  # (N,) float32, NaN where labels.csv has no target
    is_test: np.ndarray  # (N,) bool
    label_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (study, reason code)
    groups: list[str] = field(default_factory=list)  # patient (or study) key per study; stays at the site
    quarantine: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the site, reason code)

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(~self.is_test)

    @property
    def test_index(self) -> np.ndarray:
        return np.flatnonzero(self.is_test)


def read_labels(site_dir: Path) -> tuple[list[StudyLabel], list[str]]:
    """Parse labels.csv; every problem is a one-line DataError naming the row."""
    if not site_dir.is_dir():
        raise DataError("missing-site-dir", f"site directory {site_dir} does not exist")
    path = site_dir / LABELS_FILE
    if not path.is_file():
        raise DataError("missing-labels", f"{path} not found: a site needs {LABELS_FILE} and {STUDIES_DIR}/")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = list(reader)
    if "study" not in columns:
        raise DataError("bad-labels", f"{path} has no 'study' column (columns: {', '.join(columns) or 'none'})")
    label_columns = ["label"] if "label" in columns else sorted(c for c in columns if c.startswith("label_"))
    if not label_columns:
        raise DataError("bad-labels", f"{path} has no 'label' or 'label_<name>' column")
    if not rows:
        raise DataError("empty-site", f"{path} has no rows")
    records, seen = [], set()
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        study = row["study"]
        if not study:
            raise DataError("bad-labels", f"{path}:{line}: empty study name")
        if study in seen:
            raise DataError("bad-labels", f"{path}:{line}: study {study!r} listed twice")
        seen.add(study)
        labels = []
        for column in label_columns:
            if row.get(column) not in ("0", "1", "0.0", "1.0"):
                raise DataError("bad-labels", f"{path}:{line}: {column} must be 0 or 1, got {row.get(column)!r}")
            labels.append(float(row[column]))
        split = row.get("split") or None
        if split not in (None, "train", "test"):
            raise DataError("bad-labels", f"{path}:{line}: split must be train or test, got {split!r}")
        target = None
        if row.get("target"):
            try:
                target = float(row["target"])
            except ValueError:
                raise DataError("bad-labels", f"{path}:{line}: target must be a number") from None
        records.append(StudyLabel(study, tuple(labels), split, row.get("patient") or None, target))
    names = ["injury"] if label_columns == ["label"] else [c.removeprefix("label_") for c in label_columns]
    return records, names


def assign_split(records: list[StudyLabel], test_fraction: float, seed: int) -> np.ndarray:
    """is_test per record: the ``split`` column when given, else a seeded split by patient group."""
    if all(r.split is not None for r in records):
        return np.array([r.split == "test" for r in records])
    groups = sorted({r.patient or r.study for r in records})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_test = min(len(groups) - 1, max(1, round(test_fraction * len(groups)))) if len(groups) > 1 else 0
    test_groups = {groups[i] for i in order[:n_test]}
    return np.array([(r.patient or r.study) in test_groups for r in records])


def load_site(site_dir: Path, config: DataConfig, num_labels: int, progress: bool = True) -> SiteData:
    """Read and preprocess every labelled study. A study that cannot be read is skipped with its
    reason code; a site with nothing usable is a DataError."""
    records, label_names = read_labels(site_dir)
    if len(label_names) != num_labels:
        raise DataError("label-count", f"labels.csv has {len(label_names)} label column(s) but the run "
                                       f"config says num-labels = {num_labels}")
    studies_dir = site_dir / STUDIES_DIR
    if not studies_dir.is_dir():
        raise DataError("missing-studies", f"{studies_dir} does not exist")
    missing = [r.study for r in records if not (studies_dir / r.study).is_dir()]
    if missing:
        raise DataError("labels-without-study",
                        f"labels.csv names {len(missing)} stud{'y' if len(missing) == 1 else 'ies'} with no folder "
                        f"under {studies_dir}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    is_test = assign_split(records, config.test_fraction, config.seed)

    kept, arrays, skipped = [], [], []
    files: list[tuple[Path, str]] = []  # unusable files, with their reason codes
    for i, record in enumerate(tqdm(records, desc=f"reading {site_dir.name}", unit="study",
                                    disable=None if progress else True, leave=False)):
        try:
            arrays.append(load_dicom_study(studies_dir / record.study, config.image_size, config.seq_len,
                                           config.series_description, files))
            kept.append(i)
        except StudyError as exc:
            log.warning("skipping study %s: %s (%s)", record.study, exc.code, exc)
            skipped.append((record.study, exc.code))
    quarantine = [(str(path.relative_to(site_dir)), code) for path, code in files]
    quarantine += [(f"{STUDIES_DIR}/{study}", code) for study, code in skipped]
    if not kept:
        raise DataError("no-usable-studies", f"none of the {len(records)} studies in {site_dir} could be read")

    n, t, s = len(kept), config.seq_len, config.image_size
    images = np.zeros((n, t, s, s), dtype=np.float32)
    mask = np.zeros((n, t), dtype=bool)
    for row, array in enumerate(arrays):
        images[row, : len(array)] = array
        mask[row, : len(array)] = True
    chosen = [records[i] for i in kept]
    return SiteData(
        studies=[r.study for r in chosen],
        images=images,
        mask=mask,
        labels=np.array([r.labels for r in chosen], dtype=np.float32),
        targets=np.array([math.nan if r.target is None else r.target for r in chosen], dtype=np.float32),
        is_test=is_test[kept],
        label_names=label_names,
        skipped=skipped,
        groups=[r.patient or r.study for r in chosen],
        quarantine=quarantine,
    )
