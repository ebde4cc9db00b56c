"""Label files: clinicfl's ``labels.csv`` and the header-less ``key,0|1`` CSVs of MURA and MRNet.
Every problem is a one-line DataError naming the file and row."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from common.data.errors import DataError
from common.data.study import StudyLabel

LABELS_FILE = "labels.csv"
STUDIES_DIR = "studies"
SPLITS = ("train", "val", "test")  # the values of labels.csv's split column


def read_labels(site_dir: Path) -> tuple[list[StudyLabel], list[str]]:
    """Parse labels.csv; every problem is a one-line DataError naming the row.

    Columns: ``study`` (the folder name), ``label`` (0/1) or several ``label_<name>`` columns
    (multi-label), and optional ``split`` (train/val/test), ``patient`` and ``target`` (severity)."""
    if not site_dir.is_dir():
        raise DataError("missing-site-dir", f"site directory {site_dir} does not exist")
    path = site_dir / LABELS_FILE
    if not path.is_file():
        raise DataError("missing-labels", f"{path} not found: a site needs {LABELS_FILE} and {STUDIES_DIR}/")
    text = read_text_table(path)
    delimiter = detect_delimiter(text, path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    rows = list(reader)
    if "study" not in columns:
        raise DataError("bad-labels", f"{path} has no 'study' column (columns: {', '.join(columns) or 'none'})")
    label_columns = ["label"] if "label" in columns else sorted(c for c in columns if c.startswith("label_"))
    if not label_columns:
        raise DataError("bad-labels", f"{path} has no 'label' or 'label_<name>' column")
    if not rows:
        raise DataError("empty-site", f"{path} has no rows")
    records, seen = [], set()
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        study = row["study"]
        if not study:
            raise DataError("bad-labels", f"{path}:{line}: empty study name")
        if study in seen:
            raise DataError("bad-labels", f"{path}:{line}: study {study!r} listed twice")
        seen.add(study)
        labels = []
        for column in label_columns:
            if row.get(column) not in ("0", "1", "0.0", "1.0"):
                raise DataError("bad-labels", f"{path}:{line}: {column} must be 0 or 1, got {row.get(column)!r}")
            labels.append(float(row[column]))
        split = row.get("split") or None
        if split not in (None, *SPLITS):
            raise DataError("bad-labels", f"{path}:{line}: split must be train, val or test, got {split!r}")
        target = None
        if row.get("target"):
            try:  # a decimal comma, as semicolon- and tab-separated exports write it
                target = float(row["target"].replace(",", ".") if delimiter != "," else row["target"])
            except ValueError:
                raise DataError("bad-labels", f"{path}:{line}: target must be a number") from None
        records.append(StudyLabel(study, tuple(labels), split, row.get("patient") or None, target))
    names = ["injury"] if label_columns == ["label"] else [c.removeprefix("label_") for c in label_columns]
    return records, names


DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}


def read_text_table(path: Path) -> str:
    """A CSV file's text: UTF-8 with or without Excel's byte-order mark, any line ends."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError("bad-labels", f"{path} is not UTF-8 text: save it as 'CSV UTF-8' from the spreadsheet") from None


def detect_delimiter(text: str, path: Path) -> str:
    """The field separator of a table with a header, as spreadsheets export it: comma, semicolon
    or tab. The separator that splits the header into the ``study`` and label columns is taken;
    only when the header does not decide (none or several do), one that splits every row into as
    many columns as the header is. Anything else is a one-line error, never a guess."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return ","

    def header(delimiter: str) -> list[str]:
        return [c.strip() for c in next(csv.reader([lines[0]], delimiter=delimiter))]

    def names_columns(delimiter: str) -> bool:
        columns = header(delimiter)
        return "study" in columns and any(c == "label" or c.startswith("label_") for c in columns)

    def consistent(delimiter: str) -> bool:
        widths = {len(row) for row in csv.reader(lines, delimiter=delimiter)}
        return len(widths) == 1 and widths.pop() >= 2

    named = [d for d in DELIMITERS if names_columns(d)]
    if len(named) == 1:
        return named[0]
    candidates = [d for d in (named or DELIMITERS) if consistent(d)]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(DELIMITERS[d] for d in candidates) or "none that gives every row the same columns"
    raise DataError("bad-labels", f"{path}: cannot tell the column separator (candidates: {found}); "
                                  "export it as comma-separated 'CSV UTF-8'")


def read_binary_csv(path: Path) -> dict[str, float]:
    """A header-less ``key,0|1`` CSV as used by MURA and MRNet."""
    values: dict[str, float] = {}
    for line, row in enumerate(csv.reader(io.StringIO(read_text_table(path), newline="")), start=1):
        if not row or not row[0].strip():
            continue
        if len(row) < 2 or row[1].strip() not in ("0", "1"):
            raise DataError("bad-labels", f"{path}:{line}: expected 'key,0' or 'key,1'")
        values[row[0].strip()] = float(row[1].strip())
    return values
