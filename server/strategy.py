"""FedAvg with reply validation and exact aggregation of the sites' evaluation statistics.

Flower's FedAvg raises ``InconsistentMessageReplies`` (uncaught) when one reply differs from the
others, and weight-averages every metric, which is wrong for AUC and counts. Here each reply
is checked on its own (``server/reply_checks.py``); a bad one is excluded with a logged reason
and the round goes on. No
reply, however malformed, can raise out of the aggregation: whatever a check did not foresee is
caught per reply and rejected with the exception's type.

Replies are filed under the site their authenticated node id belongs to (``server/identities.py``),
never under the name a reply reports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from common.exchange import ARRAYS_KEY, EVALUATE_FIRST_KEY, EVALUATION_KEY, FID_KEY, GLOBAL_DIGEST_KEY, \
    GLOBAL_NOT_HELD, METRICS_KEY, STATUS_BUDGET_EXHAUSTED, payload_bytes, site_record
from common.metrics.catalogue import EvaluationStats, MetricValue, compute_catalogue, validation_catalogue
from common.metrics.classification import ClassificationStats, roc_curve_from_histograms
from common.metrics.subgroup_stats import pooled_summaries
from server.held_models import HeldModels
from server.identities import SiteIdentities
from server.reply_checks import DP_KEYS, EvaluationLayout, ReplyValidator, is_scalar
from server.strategy_config import StrategyConfig
from server.traffic import TrafficLedger

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
    # the sites' pooled validation figures (loss, AUC, ...): what chooses the round and calibrates
    validation: dict[str, dict] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {site, phase, reason}
    mismatches: list[dict[str, str]] = field(default_factory=list)  # {site, phase, reason}: identity claims
    aggregated: bool = False
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> payload bytes sent/received
    roc: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> fpr, tpr (pooled)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> cumulative epsilon, delta, ...
    exhausted: dict[str, float] = field(default_factory=dict)  # site -> epsilon spent; it did not train
    stopped: str | None = None  # why the run ended after this round, when it ended early
    secure_aggregation: dict = field(default_factory=dict)  # SecAgg+: sites, shares, dropped, error bound
    # "kind: category" -> pooled test studies, positives, sites, AUC with its interval (sites' subgroups)
    subgroups: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count_traffic(self, site: str, sent: int, received: int) -> None:
        entry = self.traffic.setdefault(site, {"sent": 0, "received": 0})
        entry["sent"] += sent  # server -> site
        entry["received"] += received  # site -> server

    def reject(self, site: str, phase: str, reason: str) -> None:
        log.warning("round %d: %s reply from %s rejected: %s", self.server_round, phase, site, reason)
        self.rejected.append({"site": site, "phase": phase, "reason": reason})

    def mismatch(self, site: str, phase: str, reason: str) -> None:
        log.warning("round %d: %s reply filed under %s: %s", self.server_round, phase, site, reason)
        self.mismatches.append({"site": site, "phase": phase, "reason": reason})


class ClinicFedAvg(FedAvg):
    """FedAvg weighted by num-examples over validated replies only; FedMedian (coordinate-wise
    median, as Flower's FedMedian) and trimmed mean (Flower's FedTrimmedAvg) as robust options.

    Its parts: ``validator`` checks each reply (server/reply_checks.py), ``traffic`` keeps what
    was sent (server/traffic.py), ``held`` knows which site holds which global model
    (server/held_models.py). The strategy files each reply under its site and aggregates."""

    def __init__(self, settings: StrategyConfig, identities: SiteIdentities | None = None,
                 **flower_kwargs: object) -> None:  # flower_kwargs: a Flower subclass's own (FedProx's mu)
        # Minimums come from our config: Flower's default of 2 would hang a one-site federation
        # and let a round of one site pass when three were required.
        super().__init__(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                         min_train_nodes=settings.min_sites, min_evaluate_nodes=settings.min_sites,
                         min_available_nodes=settings.min_sites, arrayrecord_key=ARRAYS_KEY, **flower_kwargs)
        self.settings = settings
        self.identities = identities or SiteIdentities()
        self.traffic = TrafficLedger()
        self.held = HeldModels(settings.wire_dtype, settings.wire_compression)
        self.validator = ReplyValidator(
            settings.spec, settings.backbone_hash, self.identities, self.traffic.node_of,
            EvaluationLayout(len(settings.label_names), settings.fid_dim, settings.image_sample,
                             settings.images_per_study),
            wire_dtype=settings.wire_dtype, max_update_norm=settings.max_update_norm,
            control_variates=settings.aggregation == "scaffold")
        self.reports: dict[int, RoundReport] = {}
        self.pooled: dict[int, EvaluationStats] = {}  # round -> summed test statistics (reported only)
        # round -> summed validation statistics (best round, early stopping, calibration, threshold)
        self.pooled_validation: dict[int, ClassificationStats] = {}
        self.epsilon: dict[str, float] = {}  # last cumulative epsilon reported by each site
        # SCAFFOLD: round -> site -> its accepted control variate update (server/scaffold.py takes them)
        self.control_deltas: dict[int, dict[str, dict[str, np.ndarray]]] = {}

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        """Train messages. With ``evaluate-first`` each carries the model, which the site scores
        (as round server_round - 1's evaluation) before it trains from it; the bytes sent are
        counted as that evaluation's, as a separate evaluation message's would be."""
        self.validator.start_round(server_round, arrays)
        wire, digest = self.held.wire(arrays)
        messages = list(super().configure_train(server_round, wire, config, grid))
        if config.get(EVALUATE_FIRST_KEY, False):
            self.validator.expect_fid(server_round - 1, bool(config.get(FID_KEY, True)))
            return self.traffic.remember_sent(server_round, "train", messages,
                                              counted_as=(server_round - 1, "evaluate"))
        for msg in messages:
            if self.held.holds(msg.metadata.dst_node_id, digest):
                by_digest = ConfigRecord(dict(msg.content[self.configrecord_key]))
                by_digest[GLOBAL_DIGEST_KEY] = digest
                msg.content = RecordDict({self.configrecord_key: by_digest})
        return self.traffic.remember_sent(server_round, "train", messages)

    def resend_in_full(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> list[Message]:
        """Train messages with the model itself for the sites that answered a by-digest message
        with ``global-model-not-held`` (a restarted site, say); the caller sends them."""
        resend = []
        for reply in replies:
            record = site_record(reply) if not reply.has_error() else ConfigRecord()
            if record.get("reason") != GLOBAL_NOT_HELD:
                continue
            node = reply.metadata.src_node_id
            self.held.forget(node)
            sent = next((m for m in reversed(self.traffic.sent_to("train", node))
                         if self.configrecord_key in m.content.config_records), None)
            if sent is None:
                continue
            config = ConfigRecord({k: v for k, v in sent.content[self.configrecord_key].items()
                                   if k != GLOBAL_DIGEST_KEY})
            resend.append(Message(RecordDict({self.arrayrecord_key: self.held.wire(arrays)[0],
                                              self.configrecord_key: config}),
                                  dst_node_id=node, message_type=MessageType.TRAIN))
        if resend:
            log.info("round %d: %d site(s) did not hold the global model; sent it in full", server_round, len(resend))
        return self.traffic.remember_sent(server_round, "train", resend, append=True)

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[override]
        wire, digest = self.held.wire(arrays)
        self.held.sent_to_evaluate(server_round, digest)
        self.validator.expect_fid(server_round, bool(config.get(FID_KEY, True)))
        return self.traffic.remember_sent(server_round, "evaluate", super().configure_evaluate(
            server_round, wire, config, grid))

    def report(self, server_round: int) -> RoundReport:
        return self.reports.setdefault(server_round, RoundReport(server_round))

    def site_of(self, msg: Message, phase: str, report: RoundReport) -> str:
        """The site a reply is filed under: its node's name, whatever the reply claims."""
        node = self.traffic.node_of(msg)
        claimed = None
        if not msg.has_error():
            value = site_record(msg).get("site-name")
            claimed = value if isinstance(value, str) else repr(value)
        identity = self.identities.resolve(node, claimed)
        if identity.mismatch:
            report.mismatch(identity.name, phase, identity.mismatch)
        return identity.name

    # ------------------------------------------------------------------ training
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.report(server_round)
        accepted: list[tuple[str, dict[str, np.ndarray], int]] = []  # (site, update, num-examples)
        for msg in replies:
            site = self.site_of(msg, "train", report)
            try:
                report.count_traffic(site, self.traffic.sent_bytes(server_round, "train", self.traffic.node_of(msg)),
                                     payload_bytes(msg))
                taken = self.take_train_reply(server_round, site, msg, report)
            except Exception as exc:  # noqa: BLE001 - no reply may end the run; the checks missed this one
                taken, reason = None, f"malformed reply ({type(exc).__name__})"
                report.reject(site, "train", reason)
            if taken is not None:
                accepted.append((site, taken, report.train[site]["num-examples"]))
        self.validator.end_round()
        if len(accepted) < self.settings.min_sites:
            report.notes.append(f"only {len(accepted)} valid train replies (min-sites {self.settings.min_sites}): "
                                "global model unchanged")
            log.warning("round %d: %s", server_round, report.notes[-1])
            return None, None
        accepted.sort(key=lambda item: item[0])  # by site, not by arrival: the same sum in every run
        arrays = combine_updates([values for _, values, _ in accepted], [n for _, _, n in accepted],
                                 self.settings.aggregation, self.settings.trim_fraction)
        if arrays is None:
            report.notes.append("the aggregate is not finite in float32: global model unchanged")
            log.warning("round %d: %s", server_round, report.notes[-1])
            return None, None
        report.aggregated = True
        weights = np.array([n for _, _, n in accepted], dtype=float)
        losses = np.array([report.train[site]["loss"] for site, _, _ in accepted])
        return arrays, MetricRecord({"train-loss": float((weights * losses).sum() / weights.sum())})

    def take_train_reply(self, server_round: int, site: str, msg: Message, report: RoundReport,
                         masked: bool = False) -> dict[str, np.ndarray] | None:
        """The reply's checked update, or None (rejected, or a site out of privacy budget).
        ``masked``: a secure-aggregation reply, whose update only the protocol can check ({})."""
        if not msg.has_error() and site_record(msg).get("status") == STATUS_BUDGET_EXHAUSTED:
            spent = _number(site_record(msg).get("dp-epsilon"))
            report.exhausted[site] = spent
            self.epsilon[site] = spent
            log.warning("round %d: %s did not train: privacy budget exhausted (epsilon %.3f)", server_round,
                        site, spent)
            return None
        problem, values = self.validator.train_update(msg, server_round, masked)
        if not problem and self.settings.aggregation == "scaffold":
            problem, delta = self.validator.control_delta(msg)
            if not problem:
                self.control_deltas.setdefault(server_round, {})[site] = delta
        if problem:
            report.reject(site, "train", problem)
            return None
        metrics = msg.content[METRICS_KEY]
        report.train[site] = {"num-examples": int(metrics["num-examples"]),
                              "loss": float(metrics["train-loss"]),
                              "seconds": float(metrics["train-seconds"])}
        if "dp-epsilon" in metrics:
            report.privacy[site] = {key.removeprefix("dp-"): float(metrics[key]) for key in DP_KEYS}
            self.epsilon[site] = report.privacy[site]["epsilon"]
        return values

    # ---------------------------------------------------------------- evaluation
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           within_training: bool = False) -> MetricRecord | None:
        """Sum every valid site's statistics and compute the whole catalogue from the sums, and the
        validation figures from the sums of the sites' validation statistics (a reply counts for
        both or for neither). ``within_training``: the replies are round server_round + 1's training
        replies, whose ``evaluation`` record holds the test statistics (their bytes are counted by
        aggregate_train)."""
        report = self.report(server_round)
        total = self.validator.layout.empty(self.validator.fid_expected(server_round))
        validation = ClassificationStats.empty(self.validator.layout.num_labels)
        subgroups: dict[tuple[str, str], ClassificationStats] = {}
        subgroup_sites: dict[tuple[str, str], set[str]] = {}
        per_site: dict[str, dict[str, MetricValue]] = {}
        key = EVALUATION_KEY if within_training else METRICS_KEY
        for msg in replies:
            site = self.site_of(msg, "evaluate", report)
            node = self.traffic.node_of(msg)
            self.held.forget(node)
            try:
                report.count_traffic(site, self.traffic.sent_bytes(server_round, "evaluate", node),
                                     0 if within_training else payload_bytes(msg))
                problem = self.validator.reply_problem(msg)
                if problem is None:
                    if site in report.evaluation:
                        raise ValueError("a second evaluation reply from the same site in one round")
                    problem, stats = self.validator.evaluation_stats(msg, server_round, key)
                if problem is None:
                    problem, site_validation = self.validator.validation_stats(msg)
                if problem is None:
                    problem, (min_count, site_groups) = self.validator.subgroup_stats(msg)
            except Exception as exc:  # noqa: BLE001 - no reply may end the run
                problem = f"malformed reply ({type(exc).__name__}: {str(exc)[:120]})"
            if problem:
                report.reject(site, "evaluate", problem)
                continue
            if not within_training:
                self.held.evaluated(node, server_round)  # the site keeps the model it evaluated
            total = total + stats
            validation = validation + site_validation
            for group, group_stats in site_groups.items():
                subgroups[group] = subgroups[group] + group_stats if group in subgroups else group_stats
                subgroup_sites.setdefault(group, set()).add(site)
            # What a model card may say of the site's splits (it suppresses counts below min-reported-count).
            counts = {"positives": int(stats.classification.tp[0] + stats.classification.fn[0]), "val-n": int(site_validation.n),
                      "val-positives": int(site_validation.tp[0] + site_validation.fn[0])}
            if min_count is not None:
                counts["min-reported-count"] = min_count
            # Small sites still count in the global figures; their own figures are not shown.
            if stats.n >= self.settings.min_site_cases:
                per_site[site] = compute_catalogue(stats, self.settings.label_names, self.settings.fid_extractor)
                report.evaluation[site] = {**headline_of(per_site[site]), "n": stats.n, **counts}
            else:
                report.evaluation[site] = {"suppressed": f"fewer than {self.settings.min_site_cases} test studies",
                                           **({"min-reported-count": min_count} if min_count is not None else {})}
        self.pooled_validation[server_round] = validation
        report.subgroups = pooled_summaries(subgroups, subgroup_sites, self.settings.label_names)
        report.validation = {name: value.to_json(name) for name, value in
                             validation_catalogue(validation, self.settings.label_names).items()}
        if total.n == 0:
            return None
        catalogue = compute_catalogue(total, self.settings.label_names, self.settings.fid_extractor)
        for name, value in catalogue.items():
            value.per_site = {site: values[name].value for site, values in per_site.items()}
            # Each site's interval from its own statistics, as its value.
            value.per_site_interval = {site: values[name].interval for site, values in per_site.items()}
            # Why a site has none, where its reason is not the pooled figure's own (e.g. MSE's).
            value.per_site_interval_reason = {
                site: values[name].interval_reason for site, values in per_site.items()
                if values[name].value is not None and values[name].interval is None
                and values[name].interval_reason not in (None, value.interval_reason)}
        report.catalogue = {name: value.to_json(name) for name, value in catalogue.items()}
        report.roc = roc_curves(total.classification, self.settings.label_names)
        report.global_eval = {**headline_of(catalogue), "n": total.n}
        self.pooled[server_round] = total
        return MetricRecord({k: float(v) for k, v in report.global_eval.items() if v is not None})


