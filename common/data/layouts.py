"""Site layouts: find a site's studies and labels. Each layout is described in docs/data.md.

``dicom`` (clinicfl's own): ``labels.csv`` plus ``studies/<study>/**/*.dcm``.
``mura``: MURA v1.1, ``{train,valid}/XR_<PART>/patientNNNNN/studyN_{positive,negative}/imageN.png``.
``mrnet``: MRNet v1.0, ``{train,valid}/{axial,coronal,sagittal}/NNNN.npy`` and label CSVs.

``auto`` picks the layout from what the folder holds. A label row whose study is missing and a
study with no label become quarantine entries; the rest of the site is used.
"""

from __future__ import annotations

import csv
from pathlib import Path

from common.config import SITE_LAYOUTS, DataConfig
from common.data.dicom import load_dicom_study
from common.data.errors import DataError
from common.data.study import Discovery, StudyLabel, StudySource

LAYOUTS = SITE_LAYOUTS
LABELS_FILE = "labels.csv"
STUDIES_DIR = "studies"


def detect_layout(site_dir: Path) -> str:
    if not site_dir.is_dir():
        raise DataError("missing-site-dir", f"site directory {site_dir} does not exist")
    if (site_dir / LABELS_FILE).is_file() or (site_dir / STUDIES_DIR).is_dir():
        return "dicom"
    for split in ("train", "valid"):
        folder = site_dir / split
        if folder.is_dir():
            names = {p.name for p in folder.iterdir() if p.is_dir()}
            if any(n.startswith("XR_") for n in names):
                return "mura"
            if names & {"axial", "coronal", "sagittal"}:
                return "mrnet"
    raise DataError("unknown-layout", f"{site_dir} is not a known site layout: expected {LABELS_FILE} + "
                                      f"{STUDIES_DIR}/ (DICOM), MURA v1.1 or MRNet v1.0 train/valid folders; "
                                      f"see docs/data.md")


def discover(site_dir: Path, layout: str, config: DataConfig) -> Discovery:
    """The site's labelled studies, in a deterministic order."""
    if layout not in LAYOUTS:
        raise DataError("unknown-layout", f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        layout = detect_layout(site_dir)
    elif not site_dir.is_dir():
        raise DataError("missing-site-dir", f"site directory {site_dir} does not exist")
    if layout == "mura":
        from common.data.mura import discover_mura
        return discover_mura(site_dir, config)
    if layout == "mrnet":
        from common.data.mrnet import discover_mrnet
        return discover_mrnet(site_dir, config)
    return discover_dicom(site_dir, config)


def discover_dicom(site_dir: Path, config: DataConfig) -> Discovery:
    records, label_names = read_labels(site_dir)
    studies_dir = site_dir / STUDIES_DIR
    if not studies_dir.is_dir():
        raise DataError("missing-studies", f"{studies_dir} does not exist")
    on_disk = {p.name for p in studies_dir.iterdir() if p.is_dir()}
    labelled = {r.study for r in records}
    quarantine = [(f"{STUDIES_DIR}/{r.study}", "label-without-study") for r in records if r.study not in on_disk]
    quarantine += [(f"{STUDIES_DIR}/{name}", "study-without-label") for name in sorted(on_disk - labelled)]

    def reader(folder: Path):
        return lambda files: load_dicom_study(folder, config.image_size, config.seq_len, config.series_description,
                                              files)

    sources = []
    for record in records:
        folder = studies_dir / record.study
        if record.study in on_disk:
            files = tuple(sorted(p for p in folder.rglob("*.dcm") if p.is_file()))
            sources.append(StudySource(record, files, reader(folder), location=f"{STUDIES_DIR}/{record.study}"))
    return Discovery("dicom", sources, label_names, quarantine)


def read_labels(site_dir: Path) -> tuple[list[StudyLabel], list[str]]:
    """Parse labels.csv; every problem is a one-line DataError naming the row.

    Columns: ``study`` (the folder name), ``label`` (0/1) or several ``label_<name>`` columns
    (multi-label), and optional ``split`` (train/test), ``patient`` and ``target`` (severity)."""
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


def read_binary_csv(path: Path) -> dict[str, float]:
    """A header-less ``key,0|1`` CSV as used by MURA and MRNet."""
    values: dict[str, float] = {}
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or row[1].strip() not in ("0", "1"):
                raise DataError("bad-labels", f"{path}:{line}: expected 'key,0' or 'key,1'")
            values[row[0].strip()] = float(row[1].strip())
    return values
