"""heterogeneity: FedAvg, FedProx, FedMedian, trimmed mean, server momentum (FedAvgM), FedAdam and
a logit-adjusted local loss as the clinics' label skew grows (Dirichlet alpha from 100, nearly IID,
to 0.1, where most clinics see one class only).

Five clinics, so that the coordinate-wise median and the trimmed mean (one clinic cut at each
end) differ from the mean. Every method runs through the real strategy and sites. The server
optimisers' settings are the usual published ones (FedAvgM: rate 1, momentum 0.9; FedAdam: rate
0.01, beta_1 0.9), not tuned here; logit adjustment uses tau = 1.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.studies.harness import (QUICK, Scorer, StudyOutput, StudySize, federated, fmt,  # noqa: E402
                                         make_clinics, markdown_table, run_config, seeded, spread)
from simulations.synthetic import SyntheticSpec  # noqa: E402

NAME = "heterogeneity"
DEFAULT = StudySize(sites=5, studies=32, rounds=6)
QUICK_SIZE = QUICK  # 3 sites: the quick size checks the study end to end, the default measures
ALPHAS = [100.0, 1.0, 0.5, 0.1]
QUICK_ALPHAS = [100.0, 0.1]
METHODS = {"fedavg": {"aggregation": "fedavg"}, "fedprox": {"aggregation": "fedprox", "proximal-mu": 0.01},
           "fedmedian": {"aggregation": "fedmedian"},
           "trimmed-mean": {"aggregation": "trimmed-mean", "trim-fraction": 0.2},
           "fedavgm": {"server-optimizer": "momentum", "server-lr": 1.0, "server-momentum": 0.9},
           "fedadam": {"server-optimizer": "adam", "server-lr": 0.01, "server-momentum": 0.9},
           "logit-adjusted": {"logit-adjust": 1.0}}
QUICK_METHODS = ["fedavg", "fedavgm", "logit-adjusted"]  # the quick size checks the study, not every method


def run(quick: bool = False, seeds: int | None = None, progress=print) -> tuple[StudyOutput, dict[str, Any]]:
    size = QUICK_SIZE if quick else DEFAULT
    alphas = QUICK_ALPHAS if quick else ALPHAS
    methods = {m: METHODS[m] for m in (QUICK_METHODS if quick else METHODS)}
    seeds = seeds or size.seeds
    out = StudyOutput(NAME)
    base = size.run_overrides()
    raw: dict[str, dict[float, list[float]]] = {m: {a: [] for a in alphas} for m in methods}
    prevalence: dict[float, list[list[float]]] = {a: [] for a in alphas}
    for alpha in alphas:
        for seed in range(seeds):
            spec = SyntheticSpec(sites=size.sites, studies_per_site=size.studies, image_size=size.image_size,
                                 slices_per_study=size.slices, dirichlet_alpha=alpha, seed=200 + seed)
            clinics = make_clinics(out.data(f"alpha{alpha:g}-seed{seed}"), spec)
            scorer = Scorer(clinics, run_config(seeded(base, seed)))
            prevalence[alpha].append([float(s.data.labels.mean()) for s in scorer.sites])
            for method, settings in methods.items():
                progress(f"{NAME}: alpha {alpha:g} seed {seed}: {method}")
                overrides = seeded({**base, **settings}, seed)
                raw[method][alpha].append(federated(clinics, overrides, scorer, out.runs).best["auc"])
    results = {"size": size.__dict__, "seeds": seeds, "alphas": alphas, "methods": methods,
               "pooled_auc": {m: {f"{a:g}": spread(v) for a, v in by_alpha.items()} for m, by_alpha in raw.items()},
               "site_prevalence": {f"{a:g}": v for a, v in prevalence.items()},
               "headline_columns": ["aggregation", *[f"alpha {a:g}" for a in alphas]]}
    results["headline"] = [[m, *[fmt(results["pooled_auc"][m][f"{a:g}"]) for a in alphas]] for m in methods]
    out.write(results, report(results))
    plot(results, out.folder / "heterogeneity.png")
    return out, results


def report(results: dict[str, Any]) -> str:
    size = results["size"]
    alphas = results["alphas"]
    best_at = {}
    for a in alphas:
        means = {m: results["pooled_auc"][m][f"{a:g}"]["mean"] for m in results["methods"]}
        best_at[a] = max((m for m in means if means[m] is not None), key=lambda m: means[m], default="n/a")
    lines = [f"# {NAME}", "",
             f"{results['seeds']} seeds; {size['sites']} clinics x {size['studies']} studies; {size['rounds']} rounds x "
             f"{size['local_epochs']} local epochs. Pooled test AUC (mean ± std over seeds) of each aggregation's "
             "best round (highest AUC on the centre's validation clinic). FedProx mu 0.01; trimmed mean cuts "
             "20% (one clinic of five) at each end; FedAvgM server rate 1, momentum 0.9; FedAdam server rate "
             "0.01, beta_1 0.9, beta_2 0.99; logit-adjusted: FedAvg with tau = 1 x each site's prior log-odds "
             "added to the logits in its local loss.", "",
             markdown_table(results["headline_columns"], results["headline"]), "",
             "Best aggregation per alpha: " + ", ".join(f"alpha {a:g}: {m}" for a, m in best_at.items()) + ".", "",
             "Injured fraction per clinic (first seed): " + "; ".join(
                 f"alpha {a}: " + "/".join(f"{p:.2f}" for p in v[0]) for a, v in results["site_prevalence"].items()),
             "", "![aggregation vs label skew](heterogeneity.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path) -> None:
    alphas = results["alphas"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in results["methods"]:
        entries = [results["pooled_auc"][method][f"{a:g}"] for a in alphas]
        mean = np.array([e["mean"] if e["mean"] is not None else np.nan for e in entries])
        std = np.array([e["std"] or 0 for e in entries])
        ax.errorbar(alphas, mean, yerr=std, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("Dirichlet alpha (label skew grows to the right)")
    ax.set_ylabel("pooled test AUC")
    ax.set_title("Aggregation under label skew (mean ± std over seeds)")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
