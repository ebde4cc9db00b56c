"""A site folder, whatever its layout, loaded into aligned arrays the model consumes.

The layout (``layouts.py``: labels.csv + DICOM, MURA, MRNet) finds labelled studies; here each
study is read through the preprocessing cache, optional biomechanical series are joined, and
the train/validation/test split is made. Without an explicit split, a deterministic split keeps
all studies of a patient (or each study, when there is no patient key) on one side.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from common.config import DataConfig
from common.data.biomech import biomech_path, read_biomech, resample, standardise
from common.data.cache import PreprocessCache, StudyResult
from common.data.errors import DataError, StudyError
from common.data.layouts import discover, discover_unlabelled
from common.data.study import Discovery, Quarantine, StudyLabel, StudySource
from common.data.subgroups import study_subgroups
from common.progress import progress_bar

log = logging.getLogger(__name__)

# Called with each study as soon as it is read, in reading order: (its source, its result, whether
# it was decoded now rather than taken from the preprocess cache). The first encode uses it to run
# the backbone on decoded studies while the next ones are decoded (common/site_encoding.py).
StudyReadHook = Callable[[StudySource, StudyResult, bool], None]


@dataclass
class SiteProfile:
    """What check-data reports about a site beyond the arrays (stays at the site)."""

    layout: str
    series: int = 0
    files: int = 0
    modalities: Counter = field(default_factory=Counter)  # studies per modality
    image_sizes: Counter = field(default_factory=Counter)  # source images per "HxW"
    info: dict[str, Counter] = field(default_factory=dict)  # e.g. {"body-part": Counter(elbow=3)}
    cache_hits: int = 0
    cache_misses: int = 0


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
    quarantine: Quarantine = field(default_factory=list)  # (path relative to the site, reason code)
    biomech: np.ndarray | None = None  # (N, T, F) site-standardised, zero on padding
    profile: SiteProfile | None = None
    source_files: list[Path | None] = field(default_factory=list)  # first input file of each study (DICOM reference)
    # (N,) bool: the validation split, which chooses the round and calibrates; never trained on.
    # None: no validation split (studies to score).
    is_val: np.ndarray | None = None
    # (kind -> category) per study: scanner maker, field strength, body part (common/data/subgroups.py)
    subgroups: list[dict[str, str]] = field(default_factory=list)

    @property
    def train_index(self) -> np.ndarray:
        held_out = self.is_test if self.is_val is None else self.is_test | self.is_val
        return np.flatnonzero(~held_out)

    @property
    def val_index(self) -> np.ndarray:
        return np.flatnonzero(self.is_val) if self.is_val is not None else np.zeros(0, dtype=np.int64)

    @property
    def test_index(self) -> np.ndarray:
        return np.flatnonzero(self.is_test)


def _group(record: StudyLabel) -> str:
    return record.patient or record.study


def assign_split(records: list[StudyLabel], test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """Each record's split, "train", "val" or "test", every study of a patient (or each study,
    without a patient key) on one side. labels.csv's split column decides where it names every
    study: as it is when it names val studies; when it names only train and test, val-fraction of
    the site's patients are drawn (seeded) from the patients it puts only in train. Without the
    column, a seeded draw of patients: test-fraction to test, then val-fraction to val (the test
    draw does not depend on val-fraction); at least one patient always trains."""
    groups = sorted({_group(r) for r in records})
    rng = np.random.default_rng(seed)
    if all(r.split is not None for r in records):
        split = np.array([r.split for r in records], dtype=str)
        if (split == "val").any():
            return split
        elsewhere = {_group(r) for r in records if r.split != "train"}
        candidates = [g for g in sorted({_group(r) for r in records if r.split == "train"}) if g not in elsewhere]
        drawn = rng.permutation(len(candidates))[:_validation_groups(val_fraction, len(groups), len(candidates))]
        val_groups = {candidates[i] for i in drawn}
        return np.array(["val" if _group(r) in val_groups else r.split for r in records], dtype=str)
    order = [groups[i] for i in rng.permutation(len(groups))]
    n_test = min(len(groups) - 1, max(1, round(test_fraction * len(groups)))) if len(groups) > 1 else 0
    n_val = _validation_groups(val_fraction, len(groups), len(groups) - n_test)
    test_groups, val_groups = set(order[:n_test]), set(order[n_test:n_test + n_val])
    return np.array(["test" if _group(r) in test_groups else "val" if _group(r) in val_groups else "train"
                     for r in records], dtype=str)


def _validation_groups(fraction: float, groups: int, available: int) -> int:
    """How many of the ``available`` patient groups become validation: ``fraction`` of all the
    site's ``groups``, rounded down but at least one, and never every available one (one stays for
    training). Rounded down because the validation comes out of training: a 16-study site keeps the
    10 training studies the site policy's default min-training-studies asks for."""
    return min(available - 1, max(1, math.floor(fraction * groups))) if available > 1 else 0


