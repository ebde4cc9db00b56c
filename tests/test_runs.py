"""The run directory's durability: the last finished round survives torn files, resume adopts
history once, and the pause flag round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from common.rundir import CONTROL_FILE, METRICS_FILE, RunDirectory


def _run(tmp_path, name="r1", rounds=3) -> RunDirectory:
    run = RunDirectory.create(tmp_path / name, {"num-rounds": 5}, "frozen:abc", budget_id="42")
    for r in range(rounds):
        run.save_checkpoint(r, ArrayRecord({"w": Array(np.full(3, float(r), np.float32))}))
        run.append_metrics({"round": r, "catalogue": {}})
    return run


def test_last_finished_round_needs_both_checkpoint_and_metrics(tmp_path):
    run = _run(tmp_path)
    assert run.last_finished_round() == 2
    run.save_checkpoint(3, ArrayRecord({"w": Array(np.zeros(3, np.float32))}))  # crashed before its metrics
    assert run.last_finished_round() == 2
    run.checkpoint_path(2).write_bytes(b"torn")  # a torn checkpoint is not finished
    assert RunDirectory(run.path).last_finished_round() == 1 and run.finished_rounds() == [0, 1]
    arrays, payload = RunDirectory(run.path).load_checkpoint_arrays(1)  # as a later process reads it
    assert np.array_equal(arrays["w"].numpy(), np.ones(3, np.float32)) and payload["backbone-hash"] == "frozen:abc"


def test_resume_adopts_each_finished_round_once(tmp_path):
    old = _run(tmp_path, "old", rounds=3)
    new = RunDirectory.create(tmp_path / "new", {"num-rounds": 5}, "frozen:abc", budget_id="42",
                              resumed_from=str(old.path))
    records = new.adopt(old, last_round=1)
    assert [r["round"] for r in records] == [0, 1] == [r["round"] for r in new.read_metrics()]
    assert sorted(p.name for p in (new.path / "checkpoints").iterdir()) == ["round-000.pt", "round-001.pt"]
    meta = json.loads((new.path / "config.json").read_text())
    assert meta["budget-id"] == "42" and meta["resumed-from"] == str(old.path)
    assert RunDirectory.open(new.path).budget_id() == "42"
    new.append_metrics({"round": 2, "catalogue": {}})
    assert [r["round"] for r in new.read_metrics()] == [0, 1, 2]


def test_control_flag_round_trip(tmp_path):
    run = _run(tmp_path, rounds=1)
    assert run.control() == "running"
    run.set_control("paused")
    assert RunDirectory(run.path).control() == "paused"
    (run.path / CONTROL_FILE).write_text("{not json")
    assert run.control() == "running", "a damaged flag never stops a federation"


def test_a_torn_last_line_of_metrics_jsonl_breaks_nothing(tmp_path):
    run = _run(tmp_path, rounds=3)
    with (run.path / METRICS_FILE).open("a") as handle:
        handle.write('{"round": 3, "catalo')  # the process died mid-write
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2]
    assert run.last_finished_round() == 2
    run.save_checkpoint(3, ArrayRecord({"w": Array(np.zeros(3, np.float32))}))
    run.append_metrics({"round": 3, "catalogue": {}})  # the next append cuts the torn line off
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2, 3]
    assert all(json.loads(line) for line in (run.path / METRICS_FILE).read_text().splitlines())


class _Planted:
    """A pickle that runs code when loaded with weights_only=False."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_report_uses_the_last_finished_round_and_never_unpickles_code(tmp_path, tiny_clinics):
    import torch

    from common.config import RunConfig
    from common.exchange import to_array_record
    from common.model import build_model, frozen_backbone_hash
    from server.report import write_report

    values = {"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8, "fid-dim": 8,
              "server-val-path": str(tiny_clinics[1])}
    model = build_model(RunConfig.from_mapping(values).model)
    run = RunDirectory.create(tmp_path / "run", values, frozen_backbone_hash(model), budget_id="1")
    for r in range(2):
        run.save_checkpoint(r, to_array_record(model))
        run.append_metrics({"round": r, "catalogue": {}, "roc": {}})
    marker = tmp_path / "code-ran"
    torch.save({"round": 2, "trainable": _Planted(str(marker))}, run.checkpoint_path(2))  # no metrics: unfinished
    results = dict(write_report(run.path, tmp_path / "report"))
    assert results["attention.png"].endswith("attention.png") and not marker.exists()


