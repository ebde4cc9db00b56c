"""clinicfl-sim tune-dp: dp-lr chosen on public data only, one real DP run of the public clinic per
rate, each scored on a second public clinic."""

from __future__ import annotations

import json
from dataclasses import replace

from simulations.cli import main
from simulations.dp_tuning import LrTrial, chosen
from simulations.synthetic import SyntheticSpec, generate_clinics


def test_tune_dp_runs_the_public_clinic_under_dp_at_each_rate_and_chooses_on_the_other(tmp_path, capsys):
    spec = SyntheticSpec(sites=1, studies_per_site=30, image_size=32, slices_per_study=3, seed=21)
    (public,) = generate_clinics(tmp_path / "public", spec, progress=False)
    (score_on,) = generate_clinics(tmp_path / "score", replace(spec, seed=22), progress=False)
    out = tmp_path / "tune.json"
    assert main(["tune-dp", str(public), "--score-on", str(score_on), "--lr", "0.001,0.03", "--out", str(out),
                 "--run-root", str(tmp_path / "runs"), "--set", "num-rounds=2", "--set", "image-size=32",
                 "--set", "seq-len=3", "--set", "recon-head=false", "--set", "local-epochs=1"]) == 0
    result = json.loads(out.read_text())
    trials = result["trials"]
    assert [t["lr"] for t in trials] == [0.001, 0.03]
    for t in trials:
        assert t["best_auc"] is not None and 0.0 <= t["best_auc"] <= 1.0
        assert 0 < t["epsilon"] <= 8.0 + 1e-6, "each trial is a real DP run within the budget"
    assert result["chosen_dp_lr"] == max(trials, key=lambda t: t["best_auc"])["lr"]
    printed = capsys.readouterr().out
    assert "(chosen)" in printed and f"dp-lr={result['chosen_dp_lr']:g}" in printed
    # two run directories, one per rate, each of two rounds (beside the centre's hidden validation cache)
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2


def test_tune_dp_refuses_a_folder_that_is_not_a_site(tmp_path, capsys):
    assert main(["tune-dp", str(tmp_path), "--score-on", str(tmp_path)]) == 2
    assert "no labels.csv" in capsys.readouterr().out


def test_the_chosen_rate_is_the_best_scored_trial_and_unscored_trials_never_win():
    trials = [LrTrial(0.01, 0.8, 3, 0.7, 8.0, 1.0), LrTrial(0.03, None, None, None, 8.0, 1.0),
              LrTrial(0.003, 0.9, 2, 0.9, 8.0, 1.0)]
    assert chosen(trials).lr == 0.003
    assert chosen([LrTrial(0.01, None, None, None, None, 1.0)]) is None
