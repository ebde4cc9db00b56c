"""Experiment tracking at the centre: every round's figures to MLflow or TensorBoard.

``tracking = "mlflow"`` logs to the tracking server or store named by ``tracking-uri``; without
one, to a SQLite store beside the run directories (``RUN_ROOT/mlflow.db``, artifacts in
``RUN_ROOT/mlflow-artifacts``; MLflow's plain-folder store is in maintenance mode). Browse it with
``mlflow ui --backend-store-uri sqlite:///RUN_ROOT/mlflow.db``. ``tracking = "tensorboard"``
writes event files into ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_ROOT``). Each library
is an optional extra (``pip install 'clinicfl[mlflow]'`` or ``'clinicfl[tensorboard]'``).

What is logged is what the run directory already holds and the centre may show: the catalogue
(global figures, the per-site figures of sites with enough test studies, the server's own
validation set), traffic, epsilon and round time per round; the run config as parameters; the
report PNGs as artifacts at the end. Per-site figures that ``min-site-cases`` suppresses are
never logged.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

from common.config import TRACKERS, ConfigError

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_round(self, record: dict[str, Any]) -> None: ...

    def log_artifacts(self, files: list[Path]) -> None: ...

    def finish(self, state: str) -> None: ...


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record as flat names: ``global/auc``,
    ``site/site-01/auc``, ``server-validation/auc``, ``round/seconds``, ``round/train-loss``."""
    scalars: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scalars[name] = float(value)

    for name, entry in (record.get("catalogue") or {}).items():
        put(f"global/{name}", (entry or {}).get("value"))
        for site, value in ((entry or {}).get("per_site") or {}).items():
            put(f"site/{site}/{name}", value)
    for name, entry in (record.get("server_validation") or {}).items():
        put(f"server-validation/{name}", (entry or {}).get("value"))
    put("round/seconds", record.get("seconds"))
    train = record.get("train") or {}
    weights = sum(t["num-examples"] for t in train.values())
    if weights:
        put("round/train-loss", sum(t["loss"] * t["num-examples"] for t in train.values()) / weights)
    put("round/sites-trained", len(train))
    put("round/replies-rejected", len(record.get("rejected") or []))
    return scalars


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], uri: str, experiment: str) -> None:
        from mlflow.entities import Metric, Param  # optional extra
        from mlflow.tracking import MlflowClient

        self.metric, self.param = Metric, Param
        root = run_dir.parent
        self.uri = uri or f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=None if uri else (root / "mlflow-artifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                             tags={"clinicfl.run-dir": str(run_dir)}).info.run_id
        params = {key: str(value)[:500] for key, value in config.items()}
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=[self.param(k, v) for k, v in items[start:start + 100]])

    def log_round(self, record: dict[str, Any]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self.metric(name, value, stamp, int(record["round"]))
                   for name, value in round_scalars(record).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_artifacts(self, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path="report")

    def finish(self, state: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if state in ("finished", "stopped") else "FAILED")


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard extra

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        table = "\n".join(f"| {key} | {value} |" for key, value in config.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def log_round(self, record: dict[str, Any]) -> None:
        for name, value in round_scalars(record).items():
            self.writer.add_scalar(name, value, int(record["round"]))
        self.writer.flush()

    def log_artifacts(self, files: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for path in files:
            with Image.open(path) as image:
                self.writer.add_image(f"report/{path.stem}", np.asarray(image.convert("RGB")), 0, dataformats="HWC")
        self.writer.flush()

    def finish(self, state: str) -> None:
        self.writer.close()


class NoTracker:
    def log_round(self, record: dict[str, Any]) -> None:
        pass

    def log_artifacts(self, files: list[Path]) -> None:
        pass

    def finish(self, state: str) -> None:
        pass


class GuardedTracker:
    """A tracker whose failures (a tracking server down, a full disk) never end a federation: the
    first error is logged and tracking stops for the rest of the run."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker: Tracker | None = tracker

    def _call(self, name: str, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, name)(*args)
        except Exception as exc:  # noqa: BLE001 - tracking is a side channel
            log.warning("experiment tracking failed in %s (%s: %s); tracking is off for the rest of the run",
                        name, type(exc).__name__, exc)
            self.tracker = None

    def log_round(self, record: dict[str, Any]) -> None:
        self._call("log_round", record)

    def log_artifacts(self, files: list[Path]) -> None:
        self._call("log_artifacts", files)

    def finish(self, state: str) -> None:
        self._call("finish", state)


def open_tracker(kind: str, run_dir: Path, config: dict[str, Any], uri: str = "",
                 experiment: str = "clinicfl") -> Tracker:
    """The configured tracker; a missing optional library is a ConfigError that says what to install."""
    if kind == "none":
        return NoTracker()
    try:
        if kind == "mlflow":
            return MlflowTracker(run_dir, config, uri, experiment)
        if kind == "tensorboard":
            return TensorBoardTracker(run_dir, config)
    except ImportError as exc:
        raise ConfigError(f"tracking = {kind!r} needs its library: pip install 'clinicfl[{kind}]' ({exc.name} "
                          "is missing)") from None
    raise ConfigError(f"tracking must be one of {TRACKERS}, got {kind!r}")
