"""A real deployment on loopback: a TLS SuperLink with SuperNode authentication and one site
daemon per hospital, each a separate process with its own key, port and synthetic site, driven
only through the two CLIs (clinicfl-server, clinicfl-client) as a centre and its sites would.

One federation (run A) covers: 3 rounds with checkpoints and metrics; a site killed during
round 2 (the round completes without it); pause, the dead site rejoining while paused, continue.
Run B adds two sites that send a NaN and a wrong-shaped update (both rejected, the model stays
finite), is stopped after round 2 together with the server, and is resumed after a server
restart: rounds 0..3 each exactly once. Every process is stopped by its PID at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.model import load_exported
from common.processes import free_port, port_open
from simulations.synthetic import SyntheticSpec, generate_clinics

ROOT = Path(__file__).resolve().parents[1]
SITES = ["site-01", "site-02", "site-03"]
DRILLS = {"drill-nan": "nan-update", "drill-shape": "wrong-shape-update"}
DATA_ARGS = ["--image-size", "32", "--seq-len", "4"]
RUN_SETTINGS = ["--set", "image-size=32", "--set", "seq-len=4", "--set", "proj-dim=16", "--set", "gru-hidden=8",
                "--set", "attn-dim=8", "--set", "fid-dim=8", "--set", "min-site-cases=2", "--set", "local-epochs=1",
                "--set", "control-poll=0.5"]


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.centre = root / "centre"
        self.port = free_port()
        self.daemons: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.data: dict[str, Path] = {}
        self.env = {**os.environ, "CLINICFL_HOME": str(self.centre), "FLWR_HOME": str(root / "flwr-home")}

    def server(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                                cwd=ROOT, env=self.env, timeout=timeout)
        if check:
            assert result.returncode == 0, f"clinicfl-server {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result

    def start_site(self, name: str, key: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        log = (self.root / f"{name}.daemon.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "start", "--superlink", f"127.0.0.1:{self.port}",
             "--data-path", str(self.data[name]), "--site-name", name, "--state-dir", str(self.root / "state" / name),
             "--ca-cert", str(self.centre / "certs/ca.crt"), "--key", str(self.centre / "sites" / f"{key or name}.key"),
             "--port", str(self.supernode_port(name)), *DATA_ARGS, *extra],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons[name] = process
        return process

    def supernode_port(self, name: str) -> int:
        return self.ports.setdefault(name, free_port())

    def kill_site(self, name: str) -> None:
        """A site dies: its daemon and SuperNode are killed at once, nothing shuts down cleanly."""
        process = self.daemons.pop(name)
        groups = _group_pids(process.pid) | {process.pid}  # the SuperNode runs in its own process group
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=30)

    def online(self) -> set[str]:
        return {row["site"] for row in json.loads(self.server("sites", "--json").stdout) if row["status"] == "online"}

    def wait_online(self, names: set[str], timeout: float = 180) -> None:
        _wait(lambda: names <= self.online(), timeout, f"sites {sorted(names)} online")

    def run_dir(self, run_id: int) -> Path:
        return next(self.centre.glob(f"runs/*-run{run_id}"))

    def records(self, run_id: int) -> list[dict]:
        try:
            path = self.run_dir(run_id) / "metrics.jsonl"
        except StopIteration:
            return []
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def state(self, run_id: int) -> dict:
        try:
            path = self.run_dir(run_id) / "state.json"
        except StopIteration:
            return {}
        return json.loads(path.read_text()) if path.is_file() else {}

    def run(self, *args: str) -> int:
        return int(self.server(*args).stdout.split()[0])


def _group_pids(session_leader: int) -> set[int]:
    """Process groups of the descendants of a process (the SuperNode and its app processes)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid"], capture_output=True, text=True).stdout.split("\n")[1:]
    rows = [tuple(map(int, line.split())) for line in out if line.strip()]
    children, frontier = set(), {session_leader}
    while frontier:
        frontier = {pid for pid, ppid, _ in rows if ppid in frontier} - children
        children |= frontier
    return {pgid for pid, _, pgid in rows if pid in children}


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    dep = Deployment(root)
    names = SITES + list(DRILLS)
    spec = SyntheticSpec(sites=len(names), studies_per_site=16, image_size=32, slices_per_study=4, seed=3)
    for name, path in zip(names, generate_clinics(root / "data", spec, progress=False)):
        dep.data[name] = path
    dep.server("certs", "--host", "localhost", *[a for n in [*names, "rogue"] for a in ("--site", n)])
    dep.server("start", "--address", f"127.0.0.1:{dep.port}")
    for name in names:
        dep.server("register-site", name, str(dep.centre / "sites" / f"{name}.pub"))
    try:
        yield dep
    finally:
        pids = []
        for name, process in list(dep.daemons.items()):
            pids.append(process.pid)
            subprocess.run([sys.executable, "-m", "client.cli", "stop", "--state-dir", str(root / "state" / name)],
                           cwd=ROOT, env=dep.env, capture_output=True)
        for process in dep.daemons.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        state = json.loads((dep.centre / "superlink/superlink.json").read_text())
        dep.server("shutdown", check=False)
        time.sleep(1)
        leftovers = [pid for pid in [*pids, state["pid"]] if _alive(pid)]
        assert not leftovers, f"processes still running: {leftovers}"
        assert not port_open("127.0.0.1", dep.port), "the SuperLink port is still open"
        assert not [n for n, p in dep.ports.items() if port_open("127.0.0.1", p)], "a SuperNode port is still open"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def test_certificates_and_keys_have_safe_permissions(deployment):
    certs, sites = deployment.centre / "certs", deployment.centre / "sites"
    assert (certs / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600
    assert (sites / "site-01.key").stat().st_mode & 0o777 == 0o600
    assert (certs / "ca.crt").stat().st_mode & 0o777 == 0o644
    assert (sites / "site-01.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_an_unregistered_site_key_is_refused(deployment):
    deployment.data["rogue"] = deployment.data["site-01"]
    process = deployment.start_site("rogue", extra=("--no-restart",))
    assert process.wait(timeout=120) == 3
    deployment.daemons.pop("rogue")
    log = (deployment.root / "state/rogue/supernode.log").read_text()
    assert "305" in log and "Failed to activate SuperNode" in log


def test_a_site_with_unusable_data_does_not_join(deployment, tmp_path):
    (tmp_path / "empty" / "studies").mkdir(parents=True)
    (tmp_path / "empty" / "labels.csv").write_text("study,label\nghost,1\n")
    deployment.data["empty"] = tmp_path / "empty"
    process = deployment.start_site("empty", key="site-01")
    assert process.wait(timeout=120) == 2
    deployment.daemons.pop("empty")
    log = (deployment.root / "empty.daemon.log").read_text()
    assert "error: not joining the federation" in log and "SuperNode running" not in log


def test_federation_survives_a_dead_site_and_pauses(deployment):
    for name in SITES:
        deployment.start_site(name)
    deployment.wait_online(set(SITES))
    run_id = deployment.run("run", "--rounds", "3", "--min-sites", "2", *RUN_SETTINGS)
    _wait(lambda: any(r["round"] == 1 for r in deployment.records(run_id)), 600, "round 1")
    # Round 2 has started: pause after it, and let site-03 die in the middle of it.
    deployment.server("pause", str(run_id))
    deployment.kill_site("site-03")
    _wait(lambda: deployment.state(run_id).get("state") == "paused", 600, "the run to pause")
    assert deployment.state(run_id)["last-round"] == 2, "the pause took effect after round 2"
    records = deployment.records(run_id)
    round2 = records[-1]
    assert round2["round"] == 2 and set(round2["train"]) == {"site-01", "site-02"}
    assert any(r["site"] == "site-03" for r in round2["rejected"]), round2["rejected"]
    time.sleep(3)
    assert len(deployment.records(run_id)) == 3, "no round runs while paused"
    status = deployment.server("status", str(run_id)).stdout
    assert "paused" in status and "site-03" in status

    deployment.start_site("site-03")  # the site comes back and rejoins
    deployment.wait_online({"site-03"})
    deployment.server("continue", str(run_id))
    _wait(lambda: deployment.state(run_id).get("state") == "finished", 600, "the run to finish")
    records = deployment.records(run_id)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert set(records[1]["train"]) == set(SITES) and set(records[3]["train"]) == set(SITES)
    assert all(np.isfinite(r["catalogue"]["auc"]["value"]) for r in records)
    run_dir = deployment.run_dir(run_id)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"round-{i:03d}.pt" for i in range(4)]

    logs = deployment.server("logs", str(run_id)).stdout
    assert "paused after round 2" in logs and "finished 3 rounds" in logs

    exported = Path(deployment.server("export", str(run_id), "--round", "3").stdout.strip())
    model, meta = load_exported(exported)
    assert meta["round"] == 3 and meta["backbone-hash"] == json.loads((run_dir / "config.json").read_text())[
        "backbone-hash"]
    _, best = load_exported(Path(deployment.server("export", str(run_id)).stdout.strip()))
    assert best["round"] == best["best-round"]["round"] and best["last-round"] == 3, "export takes the best round"
    checkpoint = torch.load(run_dir / "checkpoints/round-003.pt", weights_only=True)["trainable"]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in checkpoint.items())
    out = model(torch.rand(2, 4, 1, 32, 32), torch.ones(2, 4, dtype=torch.bool))
    assert torch.isfinite(out.logits).all()


