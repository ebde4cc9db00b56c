"""A site folder: labels.csv parsing, splits, and clear errors for bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig, SharedConfig
from common.data.errors import DataError
from common.data.labels import read_labels
from common.data.site import assign_split, load_site


def test_site_loads_into_aligned_arrays(tiny_clinics, tiny_data_config):
    data = load_site(tiny_clinics[0], tiny_data_config, num_labels=1, progress=False)
    n = len(data.studies)
    assert n == 16 and data.images.shape == (n, 4, 32, 32) and data.mask.shape == (n, 4)
    assert data.labels.shape == (n, 1) and set(np.unique(data.labels)) == {0.0, 1.0}
    lengths = data.mask.sum(1)
    assert np.all(lengths >= 2)
    for row, length in enumerate(lengths):  # padding after the real images is exactly zero
        assert np.all(data.mask[row, :length]) and np.all(data.images[row, length:] == 0)
    assert 0 < data.is_test.sum() < n


def test_split_keeps_each_patient_on_one_side(tiny_clinics, tiny_data_config):
    records, _ = read_labels(tiny_clinics[0])
    split = assign_split(records, 0.3, 0.2, seed=0)
    sides: dict[str, set[str]] = {}
    for record, side in zip(records, split):
        sides.setdefault(record.patient, set()).add(str(side))
    assert all(len(s) == 1 for s in sides.values())
    assert set(split) == {"train", "val", "test"}
    assert np.array_equal(split, assign_split(records, 0.3, 0.2, seed=0)), "deterministic"


def test_explicit_split_and_multi_label_columns(site, tiny_data_config):
    studies = sorted(p.name for p in (site / "studies").iterdir())
    lines = ["study,label_acl,label_meniscus,split"]
    lines += [f"{s},{i % 2},{(i // 2) % 2},{'test' if i < 4 else 'train'}" for i, s in enumerate(studies)]
    (site / "labels.csv").write_text("\n".join(lines) + "\n")
    data = load_site(site, tiny_data_config, num_labels=2, progress=False)
    assert data.label_names == ["acl", "meniscus"] and data.labels.shape == (16, 2)
    assert data.is_test.sum() == 4 and list(np.flatnonzero(data.is_test)) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="num-labels"):
        load_site(site, tiny_data_config, num_labels=1, progress=False)


def test_unreadable_study_is_skipped_with_a_reason(site, tiny_data_config):
    victim = sorted((site / "studies").iterdir())[0]
    for path in victim.rglob("*.dcm"):
        path.write_bytes(b"this is not DICOM")
    data = load_site(site, tiny_data_config, num_labels=1, progress=False)
    assert len(data.studies) == 15 and data.skipped == [(victim.name, "no-usable-series")]
    files = {path for path, code in data.quarantine if code == "not-dicom"}
    assert files == {str(p.relative_to(site)) for p in victim.rglob("*.dcm")}
    assert (f"studies/{victim.name}", "no-usable-series") in data.quarantine


@pytest.mark.parametrize("breakage, code", [
    ("missing-dir", "missing-site-dir"),
    ("no-labels", "missing-labels"),
    ("empty-labels", "empty-site"),
    ("bad-label", "bad-labels"),
    ("nothing-readable", "no-usable-studies"),
])
def test_bad_site_is_a_clear_data_error(site, tiny_data_config, breakage, code):
    labels = site / "labels.csv"
    if breakage == "missing-dir":
        shutil.rmtree(site)
    elif breakage == "no-labels":
        labels.unlink()
    elif breakage == "empty-labels":
        labels.write_text("study,label\n")
    elif breakage == "bad-label":
        labels.write_text(labels.read_text().replace(",1,", ",yes,", 1))
    elif breakage == "nothing-readable":
        for path in site.rglob("*.dcm"):
            path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_site(site, tiny_data_config, num_labels=1, progress=False)
    assert info.value.code == code and "\n" not in str(info.value)


@pytest.mark.parametrize("breakage", ["missing-dir", "empty-site", "only-ghosts"])
def test_check_data_cli_prints_one_line_and_exits_non_zero(site, breakage):
    if breakage == "missing-dir":
        shutil.rmtree(site)
    elif breakage == "empty-site":
        shutil.rmtree(site / "studies")
        (site / "labels.csv").write_text("study,label\n")
    else:  # every label row names a study that is not there: nothing usable
        (site / "labels.csv").write_text("study,label\nghost-1,0\nghost-2,1\n")
    result = subprocess.run([sys.executable, "-m", "client.cli", "check-data", str(site), "--image-size", "32"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr


def test_check_data_cli_summarises_a_good_site(tiny_clinics):
    result = subprocess.run([sys.executable, "-m", "client.cli", "check-data", str(tiny_clinics[0]),
                             "--image-size", "32", "--seq-len", "4"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    data = load_site(tiny_clinics[0], DataConfig(SharedConfig(image_size=32, seq_len=4)), 1, progress=False)
    assert rows["usable studies"] == str(len(data.studies)) == "16"
    assert rows["train / val / test studies"] == \
        f"{len(data.train_index)} / {len(data.val_index)} / {len(data.test_index)}"
    assert len(data.val_index) > 0 and rows["injury (val): positive / negative"] == \
        f"{int(data.labels[data.val_index, 0].sum())} / {int((1 - data.labels[data.val_index, 0]).sum())}"
    assert rows["patients"] == str(len(set(data.groups)))
    assert "ZZFAKE" not in result.stdout + result.stderr, "no header values on screen"


def _table_rows(text: str) -> dict[str, str]:
    """{first cell: second cell} of every row of the rich tables a CLI printed."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if len(cells) >= 2 and cells[0]:
            rows.setdefault(cells[0], cells[1])
    return rows


def _spreadsheet_export(site: Path, delimiter: str, bom: bool, line_end: str) -> list[tuple[str, str]]:
    rows = [line.split(",") for line in (site / "labels.csv").read_text().splitlines()]
    text = line_end.join(delimiter.join(row) for row in rows) + line_end
    (site / "labels.csv").write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return rows


@pytest.mark.parametrize("delimiter, bom, line_end", [(",", True, "\r\n"), (";", True, "\r\n"), ("\t", False, "\n"),
                                                      (";", False, "\r\n")])
def test_labels_csv_as_spreadsheets_export_it(site, delimiter, bom, line_end):
    """Excel's 'CSV UTF-8' (byte-order mark, CRLF), and semicolon- or tab-separated exports."""
    reference, names = read_labels(site)
    _spreadsheet_export(site, delimiter, bom, line_end)
    records, again = read_labels(site)
    assert records == reference and again == names


def test_a_decimal_comma_in_a_semicolon_file_is_read(site):
    rows = [line.split(",") for line in (site / "labels.csv").read_text().splitlines()]
    header = rows[0] + ["target"]
    body = [row + ["2,5"] for row in rows[1:]]
    (site / "labels.csv").write_text("\n".join(";".join(r) for r in [header, *body]) + "\n")
    records, _ = read_labels(site)
    assert {r.target for r in records} == {2.5}


def test_an_ambiguous_or_foreign_labels_file_gets_one_clear_error(site):
    (site / "labels.csv").write_text("study,label;split\na,1;train\nb,0;test\n")
    with pytest.raises(DataError, match="cannot tell the column separator"):
        read_labels(site)
    (site / "labels.csv").write_bytes("study;label\nm\xfcller;1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_labels(site)
