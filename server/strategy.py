"""FedAvg with reply validation and exact aggregation of the sites' evaluation statistics.

Flower's FedAvg raises ``InconsistentMessageReplies`` (uncaught) when one reply differs from the
others, and weight-averages every metric, which is wrong for AUC and counts. Here each reply
is checked on its own; a bad one is excluded with a logged reason and the round goes on. No
reply, however malformed, can raise out of the aggregation: whatever a check did not foresee is
caught per reply and rejected with the exception's type.

Replies are filed under the site their authenticated node id belongs to (``server/identities.py``),
never under the name a reply reports.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from common.config import AGGREGATIONS
from common.exchange import ARRAYS_KEY, EVALUATE_FIRST_KEY, EVALUATION_KEY, FID_KEY, GLOBAL_DIGEST_KEY, \
    GLOBAL_NOT_HELD, METRICS_KEY, POLICY_KEY, STATUS_BUDGET_EXHAUSTED, STATUS_OK, ParamSpec, UpdateError, arrays_digest, \
    check_arrays, payload_bytes, site_record, to_wire
from common.metrics.catalogue import EvaluationStats, MetricValue, compute_catalogue
from common.metrics.classification import ClassificationStats, roc_curve_from_histograms
from server.identities import SiteIdentities

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
    mismatches: list[dict[str, str]] = field(default_factory=list)  # {site, phase, reason}: identity claims
    aggregated: bool = False
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> payload bytes sent/received
    roc: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> fpr, tpr (pooled)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> cumulative epsilon, delta, ...
    exhausted: dict[str, float] = field(default_factory=dict)  # site -> epsilon spent; it did not train
    stopped: str | None = None  # why the run ended after this round, when it ended early
    secure_aggregation: dict = field(default_factory=dict)  # SecAgg+: sites, shares, dropped, error bound
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
    median, as Flower's FedMedian) and trimmed mean (Flower's FedTrimmedAvg) as robust options."""

    def __init__(self, *, spec: dict[str, ParamSpec], backbone_hash: str, label_names: list[str], min_sites: int,
                 fid_dim: int | None = None, fid_extractor: str = "", min_site_cases: int = 10,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0, aggregation: str = "fedavg",
                 trim_fraction: float = 0.2, max_update_norm: float = 0.0,
                 identities: SiteIdentities | None = None, wire_dtype: str = "float32",
                 wire_compression: str = "none", image_sample: int = 0, images_per_study: int | None = None,
                 **flower_kwargs: object) -> None:
        # Minimums come from our config: Flower's default of 2 would hang a one-site federation
        # and let a round of one site pass when three were required.
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                         arrayrecord_key=ARRAYS_KEY, **flower_kwargs)
        self.spec = spec
        self.backbone_hash = backbone_hash
        self.label_names = label_names
        # image-metrics-sample and seq-len: the image counts a site's test split can claim for
        # PSNR/SSIM/FID (None: not checked)
        self.image_sample, self.images_per_study = image_sample, images_per_study
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
        self.pooled: dict[int, EvaluationStats] = {}  # round -> summed evaluation statistics (best round, calibration)
        self.epsilon: dict[str, float] = {}  # last cumulative epsilon reported by each site
        self.identities = identities or SiteIdentities()
        self.wire_dtype = wire_dtype
        self.wire_compression = wire_compression
        self._sent_bytes: dict[tuple[int, str, int], int] = {}  # (round, phase, node) -> payload bytes sent
        self._fid_asked: dict[int, bool] = {}  # round -> whether its evaluation message asked for FID
        self._sent_messages: dict[str, list[Message]] = {}
        # node -> digest of the global model it holds: the one it last evaluated (and replied ok).
        # Its next train message names that model instead of sending it again.
        self._held: dict[int, str] = {}
        self._evaluated: tuple[int, str] | None = None  # (round, digest of the model sent to evaluate)
        self._last_wire: tuple[ArrayRecord, ArrayRecord, str] | None = None  # (global, on the wire, digest)
        self._round_start: tuple[int, dict[str, np.ndarray]] | None = None  # (round, model its updates start from)
        # Train replies checked as they came (check_early): id -> (reply, round, why not usable, update)
        self._checked: dict[int, tuple[Message, int, str | None, dict[str, np.ndarray]]] = {}

    def remember_sent(self, server_round: int, phase: str, messages: Iterable[Message],
                      append: bool = False, counted_as: tuple[int, str] | None = None) -> list[Message]:
        """Keep the messages of a phase; their bytes count for that round and phase (or ``counted_as``)."""
        messages = list(messages)
        for msg in messages:
            key = (*(counted_as or (server_round, phase)), msg.metadata.dst_node_id)
            self._sent_bytes[key] = self._sent_bytes.get(key, 0) + payload_bytes(msg)
        # The grid sets each message's id when it pushes it; an error reply the SuperLink makes
        # for an unreachable node names only that id, so keep the messages to find the node.
        self._sent_messages[phase] = (self._sent_messages.get(phase, []) if append else []) + messages
        return messages

    def _wire(self, arrays: ArrayRecord) -> tuple[ArrayRecord, str]:
        """The global model as it goes on the wire, and its digest. The evaluation message and the
        next train message carry the same model: it is converted and hashed once."""
        if self._last_wire is None or self._last_wire[0] is not arrays:
            wire = to_wire(arrays, self.wire_dtype, self.wire_compression)
            self._last_wire = (arrays, wire, arrays_digest(wire))
        return self._last_wire[1], self._last_wire[2]

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """The global model this round's updates start from (for the update-norm bound)."""
        self._round_start = (server_round, {k: v.numpy() for k, v in arrays.items()})
        self._checked.clear()

    def check_early(self, server_round: int, msg: Message) -> None:
        """Decode and check a train reply's update as soon as it comes, while other sites still
        train; ``aggregate_train`` takes the result instead of doing it after the last reply."""
        if msg.has_error():
            return
        try:
            problem, values = self._train_problem(msg, server_round)
        except Exception:  # noqa: BLE001 - aggregate_train checks it again and rejects it with its reason
            return
        self._checked[id(msg)] = (msg, server_round, problem, values)

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        """Train messages. With ``evaluate-first`` each carries the model, which the site scores
        (as round server_round - 1's evaluation) before it trains from it; the bytes sent are
        counted as that evaluation's, as a separate evaluation message's would be."""
        self.start_round(server_round, arrays)
        wire, digest = self._wire(arrays)
        messages = list(super().configure_train(server_round, wire, config, grid))
        if config.get(EVALUATE_FIRST_KEY, False):
            self._fid_asked[server_round - 1] = bool(config.get(FID_KEY, True))
            return self.remember_sent(server_round, "train", messages, counted_as=(server_round - 1, "evaluate"))
        for msg in messages:
            if self._held.get(msg.metadata.dst_node_id) == digest:
                by_digest = ConfigRecord(dict(msg.content[self.configrecord_key]))
                by_digest[GLOBAL_DIGEST_KEY] = digest
                msg.content = RecordDict({self.configrecord_key: by_digest})
        return self.remember_sent(server_round, "train", messages)

    def resend_in_full(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> list[Message]:
        """Train messages with the model itself for the sites that answered a by-digest message
        with ``global-model-not-held`` (a restarted site, say); the caller sends them."""
        resend = []
        for reply in replies:
            record = site_record(reply) if not reply.has_error() else ConfigRecord()
            if record.get("reason") != GLOBAL_NOT_HELD:
                continue
            node = reply.metadata.src_node_id
            self._held.pop(node, None)
            sent = next((m for m in reversed(self._sent_messages.get("train", []))
                         if m.metadata.dst_node_id == node and self.configrecord_key in m.content.config_records), None)
            if sent is None:
                continue
            config = ConfigRecord({k: v for k, v in sent.content[self.configrecord_key].items()
                                   if k != GLOBAL_DIGEST_KEY})
            resend.append(Message(RecordDict({self.arrayrecord_key: self._wire(arrays)[0],
                                              self.configrecord_key: config}),
                                  dst_node_id=node, message_type=MessageType.TRAIN))
        if resend:
            log.info("round %d: %d site(s) did not hold the global model; sent it in full", server_round, len(resend))
        return self.remember_sent(server_round, "train", resend, append=True)

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[override]
        wire, digest = self._wire(arrays)
        self._evaluated = (server_round, digest)
        self._fid_asked[server_round] = bool(config.get(FID_KEY, True))
        return self.remember_sent(server_round, "evaluate", super().configure_evaluate(
            server_round, wire, config, grid))

    def report(self, server_round: int) -> RoundReport:
        return self.reports.setdefault(server_round, RoundReport(server_round))

    # ------------------------------------------------------------------ training
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.report(server_round)
        accepted: list[tuple[str, dict[str, np.ndarray], int]] = []  # (site, update, num-examples)
        for msg in replies:
            site = self.site_of(msg, "train", report)
            try:
                report.count_traffic(site, self._sent_bytes.get((server_round, "train", self.node_of(msg)), 0),
                                     payload_bytes(msg))
                taken = self.take_train_reply(server_round, site, msg, report)
            except Exception as exc:  # noqa: BLE001 - no reply may end the run; the checks missed this one
                taken, reason = None, f"malformed reply ({type(exc).__name__})"
                report.reject(site, "train", reason)
            if taken is not None:
                accepted.append((site, taken, report.train[site]["num-examples"]))
        self._checked.clear()
        if len(accepted) < self.min_sites:
            report.notes.append(f"only {len(accepted)} valid train replies (min-sites {self.min_sites}): "
                                "global model unchanged")
            log.warning("round %d: %s", server_round, report.notes[-1])
            return None, None
        accepted.sort(key=lambda item: item[0])  # by site, not by arrival: the same sum in every run
        arrays = self._aggregate([values for _, values, _ in accepted], [n for _, _, n in accepted])
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
        checked = self._checked.pop(id(msg), None)
        if checked is not None and checked[0] is msg and checked[1] == server_round and not masked:
            problem, values = checked[2], checked[3]
        else:
            problem, values = self._train_problem(msg, server_round, masked)
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

    def _aggregate(self, updates: list[dict[str, np.ndarray]], weights: list[int]) -> ArrayRecord | None:
        """FedAvg (weighted by studies, in float64), FedMedian or trimmed mean; None when the result
        does not fit the parameters' dtype (finite but huge updates)."""
        combined = ArrayRecord()
        w = np.asarray(weights, dtype=np.float64)
        for name in updates[0]:
            stacked = np.stack([u[name].astype(np.float64) for u in updates])
            if self.aggregation in ("fedavg", "fedprox"):
                value = np.tensordot(w / w.sum(), stacked, axes=1)
            elif self.aggregation == "fedmedian":
                value = np.median(stacked, axis=0)
            else:
                value = trim_mean(stacked, self.trim_fraction)
            value = np.asarray(value).astype(updates[0][name].dtype)
            if not np.all(np.isfinite(value)):
                return None
            combined[name] = Array(value)
        return combined

    def node_of(self, msg: Message) -> int:
        """The node a reply comes from; for the SuperLink's error reply on behalf of an unreachable
        node (which names only our message), the node that message went to."""
        if msg.has_error():
            for sent in (m for batch in self._sent_messages.values() for m in batch):
                if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return sent.metadata.dst_node_id
        return msg.metadata.src_node_id

    def site_of(self, msg: Message, phase: str, report: RoundReport) -> str:
        """The site a reply is filed under: its node's name, whatever the reply claims."""
        node = self.node_of(msg)
        claimed = None
        if not msg.has_error():
            value = site_record(msg).get("site-name")
            claimed = value if isinstance(value, str) else repr(value)
        identity = self.identities.resolve(node, claimed)
        if identity.mismatch:
            report.mismatch(identity.name, phase, identity.mismatch)
        return identity.name

    def admission_problem(self, msg: Message) -> str | None:
        """Why no reply from this reply's node may be used (a node outside the site registry), or None."""
        return self.identities.refusal(self.node_of(msg))

    def _train_problem(self, msg: Message, server_round: int = 0,
                       masked: bool = False) -> tuple[str | None, dict[str, np.ndarray]]:
        """(why the reply cannot be used, or None; its checked update)."""
        problem = self.admission_problem(msg) or _common_problem(msg, self.backbone_hash)
        if problem:
            return problem, {}
        content = msg.content
        if not masked and (ARRAYS_KEY not in content.array_records or len(content.array_records) != 1):
            return "reply has no parameter record", {}
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is None or not {"num-examples", "train-loss", "train-seconds"} <= set(metrics.keys()):
            return "reply lacks num-examples/train-loss/train-seconds", {}
        unexpected = sorted(set(metrics.keys()) - TRAIN_KEYS - set(DP_KEYS))
        if unexpected:
            return f"unexpected train metrics: {', '.join(unexpected[:3])}", {}
        if any(not _is_scalar(metrics[key]) for key in metrics.keys()):
            return "every train metric must be a single number", {}
        dp_keys = set(DP_KEYS) & set(metrics.keys())
        if dp_keys and (dp_keys != set(DP_KEYS) or not all(np.isfinite(float(metrics[k])) for k in DP_KEYS)):
            return "incomplete or non-finite privacy report", {}
        n = metrics["num-examples"]
        if not isinstance(n, int) or not 0 < n <= MAX_EXAMPLES:
            return f"num-examples must be an integer in 1..{MAX_EXAMPLES}, got {_brief(n)}", {}
        if not np.isfinite(float(metrics["train-loss"])) or not np.isfinite(float(metrics["train-seconds"])):
            return "train-loss or train-seconds is not finite", {}
        if masked:
            return None, {}
        try:
            values = check_arrays(content[ARRAYS_KEY], self.spec, self.wire_dtype)
        except UpdateError as exc:
            return f"malformed update: {exc}", {}
        start = self._round_start[1] if self._round_start and self._round_start[0] == server_round else None
        if self.max_update_norm > 0 and start is not None:
            norm = float(np.sqrt(sum(float(((values[k].astype(np.float64) - v) ** 2).sum()) for k, v in start.items())))
            if norm > self.max_update_norm:
                return f"update norm {norm:.3g} exceeds max-update-norm {self.max_update_norm:g}", {}
        return None, values

    # ---------------------------------------------------------------- evaluation
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           within_training: bool = False) -> MetricRecord | None:
        """Sum every valid site's statistics and compute the whole catalogue from the sums.
        ``within_training``: the replies are round server_round + 1's training replies, whose
        ``evaluation`` record holds the statistics (their bytes are counted by aggregate_train)."""
        report = self.report(server_round)
        with_fid = self._fid_asked.get(server_round, True)
        total = EvaluationStats.empty(self.num_labels, self.fid_dim, with_fid)
        per_site: dict[str, dict[str, MetricValue]] = {}
        key = EVALUATION_KEY if within_training else METRICS_KEY
        for msg in replies:
            site = self.site_of(msg, "evaluate", report)
            node = self.node_of(msg)
            self._held.pop(node, None)
            try:
                report.count_traffic(site, self._sent_bytes.get((server_round, "evaluate", node), 0),
                                     0 if within_training else payload_bytes(msg))
                problem = self.admission_problem(msg) or _common_problem(msg, self.backbone_hash)
                if problem is None:
                    if site in report.evaluation:
                        raise ValueError("a second evaluation reply from the same site in one round")
                    if key not in msg.content.metric_records:
                        problem = "reply lacks the evaluation statistics"
                    else:
                        try:
                            stats = EvaluationStats.from_record(dict(msg.content[key]), self.num_labels,
                                                                self.fid_dim, with_fid, self.image_sample,
                                                                self.images_per_study)
                        except (KeyError, ValueError, TypeError) as exc:
                            problem = f"malformed evaluation statistics: {exc}"
            except Exception as exc:  # noqa: BLE001 - no reply may end the run
                problem = f"malformed reply ({type(exc).__name__}: {str(exc)[:120]})"
            if problem:
                report.reject(site, "evaluate", problem)
                continue
            if not within_training and self._evaluated is not None and self._evaluated[0] == server_round:
                self._held[node] = self._evaluated[1]  # the site keeps the model it evaluated
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
        self.pooled[server_round] = total
        return MetricRecord({k: float(v) for k, v in report.global_eval.items() if v is not None})


