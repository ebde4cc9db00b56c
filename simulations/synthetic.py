"""Synthetic sports-medicine clinics written as real DICOM files (pydicom).

Each study is a short MR slice series of a knee-like phantom: soft tissue, two bones, smooth
texture, bright round "vessel" distractors in every class, and noise. An injured study carries
an elongated, oriented bright lesion (a tear) in a contiguous block of slices. Sites differ in
label prevalence (a Dirichlet label partition of one pool for non-IID), scanner gain/offset, noise and rescale tags.
Patient names, IDs, birth dates and the institution are fake but recognisable (``ZZFAKE``...),
so tests can prove they never leave a site. Generation is deterministic for a seed.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from tqdm import tqdm

FAKE_PHI_MARKER = "ZZFAKE"  # in every planted identifier, so a test can grep for it


@dataclass(frozen=True)
class SyntheticSpec:
    sites: int = 3
    studies_per_site: int = 48
    image_size: int = 64
    slices_per_study: int = 8
    prevalence: float = 0.4  # mean fraction of injured studies
    dirichlet_alpha: float = 0.0  # 0 = IID prevalence; small alpha = very different sites
    scanner_shift: float = 0.3  # spread of per-site gain/offset (0 = identical scanners)
    size_spread: float = 0.0  # 0 = equal sites; > 0: lognormal site sizes (sigma), mean near studies-per-site
    lesion_contrast: float = 4.5  # lesion brightness (phantom units; tissue is 3, noise sigma 0.35)
    lesion_size: float = 0.35  # lesion length as a fraction of the image half-width
    lesion_fraction: float = 0.4  # fraction of a study's slices that show the lesion
    noise: float = 0.35  # Gaussian noise sigma relative to the lesion unit
    biomech_features: int = 0  # > 0: also write biomech/<study>.csv (gait series; injury shifts feature 0)
    biomech_effect: float = 1.5  # shift of feature 0 in injured studies, in units of its noise sigma
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sites < 1 or self.studies_per_site < 4:
            raise ValueError("need >= 1 site and >= 4 studies per site")
        if self.slices_per_study < 2 or self.image_size < 32:
            raise ValueError("need >= 2 slices per study and image size >= 32")
        if not 0.0 < self.prevalence < 1.0 or not 0.0 < self.lesion_fraction <= 1.0:
            raise ValueError("prevalence must be in (0, 1) and lesion-fraction in (0, 1]")


UNIT = 100.0  # intensity unit of the phantom, in rescaled (modality) values
# Each site's scanner maker and model; a site runs a main magnet and an older one at 1.5 T, which
# every third study uses. They name subgroups (common/data/subgroups.py), nothing in the pixels.
VENDORS = (("SIEMENS", "MAGNETOM Vida", 3.0), ("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5),
           ("Philips Medical Systems", "Ingenia", 3.0), ("Canon Medical Systems", "Vantage Orian", 1.5))
SECOND_MAGNET_TESLA = 1.5
DATASET_FILE = "dataset.json"  # written beside the site folders: what generated them


MIN_SITE_STUDIES = 12  # every site keeps a train, a validation and a test split


def site_label_counts(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """(studies, injured studies) per site.

    The sites' sizes come from ``site_sizes`` (equal, or spread by ``size-spread``) whatever the
    label skew, so size and skew are separate axes. IID (``dirichlet-alpha`` 0): each site has
    ``prevalence`` of its studies injured (rounded). Non-IID: the same total of injured
    studies are partitioned among the sites in proportions drawn from Dir(alpha, ..., alpha), a
    site taking no more than its size (what it cannot take goes to the others in the same
    proportions); the rest of each site is healthy. Small alpha gives sites that see one class."""
    sizes = site_sizes(spec)
    iid = np.round(spec.prevalence * sizes).astype(int)
    if spec.dirichlet_alpha <= 0:
        return sizes, iid
    total_injured = int(iid.sum())
    # A stream of its own per alpha: the same seed at another alpha is another partition.
    stream = int(round(spec.dirichlet_alpha * 1000))
    shares = np.random.default_rng([spec.seed, 1, stream]).dirichlet(np.full(spec.sites, spec.dirichlet_alpha))
    injured = np.zeros(spec.sites, dtype=int)
    remaining = total_injured
    while remaining > 0:  # largest remainders: the counts sum exactly, and no site exceeds its size
        room = sizes - injured
        weights = np.where(room > 0, shares, 0.0)
        if weights.sum() <= 0:
            weights = (room > 0).astype(float)
        target = remaining * weights / weights.sum()
        step = np.minimum(np.floor(target).astype(int), room)
        if step.sum() == 0:  # the last few: one each to the sites with the largest remainders
            order = np.argsort(-np.where(room > 0, target, -1.0), kind="stable")[:remaining]
            step[order] = 1
        injured += step
        remaining -= int(step.sum())
    return sizes, injured


def site_prevalences(spec: SyntheticSpec) -> np.ndarray:
    """Per-site injured fraction (``site_label_counts``)."""
    sizes, injured = site_label_counts(spec)
    return injured / sizes


def site_sizes(spec: SyntheticSpec) -> np.ndarray:
    """Studies per site: equal, or lognormal with sigma ``size-spread`` around studies-per-site
    (at least 12, so every site keeps a train and a test split)."""
    if spec.size_spread <= 0:
        return np.full(spec.sites, spec.studies_per_site)
    rng = np.random.default_rng([spec.seed, 3])
    factors = np.exp(spec.size_spread * rng.standard_normal(spec.sites))
    return np.maximum(MIN_SITE_STUDIES, np.round(spec.studies_per_site * factors / factors.mean())).astype(int)


def generate_clinics(out_dir: Path, spec: SyntheticSpec, progress: bool = True) -> list[Path]:
    """Write ``out_dir/site-XX`` for every site; returns the site folders. Existing sites are replaced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # What made these folders, for the model card's "synthetic data" caveat and for reproducing them.
    (out_dir / DATASET_FILE).write_text(json.dumps({"generator": "clinicfl-sim generate", "synthetic": True,
                                                    "spec": asdict(spec)}, indent=2))
    sizes, injured = site_label_counts(spec)
    sites = []
    for k in range(spec.sites):
        site_dir = out_dir / f"site-{k + 1:02d}"
        if site_dir.exists():
            shutil.rmtree(site_dir)
        _write_site(site_dir, k, int(injured[k]), int(sizes[k]), spec, progress)
        sites.append(site_dir)
    return sites


