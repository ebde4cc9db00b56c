"""clinicfl ClientApp: a site trains and evaluates the global model on its own data.

Only trainable parameters, counts and aggregate statistics leave the site. A failure is
answered with a reason code (``site`` record), never with paths or header text.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_outgoing
from client.drills import fault_drill, raise_phi_drill
from client.sitelog import console, site_logging
from client.secure_aggregation import is_secure, secure_aggregation_mod, update_for_masking
from client.session import SiteSession, open_session
from common.training import train_local
from common.inference import evaluate_local, subgroup_stats, validation_stats
from common.metrics import subgroup_stats as subgroup_record
from common.config import ConfigError, RunConfig, SiteConfig
from client.budget import check_budget_id
from common.exchange import ARRAYS_KEY, EVALUATE_FIRST_KEY, EVALUATION_KEY, FID_KEY, GLOBAL_DIGEST_KEY, \
    GLOBAL_NOT_HELD, METRICS_KEY, POLICY_KEY, SITE_KEY, STATUS_BUDGET_EXHAUSTED, STATUS_ERROR, STATUS_OK, UPDATE_NAMES_KEY, \
    GATE_APPROVED_KEY, SUBGROUPS_KEY, VALIDATION_KEY, UpdateError, arrays_digest, load_array_record, to_array_record, trainable_state
from common.model import FEATURE_DIM, check_backbone_hash, trainable_parameter_count
from common.private_norm import PublicNorm
from common.scaffold import CONTROL_DELTA_KEY, site_correction, site_update
from common.policy import PolicyRefused, SitePolicy
from common.reason_codes import ReasonCodeError
from sitegate.approvals import APPROVED_BUNDLE_ENV

log = logging.getLogger(__name__)
# The audit mod is outermost: it sees each reply exactly as Flower sends it (drills included,
# updates masked). Secure aggregation is innermost: it masks what the train handler returns.
app = ClientApp(mods=[audit_outgoing, fault_drill, secure_aggregation_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate)


def _train(session: SiteSession, msg: Message, context: Context, policy: SitePolicy) -> RecordDict:
    """Train from the global model; first score it, when the message asks (``evaluate-first``):
    the previous round's evaluation rides in this round's training message."""
    evaluate_first = msg.content["config"].get(EVALUATE_FIRST_KEY, False)
    if not isinstance(evaluate_first, bool):
        raise ConfigError(f"{EVALUATE_FIRST_KEY} must be true or false, got {evaluate_first!r}")
    evaluation = _evaluation(session, msg, policy) if evaluate_first else None
    content = _train_from_global(session, msg, context, policy)
    if evaluation is not None:
        content[EVALUATION_KEY], content[VALIDATION_KEY], content[SUBGROUPS_KEY] = evaluation
    return content


def _train_from_global(session: SiteSession, msg: Message, context: Context, policy: SitePolicy) -> RecordDict:
    server_round = int(msg.content["config"].get("server-round", 0))
    if session.config.privacy.dp_enabled:
        return _train_private(session, msg, context, server_round, policy)
    start = _trainable_numpy(session) if is_secure(msg) else None  # secure aggregation masks the update
    names = list(trainable_state(session.model))
    control = site_correction(msg.content, context.state, names, session.device)  # SCAFFOLD: (c - c_i, c_i)
    result = train_local(session.model, session.inputs, session.data.train_index, session.config.train,
                         session.device, server_round, proximal_mu(msg),
                         correction=control[0] if control is not None else None)
    session.refresh_feature_norm()
    content = _train_reply(session, msg, start, result.num_examples, MetricRecord({
        "num-examples": result.num_examples, "train-loss": result.loss, "train-seconds": result.seconds}))
    if control is not None and result.mean_gradients is not None:
        content[CONTROL_DELTA_KEY] = site_update(context.state, names, control[1], result.mean_gradients)
    return content


def _trainable_numpy(session: SiteSession) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, v.cpu().numpy().copy()) for k, v in trainable_state(session.model).items())


def _train_reply(session: SiteSession, msg: Message, start: "OrderedDict[str, np.ndarray] | None", num_examples: int,
                 metrics: MetricRecord) -> RecordDict:
    """The trained parameters; under secure aggregation, the update for secaggplus_mod to mask
    (its names, in order, go in the site record so the centre can check the masked arrays)."""
    status = _site_status(session, STATUS_OK)
    if start is not None:
        content = update_for_masking(start, _trainable_numpy(session), num_examples)
        status[UPDATE_NAMES_KEY] = list(start)
    else:
        fed = session.config.federation
        content = RecordDict({ARRAYS_KEY: to_array_record(session.model, fed.wire_dtype, fed.wire_compression)})
    content[METRICS_KEY] = metrics
    content[SITE_KEY] = status
    return content


def _train_private(session: SiteSession, msg: Message, context: Context, server_round: int,
                   policy: SitePolicy) -> RecordDict:
    """DP-SGD with the site's ledger: charged under its lock (disk and context.state) before training."""
    # Opacus only where DP is on: its import costs a deployed site about 3 s on every message.
    from client.privacy import BudgetExhausted, keep_large_allocations_in_heap, reserve_round, train_private

    config = session.config
    budget_id = check_budget_id(str(msg.content["config"].get("budget-id", context.run_id)))
    with _private_ledger(session, msg, context, policy, budget_id) as (ledger, budget, units):
        try:
            _standardise_privately(session, msg, ledger, budget, units, charge=True)
            charge = reserve_round(ledger, config, budget, len(units))
        except BudgetExhausted as exc:
            log.warning("site %s: %s", session.site.site_name, exc)
            status = _site_status(session, STATUS_BUDGET_EXHAUSTED)
            status["reason"] = STATUS_BUDGET_EXHAUSTED
            status["dp-epsilon"] = exc.spent
            status["dp-budget"] = exc.budget
            return RecordDict({SITE_KEY: status})
    start = _trainable_numpy(session) if is_secure(msg) else None  # secure aggregation masks the update
    keep_large_allocations_in_heap()  # for the whole process, on its first DP round only
    result = train_private(session.model, session.inputs, units, config, budget, charge, session.device,
                           proximal_mu(msg), server_round)
    return _train_reply(session, msg, start, result.train.num_examples, MetricRecord({
        "num-examples": result.train.num_examples, "train-loss": result.train.loss,
        "train-seconds": result.train.seconds, **result.metrics()}))


