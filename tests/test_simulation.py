"""End to end: a real Flower simulation (SuperLink + Ray) over synthetic DICOM clinics.

Two good sites and one whose labels.csv has a label that is neither 0 nor 1. The broken site must
be rejected with its reason code every round while the federation learns from the other two.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.exchange import trainable_spec
from common.model import build_model
from common.runlog import read_metrics
from simulations.runner import run_simulation
from simulations.synthetic import SyntheticSpec, generate_clinics

pytestmark = pytest.mark.slow  # a real SuperLink and Ray simulation (make test)

ROUNDS = 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    spec = SyntheticSpec(sites=2, studies_per_site=32, image_size=48, slices_per_study=6, seed=5)
    sites = generate_clinics(root / "data", spec, progress=False)
    broken = root / "data" / "site-03"
    shutil.copytree(sites[0], broken)
    labels = (broken / "labels.csv").read_text()
    (broken / "labels.csv").write_text(labels.replace(",1,", ",yes,", 1))  # ambiguous: the site refuses to guess
    (server_val,) = generate_clinics(root / "server", SyntheticSpec(sites=1, studies_per_site=12, image_size=48,
                                                                    slices_per_study=6, seed=99), progress=False)
    overrides = {"num-rounds": ROUNDS, "min-sites": 2, "image-size": 48, "seq-len": 6, "local-epochs": 4,
                 "test-fraction": 0.4, "lr": 0.002, "server-val-path": str(server_val), "fid-dim": 16,
                 "tracking": "tensorboard"}
    run_dir = run_simulation(root / "data", root / "runs", num_sites=3, overrides=overrides,
                             flwr_home=root / "flwr-home", timeout=900)
    return run_dir, overrides


def test_every_round_is_recorded_with_finite_metrics(finished_run):
    run_dir, _ = finished_run
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    for record in records:
        g = record["global_eval"]
        assert all(math.isfinite(g[k]) for k in ("loss", "accuracy", "auc"))
        assert g["n"] > 0 and set(record["evaluation"]) == {"site-01", "site-02"}
    for record in records[1:]:
        assert record["aggregated"] and set(record["train"]) == {"site-01", "site-02"}
        assert record["traffic"]["site-01"]["sent"] > 0 and record["traffic"]["site-01"]["received"] > 0


def test_the_global_model_goes_to_a_site_once_per_round(finished_run):
    """One model copy per site per round, not two: the message that trains round r carries the
    global model and has the site score it first (round r-1's evaluation, whose bytes it counts as);
    the last round's evaluation message carries the last model."""
    run_dir, overrides = finished_run
    model_bytes = sum(int(np.prod(p.shape)) * 4 for p in trainable_spec(build_model(
        RunConfig.from_mapping(overrides).model)).values())
    for record in read_metrics(run_dir)[1:]:
        traffic = record["traffic"]["site-01"]
        # evaluate: the model (losslessly compressed: ~13% fewer bytes); train: only its digest
        assert 0.5 * model_bytes < traffic["sent"] < 1.05 * model_bytes
        assert 0.5 * model_bytes < traffic["received"] < 1.05 * model_bytes  # the site's update and statistics


def test_broken_site_is_rejected_with_its_reason_every_round(finished_run):
    run_dir, _ = finished_run
    for record in read_metrics(run_dir):
        reasons = {(r["site"], r["phase"], r["reason"]) for r in record["rejected"]}
        phases = {"evaluate"} if record["round"] == 0 else {"train", "evaluate"}
        assert reasons == {("site-03", p, "site reported error: bad-labels") for p in phases}


def test_a_checkpoint_per_round_that_loads_into_the_model(finished_run):
    run_dir, overrides = finished_run
    config = RunConfig.from_mapping(overrides)
    model = build_model(config.model)
    spec = trainable_spec(model)
    for rnd in range(ROUNDS + 1):
        checkpoint = torch.load(run_dir / "checkpoints" / f"round-{rnd:03d}.pt", weights_only=False)
        assert checkpoint["round"] == rnd and checkpoint["backbone-hash"].startswith("frozen:")
        assert set(checkpoint["trainable"]) == set(spec)
        model.load_state_dict(checkpoint["trainable"], strict=False)
        assert all(torch.isfinite(t).all() for t in checkpoint["trainable"].values())
    first = torch.load(run_dir / "checkpoints" / "round-000.pt", weights_only=False)["trainable"]
    last = torch.load(run_dir / "checkpoints" / f"round-{ROUNDS:03d}.pt", weights_only=False)["trainable"]
    assert any(not torch.equal(first[k], last[k]) for k in first), "training must move the global model"


def test_the_federation_learns(finished_run):
    run_dir, _ = finished_run
    records = read_metrics(run_dir)
    assert records[-1]["global_eval"]["auc"] > records[0]["global_eval"]["auc"] + 0.05
    assert np.isfinite(records[-1]["global_eval"]["loss"])


def test_each_round_records_the_whole_catalogue(finished_run):
    run_dir, _ = finished_run
    for record in read_metrics(run_dir):
        catalogue = record["catalogue"]
        for name in ("auc", "accuracy", "sensitivity", "specificity", "f1", "kappa", "mae", "rmse", "psnr", "ssim",
                     "is"):
            assert catalogue[name]["value"] is not None and math.isfinite(catalogue[name]["value"]), name
            assert catalogue[name]["aggregation"]
        assert set(catalogue["auc"]["per_site"]) == {"site-01", "site-02"}
        # FID (a backbone pass over the new reconstructions) at round 0 and the last round, with
        # the default fid-every of 5; in between it says why it is missing.
        if record["round"] in (0, ROUNDS):
            assert math.isfinite(catalogue["fid"]["value"])
            assert "ResNet50" in catalogue["fid"]["note"] and "16-d" in catalogue["fid"]["note"]
        else:
            assert catalogue["fid"]["value"] is None and "fid-every" in catalogue["fid"]["reason"]
        assert catalogue["params_total_m"]["value"] > 23.5 and catalogue["gflops_per_study"]["value"] > 0
        assert catalogue["inference_ms_per_study"]["value"] > 0 and "cpu" in catalogue["inference_ms_per_study"]["note"]
        assert catalogue["epsilon"]["value"] is None and "differential privacy" in catalogue["epsilon"]["reason"]
        assert catalogue["bytes_sent"]["per_site"]["site-01"] > 0
        central = record["server_validation"]
        assert central["auc"]["value"] is not None and central["psnr"]["value"] > 0
        assert (central["fid"]["value"] is not None) == (record["round"] in (0, ROUNDS))
    assert read_metrics(run_dir)[-1]["catalogue"]["train_seconds"]["per_site"]["site-02"] > 0
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0] == "round,scope,metric,value,aggregation,reason,ci95_low,ci95_high"
    assert any(row.startswith("2,site-01,auc,") for row in rows)
    assert any(row.startswith("2,server-validation,ssim,") for row in rows)


