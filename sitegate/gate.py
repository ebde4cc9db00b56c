"""The gate's two processes, as Flower's own runtime has them in ``subprocess`` isolation:

- ``executor`` (long-running, in place of ``flower-superexec``): asks the SuperNode's Runtime API
  for ClientApp tasks, authenticated with the secret the SuperNode was started with, and starts one
  ``task`` process per message, forked from a warm ``zygote`` (below) unless ``--no-preload``;
- ``task`` (one per message, in place of ``flwr-clientapp``): pulls the message and the app bundle,
  checks the bundle's hash against the approved list (sitegate/approvals.py), then refuses, or
  unpacks exactly those bytes into a fresh private folder (sitegate/bundle.py) and runs the app
  from there with Flower's ClientApp runtime functions, and pushes the reply.

- ``zygote`` (long-running, started by the executor): imports the heavy libraries the site itself
  installed (NumPy, PyTorch, torchvision, Flower) once, then forks one ``task`` per message. A
  fresh process would spend about 3 s of every message importing them. It never imports code
  of any app bundle (only the forked task does, after the hash check), and it runs no PyTorch
  operation, so the forked task starts from a clean state.

Every decision is one line in the gate's log (run id, bundle id and version, hash, decision).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, \
    SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from sitegate.approvals import APPROVED_BUNDLE_ENV, ApprovalsError, approvals_warnings, approved_hashes
from sitegate.bundle import remove_leftovers, remove_unpacked, unpack_bundle

REFUSAL = "app-not-approved"
log = logging.getLogger("sitegate")


def _client(address: str, interceptors: list) -> RuntimeHttpClient:
    # The Runtime API listens on the SuperNode's loopback port (plain HTTP on 127.0.0.1).
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


# Site-installed libraries the zygote imports before forking tasks; never a bundle's modules.
PRELOAD = ("numpy", "torch", "torchvision", "pydicom", "flwr.app", "flwr.clientapp", "flwr.clientapp.utils",
           "flwr.supernode.runtime.run_clientapp")


def preload() -> list[str]:
    """Import the PRELOAD libraries that are installed; returns the ones imported."""
    loaded = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except ImportError:
            continue
    return loaded


def executor(address: str, secret_file: Path, approvals: Path, install_root: Path, log_file: str | None,
             poll: float = 0.2, warm: bool = True) -> None:
    secret = secret_file.read_bytes()
    client = _client(address, [RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                               SuperExecAuthHttpInterceptor(master_secret=secret,
                                                            protected_methods={"/flwr.proto.Runtime/AcquireTask"})])
    log.info("gate running: SuperNode %s, approvals %s, tasks %s", address, approvals,
             "forked from a warm zygote" if warm else "in fresh processes")
    log_approvals_state(approvals)
    removed = remove_leftovers(install_root)  # left by a crash (folders of tasks still running are kept)
    if removed:
        log.info("removed %d leftover folder(s) from %s: %s", len(removed), install_root, ", ".join(removed))
    common = ["--runtime-api-address", address, "--approvals", str(approvals), "--install-root", str(install_root)]
    common += ["--log-file", log_file] if log_file else []
    running: list[subprocess.Popen] = []

    def start_zygote() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sitegate", "zygote", *common], stdin=subprocess.PIPE, text=True)

    zygote = start_zygote() if warm else None  # started now: the first message need not wait for its imports
    while True:
        running = [p for p in running if p.poll() is None]  # reap finished tasks (no zombies)
        reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if reply.HasField("task") and reply.token:
            # The token goes on stdin, not the command line, where any local user could read it.
            if zygote is not None:
                if zygote.poll() is not None:
                    log.warning("zygote exited (%s); starting a new one", zygote.returncode)
                    zygote = start_zygote()
                zygote.stdin.write(reply.token + "\n")
                zygote.stdin.flush()
                continue
            process = subprocess.Popen([sys.executable, "-m", "sitegate", "task", *common], stdin=subprocess.PIPE,
                                       text=True)
            process.stdin.write(reply.token)
            process.stdin.close()
            running.append(process)
            continue
        time.sleep(poll)


def log_approvals_state(approvals: Path) -> None:
    """One line at the gate's start on whether the list is trusted, and any weakness it has."""
    try:
        log.info("approvals list %s: %d bundle(s) approved", approvals, len(approved_hashes(approvals)))
        for warning in approvals_warnings(approvals):
            log.warning("approvals list: %s", warning)
    except ApprovalsError as exc:
        log.error("every app bundle will be refused: %s", exc)


def check_approval(approvals: Path, digest: str, fab_hash: str, run_fab_hash: str) -> str | None:
    """None when the bundle may run, else why not (for the gate's log)."""
    try:
        approved = approved_hashes(approvals)
    except ApprovalsError as exc:
        return str(exc)
    if digest not in approved:
        return "not approved"
    if not digest == fab_hash == run_fab_hash:  # the SuperLink's claims must match the bytes as well
        return f"the SuperLink's hashes ({fab_hash}, {run_fab_hash}) do not match the bundle's bytes"
    return None


