"""The site gate's own guarantees, calling its functions directly (no SuperNode, no network):

- the gate runs exactly the approved bundle's bytes: an installed file edited (by a bundle that
  ran, or on disk between runs) or a half-finished install is never what runs next;
- the approvals list is trusted only when the account that runs bundles cannot change it (owner
  root or the site's approvals admin, writable by its owner only), and a list that is not trusted
  refuses every bundle with the centre's usual ``app-not-approved``.

``task`` runs here with Flower's Runtime API calls replaced by a fake that hands it one message and
keeps its reply. In the gate every task is a fresh process; here each call forgets the modules the
bundle imported, as a fresh process would.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.cli.build import build_fab_from_files
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supernode.runtime import run_clientapp

from sitegate import approvals as approvals_module
from sitegate import gate
from sitegate.approvals import ADMIN_ENV, approvals_file, approve, approved_hashes, bundle_hash, read_approvals

APP = "gatetestapp"
NO_SUCH_PID = 2 ** 22 + 1  # above Linux's largest pid_max: never a running process
PYPROJECT = f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP}"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "clinicfl"

[tool.flwr.app.components]
serverapp = "{APP}.server:app"
clientapp = "{APP}.client:app"
'''.encode()
# The ClientApp answers with ANSWER from its answer.py. Asked to, it then rewrites its own
# installed answer.py, as any approved bundle could: it runs as the account that owns the folder.
CLIENT = f'''from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from {APP}.answer import ANSWER

app = ClientApp()


@app.train()
def train(msg, context):
    if msg.content["config"]["tamper"]:
        Path(__file__).with_name("answer.py").write_text('ANSWER = "edited"\\n')
    return Message(RecordDict({{"reply": ConfigRecord({{"answer": ANSWER}})}}), reply_to=msg)
'''.encode()
FILES = {"pyproject.toml": PYPROJECT, f"{APP}/__init__.py": b"", f"{APP}/answer.py": b'ANSWER = "approved"\n',
         f"{APP}/client.py": CLIENT, f"{APP}/server.py": b"app = None\n"}


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return build_fab_from_files(FILES)[0]


@pytest.fixture(autouse=True)
def site_admin(monkeypatch):
    """Tests approve as the site admin: root runs as root; anyone else names themselves the
    approvals admin, as a single-account test machine must."""
    if os.geteuid() == 0:
        monkeypatch.delenv(ADMIN_ENV, raising=False)
    else:
        monkeypatch.setenv(ADMIN_ENV, str(os.geteuid()))


@pytest.fixture
def site(tmp_path, bundle) -> dict[str, Path]:
    """A site whose admin approved ``bundle``."""
    state = tmp_path / "state"
    state.mkdir()
    approve(approvals_file(state), bundle_hash(bundle), "test bundle")
    return {"approvals": approvals_file(state), "apps": state / "apps"}


class FakeRuntime:
    """Flower's Runtime API as ``task`` uses it: one message in, its reply and status kept."""

    def __init__(self, monkeypatch, bundle: bytes, tamper: bool = False) -> None:
        digest = bundle_hash(bundle)
        meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=1.0e9, ttl=600.0, message_type="train")
        message = make_message(meta, content=RecordDict({"config": ConfigRecord({"tamper": tamper})}))
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        run = Run.create_empty(1)
        run.fab_id, run.fab_version, run.fab_hash = f"clinicfl/{APP}", "1.0.0", digest
        fab = Fab(hash_str=digest, content=bundle, verifications={})
        self.replies: list[Message] = []
        self.statuses: list[tuple[str, str]] = []
        monkeypatch.setattr(gate, "_client", lambda address, interceptors: self)
        monkeypatch.setattr(gate, "HeartbeatSender", _NoHeartbeat)
        monkeypatch.setattr(gate, "pull_task_input", lambda client: (message, context, run, fab))
        monkeypatch.setattr(run_clientapp, "push_message", lambda client, reply, ctx: self.replies.append(reply))
        monkeypatch.setattr(run_clientapp, "push_task_output",
                            lambda client, ctx, status, details: self.statuses.append((status, details)))

    def close(self) -> None:
        pass


class _NoHeartbeat:
    def __init__(self, fn) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def run_task(monkeypatch, bundle: bytes, site: dict[str, Path], tamper: bool = False) -> Message:
    """One message through ``gate.task``, as the gate's forked task process would handle it."""
    runtime = FakeRuntime(monkeypatch, bundle, tamper)
    path, bytecode = list(sys.path), sys.dont_write_bytecode
    try:
        gate.task("127.0.0.1:0", "token", site["approvals"], site["apps"])
    finally:  # what the task process took with it when it ended
        sys.path[:] = path
        sys.dont_write_bytecode = bytecode
        for name in [m for m in sys.modules if m == APP or m.startswith(f"{APP}.")]:
            del sys.modules[name]
    assert len(runtime.replies) == 1, runtime.statuses
    return runtime.replies[0]


