"""Helpers for the Flower processes both the centre and the simulations start: console scripts
of this interpreter, loopback ports, the environment for the flwr CLI, run-config values."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from pathlib import Path

import tomli_w

from common.files import atomic_write_bytes


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
    # Ray's FutureWarning asks for this: do not override accelerator env vars when num_gpus = 0.
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # flower-supernode and flower-superlink start flower-superexec etc. by name: this venv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_config_file(values: dict[str, object], path: Path) -> Path:
    """A run or node config as a TOML file, which ``flwr run --run-config`` and
    ``flower-supernode --node-config`` both accept. The TOML writer quotes every value exactly
    (an apostrophe, a quote or a space in a path survives); hand-built KEY=VALUE strings do not."""
    atomic_write_bytes(path, tomli_w.dumps(dict(values)).encode())
    return path


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
