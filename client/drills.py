"""Fault drills: a site can check that the centre rejects bad updates, for real, over the wire.

With node config ``drill = "nan-update"`` or ``drill = "wrong-shape-update"`` the site corrupts
the first parameter of each training reply it sends. The centre must reject the reply with its
reason and keep the global model finite. Off (and a no-op) unless the SuperNode sets it; the
deployment tests use it to prove reply validation end to end.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.exchange import ARRAYS_KEY

log = logging.getLogger(__name__)
DRILLS = ("nan-update", "wrong-shape-update")


def fault_drill(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    drill = str(context.node_config.get("drill", ""))
    if drill not in DRILLS or msg.metadata.message_type != "train" or reply.has_error() \
            or ARRAYS_KEY not in reply.content.array_records:
        return reply
    arrays = reply.content[ARRAYS_KEY]
    name = next(iter(arrays.keys()))
    value = np.array(arrays[name].numpy(), copy=True)
    if drill == "nan-update":
        value.reshape(-1)[0] = np.nan
    else:
        value = value.reshape(-1)[:-1].copy()
    arrays[name] = Array(value)
    log.warning("fault drill %s: corrupted %s in the training reply", drill, name)
    return reply
