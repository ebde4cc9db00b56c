"""clinicfl ClientApp: a site trains and evaluates the global model on its own data.

Only trainable parameters, counts and aggregate statistics leave the site. A failure is
answered with a reason code (``site`` record), never with paths or header text.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.session import SiteSession, open_session
from client.training import train_local
from common.inference import evaluate_local
from common.config import ConfigError, RunConfig, SiteConfig
from common.data.errors import DataError
from common.exchange import ARRAYS_KEY, METRICS_KEY, SITE_KEY, STATUS_ERROR, STATUS_OK, UpdateError, \
    load_array_record, to_array_record
from common.model import BackboneMismatchError, BackboneWeightsError, check_backbone_hash

log = logging.getLogger(__name__)
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate)


def _train(session: SiteSession, msg: Message) -> RecordDict:
    server_round = int(msg.content["config"].get("server-round", 0))
    result = train_local(session.model, session.inputs, session.data.train_index, session.config.train,
                         session.device, server_round)
    session.refresh_feature_norm()
    return RecordDict({
        ARRAYS_KEY: to_array_record(session.model),
        METRICS_KEY: MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                                   "train-seconds": result.seconds}),
        SITE_KEY: _site_status(session, STATUS_OK),
    })


def _evaluate(session: SiteSession, msg: Message) -> RecordDict:
    stats = evaluate_local(session.model, session.inputs, session.data.test_index, session.device,
                           session.config.eval, session.fid)
    return RecordDict({
        METRICS_KEY: MetricRecord({"num-examples": stats.n, **stats.to_record()}),
        SITE_KEY: _site_status(session, STATUS_OK),
    })


def _site_status(session: SiteSession, status: str) -> ConfigRecord:
    return ConfigRecord({"status": status, "site-name": session.site.site_name,
                         "backbone-hash": session.backbone_hash})


def _handle(msg: Message, context: Context, work: Callable[[SiteSession, Message], RecordDict]) -> Message:
    site_name = str(context.node_config.get("site-name", context.node_config.get("partition-id", "?")))
    try:
        config = RunConfig.from_mapping(context.run_config)
        site = SiteConfig.from_node_config(context.node_config, config.federation)
        site_name = site.site_name
        session = open_session(config, site)
        check_backbone_hash(str(msg.content["config"].get("backbone-hash", "")), session.backbone_hash)
        load_array_record(session.model, msg.content[ARRAYS_KEY])
        content = work(session, msg)
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
