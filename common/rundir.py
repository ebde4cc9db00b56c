"""The run directory: the one place that knows how a federated run's folder is laid out.

    RUN_DIR/
      config.json                the run config, backbone hash, budget id, and the run it resumes
      checkpoints/round-003.pt   trainable parameters + config + backbone hash (+ pooled test and validation histograms)
      metrics.jsonl              one JSON record per round (global and per-site figures)
      metrics.csv                the same figures in long form: round, scope, metric, value
      state.json                 running / paused / finished / stopped / failed, the last finished round
      control.json               written by clinicfl-server pause/continue/stop, read between rounds
      summary.json               a simulation's headline figures (clinicfl-sim run and demo)
      export/model-round-003.pt  a round's self-contained model (clinicfl-server export)

The ServerApp writes it; the centre's commands, the simulations, the studies and the export read
it. Every file is written to a temporary name and renamed (metrics.jsonl is appended and fsynced),
so a crash never leaves half a file. A round is finished when both its checkpoint and its metrics
record exist: that is where ``resume`` continues.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.files import atomic_torch_save, atomic_write_bytes
from common.provenance import provenance
from common.metrics.catalogue import CI_KEY, interval_of

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
STATE_FILE = "state.json"
CONTROL_FILE = "control.json"
SUMMARY_FILE = "summary.json"
EXPORT_DIR = "export"

CONTROL_STATES = ("running", "paused", "stop")
ENDED_STATES = ("finished", "stopped", "failed")
CSV_HEADER = f"round,scope,metric,value,aggregation,reason,{CI_KEY}_low,{CI_KEY}_high\r\n"


class RunDirectory:
    """One run's folder. ``RunDirectory(path)`` reads and writes an existing one; ``create`` and
    ``create_under`` start a new one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._meta: dict[str, Any] | None = None  # config.json, read once
        self._csv_rows: list[str] | None = None  # metrics.csv's rows, one string per round record

    @classmethod
    def create(cls, path: Path, config: dict[str, Any], backbone_hash: str, budget_id: str,
               resumed_from: str | None = None, app_hash: str = "") -> "RunDirectory":
        """``app_hash``: the sha256 of the app bundle the run runs (Flower's fab hash; empty in an
        in-process federation). The code's commit and library versions are recorded with it."""
        run = cls(path)
        (run.path / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        run._meta = {"config": config, "backbone-hash": backbone_hash, "budget-id": budget_id,
                     "resumed-from": resumed_from, "app-bundle-sha256": app_hash, "provenance": provenance()}
        atomic_write_bytes(run.path / CONFIG_FILE, json.dumps(run._meta, indent=2).encode())
        return run

    @classmethod
    def create_under(cls, root: Path, run_id: int | str, config: dict[str, Any], backbone_hash: str,
                     budget_id: str = "", resumed_from: str | None = None, app_hash: str = "") -> "RunDirectory":
        """A new run directory in ``root`` named by its start time and Flower run id (the centre
        finds a run's directory by the ``-run<id>`` ending)."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
        return cls.create(root.expanduser().resolve() / name, config, backbone_hash, budget_id or str(run_id),
                          resumed_from, app_hash)

    @classmethod
    def open(cls, path: Path) -> "RunDirectory":
        """An existing run directory; ValueError when ``path`` is not one."""
        if not (Path(path) / CONFIG_FILE).is_file():
            raise ValueError(f"{path} is not a clinicfl run directory (no {CONFIG_FILE})")
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ config.json
    def meta(self) -> dict[str, Any]:
        """config.json whole: config, backbone-hash, budget-id, resumed-from ({} when absent)."""
        if self._meta is None:
            path = self.path / CONFIG_FILE
            self._meta = json.loads(path.read_text()) if path.is_file() else {}
        return self._meta

    def config(self) -> dict[str, Any]:
        """The run config the run was started with."""
        return self.meta().get("config", {})

    def budget_id(self) -> str:
        """The privacy budget id the sites charge; a run written before config.json held one
        used its Flower run id (the directory name's ``-run<id>`` ending)."""
        return str(self.meta().get("budget-id") or self.name.rsplit("-run", 1)[-1])

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / CHECKPOINT_DIR / f"round-{server_round:03d}.pt"

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord,
                        histograms: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                        validation_histograms: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                        server_optimizer: dict[str, Any] | None = None) -> Path:
        """Trainable parameters, config and backbone hash; the round's pooled score histograms
        (resolution -> positives, negatives per label) of the sites' test splits (``histograms``,
        whose figures the export reports) and of their validation splits (which the export's
        calibration and operating threshold are fitted on); the server optimiser's state, which a
        resumed run continues from (server/server_optimizer.py)."""
        path = self.checkpoint_path(server_round)
        payload = {
            "round": server_round,
            "trainable": {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()},
            "config": self.config(),
            "backbone-hash": self.meta().get("backbone-hash"),
            "pooled-histograms": _histogram_tensors(histograms),
            "pooled-validation-histograms": _histogram_tensors(validation_histograms),
            "server-optimizer": server_optimizer or {},
        }
        atomic_torch_save(payload, path)
        return path

    def load_checkpoint(self, server_round: int) -> dict[str, Any]:
        """A round's checkpoint as saved (``trainable`` tensors and their metadata), read as data
        only: a checkpoint cannot run code."""
        return torch.load(self.checkpoint_path(server_round), map_location="cpu", weights_only=True)

    def load_checkpoint_arrays(self, server_round: int) -> tuple[ArrayRecord, dict[str, Any]]:
        """A round's trainable parameters as an ArrayRecord, and the whole checkpoint."""
        payload = self.load_checkpoint(server_round)
        return ArrayRecord({k: Array(v.numpy()) for k, v in payload["trainable"].items()}), payload

    def finished_rounds(self) -> list[int]:
        """Rounds with both a metrics record and a readable checkpoint, in order."""
        rounds = []
        for record in self.read_metrics():
            try:
                self.load_checkpoint(int(record["round"]))
            except Exception:  # missing or torn
                continue
            rounds.append(int(record["round"]))
        return sorted(set(rounds))

    def last_finished_round(self) -> int | None:
        """The last round with both a metrics record and a readable checkpoint."""
        finished = self.finished_rounds()
        return finished[-1] if finished else None

    def adopt(self, previous: "RunDirectory", last_round: int) -> list[dict[str, Any]]:
        """Continue ``previous``: its records and checkpoints up to ``last_round`` become this
        run's history, so the metric log reads rounds 0..N once each across the restart."""
        records = [r for r in previous.read_metrics() if r["round"] <= last_round]
        for record in records:
            source = previous.checkpoint_path(record["round"])
            if source.is_file():
                shutil.copy2(source, self.checkpoint_path(record["round"]))
        atomic_write_bytes(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())
        self._csv_rows = [csv_rows(r) for r in records]
        self._write_csv()
        return records

    # ------------------------------------------------------------------ metrics.jsonl and metrics.csv
    def has_metrics(self) -> bool:
        return (self.path / METRICS_FILE).is_file()

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete record, oldest first. A crash in the middle of an append leaves a torn
        last line: it is skipped with a warning (and the next append cuts it off), so ``status``,
        ``resume`` and ``report`` keep working."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is torn or damaged; skipped", path, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int):
                records.append(record)
        return records

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One round's record, in metrics.jsonl (appended durably) and metrics.csv."""
        safe = json_safe(record)  # as metrics.jsonl holds it (and read_metrics returns it)
        self._append_line(json.dumps(safe))
        # The CSV is rewritten whole (atomically) but only the new round's rows are formatted:
        # rereading and reformatting every round made each round cost more than the last.
        if self._csv_rows is None:
            self._csv_rows = [csv_rows(r) for r in self.read_metrics()]
        else:
            self._csv_rows.append(csv_rows(safe))
        self._write_csv()

    def _append_line(self, line: str) -> None:
        """Append one JSON line durably, first cutting off a torn last line left by a crash."""
        with (self.path / METRICS_FILE).open("a+b") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if size:
                handle.seek(max(0, size - 1))
                if handle.read(1) != b"\n":
                    handle.seek(0)
                    data = handle.read()
                    handle.truncate(data.rfind(b"\n") + 1)
            handle.seek(0, os.SEEK_END)
            handle.write(line.encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _write_csv(self) -> None:
        atomic_write_bytes(self.path / CSV_FILE, (CSV_HEADER + "".join(self._csv_rows or [])).encode())

    # ------------------------------------------------------------------ state.json and control.json
    def state(self) -> dict[str, Any]:
        """state.json ({} before the run has written it)."""
        path = self.path / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def set_state(self, state: str, last_round: int | None, detail: str = "",
                  best: dict[str, Any] | None = None, paused_checks: int | None = None) -> None:
        """state.json: running / paused / finished / stopped / failed, the last finished round
        (None before round 0 has finished), why, and the best round so far ({"round", "metric", "value"}).
        ``paused_checks``: while paused, how often the ServerApp has found the control flag still
        at paused (a centre sees that it is alive and waiting)."""
        state_record = {"state": state, "last-round": last_round, "detail": detail, "best": best,
                        "updated": time.time()}
        if paused_checks is not None:
            state_record["paused-checks"] = paused_checks
        atomic_write_bytes(self.path / STATE_FILE, json.dumps(state_record).encode())

    def control(self) -> str:
        """What the coordinating centre asked for: running, paused or stop. A missing or damaged
        flag reads as running: it never stops a federation."""
        path = self.path / CONTROL_FILE
        if not path.is_file():
            return "running"
        try:
            state = json.loads(path.read_text()).get("state", "running")
        except (json.JSONDecodeError, OSError, AttributeError):
            return "running"
        return state if state in CONTROL_STATES else "running"

    def set_control(self, state: str) -> None:
        if state not in CONTROL_STATES:
            raise ValueError(f"control state must be one of {CONTROL_STATES}")
        atomic_write_bytes(self.path / CONTROL_FILE, json.dumps({"state": state, "at": time.time()}).encode())

    # ------------------------------------------------------------------ summary.json and export/
    def summary(self) -> dict[str, Any]:
        path = self.path / SUMMARY_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.path / SUMMARY_FILE
        atomic_write_bytes(path, json.dumps(summary, indent=2).encode())
        return path

    def export_path(self, server_round: int) -> Path:
        """Where ``clinicfl-server export`` writes a round's model unless told otherwise."""
        return self.path / EXPORT_DIR / f"model-round-{server_round:03d}.pt"


def csv_rows(record: dict[str, Any]) -> str:
    """One round record's rows of metrics.csv, in long form: round, scope (global, a site,
    validation, server-validation), metric, value, aggregation, reason, and the bounds of the value's
    confidence interval (empty where there is none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    sources = [("global", record.get("catalogue") or {})]
    if record.get("validation"):
        sources.append(("validation", record["validation"]))
    if record.get("server_validation"):
        sources.append(("server-validation", record["server_validation"]))
    for scope, catalogue in sources:
        for name, entry in catalogue.items():
            writer.writerow([record["round"], scope, name, _csv_value(entry.get("value")),
                             entry.get("aggregation", ""), entry.get("reason", ""), *_csv_bounds(interval_of(entry))])
            if scope == "global":
                for site, value in (entry.get("per_site") or {}).items():
                    writer.writerow([record["round"], site, name, _csv_value(value), "site", "",
                                     *_csv_bounds(interval_of(entry, site=site))])
    return buffer.getvalue()


def _histogram_tensors(histograms: dict[int, tuple[np.ndarray, np.ndarray]] | None) -> dict:
    return {int(bins): (torch.from_numpy(np.asarray(pos, np.int64)), torch.from_numpy(np.asarray(neg, np.int64)))
            for bins, (pos, neg) in (histograms or {}).items()}


def _csv_value(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else repr(value)


def _csv_bounds(bounds: tuple[float, float] | None) -> list[str]:
    return ["", ""] if bounds is None else [_csv_value(bound) for bound in bounds]


def json_safe(value: Any) -> Any:
    """NaN is not JSON: write null (a figure that could not be computed); numpy scalars as Python."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value
