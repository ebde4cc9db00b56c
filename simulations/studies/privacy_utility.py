"""privacy-utility: what differential privacy costs. The best-round global AUC against the
target epsilon (and no DP), each with the real DP-SGD sites (Opacus, the ledger, noise calibrated
for the whole run, the DP release of each site's standardisation) and the run defaults a user gets
with ``dp-enabled = true``: nothing is tuned for DP on test data. Target: at epsilon 8 the AUC
falls by at most 0.05 against no DP (the upper bound of the paired bootstrap interval).

The sites are one generated cohort, encoded once: the seeds draw other splits, initialisations,
shuffles and DP noise from it (``seeded``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.studies.harness import (QUICK, STUDY_LESION_CONTRAST, Scorer, StudyOutput,  # noqa: E402
                                         StudySize, cohort_folder, federated, fixed_backbone, fmt, fmt_interval, make_clinics, markdown_table, paired_auc_difference,
                                         run_config, seeded, spread)
from server.privacy_plan import federation_snr, plan_site  # noqa: E402
from simulations.synthetic import SyntheticSpec  # noqa: E402

NAME = "privacy-utility"
# Sites of about 500 training studies (1000 studies, 40% of the patients held out for test, 10%
# for validation): a pooled test set of about 2,000 studies, so an AUC's standard error is about
# 0.01. Thirty rounds of one local epoch, as a DP federation runs them (docs/privacy.md).
DEFAULT = StudySize(sites=5, studies=1000, rounds=30, local_epochs=1, seeds=3)
QUICK_SIZE = StudySize(**{**QUICK.__dict__, "studies": 24})
SPLIT = {"test-fraction": 0.4, "val-fraction": 0.1}
PUBLIC_STUDIES = 300  # the centre's validation clinic (the public statistics) and the held-out clinic
EPSILONS = [2.0, 8.0, None]
QUICK_EPSILONS = [8.0, None]
TARGET_DROP = 0.05


def run(quick: bool = False, seeds: int | None = None, progress=print) -> tuple[StudyOutput, dict[str, Any]]:
    size = QUICK_SIZE if quick else DEFAULT
    epsilons = QUICK_EPSILONS if quick else EPSILONS
    seeds = seeds or size.seeds
    out = StudyOutput(NAME)
    spec = SyntheticSpec(sites=size.sites, studies_per_site=size.studies, image_size=size.image_size,
                         slices_per_study=size.slices, lesion_contrast=STUDY_LESION_CONTRAST, seed=400)
    public = None if quick else PUBLIC_STUDIES
    cohort = cohort_folder(spec, public, out.folder.parents[1])
    clinics = make_clinics(cohort, spec, public)
    base = {**size.run_overrides(), **SPLIT, **fixed_backbone(cohort)}
    config = run_config(base)
    best: dict[str, list[float]] = {_label(e): [] for e in epsilons}
    final: dict[str, list[float]] = {_label(e): [] for e in epsilons}
    spent: dict[str, list[float]] = {_label(e): [] for e in epsilons}
    noise: dict[str, list[float]] = {_label(e): [] for e in epsilons}
    planned: dict[str, list[float]] = {_label(e): [] for e in epsilons if e is not None}
    scored: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {_label(e): [] for e in epsilons}  # (labels, probs)
    for seed in range(seeds):
        scorer = Scorer(clinics, run_config(seeded(base, seed)))
        for epsilon in epsilons:
            progress(f"{NAME}: seed {seed}: epsilon {_label(epsilon)}")
            settings = {} if epsilon is None else {"dp-enabled": True, "dp-target-epsilon": epsilon}
            overrides = seeded({**base, **settings}, seed)
            if epsilon is not None:  # the federation's signal-to-noise ratio, as the planner computes it
                planned[_label(epsilon)].append(planned_snr(
                    run_config({**overrides, "server-val-path": str(clinics.server_val)}), scorer))
            result = federated(clinics, overrides, scorer, out.runs)
            scored[_label(epsilon)].append((result.labels, result.best_probs))
            best[_label(epsilon)].append(result.best["auc"])
            final[_label(epsilon)].append(result.final["auc"])
            spent[_label(epsilon)].append(result.final.get("epsilon"))
            noise[_label(epsilon)].append(result.final.get("noise_multiplier"))
    results = summarise(best, final, spent, size, seeds, epsilons, config)
    # What clinicfl-server plan-privacy looks up: each DP arm's planned ratio and its measured drop
    # (no DP minus DP, paired by seed).
    results["planned_snr"] = {k: statistics.fmean(v) for k, v in planned.items() if v}
    # with a paired bootstrap interval over the test studies (the same studies score both arms).
    results["drop"] = {k: paired_auc_difference([y for y, _ in scored["no DP"]], [p for _, p in scored["no DP"]],
                                                [p for _, p in scored[k]]) for k in planned if "no DP" in scored}
    for label, row in zip(results["epsilons"], results["headline"]):
        drop = results["drop"].get(label)
        row.append("-" if drop is None else fmt_interval(drop))
    results["headline_columns"].append("AUC drop vs no DP [95% CI]")
    at8 = results["drop"].get("8")
    if at8 is not None:  # a success counts only where the interval's upper bound meets the target
        results["target_met"] = at8["ci95"][1] <= TARGET_DROP
    results["noise_multiplier"] = {k: spread([x for x in v if x is not None]) for k, v in noise.items() if k != "no DP"}
    results["trainable_params"] = sum(p.numel() for p in scorer.model.parameters() if p.requires_grad)
    results["training_units"] = [len(site.data.train_index) for site in scorer.sites]  # the last seed's split
    out.write(results, report(results))
    plot(results, out.folder / "privacy-utility.png")
    return out, results


def planned_snr(config, scorer: Scorer) -> float:
    """The run's signal-to-noise ratio over the federation, from each site's training units."""
    trainable = sum(p.numel() for p in scorer.model.parameters() if p.requires_grad)
    units = [len(site.data.train_index) for site in scorer.sites]  # dp-unit = study
    return federation_snr([plan_site(config, n, trainable) for n in units])


def _label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"{epsilon:g}"


def summarise(best, final, spent, size: StudySize, seeds: int, epsilons, config) -> dict[str, Any]:
    labels = [_label(e) for e in epsilons]
    reference = spread(best["no DP"])["mean"] if "no DP" in best else None
    at8 = spread(best["8"])["mean"] if "8" in best else None
    drop = None if reference is None or at8 is None else reference - at8
    dp = config.privacy
    return {"size": size.__dict__, "seeds": seeds, "epsilons": labels,
            "dp_settings": {"dp-max-grad-norm": dp.dp_max_grad_norm, "dp-batch-fraction": dp.dp_batch_fraction,
                            "dp-lr": dp.dp_lr,
                            "batch-size (no DP)": config.train.batch_size,
                            "local-epochs": config.train.local_epochs, "lr": config.train.lr,
                            "proj-dim": config.model.proj_dim, "gru-hidden": config.model.gru_hidden,
                            "dp-accountant": dp.dp_accountant, "dp-unit": dp.dp_unit},
            "best_auc": {k: spread(v) for k, v in best.items()}, "final_auc": {k: spread(v) for k, v in final.items()},
            "epsilon_spent": {k: spread([x for x in v if x is not None]) for k, v in spent.items()},
            "drop_at_8": drop, "target_drop": TARGET_DROP,
            "target_met": drop is not None and drop <= TARGET_DROP,
            "headline_columns": ["target epsilon", "best-round AUC", "final AUC", "epsilon spent (max over sites)"],
            "headline": [[k, fmt(spread(best[k])), fmt(spread(final[k])),
                          fmt(spread([x for x in spent[k] if x is not None]), 2) if k != "no DP" else "-"]
                         for k in labels]}


def report(results: dict[str, Any]) -> str:
    size, dp = results["size"], results["dp_settings"]
    drop = results["drop_at_8"]
    lines = [f"# {NAME}", "",
             f"{results['seeds']} seeds; {size['sites']} clinics x {size['studies']} studies; {size['rounds']} rounds x "
             f"{size['local_epochs']} local epochs; DP-SGD at every site; every arm with "
             + ", ".join(f"{k} {v}" for k, v in dp.items()) +
             ". Pooled test AUC, mean ± std over seeds; the best round is chosen on the centre's validation clinic.",
             "", markdown_table(results["headline_columns"], results["headline"]), ""]
    if drop is None:
        lines.append("The epsilon-8 target was not measured at this size.")
    else:
        verdict = "met" if results["target_met"] else "missed"
        paired = (results.get("drop") or {}).get("8")
        if paired is not None:
            low, high = paired["ci95"]
            lines.append(f"At epsilon 8 the best-round AUC is {paired['mean']:+.3f} [{low:+.3f}, {high:+.3f}] below no "
                         f"DP ({paired['method']}; target: the interval's upper bound at most "
                         f"{results['target_drop']}): **{verdict}**.")
        else:
            lines.append(f"At epsilon 8 the best-round AUC is {drop:+.3f} below no DP (target: a drop of at most "
                         f"{results['target_drop']}): **{verdict}**.")
        sigma = (results.get("noise_multiplier") or {}).get("8", {}).get("mean")
        params, units = results.get("trainable_params"), results.get("training_units") or []
        fraction = dp.get("dp-batch-fraction") or 0
        batch = fraction * statistics.fmean(units) if fraction and units else dp.get("batch-size (no DP)")
        if sigma and params and batch:
            # Per step, the noise added to the mean clipped gradient has norm sigma*C*sqrt(d)/B, while the
            # clipped mean gradient itself has norm at most C.
            lines += ["", f"Why: at epsilon 8 the calibrated noise multiplier is {sigma:.2f}, so each step adds noise of "
                          f"norm about sigma x C x sqrt(d) / B = {sigma * math.sqrt(params) / batch:.1f} x C to a mean "
                          f"clipped gradient of norm at most C (d = {params:,} trainable parameters, an expected "
                          f"batch of B = {batch:.0f} studies). More studies per site (a larger B at the same "
                          "sampling rate), more sites or fewer trainable parameters shrink that ratio."]
    planned = results.get("planned_snr") or {}
    if planned:
        lines += ["", "Under DP every site standardises with the centre's public statistics (its validation clinic) "
                      "and its own feature mean released under DP, charged to the same ledger (docs/privacy.md). "
                      "Planned signal-to-noise ratio of the federation over the run (what `clinicfl-server "
                      "plan-privacy` looks up here): " + ", ".join(f"epsilon {k}: {v:.2f}" for k, v in planned.items())
                  + "."]
    lines += ["", "![AUC against epsilon](privacy-utility.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path) -> None:
    labels = [e for e in results["epsilons"] if e != "no DP"]
    x = [float(e) for e in labels]
    fig, (ax, planned_ax) = plt.subplots(1, 2, figsize=(12, 4))
    plot_planned(results, planned_ax)
    for key, style in (("best_auc", "o-"), ("final_auc", "s--")):
        mean = np.array([results[key][e]["mean"] if results[key][e]["mean"] is not None else np.nan for e in labels])
        std = np.array([results[key][e]["std"] or 0 for e in labels])
        ax.errorbar(x, mean, yerr=std, fmt=style, capsize=3, label=key.replace("_", " "))
    if "no DP" in results["best_auc"] and results["best_auc"]["no DP"]["mean"] is not None:
        ax.axhline(results["best_auc"]["no DP"]["mean"], color="black", ls=":", label="no DP (best round)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target epsilon for the whole run")
    ax.set_ylabel("pooled test AUC")
    ax.set_title("Privacy vs utility (mean ± std over seeds)")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_planned(results: dict[str, Any], ax) -> None:
    """What the planner predicts against what was measured: each DP arm's planned signal-to-noise
    ratio of the federation and its AUC drop against no DP, with the paired 95% interval."""
    planned, drops = results.get("planned_snr") or {}, results.get("drop") or {}
    arms = [e for e in planned if e in drops and drops[e].get("mean") is not None]
    if not arms:
        ax.text(0.5, 0.5, "no DP arm measured", ha="center", va="center", transform=ax.transAxes)
        return
    x = np.array([planned[e] for e in arms])
    y = np.array([drops[e]["mean"] for e in arms])
    low = np.array([drops[e]["ci95"][0] for e in arms])
    high = np.array([drops[e]["ci95"][1] for e in arms])
    ax.errorbar(x, y, yerr=[y - low, high - y], fmt="o", capsize=3)
    for xi, yi, e in zip(x, y, arms):
        ax.annotate(f"epsilon {e}", (xi, yi), textcoords="offset points", xytext=(5, 5))
    ax.axhline(results.get("target_drop", TARGET_DROP), color="grey", ls="--", label="target drop")
    ax.set_xscale("log")
    ax.set_xlabel("planned signal/noise of the federation over the run")
    ax.set_ylabel("AUC drop against no DP [95% CI]")
    ax.set_title("Planned ratio against measured drop")
    ax.legend()
