"""The run directory's durability: the last finished round survives torn files, resume adopts
history once, and the pause flag round-trips."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord

from server.runs import RunDirectory, last_finished_round, load_checkpoint_arrays, read_control, read_metrics, \
    write_control


def _run(tmp_path, name="r1", rounds=3) -> RunDirectory:
    run = RunDirectory(tmp_path / name, {"num-rounds": 5}, "frozen:abc", budget_id="42")
    for r in range(rounds):
        run.save_checkpoint(r, ArrayRecord({"w": Array(np.full(3, float(r), np.float32))}))
        run.append_metrics({"round": r, "catalogue": {}})
    return run


def test_last_finished_round_needs_both_checkpoint_and_metrics(tmp_path):
    run = _run(tmp_path)
    assert last_finished_round(run.path) == 2
    run.save_checkpoint(3, ArrayRecord({"w": Array(np.zeros(3, np.float32))}))  # crashed before its metrics
    assert last_finished_round(run.path) == 2
    (run.path / "checkpoints/round-002.pt").write_bytes(b"torn")  # a torn checkpoint is not finished
    assert last_finished_round(run.path) == 1
    arrays, payload = load_checkpoint_arrays(run.path, 1)
    assert np.array_equal(arrays["w"].numpy(), np.ones(3, np.float32)) and payload["backbone-hash"] == "frozen:abc"


def test_resume_adopts_each_finished_round_once(tmp_path):
    old = _run(tmp_path, "old", rounds=3)
    new = RunDirectory(tmp_path / "new", {"num-rounds": 5}, "frozen:abc", budget_id="42",
                       resumed_from=str(old.path))
    records = new.adopt(old.path, last_round=1)
    assert [r["round"] for r in records] == [0, 1] == [r["round"] for r in read_metrics(new.path)]
    assert sorted(p.name for p in (new.path / "checkpoints").iterdir()) == ["round-000.pt", "round-001.pt"]
    meta = json.loads((new.path / "config.json").read_text())
    assert meta["budget-id"] == "42" and meta["resumed-from"] == str(old.path)
    new.append_metrics({"round": 2, "catalogue": {}})
    assert [r["round"] for r in read_metrics(new.path)] == [0, 1, 2]


def test_control_flag_round_trip(tmp_path):
    run = _run(tmp_path, rounds=1)
    assert run.control() == "running"
    write_control(run.path, "paused")
    assert read_control(run.path) == "paused"
    (run.path / "control.json").write_text("{not json")
    assert run.control() == "running", "a damaged flag never stops a federation"
