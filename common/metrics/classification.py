"""Classification figures from sufficient statistics that sites can sum exactly.

A site never sends per-study predictions. It sends, per label: confusion counts at the decision
threshold and histograms of predicted probabilities for positives and negatives, plus the summed
loss. The server adds the statistics of all sites and computes the global figures from the sums:
the counts exactly, the AUC up to ties inside a bin.

The histogram resolution is a power of two chosen by the site from the size of its test split
(``histogram_bins``): a site with 10 test studies sends 8 bins, not 2048 bins that would pin down
almost every study's (score, label) pair. Resolutions nest (every edge of a coarse grid is an
edge of every finer one), so statistics of different resolutions still pool: each (positive,
negative) pair of sites is compared on the coarser of their two grids. Pairs whose scores share
a bin count as half, like sklearn's ties; ``AucFigure.bound`` is the largest error this can
cause against the exact pooled AUC, computed from the same histograms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

MAX_BINS = 2048  # the finest resolution (2^11)
MIN_BINS = 4
STUDIES_PER_BIN = 1  # adaptive rule: about this many test studies per bin on average (n <= bins < 2n)


def histogram_bins(n_test: int, fixed: int = 0, min_studies_per_bin: int = STUDIES_PER_BIN) -> int:
    """The resolution a site uses: ``fixed`` (a power of two) or, with 0, the largest power of
    two <= n_test / STUDIES_PER_BIN (about one study per bin), between MIN_BINS and MAX_BINS.
    Either way no finer than one bin per ``min_studies_per_bin`` test studies (the site policy's
    k, which the centre cannot lower; 0: no cap), and never below MIN_BINS."""
    if fixed and not is_resolution(fixed):
        raise ValueError(f"eval-bins must be 0 or a power of two in [{MIN_BINS}, {MAX_BINS}], got {fixed}")
    wanted = fixed or _power_of_two_at_most(n_test // STUDIES_PER_BIN)
    if min_studies_per_bin <= 0:
        return wanted
    return min(wanted, _power_of_two_at_most(n_test // min_studies_per_bin))


def _power_of_two_at_most(n: int) -> int:
    """The largest power of two <= n, clipped to [MIN_BINS, MAX_BINS]."""
    return int(min(MAX_BINS, 1 << (max(n, MIN_BINS).bit_length() - 1)))


def is_resolution(bins: int) -> bool:
    return MIN_BINS <= bins <= MAX_BINS and bins & (bins - 1) == 0


def bin_index(probs: np.ndarray, bins: int) -> np.ndarray:
    return np.clip((np.asarray(probs, np.float64) * bins).astype(np.int64), 0, bins - 1)


def coarsen(hist: np.ndarray, bins: int) -> np.ndarray:
    """(..., B) counts on a finer nested grid -> (..., bins)."""
    factor = hist.shape[-1] // bins
    return hist.reshape(*hist.shape[:-1], bins, factor).sum(-1)


@dataclass
class ClassificationStats:
    n: int
    loss_sum: float
    tp: np.ndarray  # (L,)
    fp: np.ndarray
    tn: np.ndarray
    fn: np.ndarray
    # resolution -> (positives (L, B), negatives (L, B)): counts of predicted probabilities per bin
    histograms: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def empty(cls, num_labels: int) -> "ClassificationStats":
        zeros = np.zeros(num_labels, dtype=np.int64)
        return cls(0, 0.0, zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy(), {})

    @classmethod
    def from_predictions(cls, probs: np.ndarray, labels: np.ndarray, loss_sum: float,
                         threshold: float = 0.5, bins: int = MAX_BINS) -> "ClassificationStats":
        """probs and labels: (N, L), probabilities in [0, 1] and labels in {0, 1}."""
        probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
        labels = np.asarray(labels).reshape(probs.shape).astype(bool)
        predicted = probs >= threshold
        index = bin_index(probs, bins)
        pos = np.stack([np.bincount(index[labels[:, j], j], minlength=bins) for j in range(probs.shape[1])])
        neg = np.stack([np.bincount(index[~labels[:, j], j], minlength=bins) for j in range(probs.shape[1])])
        return cls(
            n=len(probs),
            loss_sum=float(loss_sum),
            tp=(predicted & labels).sum(0), fp=(predicted & ~labels).sum(0),
            tn=(~predicted & ~labels).sum(0), fn=(~predicted & labels).sum(0),
            histograms={bins: (pos, neg)} if len(probs) else {},
        )

    def __add__(self, other: "ClassificationStats") -> "ClassificationStats":
        histograms = {b: (p.copy(), q.copy()) for b, (p, q) in self.histograms.items()}
        for bins, (pos, neg) in other.histograms.items():
            if bins in histograms:
                histograms[bins] = (histograms[bins][0] + pos, histograms[bins][1] + neg)
            else:
                histograms[bins] = (pos.copy(), neg.copy())
        return ClassificationStats(
            self.n + other.n, self.loss_sum + other.loss_sum,
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn, histograms)

    @property
    def num_labels(self) -> int:
        return len(self.tp)

    @property
    def coarsest(self) -> int | None:
        return min(self.histograms) if self.histograms else None

    def common_histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives), each (L, B), on the coarsest resolution present (e.g. for a ROC
        curve or a calibration fit that needs one grid)."""
        bins = self.coarsest
        if bins is None:
            return np.zeros((self.num_labels, MIN_BINS), np.int64), np.zeros((self.num_labels, MIN_BINS), np.int64)
        pos = sum(coarsen(p, bins) for p, _ in self.histograms.values())
        neg = sum(coarsen(q, bins) for _, q in self.histograms.values())
        return pos, neg

    # --- wire format: flat keys whose values Flower's MetricRecord accepts (int, float, lists) ---
    RECORD_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"n", "loss-sum", "bins", "tp", "fp", "tn", "fn", "hist-pos", "hist-neg"})  # to_record's keys, no others

    def to_record(self) -> dict[str, int | float | list[int]]:
        if len(self.histograms) > 1:
            raise ValueError("pooled statistics of several resolutions are not a site record")
        bins, (pos, neg) = next(iter(self.histograms.items()), (MIN_BINS, (np.zeros((self.num_labels, MIN_BINS)),) * 2))
        return {
            "n": int(self.n), "loss-sum": float(self.loss_sum), "bins": int(bins),
            "tp": self.tp.tolist(), "fp": self.fp.tolist(), "tn": self.tn.tolist(), "fn": self.fn.tolist(),
            "hist-pos": np.asarray(pos, np.int64).ravel().tolist(), "hist-neg": np.asarray(neg, np.int64).ravel().tolist(),
        }

    @classmethod
    def from_record(cls, record: dict, num_labels: int) -> "ClassificationStats":
        """Parse a site's statistics; ValueError when anything is missing, malformed or inconsistent:
        counts must be non-negative integers, the confusion counts of each label must add up to n,
        and each label's histograms must hold exactly its positives (tp + fn) and negatives."""
        n = _count(record["n"], "n")
        bins = _count(record["bins"], "bins")
        if not is_resolution(bins):
            raise ValueError(f"bins must be a power of two in [{MIN_BINS}, {MAX_BINS}]")
        loss_sum = _scalar(record["loss-sum"], "loss-sum")
        # BCE per label is at most -log(1e-7) ~ 16.1 with the clamp every site applies.
        if not 0.0 <= loss_sum <= 16.2 * max(n, 0) * num_labels:
            raise ValueError("loss-sum is negative, not finite or larger than n labels can give")

        def counts(key: str, size: int) -> np.ndarray:
            return _counts(record[key], size, key)
        tp, fp, tn, fn = (counts(k, num_labels) for k in ("tp", "fp", "tn", "fn"))
        pos = counts("hist-pos", num_labels * bins).reshape(num_labels, bins)
        neg = counts("hist-neg", num_labels * bins).reshape(num_labels, bins)
        if np.any(tp + fp + tn + fn != n):
            raise ValueError("confusion counts do not add up to n")
        if np.any(pos.sum(1) != tp + fn) or np.any(neg.sum(1) != fp + tn):
            raise ValueError("histogram totals differ from the positives and negatives in the confusion counts")
        return cls(n, loss_sum, tp, fp, tn, fn, {bins: (pos, neg)} if n else {})