def load_site(site_dir: Path, config: DataConfig, num_labels: int | None, progress: bool = True, layout: str = "auto",
              cache_dir: Path | None = None, on_read: StudyReadHook | None = None) -> SiteData:
    """Read and preprocess every labelled study. A study or file that cannot be used is left out
    with its reason code (``quarantine``); a site with nothing usable is a DataError.
    ``num_labels`` None accepts the site's own label count (check-data without a run config)."""
    found = discover(site_dir, layout, config)
    if num_labels is not None and len(found.label_names) != num_labels:
        raise DataError("label-count", f"the site has {len(found.label_names)} label(s) ({', '.join(found.label_names)})"
                                       f" but the run config says num-labels = {num_labels}")
    return assemble(found, site_dir, config, progress, cache_dir, on_read=on_read)


def load_for_prediction(path: Path, config: DataConfig, label_names: list[str], layout: str = "auto",
                        progress: bool = True) -> SiteData:
    """Studies to score, read exactly as training reads them: a site folder in any layout (its
    labels, if any, are kept for reference), a ``studies/`` folder without labels.csv, or one
    study's folder of DICOM files. Every study is on the 'test' side; unknown labels are NaN."""
    found = discover_unlabelled(path, layout, config, label_names)
    return assemble(found, path, config, progress, cache_dir=None, split=False, require_usable=False)


def assemble(found: Discovery, site_dir: Path, config: DataConfig, progress: bool = True,
             cache_dir: Path | None = None, split: bool = True, require_usable: bool = True,
             on_read: StudyReadHook | None = None) -> SiteData:
    """Read the discovered studies (through the preprocess cache) into aligned arrays. With
    ``require_usable`` False a site with no usable study gives empty arrays and its quarantine."""
    cache = _preprocess_cache(found, site_dir, config, cache_dir)
    results = _read_studies(found.sources, site_dir, cache, progress, on_read)
    profile = SiteProfile(found.layout)
    kept, skipped, quarantine = _usable_studies(found, results, site_dir, config, profile)
    if cache is not None:
        profile.cache_hits, profile.cache_misses = cache.hits, cache.misses
    if not kept and require_usable:
        raise DataError("no-usable-studies", f"none of the {len(found.sources)} studies in {site_dir} could "
                                             f"be used ({len(quarantine)} quarantine entries; run clinicfl-client "
                                             f"check-data for the reasons)")
    return _site_data(kept, found.label_names, config, split, skipped, quarantine, profile)


@dataclass(frozen=True)
class _UsableStudy:
    source: StudySource
    images: np.ndarray  # (images, H, W) of the study, before padding to seq-len
    biomech: np.ndarray | None  # (images, F) resampled to the images, not yet standardised
    subgroups: dict[str, str]  # kind -> category, from the chosen series' header and the layout


def _preprocess_cache(found: Discovery, site_dir: Path, config: DataConfig,
                      cache_dir: Path | None) -> PreprocessCache | None:
    """The cache for this layout and preprocessing; None without a cache folder, where nothing is
    hashed: the key costs a full read of every file."""
    if cache_dir is None:
        return None
    return PreprocessCache(cache_dir, site_dir, f"{found.layout}|{config.image_size}|{config.seq_len}|"
                                                f"{config.series_description}|{config.mrnet_plane}")


def _read_studies(sources: list[StudySource], site_dir: Path, cache: PreprocessCache | None,
                  progress: bool, on_read: StudyReadHook | None = None) -> list[StudyResult]:
    results = []
    with cache.locked() if cache is not None else nullcontext():
        for source in progress_bar(sources, f"reading {site_dir.name}", "study", enabled=progress):
            result, decoded = _read_study(source, site_dir, cache)
            if on_read is not None:
                on_read(source, result, decoded)
            results.append(result)
    return results


