"""What every site layout produces: labelled studies, each with a reader for its images.

A layout (labels.csv + DICOM, MURA, MRNet) only finds studies and their labels; reading,
caching, biomechanical series and the split are the same for all of them (``site.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# (path relative to the site folder, reason code): what was left out, shown on the site's screen only
Quarantine = list[tuple[str, str]]


@dataclass(frozen=True)
class StudyLabel:
    study: str  # the study's key inside the site (a folder name or relative path); never sent
    labels: tuple[float, ...]
    split: str | None = None
    patient: str | None = None
    target: float | None = None


@dataclass
class StudyImages:
    """One study's preprocessed images and what check-data reports about them."""

    images: np.ndarray  # (n, S, S) float32 in [0, 1], 1 <= n <= seq-len
    modality: str  # "MR", "CT", "XR", ... (the DICOM Modality code, or the layout's own)
    series: int = 1  # image series found in the study (one is used)
    files: int = 1  # image files read
    sizes: list[str] = field(default_factory=list)  # "HxW" of each source image before resizing
    subgroups: tuple[tuple[str, str], ...] = ()  # (kind, category) of the chosen series (common/data/subgroups.py)


@dataclass(frozen=True)
class StudySource:
    label: StudyLabel
    files: tuple[Path, ...]  # every input file: the preprocessing cache is keyed by their content
    read: Callable[[list[tuple[Path, str]]], StudyImages]  # appends unusable files with their reason
    info: tuple[tuple[str, str], ...] = ()  # layout metadata kept at the site, e.g. (("body-part", "elbow"),)
    location: str = ""  # where check-data points a site admin (relative to the site); default: the study key

    @property
    def where(self) -> str:
        return self.location or self.label.study


@dataclass
class Discovery:
    """A layout's findings: studies to read, label names, and label/study mismatches."""

    layout: str
    sources: list[StudySource]
    label_names: list[str]
    quarantine: Quarantine = field(default_factory=list)
