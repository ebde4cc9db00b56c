"""Confidence intervals of the catalogue's figures, from the sufficient statistics the sites send:
score histograms, confusion counts and error sums. No per-study score or label is needed.

- AUC: DeLong et al. (1988), on binned scores (``auc_interval``). Studies whose scores share a
  bin are tied, as pROC treats tied scores, so DeLong's structural components are constant within
  a bin of a resolution and one value per (resolution, bin) group stands for all its studies.
- Proportions (sensitivity, specificity, accuracy, precision): Wilson score interval
  (``wilson_interval``), from the confusion counts.
- MAE: normal approximation on the mean |error|, its variance from sum |e| and sum e^2
  (``mean_abs_error_interval``). MSE, RMSE and MAPE have no interval: their variance needs
  higher moments (sum e^4, the squared percentage errors) that sites do not send.

Every function returns an ``Interval``: its bounds, the method, and why there is none when the
statistics do not allow one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.metrics.classification import ClassificationStats, coarsen
from common.metrics.errors import ErrorStats

LEVEL = 0.95
DELONG = "DeLong, on binned scores (ties within a bin count half)"
WILSON = "Wilson score"
MEAN_ABS_ERROR = "normal approximation on the mean |error| (variance from sum |e| and sum e^2)"
HIGHER_MOMENTS = ("its variance needs the fourth moment of the errors (sum e^4), which sites do not send "
                  "(they send n, sum |e| and sum e^2)")


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval (``bounds``), or the reason there is none."""

    bounds: tuple[float, float] | None
    method: str
    reason: str | None = None  # "not available: ..." when bounds is None


def unavailable(method: str, reason: str) -> Interval:
    return Interval(None, method, f"not available: {reason}")


def normal_quantile(level: float) -> float:
    """z of a two-sided interval at ``level`` (1.96 at 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"the confidence level must be between 0 and 1, got {level}")
    from scipy.special import ndtri  # here: only the centre computes intervals; a site process never imports it

    return float(ndtri(0.5 + 0.5 * level))


# ----------------------------------------------------------------------------------------- AUC
@dataclass(frozen=True)
class AucComponents:
    """DeLong's structural components of one label's histogram AUC, one per group of tied studies
    (a bin of one resolution). Kept as integers over ``2 * n``, so that sums are exact:
    ``wins_pos[g] / (2 n_neg)`` is V10 of a positive in group g (the negatives it scores above,
    ties half), ``wins_neg[g] / (2 n_pos)`` is V01 of a negative in group g (the positives that
    score above it, ties half)."""

    pos_counts: np.ndarray
    wins_pos: np.ndarray
    neg_counts: np.ndarray
    wins_neg: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.pos_counts.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg_counts.sum())

    @property
    def v10(self) -> np.ndarray:
        return self.wins_pos / (2.0 * self.n_neg)

    @property
    def v01(self) -> np.ndarray:
        return self.wins_neg / (2.0 * self.n_pos)

    @property
    def auc(self) -> float:
        """The mean V10: the same rational number as ``pooled_auc``'s (wins + ties / 2) / pairs,
        from the same exact integer sums, so the same float."""
        return float((self.pos_counts * self.wins_pos).sum() / (2.0 * self.n_pos * self.n_neg))

    def variance(self) -> float:
        """DeLong's variance of the AUC: S10 / n_pos + S01 / n_neg, with S10 and S01 the sample
        variances (n - 1) of V10 over the positives and V01 over the negatives."""
        auc = self.auc
        s10 = float((self.pos_counts * (self.v10 - auc) ** 2).sum()) / (self.n_pos - 1)
        s01 = float((self.neg_counts * (self.v01 - auc) ** 2).sum()) / (self.n_neg - 1)
        return s10 / self.n_pos + s01 / self.n_neg

    def is_degenerate(self) -> bool:
        """Every positive beats the same share of negatives and every negative loses to the same
        share of positives (classes in bins that do not overlap, or all in one bin): variance 0."""
        return _constant(self.wins_pos, self.pos_counts) and _constant(self.wins_neg, self.neg_counts)


def _constant(values: np.ndarray, counts: np.ndarray) -> bool:
    present = values[counts > 0]
    return bool(present.size == 0 or np.all(present == present[0]))


def auc_components(histograms: dict[int, tuple[np.ndarray, np.ndarray]], label: int) -> AucComponents:
    """DeLong's structural components over histograms of nested resolutions, on the semantics of
    ``pooled_auc``: each group of positives meets each group of negatives on the coarser of the
    two grids, where a shared coarse bin is a tie. Groups: every bin of every resolution present,
    in order of resolution (empty bins included, with count 0)."""
    resolutions = sorted(histograms)
    positives = {b: histograms[b][0][label].astype(np.float64) for b in resolutions}
    negatives = {b: histograms[b][1][label].astype(np.float64) for b in resolutions}
    wins_pos, wins_neg = [], []
    for fine in resolutions:
        beaten = np.zeros(fine)  # per bin of ``fine``: 2 x negatives below + negatives in the same coarse bin
        beating = np.zeros(fine)  # per bin of ``fine``: 2 x positives above + positives in the same coarse bin
        for other in resolutions:
            grid = min(fine, other)  # a coarse bin covers fine // grid bins of ``fine``
            neg = coarsen(negatives[other], grid)
            beaten += np.repeat(2.0 * np.cumsum(neg) - neg, fine // grid)
            pos = coarsen(positives[other], grid)
            beating += np.repeat(2.0 * (pos.sum() - np.cumsum(pos)) + pos, fine // grid)
        wins_pos.append(beaten)
        wins_neg.append(beating)
    return AucComponents(np.concatenate([positives[b] for b in resolutions]), np.concatenate(wins_pos),
                         np.concatenate([negatives[b] for b in resolutions]), np.concatenate(wins_neg))


def auc_interval(histograms: dict[int, tuple[np.ndarray, np.ndarray]], label: int,
                 level: float = LEVEL) -> Interval:
    """DeLong's interval of one label's histogram AUC: AUC +/- z sqrt(S10 / n_pos + S01 / n_neg),
    clipped to [0, 1].

    No transform (no logit): the Wald interval on the AUC's own scale is what pROC's
    ``ci.auc(method = "delong")`` reports (it clips to [0, 1] the same way), so figures compare
    with published ones; its coverage is checked in ``tests/test_intervals.py``. The interval is
    the sampling uncertainty of the histogram AUC; the AUC's ``error_bound`` (ties within a bin)
    is a separate, deterministic difference from the exact per-study AUC."""
    if not histograms:
        return unavailable(DELONG, "no test studies")
    components = auc_components(histograms, label)
    if components.n_pos == 0 or components.n_neg == 0:
        return unavailable(DELONG, "test studies of one class only")
    if components.n_pos < 2 or components.n_neg < 2:
        return unavailable(DELONG, "DeLong's variance needs at least 2 positive and 2 negative test studies")
    if components.is_degenerate():
        return unavailable(DELONG, "DeLong's variance is 0 (every positive scores above the same share of "
                                   "negatives, e.g. classes whose score bins do not overlap)")
    auc = components.auc
    half_width = normal_quantile(level) * math.sqrt(components.variance())
    return Interval((max(0.0, auc - half_width), min(1.0, auc + half_width)), DELONG)


# --------------------------------------------------------------------------------- proportions
def wilson_interval(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson's score interval of a proportion successes / n. The arithmetic is scipy's
    ``binomtest(...).proportion_ci(method="wilson")`` (Newcombe 1998, method 3), so the two agree
    to the last bit; at 0 successes the lower bound is 0, at n the upper bound is 1."""
    successes, n = int(successes), int(n)
    if n <= 0:
        return unavailable(WILSON, "no studies in the denominator")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n = {n}, got {successes}")
    z = normal_quantile(level)
    p = successes / n
    denom = 2 * (n + z ** 2)
    center = (2 * n * p + z ** 2) / denom
    delta = z / denom * math.sqrt(4 * n * p * (1 - p) + z ** 2)
    return Interval((0.0 if successes == 0 else center - delta, 1.0 if successes == n else center + delta), WILSON)


