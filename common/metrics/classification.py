"""Classification figures from sufficient statistics that sites can sum exactly.

A site never sends per-study predictions. It sends, per label: confusion counts at the decision
threshold and histograms of predicted probabilities for positives and negatives (fine bins),
plus the summed loss. The server adds the statistics of all sites and computes the global
figures from the sums, so they equal the figures on the pooled predictions (AUC up to the bin
width: scores in one bin count as ties, as sklearn counts exact ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AUC_BINS = 2000


@dataclass
class ClassificationStats:
    n: int
    loss_sum: float
    tp: np.ndarray  # (L,)
    fp: np.ndarray
    tn: np.ndarray
    fn: np.ndarray
    hist_pos: np.ndarray  # (L, AUC_BINS) counts of positives' probabilities per bin
    hist_neg: np.ndarray

    @classmethod
    def empty(cls, num_labels: int) -> "ClassificationStats":
        zeros = np.zeros(num_labels, dtype=np.int64)
        hist = np.zeros((num_labels, AUC_BINS), dtype=np.int64)
        return cls(0, 0.0, zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy(), hist.copy(), hist.copy())

    @classmethod
    def from_predictions(cls, probs: np.ndarray, labels: np.ndarray, loss_sum: float,
                         threshold: float = 0.5) -> "ClassificationStats":
        """probs and labels: (N, L), probabilities in [0, 1] and labels in {0, 1}."""
        probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
        labels = np.asarray(labels).reshape(probs.shape).astype(bool)
        predicted = probs >= threshold
        bins = np.clip((probs * AUC_BINS).astype(np.int64), 0, AUC_BINS - 1)
        hist_pos = np.stack([np.bincount(bins[labels[:, j], j], minlength=AUC_BINS) for j in range(probs.shape[1])])
        hist_neg = np.stack([np.bincount(bins[~labels[:, j], j], minlength=AUC_BINS) for j in range(probs.shape[1])])
        return cls(
            n=len(probs),
            loss_sum=float(loss_sum),
            tp=(predicted & labels).sum(0), fp=(predicted & ~labels).sum(0),
            tn=(~predicted & ~labels).sum(0), fn=(~predicted & labels).sum(0),
            hist_pos=hist_pos, hist_neg=hist_neg,
        )

    def __add__(self, other: "ClassificationStats") -> "ClassificationStats":
        return ClassificationStats(
            self.n + other.n, self.loss_sum + other.loss_sum,
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn,
            self.hist_pos + other.hist_pos, self.hist_neg + other.hist_neg,
        )

    # --- wire format: flat keys whose values Flower's MetricRecord accepts (int, float, lists) ---
    def to_record(self) -> dict[str, int | float | list[int]]:
        return {
            "n": int(self.n), "loss-sum": float(self.loss_sum),
            "tp": self.tp.tolist(), "fp": self.fp.tolist(), "tn": self.tn.tolist(), "fn": self.fn.tolist(),
            "hist-pos": self.hist_pos.ravel().tolist(), "hist-neg": self.hist_neg.ravel().tolist(),
        }

    @classmethod
    def from_record(cls, record: dict, num_labels: int) -> "ClassificationStats":
        """Parse a site's statistics; raises ValueError when anything is missing or malformed."""
        def counts(key: str, size: int) -> np.ndarray:
            value = np.asarray(record[key], dtype=np.float64).ravel()
            if value.size != size or not np.all(np.isfinite(value)) or (value < 0).any() or (value % 1).any():
                raise ValueError(f"{key}: expected {size} non-negative integer counts")
            return value.astype(np.int64)
        n = int(record["n"])
        loss_sum = float(record["loss-sum"])
        if not np.isfinite(loss_sum):
            raise ValueError("loss-sum is not finite")
        stats = cls(
            n, loss_sum,
            counts("tp", num_labels), counts("fp", num_labels), counts("tn", num_labels), counts("fn", num_labels),
            counts("hist-pos", num_labels * AUC_BINS).reshape(num_labels, AUC_BINS),
            counts("hist-neg", num_labels * AUC_BINS).reshape(num_labels, AUC_BINS),
        )
        if np.any(stats.tp + stats.fp + stats.tn + stats.fn != n):
            raise ValueError("confusion counts do not add up to n")
        return stats


def auc_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(same bin); NaN with one class only."""
    n_pos, n_neg = hist_pos.sum(), hist_neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(hist_neg) - hist_neg
    return float((hist_pos * (neg_below + 0.5 * hist_neg)).sum() / (n_pos * n_neg))


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
    auc = np.array([auc_from_histograms(p, q) for p, q in zip(stats.hist_pos, stats.hist_neg)])
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
