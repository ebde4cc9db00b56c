"""The centre's side of SCAFFOLD (``aggregation = scaffold``; common/scaffold.py has the sites').

The centre keeps c, the mean of the sites' control variates, sends it with every train message,
and after the round moves it by the sum of the accepted sites' delta c_i over the sampled sites
(the paper's c <- c + |S|/N mean(delta c_i), with every site sampled: the mean). A round whose
model could not be aggregated leaves c as it was. c is saved with every checkpoint, so a resumed
run continues with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message

from common.exchange import ParamSpec
from common.scaffold import CONTROL_KEY, as_record

STATE_KEY = "scaffold"  # c, inside the checkpoint's server state


@dataclass
class ControlVariate:
    spec: dict[str, ParamSpec]
    c: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.c:
            self.c = {name: np.zeros(p.shape, dtype=np.float64) for name, p in self.spec.items()}

    def attach(self, messages: list[Message]) -> list[Message]:
        """Each train message with c beside the model."""
        record = as_record(self.c)
        for msg in messages:
            msg.content[CONTROL_KEY] = record
        return messages

    def update(self, deltas: list[dict[str, np.ndarray]], sampled: int) -> None:
        """c += sum of the accepted sites' delta c_i / the number of sites sampled this round."""
        if not deltas or sampled < 1:
            return
        for name in self.c:
            self.c[name] = self.c[name] + sum(d[name].astype(np.float64) for d in deltas) / sampled

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {STATE_KEY: {name: torch.from_numpy(value.copy()) for name, value in self.c.items()}}

    def restore(self, state: dict[str, object] | None) -> None:
        """Continue from a checkpoint's server state; one without c (another aggregation) is ignored."""
        stored = (state or {}).get(STATE_KEY)
        if isinstance(stored, dict) and set(stored) == set(self.c):
            self.c = {name: value.numpy().astype(np.float64) for name, value in stored.items()}
