"""The centre's optimiser over the aggregate: how far the global model moves towards the round's
FedAvg mean.

FedAvg replaces the global model with the mean of the sites' models. Under label skew the sites'
updates pull in different directions and that mean moves little per round; a server optimiser
treats ``global - mean`` as a gradient (the "pseudo-gradient") and steps on it:

- ``none``: FedAvg, the new global model is the mean;
- ``momentum``: FedAvgM (Hsu et al. 2019), SGD with heavy-ball momentum on the pseudo-gradient;
- ``adam``: FedAdam (Reddi et al. 2021), Adam on the pseudo-gradient.

The equations are those of Flower's ``FedAvgM`` and ``FedAdam`` (``flwr.serverapp.strategy``),
applied after ``ClinicFedAvg``'s validated aggregation (and after SecAgg+'s sum), so every reply
check and secure aggregation stay as they are. The optimiser's state is saved with every
checkpoint, so a resumed run continues with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.config import FederationConfig

STATE_KEY = "server-optimizer"  # the optimiser's state in a checkpoint


@dataclass
class ServerOptimizer:
    kind: str  # none, momentum or adam
    lr: float  # the server learning rate (1 with momentum 0 is plain FedAvg)
    momentum: float  # momentum: the heavy-ball factor; adam: beta_1
    beta_2: float = 0.99  # adam: the second-moment decay
    tau: float = 1e-3  # adam: the adaptivity floor
    first: dict[str, np.ndarray] = field(default_factory=dict)  # momentum buffer / first moment
    second: dict[str, np.ndarray] = field(default_factory=dict)  # adam: second moment
    steps: int = 0

    @classmethod
    def of(cls, fed: FederationConfig) -> "ServerOptimizer":
        return cls(fed.server_optimizer.value, fed.server_lr, fed.server_momentum)

    def step(self, current: ArrayRecord, averaged: ArrayRecord) -> ArrayRecord:
        """The new global model, from the round's global model and the sites' aggregate."""
        if self.kind == "none":
            return averaged
        self.steps += 1
        new = ArrayRecord()
        for name in averaged:
            old = current[name].numpy().astype(np.float64)
            mean = averaged[name].numpy().astype(np.float64)
            gradient = old - mean  # updates are the opposite of gradients
            if self.kind == "momentum":
                buffer = self.first.get(name)
                buffer = gradient if buffer is None else self.momentum * buffer + gradient
                self.first[name] = buffer
                value = old - self.lr * buffer
            else:
                m = self.momentum * self.first.get(name, 0.0) + (1 - self.momentum) * -gradient
                v = self.beta_2 * self.second.get(name, 0.0) + (1 - self.beta_2) * gradient ** 2
                self.first[name], self.second[name] = m, v
                # Bias-corrected step size, as Flower's FedAdam computes it.
                lr = self.lr * np.sqrt(1 - self.beta_2 ** (self.steps + 1)) / (1 - self.momentum ** (self.steps + 1))
                value = old + lr * m / (np.sqrt(v) + self.tau)
            new[name] = Array(value.astype(averaged[name].numpy().dtype))
        return new

    def state(self) -> dict[str, object]:
        """What a checkpoint keeps ({} for FedAvg)."""
        if self.kind == "none":
            return {}
        return {"kind": self.kind, "steps": self.steps,
                "first": {k: torch.from_numpy(v) for k, v in self.first.items()},
                "second": {k: torch.from_numpy(v) for k, v in self.second.items()}}

    def restore(self, state: dict[str, object] | None) -> None:
        """Continue from a checkpoint's state (a resumed run); a state of another kind is ignored."""
        if not state or state.get("kind") != self.kind:
            return
        self.steps = int(state["steps"])  # type: ignore[arg-type]
        self.first = {k: v.numpy() for k, v in state["first"].items()}  # type: ignore[union-attr]
        self.second = {k: v.numpy() for k, v in state["second"].items()}  # type: ignore[union-attr]
