"""The run directory: one checkpoint per round, metrics.jsonl, and the per-round table.

    RUN_DIR/
      config.json               the run config, backbone hash, budget id, and the run it resumes
      checkpoints/round-003.pt  trainable parameters + config + backbone hash
      metrics.jsonl             one JSON record per round (global and per-site figures)
      state.json                running / paused / finished / stopped / failed, the last finished round
      control.json              written by clinicfl-server pause/continue/stop, read between rounds

Every file is written to a temporary name and renamed (metrics.jsonl is appended and fsynced),
so a crash never leaves half a file. A round is finished when both its checkpoint and its
metrics record exist: that is where ``resume`` continues.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from rich.console import Console
from rich.table import Table

from common.files import atomic_torch_save, atomic_write_bytes
from common.runlog import METRICS_FILE, append_record, json_safe, read_metrics, select_best
from common.metrics.catalogue import MetricValue
from server.strategy import RoundReport

CSV_FILE = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"


CONTROL_STATES = ("running", "paused", "stop")
ENDED_STATES = ("finished", "stopped", "failed")


class RunDirectory:
    def __init__(self, path: Path, config: dict[str, Any], backbone_hash: str, budget_id: str = "",
                 resumed_from: str | None = None) -> None:
        self.path = path
        self.config = config
        self.backbone_hash = backbone_hash
        self._csv_rows: list[str] | None = None  # metrics.csv's rows, one string per round record
        (path / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / "config.json", json.dumps(
            {"config": config, "backbone-hash": backbone_hash, "budget-id": budget_id,
             "resumed-from": resumed_from}, indent=2).encode())

    @classmethod
    def create(cls, root: Path, run_id: int | str, config: dict[str, Any], backbone_hash: str,
               budget_id: str = "", resumed_from: str | None = None) -> "RunDirectory":
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
        return cls(root.expanduser().resolve() / name, config, backbone_hash, budget_id or str(run_id), resumed_from)

    def adopt(self, previous: Path, last_round: int) -> list[dict[str, Any]]:
        """Continue ``previous``: its records and checkpoints up to ``last_round`` become this
        run's history, so the metric log reads rounds 0..N once each across the restart."""
        records = [r for r in read_metrics(previous) if r["round"] <= last_round]
        for record in records:
            source = previous / CHECKPOINT_DIR / f"round-{record['round']:03d}.pt"
            if source.is_file():
                shutil.copy2(source, self.checkpoint_path(record["round"]))
        atomic_write_bytes(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())
        self._csv_rows = [csv_rows(r) for r in records]
        write_csv(self.path, self._csv_rows)
        return records

    def control(self) -> str:
        """What the coordinating centre asked for: running, paused or stop."""
        return read_control(self.path)

    def set_state(self, state: str, last_round: int | None, detail: str = "",
                  best: dict[str, Any] | None = None) -> None:
        """state.json: running / paused / finished / stopped / failed, the last finished round
        (None before round 0 has finished), why, and the best round so far ({"round", "metric", "value"})."""
        write_run_state(self.path, state, last_round, detail, best)

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / CHECKPOINT_DIR / f"round-{server_round:03d}.pt"

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord,
                        histograms: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
        """Trainable parameters, config and backbone hash; with ``histograms``, the round's pooled
        score histograms (resolution -> positives, negatives per label), which the export's
        probability calibration is fitted on."""
        path = self.checkpoint_path(server_round)
        payload = {
            "round": server_round,
            "trainable": {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()},
            "config": self.config,
            "backbone-hash": self.backbone_hash,
            "pooled-histograms": {int(bins): (torch.from_numpy(np.asarray(pos, np.int64)),
                                              torch.from_numpy(np.asarray(neg, np.int64)))
                                  for bins, (pos, neg) in (histograms or {}).items()},
        }
        atomic_torch_save(payload, path)
        return path

    def append_metrics(self, record: dict[str, Any]) -> None:
        safe = json_safe(record)  # as metrics.jsonl holds it (and read_metrics returns it)
        append_record(self.path, json.dumps(safe))
        # The CSV is rewritten whole (atomically) but only the new round's rows are formatted:
        # rereading and reformatting every round made each round cost more than the last.
        if self._csv_rows is None:
            self._csv_rows = [csv_rows(r) for r in read_metrics(self.path)]
        else:
            self._csv_rows.append(csv_rows(safe))
        write_csv(self.path, self._csv_rows)


def read_control(run_dir: Path) -> str:
    path = run_dir / "control.json"
    if not path.is_file():
        return "running"
    try:
        state = json.loads(path.read_text()).get("state", "running")
    except (json.JSONDecodeError, OSError):
        return "running"
    return state if state in CONTROL_STATES else "running"


