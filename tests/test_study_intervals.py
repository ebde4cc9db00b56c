"""The studies' paired bootstrap intervals, against a plain loop over the same resamples with
sklearn's AUC."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from simulations.studies.harness import paired_auc_difference


def _reference(labels, reference, others, resamples: int, seed: int) -> tuple[float, list[float]]:
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for y, a, models in zip(labels, reference, others):
        index = rng.integers(0, len(y), size=(resamples, len(y)))
        for r in range(resamples):
            i = index[r]
            draws[r] += roc_auc_score(y[i], a[i]) - np.mean([roc_auc_score(y[i], m[i]) for m in models])
    draws /= len(labels)
    point = np.mean([roc_auc_score(y, a) - np.mean([roc_auc_score(y, m) for m in models])
                     for y, a, models in zip(labels, reference, others)])
    return float(point), list(np.percentile(draws, [2.5, 97.5]))


def test_paired_difference_matches_a_plain_bootstrap_for_one_model_and_for_a_mean_of_models() -> None:
    rng = np.random.default_rng(3)
    labels, reference, single, several = [], [], [], []
    for n in (120, 90):  # two seeds of different test sizes
        y = (rng.random(n) < 0.4).astype(float)
        labels.append(y)
        reference.append(np.round(y + rng.normal(0, 0.7, n), 1))  # rounded: ties count half
        single.append(y + rng.normal(0, 1.3, n))
        several.append([y + rng.normal(0, s, n) for s in (0.9, 1.5, 3.0)])
    for others, as_lists in ((single, [[o] for o in single]), (several, several)):
        got = paired_auc_difference(labels, reference, others, resamples=200, seed=5)
        point, (low, high) = _reference(labels, reference, as_lists, 200, 5)
        assert abs(got["mean"] - point) < 1e-12
        assert abs(got["ci95"][0] - low) < 1e-9 and abs(got["ci95"][1] - high) < 1e-9
        assert low < point < high and got["n_test"] == [120, 90]
