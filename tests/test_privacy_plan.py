"""clinicfl-server plan-privacy: the noise each site will calibrate, the signal-to-noise ratio it
gives, and the AUC drop the published privacy study measured at the nearest ratios."""

from __future__ import annotations

import json
import math

import pytest

from common.config import RunConfig
from common.dp_plan import PlannedRun
from server import privacy_plan
from server.cli import main
from server.privacy_plan import SitePlan, federation_snr, measured_band, plan_site

RUN = {"dp-enabled": True, "server-val-path": "/centre/clinic", "num-rounds": 2, "local-epochs": 1,
       "batch-size": 16, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8}


def test_a_larger_site_gets_less_noise_per_step_and_a_higher_ratio():
    config = RunConfig.from_mapping({**RUN, "dp-batch-fraction": 0})  # a fixed batch-size
    small, large = plan_site(config, 100, 20_000), plan_site(config, 1000, 20_000)
    assert large.noise_multiplier < small.noise_multiplier and large.snr_run > small.snr_run
    # the site's own calibration gives the same noise (client/privacy.py calls the same code)
    plan = PlannedRun.of(config, 100)
    assert small.steps == plan.steps and small.sample_rate == plan.sample_rate
    assert small.release_noise is not None, "feature-norm = site: the standardisation is released under DP"
    step, run = plan.signal_to_noise(small.noise_multiplier, 20_000)
    assert step == pytest.approx(plan.sample_rate * 100 / (small.noise_multiplier * math.sqrt(20_000)))
    assert run == pytest.approx(step * math.sqrt(plan.steps))


def test_a_batch_fraction_gives_every_site_the_same_noise_and_a_ratio_that_grows_with_its_units():
    """dp-batch-fraction (the default under DP): every site samples the same share of its units, so
    the sampling rate, the steps and the noise multiplier are the same at every size, and the
    expected batch (the ratio per step) grows with the units."""
    config = RunConfig.from_mapping({**RUN, "dp-batch-fraction": 0.5})
    small, large = plan_site(config, 100, 20_000), plan_site(config, 1000, 20_000)
    assert small.sample_rate == large.sample_rate == 0.5 and small.steps == large.steps == 4
    assert small.noise_multiplier == pytest.approx(large.noise_multiplier)
    assert (small.batch, large.batch) == (50, 500)
    assert large.snr_run == pytest.approx(10 * small.snr_run)
    fixed = plan_site(RunConfig.from_mapping({**RUN, "dp-batch-fraction": 0}), 1000, 20_000)
    assert large.snr_run > 2 * fixed.snr_run, "the large batch is what lifts the ratio at the same epsilon"
    for units in (69, 71, 2, 1001):  # rounded up, an odd count still samples at exactly one half
        assert PlannedRun.of(config, units).sample_rate == 0.5


def test_the_federation_ratio_combines_equal_sites_as_the_square_root_of_their_number():
    site = SitePlan(500, 1e-5, 0.1, 100, 50.0, 2.0, 1.0, 0.1, 3.0)
    assert federation_snr([site] * 4) == pytest.approx(2 * 3.0)
    weak = SitePlan(100, 1e-5, 0.1, 100, 10.0, 2.0, 1.0, 0.1, 0.5)
    assert federation_snr([site, weak]) < federation_snr([site, site])


def test_the_band_comes_from_the_published_study_and_warns_where_it_did_not_learn(tmp_path):
    study = tmp_path / "results.json"
    study.write_text(json.dumps({"planned_snr": {"2": 1.0, "8": 4.0}, "drop": {"2": {"mean": 0.20}, "8": {"mean": 0.03}}}))
    between = measured_band(2.0, study)
    assert "1.00" in between.text and "4.00" in between.text and "+0.200" in between.text
    assert not between.failed, "above the largest ratio at which the study's model failed"
    above = measured_band(10.0, study)
    assert "above every ratio" in above.text and "+0.030" in above.text and not above.failed
    below = measured_band(0.5, study)
    assert "below every ratio" in below.text and below.failed
    study.write_text(json.dumps({"best_auc": {}}))
    assert measured_band(2.0, study).text.startswith("not available")


def test_the_command_prints_a_row_per_site_and_the_federations_ratio(capsys, monkeypatch, tmp_path):
    study = tmp_path / "results.json"
    study.write_text(json.dumps({"planned_snr": {"8": 0.5}, "drop": {"8": {"mean": 0.25}}}))
    monkeypatch.setattr(privacy_plan, "PUBLISHED_STUDY", study)
    assert main(["plan-privacy", "--units", "100,400", "--epsilon", "8", "--rounds", "2", "--batch", "16",
                 "--set", "proj-dim=16", "--set", "gru-hidden=8", "--set", "attn-dim=8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [row.split("│")[2].strip() for row in rows] == ["100", "400"]
    assert "federation (FedAvg of the 2 sites)" in out and "epsilon 8" in out
    assert "did not learn" in out or "above every ratio" in out
    assert main(["plan-privacy", "--units", "0"]) == 2


def test_the_centre_logs_the_ratio_its_sites_first_dp_round_implies_and_warns_where_the_study_failed(
        monkeypatch, tmp_path, caplog):
    import logging

    study = tmp_path / "results.json"
    study.write_text(json.dumps({"planned_snr": {"8": 5.0}, "drop": {"8": {"mean": 0.25}}}))
    monkeypatch.setattr(privacy_plan, "PUBLISHED_STUDY", study)
    privacy = {"site-01": {"epsilon": 1.0, "delta": 1e-5, "noise-multiplier": 2.0, "max-grad-norm": 1.0,
                           "sample-rate": 0.25, "steps": 8.0}}
    train = {"site-01": {"num-examples": 64, "loss": 0.7, "seconds": 1.0}}
    plans = privacy_plan.plans_from_replies(privacy, train, num_rounds=3, trainable=10_000)
    (plan,) = plans.values()
    assert plan.steps == 24 and plan.snr_step == pytest.approx(0.25 * 64 / (2.0 * 100))
    with caplog.at_level(logging.INFO):
        band = privacy_plan.log_planned_ratio(plans, logging.getLogger("test"))
    assert band.failed and any(r.levelno == logging.WARNING and "did not learn" in r.getMessage() for r in caplog.records)
