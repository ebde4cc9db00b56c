"""FedAvg with reply validation and exact aggregation of the sites' evaluation statistics.

Flower's FedAvg raises ``InconsistentMessageReplies`` (uncaught) when one reply differs from the
others, and weight-averages every metric, which is wrong for AUC and counts. Here each reply
is checked on its own; a bad one is excluded with a logged reason and the round goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import AGGREGATIONS
from common.exchange import ARRAYS_KEY, METRICS_KEY, STATUS_BUDGET_EXHAUSTED, STATUS_OK, ParamSpec, UpdateError, check_arrays, \
    payload_bytes, site_record
from common.metrics.catalogue import EvaluationStats, MetricValue, compute_catalogue
from common.metrics.classification import ClassificationStats, roc_curve_from_histograms

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened in one round, as the run directory records it."""

    server_round: int
    started: float = field(default_factory=time.time)
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> num-examples, loss, seconds
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> loss, accuracy, auc, n
    global_eval: dict[str, float] = field(default_factory=dict)  # headline figures (loss, accuracy, auc, n)
    catalogue: dict[str, dict] = field(default_factory=dict)  # every metric: value, aggregation, per site
    rejected: list[dict[str, str]] = field(default_factory=list)  # {site, phase, reason}
    aggregated: bool = False
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> payload bytes sent/received
    roc: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> fpr, tpr (pooled)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> cumulative epsilon, delta, ...
    exhausted: dict[str, float] = field(default_factory=dict)  # site -> epsilon spent; it did not train
    stopped: str | None = None  # why the run ended after this round, when it ended early
    notes: list[str] = field(default_factory=list)

    def count_traffic(self, site: str, sent: int, received: int) -> None:
        entry = self.traffic.setdefault(site, {"sent": 0, "received": 0})
        entry["sent"] += sent  # server -> site
        entry["received"] += received  # site -> server

    def reject(self, site: str, phase: str, reason: str) -> None:
        log.warning("round %d: %s reply from %s rejected: %s", self.server_round, phase, site, reason)
        self.rejected.append({"site": site, "phase": phase, "reason": reason})


