"""What a DP run will give, before it runs: ``clinicfl-server plan-privacy``.

For each site's number of training units the planner computes, as the site will: the sampling
rate and steps, the noise multiplier of the DP release of its standardisation and of DP-SGD
(calibrated together to the target epsilon), and the signal-to-noise ratio per step and over the
run (``common/dp_plan.py``). The federation's ratio combines the sites' as FedAvg averages their
updates. Then it looks the run's ratio up in the published privacy-utility study, whose arms
record the ratio they planned and the AUC drop they measured, and prints the drops measured at the
nearest ratios: the band to expect. The ServerApp logs the same figures for the sites that took
part once their first DP round is in, with a warning where the study saw the model fail to learn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_STUDY = PROJECT_ROOT / "docs" / "results" / "privacy-utility" / "results.json"
FAILED_DROP = 0.10  # an arm that lost more AUC than this counts as "did not learn" for the warning


@dataclass(frozen=True)
class SitePlan:
    units: int
    delta: float
    sample_rate: float
    steps: int
    batch: float  # expected units a step: sample_rate x units
    release_noise: float | None  # the standardisation's DP release (None: feature-norm = none)
    noise_multiplier: float
    snr_step: float
    snr_run: float


@dataclass(frozen=True)
class _Budget:
    target_epsilon: float
    target_delta: float
    accountant: str


def plan_site(config: RunConfig, units: int, trainable: int) -> SitePlan:
    """The DP a site with ``units`` training units would run under ``config``, as it would calibrate it."""
    from common.dp_plan import PlannedRun

    privacy = config.privacy
    delta = privacy.dp_target_delta or min(1e-5, 1.0 / (10 * max(units, 1)))
    budget = _Budget(privacy.dp_target_epsilon, delta, privacy.dp_accountant.value)
    plan = PlannedRun.of(config, units)
    release, sigma = plan.calibrate(budget, config.model.feature_norm == "site", privacy.dp_feature_norm_noise,
                                    privacy.dp_noise_multiplier)
    step, run = plan.signal_to_noise(sigma, trainable)
    return SitePlan(units, delta, plan.sample_rate, plan.steps, plan.sample_rate * units, release, sigma, step, run)


def federation_snr(plans: list[SitePlan]) -> float:
    """The run's ratio for the FedAvg mean of the sites' updates, weighted by units: each site's
    noise, relative to its signal, is 1 / its ratio, and independent noises add in quadrature."""
    total = sum(p.units for p in plans)
    return 1.0 / math.sqrt(sum((p.units / total) ** 2 / p.snr_run ** 2 for p in plans))


@dataclass(frozen=True)
class MeasuredBand:
    """The drops the published study measured at the nearest planned ratios."""

    text: str
    failed: bool  # the run's ratio is at or below one where the study's model did not learn


def measured_band(snr: float, study: Path | None = None) -> MeasuredBand:
    study = study or PUBLISHED_STUDY
    points = _measured_points(study)
    if not points:
        return MeasuredBand(f"not available: {study.name} of the privacy-utility study records no planned ratio "
                            "(clinicfl-sim study privacy-utility --publish)", False)
    points.sort()
    below = [p for p in points if p[0] <= snr]
    above = [p for p in points if p[0] > snr]
    failed = any(drop > FAILED_DROP for ratio, drop, _ in points if ratio >= snr)
    if below and above:
        (r0, d0, e0), (r1, d1, e1) = below[-1], above[0]
        text = (f"between the study's arms at ratio {r0:.2f} (epsilon {e0}: drop {d0:+.3f}) and {r1:.2f} "
                f"(epsilon {e1}: drop {d1:+.3f})")
    elif above:
        r1, d1, e1 = above[0]
        text = f"below every ratio the study measured; the lowest, {r1:.2f} (epsilon {e1}), lost {d1:+.3f}"
    else:
        r0, d0, e0 = below[-1]
        text = f"above every ratio the study measured; the highest, {r0:.2f} (epsilon {e0}), lost {d0:+.3f}"
    return MeasuredBand(text, failed)


def _measured_points(study: Path) -> list[tuple[float, float, str]]:
    """(planned federation ratio, measured drop, epsilon) of each DP arm of the published study."""
    if not study.is_file():
        return []
    results: dict[str, Any] = json.loads(study.read_text())
    planned = results.get("planned_snr") or {}
    drops = results.get("drop") or {}
    return [(float(planned[e]), float(drops[e]["mean"]), e) for e in planned
            if e in drops and drops[e].get("mean") is not None and planned[e] is not None]


def plans_from_replies(privacy: dict[str, dict[str, float]], train: dict[str, dict[str, float]], num_rounds: int,
                       trainable: int) -> dict[str, SitePlan]:
    """Each site's plan as its first DP round's reply shows it: its units, sampling rate, noise
    multiplier and steps so far (one round's), over ``num_rounds`` rounds."""
    from common.dp_plan import PlannedRun  # Opacus: only once a DP round is in

    plans = {}
    for site, p in privacy.items():
        if site not in train or p.get("steps", 0) <= 0:
            continue
        units, rate, sigma = int(train[site]["num-examples"]), p["sample-rate"], p["noise-multiplier"]
        plan = PlannedRun(units, rate, int(p["steps"]), int(p["steps"]) * num_rounds, max(1, round(rate * units)))
        step, run = plan.signal_to_noise(sigma, trainable)
        plans[site] = SitePlan(units, p["delta"], rate, plan.steps, rate * units, None, sigma, step, run)
    return plans


def log_planned_ratio(plans: dict[str, SitePlan], log: Any) -> MeasuredBand | None:
    """Log the run's planned signal-to-noise ratio and what the study measured near it; a warning
    where the study's model did not learn at that ratio."""
    if not plans:
        return None
    snr = federation_snr(list(plans.values()))
    band = measured_band(snr)
    per_site = ", ".join(f"{site} {p.snr_run:.2f}" for site, p in sorted(plans.items()))
    message = (f"DP plan: signal/noise over the run {snr:.2f} for the federation ({per_site}); the privacy-utility "
               f"study near this ratio: {band.text}")
    if band.failed:
        log.warning("%s. At this ratio the study's model did not learn: more units per site, more sites, a larger "
                    "epsilon or fewer trainable parameters (clinicfl-server plan-privacy)", message)
    else:
        log.info(message)
    return band

