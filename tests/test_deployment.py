"""A real deployment on loopback: a TLS SuperLink with SuperNode authentication and one site
daemon per hospital, each a separate process with its own key, port and synthetic site, driven
only through the two CLIs (clinicfl-server, clinicfl-client) as a centre and its sites would.

One federation covers: 3 rounds with checkpoints and metrics; a site killed during round 2 (the
round completes without it); pause, the dead site rejoining while paused, continue. Bad updates
and a resumed run are in tests/test_deployment_resume.py, on a deployment of its own that a second
pytest-xdist worker runs at the same time. Every process is stopped by its PID at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.loopback_deployment import ROOT, RUN_SETTINGS, Deployment
from common.model import load_exported
from common.processes import pid_alive, port_open
from simulations.synthetic import SyntheticSpec, generate_clinics

pytestmark = pytest.mark.slow  # a real TLS deployment (make test)

SITES = ["site-01", "site-02", "site-03"]
DRILLS = {"drill-nan": "nan-update", "drill-shape": "wrong-shape-update"}


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
    bundle = root / "clinicfl.fab"
    dep.server("bundle", "--out", str(bundle))  # the release the centre ships, built once
    for name in names:
        dep.server("register-site", name, str(dep.centre / "sites" / f"{name}.pub"))
        dep.approve(name, str(bundle))  # each site's admin approves that bundle
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
        dep.wait(lambda: not any(pid_alive(pid) for pid in [*pids, state["pid"]]), 60, "every process to end")
        assert not port_open("127.0.0.1", dep.port), "the SuperLink port is still open"
        assert not [n for n, p in dep.ports.items() if port_open("127.0.0.1", p)], "a SuperNode port is still open"


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
    # Flower's SuperNode exits with its connection error (ExitCode.SUPERNODE_CONNECTION_ERROR), after
    # the SuperLink refused to activate an unregistered key
    from flwr.supercore.exit.exit_code import ExitCode

    assert f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}\n" in log and "Failed to activate SuperNode" in log


def test_a_site_with_unusable_data_does_not_join(deployment, tmp_path):
    (tmp_path / "empty" / "studies").mkdir(parents=True)
    (tmp_path / "empty" / "labels.csv").write_text("study,label\nghost,1\n")
    deployment.data["empty"] = tmp_path / "empty"
    process = deployment.start_site("empty", key="site-01")
    assert process.wait(timeout=120) == 2
    deployment.daemons.pop("empty")
    log = (deployment.root / "empty.daemon.log").read_text()
    assert "error: not joining the federation" in log and "SuperNode running" not in log


def _start_sites(deployment, names: list[str], **kwargs) -> None:
    """Start the daemons of ``names`` that are not running (a test needs no daemon an earlier test
    started), and wait until the SuperLink sees them online."""
    for name in names:
        if name not in deployment.daemons or deployment.daemons[name].poll() is not None:
            deployment.start_site(name, **kwargs.get(name, {}))
    deployment.wait_online(set(names))


def test_federation_survives_a_dead_site_and_pauses(deployment):
    _start_sites(deployment, SITES)
    # The run pauses after round 2 by its config: no race between a pause command and the rounds.
    run_id = deployment.run("run", "--rounds", "3", "--min-sites", "2", *RUN_SETTINGS, "--set", "pause-after-round=2")
    deployment.wait(lambda: any(r["round"] == 0 for r in deployment.records(run_id)), 600, "round 0")
    # Round 0's record comes with round 1's training (one message per site per round: the sites
    # score the model they train from), so the message that scores round 1 and trains round 2 is
    # under way: site-03 dies in the middle of it, or before round 2's own evaluation.
    deployment.kill_site("site-03")
    deployment.wait(lambda: deployment.state(run_id).get("state") == "paused", 600, "the run to pause")
    assert deployment.state(run_id)["last-round"] == 2, "the pause took effect after round 2"
    records = deployment.records(run_id)
    round2 = records[-1]
    assert round2["round"] == 2 and round2["aggregated"] and {"site-01", "site-02"} <= set(round2["train"])
    assert set(round2["evaluation"]) == {"site-01", "site-02"}, "the dead site did not evaluate round 2"
    assert any(r["site"] == "site-03" for r in round2["rejected"]), round2["rejected"]
    # While paused the ServerApp checks the flag every control-poll and says so in state.json: once
    # it has checked twice more, any round it were to run would have started.
    checks = deployment.state(run_id)["paused-checks"]
    deployment.wait(lambda: deployment.state(run_id).get("paused-checks", 0) >= checks + 2, 120,
                    "the paused run to check its flag twice more")
    assert len(deployment.records(run_id)) == 3, "no round runs while paused"
    deployment.server("pause", str(run_id))  # the centre's pause command on a paused run changes nothing
    assert deployment.state(run_id)["state"] == "paused"
    status = deployment.server("status", str(run_id)).stdout
    assert "paused" in status and "site-03" in status

    deployment.start_site("site-03")  # the site comes back and rejoins
    deployment.wait_online({"site-03"})
    deployment.server("continue", str(run_id))
    deployment.wait_until_ended(run_id)
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
