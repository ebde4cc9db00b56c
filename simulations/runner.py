"""Run the clinicfl Flower app as a local simulation, with a SuperLink we own.

``flwr run`` against its built-in local connection starts a detached SuperLink that outlives the
command and listens on fixed ports. Here we start ``flower-superlink --simulation`` ourselves on
free loopback ports, with FLWR_HOME inside the project, submit the run with ``flwr run --stream``
and stop the SuperLink by its PID, whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from common.config import RunConfig
from common.rundir import RunDirectory
from common.runlog import read_metrics
from common.processes import absolute_paths, bin_path, flower_env as base_flower_env, free_port, start_in_group, \
    stop_group, wait_for_port, write_config_file, write_flwr_connection


PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "clinicfl-sim"
STOP_TIMEOUT_S = 20.0  # the SuperLink asked to stop gets this long before its process group is killed


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
    write_flwr_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}")
    log_path = flwr_home / "superlink.log"
    process = start_in_group(
        [bin_path("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(flwr_home / "superlink.db")],
        log_path, flower_env(flwr_home))
    try:
        wait_for_port(process, "127.0.0.1", port, startup_timeout, log_path, error=SimulationError)
        yield CONNECTION
    finally:
        # The simulation runs under flower-superexec, which ends once the SuperLink's pid is gone.
        stop_group(process, STOP_TIMEOUT_S)


RUN_DIR_LINE = re.compile(r"clinicfl: run directory (\S.*)$")


def run_simulation(data_root: Path, run_root: Path, num_sites: int, overrides: dict[str, object] | None = None,
                   flwr_home: Path | None = None, cpus_per_site: int = 1, timeout: float = 3600.0,
                   stream: bool = False, on_round: Callable[[dict], None] | None = None) -> Path:
    """Run the app over the sites under ``data_root``; returns the run directory it wrote.

    Flower's whole output (ServerApp, SuperLink, the simulated sites' console lines) goes to
    ``simulation.log`` in the run directory; ``stream`` also shows it here (--verbose).
    ``on_round`` is called with each round's record as soon as the ServerApp has written it.
    Paths in ``overrides`` (run-dir, server-val-path, ...) resolve against the working directory."""
    overrides = absolute_paths(dict(overrides or {}))
    run_root = Path(str(overrides.pop("run-dir", run_root))).expanduser().resolve()
    run_root.mkdir(parents=True, exist_ok=True)
    flwr_home = (flwr_home or PROJECT_ROOT / ".flwr").resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = flwr_home / "logs" / f"simulation-{stamp}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    config = {"data-root": str(data_root.resolve()), "run-dir": str(run_root), **overrides}
    RunConfig.from_mapping(config)  # a bad or incompatible setting is refused before Flower starts
    found: dict[str, Path] = {}
    returncode = run_flower_app(PROJECT_ROOT, config, num_sites, flwr_home, log_path, cpus_per_site, timeout,
                                stream, found, lambda: _report_rounds(found, on_round))
    run_dir = found.get("run_dir")
    if run_dir is None or not run_dir.is_dir():
        raise SimulationError(f"the simulation did not produce a run directory (flwr exit {returncode}); "
                              f"log: {log_path}")
    shutil.copy2(log_path, run_dir / "simulation.log")
    # `flwr run --stream` exits 0 even when the ServerApp crashed: trust only what was written.
    run = RunDirectory(run_dir)
    records = run.read_metrics()
    expected = run.config()["num-rounds"]
    state = run.state()
    if not records or (records[-1]["round"] != expected and state.get("state") != "stopped"):
        raise SimulationError(f"the run stopped early: {len(records)} round record(s) in {run_dir}; "
                              f"log: {run_dir / 'simulation.log'}")
    return run_dir


def run_flower_app(app: Path, config: dict[str, object], num_sites: int, flwr_home: Path, log_path: Path,
                   cpus_per_site: int = 1, timeout: float = 3600.0, stream: bool = False,
                   found: dict[str, Path] | None = None, poll: Callable[[], None] | None = None) -> int:
    """``flwr run APP --stream`` on a SuperLink of our own (simulation); returns flwr's exit code.
    Flower's output goes to ``log_path`` (and the console when ``stream``); ``poll`` runs twice a
    second while the run lasts."""
    found = found if found is not None else {}
    command = [bin_path("flwr"), "run", str(app), CONNECTION, "--stream",
               "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site}",
               "--run-config", str(write_config_file(config, flwr_home / f"run-config-{time.time_ns()}.toml"))]
    with local_superlink(flwr_home) as _:
        process = subprocess.Popen(command, env=flower_env(flwr_home), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        reader = threading.Thread(target=_copy_output, args=(process, log_path, stream, found), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if poll is not None:
                poll()
            if time.monotonic() > deadline:
                process.kill()
                raise SimulationError(f"the simulation did not finish within {timeout:.0f}s; log: {log_path}")
            time.sleep(0.5)
        if poll is not None:
            poll()
        reader.join(timeout=30)
    return process.returncode


def _report_rounds(found: dict[str, Path], on_round: Callable[[dict], None] | None) -> None:
    """Call ``on_round`` once for every round record the ServerApp has written since the last call."""
    if on_round is None or "run_dir" not in found:
        return
    records = read_metrics(found["run_dir"])
    seen = int(found.get("seen", 0))  # type: ignore[arg-type]
    for record in records[seen:]:
        on_round(record)
    found["seen"] = len(records)  # type: ignore[assignment]


def _copy_output(process: subprocess.Popen, log_path: Path, stream: bool, found: dict[str, Path]) -> None:
    """Flower's output -> the log file (and the console when streaming); spots the run directory."""
    with log_path.open("w", encoding="utf-8") as log_file:
        for line in process.stdout:
            log_file.write(line)
            log_file.flush()
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
            if "run_dir" not in found and (match := RUN_DIR_LINE.search(ANSI.sub("", line).rstrip())):
                found["run_dir"] = Path(match.group(1).strip())


ANSI = re.compile(r"\x1b\[[0-9;]*m")
