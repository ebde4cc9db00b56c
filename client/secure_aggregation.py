"""Secure aggregation at a site: Flower's own ``secaggplus_mod``, unmodified, on the train
messages of a run with ``secure-aggregation = true`` (server/secure_aggregation.py drives it).

The mod answers the key-agreement stages itself. In the stage that collects masked vectors it
calls the ClientApp, which trains as usual and returns its *update* (trained minus global, in the
trainable parameters' order) in the layout the mod reads; the mod weights it by num-examples,
quantises and masks it, and clears the plain update from the reply. Only the masked integers,
the metrics and the site record leave the site.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from client.sitelog import console
from common.exchange import SITE_KEY, STATUS_ERROR

log = logging.getLogger(__name__)

UPDATE_KEY = "fitres.parameters"  # where secaggplus_mod reads the vector it masks


def is_secure(msg: Message) -> bool:
    """A message of the SecAgg+ protocol (it carries the protocol's config record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def update_for_masking(start: "OrderedDict[str, np.ndarray]", trained: "OrderedDict[str, np.ndarray]",
                       num_examples: int) -> RecordDict:
    """The update ``trained - start`` in the FitRes layout secaggplus_mod masks."""
    update = [trained[name].astype(np.float32) - start[name].astype(np.float32) for name in start]
    return fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples, {}),
                                keep_input=False)


class _NoUpdate(Exception):
    """The ClientApp answered without an update (an error or an exhausted privacy budget)."""


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's secaggplus_mod on SecAgg+ train messages; pass every other message through.

    A site that cannot produce an update answers with its reason instead of a masked vector: the
    centre then counts it as dropped for the round, which the protocol survives. The mod's state is
    not advanced in that case, so the centre may resend the same stage (e.g. with the model in full)."""
    if msg.metadata.message_type != MessageType.TRAIN or not is_secure(msg):
        return call_next(msg, context)
    refusal: dict[str, Message] = {}

    def train(message: Message, ctx: Context) -> Message:
        reply = call_next(message, ctx)
        if reply.has_error() or UPDATE_KEY not in reply.content.array_records:
            refusal["reply"] = reply
            raise _NoUpdate
        return reply

    try:
        return secaggplus_mod(msg, context, train)
    except _NoUpdate:
        return refusal["reply"]
    except Exception as exc:  # noqa: BLE001 - a protocol failure is answered with a code, not text
        site_name = str(context.node_config.get("site-name", context.node_config.get("partition-id", "?")))
        log.exception("site %s: secure aggregation failed", site_name)
        console.error("site %s: secure aggregation failed (%s)", site_name, type(exc).__name__)
        return Message(RecordDict({SITE_KEY: ConfigRecord({
            "status": STATUS_ERROR, "reason": "secure-aggregation-error", "site-name": site_name,
            "exception-type": type(exc).__name__[:80]})}), reply_to=msg)