class ClinicFedProx(ClinicFedAvg, FedProx):
    """Flower's FedProx (every train message carries ``proximal-mu``, which the sites add to their
    local loss), with ClinicFedAvg's reply validation and weighted averaging."""

    def __init__(self, settings: StrategyConfig, identities: SiteIdentities | None = None) -> None:
        super().__init__(settings, identities, proximal_mu=settings.proximal_mu)


def make_strategy(settings: StrategyConfig, identities: SiteIdentities | None = None) -> ClinicFedAvg:
    """FedProx for ``aggregation = fedprox``, ClinicFedAvg (with its aggregation) otherwise."""
    if settings.aggregation == "fedprox":
        return ClinicFedProx(settings, identities)
    return ClinicFedAvg(settings, identities)


def combine_updates(updates: list[dict[str, np.ndarray]], weights: list[int], aggregation: str,
                    trim_fraction: float = 0.2) -> ArrayRecord | None:
    """FedAvg (weighted by studies, in float64), FedMedian or trimmed mean; None when the result
    does not fit the parameters' dtype (finite but huge updates)."""
    combined = ArrayRecord()
    w = np.asarray(weights, dtype=np.float64)
    for name in updates[0]:
        stacked = np.stack([u[name].astype(np.float64) for u in updates])
        if aggregation in ("fedavg", "fedprox", "scaffold"):
            value = np.tensordot(w / w.sum(), stacked, axes=1)
        elif aggregation == "fedmedian":
            value = np.median(stacked, axis=0)
        else:
            value = trim_mean(stacked, trim_fraction)
        value = np.asarray(value).astype(updates[0][name].dtype)
        if not np.all(np.isfinite(value)):
            return None
        combined[name] = Array(value)
    return combined


def roc_curves(stats: ClassificationStats, label_names: list[str]) -> dict[str, dict[str, list[float]]]:
    """ROC points per label from the pooled histograms (on the coarsest resolution any site
    used: its bin edges are thresholds every site's histogram can answer), without repeats."""
    curves = {}
    hist_pos, hist_neg = stats.common_histograms()
    for label, pos, neg in zip(label_names, hist_pos, hist_neg):
        if pos.sum() == 0 or neg.sum() == 0:
            continue
        fpr, tpr = roc_curve_from_histograms(pos, neg)
        keep = np.concatenate([[True], (np.diff(fpr) != 0) | (np.diff(tpr) != 0)])
        curves[label] = {"fpr": np.round(fpr[keep], 6).tolist(), "tpr": np.round(tpr[keep], 6).tolist()}
    return curves


def headline_of(catalogue: dict[str, MetricValue]) -> dict[str, float | None]:
    return {name: catalogue[name].value for name in ("loss", "accuracy", "auc")}


def _number(value: object) -> float:
    return float(value) if is_scalar(value) else float("nan")
