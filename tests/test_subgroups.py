"""Subgroups (scanner maker, field strength, body part): read from real DICOM headers, mapped onto
fixed vocabularies at the site, kept by the preprocessing cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from common.data.dicom import load_dicom_study, read_header
from common.data.site import load_site
from common.metrics import subgroup_stats as subgroup_record
from common.metrics.classification import ClassificationStats, pooled_auc
from common.metrics.intervals import auc_interval
from common.metrics.subgroup_stats import pooled_summaries, site_subgroup_stats
from common.data.subgroups import (UNKNOWN, body_part_group, field_strength_group, header_subgroups,
                                   manufacturer_group, study_subgroups)


@pytest.mark.parametrize("text, expected", [("SIEMENS", "Siemens"), ("Siemens Healthineers", "Siemens"),
                                            ("GE MEDICAL SYSTEMS", "GE"), ("GE Healthcare", "GE"),
                                            ("Philips Medical Systems", "Philips"), ("TOSHIBA_MEC", "Canon"),
                                            ("Toshiba", "Canon"), ("Acme Magnets Ltd", "other"), ("", UNKNOWN),
                                            (None, UNKNOWN)])
def test_manufacturer_names_map_onto_the_vocabulary(text, expected):
    assert manufacturer_group(text) == expected


@pytest.mark.parametrize("tesla, expected", [(0.3, "below 1.5 T"), ("1.5", "1.5 T"), (1.494, "1.5 T"), (3, "3 T"),
                                             (2.89362, "3 T"), (7.0, "above 3 T"), ("", UNKNOWN), (None, UNKNOWN),
                                             (0, UNKNOWN), ("15000", "above 3 T")])
def test_field_strength_bands(tesla, expected):
    assert field_strength_group(tesla) == expected


def test_body_parts_follow_the_dicom_defined_terms():
    assert [body_part_group(t) for t in ("KNEE", "knee", "LSPINE", "XR_ELBOW", "ELBOW", "", "BRAIN")] == \
        ["knee", "knee", "spine", "other", "elbow", UNKNOWN, "other"]
    # A layout's own body part (MURA's study type) fills in where the header says nothing.
    assert study_subgroups((("body-part", UNKNOWN), ("manufacturer", "GE")), [("body-part", "elbow")]) == \
        {"body-part": "elbow", "manufacturer": "GE"}
    assert study_subgroups((("body-part", "knee"),), [("body-part", "elbow")]) == {"body-part": "knee"}


def test_a_real_mr_file_gives_categories_never_header_text(tmp_path):
    path = tmp_path / "MR_small.dcm"
    shutil.copy(get_testdata_file("MR_small.dcm"), path)
    ds = pydicom.dcmread(path)
    ds.Manufacturer, ds.MagneticFieldStrength, ds.BodyPartExamined = "GE MEDICAL SYSTEMS", 1.5, "KNEE"
    ds.save_as(path)
    assert read_header(path).subgroups == (("body-part", "knee"), ("field-strength", "1.5 T"),
                                           ("manufacturer", "GE"))
    ds.Modality = "CT"  # no magnet: no field-strength subgroup
    assert dict(header_subgroups(ds)).keys() == {"body-part", "manufacturer"}


def test_synthetic_studies_carry_their_sites_scanner(tiny_clinics: list[Path]):
    studies = sorted((tiny_clinics[0] / "studies").iterdir())
    seen = [dict(load_dicom_study(study, 32, 4).subgroups) for study in studies[:3]]
    assert {s["manufacturer"] for s in seen} == {"Siemens"}
    assert [s["field-strength"] for s in seen] == ["3 T", "3 T", "1.5 T"]  # every third study: the 1.5 T magnet
    assert {s["body-part"] for s in seen} == {"knee"}
    other_site = dict(load_dicom_study(sorted((tiny_clinics[1] / "studies").iterdir())[0], 32, 4).subgroups)
    assert other_site["manufacturer"] == "GE"


# ------------------------------------------------------------------ statistics by subgroup
def _scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 1)) < 0.4).astype(np.float64)
    return np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, (n, 1)), 0, 1), labels


def test_a_site_computes_only_the_subgroups_its_minimum_count_allows():
    probs, labels = _scores(30)
    groups = [{"manufacturer": "Siemens" if i < 20 else "GE", "field-strength": "3 T" if i < 24 else "1.5 T",
               "body-part": "knee"} for i in range(30)]
    stats = site_subgroup_stats(probs, labels, groups, 0.5, 0, 1, min_count=10)
    # 20/10 Siemens/GE: both; 24/6 field strengths: neither (the 6 would be the whole split minus the 24);
    # knee is the whole split.
    assert sorted(stats) == [("body-part", "knee"), ("manufacturer", "GE"), ("manufacturer", "Siemens")]
    siemens = stats[("manufacturer", "Siemens")]
    direct = ClassificationStats.from_predictions(probs[:20], labels[:20], siemens.loss_sum, 0.5, siemens.coarsest)
    assert siemens.n == 20 and np.array_equal(siemens.tp, direct.tp) and np.array_equal(siemens.fn, direct.fn)
    assert np.array_equal(siemens.histograms[siemens.coarsest][0], direct.histograms[direct.coarsest][0])
    clipped = np.clip(probs[:20], 1e-7, 1 - 1e-7)
    assert siemens.loss_sum == pytest.approx(-(labels[:20] * np.log(clipped) + (1 - labels[:20]) * np.log(1 - clipped)).sum())
    assert sorted(site_subgroup_stats(probs, labels, groups, 0.5, 0, 1, min_count=21)) == [("body-part", "knee")]


def test_the_centre_takes_only_vocabulary_categories_no_smaller_than_the_sites_minimum():
    probs, labels = _scores(30)
    groups = [{"manufacturer": "Siemens" if i < 20 else "GE"} for i in range(30)]
    sent = subgroup_record.to_record(site_subgroup_stats(probs, labels, groups, 0.5, 0, 1, 10), 10)
    min_count, parsed = subgroup_record.from_record(sent, 1)
    assert min_count == 10 and sorted(parsed) == [("manufacturer", "GE"), ("manufacturer", "Siemens")]
    assert parsed[("manufacturer", "GE")].n == 10
    forged = {key.replace("|GE|", "|Hospital St Mary|"): v for key, v in sent.items()}
    with pytest.raises(ValueError, match="unknown subgroup key"):
        subgroup_record.from_record(forged, 1)
    with pytest.raises(ValueError, match="fewer than the site's own"):
        subgroup_record.from_record({**sent, subgroup_record.MIN_COUNT_KEY: 11}, 1)
    with pytest.raises(ValueError, match="min-reported-count"):
        subgroup_record.from_record({k: v for k, v in sent.items() if k != subgroup_record.MIN_COUNT_KEY}, 1)


def test_pooled_subgroups_carry_the_auc_and_its_delong_interval():
    a, b = _scores(40, 1), _scores(30, 2)
    one = site_subgroup_stats(*a, [{"manufacturer": "GE"}] * 40, 0.5, 0, 1, 10)[("manufacturer", "GE")]
    two = site_subgroup_stats(*b, [{"manufacturer": "GE"}] * 30, 0.5, 0, 1, 10)[("manufacturer", "GE")]
    pooled = one + two
    summary = pooled_summaries({("manufacturer", "GE"): pooled}, {("manufacturer", "GE"): {"s1", "s2"}}, ["injury"])
    entry = summary["manufacturer: GE"]
    assert entry["n"] == 70 and entry["sites"] == 2 and entry["positives"] == [int(a[1].sum() + b[1].sum())]
    assert entry["auc"]["value"] == pooled_auc(pooled.histograms, 0).value
    assert entry["auc"]["ci95"] == list(auc_interval(pooled.histograms, 0).bounds)


def test_a_site_keeps_each_studys_subgroups(site, tiny_data_config):
    data = load_site(site, tiny_data_config, num_labels=1, progress=False)
    assert len(data.subgroups) == len(data.studies)
    assert {g["manufacturer"] for g in data.subgroups} == {"Siemens"}
    assert {g["field-strength"] for g in data.subgroups} == {"3 T", "1.5 T"}


def test_the_record_fields_the_centre_accepts_are_exactly_what_a_site_writes():
    probs, labels = _scores(12)
    written = ClassificationStats.from_predictions(probs, labels, 1.0, 0.5, 8).to_record()
    assert set(written) == ClassificationStats.RECORD_FIELDS
