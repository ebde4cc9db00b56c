"""MRNet v1.0: knee MRI exams as one ``.npy`` volume per plane, multi-label.

    MRNet-v1.0/
      train-abnormal.csv  train-acl.csv  train-meniscus.csv   (header-less: 0000,0)
      valid-abnormal.csv  valid-acl.csv  valid-meniscus.csv
      train/{axial,coronal,sagittal}/0000.npy   (slices, 256, 256) uint8
      valid/{axial,coronal,sagittal}/1130.npy

The run config chooses the plane (``mrnet-plane``) and the labels (``mrnet-labels``, a
comma-separated subset of abnormal, acl, meniscus; their number is ``num-labels``). MRNet's
``valid`` split is the site's test split. Exams have no patient key: each exam is its own group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import DataConfig
from common.data.dicom import resize_square, sample_indices
from common.data.errors import DataError, StudyError
from common.data.labels import read_binary_csv
from common.data.listing import list_files
from common.data.study import Discovery, StudyImages, StudyLabel, StudySource

SPLITS = {"train": "train", "valid": "test"}


def discover_mrnet(site_dir: Path, config: DataConfig) -> Discovery:
    tasks = [t.strip() for t in config.mrnet_labels.split(",") if t.strip()]
    sources, quarantine = [], []
    for split, our_split in SPLITS.items():
        root = site_dir / split / config.mrnet_plane
        if not (site_dir / split).is_dir():
            continue
        tables = {}
        for task in tasks:
            path = site_dir / f"{split}-{task}.csv"
            if not path.is_file():
                raise DataError("missing-labels", f"{path} not found: MRNet needs {split}-<task>.csv for every task "
                                                  f"in mrnet-labels ({', '.join(tasks)})")
            tables[task] = read_binary_csv(path)
        found, broken = list_files(root, {".npy"}, recursive=False)
        volumes = {p.stem: p for p in found}
        quarantine += [(str(path.relative_to(site_dir)), "broken-link") for path in broken]
        exam_ids = sorted(set().union(*(t.keys() for t in tables.values())))
        for exam in exam_ids:
            key = f"{split}/{config.mrnet_plane}/{exam}.npy"
            if exam not in volumes:
                quarantine.append((key, "label-without-study"))
                continue
            if any(exam not in t for t in tables.values()):
                quarantine.append((key, "study-without-label"))  # labelled for some tasks only
                continue
            record = StudyLabel(f"{split}/{exam}", tuple(tables[t][exam] for t in tasks), our_split)
            sources.append(StudySource(record, (volumes[exam],), _reader(volumes[exam], config),
                                       (("plane", config.mrnet_plane),), location=key))
        quarantine += [(f"{split}/{config.mrnet_plane}/{e}.npy", "study-without-label")
                       for e in sorted(set(volumes) - set(exam_ids))]
    if not sources and not quarantine:
        raise DataError("empty-site", f"{site_dir} has no MRNet exams under train/{config.mrnet_plane}/ or "
                                      f"valid/{config.mrnet_plane}/")
    return Discovery("mrnet", sources, tasks, quarantine)


def _reader(path: Path, config: DataConfig):
    def read(quarantine: list[tuple[Path, str]]) -> StudyImages:
        try:
            volume = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise StudyError("unreadable-volume", f"{path.name}: {type(exc).__name__}") from None
        if volume.ndim != 3 or min(volume.shape) < 1:
            raise StudyError("bad-volume-shape", f"{path.name} has shape {volume.shape}, expected (slices, H, W)")
        index = sample_indices(len(volume), config.seq_len)
        slices = np.asarray(volume[index], dtype=np.float32)
        # MRNet volumes are 8-bit already windowed; other dtypes are scaled by their own range.
        peak = 255.0 if volume.dtype == np.uint8 else max(float(slices.max()), 1e-6)
        images = resize_square(np.clip(slices / peak, 0.0, 1.0), config.image_size)
        size = f"{volume.shape[1]}x{volume.shape[2]}"
        return StudyImages(images, modality="MR", series=1, files=1, sizes=[size] * len(volume))

    return read
