"""clinicfl-client predict: a short federation (the real apps, in process), its exported model,
and predictions on a clinic that no site trained on, with explanations, a web page and DICOM."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from sklearn.metrics import roc_auc_score

from client.outputs import study_output_stem
from client.text import printable_ascii
from common.runlog import read_metrics
from simulations.inprocess import run_inprocess
from simulations.synthetic import SyntheticSpec, generate_clinics

ROOT = Path(__file__).resolve().parents[1]
RUN = {"num-rounds": 3, "min-sites": 2, "image-size": 48, "seq-len": 8, "local-epochs": 3, "lr": 0.002,
       "test-fraction": 0.4, "fid-dim": 8, "eval-bins": 256,
       # About 20 training studies per site overfit within 3 epochs: the pooled validation loss can be
       # lowest at round 0 while the AUC still rises, and these tests need the trained model.
       "best-metric": "val-auc"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    spec = SyntheticSpec(sites=2, studies_per_site=40, image_size=48, slices_per_study=6, seed=11)
    generate_clinics(root / "data", spec, progress=False)
    (holdout,) = generate_clinics(root / "holdout", SyntheticSpec(sites=1, studies_per_site=40, image_size=48,
                                                                  slices_per_study=6, seed=12), progress=False)
    run_dir = run_inprocess(root / "data", root / "runs", 2, RUN)
    result = subprocess.run([sys.executable, "-m", "server.cli", "export", str(run_dir)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return root, run_dir, Path(result.stdout.strip()), holdout


def _predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", "predict", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"})


def _rows(out: Path) -> list[dict]:
    lines = [line for line in (out / "predictions.csv").read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def _hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc ** 2) + (n_neg - 1) * (q2 - auc ** 2)) / (n_pos * n_neg))


@pytest.mark.slow
def test_predictions_on_an_unseen_clinic_match_the_federations_own_auc(exported, tmp_path):
    """The held-out clinic comes from the same generator as the sites' test splits, so the model's
    AUC on it estimates the same quantity as the server's pooled AUC of the exported round. The
    tolerance is the histogram AUC's own stated error bound plus three standard errors of the
    difference of two independent AUC estimates (Hanley & McNeil), computed from their counts."""
    root, run_dir, model, holdout = exported
    result = _predict(str(model), str(holdout), "--out", str(tmp_path / "out"),
                      "--state-dir", str(root / "data" / ".clinicfl-state" / "site-01"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = _rows(tmp_path / "out")
    labels = {r["study"]: int(r["label"]) for r in csv.DictReader((holdout / "labels.csv").open())}
    y = np.array([labels[r["study"]] for r in rows])
    p = np.array([float(r["injury_probability"]) for r in rows])
    predicted_auc = roc_auc_score(y, p)
    meta = torch.load(model, weights_only=True)
    record = next(r for r in read_metrics(run_dir) if r["round"] == meta["round"])
    server = record["catalogue"]["auc"]
    checkpoint = torch.load(run_dir / "checkpoints" / f"round-{meta['round']:03d}.pt", weights_only=True)
    pooled = list(checkpoint["pooled-histograms"].values())
    n_pos, n_neg = (int(sum(h[i].sum() for h in pooled)) for i in (0, 1))
    se = math.hypot(_hanley_mcneil_se(predicted_auc, int(y.sum()), int((1 - y).sum())),
                    _hanley_mcneil_se(server["value"], n_pos, n_neg))
    tolerance = server["error_bound"] + 3 * se
    assert abs(predicted_auc - server["value"]) <= tolerance, (predicted_auc, server["value"], tolerance)
    assert predicted_auc > 0.7, "the model learned the lesion"
    assert "studies/s" in result.stdout
    header = [line for line in (tmp_path / "out" / "predictions.csv").read_text().splitlines() if line.startswith("#")]
    assert any("calibration platt" in line for line in header) and any("operating threshold" in line for line in header)


@pytest.mark.slow
def test_attention_is_on_a_lesion_slice_more_often_than_chance(exported, tmp_path):
    """Injured studies: the most attended image shows the lesion far more often than a random
    image of the same study would (chance = the share of lesion slices among its images)."""
    root, _, model, holdout = exported
    assert _predict(str(model), str(holdout), "--out", str(tmp_path / "out"), "--stats-from", str(holdout),
                    cwd=tmp_path).returncode == 0
    truth = {r["study"]: r for r in csv.DictReader((holdout / "labels.csv").open())}
    hits, chance = [], []
    for row in _rows(tmp_path / "out"):
        lesion = truth[row["study"]]["lesion_slices"]
        weights = [float(a) for a in row["attention"].split(";")]
        if truth[row["study"]]["label"] != "1" or not lesion or len(weights) < max(int(z) for z in lesion.split()) + 1:
            continue  # a study sampled down to seq-len has no one-to-one slice index
        slices = {int(z) for z in lesion.split()}
        hits.append(int(np.argmax(weights)) in slices)
        chance.append(len(slices) / len(weights))
    assert len(hits) >= 8
    rate, expected = float(np.mean(hits)), float(np.mean(chance))
    assert rate >= expected + 0.25, f"attention on a lesion slice in {rate:.2f} of injured studies, chance {expected:.2f}"


@pytest.mark.slow
def test_pngs_html_and_dicom_are_written_and_open_in_a_real_browser(exported, tmp_path):
    root, _, model, holdout = exported
    out = tmp_path / "out"
    result = _predict(str(model), str(holdout), "--out", str(out), "--stats-from", str(holdout), "--dicom-out",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    assert len(rows) == 40 and all((out / r["figure"]).is_file() for r in rows)
    # DICOM: a Secondary Capture in each source study, a new series, new instances
    for row in rows[:5]:
        sc = pydicom.dcmread(out / row["dicom"])
        source = pydicom.dcmread(next((holdout / "studies" / row["study"]).rglob("*.dcm")), stop_before_pixels=True)
        assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
        assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SOPInstanceUID != source.SOPInstanceUID
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.PhotometricInterpretation == "RGB"
        assert f"p={float(row['injury_probability']):.2f}" in sc.SeriesDescription
        assert sc.pixel_array.shape[2] == 3 and sc.BurnedInAnnotation == "NO"
        with pydicom.config.strict_reading():  # every value well-formed
            strict = pydicom.dcmread(out / row["dicom"])
            [element.value for element in strict.iterall()]
    series = {pydicom.dcmread(out / r["dicom"], stop_before_pixels=True).SeriesInstanceUID for r in rows[:5]}
    assert len(series) == 5, "each study's explanation is its own series in its own study"
    report, errors = _dciodvfy(out / rows[0]["dicom"])
    assert "SCImage" in report and not errors, errors
    # The export's model card in brief, with the test AUC and its interval as the card states them.
    card = json.loads(model.with_name(model.stem + ".model-card.json").read_text())
    page = (out / "index.html").read_text(encoding="utf-8")
    auc = card["performance"]["pooled"]["auc"]
    assert "id='model-card'" in page and "Test AUC (95% CI)" in page
    assert f"{auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]" in page
    _check_in_chromium(out / "index.html", len(rows))


def _dciodvfy(path: Path) -> tuple[str, list[str]]:
    """dicom3tools' verdict on a file: its whole report and the lines that are errors."""
    dciodvfy = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    verdict = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
    report = verdict.stdout + verdict.stderr
    return report, [line for line in report.splitlines() if line.startswith("Error")]


