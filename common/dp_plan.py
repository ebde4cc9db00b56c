"""The arithmetic of a DP run, before any data is touched: the accountant's epsilon for a history
of mechanisms, a site's planned DP-SGD (sampling rate and steps) and the noise multiplier that
ends it at the target epsilon, and the signal-to-noise ratio that plan gives the model.

Shared by the site (``client/privacy.py`` charges its ledger with it) and the centre
(``clinicfl-server plan-privacy``, and the warning ``run`` prints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.config import RunConfig
from common.opacus_import import create_accountant, get_noise_multiplier

# RDP orders searched for the conversion to (epsilon, delta). Opacus' default stops at 63; with
# little noise the best order is then the largest one (Opacus warns "Optimal order is the largest
# alpha") and the bound is looser than it need be. Any set of orders gives a valid bound.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 513, 8))


def epsilon_options(accountant: str) -> dict:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


def composed_epsilon(accountant: str, history: list, delta: float) -> float:
    """The epsilon at ``delta`` of ``history`` ([noise multiplier, sample rate, steps] entries).
    Entries with the same noise multiplier and sample rate compose as one of their summed steps
    (RDP adds up per step; PRV composes the same mechanism that many times), so a long run's
    accounting costs no more than a short one's."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, n in history:
        steps[(float(sigma), float(rate))] = steps.get((float(sigma), float(rate)), 0) + int(n)
    if not steps:
        return 0.0
    counter = create_accountant(accountant)
    counter.history = [(sigma, rate, n) for (sigma, rate), n in steps.items()]
    return float(counter.get_epsilon(delta, **epsilon_options(accountant)))


MAX_SGD_NOISE_INCREASE = 1.05  # an automatic release noise may raise DP-SGD's by at most 5%
RELEASE_GRID = [2.0 ** (k / 4) for k in range(0, 25)]  # automatic release noises, 1 .. 64


def release_entry(sigma: float) -> list[float]:
    """The ledger entry of the standardisation's DP release: one Gaussian mechanism, no subsampling."""
    return [sigma, 1.0, 1]


def noise_for_budget(epsilon_of: Callable[[float], float], target_epsilon: float,
                     bracket: tuple[float, float] = (0.0, 1.0)) -> float:
    """The smallest noise multiplier sigma with ``epsilon_of(sigma) <= target_epsilon`` (to 0.1%),
    searched from ``bracket`` (lo too little noise, hi a first guess, doubled until enough)."""
    lo, hi = bracket
    while epsilon_of(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon}: what is already charged spends it")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if epsilon_of(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi



def dp_batch_size(config: RunConfig, n_units: int) -> int:
    """The batch a DP site asks Opacus for: ``dp-batch-fraction`` of its units, rounded up (at least
    one), or ``batch-size`` where the fraction is 0. Opacus samples at 1 / (batches an epoch), so
    rounding up keeps that rate at the fraction for 1/2, 1/3, ... (69 units at 0.5: batch 35, two
    batches, rate 0.5; rounded to 34 it would be three batches, rate 1/3)."""
    fraction = config.privacy.dp_batch_fraction
    return max(1, math.ceil(fraction * n_units)) if fraction > 0 else config.train.batch_size


def sampling(n_units: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) exactly as Opacus' Poisson DPDataLoader sets them."""
    batches = math.ceil(n_units / batch_size)
    return 1.0 / batches, batches


class Budget(Protocol):
    target_epsilon: float
    target_delta: float
    accountant: str


