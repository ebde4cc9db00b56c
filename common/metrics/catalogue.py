"""The metric catalogue: one registry, one name per metric, and the sufficient statistics a site
sends for it.

    site:   EvaluationStats.from_predictions(...)  ->  .to_record()   (MetricRecord-ready)
    server: sum of EvaluationStats.from_record(...) ->  compute_catalogue(...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.metrics.calibration import expected_calibration_error
from common.metrics.classification import ClassificationStats, per_label_figures, pooled_auc
from common.metrics.errors import ErrorStats, error_figures
from common.metrics.images import ImageStats, InceptionStats, frechet_distance, safe_mean
from common.metrics.intervals import LEVEL, Interval, auc_interval, error_intervals, proportion_intervals

# How a global figure is formed from the sites' statistics.
POOLED_COUNTS = "exact: summed confusion counts"
POOLED_HISTOGRAM = "exact up to bin width: summed score histograms"
POOLED_SUMS = "exact: summed per-study/per-image values and counts"
POOLED_MOMENTS = "exact: summed n, sum and outer products of features"
POOLED_DISTRIBUTION = "exact: summed p(y|x) and p log p"
MAX_OVER_SITES = "maximum over sites"
PER_SITE = "per site (not pooled)"
SERVER_MEASURED = "measured at the server"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    group: str
    aggregation: str
    unit: str = ""
    higher_is_better: bool | None = None


_SPECS = [
    MetricSpec("loss", "classification", POOLED_SUMS, "BCE", False),
    MetricSpec("accuracy", "classification", POOLED_COUNTS, "", True),
    MetricSpec("auc", "classification", POOLED_HISTOGRAM, "", True),
    MetricSpec("sensitivity", "classification", POOLED_COUNTS, "", True),
    MetricSpec("specificity", "classification", POOLED_COUNTS, "", True),
    MetricSpec("precision", "classification", POOLED_COUNTS, "", True),
    MetricSpec("f1", "classification", POOLED_COUNTS, "", True),
    MetricSpec("kappa", "classification", POOLED_COUNTS, "", True),
    MetricSpec("ece", "classification", POOLED_HISTOGRAM, "", False),
    MetricSpec("mae", "error", POOLED_SUMS, "", False),
    MetricSpec("mse", "error", POOLED_SUMS, "", False),
    MetricSpec("rmse", "error", POOLED_SUMS, "", False),
    MetricSpec("mape", "error", POOLED_SUMS, "fraction", False),
    MetricSpec("psnr", "image", POOLED_SUMS, "dB", True),
    MetricSpec("ssim", "image", POOLED_SUMS, "", True),
    MetricSpec("fid", "image", POOLED_MOMENTS, "", False),
    MetricSpec("is", "image", POOLED_DISTRIBUTION, "", True),
    MetricSpec("params_total_m", "efficiency", SERVER_MEASURED, "M"),
    MetricSpec("params_trainable_m", "efficiency", SERVER_MEASURED, "M"),
    MetricSpec("gflops_per_study", "efficiency", SERVER_MEASURED, "GFLOP"),
    MetricSpec("inference_ms_per_study", "efficiency", SERVER_MEASURED, "ms", False),
    MetricSpec("train_seconds", "efficiency", PER_SITE, "s", False),
    MetricSpec("bytes_sent", "efficiency", PER_SITE, "B", False),
    MetricSpec("bytes_received", "efficiency", PER_SITE, "B", False),
    MetricSpec("epsilon", "privacy", MAX_OVER_SITES, "", False),
]
REGISTRY: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
# The keys of a site's evaluation record (the image keys only with the reconstruction head).
RECORD_KEYS = {"n", "loss-sum", "bins", "tp", "fp", "tn", "fn", "hist-pos", "hist-neg", "err", "is"}
IMAGE_KEYS = {"img", "fid-real", "fid-fake"}
FID_NOT_THIS_ROUND = "not computed in this round (fid-every: FID at round 0, every fid-every rounds and the last round)"
assert len(REGISTRY) == len(_SPECS), "one name per metric"


@dataclass
class MetricValue:
    value: float | None
    reason: str | None = None  # why the value is not available
    per_label: dict[str, float | None] | None = None
    note: str | None = None  # basis, extractor, device ...
    per_site: dict[str, float | None] = field(default_factory=dict)
    error_bound: float | None = None  # the value is within this of the exact figure (e.g. AUC from bins)
    # The LEVEL confidence interval (common/metrics/intervals.py), its method, or why there is none.
    interval: tuple[float, float] | None = None
    interval_method: str | None = None
    interval_reason: str | None = None
    per_label_interval: dict[str, tuple[float, float] | None] | None = None
    per_site_interval: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    per_site_interval_reason: dict[str, str] = field(default_factory=dict)  # site -> why it has none

    def to_json(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "aggregation": REGISTRY[name].aggregation}
        for key in ("reason", "per_label", "note", "error_bound"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.per_site:
            out["per_site"] = self.per_site
        if self.interval is not None:
            out[CI_KEY] = list(self.interval)
        if self.interval_method is not None:
            out["ci_method"] = self.interval_method
        if self.interval_reason is not None:
            out["ci_reason"] = self.interval_reason
        if self.per_label_interval is not None:
            out[f"per_label_{CI_KEY}"] = _bounds_json(self.per_label_interval)
        if any(bounds is not None for bounds in self.per_site_interval.values()):
            out[f"per_site_{CI_KEY}"] = _bounds_json(self.per_site_interval)
        if self.per_site_interval_reason:
            out["per_site_ci_reason"] = self.per_site_interval_reason
        return out

    def set_interval(self, interval: Interval) -> None:
        self.interval, self.interval_method, self.interval_reason = interval.bounds, interval.method, interval.reason


CI_KEY = f"ci{round(LEVEL * 100)}"  # "ci95": [low, high] in a figure's JSON


def _bounds_json(intervals: dict[str, tuple[float, float] | None]) -> dict[str, list[float] | None]:
    return {key: None if bounds is None else list(bounds) for key, bounds in intervals.items()}


def interval_of(entry: dict[str, Any] | None, site: str | None = None,
                label: str | None = None) -> tuple[float, float] | None:
    """A figure's interval from its JSON form: its own, a site's (``site``) or a label's
    (``label``); None where there is none."""
    entry = entry or {}
    if site is not None:
        bounds = (entry.get(f"per_site_{CI_KEY}") or {}).get(site)
    elif label is not None:
        bounds = (entry.get(f"per_label_{CI_KEY}") or {}).get(label)
    else:
        bounds = entry.get(CI_KEY)
    return (float(bounds[0]), float(bounds[1])) if isinstance(bounds, (list, tuple)) and len(bounds) == 2 else None


def not_available(reason: str) -> MetricValue:
    return MetricValue(None, reason=f"not available: {reason}" if not reason.startswith("not available") else reason)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


@dataclass
class EvaluationStats:
    """Everything one site (or the sum of several) contributes to the catalogue."""

    classification: ClassificationStats
    errors: ErrorStats
    images: ImageStats | None  # None: the reconstruction head is disabled
    inception: InceptionStats

    def __add__(self, other: "EvaluationStats") -> "EvaluationStats":
        if (self.images is None) != (other.images is None):
            raise ValueError("sites disagree on the reconstruction head")
        return EvaluationStats(self.classification + other.classification, self.errors + other.errors,
                               None if self.images is None else self.images + other.images,
                               self.inception + other.inception)

    @property
    def n(self) -> int:
        return self.classification.n

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {**self.classification.to_record(), **self.errors.to_record(),
                                  **self.inception.to_record()}
        if self.images is not None:
            record.update(self.images.to_record())
        return record

    @classmethod
    def from_record(cls, record: dict, num_labels: int, fid_dim: int | None, with_fid: bool = True,
                    image_sample: int = 0, images_per_study: int | None = None) -> "EvaluationStats":
        """A site's statistics, checked on their own and against each other; ValueError says what
        is wrong. fid_dim None: the reconstruction head is off and no image statistics are expected;
        ``with_fid``: whether the round asked for FID moments (``fid-every``). ``image_sample`` and
        ``images_per_study`` (the run's image-metrics-sample and seq-len): the image count a site
        claims for PSNR/SSIM/FID must be what its test studies allow, so that no site can weigh
        more in the pooled image metrics than its sample."""
        if fid_dim is None and any(key in record for key in IMAGE_KEYS):
            raise ValueError("image statistics sent but the reconstruction head is disabled")
        unexpected = sorted(set(record) - RECORD_KEYS - IMAGE_KEYS - {"num-examples"})
        if unexpected:
            raise ValueError(f"unexpected statistics: {', '.join(unexpected[:5])}")
        images = ImageStats.from_record(record, fid_dim, with_fid) if fid_dim is not None else None
        stats = cls(ClassificationStats.from_record(record, num_labels), ErrorStats.from_record(record), images,
                    InceptionStats.from_record(record, num_labels))
        n = stats.n
        if stats.inception.n != n or stats.errors.n_probability != n * num_labels or stats.errors.n_severity > n:
            raise ValueError("the statistics disagree on the number of test studies")
        if record.get("num-examples", n) != n:
            raise ValueError("num-examples differs from n")
        if images is not None and images_per_study is not None:
            low, high = image_count_range(n, image_sample, images_per_study)
            if not low <= images.n_images <= high:
                raise ValueError(f"{images.n_images} images claimed for the image metrics; {n} test studies of at "
                                 f"most {images_per_study} images with image-metrics-sample {image_sample} give "
                                 f"{low}..{high}")
        return stats

    @classmethod
    def empty(cls, num_labels: int, fid_dim: int | None, with_fid: bool = True) -> "EvaluationStats":
        return cls(ClassificationStats.empty(num_labels), ErrorStats(),
                   None if fid_dim is None else ImageStats.empty(fid_dim, with_fid), InceptionStats.empty(num_labels))


def image_count_range(n_studies: int, image_sample: int, images_per_study: int) -> tuple[int, int]:
    """The images a site's test split gives the image metrics (``common.inference.image_sample``):
    every real image (at least one and at most ``images_per_study`` per study), or an evenly spaced
    sample of ``image_sample`` of them when there are more."""
    low, high = n_studies, n_studies * images_per_study
    if image_sample:
        low, high = min(low, image_sample), min(high, image_sample)
    return low, high


def compute_catalogue(stats: EvaluationStats, label_names: list[str], fid_extractor: str = "") -> dict[str, MetricValue]:
    """Every evaluation figure of the catalogue from (summed) statistics: classification, error,
    image and inception-score figures, in that order. The server adds the efficiency and privacy
    figures (server/evaluation.py, server/runs.py)."""
    return {**_classification_figures(stats.classification, label_names),
            **_error_metric_figures(stats.errors, len(label_names)),
            **_image_figures(stats.images, fid_extractor), "is": _inception_score(stats.inception, label_names)}


_CLASSIFICATION_FIGURES = ("loss", "accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "kappa", "ece")


def validation_catalogue(stats: ClassificationStats, label_names: list[str]) -> dict[str, MetricValue]:
    """The classification figures (loss, the confusion-count figures, AUC, ECE) of (summed)
    validation statistics: what the centre chooses the round by. A site sends only classification
    statistics of its validation split, so there are no error, image or inception figures."""
    figures = _classification_figures(stats, label_names, split="validation")
    if stats.n:
        figures["loss"].note = f"mean BCE of {stats.n} validation studies"
    return figures


def _classification_figures(stats: ClassificationStats, label_names: list[str],
                            split: str = "test") -> dict[str, MetricValue]:
    """Loss, the per-label figures from confusion counts and histograms (macro means), and ECE.
    ``split`` names the studies in the reasons a figure is not available."""
    if stats.n == 0:
        return {name: not_available(f"no {split} studies") for name in _CLASSIFICATION_FIGURES}
    out = {"loss": MetricValue(_finite(stats.loss_sum / (stats.n * len(label_names))))}
    out.update(_per_label_means(stats, label_names, split))
    _set_classification_intervals(out, stats, label_names)
    if out["auc"].value is not None:
        _note_auc_bound(out["auc"], stats, len(label_names))
    out["ece"] = _calibration_error(stats, len(label_names), split)
    return out


def _per_label_means(stats: ClassificationStats, label_names: list[str], split: str = "test") -> dict[str, MetricValue]:
    """Each per-label figure as the mean over the labels where it is defined."""
    out: dict[str, MetricValue] = {}
    for name, values in per_label_figures(stats).items():
        per_label = {label: _finite(v) for label, v in zip(label_names, values)}
        finite = [v for v in per_label.values() if v is not None]
        if finite:
            out[name] = MetricValue(float(np.mean(finite)), per_label=per_label if len(label_names) > 1 else None,
                                    note="macro mean over labels" if len(label_names) > 1 else None)
        else:
            out[name] = not_available(_why_undefined(name, split))
    return out


_INTERVAL_FIGURES = ("accuracy", "auc", "sensitivity", "specificity", "precision")
MACRO_MEAN_WITHOUT_INTERVAL = ("not available: the macro mean over labels has no interval (its labels' figures come "
                               "from the same studies, and the sites send no joint counts of labels); see per_label_"
                               f"{CI_KEY}")


def _set_classification_intervals(out: dict[str, MetricValue], stats: ClassificationStats,
                                   label_names: list[str]) -> None:
    """Each label's interval of AUC (DeLong) and of the proportions (Wilson): one label's is the
    figure's own; with several labels they are per label, and the macro mean has none."""
    per_label = [{"auc": auc_interval(stats.histograms, j), **proportion_intervals(stats, j)}
                 for j in range(len(label_names))]
    for name in _INTERVAL_FIGURES:
        figure = out[name]
        if figure.value is None:
            continue
        intervals = [label_intervals[name] for label_intervals in per_label]
        if len(label_names) == 1:
            figure.set_interval(intervals[0])
            continue
        defined = {label: interval for label, interval in zip(label_names, intervals)
                   if (figure.per_label or {}).get(label) is not None}
        figure.interval_method = intervals[0].method
        figure.per_label_interval = {label: defined[label].bounds if label in defined else None
                                     for label in label_names}
        missing = [f"{label}: {interval.reason}" for label, interval in defined.items() if interval.bounds is None]
        figure.interval_reason = "; ".join([MACRO_MEAN_WITHOUT_INTERVAL, *missing])


def _note_auc_bound(auc: MetricValue, stats: ClassificationStats, num_labels: int) -> None:
    """How far the histogram AUC can be from the exact pooled AUC (score pairs sharing a bin)."""
    bounds = [pooled_auc(stats.histograms, j).bound for j in range(num_labels)]
    bound = max(b for b in bounds if np.isfinite(b))
    resolutions = ", ".join(str(b) for b in sorted(stats.histograms))
    auc.error_bound = bound
    auc.note = "; ".join(filter(None, [
        auc.note, f"histogram AUC, within {bound:.4f} of the exact pooled AUC "
                  f"(score pairs sharing a bin; bins per site: {resolutions})"]))


def _calibration_error(stats: ClassificationStats, num_labels: int, split: str = "test") -> MetricValue:
    errors = [e for e in (expected_calibration_error(stats.histograms, j) for j in range(num_labels)) if e is not None]
    if not errors:
        return not_available(f"no {split} studies")
    return MetricValue(float(np.mean(errors)), note="expected calibration error of the raw probabilities, "
                       "binned at the sites' histogram resolutions (bin centre as confidence)")


def _error_metric_figures(stats: ErrorStats, num_labels: int) -> dict[str, MetricValue]:
    """MAE, MSE, RMSE and MAPE, of the severity head where there are targets, else of the
    probability, with MAE's interval (the others' need moments the sites do not send)."""
    values, basis, reasons = error_figures(stats)
    out = {name: MetricValue(_finite(value), note=basis) if name not in reasons else not_available(reasons[name])
           for name, value in values.items()}
    for name, interval in error_intervals(stats, num_labels).items():
        if out[name].value is not None:
            out[name].set_interval(interval)
    return out


_RECONSTRUCTION_FIGURES = ("psnr", "ssim", "fid")


def _image_figures(images: ImageStats | None, fid_extractor: str) -> dict[str, MetricValue]:
    """PSNR and SSIM of the reconstructions, and FID between real and reconstructed images."""
    if images is None:
        return {name: not_available("reconstruction head disabled") for name in _RECONSTRUCTION_FIGURES}
    if images.n_images == 0:
        return {name: not_available("no test images") for name in _RECONSTRUCTION_FIGURES}
    return {"psnr": MetricValue(safe_mean(images.psnr_sum, images.n_images),
                                note="input vs reconstruction, data range 1"),
            "ssim": MetricValue(safe_mean(images.ssim_sum, images.n_images),
                                note="Wang et al. 2004: Gaussian 11x11, sigma 1.5, data range 1"),
            "fid": _frechet_inception_distance(images, fid_extractor)}


def _frechet_inception_distance(images: ImageStats, fid_extractor: str) -> MetricValue:
    if not images.with_fid:
        return not_available(FID_NOT_THIS_ROUND)
    if min(images.real.n, images.fake.n) < 2:
        return not_available("fewer than 2 images")
    try:
        fid = _finite(frechet_distance(images.real, images.fake))
    except (ValueError, np.linalg.LinAlgError) as exc:  # degenerate covariances
        return not_available(f"the Frechet distance could not be computed ({type(exc).__name__})")
    return MetricValue(fid, note=f"real vs reconstructed; extractor: {fid_extractor} "
                                 "(values comparable only within one extractor)")


def _inception_score(inception: InceptionStats, label_names: list[str]) -> MetricValue:
    if inception.n == 0:
        return not_available("no test studies")
    scores = inception.scores()
    per_label = {label: _finite(v) for label, v in zip(label_names, scores)}
    return MetricValue(float(np.nanmean(scores)), per_label=per_label if len(label_names) > 1 else None,
                       note="predicted injury distribution [1-p, p]; range 1..2 per label")


def _why_undefined(name: str, split: str = "test") -> str:
    return {
        "auc": f"{split} studies of one class only",
        "sensitivity": f"no positive {split} studies",
        "specificity": f"no negative {split} studies",
        "precision": "no positive predictions",
        "kappa": "chance agreement is 1",
    }.get(name, "undefined for these counts")


def headline(catalogue: dict[str, Any]) -> dict[str, float | None]:
    """name -> value from either MetricValue objects or their JSON form."""
    return {k: (v.value if isinstance(v, MetricValue) else (v or {}).get("value")) for k, v in catalogue.items()}
