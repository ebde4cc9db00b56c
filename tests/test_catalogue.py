"""The metric catalogue: every figure against a reference implementation, and federated
aggregation over 3 sites equal to the figure on the pooled predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn import metrics as skm

from common.exchange import ParamSpec
from common.metrics.catalogue import REGISTRY, EvaluationStats, compute_catalogue
from common.metrics.classification import ClassificationStats
from common.metrics.errors import ErrorStats
from common.metrics.images import GaussianMoments, ImageStats, InceptionStats, frechet_distance, psnr, ssim
from server.strategy import ClinicFedAvg
from server.strategy_config import StrategyConfig
from tests.conftest import reply

HASH = "frozen:abc"
LABELS = ["acl", "meniscus"]
FID_DIM = 6


def _site_stats(probs, labels, severity, targets, real, fake, real_f, fake_f) -> EvaluationStats:
    loss = float(-(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)).sum())
    images = None if real is None else ImageStats(
        len(real), float(psnr(torch.from_numpy(fake), torch.from_numpy(real)).sum()),
        float(ssim(torch.from_numpy(fake), torch.from_numpy(real)).sum()),
        GaussianMoments.of(real_f), GaussianMoments.of(fake_f))
    return EvaluationStats(ClassificationStats.from_predictions(probs, labels, loss),
                           ErrorStats.from_predictions(probs, labels, severity, targets), images,
                           InceptionStats.from_probabilities(probs))


@pytest.fixture(scope="module")
def pooled():
    rng = np.random.default_rng(42)
    n, m = 240, 60
    labels = (rng.random((n, 2)) < [0.35, 0.5]).astype(float)
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.01, 0.99)
    targets = np.where(labels[:, 0] == 1, rng.uniform(2, 10, n), 0.0)
    targets[rng.random(n) < 0.2] = np.nan  # some studies have no severity target
    severity = targets + rng.normal(0, 1.0, n)
    severity[np.isnan(severity)] = 3.0
    real = rng.random((m, 24, 24))
    fake = np.clip(real + rng.normal(0, 0.1, real.shape), 0, 1)
    real_f = rng.normal(0, 1, (m, FID_DIM))
    fake_f = rng.normal(0.3, 1.2, (m, FID_DIM))
    return dict(probs=probs, labels=labels, severity=severity, targets=targets, real=real, fake=fake,
                real_f=real_f, fake_f=fake_f)


class _ThreeNodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _federated(pooled, fid_dim=FID_DIM, small_site: bool = False, with_images: bool = True,
               asked_fid: bool | None = None, sent_fid: tuple[bool, ...] = (True, True, True)):
    """Split the pooled predictions over 3 sites and aggregate their records at the server.
    ``asked_fid``: what the round's evaluation message asked for (None: no message configured);
    ``sent_fid``: whether each site sends its FID moments."""
    strategy = ClinicFedAvg(StrategyConfig(spec={"w": ParamSpec((1,), np.dtype("float32"))}, backbone_hash=HASH,
                                           label_names=LABELS, min_sites=1, fid_dim=fid_dim if with_images else None,
                                           fid_extractor="test features", min_site_cases=10))
    if asked_fid is not None:
        strategy.configure_evaluate(1, ArrayRecord({"w": Array(np.zeros(1, np.float32))}),
                                    ConfigRecord({"fid": asked_fid}), _ThreeNodes())
    n, m = len(pooled["probs"]), len(pooled["real"])
    study_cuts = [0, 5, 120, n] if small_site else [0, 80, 170, n]
    image_cuts = [0, 10, 35, m]
    replies = []
    for i in range(3):
        s, t = slice(study_cuts[i], study_cuts[i + 1]), slice(image_cuts[i], image_cuts[i + 1])
        stats = _site_stats(pooled["probs"][s], pooled["labels"][s], pooled["severity"][s], pooled["targets"][s],
                            pooled["real"][t] if with_images else None, pooled["fake"][t], pooled["real_f"][t],
                            pooled["fake_f"][t])
        if stats.images is not None and not sent_fid[i]:
            stats.images.real = stats.images.fake = None
        content = RecordDict({"metrics": MetricRecord({"num-examples": stats.n, **stats.to_record()}),
                              "validation": MetricRecord(stats.classification.to_record()),
                              "site": ConfigRecord({"status": "ok", "site-name": f"site-{i}", "backbone-hash": HASH})})
        replies.append(reply(content, i + 1, "evaluate"))
    strategy.aggregate_evaluate(1, replies)
    return strategy.reports[1]


def _value(report, name):
    return report.catalogue[name]["value"]


def test_federated_classification_equals_sklearn_on_pooled_predictions(pooled):
    report = _federated(pooled)
    y, p = pooled["labels"].astype(int), pooled["probs"]
    hat = (p >= 0.5).astype(int)
    reference = {
        "accuracy": [skm.accuracy_score(y[:, j], hat[:, j]) for j in range(2)],
        "auc": [skm.roc_auc_score(y[:, j], p[:, j]) for j in range(2)],
        "sensitivity": [skm.recall_score(y[:, j], hat[:, j]) for j in range(2)],
        "specificity": [skm.recall_score(1 - y[:, j], 1 - hat[:, j]) for j in range(2)],
        "precision": [skm.precision_score(y[:, j], hat[:, j]) for j in range(2)],
        "f1": [skm.f1_score(y[:, j], hat[:, j]) for j in range(2)],
        "kappa": [skm.cohen_kappa_score(y[:, j], hat[:, j]) for j in range(2)],
    }
    for name, per_label in reference.items():
        tolerance = 1e-3 if name == "auc" else 1e-12
        entry = report.catalogue[name]
        assert entry["per_label"]["acl"] == pytest.approx(per_label[0], abs=tolerance), name
        assert entry["per_label"]["meniscus"] == pytest.approx(per_label[1], abs=tolerance), name
        assert entry["value"] == pytest.approx(np.mean(per_label), abs=tolerance), name
    assert _value(report, "loss") == pytest.approx(
        np.mean([skm.log_loss(y[:, j], p[:, j]) for j in range(2)]), rel=1e-9)


def test_federated_error_metrics_equal_sklearn_on_severity(pooled):
    report = _federated(pooled)
    known = np.isfinite(pooled["targets"])
    t, s = pooled["targets"][known], pooled["severity"][known]
    assert _value(report, "mae") == pytest.approx(skm.mean_absolute_error(t, s), rel=1e-12)
    assert _value(report, "mse") == pytest.approx(skm.mean_squared_error(t, s), rel=1e-12)
    assert _value(report, "rmse") == pytest.approx(np.sqrt(skm.mean_squared_error(t, s)), rel=1e-12)
    nonzero = t != 0
    assert _value(report, "mape") == pytest.approx(
        skm.mean_absolute_percentage_error(t[nonzero], s[nonzero]), rel=1e-12)
    assert "severity head" in report.catalogue["mae"]["note"]


def test_without_targets_errors_use_the_probability_and_mape_says_why():
    rng = np.random.default_rng(1)
    probs, labels = rng.random((50, 1)), (rng.random((50, 1)) < 0.5).astype(float)
    stats = ErrorStats.from_predictions(probs, labels, severity=None, targets=np.full(50, np.nan))
    catalogue = compute_catalogue(EvaluationStats(ClassificationStats.from_predictions(probs, labels, 1.0), stats,
                                                  None, InceptionStats.from_probabilities(probs)), ["injury"])
    assert catalogue["mse"].value == pytest.approx(skm.brier_score_loss(labels[:, 0], probs[:, 0]))
    assert catalogue["mae"].value == pytest.approx(np.abs(probs - labels).mean())
    assert catalogue["mape"].value is None and catalogue["mape"].reason.startswith("not available: zero targets")
    for name in ("psnr", "ssim", "fid"):
        assert catalogue[name].value is None
        assert catalogue[name].reason == "not available: reconstruction head disabled"


def test_federated_image_metrics_equal_skimage_and_direct_fid(pooled):
    report = _federated(pooled)
    real, fake = pooled["real"], pooled["fake"]
    assert _value(report, "psnr") == pytest.approx(
        np.mean([peak_signal_noise_ratio(r, f, data_range=1.0) for r, f in zip(real, fake)]), rel=1e-9)
    assert _value(report, "ssim") == pytest.approx(np.mean([
        structural_similarity(r, f, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for r, f in zip(real, fake)]), rel=1e-9)
    a, b = pooled["real_f"], pooled["fake_f"]
    covmean = linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    direct = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
              + np.trace(np.cov(b, rowvar=False)) - 2 * np.trace(covmean))
    assert _value(report, "fid") == pytest.approx(direct, rel=1e-7)
    assert "test features" in report.catalogue["fid"]["note"]


def test_a_round_without_fid_keeps_psnr_and_ssim_and_says_why_fid_is_missing(pooled, server_task):
    every_round = _federated(pooled, asked_fid=True)
    without = _federated(pooled, asked_fid=False, sent_fid=(False, False, False))
    assert not without.rejected
    for name in ("psnr", "ssim", "auc", "is"):
        assert _value(without, name) == pytest.approx(_value(every_round, name), rel=1e-12)
    assert _value(without, "fid") is None and "fid-every" in without.catalogue["fid"]["reason"]
    # A site that sends FID moments the round did not ask for, or leaves them out of a round that
    # did, is refused (its statistics would not add up with the others').
    uninvited = _federated(pooled, asked_fid=False, sent_fid=(True, False, False))
    assert [r["site"] for r in uninvited.rejected] == ["site-0"]
    assert "did not ask" in uninvited.rejected[0]["reason"]
    missing = _federated(pooled, asked_fid=True, sent_fid=(True, True, False))
    assert [r["site"] for r in missing.rejected] == ["site-2"] and "fid-real" in missing.rejected[0]["reason"]


def test_fid_rounds_follow_fid_every():
    from common.config import EvalConfig

    assert [r for r in range(13) if EvalConfig(fid_every=5).fid_round(r, 12)] == [0, 5, 10, 12]
    assert all(EvalConfig(fid_every=1).fid_round(r, 3) for r in range(4))
    with pytest.raises(ValueError, match="fid-every"):
        EvalConfig(fid_every=0)


def test_federated_inception_score_equals_direct_computation(pooled):
    report = _federated(pooled)
    scores = []
    for j in range(2):
        p = np.stack([1 - pooled["probs"][:, j], pooled["probs"][:, j]], axis=1)
        marginal = p.mean(0)
        scores.append(np.exp(np.mean((p * (np.log(p) - np.log(marginal))).sum(1))))
    assert _value(report, "is") == pytest.approx(np.mean(scores), rel=1e-9)


def test_small_site_is_hidden_but_counted(pooled):
    report = _federated(pooled, small_site=True)
    assert report.evaluation["site-0"] == {"suppressed": "fewer than 10 test studies"}
    assert "site-0" not in report.catalogue["auc"]["per_site"]
    assert set(report.catalogue["auc"]["per_site"]) == {"site-1", "site-2"}
    assert report.global_eval["n"] == 240, "the small site's studies still count"


def test_image_statistics_without_a_decoder_are_rejected(pooled):
    report = _federated(pooled, with_images=True, fid_dim=None)
    assert len(report.rejected) == 3 and "reconstruction head is disabled" in report.rejected[0]["reason"]


def test_every_catalogue_entry_is_registered(pooled):
    report = _federated(pooled)
    assert set(report.catalogue) <= set(REGISTRY)
    assert {"accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "kappa", "mae", "mse", "rmse",
            "mape", "psnr", "ssim", "fid", "is"} <= set(report.catalogue)
    assert all("aggregation" in entry for entry in report.catalogue.values())


# ------------------------------------------------------------- unit references on fixed inputs
def test_psnr_of_a_known_error():
    reference = torch.zeros(2, 16, 16)
    assert psnr(reference + 0.1, reference).tolist() == pytest.approx([20.0, 20.0])
    assert psnr(reference, reference).tolist() == [100.0, 100.0], "capped, not infinite"


def test_ssim_matches_skimage_wang_settings_on_fixed_images():
    rng = np.random.default_rng(5)
    a = rng.random((32, 40))
    b = np.clip(a * 0.8 + 0.1 + rng.normal(0, 0.05, a.shape), 0, 1)
    ours = ssim(torch.from_numpy(b)[None], torch.from_numpy(a)[None]).item()
    reference = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert ours == pytest.approx(reference, rel=1e-10)
    assert ssim(torch.from_numpy(a)[None], torch.from_numpy(a)[None]).item() == pytest.approx(1.0)


def test_fid_of_known_gaussians():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4000, 3))
    same = frechet_distance(GaussianMoments.of(x), GaussianMoments.of(x))
    shifted = frechet_distance(GaussianMoments.of(x), GaussianMoments.of(x + np.array([1.0, 2.0, 0.0])))
    assert same == pytest.approx(0.0, abs=1e-6) and shifted == pytest.approx(5.0, rel=1e-6)


def test_inception_score_bounds():
    undecided = InceptionStats.from_probabilities(np.full((10, 1), 0.5)).scores()
    confident_split = InceptionStats.from_probabilities(np.array([[1e-9]] * 5 + [[1 - 1e-9]] * 5)).scores()
    assert undecided[0] == pytest.approx(1.0) and confident_split[0] == pytest.approx(2.0, rel=1e-6)


def test_kappa_from_counts_matches_sklearn_on_fixed_labels():
    y = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.1, 0.8, 0.2, 0.7, 0.3, 0.55, 0.1])
    stats = ClassificationStats.from_predictions(p[:, None], y[:, None], 0.0)
    catalogue = compute_catalogue(EvaluationStats(stats, ErrorStats(), None,
                                                  InceptionStats.from_probabilities(p[:, None])), ["injury"])
    assert catalogue["kappa"].value == pytest.approx(skm.cohen_kappa_score(y, (p >= 0.5).astype(int)))
    assert catalogue["specificity"].value == pytest.approx(4 / 6)


def test_fid_extractor_uses_a_local_inception_file_and_names_it(tmp_path, tiny_model_config):
    from torchvision.models import inception_v3

    from common.metrics.features import FidFeatureExtractor
    from common.model import BackboneWeightsError, build_model

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), path)
    model = build_model(tiny_model_config)
    extractor = FidFeatureExtractor(model, dim=8, inception_weights=str(path))
    real, fake = torch.rand(4, 32, 32), torch.rand(4, 32, 32)
    real_features, fake_features = extractor.real_and_fake(real, fake)
    assert real_features.shape == fake_features.shape == (4, 8) and np.all(np.isfinite(real_features))
    assert "InceptionV3" in extractor.name
    default = FidFeatureExtractor(model, dim=8, image_size=32)
    real_features, fake_features = default.real_and_fake(real, fake)
    assert "ResNet50" in default.name and "32x32" in default.name and fake_features.shape == (4, 8)
    assert np.allclose(real_features.mean(0), 0, atol=1e-4), "standardised with the real images' statistics"
    again, _ = default.real_and_fake(real, torch.rand(4, 32, 32))
    assert np.array_equal(again, real_features) and len(default._real) == 1, "real features computed once"
    with pytest.raises(BackboneWeightsError, match="fid-inception-weights"):
        FidFeatureExtractor(model, dim=8, inception_weights=str(tmp_path / "missing.pth"))


def test_fid_real_features_are_kept_on_disk_for_a_frozen_backbone_only(tmp_path, tiny_model_config):
    """A second process of the site (a new extractor) reads the real images' features from the
    site's cache and runs the backbone on the reconstructions only; a backbone that trains has
    its real features computed again, since they move with it."""
    import dataclasses

    from common.metrics.features import FidFeatureExtractor
    from common.model import build_model

    model = build_model(tiny_model_config)
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    real, fake = torch.rand(6, 32, 32), torch.rand(6, 32, 32)
    first = FidFeatureExtractor(model, dim=8, image_size=32, cache_dir=tmp_path)
    real_features, _ = first.real_and_fake(real, fake)
    assert calls == [6, 6] and len(list(tmp_path.glob("fid-real-*.pt"))) == 1
    calls.clear()
    second = FidFeatureExtractor(model, dim=8, image_size=32, cache_dir=tmp_path)
    again, fake_features = second.real_and_fake(real, torch.rand(6, 32, 32))
    assert calls == [6], "only the reconstructions go through the backbone"
    assert np.array_equal(again, real_features) and fake_features.shape == (6, 8)

    cache_file = next(tmp_path.glob("fid-real-*.pt"))
    cache_file.write_bytes(b"torn")
    calls.clear()
    recomputed, _ = FidFeatureExtractor(model, dim=8, image_size=32, cache_dir=tmp_path).real_and_fake(real, fake)
    assert calls == [6, 6] and np.allclose(recomputed, real_features, atol=1e-6), "a torn cache is recomputed"

    trainable = build_model(dataclasses.replace(tiny_model_config, freeze="layer4"))
    moving = FidFeatureExtractor(trainable, dim=8, image_size=32, cache_dir=tmp_path / "partial")
    before, _ = moving.real_and_fake(real, fake)
    with torch.no_grad():
        for p in trainable.backbone.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    after, _ = moving.real_and_fake(real, fake)
    assert not np.allclose(before, after), "real features follow a backbone that trains"
    assert not (tmp_path / "partial").exists() and not moving._real


# ------------------------------------------------------------- figures that cannot be formed


def _small_stats(rng, n_images: int, one_class: bool = False, degenerate_features: bool = False) -> EvaluationStats:
    labels = np.ones((40, 2)) if one_class else (rng.random((40, 2)) < 0.5).astype(float)
    probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0.01, 0.99)
    real = rng.random((n_images, 16, 16))
    real_f = np.full((n_images, FID_DIM), np.nan) if degenerate_features else rng.normal(0, 1, (n_images, FID_DIM))
    return _site_stats(probs, labels, probs[:, 0] * 10, labels[:, 0] * 10, real, np.clip(real + 0.1, 0, 1), real_f,
                       rng.normal(0, 1, (n_images, FID_DIM)))


def test_the_catalogue_lists_its_figures_in_registry_order_and_says_why_one_is_missing():
    rng = np.random.default_rng(3)
    empty = compute_catalogue(EvaluationStats.empty(2, FID_DIM), LABELS)
    assert list(empty) == [name for name, spec in REGISTRY.items() if spec.group in ("classification", "error", "image")]
    assert {name: entry.reason for name, entry in empty.items()} == {
        **{name: "not available: no test studies" for name in empty}, "psnr": "not available: no test images",
        "ssim": "not available: no test images", "fid": "not available: no test images"}

    one_image = compute_catalogue(_small_stats(rng, 1), LABELS)
    assert one_image["psnr"].value is not None and one_image["fid"].reason == "not available: fewer than 2 images"
    degenerate = compute_catalogue(_small_stats(rng, 8, degenerate_features=True), LABELS)
    assert degenerate["fid"].value is None
    assert degenerate["fid"].reason.startswith("not available: the Frechet distance could not be computed (")
    one_class = compute_catalogue(_small_stats(rng, 8, one_class=True), LABELS)
    assert one_class["auc"].reason == "not available: test studies of one class only"
    assert one_class["specificity"].reason == "not available: no negative test studies"
    assert one_class["sensitivity"].value is not None and one_class["fid"].value is not None
