"""Benchmarks: one command each, a JSON result under runs/benchmarks/, ratios side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(path: str | Path, result: dict[str, Any], hide: tuple[str, ...] = ()) -> Path:
    """Write the JSON result and print it (without the ``hide`` keys, e.g. long specs)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in hide}, indent=2))
    print(f"written to {out}")
    return out


def replace_between(path: Path, begin: str, end: str, block: str) -> None:
    """Replace ``begin``...``end`` in a document with ``block`` (which carries both markers)."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin!r} ... {end!r} markers")
    head, rest = text.split(begin, 1)
    path.write_text(head + block + rest.split(end, 1)[1])
