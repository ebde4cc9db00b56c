"""Studies: one command per question (``clinicfl-sim study NAME``). Each writes report.md,
results.json and PNG plots under runs/studies/NAME/<timestamp>/ and prints its headline table."""

from __future__ import annotations

from types import ModuleType


def registry() -> dict[str, ModuleType]:
    from simulations.studies import (federation_vs_local, heterogeneity, hyperparameter_search, local_training,
                                     privacy_utility)

    return {m.NAME: m for m in (federation_vs_local, privacy_utility, heterogeneity, hyperparameter_search,
                                local_training)}