def _write_site(site_dir: Path, k: int, n_injured: int, n: int, spec: SyntheticSpec, progress: bool) -> None:
    rng = np.random.default_rng([spec.seed, 2, k])
    scanner = {
        "gain": 1.0 + spec.scanner_shift * (rng.random() - 0.5),
        "offset": spec.scanner_shift * UNIT * (rng.random() - 0.5),
        "noise": spec.noise * (1.0 + 0.5 * spec.scanner_shift * (rng.random() - 0.5)),
        "slope": [1.0, 0.5, 2.0][k % 3],
        "intercept": [0.0, -100.0, 50.0][k % 3],
        "vendor": VENDORS[k % len(VENDORS)],
    }
    injured = np.zeros(n, dtype=bool)
    injured[rng.choice(n, size=n_injured, replace=False)] = True
    # About one patient in five has two studies (a follow-up), so splits must group by patient.
    patients, p = [], 0
    while len(patients) < n:
        repeat = 2 if rng.random() < 0.2 else 1
        patients.extend([p] * repeat)
        p += 1
    patients = patients[:n]

    rows = []
    for i in tqdm(range(n), desc=f"writing {site_dir.name}", unit="study", disable=None if progress else True, leave=False):
        study = f"study-{i + 1:04d}"
        patient_id = f"{FAKE_PHI_MARKER}-PID-S{k + 1:02d}-P{patients[i]:04d}"
        severity = float(rng.uniform(2.0, 10.0)) if injured[i] else 0.0
        lesion = _write_study(site_dir / "studies" / study, rng, spec, scanner, k, i, patient_id, severity)
        # lesion_slices is the ground truth for attention tests; training reads only the label columns.
        # Space-separated: a comma, semicolon or tab would clash with a spreadsheet's column separator.
        rows.append({"study": study, "label": int(injured[i]), "patient": patient_id,
                     "target": f"{severity:.3f}", "lesion_slices": " ".join(map(str, sorted(lesion)))})
    if spec.biomech_features:
        _write_biomech(site_dir, k, injured, spec)
    with (site_dir / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study", "label", "patient", "target", "lesion_slices"])
        writer.writeheader()
        writer.writerows(rows)


def _write_biomech(site_dir: Path, k: int, injured: np.ndarray, spec: SyntheticSpec) -> None:
    """One CSV per study: a gait cycle (sinusoids at per-study cadence) plus noise; injured
    studies carry a shift of feature 0 (e.g. knee valgus). Rows differ in number between studies,
    as real recordings do. A separate random stream keeps the images unchanged."""
    rng = np.random.default_rng([spec.seed, 3, k])
    folder = site_dir / "biomech"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"feature_{j + 1}" for j in range(spec.biomech_features)]
    for i, hurt in enumerate(injured):
        rows = int(rng.integers(24, 64))
        t = np.linspace(0.0, 2 * math.pi * rng.uniform(1.5, 3.0), rows)[:, None]
        phase = rng.uniform(0, 2 * math.pi, spec.biomech_features)
        values = np.sin(t + phase) + rng.normal(0.0, 1.0, (rows, spec.biomech_features))
        values[:, 0] += spec.biomech_effect * float(hurt)
        with (folder / f"study-{i + 1:04d}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names)
            writer.writerows(np.round(values, 4).tolist())


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float = 0.0) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return ((u / a) ** 2 + (v / b) ** 2) <= 1.0


