"""Opacus, imported without its side effect on logging, with clinicfl's grad sampler registered.

Only DP code imports this module: Opacus takes about 3 s to import, which a deployed site would
otherwise pay on every message (each message is a fresh ClientApp process).

``opacus/utils/module_utils.py`` calls ``logging.basicConfig()`` when it is imported. That gives
the root logger a console handler, and Flower's logger propagates to the root: every Flower log
line then appears twice (coloured, then plain with a timestamp), DEBUG lines included, and every
library's warnings reach the screen in that format. Every clinicfl module imports Opacus from
here, so the handler it adds is removed once, right after the first import.
"""

from __future__ import annotations

import logging

_root = logging.getLogger()
_before = list(_root.handlers)

from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.grad_sample import register_grad_sampler  # noqa: E402
from opacus.utils.batch_memory_manager import wrap_data_loader  # noqa: E402

for _handler in [h for h in _root.handlers if h not in _before]:
    _root.removeHandler(_handler)


def _register_linear_gru() -> None:
    """Opacus' per-sample gradients of clinicfl's LinearGRU (the model's BiGRU direction): one
    einsum per weight from the recorded gate gradients (common/model.py)."""
    from torch import Tensor, nn

    from common.model import LinearGRU

    @register_grad_sampler(LinearGRU)
    def _linear_gru_grad_sampler(layer: LinearGRU, activations: list, backprops: Tensor) -> dict[nn.Parameter, Tensor]:
        return {p: g for p, g in layer._per_sample_gradients(backprops).items() if p.requires_grad}


_register_linear_gru()

__all__ = ["PrivacyEngine", "create_accountant", "get_noise_multiplier", "register_grad_sampler", "wrap_data_loader"]