def answer(reply: Message) -> str:
    assert not reply.has_error(), reply.error
    return reply.content["reply"]["answer"]


def flower_install_path(site: dict[str, Path], bundle: bytes) -> Path:
    """Where ``install_from_fab(install_dir=APPS/<sha256>)`` installs (and finds) the bundle."""
    digest = bundle_hash(bundle)
    return site["apps"] / digest / "apps" / f"clinicfl.{APP}.1.0.0.{digest[:8]}"


# --- the gate runs exactly the approved bytes ---------------------------------------------------


def test_an_installed_file_edited_between_runs_never_runs(monkeypatch, bundle, site):
    assert answer(run_task(monkeypatch, bundle, site)) == "approved"
    for installed in site["apps"].rglob("answer.py"):  # whatever install the gate kept
        installed.write_text('ANSWER = "edited"\n')
    assert answer(run_task(monkeypatch, bundle, site)) == "approved"
    assert not any(site["apps"].iterdir()), "nothing is kept after a task"


def test_a_bundle_that_edits_its_own_installed_files_cannot_change_the_next_run(monkeypatch, bundle, site):
    assert answer(run_task(monkeypatch, bundle, site, tamper=True)) == "approved"
    assert answer(run_task(monkeypatch, bundle, site)) == "approved"


def test_an_edited_install_left_in_flowers_place_never_runs(monkeypatch, bundle, site):
    installed = flower_install_path(site, bundle)
    for name, data in FILES.items():
        (installed / name).parent.mkdir(parents=True, exist_ok=True)
        (installed / name).write_bytes(data)
    (installed / APP / "answer.py").write_text('ANSWER = "edited"\n')
    assert answer(run_task(monkeypatch, bundle, site)) == "approved"


def test_a_half_finished_install_and_leftover_folders_are_never_run(monkeypatch, bundle, site):
    installed = flower_install_path(site, bundle)  # a crash while copying: answer.py never arrived
    for name, data in FILES.items():
        if not name.endswith("answer.py"):
            (installed / name).parent.mkdir(parents=True, exist_ok=True)
            (installed / name).write_bytes(data)
    leftover = site["apps"] / f"task-{NO_SUCH_PID}-x1"  # the copy of a task that was killed
    (leftover / APP).mkdir(parents=True)
    (leftover / APP / "answer.py").write_text('ANSWER = "edited"\n')
    (site["apps"] / ".approved-x.tmp").write_text("{}")
    assert answer(run_task(monkeypatch, bundle, site)) == "approved"
    assert not any(site["apps"].iterdir()), "leftovers are removed"


def test_the_unpacked_copy_is_exactly_the_bundle(tmp_path, bundle):
    from sitegate.bundle import BundleError, remove_unpacked, unpack_bundle

    app_dir = unpack_bundle(bundle, tmp_path / "apps")
    assert stat.S_IMODE(app_dir.stat().st_mode) == 0o700, "private to the task"
    unpacked = {p.relative_to(app_dir).as_posix(): p.read_bytes() for p in app_dir.rglob("*") if p.is_file()}
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        assert unpacked == {name: archive.read(name) for name in archive.namelist() if name != ".info/CONTENT"}
    remove_unpacked(app_dir)
    assert not app_dir.exists()
    # a bundle whose file differs from its own manifest (a damaged or hand-made zip) is not unpacked
    damaged = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bundle)) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            target.writestr(info, b'ANSWER = "edited"\n' if info.filename.endswith("answer.py") else source.read(info))
    with pytest.raises(BundleError, match="answer.py does not match"):
        unpack_bundle(damaged.getvalue(), tmp_path / "apps")
    assert not any((tmp_path / "apps").iterdir())


def test_leftover_sweep_keeps_the_folders_of_running_tasks(tmp_path):
    from sitegate.bundle import remove_leftovers

    running, killed = tmp_path / f"task-{os.getpid()}-a", tmp_path / f"task-{NO_SUCH_PID}-b"
    older = tmp_path / ("0" * 64)  # an install of an older gate
    for folder in (running, killed, older):
        folder.mkdir()
    assert sorted(remove_leftovers(tmp_path)) == sorted([killed.name, older.name])
    assert [p.name for p in tmp_path.iterdir()] == [running.name]


# --- the approvals list is trusted only if the bundles' account cannot change it ---------------