def _smooth_noise(rng: np.random.Generator, size: int, grid: int = 8) -> np.ndarray:
    coarse = rng.normal(size=(grid, grid))
    idx = np.linspace(0, grid - 1, size)
    i0 = np.floor(idx).astype(int)
    i1 = np.minimum(i0 + 1, grid - 1)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


def phantom_series(rng: np.random.Generator, spec: SyntheticSpec, scanner: dict, n_slices: int,
                   severity: float) -> tuple[np.ndarray, set[int]]:
    """(n_slices, S, S) modality values of one study, and the slices (in anatomical order) that show
    the lesion; severity > 0 adds the lesion."""
    size = spec.image_size
    ax = np.linspace(-1.0, 1.0, size)
    xx, yy = np.meshgrid(ax, ax)
    cx, cy = rng.normal(0, 0.05, 2)
    tissue_r = (0.8 + rng.normal(0, 0.04), 0.65 + rng.normal(0, 0.04))
    texture = _smooth_noise(rng, size) * 0.4 * UNIT
    lesion_slices: set[int] = set()
    if severity > 0:
        block = max(1, math.ceil(spec.lesion_fraction * n_slices))
        start = int(rng.integers(0, n_slices - block + 1))
        lesion_slices = set(range(start, start + block))
        length = spec.lesion_size * (0.6 + 0.08 * severity)
        theta = rng.uniform(math.radians(20), math.radians(70)) * rng.choice([-1, 1])
        lx, ly = cx + rng.uniform(-0.3, 0.3), cy + rng.uniform(-0.05, 0.05)
    n_distractors = int(rng.integers(0, 3))
    distractors = [(rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4), int(rng.integers(0, n_slices)))
                   for _ in range(n_distractors)]

    series = np.empty((n_slices, size, size))
    for z in range(n_slices):
        depth = (z + 0.5) / n_slices - 0.5
        img = np.zeros((size, size))
        img[_ellipse(xx, yy, cx, cy, *tissue_r)] = 3.0 * UNIT
        bone_scale = 1.0 - 0.6 * depth ** 2
        for sign in (-1, 1):
            img[_ellipse(xx, yy, cx, cy + sign * 0.33, 0.5 * bone_scale, 0.2 * bone_scale)] = 6.0 * UNIT
        img += texture
        for dx, dy, dz in distractors:
            if abs(z - dz) <= 1:
                img[_ellipse(xx, yy, dx, dy, 0.07, 0.07)] += spec.lesion_contrast * UNIT
        if z in lesion_slices:
            img[_ellipse(xx, yy, lx, ly, length / 2, 0.045, theta)] += spec.lesion_contrast * UNIT
        img += rng.normal(0.0, scanner["noise"] * UNIT, img.shape)
        series[z] = img * scanner["gain"] + scanner["offset"]
    return series, lesion_slices


