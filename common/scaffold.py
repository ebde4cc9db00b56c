"""SCAFFOLD's control variates (Karimireddy et al. 2020), the part the sites and the centre share.

Under label skew each site's local steps drift toward its own optimum (client drift). SCAFFOLD
keeps a control variate per site, c_i, an estimate of that site's gradient, and one at the
centre, c, their mean. A site adds c - c_i to every gradient it steps on, so its local steps
follow the federation's direction rather than its own. After the round the site's new c_i is the
mean of the raw gradients it computed on its local path (the paper's option I, taken along the
path rather than in an extra pass; option II's (x - y) / (K lr) assumes plain SGD, and the sites
step with Adam), and it sends the change, delta c_i, beside its model; the centre moves c by the
sum of the deltas over the sampled sites (server/scaffold.py).

A site keeps c_i in its Flower node state (``Context.state``), which persists across the rounds
of a run; a new run (a resumed one too) starts every c_i at zero.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

CONTROL_KEY = "scaffold-control"  # the centre's c, in each train message
CONTROL_DELTA_KEY = "scaffold-control-delta"  # a site's delta c_i, in its train reply
SITE_STATE_KEY = "scaffold-site-control"  # a site's own c_i, in its node state


def as_record(values: dict[str, np.ndarray | Tensor]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(_numpy(v), dtype=np.float32)) for name, v in values.items()})


def site_correction(message: RecordDict, state: RecordDict, names: list[str],
                    device: torch.device) -> tuple[list[Tensor], list[Tensor]] | None:
    """(c - c_i per trainable parameter, c_i), in ``names`` order, when ``message`` carries the
    centre's control variate; None otherwise. c_i is zero on a site's first round of a run."""
    if CONTROL_KEY not in message.array_records:
        return None
    centre = message.array_records[CONTROL_KEY]
    own = state.array_records.get(SITE_STATE_KEY)
    c = [torch.from_numpy(centre[n].numpy().astype(np.float32)).to(device) for n in names]
    c_i = ([torch.from_numpy(own[n].numpy().astype(np.float32)).to(device) for n in names] if own is not None
           else [torch.zeros_like(t) for t in c])
    return [a - b for a, b in zip(c, c_i)], c_i


def site_update(state: RecordDict, names: list[str], previous: list[Tensor],
                mean_gradients: list[Tensor]) -> ArrayRecord:
    """Keep the new c_i (the mean raw gradient of this round's local path) in the node state and
    return delta c_i for the reply."""
    state[SITE_STATE_KEY] = as_record(dict(zip(names, mean_gradients)))
    return as_record({n: new - old for n, new, old in zip(names, mean_gradients, previous)})


def _numpy(value: np.ndarray | Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else value