MAX_COUNT = 2 ** 40  # no site has a trillion test studies: larger counts are forged or corrupt


def _scalar(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{key} is not finite")
    return value


def _count(value: object, key: str) -> int:
    number = _scalar(value, key)
    if number < 0 or number % 1 or number > MAX_COUNT:
        raise ValueError(f"{key}: expected a non-negative integer count")
    return int(number)


def _counts(value: object, size: int, key: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise ValueError(f"{key}: expected a list of {size} counts")
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)) or (array < 0).any() or (array % 1).any() or (array > MAX_COUNT).any():
        raise ValueError(f"{key}: expected {size} non-negative integer counts")
    return array.astype(np.int64)


@dataclass(frozen=True)
class AucFigure:
    value: float  # NaN with one class only
    bound: float  # the histogram AUC is within this of the exact pooled AUC


def auc_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(same bin); NaN with one class only."""
    return pooled_auc({len(hist_pos): (hist_pos[None], hist_neg[None])}, 0).value


def pooled_auc(histograms: dict[int, tuple[np.ndarray, np.ndarray]], label: int) -> AucFigure:
    """AUC of one label over histograms of (possibly) several nested resolutions. Each group of
    positives meets each group of negatives on the coarser of the two grids."""
    n_pos = sum(float(p[label].sum()) for p, _ in histograms.values())
    n_neg = sum(float(q[label].sum()) for _, q in histograms.values())
    if n_pos == 0 or n_neg == 0:
        return AucFigure(float("nan"), float("nan"))
    wins = ties = 0.0
    for b_pos, (pos, _) in histograms.items():
        for b_neg, (_, neg) in histograms.items():
            bins = min(b_pos, b_neg)
            p, q = coarsen(pos[label].astype(np.float64), bins), coarsen(neg[label].astype(np.float64), bins)
            below = np.cumsum(q) - q
            wins += float((p * below).sum())
            ties += float((p * q).sum())
    pairs = n_pos * n_neg
    return AucFigure((wins + 0.5 * ties) / pairs, 0.5 * ties / pairs)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def per_label_figures(stats: ClassificationStats) -> dict[str, np.ndarray]:
    """Every classification figure per label, from counts and histograms only.

    Cohen's kappa comes from the confusion counts (observed vs chance agreement): sklearn's
    cohen_kappa_score needs per-study labels, which never leave a site.
    """
    tp, fp, tn, fn = (x.astype(np.float64) for x in (stats.tp, stats.fp, stats.tn, stats.fn))
    n = tp + fp + tn + fn
    sensitivity = np.array([_ratio(a, a + b) for a, b in zip(tp, fn)])
    specificity = np.array([_ratio(a, a + b) for a, b in zip(tn, fp)])
    precision = np.array([_ratio(a, a + b) for a, b in zip(tp, fp)])
    f1 = np.array([_ratio(2 * a, 2 * a + b + c) for a, b, c in zip(tp, fp, fn)])
    accuracy = np.array([_ratio(a + b, m) for a, b, m in zip(tp, tn, n)])
    chance = np.array([_ratio((a + b) * (a + c) + (d + c) * (d + b), m * m) for a, b, c, d, m in zip(tp, fp, fn, tn, n)])
    kappa = np.array([_ratio(o - e, 1 - e) if np.isfinite(e) and e < 1 else float("nan")
                      for o, e in zip(accuracy, chance)])
    auc = np.array([pooled_auc(stats.histograms, j).value for j in range(len(tp))])
    return {"accuracy": accuracy, "auc": auc, "sensitivity": sensitivity, "specificity": specificity,
            "precision": precision, "f1": f1, "kappa": kappa}


def roc_curve_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every bin edge, from high to low threshold."""
    tpr = np.concatenate([[0.0], np.cumsum(hist_pos[::-1]) / max(hist_pos.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(hist_neg[::-1]) / max(hist_neg.sum(), 1)])
    return fpr, tpr


def summarize(stats: ClassificationStats) -> dict[str, float]:
    """Headline figures: mean loss, accuracy and AUC (macro mean over labels)."""
    if stats.n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "auc": float("nan"), "n": 0}
    figures = per_label_figures(stats)
    finite = figures["auc"][np.isfinite(figures["auc"])]
    return {
        "loss": stats.loss_sum / (stats.n * len(stats.tp)),
        "accuracy": float(np.mean(figures["accuracy"])),
        "auc": float(np.mean(finite)) if finite.size else float("nan"),
        "n": int(stats.n),
    }
