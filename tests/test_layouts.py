"""Site layouts beyond labels.csv + DICOM (MURA, MRNet), label/study mismatches, the preprocess
cache, biomechanical series and `clinicfl-client check-data --json`. Trees are generated here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from common.config import DataConfig, ModelConfig, SharedConfig, TrainConfig
from common.data import dicom
from common.data.layouts import detect_layout
from common.data.site import load_site
from common.inference import predict, prepare_inputs
from common.model import build_model
from simulations.synthetic import SyntheticSpec, generate_clinics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = DataConfig(SharedConfig(image_size=32, seq_len=4))


def _png(path: Path, shape: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(np.clip(rng.normal(value, 20, shape), 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def mura(tmp_path: Path) -> Path:
    """MURA v1.1 tree: 2 train + 1 valid study, labels in the CSV for train and in folder names for valid."""
    root = tmp_path / "MURA-v1.1"
    _png(root / "train/XR_ELBOW/patient00001/study1_positive/image1.png", (60, 40), 150)
    _png(root / "train/XR_ELBOW/patient00001/study1_positive/image2.png", (50, 50), 140)
    _png(root / "train/XR_ELBOW/patient00001/study1_positive/image3.png", (40, 70), 130)
    for k in range(1, 6):  # five views: longer than seq-len 4, so evenly sampled down
        _png(root / f"train/XR_WRIST/patient00002/study1_negative/image{k}.png", (64, 48), 60 + k)
    _png(root / "valid/XR_WRIST/patient00003/study1_positive/image1.png", (30, 30), 200)
    (root / "valid/XR_WRIST/patient00003/study1_positive/image2.png").write_bytes(b"not a png")
    (root / "valid/XR_HAND/patient00004/study1").mkdir(parents=True)  # no label anywhere
    _png(root / "valid/XR_HAND/patient00004/study1/image1.png", (30, 30), 10)
    (root / "train_labeled_studies.csv").write_text(
        "MURA-v1.1/train/XR_ELBOW/patient00001/study1_positive/,1\n"
        "MURA-v1.1/train/XR_WRIST/patient00002/study1_negative/,0\n"
        "MURA-v1.1/train/XR_WRIST/patient09999/study1_positive/,1\n")  # not on disk
    return root


def test_mura_layout_loads_views_as_a_sequence_with_study_labels(mura):
    assert detect_layout(mura) == "mura"
    site = load_site(mura, CONFIG, num_labels=1, progress=False)
    assert site.studies == ["train/XR_ELBOW/patient00001/study1_positive", "train/XR_WRIST/patient00002/study1_negative",
                            "valid/XR_WRIST/patient00003/study1_positive"]
    assert site.labels[:, 0].tolist() == [1.0, 0.0, 1.0] and site.label_names == ["abnormal"]
    assert site.mask.sum(1).tolist() == [3, 4, 1], "views per study, capped at seq-len"
    assert site.is_test.tolist() == [False, False, True], "MURA's valid split is the test split"
    assert site.profile.info["body-part"] == {"elbow": 1, "wrist": 2}
    assert site.profile.modalities == {"XR": 3}
    assert site.images.shape == (3, 4, 32, 32) and 0.0 <= site.images.min() and site.images.max() <= 1.0
    assert set(site.quarantine) == {
        ("train/XR_WRIST/patient09999/study1_positive", "label-without-study"),
        ("valid/XR_HAND/patient00004/study1", "study-without-label"),
        ("valid/XR_WRIST/patient00003/study1_positive/image2.png", "undecodable-image"),
    }


@pytest.fixture
def mrnet(tmp_path: Path) -> Path:
    root = tmp_path / "MRNet-v1.0"
    root.mkdir()
    rng = np.random.default_rng(0)
    exams = {"train": ["0000", "0001", "0002"], "valid": ["1130"]}
    labels = {"0000": (1, 1, 0), "0001": (0, 0, 0), "0002": (1, 0, 1), "1130": (1, 1, 1)}
    slices = {"0000": 3, "0001": 20, "0002": 6, "1130": 2}
    for split, ids in exams.items():
        for task_i, task in enumerate(("abnormal", "acl", "meniscus")):
            (root / f"{split}-{task}.csv").write_text("".join(f"{e},{labels[e][task_i]}\n" for e in ids))
        for plane in ("axial", "coronal", "sagittal"):
            (root / split / plane).mkdir(parents=True)
            for e in ids:
                if e == "0002" and plane == "sagittal":
                    continue  # a missing volume
                np.save(root / split / plane / f"{e}.npy",
                        rng.integers(0, 256, (slices[e] + (plane == "axial"), 40, 40), dtype=np.uint8))
    (root / "train/sagittal/0003.npy").write_bytes(b"garbage")  # a volume with no label
    return root


def test_mrnet_layout_is_multi_label_with_a_chosen_plane(mrnet):
    assert detect_layout(mrnet) == "mrnet"
    site = load_site(mrnet, CONFIG, num_labels=3, progress=False)
    assert site.label_names == ["abnormal", "acl", "meniscus"]
    assert site.studies == ["train/0000", "train/0001", "valid/1130"]
    assert site.labels.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert site.mask.sum(1).tolist() == [3, 4, 2] and site.is_test.tolist() == [False, False, True]
    assert ("train/sagittal/0002.npy", "label-without-study") in site.quarantine
    assert ("train/sagittal/0003.npy", "study-without-label") in site.quarantine
    axial = load_site(mrnet, DataConfig(SharedConfig(image_size=32, seq_len=8), mrnet_plane="axial", mrnet_labels="acl"),
                      num_labels=1, progress=False)
    assert axial.mask.sum(1).tolist() == [4, 8, 7, 3], "axial volumes have one more slice here"
    assert axial.labels[:, 0].tolist() == [1, 0, 0, 1]


def test_mrnet_bad_volume_is_quarantined(mrnet):
    np.save(mrnet / "train/sagittal/0001.npy", np.zeros((4, 40), dtype=np.uint8))
    site = load_site(mrnet, CONFIG, num_labels=3, progress=False)
    assert "train/0001" not in site.studies
    assert ("train/sagittal/0001.npy", "bad-volume-shape") in site.quarantine


def test_label_rows_without_study_and_studies_without_label_are_quarantined(site):
    labels = site / "labels.csv"
    lines = labels.read_text().splitlines()
    orphan = lines.pop(3).split(",")[0]  # this study folder loses its label row
    labels.write_text("\n".join(lines + ["study-ghost,1,P,0"]) + "\n")
    data = load_site(site, CONFIG, num_labels=1, progress=False)
    assert len(data.studies) == 15 and orphan not in data.studies
    assert ("studies/study-ghost", "label-without-study") in data.quarantine
    assert (f"studies/{orphan}", "study-without-label") in data.quarantine


def test_second_load_reads_no_dicom_and_gives_the_same_arrays(site, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    extra = next((site / "studies/study-0002").iterdir()) / "extra.dcm"
    extra.write_bytes(b"")  # a quarantined file: cached with its reason too
    first = load_site(site, CONFIG, num_labels=1, progress=False, cache_dir=cache)
    assert first.profile.cache_misses == 16 and first.profile.cache_hits == 0

    def no_dicom(*args, **kwargs):
        raise AssertionError("DICOM was decoded on a cached run")

    monkeypatch.setattr(dicom.pydicom, "dcmread", no_dicom)
    second = load_site(site, CONFIG, num_labels=1, progress=False, cache_dir=cache)
    assert second.profile.cache_hits == 16 and second.profile.cache_misses == 0
    assert np.array_equal(first.images, second.images) and np.array_equal(first.mask, second.mask)
    assert sorted(first.quarantine) == sorted(second.quarantine)
    assert (str(extra.relative_to(site)), "empty-file") in second.quarantine
    assert second.profile.modalities == first.profile.modalities == {"MR": 16}

    monkeypatch.undo()
    victim = sorted((site / "studies/study-0005").rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")  # changed content: a miss
    third = load_site(site, CONFIG, num_labels=1, progress=False, cache_dir=cache)
    assert third.profile.cache_misses == 1 and third.profile.cache_hits == 15
    other = load_site(site, DataConfig(SharedConfig(image_size=48, seq_len=4)), num_labels=1, progress=False, cache_dir=cache)
    assert other.profile.cache_misses == 16, "another image size is another key"


@pytest.fixture(scope="module")
def biomech_site(tmp_path_factory) -> Path:
    spec = SyntheticSpec(sites=1, studies_per_site=80, image_size=32, slices_per_study=4, seed=11,
                         biomech_features=3, biomech_effect=3.0, lesion_contrast=0.0)
    (site,) = generate_clinics(tmp_path_factory.mktemp("biomech"), spec, progress=False)
    return site


def test_biomech_series_are_resampled_and_site_standardised(biomech_site, tmp_path):
    site_dir = tmp_path / "site"
    shutil.copytree(biomech_site, site_dir)
    config = DataConfig(SharedConfig(image_size=32, seq_len=4, biomech_features=3))
    data = load_site(site_dir, config, num_labels=1, progress=False)
    assert data.biomech.shape == (80, 4, 3)
    train_steps = data.biomech[data.train_index][data.mask[data.train_index]]
    assert np.allclose(train_steps.mean(0), 0.0, atol=1e-5) and np.allclose(train_steps.std(0), 1.0, atol=1e-4)
    assert np.all(data.biomech[~data.mask] == 0.0), "padding stays zero"
    (site_dir / "biomech/study-0003.csv").unlink()
    (site_dir / "biomech/study-0004.csv").write_text("a,b\n1,2\n3,4\n")
    data = load_site(site_dir, config, num_labels=1, progress=False)
    assert len(data.studies) == 78
    assert ("studies/study-0003", "missing-biomech") in data.quarantine
    assert ("studies/study-0004", "biomech-feature-count") in data.quarantine


def test_biomech_features_reach_the_model_and_carry_signal(biomech_site):
    """The injury is only in biomech feature 0. With the image features blanked (so the head
    cannot memorise 60 studies by their images) the full train/predict path learns it on
    held-out studies, and predictions change when the series change."""
    from common.training import train_local

    config = DataConfig(SharedConfig(image_size=32, seq_len=4, biomech_features=3))
    data = load_site(biomech_site, config, num_labels=1, progress=False)
    model_config = ModelConfig(config.shared, proj_dim=16, gru_hidden=8, attn_dim=8, dropout=0.0,
                               recon_head=False, severity_head=False, feature_norm="none")
    torch.manual_seed(0)
    model = build_model(model_config)
    inputs = prepare_inputs(model, data, None, torch.device("cpu"))
    assert inputs.biomech is not None and inputs.biomech.shape == (80, 4, 3)
    inputs.inputs = torch.zeros_like(inputs.inputs)
    train_local(model, inputs, data.train_index, TrainConfig(local_epochs=15, lr=3e-3, batch_size=8),
                torch.device("cpu"))
    test = data.test_index
    probs = predict(model, inputs, test, torch.device("cpu")).probs.numpy()
    assert len(set(data.labels[test, 0])) == 2 and roc_auc_score(data.labels[test, 0], probs[:, 0]) > 0.9
    inputs.biomech = torch.zeros_like(inputs.biomech)
    flat = predict(model, inputs, test, torch.device("cpu")).probs.numpy()
    assert np.abs(flat - probs).max() > 0.1


def test_check_data_json_summarises_counts_and_distributions(mura, tmp_path):
    result = subprocess.run([sys.executable, "-m", "client.cli", "check-data", str(mura), "--image-size", "32",
                             "--seq-len", "4", "--json", "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["usable"] and summary["layout"] == "mura"
    # MURA's valid split is the test split; one of its two training patients becomes validation.
    assert summary["studies"] == 3 and (summary["train_studies"], summary["val_studies"], summary["test_studies"]) \
        == (1, 1, 1)
    assert summary["image_files"] == 9 and summary["images_used"] == 8
    labels = summary["labels"]["abnormal"]
    assert labels["test"] == {"positive": 1, "negative": 0}
    assert {k: labels["train"][k] + labels["val"][k] for k in ("positive", "negative")} == {"positive": 1, "negative": 1}
    assert summary["modalities"] == {"XR": 3} and summary["image_sizes"]["64x48"] == 5
    assert summary["metadata"]["body-part"] == {"wrist": 2, "elbow": 1}
    assert {q["reason"]: q["count"] for q in summary["quarantine"]} == {
        "label-without-study": 1, "study-without-label": 1, "undecodable-image": 1}
    assert any((tmp_path / "state/cache/preprocessed").glob("*.npz")), "check-data fills the site's cache"


def test_check_data_json_reports_an_unusable_site_and_exits_non_zero(site):
    for path in site.rglob("*.dcm"):
        path.write_bytes(b"garbage")
    result = subprocess.run([sys.executable, "-m", "client.cli", "check-data", str(site), "--json"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    summary = json.loads(result.stdout)
    assert summary["usable"] is False and summary["error"]["code"] == "no-usable-studies"


def test_check_data_table_shows_sizes_and_modalities(tiny_clinics):
    result = subprocess.run([sys.executable, "-m", "client.cli", "check-data", str(tiny_clinics[0])],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "MR: 16" in result.stdout and "32x32" in result.stdout and "series found" in result.stdout
    assert "ZZFAKE" not in result.stdout + result.stderr
