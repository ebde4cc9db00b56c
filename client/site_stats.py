"""The site's feature standardisation statistics, kept in its state folder for ``predict``.

Every site standardises the frozen backbone's features with statistics of its own training
images (``feature-norm = site``); they never leave the site, so a model exported by the centre
does not carry them. The site writes them here whenever it fits them, keyed by what they depend
on: the backbone (its hash) and the preprocessing (image size, sequence length, series choice).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from common.config import DataConfig
from common.files import atomic_torch_save
from common.model import InjuryNet


def stats_path(state_dir: Path, backbone_hash: str, data: DataConfig) -> Path:
    key = hashlib.sha256(f"{backbone_hash}|{data.image_size}|{data.seq_len}|{data.series_description}|"
                         f"{data.mrnet_plane}".encode()).hexdigest()[:20]
    return state_dir / "feature-norm" / f"{key}.pt"


def save_stats(model: InjuryNet, state_dir: Path, backbone_hash: str, data: DataConfig, n_studies: int) -> Path:
    path = stats_path(state_dir, backbone_hash, data)
    atomic_torch_save({"mean": model.feature_norm.mean.detach().cpu(), "inv_std": model.feature_norm.inv_std.detach().cpu(),
                       "backbone-hash": backbone_hash, "image-size": data.image_size, "seq-len": data.seq_len,
                       "training-studies": n_studies}, path)
    return path


def load_stats(model: InjuryNet, state_dir: Path, backbone_hash: str, data: DataConfig) -> dict | None:
    """Load them into the model; None when this site has none for this backbone and preprocessing."""
    path = stats_path(state_dir, backbone_hash, data)
    if not path.is_file():
        return None
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if stored.get("backbone-hash") != backbone_hash:
        return None
    with torch.no_grad():
        model.feature_norm.mean.copy_(stored["mean"])
        model.feature_norm.inv_std.copy_(stored["inv_std"])
    return stored
