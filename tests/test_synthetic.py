"""The synthetic clinic generator writes real, deterministic DICOM that the reader gets right."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale
from pydicom.uid import UID

from common.data.dicom import load_dicom_study, read_header, select_series
from simulations.synthetic import FAKE_PHI_MARKER, SyntheticSpec, generate_clinics, site_label_counts, \
    site_prevalences
from tests.conftest import TINY_SPEC


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_files_are_valid_mr_dicom_with_planted_fake_phi(tiny_clinics):
    files = sorted(tiny_clinics[0].rglob("*.dcm"))
    assert len(files) > 16 * 2
    for path in files[:40]:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MR" and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert UID(uid).is_valid
        assert FAKE_PHI_MARKER in str(ds.PatientName) and FAKE_PHI_MARKER in ds.PatientID
        assert FAKE_PHI_MARKER in ds.InstitutionName and len(ds.PatientBirthDate) == 8
        assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
        assert ds.pixel_array.shape == (TINY_SPEC.image_size, TINY_SPEC.image_size)


def test_generation_is_deterministic_for_a_seed(tmp_path):
    spec = SyntheticSpec(sites=1, studies_per_site=4, image_size=32, slices_per_study=3, seed=11)
    generate_clinics(tmp_path / "a", spec, progress=False)
    generate_clinics(tmp_path / "b", spec, progress=False)
    generate_clinics(tmp_path / "c", SyntheticSpec(**{**spec.__dict__, "seed": 12}), progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_slices_are_read_in_spatial_order_whatever_the_file_names(tiny_clinics):
    shuffled_names = 0
    for study in sorted((tiny_clinics[0] / "studies").iterdir())[:6]:
        headers = [read_header(p) for p in study.rglob("*.dcm")]
        ordered = select_series(headers)
        positions = [h.position for h in ordered]
        assert positions == sorted(positions)
        assert all("localizer" not in str(h.path) for h in ordered), "the localiser must never be picked"
        by_name = [h.position for h in sorted(ordered, key=lambda h: h.path.name)]
        shuffled_names += by_name != positions
    assert shuffled_names > 0, "file names must not give the anatomical order"


def test_some_studies_have_a_localiser_and_reversed_instance_numbers(tiny_clinics):
    studies = sorted((tiny_clinics[0] / "studies").iterdir()) + sorted((tiny_clinics[1] / "studies").iterdir())
    assert any((s / "localizer").is_dir() for s in studies)
    reversed_numbers = 0
    for study in studies:
        ordered = select_series([read_header(p) for p in study.rglob("*.dcm")])
        reversed_numbers += ordered[0].instance_number > ordered[-1].instance_number
    assert 0 < reversed_numbers < len(studies)


def test_pixel_round_trip_through_rescale(tiny_clinics):
    path = next(iter(sorted((tiny_clinics[1] / "studies").rglob("IM*.dcm"))))
    ds = pydicom.dcmread(path)
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    assert np.array_equal(ds.pixel_array, stored)
    modality = apply_rescale(ds.pixel_array, ds)
    assert np.allclose(modality, stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    study = load_dicom_study(path.parents[1], image_size=32, seq_len=16).images
    assert study.dtype == np.float32 and study.min() >= 0 and study.max() <= 1 and study.std() > 0.05


def test_long_series_are_sampled_and_short_ones_kept(tiny_clinics):
    study = sorted((tiny_clinics[0] / "studies").iterdir())[0]
    n = len(select_series([read_header(p) for p in study.rglob("*.dcm")]))
    assert load_dicom_study(study, 32, seq_len=n + 5).images.shape == (n, 32, 32)
    assert load_dicom_study(study, 48, seq_len=2).images.shape == (2, 48, 48)


def test_non_iid_is_a_dirichlet_partition_of_one_pool_of_injured_studies():
    iid = site_prevalences(SyntheticSpec(sites=4, dirichlet_alpha=0.0))
    assert np.allclose(iid, 0.4, atol=0.02)
    _, iid_injured = site_label_counts(SyntheticSpec(sites=5, studies_per_site=32))

    def mean_spread(alpha: float) -> float:
        spreads = []
        for s in range(20):
            sizes, injured = site_label_counts(SyntheticSpec(sites=5, studies_per_site=32, dirichlet_alpha=alpha, seed=s))
            assert injured.sum() == iid_injured.sum(), "the pool's injured total is the same at every alpha"
            assert np.all(sizes == 32) and np.all((injured >= 0) & (injured <= sizes)), "size is its own axis"
            spreads.append(np.ptp(injured / sizes))
        return float(np.mean(spreads))

    assert mean_spread(0.1) > mean_spread(0.5) > 0.3 > 0.15 > mean_spread(200.0)
    same_seed = [site_label_counts(SyntheticSpec(sites=5, studies_per_site=32, dirichlet_alpha=a, seed=0))[1]
                 for a in (0.5, 0.1)]
    assert not np.array_equal(*same_seed), "another alpha is another partition, not the same one sharpened"


def test_injured_studies_are_labelled_with_severity(tiny_clinics):
    import csv
    rows = list(csv.DictReader((tiny_clinics[0] / "labels.csv").open()))
    assert {r["label"] for r in rows} == {"0", "1"}
    assert all((float(r["target"]) > 0) == (r["label"] == "1") for r in rows)
    assert len({r["patient"] for r in rows}) < len(rows), "some patients have follow-up studies"


def test_spec_rejects_nonsense():
    with pytest.raises(ValueError):
        SyntheticSpec(prevalence=1.5)