def test_config_files_keep_every_value_exactly(tmp_path):
    from flwr.common.config import parse_config_args

    from common.processes import write_config_file

    values = {"data-root": "/data/O'Neill \"sports\" clinic/a b", "lr": 0.002, "num-rounds": 3, "dp-enabled": True,
              "label-names": "acl,meniscus"}
    path = write_config_file(values, tmp_path / "run-config.toml")
    assert parse_config_args([str(path)]) == values, "what flwr reads is what we wrote"


def _record(rnd: int, loss: float, auc: float) -> dict:
    """A round whose pooled validation figures are ``loss`` and ``auc``; its test figures rank the
    rounds the other way round, so a choice by test figures would pick another round."""
    return {"round": rnd, "validation": {"loss": {"value": loss}, "auc": {"value": auc}},
            "catalogue": {"loss": {"value": 1 - loss}, "auc": {"value": 1 - auc}}}


def test_best_round_by_pooled_validation_loss_or_auc_and_export_defaults_to_it(tmp_path):
    from common.runlog import select_best
    from server.runs import best_round, chosen_round

    records = [_record(0, 0.70, 0.50), _record(1, 0.30, 0.90), _record(2, 0.45, 0.95), _record(3, 0.60, 0.93)]
    assert select_best(records, "val-loss") == (1, 0.30) and select_best(records, "val-auc") == (2, 0.95)
    run = RunDirectory.create(tmp_path / "r", {"best-metric": "val-loss"}, "frozen:abc", budget_id="1")
    for record in records:
        run.save_checkpoint(record["round"], ArrayRecord({"w": Array(np.full(3, float(record["round"]), np.float32))}))
        run.append_metrics(record)
    assert best_round(run) == {"round": 1, "metric": "val-loss", "value": 0.30}
    assert chosen_round(run) == 1 and chosen_round(run, 3) == 3
    run.checkpoint_path(1).write_bytes(b"torn")  # the best is only best if it can be loaded
    assert chosen_round(run) == 2
    import pytest

    with pytest.raises(ValueError, match="not finished"):
        chosen_round(run, 7)