class ClinicFedProx(ClinicFedAvg, FedProx):
    """Flower's FedProx (every train message carries ``proximal-mu``, which the sites add to their
    local loss), with ClinicFedAvg's reply validation and weighted averaging."""

    def __init__(self, *, proximal_mu: float, **kwargs: object) -> None:
        super().__init__(proximal_mu=proximal_mu, **kwargs)


def make_strategy(aggregation: str, proximal_mu: float = 0.0, **kwargs: object) -> ClinicFedAvg:
    if aggregation == "fedprox":
        return ClinicFedProx(aggregation=aggregation, proximal_mu=proximal_mu, **kwargs)
    return ClinicFedAvg(aggregation=aggregation, **kwargs)


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


DP_KEYS = ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-max-grad-norm", "dp-sample-rate", "dp-steps")


TRAIN_KEYS = {"num-examples", "train-loss", "train-seconds"}
MAX_EXAMPLES = 10_000_000  # studies at one site: a larger weight is forged or corrupt
# Flower error codes whose reasons the SuperLink writes itself (fixed text, safe to record). The
# others carry a ClientApp's exception text, which may name a patient's files: never recorded.
_FLOWER_REASONS = {ErrorCode.MESSAGE_UNAVAILABLE: "message unavailable",
                   ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply unavailable",
                   ErrorCode.NODE_UNAVAILABLE: "Node Unavailable",
                   ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "the site could not load the ClientApp",
                   ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "the ClientApp raised an exception",
                   ErrorCode.MOD_FAILED_PRECONDITION: "a ClientApp mod refused the message",
                   ErrorCode.INVALID_FAB: "the site refused the app bundle",
                   ErrorCode.CLIENT_APP_CRASHED: "the ClientApp process crashed"}