def write_control(run_dir: Path, state: str) -> None:
    if state not in CONTROL_STATES:
        raise ValueError(f"control state must be one of {CONTROL_STATES}")
    atomic_write_bytes(run_dir / "control.json", json.dumps({"state": state, "at": time.time()}).encode())


def read_run_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_run_state(run_dir: Path, state: str, last_round: int | None, detail: str = "",
                    best: dict[str, Any] | None = None) -> None:
    atomic_write_bytes(run_dir / "state.json", json.dumps(
        {"state": state, "last-round": last_round, "detail": detail, "best": best, "updated": time.time()}).encode())


def record_stop(run_dir: Path, detail: str) -> None:
    """A run the centre stopped, in its state.json. A ServerApp stopped mid-round ends without
    writing it (its state would say 'running' for good); one that already ended is left as it is."""
    if read_run_state(run_dir).get("state") in ENDED_STATES:
        return
    write_run_state(run_dir, "stopped", last_finished_round(run_dir), detail, best_round(run_dir))


def last_finished_round(run_dir: Path) -> int | None:
    """The last round with both a metrics record and a readable checkpoint."""
    finished = finished_rounds(run_dir)
    return finished[-1] if finished else None


def finished_rounds(run_dir: Path) -> list[int]:
    """Rounds with both a metrics record and a readable checkpoint, in order."""
    rounds = []
    for record in read_metrics(run_dir):
        path = run_dir / CHECKPOINT_DIR / f"round-{record['round']:03d}.pt"
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # missing or torn
            continue
        rounds.append(int(record["round"]))
    return sorted(set(rounds))


def best_round(run_dir: Path) -> dict[str, Any] | None:
    """The best finished round by the run's own best-metric: {"round", "metric", "value"}."""
    metric = run_config(run_dir).get("best-metric", "loss")
    finished = set(finished_rounds(run_dir))
    found = select_best([r for r in read_metrics(run_dir) if r["round"] in finished], metric)
    return None if found is None else {"round": found[0], "metric": metric, "value": found[1]}


def chosen_round(run_dir: Path, requested: int | None = None) -> int:
    """The round a command works on: the one asked for (it must be finished), else the best
    finished round, else the last finished one."""
    finished = finished_rounds(run_dir)
    if not finished:
        raise ValueError(f"{run_dir} has no finished round (a checkpoint and its metrics record)")
    if requested is not None:
        if requested not in finished:
            raise ValueError(f"round {requested} of {run_dir.name} is not finished; finished rounds: "
                             f"{', '.join(map(str, finished))}")
        return requested
    best = best_round(run_dir)
    return best["round"] if best is not None else finished[-1]


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    return json.loads(path.read_text()).get("config", {}) if path.is_file() else {}


def load_checkpoint_arrays(run_dir: Path, server_round: int) -> tuple[ArrayRecord, dict[str, Any]]:
    payload = torch.load(run_dir / CHECKPOINT_DIR / f"round-{server_round:03d}.pt", map_location="cpu",
                         weights_only=True)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in payload["trainable"].items()})
    return arrays, payload


def epsilon_value(epsilon: dict[str, float] | None) -> MetricValue:
    """Privacy spent: the maximum over sites (each site's epsilon is cumulative over the run)."""
    if epsilon is None:
        return MetricValue(None, reason="not available: differential privacy is not enabled in this run")
    if not epsilon:
        return MetricValue(None, reason="not available: no site has trained with DP yet")
    return MetricValue(max(epsilon.values()), per_site=dict(epsilon),
                       note="maximum over sites of the cumulative epsilon (not an average)")


def round_record(report: RoundReport, seconds: float, checkpoint: Path | None,
                 efficiency: dict[str, MetricValue], central: dict[str, MetricValue] | None,
                 epsilon: dict[str, float] | None = None) -> dict[str, Any]:
    """One line of metrics.jsonl: the whole catalogue (global, per site), who took part, traffic."""
    record = asdict(report)
    record["round"] = record.pop("server_round")
    record["seconds"] = round(seconds, 3)
    record["checkpoint"] = checkpoint.name if checkpoint else None
    catalogue = dict(report.catalogue)
    catalogue.update({name: value.to_json(name) for name, value in efficiency.items()})
    train_seconds = {site: t["seconds"] for site, t in report.train.items()}
    catalogue["train_seconds"] = MetricValue(
        max(train_seconds.values()) if train_seconds else None,
        reason=None if train_seconds else "not available: no training in this round",
        note="slowest site (the round waits for it)", per_site=train_seconds).to_json("train_seconds")
    for name, key in (("bytes_sent", "sent"), ("bytes_received", "received")):
        per_site = {site: t[key] for site, t in report.traffic.items()}
        catalogue[name] = MetricValue(sum(per_site.values()), per_site=per_site,
                                      note="payload bytes, all sites, server's point of view").to_json(name)
    catalogue["epsilon"] = epsilon_value(epsilon).to_json("epsilon")
    record["catalogue"] = catalogue
    record["server_validation"] = ({name: value.to_json(name) for name, value in central.items()}
                                   if central is not None else None)
    return record


