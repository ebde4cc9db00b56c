"""The centre's view of a run directory (``common.rundir.RunDirectory``): which round a command
works on, a round's metrics record, and what ``clinicfl-server status`` and ``report`` print.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.rundir import ENDED_STATES, RunDirectory
from common.config import BestMetric
from common.runlog import SELECTION_METRICS, select_best
from common.metrics.catalogue import MetricValue, interval_of
from common.metrics.intervals import LEVEL
from server.strategy import RoundReport


def record_stop(run: RunDirectory, detail: str) -> None:
    """A run the centre stopped, in its state. A ServerApp stopped mid-round ends without
    writing it (its state would say 'running' for good); one that already ended is left as it is."""
    if run.state().get("state") in ENDED_STATES:
        return
    run.set_state("stopped", run.last_finished_round(), detail, best_round(run))


def best_round(run: RunDirectory) -> dict[str, Any] | None:
    """The best finished round by the run's own best-metric: {"round", "metric", "value"}. None
    when no finished round has the figure, or for a run whose best-metric chose by a test figure
    (no longer offered: such a choice would bias the test figures it reports)."""
    metric = run.config().get("best-metric", BestMetric.VAL_LOSS.value)
    if metric not in SELECTION_METRICS:
        return None
    finished = set(run.finished_rounds())
    found = select_best([r for r in run.read_metrics() if r["round"] in finished], metric)
    return None if found is None else {"round": found[0], "metric": metric, "value": found[1]}


def chosen_round(run: RunDirectory, requested: int | None = None) -> int:
    """The round a command works on: the one asked for (it must be finished), else the best
    finished round, else the last finished one."""
    finished = run.finished_rounds()
    if not finished:
        raise ValueError(f"{run.path} has no finished round (a checkpoint and its metrics record)")
    if requested is not None:
        if requested not in finished:
            raise ValueError(f"round {requested} of {run.name} is not finished; finished rounds: "
                             f"{', '.join(map(str, finished))}")
        return requested
    best = best_round(run)
    return best["round"] if best is not None else finished[-1]


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
    """One round's metrics record: the whole catalogue (global, per site), who took part, traffic."""
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


CLASSIFICATION_COLUMNS = [("AUC", "auc"), ("acc", "accuracy"), ("sens", "sensitivity"), ("spec", "specificity"),
                          ("prec", "precision"), ("F1", "f1"), ("kappa", "kappa")]
OTHER_COLUMNS = [("MAE", "mae"), ("RMSE", "rmse"), ("MAPE", "mape"), ("PSNR", "psnr"), ("SSIM", "ssim"),
                 ("FID", "fid"), ("IS", "is"), ("eps", "epsilon")]
INTERVAL_COLUMNS = ("auc", "sensitivity", "specificity")  # shown as "value [low, high]"
CI_LABEL = f"{round(LEVEL * 100)}% CI"


def _value(record: dict[str, Any], name: str) -> Any:
    return ((record.get("catalogue") or {}).get(name) or {}).get("value")


def with_interval(value: Any, bounds: tuple[float, float] | None, digits: int = 3) -> str:
    """"0.934 [0.88, 0.97]": the value, then its confidence interval to 2 decimals (an interval
    of a few hundred studies is rarely narrower than 0.01); the value alone where there is none."""
    text = _fmt(value, digits)
    return text if bounds is None or text == "n/a" else f"{text} [{bounds[0]:.2f}, {bounds[1]:.2f}]"


def _classification_cell(record: dict[str, Any], name: str) -> str:
    entry = (record.get("catalogue") or {}).get(name)
    if name in INTERVAL_COLUMNS:
        return with_interval((entry or {}).get("value"), interval_of(entry))
    return _fmt((entry or {}).get("value"))