def _usable_studies(found: Discovery, results: list[StudyResult], site_dir: Path, config: DataConfig,
                    profile: SiteProfile) -> tuple[list[_UsableStudy], list[tuple[str, str]], Quarantine]:
    """(the usable studies, with their biomechanical series when the run has them; the skipped
    ones with their reason codes; the quarantine, in reading order). Counts the usable studies'
    series, files, modalities, image sizes and info into ``profile``."""
    quarantine: Quarantine = list(found.quarantine)
    kept: list[_UsableStudy] = []
    skipped: list[tuple[str, str]] = []
    for source, result in zip(found.sources, results):
        quarantine += result.quarantine
        try:
            if result.error is not None:
                raise result.error
            series = None
            if config.biomech_features:
                raw = read_biomech(biomech_path(site_dir, source.label.study), config.biomech_features)
                series = resample(raw, len(result.images.images))
        except StudyError as exc:
            log.warning("skipping study %s: %s (%s)", source.label.study, exc.code, exc)
            skipped.append((source.label.study, exc.code))
            quarantine.append((source.where, exc.code))
            continue
        kept.append(_UsableStudy(source, result.images.images, series,
                                 study_subgroups(result.images.subgroups, source.info)))
        _count_in_profile(profile, source, result)
    return kept, skipped, quarantine


def _count_in_profile(profile: SiteProfile, source: StudySource, result: StudyResult) -> None:
    profile.series += result.images.series
    profile.files += result.images.files
    profile.modalities[result.images.modality] += 1
    profile.image_sizes.update(result.images.sizes)
    for name, value in source.info:
        profile.info.setdefault(name, Counter())[value] += 1


def _site_data(kept: list[_UsableStudy], label_names: list[str], config: DataConfig, split: bool,
               skipped: list[tuple[str, str]], quarantine: Quarantine, profile: SiteProfile) -> SiteData:
    """The usable studies as aligned arrays, split into train, validation and test (everything is
    test without ``split``); biomechanical series standardised with the training side's statistics."""
    records = [study.source.label for study in kept]
    n = len(kept)
    images, mask, biomech = _padded(kept, config)
    sides = (assign_split(records, config.test_fraction, config.val_fraction, config.seed) if split
             else np.full(n, "test"))
    if biomech is not None and split:
        biomech = standardise(biomech, mask, np.flatnonzero(sides == "train"))
    return SiteData(
        studies=[r.study for r in records],
        images=images,
        mask=mask,
        labels=np.array([r.labels for r in records], dtype=np.float32).reshape(n, len(label_names)),
        targets=np.array([math.nan if r.target is None else r.target for r in records], dtype=np.float32),
        is_test=sides == "test",
        is_val=sides == "val" if split else None,
        label_names=label_names,
        skipped=skipped,
        groups=[r.patient or r.study for r in records],
        quarantine=quarantine,
        biomech=biomech,
        profile=profile,
        source_files=[study.source.files[0] if study.source.files else None for study in kept],
        subgroups=[study.subgroups for study in kept],
    )


def _padded(kept: list[_UsableStudy], config: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images (N, T, H, W), mask (N, T), biomech (N, T, F) or None): each study's images and
    series first, zeros after its last image."""
    n, t, s = len(kept), config.seq_len, config.image_size
    images = np.zeros((n, t, s, s), dtype=np.float32)
    mask = np.zeros((n, t), dtype=bool)
    biomech = np.zeros((n, t, config.biomech_features), dtype=np.float32) if config.biomech_features else None
    for row, study in enumerate(kept):
        images[row, : len(study.images)] = study.images
        mask[row, : len(study.images)] = True
        if biomech is not None:
            biomech[row, : len(study.images)] = study.biomech
    return images, mask, biomech


def _read_study(source: StudySource, site_dir: Path, cache: PreprocessCache | None) -> tuple[StudyResult, bool]:
    """(a study from the cache, or read and then cached (failures too, with their reason); whether
    it was read now)."""
    key = cache.key(source) if cache is not None else None
    if key is not None and (cached := cache.get(key)) is not None:
        return cached, False
    files: list[tuple[Path, str]] = []
    try:
        result = StudyResult(source.read(files), None, [])
    except StudyError as exc:
        result = StudyResult(None, exc, [])
    result.quarantine = [(str(path.relative_to(site_dir)), code) for path, code in files]
    if key is not None:
        cache.put(key, result)
    return result, True