CSV_HEADER = "round,scope,metric,value,aggregation,reason\r\n"


def write_csv(run_dir: Path, rows: list[str]) -> None:
    """metrics.csv in long form: round, scope (global, a site, server-validation), metric, value;
    ``rows``: each round record's rows (``csv_rows``)."""
    atomic_write_bytes(run_dir / CSV_FILE, (CSV_HEADER + "".join(rows)).encode())


def csv_rows(record: dict[str, Any]) -> str:
    """One round record's rows of metrics.csv."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    sources = [("global", record.get("catalogue") or {})]
    if record.get("server_validation"):
        sources.append(("server-validation", record["server_validation"]))
    for scope, catalogue in sources:
        for name, entry in catalogue.items():
            writer.writerow([record["round"], scope, name, _csv_value(entry.get("value")),
                             entry.get("aggregation", ""), entry.get("reason", "")])
            if scope == "global":
                for site, value in (entry.get("per_site") or {}).items():
                    writer.writerow([record["round"], site, name, _csv_value(value), "site", ""])
    return buffer.getvalue()


def _csv_value(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else repr(value)


CLASSIFICATION_COLUMNS = [("AUC", "auc"), ("acc", "accuracy"), ("sens", "sensitivity"), ("spec", "specificity"),
                          ("prec", "precision"), ("F1", "f1"), ("kappa", "kappa")]
OTHER_COLUMNS = [("MAE", "mae"), ("RMSE", "rmse"), ("MAPE", "mape"), ("PSNR", "psnr"), ("SSIM", "ssim"),
                 ("FID", "fid"), ("IS", "is"), ("eps", "epsilon")]


def _value(record: dict[str, Any], name: str) -> Any:
    return ((record.get("catalogue") or {}).get(name) or {}).get("value")


def rounds_tables(records: list[dict[str, Any]]) -> list[Table]:
    """Two tables that each fit an 80-column terminal: classification, then errors/images/cost."""
    first = Table(title="global model, pooled over sites: classification")
    for column in ["round", "sites", "rej", "train loss", "test loss", *[h for h, _ in CLASSIFICATION_COLUMNS]]:
        first.add_column(column, justify="right")
    second = Table(title="errors, image quality, cost")
    for column in ["round", *[h for h, _ in OTHER_COLUMNS], "MB", "s"]:
        second.add_column(column, justify="right")
    for r in records:
        train = r.get("train") or {}
        weights = sum(t["num-examples"] for t in train.values())
        train_loss = sum(t["loss"] * t["num-examples"] for t in train.values()) / weights if weights else None
        first.add_row(str(r["round"]), str(len(train)), str(len(r.get("rejected") or [])), _fmt(train_loss),
                      _fmt(_value(r, "loss")), *[_fmt(_value(r, name)) for _, name in CLASSIFICATION_COLUMNS])
        traffic = (_value(r, "bytes_sent") or 0) + (_value(r, "bytes_received") or 0)
        second.add_row(str(r["round"]), *[_fmt(_value(r, name), 1 if name in ("psnr", "fid") else 3)
                                          for _, name in OTHER_COLUMNS],
                       _fmt(traffic / 1e6, 2), _fmt(r.get("seconds"), 1))
    return [first, second]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def print_rounds(records: list[dict[str, Any]], console: Console | None = None) -> None:
    # In a terminal rich fits its width; in a log file or pipe, do not squeeze the columns to 80.
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    for table in rounds_tables(records):
        console.print(table)
    last = records[-1] if records else {}
    if last.get("server_validation"):
        sv = last["server_validation"]
        console.print("server validation set, round {}: AUC {}  acc {}  F1 {}  PSNR {}  SSIM {}".format(
            last["round"], *(_fmt((sv.get(k) or {}).get("value")) for k in ("auc", "accuracy", "f1", "psnr", "ssim"))))
    for rejected in last.get("rejected") or []:
        console.print(f"round {last['round']}: {rejected['phase']} reply from {rejected['site']} rejected: "
                      f"{rejected['reason']}")
    for site, spent in sorted((last.get("exhausted") or {}).items()):
        console.print(f"round {last['round']}: {site} did not train: privacy budget exhausted (epsilon {_fmt(spent)})")
    for note in last.get("notes") or []:
        console.print(f"round {last['round']}: {note}")
    if last.get("stopped"):
        console.print(f"run ended after round {last['round']}: {last['stopped']}")
