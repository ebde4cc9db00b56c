"""Confidence intervals from the sufficient statistics, against references computed from the
per-study values the sites never send: DeLong with midranks and pairwise, a bootstrap of
sklearn's AUC, coverage over generated datasets, scipy's Wilson interval, and the MAE's
normal interval on the errors themselves."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from scipy.special import ndtr, ndtri
from scipy.stats import binomtest, norm, rankdata
from sklearn.metrics import roc_auc_score

from common.exchange import ParamSpec
from common.metrics.catalogue import CI_KEY, EvaluationStats, compute_catalogue
from common.metrics.classification import ClassificationStats, bin_index, pooled_auc
from common.metrics.errors import ErrorStats
from common.metrics.images import InceptionStats
from common.metrics.intervals import (HIGHER_MOMENTS, auc_components, auc_interval, error_intervals,
                                      proportion_intervals, wilson_interval)
from server.strategy import ClinicFedAvg
from server.strategy_config import StrategyConfig
from tests.conftest import reply

Z95 = float(norm.ppf(0.975))


def _scores(rng: np.random.Generator, n: int, prevalence: float = 0.4, shift: float = 1.2):
    """Binormal scores mapped to (0, 1): negatives uniform, positives shifted by ``shift`` SD."""
    labels = (rng.random(n) < prevalence).astype(float)
    return ndtr(rng.normal(shift * labels, 1.0)), labels


def _histograms(sites: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The pooled histograms of sites given as (scores, labels, bins), as the server sums them."""
    total = ClassificationStats.empty(1)
    for scores, labels, bins in sites:
        total = total + ClassificationStats.from_predictions(scores[:, None], labels[:, None], 0.0, bins=bins)
    return total.histograms


