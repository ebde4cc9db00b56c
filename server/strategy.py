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
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.exchange import ARRAYS_KEY, METRICS_KEY, STATUS_OK, ParamSpec, UpdateError, check_arrays, \
    message_bytes, site_record
from common.metrics.classification import ClassificationStats, summarize

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened in one round, as the run directory records it."""

    server_round: int
    started: float = field(default_factory=time.time)
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> num-examples, loss, seconds
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> loss, accuracy, auc, n
    global_eval: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {site, phase, reason}
    aggregated: bool = False
    bytes_sent: int = 0  # arrays sent by the sites in this round
    notes: list[str] = field(default_factory=list)

    def reject(self, site: str, phase: str, reason: str) -> None:
        log.warning("round %d: %s reply from %s rejected: %s", self.server_round, phase, site, reason)
        self.rejected.append({"site": site, "phase": phase, "reason": reason})


class ClinicFedAvg(FedAvg):
    """FedAvg weighted by num-examples over validated replies only."""

    def __init__(self, *, spec: dict[str, ParamSpec], backbone_hash: str, num_labels: int, min_sites: int,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0) -> None:
        # Minimums come from our config: Flower's default of 2 would hang a one-site federation
        # and let a round of one site pass when three were required.
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                         arrayrecord_key=ARRAYS_KEY)
        self.spec = spec
        self.backbone_hash = backbone_hash
        self.num_labels = num_labels
        self.min_sites = min_sites
        self.reports: dict[int, RoundReport] = {}

    def report(self, server_round: int) -> RoundReport:
        return self.reports.setdefault(server_round, RoundReport(server_round))

    # ------------------------------------------------------------------ training
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.report(server_round)
        accepted: list[Message] = []
        for msg in replies:
            site = _site_name(msg)
            reason = self._train_problem(msg)
            if reason:
                report.reject(site, "train", reason)
                continue
            metrics = msg.content[METRICS_KEY]
            report.train[site] = {"num-examples": int(metrics["num-examples"]),
                                  "loss": float(metrics["train-loss"]),
                                  "seconds": float(metrics["train-seconds"])}
            report.bytes_sent += message_bytes(msg)
            accepted.append(msg)
        if len(accepted) < self.min_sites:
            report.notes.append(f"only {len(accepted)} valid train replies (min-sites {self.min_sites}): "
                                "global model unchanged")
            log.warning("round %d: %s", server_round, report.notes[-1])
            return None, None
        arrays = aggregate_arrayrecords([m.content for m in accepted], self.weighted_by_key)
        report.aggregated = True
        weights = np.array([report.train[_site_name(m)]["num-examples"] for m in accepted], dtype=float)
        losses = np.array([report.train[_site_name(m)]["loss"] for m in accepted])
        return arrays, MetricRecord({"train-loss": float((weights * losses).sum() / weights.sum())})

    def _train_problem(self, msg: Message) -> str | None:
        problem = _common_problem(msg, self.backbone_hash)
        if problem:
            return problem
        content = msg.content
        if ARRAYS_KEY not in content.array_records or len(content.array_records) != 1:
            return "reply has no parameter record"
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is None or not {"num-examples", "train-loss", "train-seconds"} <= set(metrics.keys()):
            return "reply lacks num-examples/train-loss/train-seconds"
        n = metrics["num-examples"]
        if not isinstance(n, int) or n <= 0:
            return f"num-examples must be a positive integer, got {n!r}"
        if not np.isfinite(float(metrics["train-loss"])):
            return "train-loss is not finite"
        try:
            check_arrays(content[ARRAYS_KEY], self.spec)
        except UpdateError as exc:
            return f"malformed update: {exc}"
        return None

    # ---------------------------------------------------------------- evaluation
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        report = self.report(server_round)
        total = ClassificationStats.empty(self.num_labels)
        for msg in replies:
            site = _site_name(msg)
            problem = _common_problem(msg, self.backbone_hash)
            if problem is None:
                try:
                    stats = ClassificationStats.from_record(dict(msg.content[METRICS_KEY]), self.num_labels)
                except (KeyError, ValueError, TypeError) as exc:
                    problem = f"malformed evaluation statistics: {exc}"
            if problem:
                report.reject(site, "evaluate", problem)
                continue
            total = total + stats
            report.evaluation[site] = summarize(stats)
        if total.n == 0:
            return None
        report.global_eval = summarize(total)
        return MetricRecord({k: float(v) for k, v in report.global_eval.items()})


def _site_name(msg: Message) -> str:
    if msg.has_error():
        return f"node-{msg.metadata.src_node_id}"
    return str(site_record(msg).get("site-name", f"node-{msg.metadata.src_node_id}"))


def _common_problem(msg: Message, backbone_hash: str) -> str | None:
    if msg.has_error():
        return f"site error: {msg.error.reason.splitlines()[0][:200] if msg.error.reason else 'unknown'}"
    site = site_record(msg)
    if site.get("status") != STATUS_OK:
        return f"site reported {site.get('status', 'no status')}: {site.get('reason', 'no reason given')}"
    if site.get("backbone-hash") != backbone_hash:
        return "backbone hash differs from the server's"
    return None
