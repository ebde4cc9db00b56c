"""A round record of the run directory's metrics log: its one-line summary and the best-round
selection. The log's file is ``common.rundir.RunDirectory``'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common.rundir import RunDirectory


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete round record of the run directory ``run_dir``, oldest first."""
    return RunDirectory(run_dir).read_metrics()


def _value(record: dict[str, Any], name: str) -> Any:
    return ((record.get("catalogue") or {}).get(name) or {}).get("value")


def round_line(record: dict[str, Any], num_rounds: int | None = None) -> str:
    """One line per finished round, for logs and progress displays."""
    def fmt(value: Any, digits: int = 3) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"

    train = record.get("train") or {}
    evaluated = record.get("evaluation") or {}
    parts = [f"round {record['round']}" + (f"/{num_rounds}" if num_rounds else ""),
             f"test AUC {fmt(_value(record, 'auc'))} loss {fmt(_value(record, 'loss'))} "
             f"acc {fmt(_value(record, 'accuracy'))}",
             f"val loss {fmt(selection_value(record, 'val-loss'))} AUC {fmt(selection_value(record, 'val-auc'))}",
             f"sites trained {len(train)} evaluated {len(evaluated)}"]
    if record.get("rejected"):
        parts.append(f"rejected {len(record['rejected'])}")
    if secure := record.get("secure_aggregation"):
        parts.append(f"secagg {secure.get('sites', 0) - len(secure.get('dropped') or {})}/{secure.get('sites', 0)}")
    if (epsilon := _value(record, "epsilon")) is not None:
        parts.append(f"eps {fmt(epsilon, 2)}")
    server_val = ((record.get("server_validation") or {}).get("auc") or {}).get("value")
    if server_val is not None:
        parts.append(f"server-val AUC {fmt(server_val)}")
    if isinstance(record.get("seconds"), (int, float)):
        parts.append(f"{record['seconds']:.1f} s")
    return "  ".join(parts)


# Best-round criteria: (where the value is, lower is better). "val" figures come from the sums of
# the sites' validation statistics; "server-val" from the centre's own validation clinic. Never a
# test figure: those are reported for the chosen round, and a round chosen by them would make
# them a biased estimate.
SELECTION_METRICS = {"val-loss": ("validation", "loss", True), "val-auc": ("validation", "auc", False),
                     "server-val-loss": ("server_validation", "loss", True),
                     "server-val-auc": ("server_validation", "auc", False)}


def describe_selection(metric: str) -> str:
    """What a best-metric measures, in words: "the sites' pooled validation loss"."""
    section, name, _ = SELECTION_METRICS[metric]
    where = "the sites' pooled validation" if section == "validation" else "the centre's validation clinic's"
    return f"{where} {name.upper() if name == 'auc' else name}"


def selection_value(record: dict[str, Any], metric: str) -> float | None:
    section, name, _ = SELECTION_METRICS[metric]
    value = ((record.get(section) or {}).get(name) or {}).get("value")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def select_best(records: list[dict[str, Any]], metric: str) -> tuple[int, float] | None:
    """(round, value) of the best round by ``metric``; the earliest round wins a tie. None when no
    round has the figure."""
    lower_is_better = SELECTION_METRICS[metric][2]
    best: tuple[int, float] | None = None
    for record in sorted(records, key=lambda r: r["round"]):
        value = selection_value(record, metric)
        if value is None:
            continue
        if best is None or (value < best[1] if lower_is_better else value > best[1]):
            best = (int(record["round"]), value)
    return best