def test_bad_updates_are_rejected_and_a_stopped_server_resumes(deployment):
    for name, drill in DRILLS.items():
        deployment.start_site(name, extra=("--node-config", f"drill={drill}"))
    deployment.wait_online(set(SITES) | set(DRILLS))
    run_id = deployment.run("run", "--rounds", "3", "--min-sites", "3", *RUN_SETTINGS)
    _wait(lambda: any(r["round"] == 2 for r in deployment.records(run_id)), 600, "round 2")
    # Stop the run and the server (round 3 is under way), then restart the server.
    deployment.server("stop", str(run_id))
    deployment.server("shutdown")
    records = deployment.records(run_id)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        reasons = {r["site"]: r["reason"] for r in record["rejected"] if r["phase"] == "train"}
        assert "non-finite" in reasons["drill-nan"] and "shape" in reasons["drill-shape"], reasons
        assert set(record["train"]) == set(SITES)
    run_dir = deployment.run_dir(run_id)
    for i in range(3):
        trainable = torch.load(run_dir / f"checkpoints/round-{i:03d}.pt", weights_only=True)["trainable"]
        assert all(torch.isfinite(v).all() for v in trainable.values())

    deployment.server("start", "--address", f"127.0.0.1:{deployment.port}")
    deployment.wait_online(set(SITES))  # the sites reconnect by themselves
    resumed = deployment.run("resume", str(run_id))
    _wait(lambda: deployment.state(resumed).get("state") == "finished", 600, "the resumed run to finish")
    records = deployment.records(resumed)
    assert [r["round"] for r in records] == [0, 1, 2, 3], "every round exactly once across the restart"
    meta = json.loads((deployment.run_dir(resumed) / "config.json").read_text())
    assert meta["resumed-from"] == str(run_dir) and meta["budget-id"] == str(run_id)
    assert set(records[3]["train"]) == set(SITES)
    listing = deployment.server("status").stdout
    assert str(run_id) in listing and str(resumed) in listing
