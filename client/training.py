"""A site's local training loop: Adam on BCE (+ severity and reconstruction terms)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from common.config import TrainConfig
from common.inference import SiteInputs, autocast, forward
from common.model import InjuryNet, InjuryOutput


@dataclass
class TrainResult:
    num_examples: int
    loss: float
    seconds: float


def train_local(model: InjuryNet, data: SiteInputs, train_index: np.ndarray, config: TrainConfig,
                device: torch.device, server_round: int = 0) -> TrainResult:
    """Adam + BCE-with-logits for ``local-epochs`` over the site's training studies."""
    start = time.perf_counter()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed * 100_003 + server_round)
    total, seen = 0.0, 0
    for _ in range(config.local_epochs):
        order = torch.as_tensor(train_index)[torch.randperm(len(train_index), generator=generator)]
        for start_i in range(0, len(order), config.batch_size):
            batch = order[start_i:start_i + config.batch_size]
            x, m = data.inputs[batch].to(device), data.mask[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                loss = study_loss(model, data, batch, forward(model, data, x, m), config, device)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(batch)
            seen += len(batch)
    return TrainResult(num_examples=len(train_index), loss=total / max(seen, 1), seconds=time.perf_counter() - start)


def study_loss(model: InjuryNet, data: SiteInputs, batch: Tensor, out: InjuryOutput, config: TrainConfig,
               device: torch.device) -> Tensor:
    """BCE on the injury logits + weighted MSE of the severity (studies with a target) and of the
    reconstruction (real images only)."""
    loss = F.binary_cross_entropy_with_logits(out.logits.float(), data.labels[batch].to(device))
    if out.severity is not None and data.targets is not None and config.severity_weight > 0:
        targets = data.targets[batch].to(device)
        known = torch.isfinite(targets)
        if known.any():
            loss = loss + config.severity_weight * F.mse_loss(out.severity.float()[known], targets[known])
    if out.reconstruction is not None and config.recon_weight > 0:
        target = data.recon_targets(batch, model.config.recon_size).to(device)
        mask = data.mask[batch].to(device)
        loss = loss + config.recon_weight * F.mse_loss(out.reconstruction.float()[mask], target[mask])
    return loss