def test_report_writes_the_plots(finished_run, tmp_path):
    from PIL import Image

    from server.report import write_report

    run_dir, _ = finished_run
    results = dict(write_report(run_dir, tmp_path))
    for name in ("curves.png", "roc.png", "attention.png", "reconstructions.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200, name
        assert results[name] == str(tmp_path / name)


def test_tensorboard_holds_every_rounds_figures(finished_run):
    """The ServerApp logged the catalogue per round; read back with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    records = read_metrics(run_dir)
    for name, key in (("global/auc", "auc"), ("global/loss", "loss"), ("global/bytes_received", "bytes_received")):
        logged = {e.step: e.value for e in events.Scalars(name)}
        assert logged == pytest.approx({r["round"]: r["catalogue"][key]["value"] for r in records}, rel=1e-6)
    assert {e.step for e in events.Scalars("site/site-01/auc")} == {0, 1, 2}
    assert {e.step for e in events.Scalars("server-validation/auc")} == {0, 1, 2}
    assert "report/curves" in events.Tags()["images"], "the report PNGs went in at the end"


def test_mlflow_holds_the_run_config_figures_and_plots(finished_run, tmp_path):
    """The MLflow tracker on this run's records, read back through MLflow's client API."""
    import shutil

    from mlflow.tracking import MlflowClient

    from server.tracking import open_tracker

    run_dir, _ = finished_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    config = RunConfig.from_mapping(json.loads((copy / "config.json").read_text())["config"]).to_mapping()
    tracker = open_tracker("mlflow", copy, config)
    records = read_metrics(copy)
    for record in records:
        tracker.log_round(record)
    pngs = sorted((copy / "report").glob("*.png")) or sorted(p for p in copy.rglob("*.png"))
    tracker.log_artifacts(pngs)
    tracker.finish("finished")
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("clinicfl").experiment_id])
    assert run.info.run_name == copy.name and run.info.status == "FINISHED"
    assert run.data.params["lr"] == str(config["lr"]) and run.data.params["num-rounds"] == str(ROUNDS)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "global/auc")}
    assert history == pytest.approx({r["round"]: r["catalogue"]["auc"]["value"] for r in records}, rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "site/site-02/bytes_sent")] == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {f"report/{p.name}" for p in pngs}
