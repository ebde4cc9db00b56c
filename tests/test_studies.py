"""Every study at its --quick size, through the command a user runs: the report and its JSON
exist, agree with each other, and the plots are real PNGs. (What the figures are at the default
size is in the README's Results, from the committed results.json.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # five quick studies, dozens of in-process federations (make test)

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ["federation-vs-local", "privacy-utility", "heterogeneity", "hyperparameter-search", "local-training"]


@pytest.mark.parametrize("name", STUDIES)
def test_quick_study_writes_a_report_that_agrees_with_its_json(name, tmp_path):
    result = subprocess.run([sys.executable, "-m", "simulations.cli", "study", name, "--quick"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (folder,) = list((tmp_path / "runs" / "studies" / name).iterdir())
    results = json.loads((folder / "results.json").read_text())
    report = (folder / "report.md").read_text()
    assert results["study"] == name and results["seeds"] == 2, "the quick size: two seeds"
    assert results["command"] == f"clinicfl-sim study {name} --quick", "what reproduces it"
    assert len(results["provenance"]["commit"]) == 40 and "torch" in results["provenance"]["versions"]
    assert report.startswith(f"# {name}")
    table_rows = [line for line in report.splitlines() if line.startswith("| ")]
    for row in results["headline"]:
        assert "| " + " | ".join(row) + " |" in table_rows, f"headline row {row} is in report.md"
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    assert list(folder.glob("*.png")), "at least one plot"
    assert f"({png.name})" in report, "the report shows its plot"
    assert str(folder) in result.stdout.replace("\n", ""), "the command says where the report is"
    assert not (folder / "runs").exists() and not (folder / "data").exists(), "runs and data are cleaned up"
    if name == "heterogeneity":  # per site: the federation's model, local only, and fine-tuned at the site
        for sites in results["per_site"].values():
            for models in sites.values():
                assert set(models) == {"global", "local", "fine_tuned"}
                assert all(len(m["values"]) == results["seeds"] for m in models.values())
        # every method against the centralised arm, on the same test studies, with a paired interval
        assert set(results["gap_to_centralised"]) == set(results["methods"])
        for by_alpha in results["gap_to_centralised"].values():
            assert set(by_alpha) == {f"{a:g}" for a in results["alphas"]}
            for gap in by_alpha.values():
                low, high = gap["ci95"]
                assert low <= gap["mean"] <= high and gap["met"] == (high <= gap["target"])
    if name == "federation-vs-local":  # one axis at a time, each gap and margin with its paired interval
        assert list(results["settings"]) == ["iid", "label-skew"]
        for values in results["settings"].values():
            for key in ("gap_to_centralised", "margin_over_local"):
                low, high = values[key]["ci95"]
                assert low <= values[key]["mean"] <= high
            assert values["targets"]["within_centralised_met"] == (
                values["gap_to_centralised"]["ci95"][1] <= values["targets"]["within_centralised"])
    if name == "hyperparameter-search":  # the verdict: the winners' paired held-out difference
        verdict = results["ssa_minus_random_holdout_auc"]
        assert verdict["ci95"][0] <= verdict["mean"] <= verdict["ci95"][1] and len(verdict["n_test"]) == 2
        assert results["generations"] >= 1 and len(results["methods"]["ssa"]["runs"]) == 2
    if name == "local-training":  # each setting's validation loss against the default's, paired
        reference = results["reference_for_intervals"]
        for variant, values in results["variants"].items():
            entry = values["final_val_loss_minus_default"]
            assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
            if variant == reference:
                assert entry["mean"] == 0 and entry["ci95"] == [0, 0]
    if name == "privacy-utility":  # what plan-privacy looks up: a planned ratio and a paired drop per DP arm
        assert set(results["planned_snr"]) == set(results["drop"]) == {"8"}
        low, high = results["drop"]["8"]["ci95"]
        assert low <= results["drop"]["8"]["mean"] <= high


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
