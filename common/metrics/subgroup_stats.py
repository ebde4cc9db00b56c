"""Test performance by subgroup (scanner maker, field strength, body part): computed at the site,
sent as sufficient statistics, pooled by the centre.

A site computes a subgroup's statistics only when it holds at least ``min-reported-count`` test
studies (its site policy) *and* the rest of its test split is empty or holds at least as many:
the whole split's statistics are sent anyway, so a small remainder would be one subtraction
away (complementary suppression, as statistical offices apply it to tables).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.data.subgroups import CATEGORIES, SUBGROUP_KINDS
from common.metrics.classification import ClassificationStats, histogram_bins, pooled_auc
from common.metrics.intervals import auc_interval

MIN_COUNT_KEY = "min-reported-count"
SEPARATOR = "|"  # record keys: "<kind>|<category>|<field of ClassificationStats.to_record>"


def subgroup_name(kind: str, category: str) -> str:
    return f"{kind}: {category}"


def site_subgroup_stats(probs: np.ndarray, labels: np.ndarray, subgroups: list[dict[str, str]], threshold: float,
                        eval_bins: int, min_studies_per_bin: int, min_count: int) -> dict[tuple[str, str], ClassificationStats]:
    """(kind, category) -> statistics of the test studies in it, for the subgroups the site may
    report. ``probs``/``labels``: (N, L) of the test split; ``subgroups``: one dict per test study."""
    n = len(probs)
    out: dict[tuple[str, str], ClassificationStats] = {}
    if n == 0 or min_count < 1:
        return out
    probs, labels = np.asarray(probs, np.float64).reshape(n, -1), np.asarray(labels, np.float64).reshape(n, -1)
    for kind in SUBGROUP_KINDS:
        values = np.array([groups.get(kind, "") for groups in subgroups])
        for category in sorted(set(values) - {""}):
            members = values == category
            count, rest = int(members.sum()), int(n - members.sum())
            if count < min_count or 0 < rest < min_count:
                continue
            p, y = probs[members], labels[members]
            clipped = np.clip(p, 1e-7, 1 - 1e-7)
            loss_sum = float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).sum())
            out[(kind, category)] = ClassificationStats.from_predictions(
                p, y, loss_sum, threshold, histogram_bins(count, eval_bins, min_studies_per_bin))
    return out


def to_record(groups: dict[tuple[str, str], ClassificationStats], min_count: int) -> dict[str, Any]:
    record: dict[str, Any] = {MIN_COUNT_KEY: int(min_count)}
    for (kind, category), stats in groups.items():
        record.update({SEPARATOR.join((kind, category, key)): value for key, value in stats.to_record().items()})
    return record


def from_record(record: dict[str, Any], num_labels: int) -> tuple[int, dict[tuple[str, str], ClassificationStats]]:
    """(the site's min-reported-count, its subgroups' statistics); ValueError when a kind or
    category is not in the vocabulary, a subgroup is smaller than the site's own minimum, or any
    statistics are malformed (``ClassificationStats.from_record``)."""
    min_count = record.get(MIN_COUNT_KEY)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"{MIN_COUNT_KEY} must be an integer >= 1")
    fields: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in record.items():
        if key == MIN_COUNT_KEY:
            continue
        parts = key.split(SEPARATOR)
        if len(parts) != 3 or parts[0] not in CATEGORIES or parts[1] not in CATEGORIES[parts[0]]:
            raise ValueError(f"unknown subgroup key {key[:60]!r}")
        fields.setdefault((parts[0], parts[1]), {})[parts[2]] = value
    groups = {}
    for group, values in fields.items():
        unexpected = set(values) - ClassificationStats.RECORD_FIELDS
        if unexpected:
            raise ValueError(f"unexpected subgroup field {sorted(unexpected)[0]!r}")
        stats = ClassificationStats.from_record(values, num_labels)
        if stats.n < min_count:
            raise ValueError(f"subgroup {subgroup_name(*group)} has {stats.n} studies, fewer than the site's "
                             f"own {MIN_COUNT_KEY} {min_count}")
        groups[group] = stats
    return min_count, groups


def pooled_summaries(pooled: dict[tuple[str, str], ClassificationStats], sites: dict[tuple[str, str], set[str]],
                     label_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per subgroup: studies, positives, sites, and each label's AUC with its DeLong interval."""
    out = {}
    for group in sorted(pooled):
        stats = pooled[group]
        entry: dict[str, Any] = {"kind": group[0], "category": group[1], "n": int(stats.n),
                                 "positives": [int(v) for v in stats.tp + stats.fn], "sites": len(sites[group])}
        for label, name in enumerate(label_names):
            interval = auc_interval(stats.histograms, label)
            value = pooled_auc(stats.histograms, label).value if stats.histograms else float("nan")
            auc = {"value": value if np.isfinite(value) else None,
                   "ci95": list(interval.bounds) if interval.bounds else None, "ci_method": interval.method}
            if not np.isfinite(value):
                auc["reason"] = "not available: test studies of one class only"
            elif interval.bounds is None:
                auc["ci_reason"] = interval.reason
            entry["auc" if len(label_names) == 1 else f"auc-{name}"] = auc
        out[subgroup_name(*group)] = entry
    return out