def rounds_tables(records: list[dict[str, Any]]) -> list[Table]:
    """Two tables: classification (AUC, sensitivity and specificity with their confidence
    intervals; in a narrow terminal an interval wraps under its value), then errors/images/cost."""
    first = Table(title=f"global model, pooled over sites: classification (AUC, sens, spec: value [{CI_LABEL}])")
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
                      _fmt(_value(r, "loss")), *[_classification_cell(r, name) for _, name in CLASSIFICATION_COLUMNS])
        traffic = (_value(r, "bytes_sent") or 0) + (_value(r, "bytes_received") or 0)
        second.add_row(str(r["round"]), *[_fmt(_value(r, name), 1 if name in ("psnr", "fid") else 3)
                                          for _, name in OTHER_COLUMNS],
                       _fmt(traffic / 1e6, 2), _fmt(r.get("seconds"), 1))
    return [first, second]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def wide_console() -> Console:
    """The console of the centre's tables. In a terminal rich fits its width; in a log file or pipe
    the columns are not squeezed to 80 (run ids alone are 19 digits)."""
    return Console(width=None if sys.stdout.isatty() else 200)


def print_rounds(records: list[dict[str, Any]], console: Console) -> None:
    for table in rounds_tables(records):
        console.print(table)
    last = records[-1] if records else {}
    if last.get("server_validation"):
        sv = last["server_validation"]
        console.print("server validation set, round {}: AUC {}  acc {}  F1 {}  PSNR {}  SSIM {}".format(
            last["round"], with_interval((sv.get("auc") or {}).get("value"), interval_of(sv.get("auc"))),
            *(_fmt((sv.get(k) or {}).get("value")) for k in ("accuracy", "f1", "psnr", "ssim"))))
    for rejected in last.get("rejected") or []:
        console.print(f"round {last['round']}: {rejected['phase']} reply from {rejected['site']} rejected: "
                      f"{rejected['reason']}")
    for site, spent in sorted((last.get("exhausted") or {}).items()):
        console.print(f"round {last['round']}: {site} did not train: privacy budget exhausted (epsilon {_fmt(spent)})")
    for note in last.get("notes") or []:
        console.print(f"round {last['round']}: {note}")
    if last.get("stopped"):
        console.print(f"run ended after round {last['round']}: {last['stopped']}")


def print_status(run: RunDirectory, console: Console) -> None:
    """``clinicfl-server status RUN``: the run's state, its best round, the per-round tables and
    who took part in each round."""
    state = run.state()
    records = run.read_metrics()
    _line(console, f"{run.name}: {state.get('state', 'starting')}"
                   f"{', last finished round ' + str(state['last-round']) if state.get('last-round') is not None else ''}"
                   f"{' (' + state['detail'] + ')' if state.get('detail') else ''}")
    if not records:
        _line(console, "no finished round yet")
        return
    best = best_round(run)
    if best is not None:
        _line(console, f"best round {best['round']} by {best['metric']} ({best['value']:.4f}); last round "
                       f"{records[-1]['round']}; clinicfl-server export exports the best round unless --round is given")
    print_rounds(records, console)
    table = Table(title="sites per round")
    for column in ("round", "trained", "evaluated", "rejected (reason)", "eps max"):
        table.add_column(column)
    for record in records:
        rejected = "; ".join(f"{r['site']} {r['phase']}: {r['reason']}" for r in record.get("rejected") or [])
        eps = ((record.get("catalogue") or {}).get("epsilon") or {}).get("value")
        table.add_row(str(record["round"]), ", ".join(sorted(record.get("train") or {})) or "-",
                      ", ".join(sorted(record.get("evaluation") or {})) or "-", rejected or "-",
                      f"{eps:.2f}" if isinstance(eps, (int, float)) else "n/a")
    console.print(table)
    for record in records:
        for mismatch in record.get("mismatches") or []:
            _line(console, f"round {record['round']}: {mismatch['phase']} reply filed under {mismatch['site']}: "
                           f"{mismatch['reason']}")


def _line(console: Console, text: str) -> None:
    # As print() writes it: a site's reason may hold [brackets] (no markup), and a long line is
    # not wrapped.
    console.out(text, highlight=False)