def test_status_prints_the_state_the_best_round_and_each_rounds_sites(tmp_path):
    import io

    import pytest
    from rich.console import Console

    from server.runs import print_status

    with pytest.raises(ValueError, match="not a clinicfl run directory"):
        RunDirectory.open(tmp_path)
    run = RunDirectory.create(tmp_path / "20260101-000000-run7", {"best-metric": "val-loss"}, "frozen:abc", budget_id="")
    assert run.budget_id() == "7", "a run without a budget id charges its own run id"
    for record in (_record(0, 0.70, 0.50), _record(1, 0.30, 0.90)):
        record.update(train={"s1": {"loss": 0.5, "num-examples": 10}}, evaluation={"s1": {}, "s2": {}})
        run.save_checkpoint(record["round"], ArrayRecord({"w": Array(np.zeros(3, np.float32))}))
        run.append_metrics(record)
    run.append_metrics({**_record(2, 0.20, 0.95), "mismatches": [
        {"phase": "train", "site": "s2", "reason": "[node 9] answered for s2"}]})  # no checkpoint: not finished
    run.set_state("running", 1)
    out = io.StringIO()
    print_status(RunDirectory.open(run.path), Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    assert lines[0] == "20260101-000000-run7: running, last finished round 1"
    assert lines[1].startswith("best round 1 by val-loss (0.3000); last round 2;"), "the best finished round"
    assert "sites per round" in out.getvalue()
    assert lines[-1] == "round 2: train reply filed under s2: [node 9] answered for s2", "a site's words as written"


def test_the_tables_the_csv_and_the_curves_carry_the_confidence_intervals():
    import csv
    import io

    from rich.console import Console

    from common.rundir import CSV_HEADER, csv_rows
    from server.report import interval_band
    from server.runs import print_rounds

    auc = {"value": 0.934, "ci95": [0.881, 0.972], "per_site": {"s1": 0.9, "s2": 0.95},
           "per_site_ci95": {"s1": [0.8, 0.97], "s2": None}}
    records = [{"round": 0, "catalogue": {"auc": {"value": 0.5}}},  # a round without intervals
               {"round": 1, "catalogue": {"auc": auc, "sensitivity": {"value": 0.8, "ci95": [0.7, 0.88]},
                                          "f1": {"value": 0.7}}}]
    out = io.StringIO()
    print_rounds(records, Console(file=out, width=200))
    assert "0.934 [0.88, 0.97]" in out.getvalue() and "0.800 [0.70, 0.88]" in out.getvalue()
    assert "0.500" in out.getvalue() and "0.500 [" not in out.getvalue(), "no interval: the value alone"
    assert "0.700" in out.getvalue() and "0.700 [" not in out.getvalue(), "F1 is shown without an interval"

    table = io.StringIO(CSV_HEADER + csv_rows(records[1]))
    rows = {(row["scope"], row["metric"]): row for row in csv.DictReader(table)}
    assert (rows["global", "auc"]["ci95_low"], rows["global", "auc"]["ci95_high"]) == ("0.881", "0.972")
    assert (rows["s1", "auc"]["ci95_low"], rows["s1", "auc"]["ci95_high"]) == ("0.8", "0.97")
    assert rows["s2", "auc"]["ci95_low"] == rows["global", "f1"]["ci95_high"] == ""

    rounds, lows, highs = interval_band(records, "auc")
    assert rounds == [0, 1] and np.isnan(lows[0]) and (lows[1], highs[1]) == (0.881, 0.972)
    assert interval_band(records, "f1") == ([], [], []), "no band where no round has an interval"


def test_patience_ends_the_run_after_rounds_without_improvement():
    from common.config import RunConfig
    from server.federation import FederatedRun

    run = FederatedRun.__new__(FederatedRun)  # only the selection state is needed here
    run.fed = RunConfig.from_mapping({"patience": 2, "best-metric": "val-loss"}).federation
    run.records = [_record(0, 0.7, 0.5), _record(1, 0.3, 0.9)]
    assert run.early_stop_reason(1) is None
    run.records.append(_record(2, 0.35, 0.92))
    assert run.early_stop_reason(2) is None, "one round without improvement"
    run.records.append(_record(3, 0.50, 0.93))
    reason = run.early_stop_reason(3)
    assert reason == "early stop: val-loss has not improved for 2 rounds (patience 2; best round 1)"
    run.fed = RunConfig.from_mapping({"patience": 0}).federation
    assert run.early_stop_reason(3) is None, "patience 0: never"


def test_an_error_in_a_round_ends_the_run_as_failed_with_its_reason(tmp_path):
    import pytest

    from common.config import RunConfig
    from server.federation import FederatedRun

    class BrokenStrategy:
        def configure_train(self, *args, **kwargs):
            raise ConnectionError("the SuperLink went away")

    run = FederatedRun.__new__(FederatedRun)  # the loop's state, without a Grid or model
    run.fed = RunConfig.from_mapping({"num-rounds": 3}).federation
    run.run, run.records = _run(tmp_path, rounds=2), [_record(0, 0.7, 0.5), _record(1, 0.6, 0.6)]
    run.strategy, run.secure, run.train_config, run.grid = BrokenStrategy(), None, {}, None
    run.tracker = type("Tracker", (), {"log_round": lambda self, record: None})()
    with pytest.raises(ConnectionError):
        run.execute(ArrayRecord(), first_round=2)
    state = run.run.state()
    assert state["state"] == "failed" and state["last-round"] == 1
    assert state["detail"] == "ConnectionError: the SuperLink went away", "not 'running' for good"


def test_a_stop_by_the_centre_is_recorded_unless_the_run_already_ended(tmp_path):
    from server.runs import record_stop

    run = _run(tmp_path, rounds=2)
    run.set_state("running", 1)  # the ServerApp was stopped mid-round: it wrote nothing more
    record_stop(run, "stopped by the coordinating centre")
    state = run.state()
    assert (state["state"], state["last-round"], state["detail"]) == ("stopped", 1, "stopped by the coordinating centre")
    run.set_state("finished", 1)
    record_stop(run, "stopped by the coordinating centre")
    assert run.state()["state"] == "finished", "an ended run keeps its own state"


# ------------------------------------------------------------------ one message per site per round
class _ScriptedSites:
    """Two sites that answer every message at once with fixed, valid replies; ``exchanges`` lists
    what each exchange asked for: T (train), T+E (score the model, then train from it), E."""

    def __init__(self, run: RunDirectory, stop_in_exchange: int = 0) -> None:
        self.run, self.stop_in_exchange, self.exchanges = run, stop_in_exchange, []

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import ConfigRecord, MetricRecord, RecordDict

        from tests.conftest import reply
        from tests.test_strategy import HASH, _good_eval_record, _good_validation_record, _train_content

        messages = list(messages)
        (kind,) = {("T+E" if m.content["config"].get("evaluate-first") else "T") if m.metadata.message_type == "train"
                   else "E" for m in messages}
        self.exchanges.append(kind)
        if len(self.exchanges) == self.stop_in_exchange:
            self.run.set_control("stop")  # the centre's stop arrives while this exchange is under way
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if kind == "E":
                content = RecordDict({"metrics": MetricRecord(_good_eval_record()), "site": ConfigRecord(
                    {"status": "ok", "site-name": f"s{node}", "backbone-hash": HASH})})
                content["validation"] = MetricRecord(_good_validation_record())
            else:
                content = _train_content(0.1 * len(self.exchanges), 10, site=f"s{node}")
                if kind == "T+E":
                    content["evaluation"] = MetricRecord(_good_eval_record())
                    content["validation"] = MetricRecord(_good_validation_record())
            replies.append(reply(content, node, m.metadata.message_type))
        return replies


def _scripted_run(tmp_path, settings: dict, stop_in_exchange: int = 0):
    from common.config import RunConfig
    from server.federation import FederatedRun
    from server.tracking import NoTracker
    from tests.test_strategy import HASH, _strategy

    run = RunDirectory.create(tmp_path / "run", settings, HASH, budget_id="1")
    sites = _ScriptedSites(run, stop_in_exchange)
    federation = FederatedRun(RunConfig.from_mapping({"num-rounds": 3, **settings}), sites, run, _strategy(), {},
                              None, NoTracker(), HASH, "1")
    start = ArrayRecord({"head.w": Array(np.zeros((2, 3), np.float32)), "head.b": Array(np.zeros(2, np.float32))})
    state = federation.execute(start, first_round=1)
    return state, run.state(), run.read_metrics(), sites.exchanges


def test_the_sites_score_each_round_in_the_message_that_trains_the_next(tmp_path, server_task):
    state, _, records, exchanges = _scripted_run(tmp_path, {})
    assert state == "finished" and exchanges == ["T+E", "T+E", "T+E", "E"], "4 exchanges for 3 rounds, not 7"
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(set(r["evaluation"]) == {"s1", "s2"} and not r["rejected"] for r in records)
    assert [sorted(r["train"]) for r in records] == [[]] + [["s1", "s2"]] * 3
    run = RunDirectory(tmp_path / "run")
    assert run.last_finished_round() == 3
    checkpoints = [run.load_checkpoint_arrays(r)[0]["head.w"].numpy()[0, 0] for r in range(4)]
    assert np.allclose(checkpoints, [0.0, 0.1, 0.2, 0.3]), "each round's checkpoint is the model it scored"

    _, _, records, exchanges = _scripted_run(tmp_path / "two-phases", {"evaluate-with-training": False})
    assert exchanges == ["E", "T", "E", "T", "E", "T", "E"] and [r["round"] for r in records] == [0, 1, 2, 3]


def test_a_stop_or_an_early_stop_between_combined_rounds_ends_after_a_scored_round(tmp_path, server_task):
    # The stop arrives while the sites score round 1 and train round 2: round 2 is scored on its
    # own before the stop takes effect, and no round 3 is sent.
    state, run_state, records, exchanges = _scripted_run(tmp_path, {}, stop_in_exchange=2)
    assert exchanges == ["T+E", "T+E", "E"] and [r["round"] for r in records] == [0, 1, 2]
    assert (state, run_state["last-round"], run_state["detail"]) == ("stopped", 2, "stopped by the coordinating centre")
    # Every round scores the same, so patience 1 ends the run once round 1 has not improved on round
    # 0: round 2's training came back with round 1's scores and is not aggregated or recorded.
    state, run_state, records, exchanges = _scripted_run(tmp_path / "patience", {"patience": 1})
    assert exchanges == ["T+E", "T+E"] and [r["round"] for r in records] == [0, 1]
    assert state == "stopped" and run_state["last-round"] == 1
    assert run_state["detail"].startswith("early stop: val-loss has not improved for 1 rounds")
    assert "round 2's training" in run_state["detail"]
    assert RunDirectory(tmp_path / "patience" / "run").last_finished_round() == 1



def test_every_second_of_the_rounds_is_in_exactly_one_rounds_seconds(tmp_path, server_task, monkeypatch):
    # A clock that moves one second at every reading: a reading that fell between two rounds (the
    # last round's bookkeeping, say) would be in no round's seconds, and the sum would fall short.
    import itertools
    import types

    from server import federation

    ticks = itertools.count()
    monkeypatch.setattr(federation, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                                  sleep=lambda seconds: None))
    runs = []
    real = federation.FederatedRun.execute
    monkeypatch.setattr(federation.FederatedRun, "execute",
                        lambda self, *args, **kwargs: runs.append((self, self.started)) or real(self, *args, **kwargs))
    _, _, records, _ = _scripted_run(tmp_path, {})
    (run, started), = runs
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert sum(r["seconds"] for r in records) == run.started - started
    assert all("previous_round_records" in r["phase_seconds"] for r in records[1:])


