"""An audit copy of everything a site sends: with node config ``audit-outgoing = true`` (or the
run config key of the same name), every reply the ClientApp hands to Flower is written, as the
exact protobuf bytes that go on the wire, to ``STATE_DIR/audit/``. A site's privacy officer can
inspect what left the building; the PHI tests scan these bytes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import message_to_proto

from common.config import ConfigError, RunConfig, SiteConfig
from common.files import atomic_write_bytes

log = logging.getLogger(__name__)


def audit_dir(context: Context) -> Path | None:
    """Where to keep the copies, or None when auditing is off (or the site is misconfigured:
    the handler then reports that itself)."""
    enabled = bool(context.node_config.get("audit-outgoing", False)) or bool(
        context.run_config.get("audit-outgoing", False))
    if not enabled:
        return None
    try:
        federation = RunConfig.from_mapping(context.run_config).federation
        return SiteConfig.from_node_config(context.node_config, federation).state_dir / "audit"
    except ConfigError:
        return None


def audit_outgoing(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: pass the message on, keep a byte-exact copy of the reply."""
    reply = call_next(msg, context)
    folder = audit_dir(context)
    if folder is not None:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{msg.metadata.message_type}-{msg.metadata.message_id[:12]}.pb"
        try:
            atomic_write_bytes(folder / name, message_to_proto(reply).SerializeToString())
        except OSError as exc:
            log.error("cannot write the audit copy %s: %s", name, exc.strerror)
    return reply
