"""The site daemon: check the data, then run a Flower SuperNode that connects out to the centre.

The SuperNode dials the SuperLink over TLS (verifying it with the centre's CA certificate) and
proves its identity with the site's private key. Flower retries a broken connection by itself;
if the SuperNode process still ends (a crash, an error), the daemon starts it again with a
growing delay. It refuses to start at all when the data is unusable, and says why.
The daemon runs in the foreground (systemd: deploy/clinicfl-client.service) and writes
STATE_DIR/supernode.pid and STATE_DIR/supernode.log.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.processes import flower_env, start_in_group, stop_group, write_config_file, write_pid_file
from sitegate.approvals import approvals_file

log = logging.getLogger(__name__)

QUICK_EXIT_S = 20.0  # a SuperNode that ends this fast on its first start is misconfigured, not unlucky
MAX_BACKOFF_S = 60.0
GATE_CHECK_S = 1.0  # how often the daemon checks that the site gate is still running
SUPERNODE_STOP_S = 20.0  # a SuperNode asked to stop gets this long before it is killed
GATE_STOP_S = 10.0


@dataclass
class SupernodeSettings:
    superlink: str  # host:port of the centre
    data_path: Path
    state_dir: Path
    site_name: str
    ca_cert: Path | None  # None: --insecure
    private_key: Path | None
    port: int = 9094  # the SuperNode's local runtime API; give each SuperNode on one host its own
    layout: str = "auto"
    node_config: dict[str, object] = field(default_factory=dict)  # extra keys (dp-target-epsilon, ...)
    # The site gate (sitegate/): the SuperNode starts no app itself, the gate runs approved bundles only.
    approval: bool = True

    @property
    def gate_dir(self) -> Path:
        return self.state_dir / "gate"

    def gate_command(self) -> list[str]:
        return [sys.executable, "-m", "sitegate", "executor", "--runtime-api-address", f"127.0.0.1:{self.port}",
                "--approvals", str(approvals_file(self.state_dir)), "--install-root", str(self.state_dir / "apps"),
                "--secret-file", str(self.gate_dir / "secret"), "--log-file", str(self.state_dir / "logs" / "gate.log")]

    def command(self) -> list[str]:
        values = {"data-path": str(self.data_path), "state-dir": str(self.state_dir), "site-name": self.site_name,
                  "layout": self.layout, **self.node_config}
        node_config = write_config_file(values, self.state_dir / "node-config.toml")
        # Flower's SuperNode with its replies kept in step with its messages (client/supernode.py).
        command = [sys.executable, "-m", "client.supernode", "--superlink", self.superlink,
                   "--node-config", str(node_config), "--port", str(self.port)]
        if self.ca_cert is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.ca_cert)]
        if self.private_key is not None:
            command += ["--auth-supernode-private-key", str(self.private_key)]
        if self.approval:
            # Process isolation: the SuperNode starts no app process; only the gate, which holds the
            # shared secret, may take its tasks.
            command += ["--isolation", "process", "--superexec-auth-secret-file", str(self.gate_dir / "secret")]
        return command


def write_gate_secret(path: Path) -> None:
    """A fresh random secret the SuperNode and the gate share (0600), for every start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))


def check_key_files(settings: SupernodeSettings) -> list[str]:
    """Problems a site admin must fix before the SuperNode can connect."""
    problems = []
    if settings.ca_cert is not None and not settings.ca_cert.is_file():
        problems.append(f"CA certificate {settings.ca_cert} not found (copy certs/ca.crt from the centre)")
    if settings.private_key is not None:
        if not settings.private_key.is_file():
            problems.append(f"site key {settings.private_key} not found")
        elif settings.private_key.stat().st_mode & 0o077:
            problems.append(f"site key {settings.private_key} is readable by others: chmod 600 it")
    return problems


class SupernodeDaemon:
    def __init__(self, settings: SupernodeSettings, restart: bool = True) -> None:
        self.settings = settings
        self.restart = restart
        self.process: subprocess.Popen | None = None
        self.gate: subprocess.Popen | None = None
        self.stopping = False
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = settings.state_dir / "supernode.log"
        self.pid_path = settings.state_dir / "supernode.pid"

    def run(self) -> int:
        """Run until stopped (SIGTERM/SIGINT); returns the exit code for the service manager."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        write_pid_file(self.pid_path)
        backoff, first = 2.0, True
        try:
            while not self.stopping:
                started = time.monotonic()
                code = self._run_once()
                if self.stopping:
                    return 0
                lasted = time.monotonic() - started
                if first and lasted < QUICK_EXIT_S:
                    print(f"error: the SuperNode exited after {lasted:.0f}s with code {code}. Check that the "
                          f"site key is registered at the centre (clinicfl-server register-site), the address "
                          f"{self.settings.superlink} and the CA certificate. Log: {self.log_path}", flush=True)
                    return 3
                if not self.restart:
                    return code
                first = False
                backoff = 2.0 if lasted > 5 * MAX_BACKOFF_S else min(backoff * 2, MAX_BACKOFF_S)
                print(f"SuperNode ended (code {code}); restarting in {backoff:.0f}s", flush=True)
                self._sleep(backoff)
            return 0
        finally:
            self.pid_path.unlink(missing_ok=True)

    def _run_once(self) -> int:
        env = flower_env(self.settings.state_dir / "flwr")
        if self.settings.approval:
            write_gate_secret(self.settings.gate_dir / "secret")
            (self.settings.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.process = start_in_group(self.settings.command(), self.log_path, env)
        if self.settings.approval:
            self._start_gate(env)
        gate = f"; app approval on (gate pid {self.gate.pid}, {approvals_file(self.settings.state_dir)})" \
            if self.gate is not None else "; app approval OFF"
        print(f"SuperNode running: pid {self.process.pid}, connecting to {self.settings.superlink}{gate}; "
              f"log {self.log_path}", flush=True)
        # The SuperNode waits for each message's reply before it takes the next one, and only the
        # gate runs apps: a gate that has ended would leave the site online but silent for good.
        while (code := self.process.poll()) is None:
            if self.gate is not None and self.gate.poll() is not None and not self.stopping:
                print(f"site gate ended (code {self.gate.returncode}); starting it again", flush=True)
                self._start_gate(env)
            time.sleep(GATE_CHECK_S)
        self._stop_gate()
        return code

    def _start_gate(self, env: dict[str, str]) -> None:
        self.gate = start_in_group(self.settings.gate_command(), self.log_path, env)

    def _stop_gate(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            stop_group(gate, GATE_STOP_S)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.stop_child()

    def stop_child(self, timeout: float = SUPERNODE_STOP_S) -> None:
        """Stop the SuperNode and the app processes it started (its own process group), and the gate."""
        self._stop_gate()
        if self.process is not None:
            stop_group(self.process, timeout)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.2)
