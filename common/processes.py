"""Helpers for the Flower processes the centre, the sites and the simulations start: console
scripts of this interpreter, loopback ports, background processes in process groups of their own,
pid files, the environment and connection file of the flwr CLI, run-config values."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from common.files import atomic_write_bytes

PORT_POLL_S = 0.3  # how often a starting process's port is tried
GROUP_POLL_S = 0.2  # how often a process known only by its pid is checked while it stops
REAP_S = 10.0  # how long a SIGKILLed group leader is waited for (it only needs to be scheduled)


def bin_path(name: str) -> str:
    """Console scripts of the interpreter running us (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


class ProcessStartError(RuntimeError):
    """A background process ended, or did not open its port in time, while it started; the
    message names its log."""


def start_in_group(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.Popen:
    """``command`` in the background, in a session (so a process group) of its own, its output
    appended to ``log_path``. The group is what stop_group signals: the processes it spawns into its
    group (the site gate's app processes, for one) stop with it, and a Ctrl-C in our terminal
    reaches none of them. (Flower detaches flower-superexec, which runs ServerApps and simulations,
    into a session of its own; it watches its parent's pid and ends after it.)"""
    with log_path.open("ab") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(list(command), env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_port(process: subprocess.Popen, host: str, port: int, timeout: float, log_path: Path,
                  error: type[Exception] = ProcessStartError) -> None:
    """Wait until ``process`` (from start_in_group) listens on host:port. ``error`` (the caller's own
    kind) when it ends first or after ``timeout`` seconds; then it is left running: stopping it is
    the caller's choice."""
    name = Path(str(process.args[0])).name
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if process.poll() is not None:
            raise error(f"{name} exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise error(f"{name} did not open port {port} within {timeout:.0f}s; see {log_path}")
        time.sleep(PORT_POLL_S)


def signal_group(pgid: int, signum: int) -> bool:
    """``signum`` to every process of a group; False when none is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def stop_group(process: subprocess.Popen | int, timeout: float) -> None:
    """Stop a process and the group it leads: SIGTERM to the group, up to ``timeout`` seconds for the
    leader to end, then SIGKILL to whatever of the group is left (workers that ignored the SIGTERM
    or outlived their parent), and reap the leader if it is our child.

    ``process`` is our own child (a Popen: waited for, so its exit code stays readable) or a pid
    read from a file by another command (polled). A leader that has ended already still has its
    group signalled: Linux hands out no pid that a live group still carries as its id, so only the
    group's stragglers are reached."""
    pid = process if isinstance(process, int) else process.pid
    if not signal_group(pid, signal.SIGTERM):
        _wait_ended(process, 0.0)  # the group is gone: collect the leader's exit status if it is ours
        return
    _wait_ended(process, timeout)
    signal_group(pid, signal.SIGKILL)
    _wait_ended(process, REAP_S)


def _wait_ended(process: subprocess.Popen | int, timeout: float) -> None:
    if isinstance(process, subprocess.Popen):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return
    deadline = time.monotonic() + timeout
    while True:
        _reap(process)
        if not pid_alive(process) or time.monotonic() >= deadline:
            return
        time.sleep(GROUP_POLL_S)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our ended child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (or reaped already): its own parent reaps it
        pass


def pid_alive(pid: int) -> bool:
    """Whether a process runs. A zombie (ended, its exit status not yet collected) does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        # The state follows the command name, which may hold spaces and parentheses.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no procfs (macOS), or it ended just now
        return not Path("/proc/self").exists()


def write_pid_file(path: Path, pid: int | None = None) -> None:
    """``pid`` (default: this process) in ``path``, written atomically: a reader never sees half."""
    atomic_write_bytes(path, f"{os.getpid() if pid is None else pid}\n".encode())


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    # The app's dependencies are already installed here; skip Flower's per-run env sync.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Ray's FutureWarning asks for this: do not override accelerator env vars when num_gpus = 0.
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # flower-supernode and flower-superlink start flower-superexec etc. by name: this venv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_config_file(values: dict[str, object], path: Path) -> Path:
    """A TOML file: a run or node config, which ``flwr run --run-config`` and
    ``flower-supernode --node-config`` both accept, or the flwr CLI's own config. The TOML writer
    quotes every value exactly (an apostrophe, a quote or a space in a path survives); hand-built
    KEY=VALUE strings and f-string TOML do not."""
    atomic_write_bytes(path, tomli_w.dumps(dict(values)).encode())
    return path


def write_flwr_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection, the flwr CLI's default: TLS verified
    with ``root_certificates``, or ``insecure`` without them."""
    connection: dict[str, object] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates)
    return write_config_file({"superlink": {"default": name, name: connection}}, flwr_home / "config.toml")


# Run-config keys that hold paths. The ServerApp and ClientApps run from Flower's app folder, so
# a relative path must be made absolute where the user typed it.
PATH_KEYS = ("run-dir", "data-root", "server-val-path", "resume-from", "site-registry", "fid-inception-weights",
             "backbone-weights", "site-policy")


def absolute_paths(values: dict[str, object], base: Path | None = None) -> dict[str, object]:
    """Path values resolved against ``base`` (default: the working directory). ``backbone-weights``
    also takes the words none and imagenet; empty strings mean 'not set' and stay empty."""
    base = base or Path.cwd()
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value or (key == "backbone-weights" and value in ("none", "imagenet")):
            continue
        out[key] = str((base / Path(value).expanduser()).resolve())
    return out


def parse_assignments(pairs: list[str], option: str = "--set") -> dict[str, object]:
    """``KEY=VALUE`` command-line items as typed config values, read by Flower's own parser, as
    ``flwr run --run-config`` and ``flower-supernode --node-config`` read them: a value is TOML, so
    a string is quoted (``key="text"``), ``01`` is refused rather than read as 1, ``true``/``false``
    are booleans, and one item may hold several space-separated pairs."""
    # Imported here: Flower takes ~0.4 s to import, and most clinicfl-client commands never need it.
    from click import ClickException
    from flwr.common.config import parse_config_args

    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {pair!r}")
        try:
            # Flower reads a lone item ending in .toml as a file to load: an unquoted value is not TOML anyway.
            parsed = {} if pair.endswith(".toml") else parse_config_args([pair])
        except ClickException:  # not TOML
            parsed = {}
        except ValueError as exc:  # a TOML type Flower's config does not hold (an array, a date)
            raise ValueError(f"{option} {pair}: {exc}") from None
        if not parsed:  # Flower also skips, silently, an item its pattern cannot split ('k = v', 'k=')
            hint = shlex.quote(f'{key.strip()}="{raw.strip()}"')
            raise ValueError(f"{option} {pair}: the value is read as TOML, as flwr run --run-config reads it: "
                             f"numbers and true/false go bare, text goes in quotes, e.g. {option} {hint} "
                             "(no spaces around '=')")
        values.update(parsed)
    return values


def console_logging(fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Warnings and errors of every logger on stderr, once. The level is set on the handler, not
    only on the root logger: Flower's logger has its own level (DEBUG) and its own console
    handler, and records that propagate are filtered by the handlers they reach, so a root
    handler without a level would print every Flower INFO and DEBUG line a second time."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False  # it prints through its own handler
