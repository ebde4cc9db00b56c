"""The real-process deployment that tests/test_deployment.py, tests/test_approval.py and
benchmarks/deployment_round.py drive: a TLS SuperLink with SuperNode authentication and one site
daemon per hospital, each with its own key, port, state folder and synthetic site, all through the
two CLIs (clinicfl-server, clinicfl-client) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.processes import free_port, signal_group, start_in_group
from common.runlog import read_metrics
from common.rundir import ENDED_STATES, RunDirectory

ROOT = Path(__file__).resolve().parents[1]
DATA_ARGS = ["--image-size", "32", "--seq-len", "4"]

RUN_SETTINGS = ["--set", "image-size=32", "--set", "seq-len=4", "--set", "proj-dim=16", "--set", "gru-hidden=8",
                "--set", "attn-dim=8", "--set", "fid-dim=8", "--set", "min-site-cases=2", "--set", "local-epochs=1",
                "--set", "control-poll=0.5"]


# Lines of the SuperLink's log that every poll writes: left out of a diagnosis.
LOG_NOISE = ("PullMessages", "Heartbeat", "PullObject", "PushObject", "ConfirmMessageReceived")


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.centre = root / "centre"
        self.port = free_port()
        self.daemons: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.data: dict[str, Path] = {}
        self.env = {**os.environ, "CLINICFL_HOME": str(self.centre), "FLWR_HOME": str(root / "flwr-home"),
                    # One account plays the site admin and runs the daemon here: it names itself the
                    # approvals admin, as a single-account test machine must (sitegate/approvals.py).
                    "CLINICFL_APPROVALS_ADMIN": str(os.geteuid())}

    def server(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                                cwd=ROOT, env=self.env, timeout=timeout)
        if check:
            assert result.returncode == 0, f"clinicfl-server {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result

    def start_site(self, name: str, key: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        process = start_in_group(
            [sys.executable, "-m", "client.cli", "start", "--superlink", f"127.0.0.1:{self.port}",
             "--data-path", str(self.data[name]), "--site-name", name, "--state-dir", str(self.state_dir(name)),
             "--ca-cert", str(self.centre / "certs/ca.crt"), "--key", str(self.centre / "sites" / f"{key or name}.key"),
             "--port", str(self.supernode_port(name)), *DATA_ARGS, *extra],
            self.root / f"{name}.daemon.log", self.env, cwd=ROOT)
        self.daemons[name] = process
        return process

    def supernode_port(self, name: str) -> int:
        return self.ports.setdefault(name, free_port())

    def kill_site(self, name: str) -> None:
        """A site dies: its daemon and SuperNode are killed at once, nothing shuts down cleanly."""
        process = self.daemons.pop(name)
        groups = _group_pids(process.pid) | {process.pid}  # the SuperNode runs in its own process group
        for group in groups:
            signal_group(group, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        """Every site daemon stopped as its admin would stop it, then the SuperLink shut down."""
        for name in list(self.daemons):
            self.client("stop", "--state-dir", str(self.state_dir(name)), check=False)
        for process in self.daemons.values():
            process.wait(timeout=60)
        self.server("shutdown", check=False)

    def online(self) -> set[str]:
        return {row["site"] for row in json.loads(self.server("sites", "--json").stdout) if row["status"] == "online"}

    def wait_online(self, names: set[str], timeout: float = 180) -> None:
        self.wait(lambda: names <= self.online(), timeout, f"sites {sorted(names)} online")

    def wait(self, condition, timeout: float, what: str) -> None:
        """``_wait``, and on a timeout the state of every run and the end of every log, so that a
        failure on a CI machine (whose files are gone afterwards) says where it stopped."""
        try:
            _wait(condition, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis()}") from None

    def wait_until_ended(self, run_id: int, timeout: float = 600) -> None:
        """Wait until the run has ended, and fail at once (with the diagnosis) unless it finished."""
        self.wait(lambda: self.state(run_id).get("state") in ENDED_STATES, timeout, f"run {run_id} to end")
        assert self.state(run_id)["state"] == "finished", f"run {run_id} did not finish\n{self.diagnosis()}"

    def diagnosis(self, lines: int = 25) -> str:
        parts = []
        for run_dir in sorted(self.centre.glob("runs/*")):
            parts.append(f"{run_dir.name}: {RunDirectory(run_dir).state() or 'no state.json'}; "
                         f"rounds recorded {[r['round'] for r in read_metrics(run_dir)]}")
            try:  # the ServerApp's own output, as the SuperLink keeps it
                result = self.server("logs", run_dir.name.rsplit("-run", 1)[-1], check=False, timeout=60)
                parts.append("\n".join((result.stdout + result.stderr).splitlines()[-lines:]))
            except subprocess.TimeoutExpired:
                parts.append("(clinicfl-server logs timed out)")
        logs = [self.centre / "superlink/superlink.log", *sorted(self.root.glob("state/*/supernode.log")),
                *sorted(self.root.glob("state/*/logs/gate.log")), *sorted(self.root.glob("*.daemon.log"))]
        for log in logs:
            if log.is_file():
                tail = [line for line in log.read_text(errors="replace").splitlines()
                        if not any(noise in line for noise in LOG_NOISE)][-lines:]
                parts.append(f"--- {log.relative_to(self.root)} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def run_dir(self, run_id: int) -> Path:
        return next(self.centre.glob(f"runs/*-run{run_id}"))

    def records(self, run_id: int) -> list[dict]:
        try:
            return read_metrics(self.run_dir(run_id))
        except StopIteration:
            return []

    def state(self, run_id: int) -> dict:
        try:
            return RunDirectory(self.run_dir(run_id)).state()
        except StopIteration:
            return {}

    def run(self, *args: str) -> int:
        return int(self.server(*args).stdout.split()[0])

    def client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, cwd=ROOT,
                                env=self.env, timeout=300)
        if check:
            assert result.returncode == 0, f"clinicfl-client {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result

    def state_dir(self, name: str) -> Path:
        return self.root / "state" / name

    def approve(self, name: str, *args: str) -> str:
        """The site admin approves a bundle (default: the app as installed here); returns its hash."""
        self.state_dir(name).mkdir(parents=True, exist_ok=True)  # the daemon's folder; approvals/ is the admin's
        out = self.client("approve", *args, "--state-dir", str(self.state_dir(name))).stdout
        return out.split()[1]


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
