"""A second real deployment on loopback (the fixture of tests/test_deployment.py, built again for
this module so that a second pytest-xdist worker runs it beside the first): two sites send a NaN
and a wrong-shaped update (both rejected, the model stays finite); the run is stopped after round
1 together with the server, and resumed after a server restart: rounds 0..3 each exactly once."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.loopback_deployment import RUN_SETTINGS
from tests.test_deployment import DRILLS, SITES, _start_sites, deployment  # noqa: F401 - the module's fixture

pytestmark = pytest.mark.slow  # a real TLS deployment (make test)


def test_bad_updates_are_rejected_and_a_stopped_server_resumes(deployment):
    _start_sites(deployment, SITES + list(DRILLS),
                 **{name: {"extra": ("--node-config", f'drill="{drill}"')} for name, drill in DRILLS.items()})
    # Paused after round 1 by its config; then the centre stops the run and the server, and
    # restarts the server: round 1 is the last finished round, and the resumed run trains 2 and 3.
    run_id = deployment.run("run", "--rounds", "3", "--min-sites", "3", *RUN_SETTINGS, "--set", "pause-after-round=1")
    deployment.wait(lambda: deployment.state(run_id).get("state") == "paused", 600, "the run to pause after round 1")
    deployment.server("stop", str(run_id))
    deployment.wait(lambda: deployment.state(run_id).get("state") == "stopped", 120, "the stop to be recorded")
    deployment.server("shutdown")
    records = deployment.records(run_id)
    done = 1
    assert [r["round"] for r in records] == [0, 1]
    stopped = deployment.state(run_id)
    assert (stopped["state"], stopped["last-round"]) == ("stopped", done), "the centre's stop is recorded"
    for record in records[1:]:
        reasons = {r["site"]: r["reason"] for r in record["rejected"] if r["phase"] == "train"}
        assert "non-finite" in reasons["drill-nan"] and "shape" in reasons["drill-shape"], reasons
        assert set(record["train"]) == set(SITES)
    run_dir = deployment.run_dir(run_id)
    for i in range(done + 1):
        trainable = torch.load(run_dir / f"checkpoints/round-{i:03d}.pt", weights_only=True)["trainable"]
        assert all(torch.isfinite(v).all() for v in trainable.values())

    deployment.server("start", "--address", f"127.0.0.1:{deployment.port}")
    deployment.wait_online(set(SITES))  # the sites reconnect by themselves
    resumed = deployment.run("resume", str(run_id))
    deployment.wait_until_ended(resumed)
    records = deployment.records(resumed)
    assert [r["round"] for r in records] == [0, 1, 2, 3], "every round exactly once across the restart"
    meta = json.loads((deployment.run_dir(resumed) / "config.json").read_text())
    assert meta["resumed-from"] == str(run_dir) and meta["budget-id"] == str(run_id)
    assert all(set(record["train"]) == set(SITES) for record in records[done + 1:])
    listing = deployment.server("status").stdout
    assert str(run_id) in listing and str(resumed) in listing