def proportion_intervals(stats: ClassificationStats, label: int, level: float = LEVEL) -> dict[str, Interval]:
    """Wilson intervals of one label's proportions at the threshold, from its confusion counts."""
    tp, fp, tn, fn = (int(counts[label]) for counts in (stats.tp, stats.fp, stats.tn, stats.fn))
    return {"accuracy": wilson_interval(tp + tn, tp + fp + tn + fn, level),
            "sensitivity": wilson_interval(tp, tp + fn, level),
            "specificity": wilson_interval(tn, tn + fp, level),
            "precision": wilson_interval(tp, tp + fp, level)}


# ------------------------------------------------------------------------------------- errors
def mean_abs_error_interval(n: int, abs_sum: float, sq_sum: float, level: float = LEVEL,
                            upper: float = math.inf) -> Interval:
    """MAE +/- z sqrt(var(|e|) / n), var(|e|) = (sum e^2 - n MAE^2) / (n - 1) (sum |e|^2 = sum e^2),
    clipped to [0, upper]."""
    if n < 2:
        return unavailable(MEAN_ABS_ERROR, "fewer than 2 errors")
    mae = abs_sum / n
    variance = max(0.0, (sq_sum - n * mae ** 2) / (n - 1))  # rounding can take a zero variance below 0
    half_width = normal_quantile(level) * math.sqrt(variance / n)
    return Interval((max(0.0, mae - half_width), min(upper, mae + half_width)), MEAN_ABS_ERROR)


def error_intervals(stats: ErrorStats, num_labels: int, level: float = LEVEL) -> dict[str, Interval]:
    """Intervals of MAE, MSE, RMSE and MAPE, on the basis ``error_figures`` reports: the severity
    head where any study has a target, else the probability."""
    no_moments = unavailable(MEAN_ABS_ERROR, HIGHER_MOMENTS)
    if stats.n_severity > 0:
        mae = mean_abs_error_interval(stats.n_severity, stats.abs_severity, stats.sq_severity, level)
    elif num_labels > 1:
        # The sums pool the labels: errors of one study's labels are correlated, and no sum separates studies.
        mae = unavailable(MEAN_ABS_ERROR, "the probability errors of several labels are summed together, and the "
                                          "errors of one study's labels are not independent")
    else:
        mae = mean_abs_error_interval(stats.n_probability, stats.abs_probability, stats.sq_probability, level,
                                      upper=1.0)
    return {"mae": mae, "mse": no_moments, "rmse": no_moments,
            "mape": unavailable(MEAN_ABS_ERROR, "its variance needs the sum of squared percentage errors, which "
                                                "sites do not send")}
