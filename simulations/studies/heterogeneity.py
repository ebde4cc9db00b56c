"""heterogeneity: does a federation of unlike clinics reach pooled training? FedAvg, FedProx,
server momentum (FedAvgM), FedAdam, a logit-adjusted local loss and SCAFFOLD against centralised training on
the same studies, as the clinics' label skew grows (Dirichlet alpha from 100, nearly IID, to 0.1,
where most clinics see one class only).

Every method runs through the real strategy and sites; the centralised arm trains the same model
on the pooled training splits for as many epochs. The server optimisers' settings are the usual
published ones (FedAvgM: rate 1, momentum 0.9; FedAdam: rate 0.01, beta_1 0.9), not tuned here;
logit adjustment uses tau = 1. Targets: the gap to centralised (the upper bound of its paired
bootstrap 95% interval) at most 0.01 at alpha 100, 0.02 at 0.5 and 0.05 at 0.1, and FedAvg at or
above each site's local-only model.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.studies.harness import (QUICK, STUDY_LESION_CONTRAST, ArmResult, Scorer,  # noqa: E402
                                         StudyOutput, StudySize, cohort_folder, federated, fine_tuned,
                                         fixed_backbone, fmt, fmt_interval, make_clinics, markdown_table,
                                         paired_auc_difference, run_config, seeded, spread, trained_blocks)
from simulations.synthetic import SyntheticSpec  # noqa: E402

NAME = "heterogeneity"
# Sites of 200 studies (about 100 training and 80 test studies each), 20 rounds of one local
# epoch; one cohort per alpha, generated and encoded once, the seeds drawing other splits,
# initialisations and shuffles from it.
DEFAULT = StudySize(sites=5, studies=200, rounds=20, local_epochs=1, seeds=3)
SPLIT = {"test-fraction": 0.4, "val-fraction": 0.1}
PUBLIC_STUDIES = 200  # the centre's validation clinic and the held-out clinic
QUICK_SIZE = QUICK  # 3 sites: the quick size checks the study end to end, the default measures
ALPHAS = [100.0, 0.5, 0.1]
QUICK_ALPHAS = [100.0, 0.1]
# The remedies for client drift under label skew. The robust aggregators (fedmedian, trimmed-mean)
# answer another question, a site that sends something wrong, and stay out of this study.
METHODS = {"fedavg": {"aggregation": "fedavg"}, "fedprox": {"aggregation": "fedprox", "proximal-mu": 0.01},
           "fedavgm": {"server-optimizer": "momentum", "server-lr": 1.0, "server-momentum": 0.9},
           "fedadam": {"server-optimizer": "adam", "server-lr": 0.01, "server-momentum": 0.9},
           "logit-adjusted": {"logit-adjust": 1.0}, "scaffold": {"aggregation": "scaffold"}}
QUICK_METHODS = ["fedavg", "fedavgm", "logit-adjusted"]  # the quick size checks the study, not every method
CENTRALISED = "centralised"
# Gap to centralised, by alpha: the upper bound of the paired 95% interval must be at most this.
TARGET_GAP = {100.0: 0.01, 0.5: 0.02, 0.1: 0.05}


def run(quick: bool = False, seeds: int | None = None, progress=print) -> tuple[StudyOutput, dict[str, Any]]:
    size = QUICK_SIZE if quick else DEFAULT
    alphas = QUICK_ALPHAS if quick else ALPHAS
    methods = {m: METHODS[m] for m in (QUICK_METHODS if quick else METHODS)}
    seeds = seeds or size.seeds
    out = StudyOutput(NAME)
    arms = [CENTRALISED, *methods]
    raw: dict[str, dict[float, list[float]]] = {m: {a: [] for a in alphas} for m in arms}
    scored: dict[str, dict[float, list[tuple[np.ndarray, np.ndarray]]]] = {m: {a: [] for a in alphas} for m in arms}
    best_rounds: dict[str, dict[float, list[int]]] = {m: {a: [] for a in alphas} for m in arms}
    prevalence: dict[float, list[list[float]]] = {a: [] for a in alphas}
    n_test: dict[float, list[int]] = {a: [] for a in alphas}
    per_site: dict[float, list[dict[str, dict[str, float]]]] = {a: [] for a in alphas}
    public = None if quick else PUBLIC_STUDIES
    for alpha in alphas:
        spec = SyntheticSpec(sites=size.sites, studies_per_site=size.studies, image_size=size.image_size,
                             slices_per_study=size.slices, dirichlet_alpha=alpha,
                             lesion_contrast=STUDY_LESION_CONTRAST, seed=200)
        cohort = cohort_folder(spec, public, out.folder.parents[1])
        clinics = make_clinics(cohort, spec, public)
        base = {**size.run_overrides(), **SPLIT, **fixed_backbone(cohort)}
        for seed in range(seeds):
            config = run_config(seeded(base, seed))
            scorer = Scorer(clinics, config)
            prevalence[alpha].append([float(s.data.labels.mean()) for s in scorer.sites])
            n_test[alpha].append(int(sum(len(s.data.test_index) for s in scorer.sites)))
            progress(f"{NAME}: alpha {alpha:g} seed {seed}: {CENTRALISED}")
            _record(trained_blocks(scorer, scorer.sites, config), CENTRALISED, alpha, raw, scored, best_rounds)
            for method, settings in methods.items():
                progress(f"{NAME}: alpha {alpha:g} seed {seed}: {method}")
                overrides = seeded({**base, **settings}, seed)
                result = federated(clinics, overrides, scorer, out.runs)
                _record(result, method, alpha, raw, scored, best_rounds)
                if method == "fedavg":
                    per_site[alpha].append(site_models(scorer, result, run_config(overrides)))
    results = summarise(raw, scored, best_rounds, alphas, methods, size, seeds)
    results.update({"site_prevalence": {f"{a:g}": v for a, v in prevalence.items()},
                    "pooled_test_studies": {f"{a:g}": v for a, v in n_test.items()},
                    "per_site": {f"{a:g}": summarise_sites(v) for a, v in per_site.items()}})
    out.write(results, report(results))
    plot(results, out.folder / "heterogeneity.png")
    return out, results


def _record(result: ArmResult, arm: str, alpha: float, raw, scored, best_rounds) -> None:
    raw[arm][alpha].append(result.best["auc"])
    scored[arm][alpha].append((result.labels, result.best_probs))
    best_rounds[arm][alpha].append(result.best_round)


def summarise(raw, scored, best_rounds, alphas: list[float], methods: dict[str, Any], size: StudySize,
              seeds: int) -> dict[str, Any]:
    """Pooled AUC per arm and alpha, and each method's gap to centralised with its paired bootstrap
    interval over the test studies (the same studies score both arms, seed by seed)."""
    gaps: dict[str, dict[str, Any]] = {}
    for method in methods:
        gaps[method] = {}
        for a in alphas:
            central = scored[CENTRALISED][a]
            gap = paired_auc_difference([y for y, _ in central], [p for _, p in central],
                                        [p for _, p in scored[method][a]])
            gap["target"] = TARGET_GAP.get(a)
            gap["met"] = (gap["target"] is not None and np.isfinite(gap["ci95"][1])
                          and gap["ci95"][1] <= gap["target"])
            gaps[method][f"{a:g}"] = gap
    results = {"size": size.__dict__, "seeds": seeds, "alphas": alphas, "methods": methods,
               "pooled_auc": {m: {f"{a:g}": spread(v) for a, v in by_alpha.items()} for m, by_alpha in raw.items()},
               "gap_to_centralised": gaps,
               "best_round": {m: {f"{a:g}": v for a, v in by_alpha.items()} for m, by_alpha in best_rounds.items()},
               "headline_columns": ["aggregation", *[f"alpha {a:g}: AUC; gap to centralised [95% CI]" for a in alphas]]}
    results["headline"] = [[CENTRALISED, *[fmt(results["pooled_auc"][CENTRALISED][f"{a:g}"]) for a in alphas]]]
    for m in methods:
        results["headline"].append([m, *[f"{fmt(results['pooled_auc'][m][f'{a:g}'])}; {_gap_cell(gaps[m][f'{a:g}'])}"
                                         for a in alphas]])
    return results


def _gap_cell(gap: dict[str, Any]) -> str:
    verdict = "" if gap["target"] is None else (" met" if gap["met"] else " MISSED")
    return fmt_interval(gap) + verdict


def site_models(scorer: Scorer, federated_result: ArmResult, config) -> dict[str, dict[str, float]]:
    """Each site's test AUC of the federation's model, of its local-only model (trained on its own
    studies alone for as many epochs, the block chosen on the centre's validation clinic) and of the
    federation's model fine-tuned at the site for one block of local epochs."""
    global_auc = federated_result.best["per_site_auc"]
    out = {}
    for site in scorer.sites:
        local = trained_blocks(scorer, [site], config).best["per_site_auc"][site.name]
        tuned = scorer.score(fine_tuned(scorer, site, federated_result.best_state, config))["per_site_auc"][site.name]
        out[site.name] = {"global": global_auc[site.name], "local": local, "fine_tuned": tuned}
    return out


def summarise_sites(seeds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per site and model: the mean and spread over seeds (an AUC is undefined, and left out, where a
    site's test split has one class)."""
    if not seeds:
        return {}
    return {site: {model: spread([s[site][model] for s in seeds]) for model in ("global", "local", "fine_tuned")}
            for site in seeds[0]}


def report(results: dict[str, Any]) -> str:
    size = results["size"]
    alphas = results["alphas"]
    best_at = {}
    for a in alphas:
        means = {m: results["pooled_auc"][m][f"{a:g}"]["mean"] for m in results["methods"]}
        best_at[a] = max((m for m in means if means[m] is not None), key=lambda m: means[m], default="n/a")
    lines = [f"# {NAME}", "",
             f"{results['seeds']} seeds; {size['sites']} clinics x {size['studies']} studies; {size['rounds']} rounds x "
             f"{size['local_epochs']} local epochs (the centralised arm: as many epochs on the pooled training "
             "splits). Pooled test AUC (mean ± std over seeds) of each arm's best round (highest AUC on the "
             "centre's validation clinic), and the gap to centralised (centralised minus the method, mean over "
             "seeds) with its paired bootstrap 95% interval over the test studies; a target is met where the "
             "interval's upper bound is at most it (alpha 100: 0.01, 0.5: 0.02, 0.1: 0.05). FedProx mu 0.01; "
             "FedAvgM server rate 1, momentum 0.9; FedAdam server rate 0.01, beta_1 0.9, beta_2 0.99; "
             "logit-adjusted: FedAvg with tau = 1 x each site's prior log-odds added to the logits in its "
             "local loss; scaffold: FedAvg with SCAFFOLD's control variates (common/scaffold.py).", "",
             markdown_table(results["headline_columns"], results["headline"]), "",
             "Best federated method per alpha: " + ", ".join(f"alpha {a:g}: {m}" for a, m in best_at.items()) + ".",
             "", "Best round per seed (of " + str(size["rounds"]) + "): " + "; ".join(
                 f"{m} " + ", ".join(f"alpha {a}: " + "/".join(map(str, v)) for a, v in by_alpha.items())
                 for m, by_alpha in results["best_round"].items()) + ".", "",
             "Injured fraction per clinic (one cohort per alpha): " + "; ".join(
                 f"alpha {a}: " + "/".join(f"{p:.2f}" for p in v[0]) for a, v in results["site_prevalence"].items())
             + ". Pooled test studies per seed: " + "; ".join(
                 f"alpha {a}: " + "/".join(str(n) for n in v) for a, v in results["pooled_test_studies"].items()) + ".",
             "", "Per site, FedAvg's best round against the site's local-only model and FedAvg fine-tuned at the "
             "site for one block (test AUC, mean ± std over seeds; n/a where a site's test split has one class):", ""]
    for a, sites in results["per_site"].items():
        rows = [[f"alpha {a}", site, fmt(v["global"]), fmt(v["local"]), fmt(v["fine_tuned"])] for site, v in sites.items()]
        lines += [markdown_table(["alpha", "site", "FedAvg", "local only", "FedAvg fine-tuned"], rows), ""]
        defined = [site for site, v in sites.items() if v["global"]["mean"] is not None
                   and v["local"]["mean"] is not None]
        below = [site for site in defined if sites[site]["global"]["mean"] < sites[site]["local"]["mean"]]
        lines += [f"alpha {a}: FedAvg is at or above the site's local-only model at "
                  f"{len(defined) - len(below)} of the {len(defined)} sites whose test split has both classes"
                  + (f" (below at {', '.join(below)})." if below else "."), ""]
    lines += ["![aggregation vs label skew](heterogeneity.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path) -> None:
    alphas = results["alphas"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm in [CENTRALISED, *results["methods"]]:
        entries = [results["pooled_auc"][arm][f"{a:g}"] for a in alphas]
        mean = np.array([e["mean"] if e["mean"] is not None else np.nan for e in entries])
        std = np.array([e["std"] or 0 for e in entries])
        style = {"color": "black", "ls": "--"} if arm == CENTRALISED else {}
        ax.errorbar(alphas, mean, yerr=std, marker="o", capsize=3, label=arm, **style)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("Dirichlet alpha (label skew grows to the right)")
    ax.set_ylabel("pooled test AUC")
    ax.set_title("Federated methods vs centralised under label skew (mean ± std over seeds)")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
