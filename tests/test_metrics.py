"""Classification statistics: exact pooling, histogram resolution by test size, and the AUC from
histograms against sklearn within the bound the histograms themselves give."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics.classification import MAX_BINS, ClassificationStats, auc_from_histograms, histogram_bins, \
    pooled_auc, summarize


def _scores(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    return np.clip(rng.normal(0.4 + 0.25 * labels, 0.2), 0, 1), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_matches_sklearn(seed):
    probs, labels = _scores(seed, 500)
    stats = ClassificationStats.from_predictions(probs[:, None], labels[:, None], 0.0)
    pos, neg = stats.histograms[MAX_BINS]
    assert auc_from_histograms(pos[0], neg[0]) == pytest.approx(roc_auc_score(labels, probs), abs=1e-3)


def test_resolution_follows_the_test_size():
    assert [histogram_bins(n) for n in (0, 3, 10, 12, 40, 100, 1000, 10_000)] == [4, 4, 8, 8, 32, 64, 512, 2048]
    assert histogram_bins(1000, fixed=64) == 64
    with pytest.raises(ValueError):
        histogram_bins(10, fixed=100)


def test_a_site_keeps_k_studies_per_bin_however_the_centre_asks():
    """The site policy's min-studies-per-bin (k) caps the resolution of a fixed eval-bins too: a
    centre asking 2048 bins of a 10-study split gets 8 (k = 1, the default) or 4 (k = 2)."""
    assert histogram_bins(10, fixed=2048) == 8
    assert [histogram_bins(n, 0, 5) for n in (10, 40, 100, 1000)] == [4, 8, 16, 128]
    assert histogram_bins(100, fixed=2048, min_studies_per_bin=2) == 32
    assert histogram_bins(10, fixed=2048, min_studies_per_bin=0) == 2048, "k = 0: the site lets the centre choose"


@pytest.mark.parametrize("n", [10, 40, 200])
def test_coarse_histogram_auc_is_within_its_stated_bound_of_sklearn(n):
    """The cost of coarse bins is stated (AucFigure.bound) and holds against the exact AUC."""
    for seed in range(20):
        probs, labels = _scores(seed, n)
        if labels.all() or not labels.any():
            continue
        stats = ClassificationStats.from_predictions(probs[:, None], labels[:, None], 0.0, bins=histogram_bins(n))
        figure = pooled_auc(stats.histograms, 0)
        exact = roc_auc_score(labels, probs)
        assert abs(figure.value - exact) <= figure.bound + 1e-12
        assert figure.bound < 0.5


def test_sites_with_different_resolutions_pool_within_the_bound():
    """A 10-study site (8 bins) and a 400-study site (256 bins) pool; each pair of sites is compared
    on the coarser grid, and the pooled AUC is within the stated bound of sklearn's on all scores."""
    small, big = _scores(5, 10), _scores(6, 400)
    parts = [ClassificationStats.from_predictions(p[:, None], y[:, None], 0.0, bins=histogram_bins(len(p)))
             for p, y in (small, big)]
    total = parts[0] + parts[1]
    assert sorted(total.histograms) == [8, 256]
    figure = pooled_auc(total.histograms, 0)
    probs, labels = np.concatenate([small[0], big[0]]), np.concatenate([small[1], big[1]])
    assert abs(figure.value - roc_auc_score(labels, probs)) <= figure.bound + 1e-12
    coarse_everywhere = pooled_auc({8: total.common_histograms()}, 0)
    assert figure.bound <= coarse_everywhere.bound, "finer pairs are not coarsened for a small site"


def test_ties_count_half_like_sklearn():
    probs = np.array([0.5, 0.5, 0.5, 0.5])
    labels = np.array([1, 0, 1, 0])
    stats = ClassificationStats.from_predictions(probs[:, None], labels[:, None], 0.0)
    assert summarize(stats)["auc"] == pytest.approx(roc_auc_score(labels, probs)) == 0.5


def test_sum_of_site_statistics_equals_pooled_statistics():
    rng = np.random.default_rng(3)
    probs, labels = rng.random((90, 2)), rng.random((90, 2)) < 0.5
    pooled = ClassificationStats.from_predictions(probs, labels, 9.0)
    parts = [ClassificationStats.from_predictions(probs[s], labels[s], 3.0)
             for s in (slice(0, 30), slice(30, 60), slice(60, 90))]
    total = parts[0] + parts[1] + parts[2]
    for field in ("tp", "fp", "tn", "fn"):
        assert np.array_equal(getattr(total, field), getattr(pooled, field))
    for a, b in zip(total.histograms[MAX_BINS], pooled.histograms[MAX_BINS]):
        assert np.array_equal(a, b)
    assert summarize(total) == summarize(pooled)


def test_one_class_gives_nan_auc_not_a_number_made_up():
    stats = ClassificationStats.from_predictions(np.array([[0.2], [0.9]]), np.array([[1], [1]]), 0.0)
    assert np.isnan(summarize(stats)["auc"])
    assert summarize(stats)["accuracy"] == 0.5


def test_record_round_trip_and_rejection():
    stats = ClassificationStats.from_predictions(np.array([[0.2], [0.9], [0.6]]), np.array([[0], [1], [0]]), 1.5,
                                                 bins=4)
    record = stats.to_record()
    again = ClassificationStats.from_record(record, num_labels=1)
    assert summarize(again) == summarize(stats) and record["bins"] == 4 and len(record["hist-pos"]) == 4
    with pytest.raises(ValueError):
        ClassificationStats.from_record(record | {"tp": [-1]}, num_labels=1)
    with pytest.raises(ValueError, match="add up"):
        ClassificationStats.from_record(record | {"n": 7}, num_labels=1)
    forged = record | {"hist-pos": [0, 0, 0, 3]}  # one positive claimed as three
    with pytest.raises(ValueError, match="histogram totals"):
        ClassificationStats.from_record(forged, num_labels=1)
    with pytest.raises(ValueError, match="power of two"):
        ClassificationStats.from_record(record | {"bins": 5}, num_labels=1)
    with pytest.raises(ValueError, match="expected a number"):
        ClassificationStats.from_record(record | {"n": [3]}, num_labels=1)
