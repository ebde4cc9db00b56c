"""No patient data leaves a site: every byte of every message the sites send in a real
simulation is scanned for the planted identifiers (DICOM header values, UIDs, file paths), and so
is everything the centre keeps: its run directory and the whole log of the run. One site runs the
``raise-phi`` drill: its handler raises an exception whose message names a patient's folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
import pytest
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from common.runlog import read_metrics
from simulations.runner import run_simulation
from simulations.synthetic import FAKE_PHI_MARKER, SyntheticSpec, generate_clinics

pytestmark = pytest.mark.slow  # a real SuperLink and Ray simulation (make test)

PATH_PHI = "ZZFAKE-DOE-JOHN-19750315"


def _plant_phi_in_paths(site: Path) -> None:
    """A study folder and a series folder named after the patient, and a broken file with an MRN."""
    rows = list(csv.DictReader((site / "labels.csv").open()))
    old = rows[0]["study"]
    (site / "studies" / old).rename(site / "studies" / PATH_PHI)
    rows[0]["study"] = PATH_PHI
    with (site / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    series = next(p for p in (site / "studies" / rows[1]["study"]).iterdir() if p.is_dir())
    series.rename(series.parent / f"{PATH_PHI}-series")
    (site / "studies" / rows[2]["study"] / "ZZFAKE_MRN_0042.dcm").write_bytes(b"not dicom")


def _header_phi(site: Path) -> set[str]:
    values: set[str] = set()
    for path in site.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
                        "StudyDate", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "FrameOfReferenceUID"):
            values.add(str(ds.get(keyword, "")))
    return {v for v in values if len(v) >= 8}


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    sites = generate_clinics(root / "data", SyntheticSpec(sites=3, studies_per_site=16, image_size=32,
                                                          slices_per_study=3, seed=21), progress=False)
    for site in sites:
        _plant_phi_in_paths(site)
    phi = set().union(*(_header_phi(site) for site in sites)) | {PATH_PHI, "ZZFAKE_MRN_0042", FAKE_PHI_MARKER,
                                                                  str(root)}
    run_dir = run_simulation(root / "data", root / "runs", num_sites=3,
                             overrides={"num-rounds": 1, "min-sites": 2, "image-size": 32, "seq-len": 3, "fid-dim": 8,
                                        "audit-outgoing": True, "drill": "raise-phi", "drill-sites": "site-03"},
                             flwr_home=root / "flwr-home", timeout=600)
    audits = sorted((root / "data" / ".clinicfl-state").glob("site-*/audit/*.pb"))
    return audits, phi, run_dir, root


def test_every_site_message_is_audited(audited_run):
    audits, _, _, _ = audited_run
    kinds = {(p.parent.parent.name, p.name.split("-")[2]) for p in audits}
    assert kinds == {(s, k) for s in ("site-01", "site-02", "site-03") for k in ("train", "evaluate")}
    for path in audits:
        proto = ProtoMessage()
        proto.ParseFromString(path.read_bytes())
        message = message_from_proto(proto)
        if path.parent.parent.name == "site-03":  # the drill: an error reply with a code and a type name
            site = message.content.config_records["site"]
            assert (site["reason"], site["exception-type"]) == ("internal-error", "DrillError")
            continue
        assert message.has_content() and message.content.metric_records, "real replies, not empty files"
        # The scan below can see text: the site's own (non-identifying) name is in every reply.
        assert path.parent.parent.name.encode() in path.read_bytes()


def test_no_planted_identifier_is_in_any_byte_sent(audited_run):
    audits, phi, _, _ = audited_run
    assert len(phi) > 20, "the scan must look for many planted values"
    for path in audits:
        data = path.read_bytes()
        for value in phi:
            assert value.encode() not in data, f"{value!r} left the site in {path.name}"


def test_an_exception_naming_a_patient_stays_at_the_site(audited_run):
    """The centre's run directory (records, CSV, checkpoints, the run's whole log) and the
    SuperLink's log hold no planted value; the site's own log holds the exception and traceback."""
    _, phi, run_dir, root = audited_run
    # In a simulation the centre itself names the data root (its config); a patient's folder in it is PHI.
    centre_phi = phi - {str(root)} | {str(root / "data" / "site-03" / "studies" / PATH_PHI)}
    centre_files = [p for p in run_dir.rglob("*") if p.is_file()] + list((root / "flwr-home").rglob("*.log"))
    assert any(p.name == "simulation.log" for p in centre_files) and any(p.suffix == ".pt" for p in centre_files)
    for path in centre_files:
        data = path.read_bytes()
        for value in centre_phi:
            assert value.encode() not in data, f"{value!r} reached the centre in {path}"
    record = read_metrics(run_dir)[-1]
    reasons = {r["reason"] for r in record["rejected"] if r["site"] == "site-03"}
    assert reasons == {"site reported error: internal-error (DrillError)"}
    site_log = (root / "data" / ".clinicfl-state" / "site-03" / "logs" / "site.log").read_text()
    assert "Traceback" in site_log and "DrillError" in site_log and str(root) in site_log, \
        "the drill really raised with a patient's path, and the text went to the site's log"
