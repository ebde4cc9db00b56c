"""The Sparrow Search Algorithm (Xue & Shen 2020), as the SSA ResNet50-BiGRU paper uses it, and
random search with the same budget of evaluations.

A population of sparrows moves in a box. Each generation:
- **producers** (the fittest ``producer_fraction``) search widely: while no alarm is raised
  (R2 < ST) they contract their position, x * exp(-i / (alpha * T)); on alarm they jump,
  x + Q * L (Q normal);
- **scroungers** follow the best producer, x_P + |x - x_P| A+ L; the hungriest half fly elsewhere,
  Q * exp((x_worst - x) / i^2);
- a random ``vigilant_fraction`` (10-20 %) notices danger: a sparrow at the edge flees toward the
  best, x_best + beta |x - x_best|; one at the centre moves away from the worst,
  x + K |x - x_worst| / (f - f_worst + eps).

Positions are kept in a centred box [-1, 1]^d internally: the producers' contraction pulls
toward the box centre (the original pulls toward the coordinate origin, which flatters problems
whose optimum is at 0); ``minimise`` maps to and from the caller's box. A fixed number of
fitness evaluations is the budget, and both searches report the best value after each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Objective = Callable[[np.ndarray], float]


@dataclass
class SearchTrace:
    best_x: np.ndarray
    best_f: float
    best_after: list[float] = field(default_factory=list)  # best value after each evaluation


def sparrow_search(objective: Objective, lower: np.ndarray, upper: np.ndarray, budget: int, seed: int | list[int],
                   population: int = 10, producer_fraction: float = 0.2, vigilant_fraction: float = 0.15,
                   safety_threshold: float = 0.8) -> SearchTrace:
    """Minimise ``objective`` over the box with at most ``budget`` evaluations."""
    rng = np.random.default_rng(seed)
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    dim = len(lower)
    trace = _Evaluations(objective, lower, upper, budget)
    n = min(population, budget)
    x = rng.uniform(-1, 1, size=(n, dim))
    f = np.array([trace(row) for row in x])
    producers = max(1, int(round(producer_fraction * n)))
    vigilant = max(1, int(round(vigilant_fraction * n)))
    generation = 0
    while not trace.spent:
        generation += 1
        order = np.argsort(f)
        x, f = x[order], f[order]
        best, worst = x[0].copy(), x[-1].copy()
        f_best, f_worst = f[0], f[-1]
        new = x.copy()
        alarm = rng.random()
        for i in range(producers):  # producers
            if alarm < safety_threshold:
                new[i] = x[i] * math.exp(-(i + 1) / (rng.random() * budget / n + 1e-12))
            else:
                new[i] = x[i] + rng.normal() * np.ones(dim)
        leader = new[0]
        for i in range(producers, n):  # scroungers
            if i + 1 > n / 2:
                new[i] = rng.normal() * np.exp((worst - x[i]) / (i + 1) ** 2)
            else:  # x_P + |x - x_P| A+ L, A a row of random +-1, A+ = A^T (A A^T)^-1 = A^T / d
                signs = rng.choice([-1.0, 1.0], size=dim)
                new[i] = leader + float(np.abs(x[i] - leader) @ signs) / dim * np.ones(dim)
        for i in rng.choice(n, size=vigilant, replace=False):  # vigilant sparrows
            if f[i] > f_best:
                new[i] = best + rng.normal() * np.abs(x[i] - best)
            else:
                k = rng.uniform(-1, 1)
                new[i] = x[i] + k * np.abs(x[i] - worst) / (f[i] - f_worst + 1e-12)
        new = np.clip(new, -1, 1)
        for i in range(n):  # greedy: a sparrow keeps its place unless the new one is better
            if trace.spent:
                break
            value = trace(new[i])
            if value < f[i]:
                x[i], f[i] = new[i], value
    return trace.result()


def random_search(objective: Objective, lower: np.ndarray, upper: np.ndarray, budget: int,
                  seed: int | list[int]) -> SearchTrace:
    rng = np.random.default_rng(seed)
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    trace = _Evaluations(objective, lower, upper, budget)
    while not trace.spent:
        trace(rng.uniform(-1, 1, size=len(lower)))
    return trace.result()


class _Evaluations:
    """The budget, the map from the centred box to the caller's, and the running best."""

    def __init__(self, objective: Objective, lower: np.ndarray, upper: np.ndarray, budget: int) -> None:
        self.objective, self.lower, self.upper, self.budget = objective, lower, upper, budget
        self.best_f, self.best_x, self.history = math.inf, None, []

    @property
    def spent(self) -> bool:
        return len(self.history) >= self.budget

    def __call__(self, centred: np.ndarray) -> float:
        point = self.lower + (np.clip(centred, -1, 1) + 1) / 2 * (self.upper - self.lower)
        value = float(self.objective(point))
        if not math.isfinite(value):
            value = math.inf
        if value < self.best_f:
            self.best_f, self.best_x = value, point
        self.history.append(self.best_f)
        return value

    def result(self) -> SearchTrace:
        return SearchTrace(self.best_x, self.best_f, list(self.history))


def sphere(x: np.ndarray) -> float:
    return float(np.sum(np.asarray(x) ** 2))


def rastrigin(x: np.ndarray) -> float:
    x = np.asarray(x)
    return float(10 * len(x) + np.sum(x ** 2 - 10 * np.cos(2 * np.pi * x)))
