"""The coordinating centre's folder and the processes it runs: the Flower SuperLink and the
``flwr`` CLI that talks to its Control API.

    CENTRE/
      certs/     ca.crt ca.key server.crt server.key
      sites/     <site>.key <site>.pub   (keys made here; each .key goes to its site, then delete it)
      superlink/ state.db superlink.log superlink.pid superlink.json
      flwr/      config.toml (FLWR_HOME of the flwr CLI: the connection "clinicfl")
      runs/      one run directory per Flower run (checkpoints, metrics, control flag)
      sites.json registered sites: name -> public key file and fingerprint
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.processes import bin_path, flower_env, pid_alive, port_open, start_in_group, stop_group, wait_for_port, \
    write_flwr_connection, write_pid_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "clinicfl"
STOP_TIMEOUT_S = 30.0  # a SuperLink asked to stop gets this long before its process group is killed


class CentreError(RuntimeError):
    """Something a coordinating-centre admin must fix; the message says what."""


@dataclass(frozen=True)
class Centre:
    home: Path

    @property
    def certs(self) -> Path:
        return self.home / "certs"

    @property
    def sites(self) -> Path:
        return self.home / "sites"

    @property
    def superlink(self) -> Path:
        return self.home / "superlink"

    @property
    def flwr_home(self) -> Path:
        return self.home / "flwr"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def pid_file(self) -> Path:
        return self.superlink / "superlink.pid"

    @property
    def log_file(self) -> Path:
        return self.superlink / "superlink.log"

    @property
    def registry(self) -> Path:
        return self.home / "sites.json"

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def run_dir(self, run_id: int) -> Path:
        matches = sorted(self.runs.glob(f"*-run{run_id}")) if self.runs.is_dir() else []
        if not matches:
            raise CentreError(f"no run directory for run {run_id} under {self.runs} (the ServerApp writes it when "
                              f"the run starts; see clinicfl-server logs {run_id})")
        return matches[-1]

    def registered_sites(self) -> dict[str, dict]:
        return json.loads(self.registry.read_text()) if self.registry.is_file() else {}


def running_superlink(centre: Centre) -> dict | None:
    """The SuperLink this centre started, if it is still running: {pid, host, port, insecure}."""
    state_file = centre.superlink / "superlink.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    return state if pid_alive(int(state["pid"])) else None


def start_superlink(centre: Centre, host: str, port: int, insecure: bool, timeout: float = 90.0) -> dict:
    """Start a SuperLink in the background: TLS + SuperNode authentication + a persistent
    database and a log file, or plain gRPC with ``insecure`` (no authentication either)."""
    if (state := running_superlink(centre)) is not None:
        raise CentreError(f"a SuperLink is already running (pid {state['pid']}, port {state['port']}); "
                          "stop it first with clinicfl-server shutdown")
    # The centre's own CLI reaches a wildcard listener over loopback.
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if port_open(probe_host, port):
        raise CentreError(f"port {port} is already in use on {host}")
    centre.superlink.mkdir(parents=True, exist_ok=True)
    centre.runs.mkdir(parents=True, exist_ok=True)
    command = [bin_path("flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(centre.superlink / "state.db"), "--log-file", str(centre.log_file)]
    if insecure:
        command.append("--insecure")
    else:
        for name in ("ca.crt", "server.crt", "server.key"):
            if not (centre.certs / name).is_file():
                raise CentreError(f"{centre.certs / name} is missing: run clinicfl-server certs first")
        command += ["--ssl-ca-certfile", str(centre.certs / "ca.crt"), "--ssl-certfile",
                    str(centre.certs / "server.crt"), "--ssl-keyfile", str(centre.certs / "server.key"),
                    "--enable-supernode-auth"]
    output = centre.superlink / "superlink.out"
    process = start_in_group(command, output, centre.env(), cwd=centre.home)
    try:
        wait_for_port(process, probe_host, port, timeout, output, error=CentreError)
    except CentreError:
        stop_group(process, STOP_TIMEOUT_S)
        raise
    state = {"pid": process.pid, "host": host, "port": port, "insecure": insecure}
    (centre.superlink / "superlink.json").write_text(json.dumps(state))
    write_pid_file(centre.pid_file, process.pid)
    write_connection(centre, f"{probe_host}:{port}", insecure)
    return state


def write_connection(centre: Centre, address: str, insecure: bool) -> None:
    """The flwr CLI's connection to this centre's SuperLink (FLWR_HOME/config.toml)."""
    write_flwr_connection(centre.flwr_home, CONNECTION, address, None if insecure else centre.certs / "ca.crt")


def stop_superlink(centre: Centre, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """Stop the SuperLink (and the ServerApp processes it spawned) by its PID; returns the PID."""
    state = running_superlink(centre)
    if state is None:
        return None
    stop_group(int(state["pid"]), timeout)
    return int(state["pid"])


def flwr(centre: Centre, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run the flwr CLI against this centre's SuperLink."""
    if not (centre.flwr_home / "config.toml").is_file():
        raise CentreError(f"no SuperLink connection in {centre.flwr_home}: run clinicfl-server start first")
    return subprocess.run([bin_path("flwr"), *args], env=centre.env(), capture_output=True, text=True,
                          timeout=timeout, cwd=centre.home)


def parse_json_output(result: subprocess.CompletedProcess, what: str) -> dict:
    """flwr ... --format json prints one JSON object; a failure names the CLI's own message."""
    text = result.stdout.strip()
    start = text.find("{")
    try:
        payload = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    if result.returncode != 0 or not payload.get("success", True):
        last_line = ((result.stderr or result.stdout).strip().splitlines() or ["?"])[-1]
        raise CentreError(f"{what} failed: {payload.get('error-message') or last_line}")
    return payload


def key_fingerprint(public_key: Path) -> str:
    parts = public_key.read_text().split()
    if len(parts) < 2 or not parts[0].startswith("ecdsa-sha2-"):
        raise CentreError(f"{public_key} is not an OpenSSH ECDSA public key (make one with clinicfl-server certs "
                          "--site NAME, or ssh-keygen -t ecdsa -b 384)")
    return "SHA256:" + hashlib.sha256(parts[1].encode()).hexdigest()[:32]
