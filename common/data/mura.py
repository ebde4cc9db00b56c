"""MURA v1.1: musculoskeletal radiographs, one study per folder, several views per study.

    MURA-v1.1/
      train_labeled_studies.csv   valid_labeled_studies.csv   (optional: study folder, 0/1)
      train/XR_ELBOW/patient00011/study1_negative/image1.png ...
      valid/XR_WRIST/patient11185/study1_positive/image1.png ...

A study's views (sorted by image number) form one sequence. The label is the study-level
abnormality: from the CSVs when present, else from the folder name. MURA's ``valid`` split is
the site's test split; the patient folder groups studies; the body part is kept as metadata.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.config import DataConfig
from common.data.dicom import resize_square, sample_indices
from common.data.errors import DataError, StudyError
from common.data.labels import read_binary_csv
from common.data.listing import list_files, list_folders
from common.data.study import Discovery, StudyImages, StudyLabel, StudySource

SPLITS = {"train": "train", "valid": "test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_FOLDER_LABEL = re.compile(r"_(positive|negative)$")


def discover_mura(site_dir: Path, config: DataConfig) -> Discovery:
    sources, quarantine = [], []
    for split, our_split in SPLITS.items():
        root = site_dir / split
        if not root.is_dir():
            continue
        csv_path = site_dir / f"{split}_labeled_studies.csv"
        csv_labels = {_study_key(k): v for k, v in read_binary_csv(csv_path).items()} if csv_path.is_file() else {}
        on_disk = list_folders(root, "XR_*/*/*")
        keys = {str(p.relative_to(site_dir)) for p in on_disk}
        quarantine += [(key, "label-without-study") for key in sorted(set(csv_labels) - keys)
                       if key.startswith(f"{split}/")]
        for folder in on_disk:
            key = str(folder.relative_to(site_dir))
            label = csv_labels.get(key)
            if label is None and (match := _FOLDER_LABEL.search(folder.name)):
                label = 1.0 if match.group(1) == "positive" else 0.0
            if label is None:
                quarantine.append((key, "study-without-label"))
                continue
            images, broken = list_files(folder, IMAGE_SUFFIXES, recursive=False)
            quarantine += [(str(path.relative_to(site_dir)), "broken-link") for path in broken]
            files = tuple(sorted(images, key=_image_number))
            part = folder.parents[1].name.removeprefix("XR_").lower()
            record = StudyLabel(key, (label,), our_split, patient=f"{split}/{folder.parent.name}")
            sources.append(StudySource(record, files, _reader(files, site_dir, config), (("body-part", part),)))
    if not sources and not quarantine:
        raise DataError("empty-site", f"{site_dir} has no MURA studies under train/XR_*/ or valid/XR_*/")
    return Discovery("mura", sources, ["abnormal"], quarantine)


def _study_key(csv_path: str) -> str:
    """'MURA-v1.1/train/XR_WRIST/patient06359/study1_positive/' -> 'train/XR_WRIST/patient06359/study1_positive'."""
    parts = [p for p in csv_path.strip().split("/") if p]
    for i, part in enumerate(parts):
        if part in SPLITS:
            return "/".join(parts[i:])
    return "/".join(parts)


def _image_number(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else 0, path.name)


def _reader(files: tuple[Path, ...], site_dir: Path, config: DataConfig):
    def read(quarantine: list[tuple[Path, str]]) -> StudyImages:
        views, sizes = [], []
        for path in files:
            try:
                with Image.open(path) as image:
                    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                quarantine.append((path, "undecodable-image"))
                continue
            views.append(grey)
            sizes.append(f"{grey.shape[0]}x{grey.shape[1]}")
        if not views:
            raise StudyError("no-usable-images", "no view of the study could be read")
        views = [views[i] for i in sample_indices(len(views), config.seq_len)]
        # Views of one study differ in size: each is padded to a square and resized on its own.
        images = np.concatenate([resize_square(v[None], config.image_size) for v in views])
        return StudyImages(images, modality="XR", series=1, files=len(sizes), sizes=sizes)

    return read