def _check_in_chromium(page: Path, studies: int) -> None:
    """Open index.html in headless Chromium; every image has loaded and every link resolves."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(page.as_uri())
        rows = browser.execute_script("return document.querySelectorAll('#predictions tbody tr').length")
        assert rows == studies
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        assert broken == [] and browser.execute_script("return document.images.length") == studies
        links = browser.execute_script("return Array.from(document.links).map(a => a.href)")
    finally:
        browser.quit()
    assert len(links) >= 2 * studies
    for link in links:
        assert link.startswith("file://") and Path(link.removeprefix("file://")).is_file(), link


@pytest.mark.slow
def test_the_same_study_in_every_lossless_transfer_syntax_gets_the_same_probability(exported, tmp_path):
    root, _, model, _ = exported
    variants = ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                "MR_small_jp2klossless.dcm"]
    # One folder of studies (studies/<name>/), one study per transfer syntax, scored in one call.
    for name in variants:
        study = tmp_path / "batch" / "studies" / name.removesuffix(".dcm")
        study.mkdir(parents=True)
        shutil.copy(get_testdata_file(name), study / name)
    out = tmp_path / "out"
    result = _predict(str(model), str(tmp_path / "batch"), "--out", str(out), "--stats-from", str(exported[3]),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    probabilities = {row["study"]: float(row["injury_raw_probability"]) for row in _rows(out)}
    assert set(probabilities) == {name.removesuffix(".dcm") for name in variants}
    reference = probabilities["MR_small"]
    assert all(abs(p - reference) <= 1e-6 for p in probabilities.values()), probabilities


@pytest.mark.slow
def test_a_model_the_site_cannot_reproduce_is_refused_in_one_line(exported, tmp_path):
    root, _, model, holdout = exported
    # no standardisation statistics for this backbone in an empty state dir
    result = _predict(str(model), str(holdout), "--state-dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode == 2 and "no feature standardisation statistics" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # another label set: the site's labels.csv names two tasks
    other = tmp_path / "other"
    shutil.copytree(holdout, other)
    lines = (other / "labels.csv").read_text().splitlines()
    header = lines[0].replace("label", "label_acl", 1) + ",label_meniscus"
    (other / "labels.csv").write_text("\n".join([header] + [line + ",0" for line in lines[1:]]) + "\n")
    result = _predict(str(model), str(other), "--stats-from", str(holdout), cwd=tmp_path)
    assert result.returncode == 2 and "label" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # not a model export at all
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    result = _predict(str(tmp_path / "junk.pt"), str(holdout), cwd=tmp_path)
    assert result.returncode == 2 and "not a clinicfl model export" in result.stderr


@pytest.mark.slow
def test_a_study_folder_of_only_broken_files_is_a_quarantine_entry(exported, tmp_path):
    _, _, model, holdout = exported
    study = tmp_path / "broken-study"
    study.mkdir()
    (study / "a.dcm").write_bytes(b"")
    (study / "b.dcm").write_bytes(b"not dicom at all" * 10)
    out = tmp_path / "out"
    result = _predict(str(model), str(study), "--out", str(out), "--stats-from", str(holdout), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _rows(out) == []
    quarantine = list(csv.DictReader((out / "quarantine.csv").open()))
    assert {(q["path"], q["reason"]) for q in quarantine} >= {("a.dcm", "empty-file"), ("b.dcm", "not-dicom")}
    assert "quarantine" in result.stdout and (out / "index.html").is_file()


class _TableRows(HTMLParser):
    """index.html's predictions table: per row, the study cell's text and every href and src."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, set[str]]] = []
        self._in_table = self._in_body = self._in_first_link = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._in_table = dict(attrs).get("id") == "predictions"
        elif self._in_table and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append(("", set()))
        elif self._in_body and tag in ("a", "img"):
            study, links = self.rows[-1]
            links.update(v for k, v in attrs if k in ("href", "src") and v)
            self._in_first_link = tag == "a" and not study

    def handle_endtag(self, tag: str) -> None:
        self._in_first_link = self._in_first_link and tag != "a"
        self._in_body = self._in_body and tag != "tbody"
        self._in_table = self._in_table and tag != "table"

    def handle_data(self, data: str) -> None:
        if self._in_first_link:
            study, links = self.rows[-1]
            self.rows[-1] = (study + data, links)


