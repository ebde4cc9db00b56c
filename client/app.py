"""clinicfl ClientApp: a site trains and evaluates the global model on its own data.

Only trainable parameters, counts and aggregate statistics leave the site. A failure is
answered with a reason code (``site`` record), never with paths or header text.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_outgoing
from client.drills import fault_drill
from client.session import SiteSession, open_session
from client.training import train_local
from common.inference import evaluate_local
from common.config import ConfigError, RunConfig, SiteConfig
from common.data.errors import DataError
from client.privacy import STATE_KEY as PRIVACY_STATE_KEY
from client.privacy import BudgetExhausted, PrivacyLedger, SitePrivacy, privacy_units, train_private
from common.exchange import ARRAYS_KEY, METRICS_KEY, SITE_KEY, STATUS_BUDGET_EXHAUSTED, STATUS_ERROR, STATUS_OK, \
    UpdateError, load_array_record, to_array_record
from common.model import BackboneMismatchError, BackboneWeightsError, check_backbone_hash

log = logging.getLogger(__name__)
# The audit mod is outermost: it sees each reply exactly as Flower sends it (drills included).
app = ClientApp(mods=[audit_outgoing, fault_drill])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate)


def _train(session: SiteSession, msg: Message, context: Context) -> RecordDict:
    server_round = int(msg.content["config"].get("server-round", 0))
    if session.config.privacy.dp_enabled:
        return _train_private(session, msg, context, server_round)
    result = train_local(session.model, session.inputs, session.data.train_index, session.config.train,
                         session.device, server_round)
    session.refresh_feature_norm()
    return RecordDict({
        ARRAYS_KEY: to_array_record(session.model),
        METRICS_KEY: MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                                   "train-seconds": result.seconds}),
        SITE_KEY: _site_status(session, STATUS_OK),
    })


def _train_private(session: SiteSession, msg: Message, context: Context, server_round: int) -> RecordDict:
    """DP-SGD with the site's ledger: loaded from disk and context.state, saved to both."""
    config = session.config
    budget_id = str(msg.content["config"].get("budget-id", context.run_id))
    state = context.state.config_records.get(PRIVACY_STATE_KEY)
    ledger = PrivacyLedger.load(session.site, budget_id, config.privacy.dp_accountant,
                                str(state["ledger"]) if state is not None and "ledger" in state else None)
    units = privacy_units(session.data.train_index, session.data.groups, config.privacy.dp_unit)
    budget = SitePrivacy.resolve(config.privacy, session.site, len(units))
    try:
        result = train_private(session.model, session.inputs, units, config, budget, ledger, session.device,
                               server_round)
    except BudgetExhausted as exc:
        log.warning("site %s: %s", session.site.site_name, exc)
        status = _site_status(session, STATUS_BUDGET_EXHAUSTED)
        status["reason"] = STATUS_BUDGET_EXHAUSTED
        status["dp-epsilon"] = exc.spent
        status["dp-budget"] = exc.budget
        return RecordDict({SITE_KEY: status})
    finally:
        text = ledger.save(session.site, budget_id)  # a calibrated noise multiplier is kept even unspent
        context.state[PRIVACY_STATE_KEY] = ConfigRecord({"ledger": text})
    return RecordDict({
        ARRAYS_KEY: to_array_record(session.model),
        METRICS_KEY: MetricRecord({"num-examples": result.train.num_examples, "train-loss": result.train.loss,
                                   "train-seconds": result.train.seconds, **result.metrics()}),
        SITE_KEY: _site_status(session, STATUS_OK),
    })


def _evaluate(session: SiteSession, msg: Message, context: Context) -> RecordDict:
    stats = evaluate_local(session.model, session.inputs, session.data.test_index, session.device,
                           session.config.eval, session.fid)
    return RecordDict({
        METRICS_KEY: MetricRecord({"num-examples": stats.n, **stats.to_record()}),
        SITE_KEY: _site_status(session, STATUS_OK),
    })


def _site_status(session: SiteSession, status: str) -> ConfigRecord:
    return ConfigRecord({"status": status, "site-name": session.site.site_name,
                         "backbone-hash": session.backbone_hash})


def _handle(msg: Message, context: Context, work: Callable[[SiteSession, Message, Context], RecordDict]) -> Message:
    site_name = str(context.node_config.get("site-name", context.node_config.get("partition-id", "?")))
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = SiteConfig.from_node_config(context.node_config, config.federation)
        site_name = site.site_name
        session = open_session(config, site)
        check_backbone_hash(str(msg.content["config"].get("backbone-hash", "")), session.backbone_hash)
        load_array_record(session.model, msg.content[ARRAYS_KEY])
        content = work(session, msg, context)
    except (DataError, ConfigError, BackboneMismatchError, BackboneWeightsError, UpdateError) as exc:
        # The full message (it may name local paths) stays in the site's log; the server gets a code.
        code = getattr(exc, "code", None) or _CODES[type(exc)]
        log.error("site %s cannot take part: %s", site_name, exc)
        content = RecordDict({SITE_KEY: ConfigRecord({"status": STATUS_ERROR, "reason": code,
                                                      "site-name": site_name})})
    return Message(content, reply_to=msg)


_CODES: dict[type, str] = {
    ConfigError: "config-error",
    BackboneMismatchError: "backbone-mismatch",
    BackboneWeightsError: "backbone-weights-unavailable",
    UpdateError: "bad-global-parameters",
}
