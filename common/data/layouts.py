"""Site layouts: find a site's studies and labels. Each layout is described in docs/data.md.

``dicom`` (clinicfl's own): ``labels.csv`` plus ``studies/<study>/**/*.dcm``.
``mura``: MURA v1.1, ``{train,valid}/XR_<PART>/patientNNNNN/studyN_{positive,negative}/imageN.png``.
``mrnet``: MRNet v1.0, ``{train,valid}/{axial,coronal,sagittal}/NNNN.npy`` and label CSVs.

``auto`` picks the layout from what the folder holds. A label row whose study is missing and a
study with no label become quarantine entries; the rest of the site is used.
"""

from __future__ import annotations

from pathlib import Path

from common.config import SITE_LAYOUTS, DataConfig
from common.data.dicom import DICOM_SUFFIXES, load_dicom_study
from common.data.listing import list_files, list_folders
from common.data.errors import DataError
from common.data.labels import LABELS_FILE, STUDIES_DIR, read_labels
from common.data.mrnet import discover_mrnet
from common.data.mura import discover_mura
from common.data.study import Discovery, StudyLabel, StudySource


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
    if layout not in SITE_LAYOUTS:
        raise DataError("unknown-layout", f"layout must be one of {', '.join(SITE_LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        layout = detect_layout(site_dir)
    elif not site_dir.is_dir():
        raise DataError("missing-site-dir", f"site directory {site_dir} does not exist")
    if layout == "mura":
        return discover_mura(site_dir, config)
    if layout == "mrnet":
        return discover_mrnet(site_dir, config)
    return discover_dicom(site_dir, config)


def discover_dicom(site_dir: Path, config: DataConfig) -> Discovery:
    records, label_names = read_labels(site_dir)
    studies_dir = site_dir / STUDIES_DIR
    if not studies_dir.is_dir():
        raise DataError("missing-studies", f"{studies_dir} does not exist")
    on_disk = {p.name for p in list_folders(studies_dir)}
    labelled = {r.study for r in records}
    quarantine = [(f"{STUDIES_DIR}/{r.study}", "label-without-study") for r in records if r.study not in on_disk]
    quarantine += [(f"{STUDIES_DIR}/{name}", "study-without-label") for name in sorted(on_disk - labelled)]

    sources = []
    for record in records:
        folder = studies_dir / record.study
        if record.study in on_disk:
            files, broken = list_files(folder, DICOM_SUFFIXES)
            quarantine += [(str(path.relative_to(site_dir)), "broken-link") for path in broken]
            sources.append(StudySource(record, tuple(files), _dicom_reader(folder, config), location=f"{STUDIES_DIR}/{record.study}"))
    return Discovery("dicom", sources, label_names, quarantine)


def discover_unlabelled(path: Path, layout: str, config: DataConfig, label_names: list[str]) -> Discovery:
    """Studies to score, with or without labels: a site folder in any layout, a ``studies/`` folder
    without labels.csv (one study per sub-folder), or one study's folder of DICOM files. Studies
    without a label get NaN labels; a site whose labels name other tasks than the model's is an
    error (``label-set``)."""
    if not path.is_dir():
        raise DataError("missing-site-dir", f"{path} does not exist or is not a folder")
    unknown = tuple(float("nan") for _ in label_names)
    if (path / LABELS_FILE).is_file() or layout in ("mura", "mrnet") or (
            layout == "auto" and not (path / STUDIES_DIR).is_dir() and _is_mura_or_mrnet(path)):
        found = discover(path, layout, config)
        if found.label_names != label_names:
            raise DataError("label-set", f"{path} labels {', '.join(found.label_names)} but the model predicts "
                                         f"{', '.join(label_names)}: use a model trained on this task")
        return found
    if (path / STUDIES_DIR).is_dir():
        folders = list_folders(path / STUDIES_DIR)
        records = [StudyLabel(folder.name, unknown) for folder in folders]
        location = STUDIES_DIR + "/"
    else:
        folders, records, location = [path], [StudyLabel(path.name, unknown)], ""
    sources, quarantine = [], []
    for folder, record in zip(folders, records):
        files, broken = list_files(folder, DICOM_SUFFIXES)
        quarantine += [(str(p.relative_to(path)), "broken-link") for p in broken]
        if not files and not broken:
            quarantine.append((f"{location}{folder.name}" if location else folder.name, "no-dicom-files"))
            continue
        sources.append(StudySource(record, tuple(files), _dicom_reader(folder, config),
                                   location=f"{location}{folder.name}" if location else folder.name))
    if not sources and not quarantine:
        raise DataError("empty-site", f"{path} holds no study: give a site folder, a studies/ folder or one "
                                      "study's folder of DICOM files")
    return Discovery("dicom", sources, label_names, quarantine)


def _is_mura_or_mrnet(path: Path) -> bool:
    try:
        return detect_layout(path) in ("mura", "mrnet")
    except DataError:
        return False


def _dicom_reader(folder: Path, config: DataConfig):
    return lambda files: load_dicom_study(folder, config.image_size, config.seq_len, config.series_description, files)