@contextmanager
def _private_ledger(session: SiteSession, msg: Message, context: Context, policy: SitePolicy, budget_id: str):
    """(the site's privacy ledger, its budget, the privacy units), under the ledger's lock; the
    ledger is written back (disk and context.state) when the block ends, however it ends: a
    calibrated noise multiplier or a release is kept even when the round is not trained."""
    from client.privacy import STATE_KEY as PRIVACY_STATE_KEY
    from client.privacy import PrivacyLedger, SitePrivacy, privacy_units

    config = session.config
    state = context.state.config_records.get(PRIVACY_STATE_KEY)
    units = privacy_units(session.data.train_index, session.data.groups, config.privacy.dp_unit)
    budget = SitePrivacy.resolve(config.privacy, session.site, len(units), policy.max_delta)
    with PrivacyLedger.locked(session.site, budget_id):
        ledger = PrivacyLedger.load(session.site, budget_id, config.privacy.dp_accountant,
                                    str(state["ledger"]) if state is not None and "ledger" in state else None)
        try:
            yield ledger, budget, units
        finally:
            text = ledger.save(session.site, budget_id)
            context.state[PRIVACY_STATE_KEY] = ConfigRecord({"ledger": text})


def _standardise_privately(session: SiteSession, msg: Message, ledger, budget, units: list[np.ndarray],
                           charge: bool) -> None:
    """Under DP with ``feature-norm = site``: standardise with the centre's public statistics and
    the site's DP-released mean (``client/privacy.py`` ``standardise_privately``), never with
    statistics fitted on the training studies; kept for ``predict`` as the site's statistics."""
    from client.privacy import standardise_privately

    if session.config.model.feature_norm != "site":
        return
    public = PublicNorm.from_config(msg.content["config"], FEATURE_DIM)
    if public is None:
        raise PublicStatisticsMissing("the message carries no public feature statistics, which DP with "
                                      "feature-norm = site needs (the centre sends them from server-val-path)")
    released = standardise_privately(ledger, session.config, budget, session.model, session.inputs, units, public,
                                     session.backbone_hash, charge)
    if released is not None:
        log.info("site %s: standardisation under DP: clip %.3g, shrink %.3f, noise multiplier %.3g",
                 session.site.site_name, released.clip, released.shrink, released.noise_multiplier)
    session.keep_stats()


