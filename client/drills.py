"""Fault drills: a site can check, for real and over the wire, how the centre handles its faults.

- ``nan-update``, ``wrong-shape-update``: the site corrupts the first parameter of each training
  reply. The centre must reject the reply with its reason and keep the global model finite.
- ``raise-phi``: the handler raises an exception whose message names one of the site's image
  files (a path with the patient's folder in it). The centre must get the reason code
  ``internal-error`` and the exception type only; the text stays in the site's own log.

A deployment site sets ``drill`` in its node config. A simulation (node config ``partition-id``)
may also take it from the run config keys ``drill`` and ``drill-sites`` (comma-separated site
names, empty = every site); a deployment site ignores the run config, so the centre can never
start a drill at a hospital. Off, and a no-op, by default.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.exchange import ARRAYS_KEY, numpy_of

log = logging.getLogger(__name__)
REPLY_DRILLS = ("nan-update", "wrong-shape-update")
DRILLS = (*REPLY_DRILLS, "raise-phi")


def active_drill(context: Context, site_name: str | None = None) -> str:
    """The drill this site runs now ('' for none)."""
    if "drill" in context.node_config:
        return str(context.node_config["drill"])
    if "partition-id" not in context.node_config:
        return ""
    drill = str(context.run_config.get("drill", ""))
    sites = [s.strip() for s in str(context.run_config.get("drill-sites", "")).split(",") if s.strip()]
    return drill if not sites or (site_name is not None and site_name in sites) else ""


class DrillError(OSError):
    """The exception the ``raise-phi`` drill raises (an OSError, as an unreadable file would)."""


def raise_phi_drill(context: Context, site_name: str, some_file: str) -> None:
    if active_drill(context, site_name) == "raise-phi":
        raise DrillError(f"[drill raise-phi] cannot read {some_file}")


def fault_drill(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    site = reply.content.config_records.get("site") if not reply.has_error() else None
    drill = active_drill(context, str(site.get("site-name")) if site is not None else None)
    if drill not in REPLY_DRILLS or msg.metadata.message_type != "train" or reply.has_error() \
            or ARRAYS_KEY not in reply.content.array_records:
        return reply
    arrays = reply.content[ARRAYS_KEY]
    name = next(iter(arrays.keys()))
    value = np.array(numpy_of(arrays[name]), copy=True)
    if drill == "nan-update":
        value.reshape(-1)[0] = np.nan
    else:
        value = value.reshape(-1)[:-1].copy()
    arrays[name] = Array(value)
    log.warning("fault drill %s: corrupted %s in the training reply", drill, name)
    return reply
