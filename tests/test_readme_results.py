"""The README's Results section is generated from the committed results.json files, never typed."""

from __future__ import annotations

import json

from simulations.studies.publish import BEGIN, END, PROJECT_ROOT, RESULTS_DIR, render_section


def test_readme_results_section_is_what_the_committed_results_render_to():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme
    section = BEGIN + readme.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert section == render_section(), "regenerate with clinicfl-sim study NAME --publish"


def test_every_published_study_has_its_report_and_plot():
    for folder in sorted(p for p in RESULTS_DIR.iterdir() if p.is_dir()) if RESULTS_DIR.is_dir() else []:
        results = json.loads((folder / "results.json").read_text())
        assert results["study"] == folder.name and results["seeds"] >= 3
        assert (folder / "report.md").is_file() and list(folder.glob("*.png"))
        for row in results["headline"]:
            assert "| " + " | ".join(row) + " |" in (folder / "report.md").read_text()