@pytest.mark.slow
def test_two_patients_whose_names_differ_only_in_non_ascii_letters_keep_their_own_outputs(exported, tmp_path):
    """'Müller^Hans' and 'Möller^Hans' fold to the same ASCII. Each study still gets its own
    figure, and its Secondary Capture carries its own patient, its own study and its own figure's
    pixels: anything else is a wrong-patient error in PACS."""
    root, _, model, holdout = exported
    patients = {"Müller^Hans": "ZZFAKE-MUELLER", "Möller^Hans": "ZZFAKE-MOELLER"}
    studies = tmp_path / "input" / "studies"
    for (name, patient_id), source in zip(patients.items(), sorted((holdout / "studies").iterdir())[:2]):
        shutil.copytree(source, studies / name)
        for path in (studies / name).rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds.SpecificCharacterSet, ds.PatientName, ds.PatientID = "ISO_IR 192", name, patient_id
            ds.save_as(path, enforce_file_format=True)
    out = tmp_path / "out"
    result = _predict(str(model), str(studies.parent), "--out", str(out), "--dicom-out",
                      "--state-dir", str(root / "data" / ".clinicfl-state" / "site-01"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["study"]: row for row in _rows(out)}
    assert set(rows) == set(patients)
    assert len({row["figure"] for row in rows.values()}) == 2, "each study has its own figure file"
    pixels = {}
    for name, row in rows.items():
        source = pydicom.dcmread(next((studies / name).rglob("*.dcm")), stop_before_pixels=True)
        with pydicom.config.strict_reading():
            capture = pydicom.dcmread(out / row["dicom"])
        assert capture.PatientID == patients[name] and capture.PatientName == name
        assert capture.StudyInstanceUID == source.StudyInstanceUID
        figure = np.asarray(Image.open(out / row["figure"]).convert("RGB"))
        below_text = slice(figure.shape[0] // 4, None)  # the burned-in line is at the top
        assert np.array_equal(capture.pixel_array[below_text], figure[below_text]), f"{name}: not its own figure"
        pixels[name] = capture.pixel_array[below_text]
    first, second = pixels.values()
    assert first.shape != second.shape or not np.array_equal(first, second), "two patients, one picture"
    parser = _TableRows()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    assert {study: links for study, links in parser.rows} == {
        name: {row["figure"], row["dicom"]} for name, row in rows.items()}


@pytest.mark.slow
def test_text_from_the_centre_is_cleaned_before_it_goes_into_dicom_and_the_csv(exported, tmp_path):
    """A label name and a run name with a DICOM backslash (the VR value delimiter), a newline and
    markup still give valid descriptions: every value reads strictly, dciodvfy finds no error, and
    the CSV's header comments stay one line each."""
    root, _, model, holdout = exported
    payload = torch.load(model, weights_only=True)
    label, run_name = "inj\\ury\n<script>", "run\\2026\r\nSoftware Versions: forged\x00"
    payload["config"]["label-names"] = label
    payload["calibration"] = {label: payload["calibration"]["injury"]}
    payload["run"] = run_name
    torch.save(payload, tmp_path / "model.pt")
    study = sorted((holdout / "studies").iterdir())[0]
    shutil.copytree(study, tmp_path / "input" / "studies" / study.name)
    out = tmp_path / "out"
    result = _predict(str(tmp_path / "model.pt"), str(tmp_path / "input"), "--out", str(out), "--dicom-out",
                      "--state-dir", str(root / "data" / ".clinicfl-state" / "site-01"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (out / "predictions.csv").read_text().splitlines()
    assert next(line for line in lines if not line.startswith("#")).startswith("study,images,")
    (row,) = _rows(out)
    probability = next(v for k, v in row.items() if k.endswith("_probability") and not k.endswith("_raw_probability"))
    with pydicom.config.strict_reading():
        capture = pydicom.dcmread(out / row["dicom"])
    texts = [capture.SeriesDescription, capture.DerivationDescription, capture.SoftwareVersions]
    for text in texts:
        assert isinstance(text, str), "one value, not split at a backslash"
        assert text.isascii() and text.isprintable() and "\\" not in text, text
    assert len(capture.SeriesDescription) <= 64 and len(capture.SoftwareVersions) <= 64
    assert f"p={float(probability):.2f}" in capture.SeriesDescription
    assert "inj" in capture.SeriesDescription and "forged" in capture.DerivationDescription
    report, errors = _dciodvfy(out / row["dicom"])
    assert "SCImage" in report and not errors, errors


def test_centre_text_becomes_one_line_of_printable_ascii_without_backslash():
    assert printable_ascii("inj\\ury\n<script>", 64) == "inj ury <script>"
    assert printable_ascii("run\\2026\r\n\x1b[2J\x00Zürich", 64) == "run 2026 [2J Zurich"
    assert printable_ascii("x" * 100, 64) == "x" * 64 and printable_ascii(None, 8) == "None"


def test_study_output_stems_differ_where_the_readable_names_fold_alike():
    stems = [study_output_stem(0, name) for name in ("Müller^Hans", "Möller^Hans", "M_ller_Hans")]
    assert len(set(stems)) == 3 and all(re.fullmatch(r"0000-M[uo_]ller_Hans-[0-9a-f]{8}", s) for s in stems), stems
    assert study_output_stem(1, "Müller^Hans") != stems[0]  # and the row alone keeps two studies apart
    assert re.fullmatch(r"0012-study-[0-9a-f]{8}", study_output_stem(12, "患者/..\\"))
