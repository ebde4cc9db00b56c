"""A federation in this process: the project's own ServerApp and ClientApp, with no SuperLink or Ray.

Studies run dozens of federations; a Flower simulation costs 20-40 s of start-up each. Here the
apps named in ``pyproject.toml`` (``[tool.flwr.app.components]``) are loaded exactly as Flower
loads them, and ``InProcessGrid`` implements Flower's ``Grid`` for the ServerApp: every message
is serialised to Flower's wire format, handed to the ClientApp (mods included) with that node's
own ``Context`` (its state persists across rounds, as a SuperNode keeps it), and the reply comes
back the same way. A ClientApp that raises is answered with Flower's error reply, as the real
runtime answers it. The run config is the app's defaults with the overrides fused on top, as
``flwr run --run-config`` fuses them.

``reply_filter`` is a fault-injection seam for tests and drills: a function applied to every
reply after it has crossed the wire and before the ServerApp sees it (it may change the reply's
content or return another message), as a site that sends something else would.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import random
import re
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid

from common.processes import absolute_paths

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SERVER_NODE_ID = 0
_RUN_DIR_LINE = re.compile(r"clinicfl: run directory (\S.*)$", re.MULTILINE)
ReplyFilter = Callable[[Message], Message]  # a reply as the site sent it -> the reply the ServerApp gets


def app_components(project: Path = PROJECT_ROOT) -> tuple[Any, Any, dict[str, Any]]:
    """(ServerApp, ClientApp, default run config) as ``pyproject.toml`` declares them."""
    with (project / "pyproject.toml").open("rb") as handle:
        app = tomllib.load(handle)["tool"]["flwr"]["app"]
    return _load(app["components"]["serverapp"]), _load(app["components"]["clientapp"]), dict(app["config"])


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


class InProcessGrid(Grid):
    def __init__(self, client_app: Any, run_config: dict[str, Any], num_nodes: int, run_id: int,
                 reply_filter: ReplyFilter | None = None) -> None:
        self.client_app = client_app
        self.reply_filter = reply_filter  # fault injection: applied to each reply before the ServerApp sees it
        self._run = Run.create_empty(run_id)
        # Node ids are random 63-bit numbers, as a SuperLink assigns them; partition i is node i.
        rng = random.Random(run_id)
        self.nodes = {rng.randrange(1, 2 ** 63): partition for partition in range(num_nodes)}
        self.contexts = {node: Context(run_id=run_id, node_id=node,
                                       node_config={"partition-id": p, "num-partitions": num_nodes},
                                       state=RecordDict(), run_config=dict(run_config))
                         for node, p in self.nodes.items()}
        self.waiting: dict[str, Message] = {}  # pushed messages' replies, by the id they answer
        self.bytes_sent = 0  # wire bytes, server -> sites
        self.bytes_received = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message is answered at once; its reply waits for ``pull_messages``."""
        ids = []
        for reply in self.send_and_receive(messages):
            self.waiting[reply.metadata.reply_to_message_id] = reply
            ids.append(reply.metadata.reply_to_message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            message.metadata.__dict__["_run_id"] = self._run.run_id
            message.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            replies.append(self._deliver(message))
        return replies

    def _deliver(self, message: Message) -> Message:
        """One message over the 'wire' to its node's ClientApp and the reply back."""
        wire = message_to_proto(message).SerializeToString()
        self.bytes_sent += len(wire)
        received = message_from_proto(ProtoMessage.FromString(wire))
        node = received.metadata.dst_node_id
        try:
            reply = self.client_app(received, self.contexts[node])
        except Exception as exc:  # noqa: BLE001 - Flower's runtime answers an exception with an error reply
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=type(exc).__name__),
                            reply_to=received)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        back = message_to_proto(reply).SerializeToString()
        self.bytes_received += len(back)
        arrived = message_from_proto(ProtoMessage.FromString(back))
        return self.reply_filter(arrived) if self.reply_filter is not None else arrived


@contextlib.contextmanager
def _task_identity(run_id: int):
    """Flower's messages take their run and sender from the process's task identity, which the
    Flower runtime sets before it starts a ServerApp; here we set it for the run's duration."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run_id, run_id, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_inprocess(data_root: Path, run_root: Path, num_sites: int, overrides: dict[str, Any] | None = None,
                  quiet: bool = True, reply_filter: ReplyFilter | None = None) -> Path:
    """A whole federated run over the site folders under ``data_root``; returns its run directory.
    ``quiet`` keeps the ServerApp's per-round lines off the console (they are in the run dir);
    ``reply_filter`` changes each site's reply before the ServerApp sees it (module docstring)."""
    server_app, client_app, defaults = app_components()
    values = absolute_paths({"data-root": str(data_root), "run-dir": str(run_root), **(overrides or {})})
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown run-config key(s): {', '.join(unknown)}")
    run_config = {**defaults, **values}
    run_id = random.Random(time.time_ns()).randrange(1, 2 ** 63)
    grid = InProcessGrid(client_app, run_config, num_sites, run_id, reply_filter)
    context = Context(run_id=run_id, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    output = io.StringIO()
    with _task_identity(run_id), contextlib.redirect_stdout(output) if quiet else contextlib.nullcontext():
        server_app(grid, context)
    found = _RUN_DIR_LINE.search(output.getvalue()) if quiet else None
    run_dir = Path(found.group(1).strip()) if found else next(Path(values["run-dir"]).glob(f"*-run{run_id}"))
    (run_dir / "server.log").write_text(output.getvalue())
    return run_dir