class ClinicFedAvg(FedAvg):
    """FedAvg weighted by num-examples over validated replies only; FedMedian (coordinate-wise
    median, as Flower's FedMedian) and trimmed mean (Flower's FedTrimmedAvg) as robust options."""

    def __init__(self, *, spec: dict[str, ParamSpec], backbone_hash: str, label_names: list[str], min_sites: int,
                 fid_dim: int | None = None, fid_extractor: str = "", min_site_cases: int = 10,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0, aggregation: str = "fedavg",
                 trim_fraction: float = 0.2, max_update_norm: float = 0.0) -> None:
        # Minimums come from our config: Flower's default of 2 would hang a one-site federation
        # and let a round of one site pass when three were required.
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                         arrayrecord_key=ARRAYS_KEY)
        self.spec = spec
        self.backbone_hash = backbone_hash
        self.label_names = label_names
        self.num_labels = len(label_names)
        self.min_sites = min_sites
        self.fid_dim = fid_dim  # None: the reconstruction head is off
        self.fid_extractor = fid_extractor
        self.min_site_cases = min_site_cases
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.max_update_norm = max_update_norm  # 0: no bound
        self.reports: dict[int, RoundReport] = {}
        self.epsilon: dict[str, float] = {}  # last cumulative epsilon reported by each site
        self.node_names: dict[int, str] = {}  # node id -> site name, to name a site whose reply is an error
        self._sent_bytes: dict[tuple[int, str], int] = {}
        self._sent_messages: dict[str, list[Message]] = {}
        self._round_start: tuple[int, dict[str, np.ndarray]] | None = None  # (round, model its updates start from)

    def _remember_sent(self, server_round: int, phase: str, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if messages:  # every sampled site gets the same payload
            self._sent_bytes[(server_round, phase)] = payload_bytes(messages[0])
        # The grid sets each message's id when it pushes it; an error reply the SuperLink makes
        # for an unreachable node names only that id, so keep the messages to find the node.
        self._sent_messages[phase] = messages
        return messages

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """The global model this round's updates start from (for the update-norm bound)."""
        self._round_start = (server_round, {k: v.numpy() for k, v in arrays.items()})

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        self.start_round(server_round, arrays)
        return self._remember_sent(server_round, "train", super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[override]
        return self._remember_sent(server_round, "evaluate",
                                   super().configure_evaluate(server_round, arrays, config, grid))

    def report(self, server_round: int) -> RoundReport:
        return self.reports.setdefault(server_round, RoundReport(server_round))

    # ------------------------------------------------------------------ training
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.report(server_round)
        accepted: list[Message] = []
        for msg in replies:
            site = self._site_name(msg)
            report.count_traffic(site, self._sent_bytes.get((server_round, "train"), 0), payload_bytes(msg))
            if not msg.has_error() and site_record(msg).get("status") == STATUS_BUDGET_EXHAUSTED:
                spent = float(site_record(msg).get("dp-epsilon", float("nan")))
                report.exhausted[site] = spent
                self.epsilon[site] = spent
                log.warning("round %d: %s did not train: privacy budget exhausted (epsilon %.3f)", server_round,
                            site, spent)
                continue
            reason = self._train_problem(msg, server_round)
            if reason:
                report.reject(site, "train", reason)
                continue
            metrics = msg.content[METRICS_KEY]
            report.train[site] = {"num-examples": int(metrics["num-examples"]),
                                  "loss": float(metrics["train-loss"]),
                                  "seconds": float(metrics["train-seconds"])}
            if "dp-epsilon" in metrics:
                report.privacy[site] = {key.removeprefix("dp-"): float(metrics[key]) for key in DP_KEYS}
                self.epsilon[site] = report.privacy[site]["epsilon"]
            accepted.append(msg)
        if len(accepted) < self.min_sites:
            report.notes.append(f"only {len(accepted)} valid train replies (min-sites {self.min_sites}): "
                                "global model unchanged")
            log.warning("round %d: %s", server_round, report.notes[-1])
            return None, None
        arrays = self._aggregate([m.content for m in accepted])
        report.aggregated = True
        weights = np.array([report.train[self._site_name(m)]["num-examples"] for m in accepted], dtype=float)
        losses = np.array([report.train[self._site_name(m)]["loss"] for m in accepted])
        return arrays, MetricRecord({"train-loss": float((weights * losses).sum() / weights.sum())})

    def _aggregate(self, contents: list) -> ArrayRecord:
        if self.aggregation == "fedavg":
            return aggregate_arrayrecords(contents, self.weighted_by_key)
        updates = [content[ARRAYS_KEY] for content in contents]
        combined = ArrayRecord()
        for name in updates[0].keys():
            stacked = np.stack([u[name].numpy() for u in updates])
            value = np.median(stacked, axis=0) if self.aggregation == "fedmedian" else trim_mean(stacked,
                                                                                               self.trim_fraction)
            combined[name] = Array(np.asarray(value, dtype=stacked.dtype))
        return combined

    def _site_name(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if msg.has_error():
            for sent in (m for batch in self._sent_messages.values() for m in batch):
                if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    node = sent.metadata.dst_node_id
            return self.node_names.get(node, f"node-{node}")
        name = str(site_record(msg).get("site-name", f"node-{node}"))
        self.node_names.setdefault(node, name)
        return name

    def _train_problem(self, msg: Message, server_round: int = 0) -> str | None:
        problem = _common_problem(msg, self.backbone_hash)
        if problem:
            return problem
        content = msg.content
        if ARRAYS_KEY not in content.array_records or len(content.array_records) != 1:
            return "reply has no parameter record"
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is None or not {"num-examples", "train-loss", "train-seconds"} <= set(metrics.keys()):
            return "reply lacks num-examples/train-loss/train-seconds"
        dp_keys = set(DP_KEYS) & set(metrics.keys())
        if dp_keys and (dp_keys != set(DP_KEYS) or not all(np.isfinite(float(metrics[k])) for k in DP_KEYS)):
            return "incomplete or non-finite privacy report"
        n = metrics["num-examples"]
        if not isinstance(n, int) or n <= 0:
            return f"num-examples must be a positive integer, got {n!r}"
        if not np.isfinite(float(metrics["train-loss"])):
            return "train-loss is not finite"
        try:
            check_arrays(content[ARRAYS_KEY], self.spec)
        except UpdateError as exc:
            return f"malformed update: {exc}"
        start = self._round_start[1] if self._round_start and self._round_start[0] == server_round else None
        if self.max_update_norm > 0 and start is not None:
            norm = float(np.sqrt(sum(float(((content[ARRAYS_KEY][k].numpy().astype(np.float64) - v) ** 2).sum())
                                     for k, v in start.items())))
            if norm > self.max_update_norm:
                return f"update norm {norm:.3g} exceeds max-update-norm {self.max_update_norm:g}"
        return None

    # ---------------------------------------------------------------- evaluation
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum every valid site's statistics and compute the whole catalogue from the sums."""
        report = self.report(server_round)
        total = EvaluationStats.empty(self.num_labels, self.fid_dim)
        per_site: dict[str, dict[str, MetricValue]] = {}
        for msg in replies:
            site = self._site_name(msg)
            report.count_traffic(site, self._sent_bytes.get((server_round, "evaluate"), 0), payload_bytes(msg))
            problem = _common_problem(msg, self.backbone_hash)
            if problem is None:
                try:
                    stats = EvaluationStats.from_record(dict(msg.content[METRICS_KEY]), self.num_labels, self.fid_dim)
                except (KeyError, ValueError, TypeError) as exc:
                    problem = f"malformed evaluation statistics: {exc}"
            if problem:
                report.reject(site, "evaluate", problem)
                continue
            total = total + stats
            # Small sites still count in the global figures; their own figures are not shown.
            if stats.n >= self.min_site_cases:
                per_site[site] = compute_catalogue(stats, self.label_names, self.fid_extractor)
                report.evaluation[site] = {**headline_of(per_site[site]), "n": stats.n}
            else:
                report.evaluation[site] = {"suppressed": f"fewer than {self.min_site_cases} test studies"}
        if total.n == 0:
            return None
        catalogue = compute_catalogue(total, self.label_names, self.fid_extractor)
        for name, value in catalogue.items():
            value.per_site = {site: values[name].value for site, values in per_site.items()}
        report.catalogue = {name: value.to_json(name) for name, value in catalogue.items()}
        report.roc = roc_curves(total.classification, self.label_names)
        report.global_eval = {**headline_of(catalogue), "n": total.n}
        return MetricRecord({k: float(v) for k, v in report.global_eval.items() if v is not None})


def roc_curves(stats: ClassificationStats, label_names: list[str]) -> dict[str, dict[str, list[float]]]:
    """ROC points per label from the pooled histograms, without repeated points."""
    curves = {}
    for label, pos, neg in zip(label_names, stats.hist_pos, stats.hist_neg):
        if pos.sum() == 0 or neg.sum() == 0:
            continue
        fpr, tpr = roc_curve_from_histograms(pos, neg)
        keep = np.concatenate([[True], (np.diff(fpr) != 0) | (np.diff(tpr) != 0)])
        curves[label] = {"fpr": np.round(fpr[keep], 6).tolist(), "tpr": np.round(tpr[keep], 6).tolist()}
    return curves


def headline_of(catalogue: dict[str, MetricValue]) -> dict[str, float | None]:
    return {name: catalogue[name].value for name in ("loss", "accuracy", "auc")}


DP_KEYS = ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-max-grad-norm", "dp-sample-rate", "dp-steps")


def _common_problem(msg: Message, backbone_hash: str) -> str | None:
    if msg.has_error():
        return f"site error: {msg.error.reason.splitlines()[0][:200] if msg.error.reason else 'unknown'}"
    site = site_record(msg)
    if site.get("status") != STATUS_OK:
        return f"site reported {site.get('status', 'no status')}: {site.get('reason', 'no reason given')}"
    if site.get("backbone-hash") != backbone_hash:
        return "backbone hash differs from the server's"
    return None
