"""MAE, MSE, RMSE and MAPE (the SSA ResNet50-BiGRU paper's error metrics) from summed errors.

Two bases, both summed at every site:
- ``severity``: the severity head against the continuous ``target`` of studies that have one;
- ``probability``: the predicted injury probability against the 0/1 label (MSE = Brier score).
The catalogue reports the severity basis whenever any site has targets, else the probability
basis, and names the basis it used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ErrorStats:
    n_severity: int = 0
    abs_severity: float = 0.0
    sq_severity: float = 0.0
    n_nonzero: int = 0  # targets != 0, the only ones with a defined percentage error
    ape_severity: float = 0.0
    n_probability: int = 0
    abs_probability: float = 0.0
    sq_probability: float = 0.0

    @classmethod
    def from_predictions(cls, probs: np.ndarray, labels: np.ndarray, severity: np.ndarray | None,
                         targets: np.ndarray) -> "ErrorStats":
        probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
        stats = cls(n_probability=int(probs.size), abs_probability=float(np.abs(probs - labels).sum()),
                    sq_probability=float(((probs - labels) ** 2).sum()))
        targets = np.asarray(targets, np.float64)
        has = np.isfinite(targets)
        if severity is not None and has.any():
            err = np.asarray(severity, np.float64)[has] - targets[has]
            nonzero = targets[has] != 0
            stats.n_severity = int(has.sum())
            stats.abs_severity = float(np.abs(err).sum())
            stats.sq_severity = float((err ** 2).sum())
            stats.n_nonzero = int(nonzero.sum())
            stats.ape_severity = float((np.abs(err[nonzero]) / np.abs(targets[has][nonzero])).sum())
        return stats

    def __add__(self, other: "ErrorStats") -> "ErrorStats":
        return ErrorStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple:
        return (self.n_severity, self.abs_severity, self.sq_severity, self.n_nonzero, self.ape_severity,
                self.n_probability, self.abs_probability, self.sq_probability)

    def to_record(self) -> dict[str, list[float]]:
        return {"err": [float(v) for v in self.as_tuple()]}

    @classmethod
    def from_record(cls, record: dict) -> "ErrorStats":
        value = record["err"]
        if not isinstance(value, list) or len(value) != 8:
            raise ValueError("err: expected a list of 8 sums")
        values = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(values)) or (values < 0).any():
            raise ValueError("err: expected 8 finite non-negative sums")
        counts = values[[0, 3, 5]]
        if (counts % 1).any() or values[3] > values[0]:
            raise ValueError("err: counts must be integers and non-zero targets <= targets")
        # Probabilities and 0/1 labels: each absolute and squared error is at most 1.
        if values[6] > values[5] or values[7] > values[5]:
            raise ValueError("err: probability error sums exceed their count")
        return cls(int(values[0]), values[1], values[2], int(values[3]), values[4], int(values[5]), values[6],
                   values[7])


def error_figures(stats: ErrorStats) -> tuple[dict[str, float | None], str, dict[str, str]]:
    """(values, basis, reasons for values that are not available)."""
    reasons: dict[str, str] = {}
    if stats.n_severity > 0:
        n, abs_sum, sq_sum = stats.n_severity, stats.abs_severity, stats.sq_severity
        basis = f"severity head vs target ({n} studies)"
        if stats.n_nonzero:
            mape = stats.ape_severity / stats.n_nonzero
            basis += f"; MAPE over the {stats.n_nonzero} non-zero targets"
        else:
            mape = None
            reasons["mape"] = "not available: every target is zero"
    elif stats.n_probability > 0:
        n, abs_sum, sq_sum = stats.n_probability, stats.abs_probability, stats.sq_probability
        basis = "injury probability vs 0/1 label (MSE = Brier score)"
        mape = None
        reasons["mape"] = "not available: zero targets (the 0/1 label is 0 for every negative study)"
    else:
        reason = "not available: no test studies"
        return {k: None for k in ("mae", "mse", "rmse", "mape")}, "none", {k: reason for k in ("mae", "mse", "rmse", "mape")}
    mse = sq_sum / n
    return {"mae": abs_sum / n, "mse": mse, "rmse": float(np.sqrt(mse)), "mape": mape}, basis, reasons
