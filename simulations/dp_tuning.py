"""Choose DP-SGD's learning rate on public data only: ``clinicfl-sim tune-dp``.

Tuning on the sites' own data would spend their privacy budget once per setting tried (and
choosing on their test splits biases every figure after it). Here the centre's public clinic
trains alone, as a one-site DP federation with the run's settings (the real ServerApp and
ClientApp in process, Opacus, the ledger, ``dp-target-epsilon``), at each learning rate; each
trial's best round is chosen and scored on a second public clinic (``--score-on``), never on a
site. The rate with the highest score is the one to run with (``dp-lr``); the default in
``common/config.py`` came from this command (``docs/privacy.md``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.rundir import RunDirectory
from simulations.inprocess import run_inprocess


@dataclass(frozen=True)
class LrTrial:
    lr: float
    best_auc: float | None  # the best round's AUC on the scoring clinic
    best_round: int | None
    final_auc: float | None
    epsilon: float | None  # what the public clinic's ledger spent
    seconds: float


def tune_dp_lr(public_clinic: Path, score_on: Path, lrs: list[float], overrides: dict[str, Any],
               run_root: Path, progress: bool = False) -> list[LrTrial]:
    """One DP run of the public clinic per learning rate; each scored on ``score_on`` every round."""
    settings = {**overrides, "dp-enabled": True, "min-sites": 1, "server-val-path": str(score_on.resolve()),
                "best-metric": "server-val-auc"}
    # The in-process federation's sites are the sub-folders of one folder: the public clinic alone,
    # linked from a folder beside run_root that stays, so its caches (next to the link) serve every
    # trial and every later tuning of the same clinic.
    key = hashlib.sha256(str(public_clinic.resolve()).encode()).hexdigest()[:12]
    data_root = run_root.parent / f".{run_root.name}-public" / key
    link = data_root / public_clinic.name
    if not link.exists():
        data_root.mkdir(parents=True, exist_ok=True)
        link.symlink_to(public_clinic.resolve(), target_is_directory=True)
    trials = []
    for lr in tqdm(lrs, desc="DP runs on the public clinic", unit="rate", disable=None if progress else True):
        started = time.perf_counter()
        run = RunDirectory(run_inprocess(data_root, run_root, 1, {**settings, "dp-lr": lr}))
        trials.append(_trial(run, lr, time.perf_counter() - started))
    return trials


def _trial(run: RunDirectory, lr: float, seconds: float) -> LrTrial:
    records = run.read_metrics()
    scored = [(auc, r["round"]) for r in records
              if (auc := ((r.get("server_validation") or {}).get("auc") or {}).get("value")) is not None]
    best_auc, best_round = max(scored) if scored else (None, None)
    epsilon = (records[-1].get("catalogue", {}).get("epsilon") or {}).get("value")
    return LrTrial(lr, best_auc, best_round, scored[-1][0] if scored else None, epsilon, round(seconds, 1))


def chosen(trials: list[LrTrial]) -> LrTrial | None:
    """The trial with the highest score on the scoring clinic."""
    scored = [t for t in trials if t.best_auc is not None]
    return max(scored, key=lambda t: t.best_auc) if scored else None


def write(trials: list[LrTrial], path: Path, context: dict[str, Any]) -> None:
    best = chosen(trials)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**context, "trials": [asdict(t) for t in trials],
                                "chosen_dp_lr": best.lr if best else None}, indent=2))
