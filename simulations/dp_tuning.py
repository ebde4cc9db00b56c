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

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
               run_root: Path) -> list[LrTrial]:
    """One DP run of the public clinic per learning rate; each scored on ``score_on`` every round."""
    settings = {**overrides, "dp-enabled": True, "min-sites": 1, "server-val-path": str(score_on.resolve()),
                "best-metric": "server-val-auc"}
    trials = []
    with tempfile.TemporaryDirectory(prefix="clinicfl-tune-dp-") as folder:
        # The in-process federation's sites are the sub-folders of one folder: the public clinic alone.
        data_root = Path(folder) / "public"
        data_root.mkdir()
        (data_root / public_clinic.name).symlink_to(public_clinic.resolve(), target_is_directory=True)
        for lr in lrs:
            started = time.perf_counter()
            run = RunDirectory(run_inprocess(data_root, run_root, 1, {**settings, "dp-lr": lr}))
            trials.append(_trial(run, lr, time.perf_counter() - started))
    return trials


def _trial(run: RunDirectory, lr: float, seconds: float) -> LrTrial:
    scores = [((r.get("server_validation") or {}).get("auc") or {}).get("value") for r in run.read_metrics()]
    rounds = [r["round"] for r in run.read_metrics()]
    scored = [(s, r) for s, r in zip(scores, rounds) if s is not None]
    best_auc, best_round = max(scored) if scored else (None, None)
    epsilon = (run.read_metrics()[-1].get("catalogue", {}).get("epsilon") or {}).get("value")
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
