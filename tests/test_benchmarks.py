"""The benchmark suite runs at its tiny size and writes valid JSON with every part and headline
figure (no timing is asserted: benchmarks measure, tests check behaviour), and the README's
performance table is the one rendered from the committed suite.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.suite import BEGIN, BEGIN_CUDA, CUDA_ONLY, END, END_CUDA, PARTS, PUBLISHED, PUBLISHED_CUDA, \
    render_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_suite_runs_at_a_tiny_size_and_writes_its_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert set(suite["parts"]) == set(PARTS) - CUDA_ONLY and suite["tiny"] is True
    for name in suite["parts"]:
        assert json.loads((tmp_path / f"{name}.json").read_text()), name
    rows = suite["headline"]
    assert rows[0]["figure"].startswith("later round") and "/ lean recipe" in rows[0]["figure"]
    ratios = [rows[0]]  # the later round against the lean recipe's, then the other side-by-side figures
    for expected in ("later round: plain recipe", "bytes per site per round", "DP step", "per message at a site",
                     "train_local cached features", "site ready", "the same, decode overlapped"):
        (row,) = [r for r in rows if r["figure"].startswith(expected)]
        ratios.append(row)
    for row in ratios:
        # a ratio measured side by side: a positive, finite number, judged against a goal where it has one
        assert isinstance(row["value"], (int, float)) and 0 < row["value"] < float("inf"), row
        assert row["met"] is None if row["goal"] == "report" else row["met"] in (True, False), row
    (scaling,) = [r for r in rows if r["figure"].startswith("2 sites: peak PSS")]
    assert scaling["value"] is None or abs(scaling["value"]) < float("inf"), scaling  # 2 rounds have no second half
    # what cannot be measured on this machine is said, not faked
    (waits,) = [r for r in rows if r["figure"].startswith("host-device waits")]
    assert waits["value"] is None and "not available" in waits["figure"]
    table = render_table(suite, BEGIN, END)
    assert all(row["figure"].split(":")[0] in table for row in rows), "the printed table lists every figure"


def test_the_readme_performance_tables_are_rendered_from_the_committed_json():
    readme = (ROOT / "README.md").read_text()
    for published, begin, end in ((PUBLISHED, BEGIN, END), (PUBLISHED_CUDA, BEGIN_CUDA, END_CUDA)):
        section = begin + readme.split(begin, 1)[1].split(end, 1)[0] + end
        if published.is_file():
            assert section == render_table(json.loads(published.read_text()), begin, end)
        else:
            assert section == begin + "\n" + end, f"no {published.name}: its table is empty"


def test_the_secure_aggregation_cost_table_is_rendered_from_the_committed_json():
    from benchmarks import secagg

    doc = secagg.DOC.read_text()
    section = secagg.BEGIN + doc.split(secagg.BEGIN, 1)[1].split(secagg.END, 1)[0] + secagg.END
    published = json.loads(secagg.PUBLISHED.read_text())
    assert section == secagg.render_table(published)
    assert [size["sites"] for size in published["sizes"]] == [3, 10]
    assert all(size["secagg"]["aggregated_rounds"] == size["secagg"]["rounds"] for size in published["sizes"])


def test_the_deployment_round_table_is_rendered_from_the_committed_json():
    from benchmarks import deployment_round

    doc = deployment_round.DOC.read_text()
    section = deployment_round.BEGIN + doc.split(deployment_round.BEGIN, 1)[1].split(deployment_round.END, 1)[0] \
        + deployment_round.END
    published = json.loads(deployment_round.PUBLISHED.read_text())
    assert section == deployment_round.render_table(published)
    assert set(published["arms"]) == set(deployment_round.ARMS)


def test_repeated_runs_of_an_arm_pool_their_later_rounds():
    """Each run's first round is left out, the rest pooled: the median is over every later round
    of every run, and a round that computes FID is told apart in each run."""
    from benchmarks.rounds import pooled

    runs = [{"round_seconds": [9.0, 1.0, 3.0], "rounds_with_fid": [True, False, True], "whole_run_s": 10.0,
             "bytes_per_site_per_round": 100, "final_auc": 0.5},
            {"round_seconds": [8.0, 2.0, 4.0], "rounds_with_fid": [True, False, True], "whole_run_s": 20.0,
             "bytes_per_site_per_round": 300, "final_auc": 0.7}]
    arm = pooled(runs)
    assert arm["later_round_s"] == 2.5 and arm["later_rounds_mean_s"] == 2.5  # 1, 3, 2, 4
    assert arm["later_round_with_fid_s"] == 3.5 and arm["whole_run_s"] == 15.0
    assert arm["bytes_per_site_per_round"] == 200 and arm["final_auc_every_run"] == [0.5, 0.7]
    assert arm["repeats"] == 2 and arm["runs"] == runs
    assert pooled(runs[:1]) is runs[0]
