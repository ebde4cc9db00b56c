"""hyperparameter-search: the Sparrow Search Algorithm of the SSA ResNet50-BiGRU paper against
random search, with the same budget of short federated simulations.

Searched: learning rate, GRU width, dropout, local epochs and FedProx's mu (aggregation fedprox).
Each evaluation is a short federated run (the real apps, in process); its value is the best AUC
on the centre's validation clinic over the run's rounds. The budget lets SSA's population run
several generations, and each search draws from its own random stream. The winner of each search
is then scored once on a held-out clinic that no search evaluation ever saw, and the verdict is
the paired difference of the two winners' held-out AUCs with its bootstrap 95% interval.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.rundir import RunDirectory  # noqa: E402
from simulations.inprocess import run_inprocess  # noqa: E402
from simulations.ssa import random_search, sparrow_search  # noqa: E402
from simulations.studies.harness import (QUICK, STUDY_LESION_CONTRAST, Scorer, StudyOutput,  # noqa: E402
                                         StudySize, auc_or_nan, best_checkpoint, cohort_folder, fixed_backbone, fmt, fmt_interval,
                                         make_clinics, markdown_table, paired_auc_difference, run_config, seeded,
                                         spread)
from simulations.synthetic import SyntheticSpec  # noqa: E402

NAME = "hyperparameter-search"
# Three 60-study clinics from one cached cohort, runs of 3 rounds (an evaluation must be short:
# 240 of them); the seeds draw other splits, initialisations, shuffles and search streams from it.
DEFAULT = StudySize(sites=3, studies=60, rounds=3, seeds=5)
BUDGET = {"default": 24, "quick": 4}
POPULATION = {"default": 6, "quick": 2}  # SSA's: a budget of 24 is the first population and 3 generations
PUBLIC_STUDIES = 400  # the centre's validation clinic and the held-out clinic (about 160 injured each)
STREAMS = {"ssa": 1, "random": 2}  # each search's own random stream within a seed
# name: (low, high, scale); "log" is searched in log10, "int" is rounded.
SPACE = {"lr": (1e-4, 3e-2, "log"), "gru-hidden": (8, 128, "log-int"), "dropout": (0.0, 0.5, "linear"),
         "local-epochs": (1, 4, "int"), "proximal-mu": (1e-4, 1.0, "log")}


def decode(point: np.ndarray) -> dict[str, Any]:
    """A point of the search box -> run-config values."""
    values = {}
    for (name, (low, high, scale)), x in zip(SPACE.items(), point):
        if scale.startswith("log"):
            value = 10 ** x
            values[name] = int(round(value)) if scale == "log-int" else float(value)
        elif scale == "int":
            values[name] = int(round(x))
        else:
            values[name] = float(x)
    return values


def box() -> tuple[np.ndarray, np.ndarray]:
    lower = [math.log10(low) if scale.startswith("log") else low for low, _, scale in SPACE.values()]
    upper = [math.log10(high) if scale.startswith("log") else high for _, high, scale in SPACE.values()]
    return np.array(lower, float), np.array(upper, float)


def run(quick: bool = False, seeds: int | None = None, progress=print) -> tuple[StudyOutput, dict[str, Any]]:
    size = QUICK if quick else DEFAULT
    seeds = seeds or size.seeds
    budget = BUDGET["quick" if quick else "default"]
    population = POPULATION["quick" if quick else "default"]
    out = StudyOutput(NAME)
    spec = SyntheticSpec(sites=size.sites, studies_per_site=size.studies, image_size=size.image_size,
                         slices_per_study=size.slices, lesion_contrast=STUDY_LESION_CONTRAST, seed=300)
    public = None if quick else PUBLIC_STUDIES
    cohort = cohort_folder(spec, public, out.folder.parents[1])
    clinics = make_clinics(cohort, spec, public)
    base = {**size.run_overrides(), **fixed_backbone(cohort), "aggregation": "fedprox",
            "best-metric": "server-val-auc", "server-val-path": str(clinics.server_val)}
    lower, upper = box()
    searches: dict[str, list[dict[str, Any]]] = {"ssa": [], "random": []}
    for seed in range(seeds):
        seed_base = seeded(base, seed)
        searchers = {"ssa": lambda *a, **k: sparrow_search(*a, **k, population=population), "random": random_search}
        for method, search in searchers.items():
            evaluations: list[dict[str, Any]] = []

            def objective(point: np.ndarray) -> float:
                values = decode(point)
                progress(f"{NAME}: seed {seed} {method} evaluation {len(evaluations) + 1}/{budget}: {values}")
                run = RunDirectory(run_inprocess(clinics.root / "sites", out.runs, size.sites, {**seed_base, **values}))
                records = run.read_metrics()
                aucs = [((r.get("server_validation") or {}).get("auc") or {}).get("value") for r in records[1:]]
                best = max((a for a in aucs if a is not None), default=float("nan"))
                evaluations.append({"values": values, "val_auc": best, "run_dir": str(run.path)})
                return -best if math.isfinite(best) else math.inf

            # Independent streams: the same seed for both would draw SSA's first population and
            # random search's first points alike.
            trace = search(objective, lower, upper, budget, seed=[seed, STREAMS[method]])
            winner = max(evaluations, key=lambda e: e["val_auc"] if math.isfinite(e["val_auc"]) else -1)
            scorer = Scorer(clinics, run_config({**seed_base, **winner["values"]}))
            labels, probs = scorer.holdout_scores(best_checkpoint(RunDirectory(Path(winner["run_dir"])))[1])
            searches[method].append({"seed": seed, "best_after": [-v for v in trace.best_after],
                                     "winner": winner["values"], "winner_val_auc": winner["val_auc"],
                                     "winner_holdout_auc": auc_or_nan(labels, probs), "holdout": (labels, probs),
                                     "evaluations": evaluations})
    results = summarise(searches, size, seeds, budget, population)
    out.write(results, report(results))
    plot(results, out.folder / "hyperparameter-search.png")
    return out, results


def summarise(searches: dict[str, list[dict[str, Any]]], size: StudySize, seeds: int, budget: int,
              population: int) -> dict[str, Any]:
    methods = {}
    for method, runs in searches.items():
        curve = [spread([r["best_after"][k] for r in runs]) for k in range(budget)]
        methods[method] = {"best_val_auc_after": curve, "final_best_val_auc": curve[-1],
                           "winner_holdout_auc": spread([r["winner_holdout_auc"] for r in runs]),
                           "winners": [r["winner"] for r in runs],
                           "runs": [{k: v for k, v in r.items() if k != "holdout"} for r in runs]}
    # SSA's winner against random search's, on the same held-out studies, seed by seed.
    verdict = paired_auc_difference([r["holdout"][0] for r in searches["ssa"]],
                                    [r["holdout"][1] for r in searches["ssa"]],
                                    [r["holdout"][1] for r in searches["random"]])
    verdict["ssa_ahead"] = bool(verdict["ci95"][0] > 0)
    verdict["random_ahead"] = bool(verdict["ci95"][1] < 0)
    half = max(1, budget // 2)
    return {"size": size.__dict__, "seeds": seeds, "budget": budget, "population": population,
            "generations": max(0, math.ceil((budget - population) / population)),
            "space": {k: list(v) for k, v in SPACE.items()}, "methods": methods,
            "holdout_studies": int(len(searches["ssa"][0]["holdout"][0])) if searches["ssa"] else 0,
            "ssa_minus_random_holdout_auc": verdict,
            "headline_columns": ["search", f"best validation AUC after {budget} runs", f"after {half} runs",
                                 "winner's held-out AUC", "held-out AUC minus random search's [95% CI]"],
            "headline": [[m, fmt(v["final_best_val_auc"]), fmt(v["best_val_auc_after"][half - 1]),
                          fmt(v["winner_holdout_auc"]),
                          fmt_interval(verdict) if m == "ssa" else "-"] for m, v in methods.items()]}


def report(results: dict[str, Any]) -> str:
    size = results["size"]
    verdict = results["ssa_minus_random_holdout_auc"]
    low, high = verdict["ci95"]
    finding = ("SSA's winners score higher on the held-out clinic than random search's" if verdict["ssa_ahead"] else
               "random search's winners score higher on the held-out clinic than SSA's" if verdict["random_ahead"] else
               "the held-out clinic cannot tell SSA's winners from random search's: the interval contains 0")
    lines = [f"# {NAME}", "",
             f"{results['seeds']} seeds; a budget of {results['budget']} federated runs per search "
             f"({size['sites']} clinics x {size['studies']} studies, {size['rounds']} rounds each, FedProx); SSA's "
             f"population of {results['population']} runs {results['generations']} generation(s) after its first. "
             "Searched: " + ", ".join(f"{k} in [{v[0]}, {v[1]}] ({v[2]})" for k, v in results["space"].items()) + ".",
             "The value of a run is the best AUC on the centre's validation clinic over its rounds; the "
             f"winner of each search is scored once on a held-out clinic of {results['holdout_studies']} studies that "
             "the search never saw. Mean ± std over seeds; the difference of the winners' held-out AUCs with its "
             "paired bootstrap 95% interval over the held-out studies.", "",
             markdown_table(results["headline_columns"], results["headline"]), "",
             f"Verdict: SSA minus random search on the held-out clinic {verdict['mean']:+.3f} "
             f"[{low:+.3f}, {high:+.3f}]: {finding}.", ""]
    for method, values in results["methods"].items():
        lines.append(f"- {method} winners: " + "; ".join(
            ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in w.items())
            for w in values["winners"]))
    lines += ["", "![best validation AUC per budget](hyperparameter-search.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, values in results["methods"].items():
        curve = values["best_val_auc_after"]
        mean = np.array([c["mean"] if c["mean"] is not None else np.nan for c in curve])
        std = np.array([c["std"] if c["std"] is not None else 0 for c in curve])
        x = np.arange(1, len(curve) + 1)
        ax.plot(x, mean, "o-", label=method)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("federated runs spent")
    ax.set_ylabel("best validation AUC so far")
    ax.set_title("Sparrow Search vs random search (mean ± std over seeds)")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