def _fast_delong(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """Sun & Xu's fast DeLong on per-study scores: midranks, tied scores count half."""
    m, n = len(pos), len(neg)
    tx, ty, tz = rankdata(pos), rankdata(neg), rankdata(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1 - (tz[m:] - ty) / m
    return auc, np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n


def _pairwise_delong(sites: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[float, float]:
    """DeLong from its definition on per-study scores, each (positive, negative) pair compared on
    the coarser grid of the two studies' sites: the pooled histogram AUC's semantics."""
    scores = np.concatenate([s for s, _, _ in sites])
    labels = np.concatenate([y for _, y, _ in sites]).astype(bool)
    grids = np.concatenate([np.full(len(s), b) for s, _, b in sites])
    grid = np.minimum.outer(grids[labels], grids[~labels])
    pos_bin = np.clip(np.floor(scores[labels][:, None] * grid), 0, grid - 1)
    neg_bin = np.clip(np.floor(scores[~labels][None, :] * grid), 0, grid - 1)
    psi = (pos_bin > neg_bin) + 0.5 * (pos_bin == neg_bin)
    m, n = psi.shape
    return psi.mean(), np.var(psi.mean(1), ddof=1) / m + np.var(psi.mean(0), ddof=1) / n


def _check_against(histograms, reference_auc: float, reference_variance: float) -> None:
    components = auc_components(histograms, 0)
    assert components.auc == pooled_auc(histograms, 0).value, "the mean V10 is the catalogue's AUC, to the bit"
    assert components.auc == pytest.approx(reference_auc, abs=1e-12)
    assert components.variance() == pytest.approx(reference_variance, abs=1e-9)
    low, high = auc_interval(histograms, 0).bounds
    half = Z95 * np.sqrt(reference_variance)
    assert (low, high) == pytest.approx((reference_auc - half, reference_auc + half), abs=1e-9)


def test_delong_on_one_sites_histogram_equals_midrank_delong_on_bin_indices():
    rng = np.random.default_rng(0)
    scores, labels = _scores(rng, 300)
    index = bin_index(scores, 64)
    reference = _fast_delong(index[labels == 1].astype(float), index[labels == 0].astype(float))
    _check_against(_histograms([(scores, labels, 64)]), *reference)


def test_delong_on_pooled_sites_of_one_resolution_equals_midrank_delong():
    rng = np.random.default_rng(1)
    sites = [(*_scores(rng, n, prevalence), 32) for n, prevalence in ((60, 0.3), (140, 0.5), (90, 0.4))]
    index = np.concatenate([bin_index(s, 32) for s, _, _ in sites]).astype(float)
    labels = np.concatenate([y for _, y, _ in sites])
    reference = _fast_delong(index[labels == 1], index[labels == 0])
    _check_against(_histograms(sites), *reference)
    assert _pairwise_delong(sites) == pytest.approx(reference, abs=1e-12), "the two references agree"


def test_delong_on_pooled_sites_of_nested_resolutions_equals_pairwise_delong():
    rng = np.random.default_rng(2)
    sites = [(*_scores(rng, n, prevalence), bins) for n, prevalence, bins in
             ((12, 0.5, 8), (45, 0.3, 32), (160, 0.45, 128), (70, 0.4, 32))]
    _check_against(_histograms(sites), *_pairwise_delong(sites))


def test_the_delong_interval_is_as_wide_as_a_bootstrap_of_sklearns_auc():
    rng = np.random.default_rng(3)
    scores, labels = _scores(rng, 320, shift=1.0)
    index = bin_index(scores, 64).astype(float)
    pos, neg = index[labels == 1], index[labels == 0]
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    resampled = [roc_auc_score(y, np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]))
                 for _ in range(2000)]  # stratified, as DeLong holds the class sizes fixed
    bootstrap_width = np.subtract(*np.percentile(resampled, [97.5, 2.5]))
    low, high = auc_interval(_histograms([(scores, labels, 64)]), 0).bounds
    assert 0.8 < (high - low) / bootstrap_width < 1.2


def _bin_probabilities(bins: int, shift: float) -> np.ndarray:
    """P(score in each bin) of ndtr(N(shift, 1))."""
    edges = ndtri(np.linspace(0.0, 1.0, bins + 1))
    return np.diff(ndtr(edges - shift))


def _expected_binned_auc(p_pos: np.ndarray, p_neg: np.ndarray) -> float:
    return float((p_pos * (np.cumsum(p_neg) - p_neg + 0.5 * p_neg)).sum())


def test_the_95_interval_covers_the_true_auc_of_pooled_sites_in_95_percent_of_datasets():
    """Two sites of 16 and 64 bins; the expected histogram AUC weighs each pair of sites by its
    positive-negative pairs, compared on the coarser grid."""
    rng = np.random.default_rng(4)
    shift, sites = 1.2, {16: (30, 50), 64: (40, 60)}  # bins -> (positives, negatives)
    n_pos, n_neg = sum(p for p, _ in sites.values()), sum(q for _, q in sites.values())
    truth = sum(sites[a][0] * sites[b][1] * _expected_binned_auc(_bin_probabilities(min(a, b), shift),
                                                                 _bin_probabilities(min(a, b), 0.0))
                for a in sites for b in sites) / (n_pos * n_neg)
    covered = 0
    for _ in range(300):
        histograms = {bins: (rng.multinomial(p, _bin_probabilities(bins, shift))[None],
                             rng.multinomial(q, _bin_probabilities(bins, 0.0))[None])
                      for bins, (p, q) in sites.items()}
        low, high = auc_interval(histograms, 0).bounds
        covered += low <= truth <= high
    assert 0.92 <= covered / 300 <= 0.98


def test_delong_says_why_there_is_no_interval():
    separated = {8: (np.array([[0, 0, 0, 0, 0, 3, 4, 1]]), np.array([[2, 5, 1, 0, 0, 0, 0, 0]]))}
    assert auc_interval(separated, 0).bounds is None
    assert "variance is 0" in auc_interval(separated, 0).reason
    one_positive = {4: (np.array([[0, 0, 1, 0]]), np.array([[3, 2, 1, 0]]))}
    assert auc_interval(one_positive, 0).reason == ("not available: DeLong's variance needs at least 2 positive and "
                                                    "2 negative test studies")
    one_class = {4: (np.array([[0, 0, 1, 4]]), np.zeros((1, 4), np.int64))}
    assert auc_interval(one_class, 0).reason == "not available: test studies of one class only"


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_wilson_intervals_are_scipys(level):
    for n in (1, 2, 7, 40, 333):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            expected = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
            assert wilson_interval(k, n, level).bounds == (expected.low, expected.high), (k, n)
    assert wilson_interval(0, 0).reason == "not available: no studies in the denominator"


def test_the_proportions_intervals_use_their_own_denominators():
    tp, fp, tn, fn = 30, 20, 50, 10
    stats = ClassificationStats(110, 0.0, np.array([tp]), np.array([fp]), np.array([tn]), np.array([fn]))
    intervals = proportion_intervals(stats, 0)
    assert intervals["sensitivity"].bounds == wilson_interval(30, 40).bounds
    assert intervals["specificity"].bounds == wilson_interval(50, 70).bounds
    assert intervals["precision"].bounds == wilson_interval(30, 50).bounds
    assert intervals["accuracy"].bounds == wilson_interval(80, 110).bounds


def _direct_mae_interval(errors: np.ndarray, upper: float = np.inf) -> tuple[float, float]:
    absolute = np.abs(errors)
    half = Z95 * absolute.std(ddof=1) / np.sqrt(len(errors))
    return max(0.0, absolute.mean() - half), min(upper, absolute.mean() + half)


def test_the_mae_interval_equals_a_direct_computation_on_the_errors():
    rng = np.random.default_rng(5)
    probs, labels = rng.random((250, 1)), (rng.random((250, 1)) < 0.4).astype(float)
    targets = np.where(rng.random(250) < 0.8, rng.uniform(0, 10, 250), np.nan)
    severity = np.nan_to_num(targets, nan=3.0) + rng.normal(0.3, 1.0, 250)
    known = np.isfinite(targets)
    by_severity = error_intervals(ErrorStats.from_predictions(probs, labels, severity, targets), num_labels=1)
    assert by_severity["mae"].bounds == pytest.approx(_direct_mae_interval(severity[known] - targets[known]), abs=1e-9)
    by_probability = error_intervals(ErrorStats.from_predictions(probs, labels, None, np.full(250, np.nan)), 1)
    assert by_probability["mae"].bounds == pytest.approx(_direct_mae_interval(probs - labels, upper=1.0), abs=1e-9)
    for name in ("mse", "rmse"):
        assert by_severity[name].bounds is None and by_severity[name].reason == f"not available: {HIGHER_MOMENTS}"
    assert "squared percentage errors" in by_severity["mape"].reason
    two_labels = error_intervals(ErrorStats.from_predictions(np.hstack([probs, probs]), np.hstack([labels, labels]),
                                                             None, np.full(250, np.nan)), num_labels=2)
    assert two_labels["mae"].bounds is None and "not independent" in two_labels["mae"].reason


def _evaluation(scores: np.ndarray, labels: np.ndarray, bins: int) -> EvaluationStats:
    scores, labels = scores.reshape(len(scores), -1), labels.reshape(len(labels), -1)
    return EvaluationStats(ClassificationStats.from_predictions(scores, labels, 1.0, bins=bins),
                           ErrorStats.from_predictions(scores, labels, None, np.full(len(scores), np.nan)), None,
                           InceptionStats.from_probabilities(scores))


def test_one_labels_catalogue_carries_each_figures_interval_and_says_why_the_others_have_none():
    rng = np.random.default_rng(6)
    scores, labels = _scores(rng, 200)
    stats = _evaluation(scores, labels, 128)
    catalogue = {name: value.to_json(name) for name, value in compute_catalogue(stats, ["injury"]).items()}
    assert catalogue["auc"][CI_KEY] == list(auc_interval(stats.classification.histograms, 0).bounds)
    assert catalogue["auc"]["ci_method"].startswith("DeLong")
    counts = proportion_intervals(stats.classification, 0)
    for name in ("accuracy", "sensitivity", "specificity", "precision"):
        assert catalogue[name][CI_KEY] == list(counts[name].bounds) and catalogue[name]["ci_method"] == "Wilson score"
        low, high = catalogue[name][CI_KEY]
        assert low < catalogue[name]["value"] < high
    assert catalogue["mae"][CI_KEY] == pytest.approx(_direct_mae_interval(scores - labels, upper=1.0), abs=1e-12)
    assert catalogue["rmse"]["ci_reason"] == f"not available: {HIGHER_MOMENTS}" and CI_KEY not in catalogue["rmse"]
    assert not any(key.startswith("ci") for key in catalogue["f1"]), "no interval method for F1"


def test_several_labels_have_intervals_per_label_and_none_for_the_macro_mean():
    rng = np.random.default_rng(7)
    first, first_labels = _scores(rng, 150)
    second, _ = _scores(rng, 150)
    stats = _evaluation(np.stack([first, second], 1), np.stack([first_labels, np.ones(150)], 1), 64)
    auc = compute_catalogue(stats, ["acl", "meniscus"])["auc"].to_json("auc")
    assert CI_KEY not in auc and auc["ci_reason"].startswith("not available: the macro mean over labels")
    assert auc[f"per_label_{CI_KEY}"] == {"acl": list(auc_interval(stats.classification.histograms, 0).bounds),
                                          "meniscus": None}, "meniscus has positives only: no AUC, no interval"
    sensitivity = compute_catalogue(stats, ["acl", "meniscus"])["sensitivity"].to_json("sensitivity")
    assert sensitivity[f"per_label_{CI_KEY}"]["meniscus"] == list(proportion_intervals(stats.classification, 1)
                                                                   ["sensitivity"].bounds)


def test_each_sites_interval_comes_from_its_own_statistics():
    rng = np.random.default_rng(8)
    strategy = ClinicFedAvg(StrategyConfig(spec={"w": ParamSpec((1,), np.dtype("float32"))}, backbone_hash="frozen:abc",
                                           label_names=["injury"], min_sites=1, fid_dim=None, min_site_cases=10))
    separated = np.repeat([0.1, 0.9], 10), np.repeat([0.0, 1.0], 10)
    sites = {"site-a": _evaluation(*_scores(rng, 40), 32), "site-b": _evaluation(*_scores(rng, 170), 128),
             "site-c": _evaluation(*_scores(rng, 6), 4), "site-d": _evaluation(*separated, 16)}
    site_record = {"status": "ok", "backbone-hash": "frozen:abc"}
    replies = [reply(RecordDict({"metrics": MetricRecord({"num-examples": stats.n, **stats.to_record()}),
                                 "validation": MetricRecord(stats.classification.to_record()),
                                 "site": ConfigRecord({**site_record, "site-name": name})}),
                     node, "evaluate") for node, (name, stats) in enumerate(sites.items(), start=1)]
    strategy.aggregate_evaluate(1, replies)
    auc = strategy.reports[1].catalogue["auc"]
    for name in ("site-a", "site-b"):
        assert auc[f"per_site_{CI_KEY}"][name] == list(auc_interval(sites[name].classification.histograms, 0).bounds)
    assert "site-c" not in auc[f"per_site_{CI_KEY}"], "a small site's own figures are suppressed"
    assert auc["per_site"]["site-d"] == 1.0 and auc[f"per_site_{CI_KEY}"]["site-d"] is None
    assert auc["per_site_ci_reason"] == {"site-d": auc_interval(sites["site-d"].classification.histograms, 0).reason}
    assert "per_site_ci_reason" not in strategy.reports[1].catalogue["rmse"], "the pooled figure's own reason"
    pooled = sum(sites.values(), EvaluationStats.empty(1, None))
    assert auc[CI_KEY] == list(auc_interval(pooled.classification.histograms, 0).bounds)