def test_approve_writes_a_list_only_its_owner_can_change_and_it_is_accepted(bundle, site):
    path = site["approvals"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert path.stat().st_uid == os.geteuid() == path.parent.stat().st_uid
    assert approved_hashes(path) == {bundle_hash(bundle)}


@pytest.mark.parametrize("target, mode, who", [("file", 0o664, "its group"), ("file", 0o646, "others"),
                                                ("folder", 0o775, "its group"), ("folder", 0o757, "others")])
def test_a_list_writable_by_group_or_others_is_refused(site, target, mode, who):
    path = site["approvals"] if target == "file" else site["approvals"].parent
    os.chmod(path, mode)
    fix = re.escape(f"chmod {0o644 if target == 'file' else 0o755:04o} {path}")
    with pytest.raises(ValueError, match=f"writable by {who}.*fix: {fix}"):
        approved_hashes(site["approvals"])


@pytest.mark.parametrize("target", ["file", "folder"])
def test_a_list_owned_by_another_account_is_refused(monkeypatch, site, target):
    path = site["approvals"] if target == "file" else site["approvals"].parent
    if os.geteuid() == 0:
        os.chown(path, 65534, -1)  # nobody
    else:  # the test's own account, once it is not the site's approvals admin: it runs the bundles
        monkeypatch.delenv(ADMIN_ENV)
    fix = re.escape(f"fix (as root): chown root:root {path}")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} belongs to .*, not to root.*{fix}"):
        approved_hashes(site["approvals"])


def test_the_approvals_admin_the_site_names_may_own_the_list(monkeypatch, site, bundle):
    if os.geteuid() == 0:
        os.chown(site["approvals"], 65534, -1)  # nobody, named the approvals admin below
    owner = site["approvals"].stat().st_uid
    monkeypatch.setenv(ADMIN_ENV, str(owner))
    assert approved_hashes(site["approvals"]) == {bundle_hash(bundle)}
    monkeypatch.setenv(ADMIN_ENV, "no-such-account-here")
    with pytest.raises(ValueError, match="no such account"):
        approved_hashes(site["approvals"])


def test_only_root_or_the_approvals_admin_may_approve(monkeypatch, site, bundle):
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    monkeypatch.setattr(approvals_module.os, "geteuid", lambda: 54321)  # an account that runs bundles
    before = site["approvals"].read_bytes()
    with pytest.raises(ValueError, match=f"sudo clinicfl-client.*{ADMIN_ENV}=uid 54321"):
        approve(site["approvals"], "a" * 64, "self-approved")
    assert site["approvals"].read_bytes() == before


def test_approve_does_not_build_on_a_list_that_is_not_trusted(site):
    os.chmod(site["approvals"], 0o666)  # someone else may have added a hash: it must not be carried over
    before = site["approvals"].read_bytes()
    with pytest.raises(ValueError, match="not trusted"):
        approve(site["approvals"], "b" * 64, "next release")
    assert site["approvals"].read_bytes() == before


def test_the_gate_refuses_every_bundle_while_the_list_is_not_trusted(monkeypatch, caplog, bundle, site):
    os.chmod(site["approvals"], 0o664)
    with caplog.at_level(logging.INFO, logger="sitegate"):
        reply = run_task(monkeypatch, bundle, site)
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert reply.error.reason == f"app-not-approved fab_hash={bundle_hash(bundle)}", "the centre's usual refusal"
    refusal = [r.getMessage() for r in caplog.records if "REFUSED" in r.getMessage()]
    assert len(refusal) == 1 and f"fix: chmod 0644 {site['approvals']}" in refusal[0]
    assert not site["apps"].exists() or not any(site["apps"].iterdir()), "not even unpacked"


def test_the_cli_approves_lists_and_revokes(tmp_path, capsys, bundle):
    from client.cli import main

    state, fab = tmp_path / "state", tmp_path / "release.fab"
    state.mkdir()  # the daemon's account has its state folder; the approvals folder in it is the admin's
    fab.write_bytes(bundle)
    digest = bundle_hash(bundle)
    assert main(["approve", str(fab), "--state-dir", str(state)]) == 0
    assert capsys.readouterr().out.split()[:2] == ["approved:", digest]
    path = approvals_file(state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert main(["approvals", "--state-dir", str(state)]) == 0 and digest in capsys.readouterr().out
    os.chmod(path, 0o664)  # listed anyway, with what the gate will say
    assert main(["approvals", "--state-dir", str(state)]) == 2
    out, err = capsys.readouterr()
    assert digest in out and f"chmod 0644 {path}" in err
    assert main(["revoke", digest, "--state-dir", str(state)]) == 2 and "not trusted" in capsys.readouterr().err
    os.chmod(path, 0o644)
    assert main(["revoke", digest, "--state-dir", str(state)]) == 0
    assert read_approvals(path) == []
