"""Helpers for the Flower processes both the centre and the simulations start: console scripts
of this interpreter, loopback ports, the environment for the flwr CLI, run-config values."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path


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


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    # The app's dependencies are already installed here; skip Flower's per-run env sync.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # flower-supernode and flower-superlink start flower-superexec etc. by name: this venv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def toml_value(value: object) -> str:
    """A run-config override value as flwr's --run-config parses it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def run_config_arg(values: dict[str, object]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def parse_assignments(pairs: list[str], option: str = "--set") -> dict[str, object]:
    """``KEY=VALUE`` command-line items as typed config values (bool, int, float, else string)."""
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {pair!r}")
        values[key.strip()] = _typed(raw.strip())
    return values


def _typed(raw: str) -> object:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw.strip("'\"")
