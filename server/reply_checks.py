"""The checks of a site's reply at the centre: may its node take part, did the site succeed with
the server's backbone, and is its update or its evaluation statistics what the model and the run
allow. Each check answers why a reply cannot be used (a reason that names no local path or
patient) or None; nothing here files a reply under a site or records it.

A train reply can be checked as it comes (``check_early``), while the other sites still train;
the aggregation then takes that result instead of decoding the update again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode

from common.exchange import ARRAYS_KEY, METRICS_KEY, POLICY_KEY, STATUS_OK, SUBGROUPS_KEY, VALIDATION_KEY, ParamSpec, \
    UpdateError, check_arrays, site_record
from common.metrics.catalogue import EvaluationStats
from common.scaffold import CONTROL_DELTA_KEY
from common.metrics import subgroup_stats
from common.metrics.classification import ClassificationStats
from server.identities import SiteIdentities

DP_KEYS = ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-max-grad-norm", "dp-sample-rate", "dp-steps")
TRAIN_KEYS = {"num-examples", "train-loss", "train-seconds"}
MAX_EXAMPLES = 10_000_000  # studies at one site: a larger weight is forged or corrupt
VALIDATION_FIELDS = ClassificationStats.RECORD_FIELDS  # a validation record's keys, no others


@dataclass(frozen=True)
class EvaluationLayout:
    """What a site's evaluation statistics must hold: one histogram set per label, FID moments of
    ``fid_dim`` (None: no image statistics), and an image count its test studies can give."""

    num_labels: int
    fid_dim: int | None = None
    image_sample: int = 0  # image-metrics-sample (0: every image of a study counts)
    images_per_study: int | None = None  # seq-len (None: the image count is not checked)

    def empty(self, with_fid: bool) -> EvaluationStats:
        return EvaluationStats.empty(self.num_labels, self.fid_dim, with_fid)

    def parse(self, record: dict, with_fid: bool) -> EvaluationStats:
        """The statistics of ``record``; KeyError, ValueError or TypeError when they do not fit."""
        return EvaluationStats.from_record(record, self.num_labels, self.fid_dim, with_fid, self.image_sample,
                                           self.images_per_study)


class ReplyValidator:
    """Checks train and evaluation replies against the model's parameters, the server's backbone
    and the site registry. ``node_of`` names the node a reply stands for (an error reply the
    SuperLink makes names only the message it answers: server/traffic.py)."""

    def __init__(self, spec: dict[str, ParamSpec], backbone_hash: str, identities: SiteIdentities,
                 node_of: Callable[[Message], int], layout: EvaluationLayout, *, wire_dtype: str = "float32",
                 max_update_norm: float = 0.0, control_variates: bool = False) -> None:
        self.spec = spec
        self.backbone_hash = backbone_hash
        self.identities = identities
        self.node_of = node_of
        self.layout = layout
        self.wire_dtype = wire_dtype
        self.max_update_norm = max_update_norm  # 0: no bound
        # SCAFFOLD: a train reply carries its control variate update beside the parameters
        self.records = {ARRAYS_KEY, CONTROL_DELTA_KEY} if control_variates else {ARRAYS_KEY}
        self._round_start: tuple[int, dict[str, np.ndarray]] | None = None  # (round, model its updates start from)
        # Train replies checked as they came: id -> (reply, round, why not usable, update)
        self._early: dict[int, tuple[Message, int, str | None, dict[str, np.ndarray]]] = {}
        self._fid_asked: dict[int, bool] = {}  # round -> whether its evaluation message asked for FID

    # ------------------------------------------------------------------ any reply
    def admission_problem(self, msg: Message) -> str | None:
        """Why no reply from this reply's node may be used (a node outside the site registry), or None."""
        return self.identities.refusal(self.node_of(msg))

    def reply_problem(self, msg: Message) -> str | None:
        """Why the reply cannot be used whatever it carries: its node, a Flower error, a site that
        reports failure, or another backbone. None when it may be read."""
        return self.admission_problem(msg) or _site_problem(msg, self.backbone_hash)

    # ------------------------------------------------------------------ train replies
    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """The global model this round's updates start from (for the update-norm bound)."""
        self._round_start = (server_round, {k: v.numpy() for k, v in arrays.items()})
        self._early.clear()

    def check_early(self, server_round: int, msg: Message) -> None:
        """Decode and check a train reply's update as soon as it comes, while other sites still
        train; ``train_update`` takes the result instead of doing it after the last reply."""
        if msg.has_error():
            return
        try:
            problem, values = self.train_problem(msg, server_round)
        except Exception:  # noqa: BLE001 - train_update checks it again and it is rejected with its reason
            return
        self._early[id(msg)] = (msg, server_round, problem, values)

    def train_update(self, msg: Message, server_round: int, masked: bool = False
                     ) -> tuple[str | None, dict[str, np.ndarray]]:
        """``train_problem``'s answer, from ``check_early`` when it checked this reply for this round."""
        early = self._early.pop(id(msg), None)
        if early is not None and early[0] is msg and early[1] == server_round and not masked:
            return early[2], early[3]
        return self.train_problem(msg, server_round, masked)

    def end_round(self) -> None:
        """Drop the early results the aggregation did not take (replies it never saw)."""
        self._early.clear()

    @property
    def waiting_early_checks(self) -> int:
        """Replies checked early whose results the aggregation has not taken yet."""
        return len(self._early)

    def train_problem(self, msg: Message, server_round: int = 0,
                      masked: bool = False) -> tuple[str | None, dict[str, np.ndarray]]:
        """(why the reply cannot be used, or None; its checked update). ``masked``: a secure
        aggregation reply, whose update only the protocol can check (its update is {})."""
        problem = self.reply_problem(msg)
        if problem:
            return problem, {}
        content = msg.content
        if not masked and ARRAYS_KEY not in content.array_records:
            return "reply has no parameter record", {}
        if not masked and set(content.array_records) != self.records:
            return (f"reply's array records are {sorted(content.array_records)}, the run expects "
                    f"{sorted(self.records)}"), {}
        problem = _train_metrics_problem(content.metric_records.get(METRICS_KEY))
        if problem or masked:
            return problem, {}
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

    def control_delta(self, msg: Message) -> tuple[str | None, dict[str, np.ndarray]]:
        """(why a SCAFFOLD reply's control variate update cannot be used, or None; the update),
        checked like a model update: the trainable parameters' names and shapes, finite float32."""
        try:
            return None, check_arrays(msg.content[CONTROL_DELTA_KEY], self.spec)
        except (UpdateError, KeyError) as exc:
            return f"malformed control variate update: {exc}", {}

    # ------------------------------------------------------------------ evaluation replies
    def expect_fid(self, server_round: int, asked: bool) -> None:
        """Whether ``server_round``'s evaluation message asked the sites for FID moments."""
        self._fid_asked[server_round] = asked

    def fid_expected(self, server_round: int) -> bool:
        return self._fid_asked.get(server_round, True)

    def evaluation_stats(self, msg: Message, server_round: int, key: str = METRICS_KEY
                         ) -> tuple[str | None, EvaluationStats | None]:
        """(why not, or None; the statistics) of a reply that passed ``reply_problem``, read from
        its metric record ``key``."""
        if key not in msg.content.metric_records:
            return "reply lacks the evaluation statistics", None
        try:
            return None, self.layout.parse(dict(msg.content[key]), self.fid_expected(server_round))
        except (KeyError, ValueError, TypeError) as exc:
            return f"malformed evaluation statistics: {exc}", None

    def validation_stats(self, msg: Message) -> tuple[str | None, ClassificationStats | None]:
        """(why not, or None; the statistics) of the validation split, read from the reply's
        ``validation`` record: checked as the test split's classification statistics are (counts
        that add up to n, histograms that hold exactly the positives and negatives, a bounded loss)."""
        if VALIDATION_KEY not in msg.content.metric_records:
            return "reply lacks the validation statistics", None
        record = dict(msg.content[VALIDATION_KEY])
        unexpected = sorted(set(record) - VALIDATION_FIELDS)
        if unexpected:
            return f"malformed validation statistics: unexpected {', '.join(unexpected[:5])}", None
        try:
            return None, ClassificationStats.from_record(record, self.layout.num_labels)
        except (KeyError, ValueError, TypeError) as exc:
            return f"malformed validation statistics: {exc}", None

    def subgroup_stats(self, msg: Message) -> tuple[str | None, tuple[int | None, dict]]:
        """(why not, or None; (the site's min-reported-count, its subgroups' statistics)) from the
        reply's ``subgroups`` record: kinds and categories from the fixed vocabulary only, each
        subgroup no smaller than the site's own minimum, statistics checked as the test split's.
        A reply without the record reports no subgroups (None, {})."""
        if SUBGROUPS_KEY not in msg.content.metric_records:
            return None, (None, {})
        try:
            return None, subgroup_stats.from_record(dict(msg.content[SUBGROUPS_KEY]), self.layout.num_labels)
        except (KeyError, ValueError, TypeError) as exc:
            return f"malformed subgroup statistics: {exc}", (None, {})