@dataclass(frozen=True)
class PlannedRun:
    """The DP-SGD a run plans at a site: its sampling rate, steps per round and in all."""

    units: int
    sample_rate: float
    round_steps: int
    steps: int
    batch_size: int  # what the site's Poisson loader is built with; the expected batch is sample_rate x units

    @classmethod
    def of(cls, config: RunConfig, n_units: int) -> "PlannedRun":
        batch = dp_batch_size(config, n_units)
        q, steps_per_epoch = sampling(n_units, batch)
        round_steps = config.train.local_epochs * steps_per_epoch
        return cls(n_units, q, round_steps, config.federation.num_rounds * round_steps, batch)

    def noise_multiplier(self, budget: Budget, fixed: list[list[float]],
                         bracket: tuple[float, float] = (0.0, 1.0)) -> float:
        """The noise multiplier that ends the planned run at the target epsilon, with ``fixed``
        (mechanisms this run charges besides DP-SGD) charged too."""
        if not fixed:
            return float(get_noise_multiplier(target_epsilon=budget.target_epsilon, target_delta=budget.target_delta,
                                              sample_rate=self.sample_rate, steps=self.steps,
                                              accountant=budget.accountant, **epsilon_options(budget.accountant)))
        history = [list(entry) for entry in fixed]
        return noise_for_budget(lambda s: composed_epsilon(budget.accountant, [*history, (s, self.sample_rate,
                                                                                          self.steps)],
                                                           budget.target_delta), budget.target_epsilon, bracket)

    def calibrate(self, budget: Budget, release: bool, release_noise: float = 0.0,
                  sgd_noise: float = 0.0) -> tuple[float | None, float]:
        """(the noise multiplier of the standardisation's DP release, None without one; DP-SGD's),
        given ones kept (``release_noise``, ``sgd_noise`` > 0). An automatic release noise is the
        smallest of 2^(k/4), 1..64, that raises DP-SGD's noise by at most ``MAX_SGD_NOISE_INCREASE``
        (the largest when none does); DP-SGD's is then calibrated with the release charged."""
        if not release:
            return None, sgd_noise or self.noise_multiplier(budget, [])
        if release_noise and sgd_noise:
            return release_noise, sgd_noise
        base = self.noise_multiplier(budget, [])
        release_noise = release_noise or self._release_noise(budget, MAX_SGD_NOISE_INCREASE * base)
        return release_noise, sgd_noise or self.noise_multiplier(budget, [release_entry(release_noise)],
                                                                 bracket=(base, MAX_SGD_NOISE_INCREASE * base))

    def _release_noise(self, budget: Budget, sgd_noise: float) -> float:
        """The smallest grid noise whose release, composed with the whole run at ``sgd_noise``, fits
        the budget. With RDP the run's curve is computed once and each release adds its closed form."""
        if budget.accountant == "rdp":
            run = compute_rdp(q=self.sample_rate, noise_multiplier=sgd_noise, steps=self.steps, orders=RDP_ORDERS)

            def fits(sigma: float) -> bool:
                rdp = run + np.asarray(RDP_ORDERS) / (2 * sigma ** 2)  # a Gaussian mechanism, q = 1
                return get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=budget.target_delta)[0] \
                    <= budget.target_epsilon
        else:
            def fits(sigma: float) -> bool:
                history = [release_entry(sigma), [sgd_noise, self.sample_rate, self.steps]]
                return composed_epsilon(budget.accountant, history, budget.target_delta) <= budget.target_epsilon
        lo, hi = 0, len(RELEASE_GRID) - 1
        if not fits(RELEASE_GRID[hi]):
            return RELEASE_GRID[hi]
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(RELEASE_GRID[mid]) else (mid + 1, hi)
        return RELEASE_GRID[lo]

    def signal_to_noise(self, noise_multiplier: float, trainable: int) -> tuple[float, float]:
        """(per step, over the run) the ratio of the mean clipped gradient's largest norm C to the
        norm of the noise added to it: sigma C sqrt(d) / B for an expected batch of B = q N units
        and d trainable parameters. Signal adds up over T steps and noise as sqrt(T), so the run's
        ratio is sqrt(T) times the step's (docs/privacy.md, planning)."""
        batch = self.sample_rate * self.units
        step = batch / (noise_multiplier * math.sqrt(trainable))
        return step, step * math.sqrt(self.steps)
