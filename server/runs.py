"""The run directory: one checkpoint per round, metrics.jsonl, and the per-round table.

    RUN_DIR/
      config.json               the run config and backbone hash
      checkpoints/round-003.pt  trainable parameters + config + backbone hash
      metrics.jsonl             one JSON record per round (global and per-site figures)

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from rich.console import Console
from rich.table import Table

from server.strategy import RoundReport

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


class RunDirectory:
    def __init__(self, path: Path, config: dict[str, Any], backbone_hash: str) -> None:
        self.path = path
        self.config = config
        self.backbone_hash = backbone_hash
        (path / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / "config.json", json.dumps(
            {"config": config, "backbone-hash": backbone_hash}, indent=2).encode())

    @classmethod
    def create(cls, root: Path, run_id: int | str, config: dict[str, Any], backbone_hash: str) -> "RunDirectory":
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
        return cls(root.expanduser().resolve() / name, config, backbone_hash)

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / CHECKPOINT_DIR / f"round-{server_round:03d}.pt"

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> Path:
        path = self.checkpoint_path(server_round)
        payload = {
            "round": server_round,
            "trainable": {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()},
            "config": self.config,
            "backbone-hash": self.backbone_hash,
        }
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(_json_safe(record)) + "\n"
        with (self.path / METRICS_FILE).open("a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def round_record(report: RoundReport, seconds: float, checkpoint: Path | None) -> dict[str, Any]:
    record = asdict(report)
    record["round"] = record.pop("server_round")
    record["seconds"] = round(seconds, 3)
    record["checkpoint"] = checkpoint.name if checkpoint else None
    return record


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null (a figure that could not be computed)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def rounds_table(records: list[dict[str, Any]], title: str = "clinicfl rounds") -> Table:
    table = Table(title=title)
    for column in ("round", "sites", "rejected", "train loss", "test loss", "acc", "AUC", "n test", "s"):
        table.add_column(column, justify="right")
    for r in records:
        g = r.get("global_eval") or {}
        train = r.get("train") or {}
        weights = sum(t["num-examples"] for t in train.values())
        train_loss = sum(t["loss"] * t["num-examples"] for t in train.values()) / weights if weights else None
        table.add_row(
            str(r["round"]), str(len(train)), str(len(r.get("rejected") or [])),
            _fmt(train_loss), _fmt(g.get("loss")), _fmt(g.get("accuracy")), _fmt(g.get("auc")),
            str(g.get("n", "")), _fmt(r.get("seconds"), 1),
        )
    return table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def print_rounds(records: list[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console(width=110)).print(rounds_table(records))