def _train_metrics_problem(metrics: MetricRecord | None) -> str | None:
    """Why a train reply's metrics cannot be used: the three a site must send, the privacy report
    in full or not at all, and every one a finite single number."""
    if metrics is None or not {"num-examples", "train-loss", "train-seconds"} <= set(metrics.keys()):
        return "reply lacks num-examples/train-loss/train-seconds"
    unexpected = sorted(set(metrics.keys()) - TRAIN_KEYS - set(DP_KEYS))
    if unexpected:
        return f"unexpected train metrics: {', '.join(unexpected[:3])}"
    if any(not is_scalar(metrics[key]) for key in metrics.keys()):
        return "every train metric must be a single number"
    dp_keys = set(DP_KEYS) & set(metrics.keys())
    if dp_keys and (dp_keys != set(DP_KEYS) or not all(np.isfinite(float(metrics[k])) for k in DP_KEYS)):
        return "incomplete or non-finite privacy report"
    n = metrics["num-examples"]
    if not isinstance(n, int) or not 0 < n <= MAX_EXAMPLES:
        return f"num-examples must be an integer in 1..{MAX_EXAMPLES}, got {repr(n)[:40]}"
    if not np.isfinite(float(metrics["train-loss"])) or not np.isfinite(float(metrics["train-seconds"])):
        return "train-loss or train-seconds is not finite"
    return None


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


def _site_problem(msg: Message, backbone_hash: str) -> str | None:
    """Why the reply reports no usable work: a Flower error, a site status other than ok (by its
    reason code, never its text), or another backbone."""
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


def is_scalar(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
