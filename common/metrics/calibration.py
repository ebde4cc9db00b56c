"""Probability calibration and the operating threshold, from pooled score histograms only.

The server never sees a study's score, only per-bin counts of positives and negatives (summed
over sites, possibly at several nested resolutions). That is enough for:

- **Platt scaling**: p' = sigmoid(a * logit(p) + b), fitted by weighted maximum likelihood with
  each bin's centre standing for its studies (a weak pull toward the identity, a = 1 and b = 0,
  keeps the fit finite when the bins separate the classes perfectly);
- **the expected calibration error** (ECE): sum over bins of |positives - n * confidence| / N,
  confidence being the (calibrated) bin centre; with the bins the sites chose, as every binned
  ECE is;
- **the operating threshold**: the highest bin edge at which the pooled sensitivity still reaches
  the target, with the specificity it then has.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from common.metrics.classification import coarsen

Histograms = dict[int, tuple[np.ndarray, np.ndarray]]  # bins -> (positives (L, B), negatives (L, B))
IDENTITY_PULL = 1.0  # in units of studies: negligible against any real test split


@dataclass(frozen=True)
class Calibration:
    a: float = 1.0
    b: float = 0.0
    method: str = "platt"
    note: str = ""

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
        return 1.0 / (1.0 + np.exp(-(self.a * np.log(p / (1 - p)) + self.b)))

    def to_json(self) -> dict:
        return asdict(self)


def _bins(histograms: Histograms, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, positives, negatives) over every resolution present."""
    centres, pos, neg = [], [], []
    for bins, (p, q) in histograms.items():
        centres.append((np.arange(bins) + 0.5) / bins)
        pos.append(np.asarray(p[label], np.float64))
        neg.append(np.asarray(q[label], np.float64))
    return np.concatenate(centres), np.concatenate(pos), np.concatenate(neg)


def fit_platt(histograms: Histograms, label: int = 0) -> Calibration:
    centres, pos, neg = _bins(histograms, label)
    if pos.sum() == 0 or neg.sum() == 0:
        return Calibration(method="identity", note="not fitted: the pooled statistics hold one class only")
    z = np.log(centres / (1 - centres))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta
        s = a * z + b
        # -log sigmoid(s) for positives, -log(1 - sigmoid(s)) for negatives
        nll = (pos * np.logaddexp(0, -s) + neg * np.logaddexp(0, s)).sum()
        g = -pos / (1 + np.exp(s)) + neg / (1 + np.exp(-s))  # d nll / d s
        grad = np.array([(g * z).sum(), g.sum()])
        penalty = IDENTITY_PULL * ((a - 1) ** 2 + b ** 2)
        return float(nll + penalty), grad + IDENTITY_PULL * 2 * np.array([a - 1, b])

    from scipy.optimize import minimize  # here: importing it costs a site process 0.45 s per message

    fitted = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    a, b = (float(v) for v in fitted.x)
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        return Calibration(method="identity", note="not fitted: the fit did not give an increasing map")
    n = int(pos.sum() + neg.sum())
    return Calibration(a, b, "platt", f"Platt scaling fitted on {n} pooled validation studies "
                                      f"({', '.join(map(str, sorted(histograms)))} bins)")


def expected_calibration_error(histograms: Histograms, label: int = 0,
                               calibration: Calibration | None = None) -> float | None:
    centres, pos, neg = _bins(histograms, label)
    n = pos + neg
    if n.sum() == 0:
        return None
    confidence = calibration(centres) if calibration is not None else centres
    return float(np.abs(pos - n * confidence).sum() / n.sum())


@dataclass(frozen=True)
class OperatingPoint:
    target_sensitivity: float
    threshold: float  # on the raw probability (a bin edge)
    calibrated_threshold: float  # the same threshold on the calibrated probability
    sensitivity: float  # reached on the pooled statistics
    specificity: float

    def to_json(self) -> dict:
        return asdict(self)


def operating_point(histograms: Histograms, target_sensitivity: float, label: int = 0,
                    calibration: Calibration | None = None) -> OperatingPoint | None:
    """The highest threshold (an edge of the coarsest bins, which every site's histogram can
    answer) whose pooled sensitivity is at least the target."""
    if not histograms:
        return None
    bins = min(histograms)
    pos = sum(coarsen(np.asarray(p[label], np.float64), bins) for p, _ in histograms.values())
    neg = sum(coarsen(np.asarray(q[label], np.float64), bins) for _, q in histograms.values())
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    # sensitivity and specificity when "positive" means a score in bin k or above
    sensitivity = np.cumsum(pos[::-1])[::-1] / pos.sum()
    specificity = np.concatenate([[0.0], np.cumsum(neg)[:-1]]) / neg.sum()
    reaching = np.flatnonzero(sensitivity >= target_sensitivity - 1e-12)
    k = int(reaching.max()) if reaching.size else 0
    threshold = k / bins
    calibrated = float((calibration or Calibration())(np.array([max(threshold, 1e-7)]))[0])
    return OperatingPoint(target_sensitivity, threshold, calibrated, float(sensitivity[k]), float(specificity[k]))