def zygote(address: str, approvals: Path, install_root: Path) -> None:
    """Preload, then fork one task per token line on stdin until stdin closes."""
    log.info("zygote preloaded %s", ", ".join(preload()))
    for line in sys.stdin:
        while True:  # reap finished tasks (no zombies)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        token = line.strip()
        if not token:
            continue
        if os.fork() == 0:
            code = 1
            try:
                task(address, token, approvals, install_root)
                code = 0
            finally:
                logging.shutdown()
                os._exit(code)


# The SuperNode hands out a task as soon as a message has arrived, while it may still be fetching
# the message's arrays from the SuperLink. Flower's pull_task_input then waits 1 s, 2 s, ... for
# them; an evaluation message (which carries the model) lost about a second at every site that way.
# Here the task asks again after 20 ms, then at intervals doubling up to 0.5 s.
TASK_INPUT_FIRST_RETRY_S = 0.02
TASK_INPUT_LONGEST_RETRY_S = 0.5


def pull_task_input(client: RuntimeHttpClient) -> tuple:
    """Flower's ``run_clientapp.pull_task_input`` (1.42), with the short retry intervals above."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                      make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        # Flower's 500 tries per object stay: at 0.5 s a task whose message never arrives (its
        # SuperLink restarted) gives up after about 4 min instead of blocking the site for 2 h.
        return_type=Message, initial_backoff=TASK_INPUT_FIRST_RETRY_S, backoff_cap=TASK_INPUT_LONGEST_RETRY_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the inflated message lacks its own id
    return message, context, run, fab


def task(address: str, token: str, approvals: Path, install_root: Path) -> None:
    # Flower's runtime helpers only: no code of the bundle is imported before the check.
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = app_dir = None
    status, details = SubStatus.FAILED, "unknown"
    marks = [("start", time.perf_counter())]  # where a task's time goes, for the gate's log
    try:
        message, context, run, fab = pull_task_input(client)
        marks.append(("fetch", time.perf_counter()))
        digest = hashlib.sha256(fab.content).hexdigest()
        refusal = check_approval(approvals, digest, fab.hash_str, run.fab_hash)
        log.info("run %s bundle %s==%s sha256 %s: %s", run.run_id, run.fab_id, run.fab_version, digest,
                 "approved" if refusal is None else f"REFUSED ({refusal})")
        if refusal is not None:
            details = f"{REFUSAL} fab_hash={digest}"  # the centre sees the code and the hash, nothing else
            reply = Message(Error(ErrorCode.INVALID_FAB, details), reply_to=message)
            return
        # Exactly the bytes just hashed, in a folder of this task's own: no installed copy is trusted.
        app_dir = unpack_bundle(fab.content, install_root)
        os.environ[APPROVED_BUNDLE_ENV] = digest  # this task process runs this one bundle only
        sys.dont_write_bytecode = True  # no .pyc beside a copy that is removed when the task ends
        marks.append(("unpack", time.perf_counter()))
        load = get_load_client_app_fn(default_app_ref="", app_path=str(app_dir), multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)  # the bundle's first code runs here
        marks.append(("load app", time.perf_counter()))
        reply = client_app(message=message, context=context)
        marks.append(("handle", time.perf_counter()))
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - the runtime's own error reply (the app catches its own)
        details = f"{type(exc).__name__}"
        log.exception("task failed")
        if message is not None:
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
            marks.append(("push", time.perf_counter()))
        finally:
            heartbeat.stop()
            client.close()
            # This task's copy goes with it, and so do those of tasks that were killed.
            if app_dir is not None:
                remove_unpacked(app_dir)
            remove_leftovers(install_root)
            marks.append(("remove", time.perf_counter()))
        log.info("task %s in %.2f s: %s", message.metadata.message_type if message is not None else "?",
                 marks[-1][1] - marks[0][1],
                 ", ".join(f"{name} {b - a:.2f} s" for (_, a), (name, b) in zip(marks, marks[1:])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sitegate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("executor", "task", "zygote"):
        p = sub.add_parser(name)
        p.add_argument("--runtime-api-address", required=True)
        p.add_argument("--approvals", required=True)
        p.add_argument("--install-root", required=True)
        p.add_argument("--log-file")
        if name == "executor":
            p.add_argument("--secret-file", required=True)
            p.add_argument("--no-preload", action="store_true",
                           help="start every task as a fresh process instead of forking it from a warm zygote")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", filename=args.log_file)
    logging.getLogger("flwr").propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
    if args.command == "executor":
        try:
            executor(args.runtime_api_address, Path(args.secret_file), Path(args.approvals), Path(args.install_root),
                     args.log_file, warm=not args.no_preload)
        except Exception:  # the site daemon starts the gate again; its log says why it ended
            log.exception("gate executor ended")
            raise SystemExit(1) from None
    elif args.command == "zygote":
        zygote(args.runtime_api_address, Path(args.approvals), Path(args.install_root))
    else:
        task(args.runtime_api_address, sys.stdin.read().strip(), Path(args.approvals), Path(args.install_root))
