"""Classification statistics: exact pooling and AUC from histograms against sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics.classification import ClassificationStats, auc_from_histograms, summarize


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.35
    probs = np.clip(rng.normal(0.4 + 0.25 * labels, 0.2), 0, 1)
    stats = ClassificationStats.from_predictions(probs[:, None], labels[:, None], 0.0)
    assert auc_from_histograms(stats.hist_pos[0], stats.hist_neg[0]) == pytest.approx(
        roc_auc_score(labels, probs), abs=1e-3)


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
    for field in ("tp", "fp", "tn", "fn", "hist_pos", "hist_neg"):
        assert np.array_equal(getattr(total, field), getattr(pooled, field))
    assert summarize(total) == summarize(pooled)


def test_one_class_gives_nan_auc_not_a_number_made_up():
    stats = ClassificationStats.from_predictions(np.array([[0.2], [0.9]]), np.array([[1], [1]]), 0.0)
    assert np.isnan(summarize(stats)["auc"])
    assert summarize(stats)["accuracy"] == 0.5


def test_record_round_trip_and_rejection():
    stats = ClassificationStats.from_predictions(np.array([[0.2], [0.9], [0.6]]), np.array([[0], [1], [0]]), 1.5)
    again = ClassificationStats.from_record(stats.to_record(), num_labels=1)
    assert summarize(again) == summarize(stats)
    broken = stats.to_record() | {"tp": [-1]}
    with pytest.raises(ValueError):
        ClassificationStats.from_record(broken, num_labels=1)
    with pytest.raises(ValueError, match="add up"):
        ClassificationStats.from_record(stats.to_record() | {"n": 7}, num_labels=1)
