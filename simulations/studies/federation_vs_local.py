"""federation-vs-local: is a federation worth it? The same clinics trained three ways, with the
same total local epochs: federated (FedAvg, best round), centralised on the pooled training data
(the upper bound), and each clinic alone (its model scored on every clinic's test split).

Run at IID and at non-IID clinics (label skew at Dirichlet alpha 0.5, a larger scanner intensity
shift, unequal sizes). Targets: federated within 0.02 pooled AUC of centralised at IID and within
0.05 at non-IID, and above the mean local-only model in both.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.studies.harness import (QUICK, Scorer, StudyOutput, StudySize, federated, fmt,  # noqa: E402
                                         make_clinics, markdown_table, run_config, seeded, spread, trained_blocks)
from simulations.synthetic import SyntheticSpec  # noqa: E402

NAME = "federation-vs-local"
DEFAULT = StudySize()
SETTINGS = {
    "iid": {"dirichlet_alpha": 0.0, "scanner_shift": 0.3, "size_spread": 0.0},
    "non-iid": {"dirichlet_alpha": 0.5, "scanner_shift": 0.8, "size_spread": 0.5},
}
TARGET_GAP = {"iid": 0.02, "non-iid": 0.05}
# A diagnostic arm under label skew: the same federation without per-site feature standardisation.
# A clinic whose studies are nearly all injured subtracts the lesion's own feature signature with
# its mean; this arm shows how much of the gap to the centralised model that accounts for.
DIAGNOSTIC = {"non-iid": {"feature-norm": "none"}}


def run(quick: bool = False, seeds: int | None = None, progress=print) -> tuple[StudyOutput, dict[str, Any]]:
    size = QUICK if quick else DEFAULT
    seeds = seeds or size.seeds
    out = StudyOutput(NAME)
    overrides = size.run_overrides()
    raw: dict[str, dict[str, list]] = {}
    for setting, knobs in SETTINGS.items():
        arms: dict[str, list] = {"federated": [], "centralised": [], "local": [], "local_per_site": [],
                                 "federated_per_site": [], "centralised_per_site": [], "prevalence": [],
                                 "federated_no_site_norm": []}
        for seed in range(seeds):
            spec = SyntheticSpec(sites=size.sites, studies_per_site=size.studies, image_size=size.image_size,
                                 slices_per_study=size.slices, seed=100 + seed, **knobs)
            clinics = make_clinics(out.data(f"{setting}-seed{seed}"), spec)
            run = seeded(overrides, seed)
            config = run_config(run)
            scorer = Scorer(clinics, config)
            progress(f"{NAME}: {setting} seed {seed}: federated")
            fed = federated(clinics, run, scorer, out.runs)
            progress(f"{NAME}: {setting} seed {seed}: centralised and local")
            central = trained_blocks(scorer, scorer.sites, config)
            local = [trained_blocks(scorer, [site], config) for site in scorer.sites]
            arms["federated"].append(fed.best["auc"])
            arms["centralised"].append(central.best["auc"])
            arms["local"].append(float(np.nanmean([r.best["auc"] for r in local])))
            arms["federated_per_site"].append(fed.best["per_site_auc"])
            arms["centralised_per_site"].append(central.best["per_site_auc"])
            arms["local_per_site"].append([r.best["auc"] for r in local])
            arms["prevalence"].append([float(s.data.labels.mean()) for s in scorer.sites])
            if setting in DIAGNOSTIC:
                progress(f"{NAME}: {setting} seed {seed}: federated, no site standardisation")
                diagnostic = {**run, **DIAGNOSTIC[setting]}
                raw_fed = federated(clinics, diagnostic, Scorer(clinics, run_config(diagnostic)), out.runs)
                arms["federated_no_site_norm"].append(raw_fed.best["auc"])
        raw[setting] = arms
    results = summarise(raw, size, seeds)
    out.write(results, report(results))
    plot(results, out.folder / "federation-vs-local.png")
    return out, results


def summarise(raw: dict[str, dict[str, list]], size: StudySize, seeds: int) -> dict[str, Any]:
    settings = {}
    for setting, arms in raw.items():
        fed, central, local = spread(arms["federated"]), spread(arms["centralised"]), spread(arms["local"])
        gap = spread([c - f for f, c in zip(arms["federated"], arms["centralised"])])
        margin = spread([f - l_ for f, l_ in zip(arms["federated"], arms["local"])])
        sites = sorted(arms["federated_per_site"][0])
        settings[setting] = {
            "pooled_auc": {"federated": fed, "centralised": central, "local_mean": local},
            "gap_to_centralised": gap, "margin_over_local": margin,
            "per_site_auc": {
                "federated": {s: spread([d[s] for d in arms["federated_per_site"]]) for s in sites},
                "centralised": {s: spread([d[s] for d in arms["centralised_per_site"]]) for s in sites},
                "local_model_of": {s: spread([row[i] for row in arms["local_per_site"]]) for i, s in enumerate(sites)},
            },
            "site_prevalence": arms["prevalence"],
            "per_seed": {"federated": arms["federated"], "centralised": arms["centralised"],
                         "federated_no_site_norm": arms["federated_no_site_norm"] or None},
            "federated_no_site_norm": spread(arms["federated_no_site_norm"]) if arms["federated_no_site_norm"] else None,
            "targets": {"within_centralised": TARGET_GAP[setting],
                        "within_centralised_met": gap["mean"] is not None and gap["mean"] <= TARGET_GAP[setting],
                        "above_local_met": margin["mean"] is not None and margin["mean"] > 0},
        }
    return {"size": size.__dict__, "seeds": seeds, "settings": settings,
            "headline": [[s, fmt(v["pooled_auc"]["federated"]), fmt(v["pooled_auc"]["centralised"]),
                          fmt(v["pooled_auc"]["local_mean"]), fmt(v["gap_to_centralised"]),
                          "met" if v["targets"]["within_centralised_met"] else "MISSED",
                          "met" if v["targets"]["above_local_met"] else "MISSED"]
                         for s, v in settings.items()],
            "headline_columns": ["setting", "federated AUC", "centralised AUC", "local-only AUC (mean)",
                                 "gap to centralised", "gap target", "above local"]}


def report(results: dict[str, Any]) -> str:
    size = results["size"]
    lines = [f"# {NAME}", "",
             f"{results['seeds']} seeds; {size['sites']} clinics x {size['studies']} studies of {size['slices']} "
             f"images at {size['image_size']}x{size['image_size']}; {size['rounds']} rounds x {size['local_epochs']} "
             "local epochs (the same total epochs for the centralised and local-only arms). Mean ± std over seeds "
             "of the pooled AUC on every clinic's test split, each arm at its round with the highest AUC on the "
             "centre's validation clinic. Severity and reconstruction heads off.", "",
             markdown_table(results["headline_columns"], results["headline"]), ""]
    for setting, values in results["settings"].items():
        t = values["targets"]
        lines.append(f"## {setting}")
        lines.append("")
        lines.append(f"- Federated vs centralised: gap {fmt(values['gap_to_centralised'])} AUC "
                     f"(target <= {t['within_centralised']}): **{'met' if t['within_centralised_met'] else 'missed'}**.")
        lines.append(f"- Federated vs the mean local-only model: margin {fmt(values['margin_over_local'])} "
                     f"(target > 0): **{'met' if t['above_local_met'] else 'missed'}**.")
        prevalences = ", ".join("/".join(f"{p:.2f}" for p in seed) for seed in values["site_prevalence"])
        lines.append(f"- Injured fraction per clinic, per seed: {prevalences}.")
        rows = []
        for site in values["per_site_auc"]["federated"]:
            rows.append([site, fmt(values["per_site_auc"]["federated"][site]),
                         fmt(values["per_site_auc"]["centralised"][site]),
                         fmt(values["per_site_auc"]["local_model_of"][site])])
        lines += ["", markdown_table(["clinic", "federated AUC on it", "centralised AUC on it",
                                      "its own local model, pooled AUC"], rows), ""]
        if not t["within_centralised_met"] or not t["above_local_met"]:
            lines += why_missed(values)
    lines.append("![federation vs local](federation-vs-local.png)")
    return "\n".join(lines) + "\n"


def why_missed(values: dict[str, Any]) -> list[str]:
    """The miss, seed by seed, with the clinics' injured fractions and the diagnostic arm; every
    sentence follows from the figures in results.json."""
    seeds, target = values["per_seed"], values["targets"]["within_centralised"]
    gap = values["gap_to_centralised"]
    raw_per_seed = seeds.get("federated_no_site_norm") or [None] * len(seeds["federated"])
    rows, skewed = [], []
    for i, (fed, central) in enumerate(zip(seeds["federated"], seeds["centralised"])):
        prevalence = values["site_prevalence"][i]
        if max(prevalence) >= 0.9 or min(prevalence) <= 0.05:
            skewed.append(i)
        rows.append([str(i), "/".join(f"{p:.2f}" for p in prevalence), f"{fed:.3f}", f"{central:.3f}",
                     f"{central - fed:+.3f}", "-" if raw_per_seed[i] is None else f"{raw_per_seed[i]:.3f}"])
    lines = ["Why the target is missed, seed by seed:", "",
             markdown_table(["seed", "injured fraction per clinic", "federated", "centralised", "gap",
                             "federated, no site standardisation"], rows), ""]
    if gap["std"] is not None and gap["mean"] - target <= min(gap["std"], target / 4):
        lines.append(f"The mean gap misses the target by {gap['mean'] - target:.3f}, less than its seed-to-seed "
                     f"spread ({gap['std']:.3f}): three seeds cannot tell it from the target.")
    if skewed:
        worst = max(range(len(rows)), key=lambda i: seeds["centralised"][i] - seeds["federated"][i])
        lines.append(f"Seeds {', '.join(map(str, skewed))} have a clinic whose studies are nearly all injured or "
                     f"nearly all healthy; the largest gap is in seed {worst}. Such a clinic trains its local epochs "
                     "on one class alone and drifts away from the others between averagings (client drift), while "
                     "each batch of the centralised arm mixes the clinics.")
    raw = values.get("federated_no_site_norm")
    if raw and raw.get("mean") is not None:
        fed_mean = values["pooled_auc"]["federated"]["mean"]
        verdict = ("closes part of the gap, so per-site standardisation under label skew is part of the cause"
                   if raw["mean"] > fed_mean else
                   "does not close the gap: per-site standardisation is not the cause, and without it the "
                   "per-site intensity shift costs more than it removes")
        lines.append(f"The diagnostic arm without per-site feature standardisation (`feature-norm = none`) "
                     f"reaches {fmt(raw)}: it {verdict}.")
    return lines + [""]


def plot(results: dict[str, Any], path) -> None:
    settings = list(results["settings"])
    arms = [("federated", "federated"), ("centralised", "centralised"), ("local_mean", "local only (mean)")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, (key, label) in enumerate(arms):
        means = [results["settings"][s]["pooled_auc"][key]["mean"] or np.nan for s in settings]
        stds = [results["settings"][s]["pooled_auc"][key]["std"] or 0 for s in settings]
        ax.bar(np.arange(len(settings)) + (i - 1) * width, means, width, yerr=stds, capsize=4, label=label)
    ax.set_xticks(np.arange(len(settings)), settings)
    ax.set_ylabel("pooled test AUC (mean ± std over seeds)")
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(loc="lower left")
    ax.set_title("Federated vs centralised vs local-only training")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
