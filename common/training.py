"""The local training loop: Adam on BCE (+ severity and reconstruction terms), optionally with
FedProx's proximal term. Shared by the sites (client/) and the studies' centralised and
local-only baselines (simulations/), so every arm trains with the same code."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from common.config import TrainConfig
from common.inference import SiteInputs, StudyBatch, StudyBatches, amp_dtype, autocast, forward, move_to
from common.model import InjuryNet, InjuryOutput, seeded


@dataclass
class TrainResult:
    num_examples: int
    loss: float
    seconds: float
    # With a SCAFFOLD correction: the mean raw gradient of each trainable parameter over the steps
    mean_gradients: list[Tensor] | None = None


def train_local(model: InjuryNet, data: SiteInputs, train_index: np.ndarray, config: TrainConfig,
                device: torch.device, server_round: int = 0, proximal_mu: float = 0.0,
                batches_type: type[StudyBatches] = StudyBatches,
                correction: list[Tensor] | None = None) -> TrainResult:
    """Adam + BCE-with-logits for ``local-epochs`` over the site's training studies. With
    ``proximal_mu`` > 0 (FedProx), mu/2 ||w - w_global||^2 over the trainable parameters is added
    to the loss, w_global being the parameters the round started from. ``correction`` (SCAFFOLD's
    c - c_i, one tensor per trainable parameter, common/scaffold.py) is added to every gradient
    before the step, and the result then holds the mean raw gradients. ``batches_type`` gathers the
    batches (benchmarks/device_path.py measures a naive one against the site's)."""
    start = time.perf_counter()
    move_to(model, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    # foreach: one call per step for all the tensors (the default on a CPU loops over them in Python)
    optimizer = torch.optim.Adam(params, lr=config.lr_at(server_round), weight_decay=config.weight_decay,
                                 foreach=True)
    # A loss scaler only for float16; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp_dtype(device) == torch.float16)
    seed = config.seed * 100_003 + server_round
    generator = torch.Generator().manual_seed(seed)
    batches = batches_type.for_training(model, data, device)
    prior = prior_log_odds(data.labels[torch.as_tensor(train_index)], config.logit_adjust, device)
    total, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    gradient_sum = [torch.zeros_like(p) for p in params] if correction is not None else None
    steps = 0
    # Dropout draws from the global generator: seeded, a site's round trains alike whatever the
    # process ran before (a simulation's worker serves several sites, in no fixed order).
    with seeded(seed, device):
        for _ in range(config.local_epochs):
            order = torch.as_tensor(train_index)[torch.randperm(len(train_index), generator=generator)]
            for start_i in range(0, len(order), config.batch_size):
                batch = batches(order[start_i:start_i + config.batch_size])
                optimizer.zero_grad(set_to_none=True)
                with autocast(device):
                    out = forward(model, batch)
                    data_loss = per_study_loss(out, batch, config, prior).mean()
                    loss = (data_loss + proximal_penalty(params, anchor, proximal_mu) if anchor is not None
                            else data_loss)
                scaler.scale(loss).backward()
                if gradient_sum is not None:
                    _correct(params, gradient_sum, correction, scaler, optimizer)
                    steps += 1
                scaler.step(optimizer)
                scaler.update()
                total += data_loss.detach().float() * len(batch)  # the reported loss is the data term only
                seen += len(batch)
    return TrainResult(num_examples=len(train_index), loss=float(total) / max(seen, 1),
                       seconds=time.perf_counter() - start,
                       mean_gradients=[g / max(steps, 1) for g in gradient_sum] if gradient_sum is not None else None)


def _correct(params: list[Tensor], gradient_sum: list[Tensor], correction: list[Tensor],
             scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """SCAFFOLD: add the step's raw gradients to the sum, then c - c_i to each gradient."""
    scaler.unscale_(optimizer)  # the raw gradients (a no-op without float16 loss scaling)
    for p in params:
        if p.grad is None:  # a parameter this batch did not reach still gets its correction
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    torch._foreach_add_(gradient_sum, grads)
    torch._foreach_add_(grads, correction)


def proximal_penalty(params: list[Tensor], anchor: list[Tensor], mu: float) -> Tensor:
    """FedProx's mu/2 ||w - w_global||^2."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def prior_log_odds(labels: Tensor, tau: float, device: torch.device) -> Tensor | None:
    """(L,) tau x the log-odds of each label's prevalence in ``labels`` (logit adjustment), None for
    tau = 0. A label the split has in one class only counts as (0.5 or n + 0.5) / (n + 1)."""
    if tau <= 0:
        return None
    n = labels.shape[0]
    prevalence = (labels.float().sum(0) + 0.5) / (n + 1)
    return (tau * torch.log(prevalence / (1 - prevalence))).to(device)


def per_study_loss(out: InjuryOutput, batch: StudyBatch, config: TrainConfig, prior: Tensor | None = None) -> Tensor:
    """(B,) loss of each study on its own: BCE over its labels + weighted squared severity error
    (when it has a target) + weighted MSE of its own real images' reconstructions. ``prior``
    (``prior_log_odds``) is added to the logits in the BCE only.

    Every term depends on one study only, so with DP-SGD a study's gradient is its own and the
    clipping bound holds per study."""
    logits = out.logits.float() if prior is None else out.logits.float() + prior
    losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none").mean(1)
    # Every head present gets a term, even at weight 0 or without targets: DP-SGD needs a
    # (possibly zero) per-sample gradient for every trainable parameter.
    if out.severity is not None:
        targets = batch.targets if batch.targets is not None else out.severity.new_full(
            out.severity.shape, float("nan"))
        known = torch.isfinite(targets)
        error = torch.where(known, out.severity.float() - torch.nan_to_num(targets), torch.zeros_like(targets))
        losses = losses + config.severity_weight * error ** 2
    if out.reconstruction is not None:
        mask = batch.mask.to(batch.recon.dtype)
        per_image = ((out.reconstruction.float() - batch.recon) ** 2).flatten(2).mean(2)  # (B, T)
        losses = losses + config.recon_weight * (per_image * mask).sum(1) / mask.sum(1).clamp_min(1)
    return losses