_CODE_TEXT = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


_APPROVAL_REFUSAL = re.compile(r"app-not-approved fab_hash=([0-9a-f]{64})")


def _common_problem(msg: Message, backbone_hash: str) -> str | None:
    if msg.has_error():
        code = msg.error.code
        refusal = _APPROVAL_REFUSAL.fullmatch(msg.error.reason or "") if code == ErrorCode.INVALID_FAB else None
        if refusal:  # the site gate's reply (sitegate/): a code and a hash, nothing else
            return f"site refused the app: app-not-approved (bundle sha256 {refusal.group(1)})"
        return f"site error: {_FLOWER_REASONS.get(code, 'Flower error')} (Flower error code {code})"
    site = site_record(msg)
    if site.get("status") != STATUS_OK:
        reason = site.get("reason", "no reason given")
        # Sites send reason codes; anything else is shown by its type only, never as text.
        reason = reason if isinstance(reason, str) and _CODE_TEXT.fullmatch(reason) else "unreadable reason"
        exception = site.get("exception-type")
        if isinstance(exception, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,79}", exception):
            reason += f" ({exception})"
        key = site.get(POLICY_KEY)  # policy-refused: the run-config key the site's policy refused
        if isinstance(key, str) and _CODE_TEXT.fullmatch(key):
            reason += f" ({key})"
        status = site.get("status", "no status")
        return f"site reported {status if isinstance(status, str) and _CODE_TEXT.fullmatch(status) else 'a bad status'}: " \
               f"{reason}"
    if site.get("backbone-hash") != backbone_hash:
        return "backbone hash differs from the server's"
    return None


def _is_scalar(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: object) -> float:
    return float(value) if _is_scalar(value) else float("nan")


def _brief(value: object) -> str:
    return repr(value)[:40]