def _write_study(study_dir: Path, rng: np.random.Generator, spec: SyntheticSpec, scanner: dict, k: int, i: int,
                 patient_id: str, severity: float) -> set[int]:
    """Write one study; returns the slices (anatomical order, 0-based) that show the lesion."""
    lo = max(2, spec.slices_per_study - 2)
    n_slices = int(rng.integers(lo, spec.slices_per_study + 3))
    values, lesion_slices = phantom_series(rng, spec, scanner, n_slices, severity)
    study_uid = generate_uid(entropy_srcs=[str(spec.seed), str(k), str(i), "study"])
    common = {
        "PatientName": f"{FAKE_PHI_MARKER}^Patient^S{k + 1:02d}",
        "PatientID": patient_id,
        "PatientBirthDate": f"19{70 + int(rng.integers(0, 30))}0{1 + int(rng.integers(0, 9))}15",
        "InstitutionName": f"{FAKE_PHI_MARKER} Sports Clinic {k + 1:02d}",
        "StudyDate": f"2025{1 + int(rng.integers(0, 12)):02d}{1 + int(rng.integers(0, 28)):02d}",
        "StudyInstanceUID": study_uid,
        "FrameOfReferenceUID": generate_uid(entropy_srcs=[study_uid, "for"]),
        "AccessionNumber": f"{FAKE_PHI_MARKER}ACC{k + 1:02d}{i:05d}",
        "Manufacturer": scanner["vendor"][0],
        "ManufacturerModelName": scanner["vendor"][1],
        "MagneticFieldStrength": scanner["vendor"][2] if i % 3 != 2 else SECOND_MAGNET_TESLA,
        "BodyPartExamined": "KNEE",
    }
    # Scanners store slices in either direction; file names never follow anatomy.
    descending = bool(rng.random() < 0.5)
    main_dir = study_dir / f"series-{int(rng.integers(100, 999))}"
    order = rng.permutation(n_slices)
    for z in range(n_slices):
        instance = n_slices - z if descending else z + 1
        _write_slice(main_dir / f"IM{order[z]:04d}.dcm", values[z], scanner, common, series_tag="main",
                     description="T2 FS COR", series_number=3, instance=instance,
                     position=(-100.0, -100.0, -20.0 + 3.0 * z), orientation=(1, 0, 0, 0, 1, 0),
                     entropy=[study_uid, "main", str(z)])
    n_loc = min(3, n_slices - 1)  # a localiser in another plane, always smaller: must never be picked
    if rng.random() < 0.3 and n_loc >= 1:
        loc, _ = phantom_series(rng, spec, scanner, n_loc, 0.0)
        for z in range(n_loc):
            _write_slice(study_dir / "localizer" / f"LOC{z}.dcm", loc[z], scanner, common, series_tag="loc",
                         description="LOCALIZER", series_number=1, instance=z + 1,
                         position=(-20.0 + 20.0 * z, -100.0, 100.0), orientation=(0, 1, 0, 0, 0, -1),
                         entropy=[study_uid, "loc", str(z)])
    return lesion_slices


def _write_slice(path: Path, values: np.ndarray, scanner: dict, common: dict, *, series_tag: str,
                 description: str, series_number: int, instance: int, position: tuple, orientation: tuple,
                 entropy: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid(entropy_srcs=entropy)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in common.items():
        setattr(ds, key, value)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[common["StudyInstanceUID"], series_tag])
    ds.Modality = "MR"
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 3.0
    ds.RescaleSlope = scanner["slope"]
    ds.RescaleIntercept = scanner["intercept"]
    ds.RescaleType = "US"
    center = 4.0 * UNIT * scanner["gain"] + scanner["offset"]
    ds.WindowCenter = round(center, 1)
    ds.WindowWidth = round(11.0 * UNIT * scanner["gain"], 1)
    stored = np.clip(np.round((values - scanner["intercept"]) / scanner["slope"]), 0, 4095).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