class PublicStatisticsMissing(ReasonCodeError):
    code = "public-statistics-missing"


def proximal_mu(msg: Message) -> float:
    """FedProx's mu, as Flower's FedProx strategy sends it (0: plain FedAvg)."""
    value = msg.content["config"].get("proximal-mu", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1e6:
        raise ConfigError(f"proximal-mu must be a number >= 0, got {value!r}")
    return float(value)


def _evaluate(session: SiteSession, msg: Message, context: Context, policy: SitePolicy) -> RecordDict:
    if session.config.privacy.dp_enabled:  # the standardisation the training uses, never a private fit
        budget_id = check_budget_id(str(msg.content["config"].get("budget-id", context.run_id)))
        with _private_ledger(session, msg, context, policy, budget_id) as (ledger, budget, units):
            _standardise_privately(session, msg, ledger, budget, units, charge=False)
    test, validation, subgroups = _evaluation(session, msg, policy)
    return RecordDict({METRICS_KEY: test, VALIDATION_KEY: validation, SUBGROUPS_KEY: subgroups,
                       SITE_KEY: _site_status(session, STATUS_OK)})


def _evaluation(session: SiteSession, msg: Message,
                policy: SitePolicy) -> tuple[MetricRecord, MetricRecord, MetricRecord]:
    """(the test split's statistics, the validation split's classification statistics, the test
    split's statistics by subgroup) of the model loaded in the session, each at no finer a
    histogram resolution than the site's policy allows for that split's size; subgroups only
    where the policy's min-reported-count allows."""
    with_fid = msg.content["config"].get(FID_KEY, True)  # a centre without fid-every asks every round
    if not isinstance(with_fid, bool):
        raise ConfigError(f"{FID_KEY} must be true or false, got {with_fid!r}")
    config, data = session.config.eval, session.data
    test = evaluate_local(session.model, session.inputs, data.test_index, session.device, config, session.fid,
                          with_fid, policy.min_studies_per_bin)
    validation = validation_stats(session.model, session.inputs, data.val_index, session.device, config,
                                  policy.min_studies_per_bin)
    groups = subgroup_stats(session.model, session.inputs, data.subgroups, data.test_index, session.device, config,
                            policy.min_studies_per_bin, policy.min_reported_count)
    return (MetricRecord({"num-examples": test.n, **test.to_record()}), MetricRecord(validation.to_record()),
            MetricRecord(subgroup_record.to_record(groups, policy.min_reported_count)))


class GlobalModelNotHeld(UpdateError):
    code = GLOBAL_NOT_HELD  # the centre then sends the model itself


HELD_KEY = "clinicfl.global-model"  # context.state: the global model of the last evaluation message
HELD_DIGEST_KEY = "clinicfl.global-model-digest"


def global_model(msg: Message, context: Context) -> ArrayRecord:
    """The global model a message is about. An evaluation message carries it, and the site keeps
    it in the run's state: the next train message starts from the same model and only names it
    by digest, which saves one model transfer per site per round."""
    if ARRAYS_KEY in msg.content.array_records:
        arrays = msg.content[ARRAYS_KEY]
        if msg.metadata.message_type == MessageType.EVALUATE:
            context.state[HELD_KEY] = arrays
            context.state[HELD_DIGEST_KEY] = ConfigRecord({"digest": arrays_digest(arrays)})
        return arrays
    wanted = msg.content["config"].get(GLOBAL_DIGEST_KEY)
    held = context.state.array_records.get(HELD_KEY)
    record = context.state.config_records.get(HELD_DIGEST_KEY)
    if held is None or record is None or not isinstance(wanted, str) or record.get("digest") != wanted:
        raise GlobalModelNotHeld("the message names a global model this site does not hold")
    return held


def _site_status(session: SiteSession, status: str) -> ConfigRecord:
    record = ConfigRecord({"status": status, "site-name": session.site.site_name,
                           "backbone-hash": session.backbone_hash})
    approved = os.environ.get(APPROVED_BUNDLE_ENV, "")
    if approved:  # run by the site's gate (sitegate), which checked this bundle against its approvals
        record[GATE_APPROVED_KEY] = approved
    return record


Handler = Callable[[SiteSession, Message, Context, SitePolicy], RecordDict]


def _handle(msg: Message, context: Context, work: Handler) -> Message:
    """Run a handler; whatever goes wrong, the centre gets a reason code and never the text.

    Exception messages can name local paths or header values (a patient's folder, a file name),
    so they go to the site's own log (``client/sitelog.py``) with the traceback. The reply carries
    the reason code and, for an unexpected exception, only its type name.

    The site's policy is checked first: a message it refuses reads no data and charges nothing."""
    site_name = str(context.node_config.get("site-name", context.node_config.get("partition-id", "?")))
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = SiteConfig.from_node_config(context.node_config, config.federation)
    except ConfigError as exc:  # no state dir to log to: the message holds config values only
        console.error("site %s cannot take part: %s: %s", site_name, exc.code, exc)
        return Message(_error_reply(site_name, exc.code), reply_to=msg)
    site_name = site.site_name
    with site_logging(site.state_dir):
        try:
            policy = SitePolicy.of_site(site)
            policy.check_run_config(config, trainable_parameter_count(config.model))
            if msg.metadata.message_type == MessageType.TRAIN:
                policy.check_secure_message(is_secure(msg))
            session = open_session(config, site)
            policy.check_training_size(len(session.data.train_index))
            raise_phi_drill(context, site_name, str(site.data_path / "studies" / session.data.studies[0]))
            check_backbone_hash(str(msg.content["config"].get("backbone-hash", "")), session.backbone_hash)
            load_array_record(session.model, global_model(msg, context), config.federation.wire_dtype)
            content = work(session, msg, context, policy)
        except PolicyRefused as exc:
            log.warning("site %s refused the message by its policy: %s", site_name, exc)
            console.warning("site %s refused the message: %s %s (site policy)", site_name, exc.code, exc.key)
            content = _error_reply(site_name, exc.code, policy_key=exc.key)
        except ReasonCodeError as exc:
            if isinstance(exc, GlobalModelNotHeld):  # routine: the centre resends the model itself
                log.info("site %s: %s; asking for the model itself", site_name, exc)
            else:
                log.error("site %s cannot take part: %s", site_name, exc)
                console.warning("site %s cannot take part: %s (details in the site's log)", site_name, exc.code)
            content = _error_reply(site_name, exc.code)
        except Exception as exc:  # noqa: BLE001 - the site must answer, and must not leak the message
            log.exception("site %s: unexpected %s while handling a %s message", site_name, type(exc).__name__,
                          msg.metadata.message_type)
            console.error("site %s: %s (%s); the traceback is in the site's log (STATE_DIR/logs/site.log)",
                          site_name, INTERNAL_ERROR, type(exc).__name__)
            content = _error_reply(site_name, INTERNAL_ERROR, type(exc).__name__)
    return Message(content, reply_to=msg)


def _error_reply(site_name: str, code: str, exception_type: str = "", policy_key: str = "") -> RecordDict:
    record = ConfigRecord({"status": STATUS_ERROR, "reason": code, "site-name": site_name})
    if exception_type:
        record["exception-type"] = exception_type[:80]
    if policy_key:  # a key name from the code, never a value of the site
        record[POLICY_KEY] = policy_key
    return RecordDict({SITE_KEY: record})


INTERNAL_ERROR = "internal-error"