def test_a_run_pauses_after_the_round_it_was_told_and_runs_no_round_while_paused(tiny_clinics, tmp_path):
    """pause-after-round pauses at a known round (no race with a pause command); while paused the
    ServerApp keeps checking the flag (paused-checks grows) and records no round; continue ends it."""
    import threading

    from simulations.inprocess import run_inprocess

    overrides = {"num-rounds": 3, "min-sites": 2, "image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8,
                 "attn-dim": 8, "recon-head": False, "local-epochs": 1, "pause-after-round": 1, "control-poll": 0.05}
    finished: list[Path] = []
    worker = threading.Thread(target=lambda: finished.append(
        run_inprocess(tiny_clinics[0].parent, tmp_path / "runs", 2, overrides)), daemon=True)
    worker.start()

    def paused_state() -> dict:
        dirs = list((tmp_path / "runs").glob("*-run*"))
        return RunDirectory(dirs[0]).state() if dirs else {}

    _wait_for(lambda: paused_state().get("paused-checks", 0) >= 3, worker, "the run to pause and check its flag")
    run = RunDirectory(next((tmp_path / "runs").glob("*-run*")))
    state = run.state()
    assert (state["state"], state["last-round"]) == ("paused", 1)
    assert [r["round"] for r in run.read_metrics()] == [0, 1], "no round ran while the run was paused"
    run.set_control("running")  # clinicfl-server continue
    worker.join(timeout=600)
    assert finished and [r["round"] for r in run.read_metrics()] == [0, 1, 2, 3]
    assert run.state()["state"] == "finished" and "paused-checks" not in run.state()


def _wait_for(condition, worker, what: str, limit: float = 600.0) -> None:
    """Wait for an event the test observes; fail (not hang) if the worker died or it never came."""
    import time

    deadline = time.monotonic() + limit
    while not condition():
        assert worker.is_alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
