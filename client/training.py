"""A site's local work: encode studies, train the trainable part, score the test split.

With the default freeze policy the ResNet50 never changes, so each image is encoded once per
site and cached on disk (keyed by the backbone hash and the image content); training and
evaluation then run the sequence head only. Other policies encode every batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from common.config import TrainConfig
from common.data.site import SiteData
from common.metrics.classification import ClassificationStats
from common.model import InjuryNet, frozen_backbone_hash

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class SiteInputs:
    """What the trainable path consumes for every study of a site."""

    inputs: Tensor  # (N, T, 2048) cached backbone features, or (N, T, 1, H, W) images
    mask: Tensor  # (N, T) bool
    labels: Tensor  # (N, L) float
    is_features: bool


@dataclass
class TrainResult:
    num_examples: int
    loss: float
    seconds: float


def prepare_inputs(model: InjuryNet, site: SiteData, cache_dir: Path | None, device: torch.device,
                   batch_size: int = 32) -> SiteInputs:
    images = torch.from_numpy(site.images).unsqueeze(2)
    mask = torch.from_numpy(site.mask)
    labels = torch.from_numpy(site.labels)
    if model.config.freeze != "frozen":
        return SiteInputs(images, mask, labels, is_features=False)
    return SiteInputs(encode_cached(model, site, cache_dir, device, batch_size), mask, labels, is_features=True)


def encode_cached(model: InjuryNet, site: SiteData, cache_dir: Path | None, device: torch.device,
                  batch_size: int = 32) -> Tensor:
    """Raw backbone features (N, T, 2048) of a site, from the disk cache when present."""
    key = hashlib.sha256()
    key.update(frozen_backbone_hash(model).encode())
    key.update(site.images.tobytes())
    key.update(site.mask.tobytes())
    path = cache_dir / f"features-{key.hexdigest()[:24]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: recompute, never trust it
            log.warning("feature cache %s unreadable (%s); recomputing", path.name, type(exc).__name__)
    features = encode(model, torch.from_numpy(site.images).unsqueeze(2), torch.from_numpy(site.mask), device,
                      batch_size)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(features, tmp)
            tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry
        except OSError as exc:  # a read-only state dir costs speed, not the round
            log.warning("cannot write the feature cache in %s (%s); set node config state-dir to a writable "
                        "folder", cache_dir, exc.strerror or type(exc).__name__)
    return features


@torch.no_grad()
def encode(model: InjuryNet, images: Tensor, mask: Tensor, device: torch.device, batch_size: int = 32) -> Tensor:
    model.backbone.to(device).eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding images", unit="batch", leave=False):
        x = images[start:start + batch_size].to(device)
        m = mask[start:start + batch_size].to(device)
        with _autocast(device):
            chunks.append(model.encode(x, m).float().cpu())
    return torch.cat(chunks)


def fit_feature_norm(model: InjuryNet, data: SiteInputs, train_index: np.ndarray, device: torch.device) -> None:
    """Site-local standardisation statistics from the training studies' real images."""
    if model.config.feature_norm != "site":
        return
    idx = torch.as_tensor(train_index)
    features = data.inputs[idx] if data.is_features else encode(model, data.inputs[idx], data.mask[idx], device)
    model.feature_norm.fit(features[data.mask[idx]].to(model.feature_norm.mean.device))


def _forward(model: InjuryNet, data: SiteInputs, x: Tensor, m: Tensor):
    return model.forward_features(x, m) if data.is_features else model(x, m)


def _autocast(device: torch.device):
    # Mixed precision on GPU only: CPU autocast would slow the GRU down and change numerics.
    return torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")


def train_local(model: InjuryNet, data: SiteInputs, train_index: np.ndarray, config: TrainConfig,
                device: torch.device, server_round: int = 0) -> TrainResult:
    """Adam + BCE-with-logits for ``local-epochs`` over the site's training studies."""
    start = time.perf_counter()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    criterion = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(config.seed * 100_003 + server_round)
    total, seen = 0.0, 0
    for _ in range(config.local_epochs):
        order = torch.as_tensor(train_index)[torch.randperm(len(train_index), generator=generator)]
        for start_i in range(0, len(order), config.batch_size):
            batch = order[start_i:start_i + config.batch_size]
            x, m, y = data.inputs[batch].to(device), data.mask[batch].to(device), data.labels[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = criterion(_forward(model, data, x, m).logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(batch)
            seen += len(batch)
    return TrainResult(num_examples=len(train_index), loss=total / max(seen, 1), seconds=time.perf_counter() - start)


@torch.no_grad()
def predict(model: InjuryNet, data: SiteInputs, index: np.ndarray, device: torch.device,
            batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Probabilities (n, L) and attention weights (n, T) for the given studies."""
    model.to(device).eval()
    probs, attention = [], []
    for start in range(0, len(index), batch_size):
        batch = torch.as_tensor(index[start:start + batch_size])
        with _autocast(device):
            out = _forward(model, data, data.inputs[batch].to(device), data.mask[batch].to(device))
        probs.append(torch.sigmoid(out.logits.float()).cpu())
        attention.append(out.attention.float().cpu())
    return torch.cat(probs), torch.cat(attention)


def evaluate_local(model: InjuryNet, data: SiteInputs, test_index: np.ndarray, device: torch.device,
                   threshold: float = 0.5) -> ClassificationStats:
    """Sufficient statistics of the site's test split: no per-study value leaves this function."""
    if len(test_index) == 0:
        return ClassificationStats.empty(data.labels.shape[1])
    probs, _ = predict(model, data, test_index, device)
    labels = data.labels[torch.as_tensor(test_index)]
    loss_sum = nn.functional.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7).double(), labels.double(),
                                                  reduction="sum").item()
    return ClassificationStats.from_predictions(probs.numpy(), labels.numpy(), loss_sum, threshold)
