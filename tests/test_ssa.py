"""The Sparrow Search Algorithm on known functions: it converges, and it beats random search
with the same number of evaluations, also where the optimum is not at the centre of the box."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.ssa import random_search, rastrigin, sparrow_search, sphere

BUDGET, DIM, SEEDS = 400, 5, range(5)


def _shifted_sphere(x: np.ndarray) -> float:
    return sphere(np.asarray(x) - 1.7)


@pytest.mark.parametrize("name, objective, low, high", [
    ("sphere", sphere, -5.12, 5.12),
    ("rastrigin", rastrigin, -5.12, 5.12),
    ("sphere, optimum off-centre", _shifted_sphere, -5.0, 5.0),
    ("rastrigin, box off-centre", rastrigin, -3.0, 7.0),
])
def test_ssa_converges_and_beats_random_search(name, objective, low, high):
    lower, upper = np.full(DIM, low), np.full(DIM, high)
    ssa = [sparrow_search(objective, lower, upper, BUDGET, seed) for seed in SEEDS]
    rnd = [random_search(objective, lower, upper, BUDGET, seed) for seed in SEEDS]
    assert all(len(t.best_after) == BUDGET for t in ssa + rnd), "exactly the budget of evaluations"
    assert all(np.all(np.diff(t.best_after) <= 0) for t in ssa), "best-so-far never gets worse"
    ssa_best, rnd_best = np.median([t.best_f for t in ssa]), np.median([t.best_f for t in rnd])
    assert ssa_best < 0.1, f"{name}: SSA converges (median best {ssa_best:.3g})"
    assert ssa_best < 0.1 * rnd_best, f"{name}: SSA {ssa_best:.3g} vs random {rnd_best:.3g}"


def test_random_search_stays_in_the_box_and_is_seeded():
    seen = []
    trace = random_search(lambda x: seen.append(x) or 0.0, np.array([1.0, -2.0]), np.array([3.0, 0.0]), 50, seed=3)
    points = np.array(seen)
    assert points.shape == (50, 2) and (points[:, 0] >= 1).all() and (points[:, 0] <= 3).all()
    assert (points[:, 1] >= -2).all() and (points[:, 1] <= 0).all() and trace.best_f == 0.0
    again = []
    random_search(lambda x: again.append(x) or 0.0, np.array([1.0, -2.0]), np.array([3.0, 0.0]), 50, seed=3)
    assert np.array_equal(points, np.array(again))
