"""Run the clinicfl Flower app as a local simulation, with a SuperLink we own.

``flwr run`` against its built-in local connection starts a detached SuperLink that outlives the
command and listens on fixed ports. Here we start ``flower-superlink --simulation`` ourselves on
free loopback ports, with FLWR_HOME inside the project, submit the run with ``flwr run --stream``
and stop the SuperLink by its PID, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.processes import bin_path, flower_env as base_flower_env, free_port, port_open, run_config_arg


PROJECT_ROOT = Path(__file__).resolve().parents[1]


class SimulationError(RuntimeError):
    pass


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = base_flower_env(flwr_home)
    env.setdefault("RAY_DEDUP_LOGS", "1")
    env.setdefault("TQDM_MININTERVAL", "2")
    return env


@contextmanager
def local_superlink(flwr_home: Path, startup_timeout: float = 60.0) -> Iterator[str]:
    """A simulation SuperLink on a free loopback port; yields its connection name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "clinicfl-sim"\n\n'
        f'[superlink.clinicfl-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    log_path = flwr_home / "superlink.log"
    env = flower_env(flwr_home)
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [bin_path("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port), "--database", str(flwr_home / "superlink.db")],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while not port_open("127.0.0.1", port):
            if process.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise SimulationError(f"flower-superlink did not start within {startup_timeout:.0f}s; see {log_path}")
            time.sleep(0.3)
        yield "clinicfl-sim"
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it spawned (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # simulation workers (Ray) share the group: make sure none is left behind
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_simulation(data_root: Path, run_root: Path, num_sites: int, overrides: dict[str, object] | None = None,
                   flwr_home: Path | None = None, cpus_per_site: int = 1, timeout: float = 3600.0,
                   stream: bool = True) -> Path:
    """Run the app over the sites under ``data_root``; returns the run directory it wrote."""
    run_root = run_root.resolve()
    run_root.mkdir(parents=True, exist_ok=True)
    flwr_home = (flwr_home or PROJECT_ROOT / ".flwr").resolve()
    before = {p for p in run_root.iterdir() if p.is_dir()}
    config = {"data-root": str(data_root.resolve()), "run-dir": str(run_root), **(overrides or {})}
    command = [bin_path("flwr"), "run", str(PROJECT_ROOT), "clinicfl-sim", "--stream",
               "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site}",
               "--run-config", run_config_arg(config)]
    with local_superlink(flwr_home) as _:
        result = subprocess.run(command, env=flower_env(flwr_home), timeout=timeout,
                                stdout=None if stream else subprocess.DEVNULL,
                                stderr=None if stream else subprocess.DEVNULL)
    created = sorted({p for p in run_root.iterdir() if p.is_dir()} - before)
    if result.returncode != 0 or not created:
        raise SimulationError(f"the simulation did not produce a run directory (flwr exit {result.returncode}); "
                              f"see the log above and {flwr_home / 'superlink.log'}")
    run_dir = created[-1]
    # `flwr run --stream` exits 0 even when the ServerApp crashed: trust only what was written.
    records = read_round_records(run_dir)
    expected = json.loads((run_dir / "config.json").read_text())["config"]["num-rounds"]
    if not records or (records[-1]["round"] != expected and not records[-1].get("stopped")):
        raise SimulationError(f"the run stopped early: {len(records)} round record(s) in {run_dir}")
    return run_dir


def read_round_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (the server's run-directory format), oldest first."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
