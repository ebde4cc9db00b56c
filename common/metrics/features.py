"""Image features for FID: torchvision InceptionV3 pool features when a local weights file is
configured, else the model's own frozen ResNet50 (site-standardised). Both are reduced to
``fid-dim`` by one fixed, seeded orthonormal projection, so sites' statistics are summable and
their size is chosen on purpose: 2 x (d + d^2) float64 values per site (64-d: 66 KB; 2048-d:
67 MB, more than the model update).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.model import BackboneWeightsError, InjuryNet

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def fixed_projection(in_dim: int, out_dim: int, seed: int = 0) -> Tensor:
    if out_dim >= in_dim:
        return torch.eye(in_dim)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float64))
    return q.float()


class FidFeatureExtractor:
    def __init__(self, model: InjuryNet, dim: int, inception_weights: str = "") -> None:
        self.model = model
        self.inception = _load_inception(Path(inception_weights).expanduser()) if inception_weights else None
        self.projection = fixed_projection(2048, dim)
        self.name = self.describe(dim, inception_weights)

    @staticmethod
    def describe(dim: int, inception_weights: str = "") -> str:
        """The extractor's name as reports show it (values compare only within one extractor)."""
        if inception_weights:
            return f"InceptionV3 pool features ({Path(inception_weights).name}), projected to {dim}-d"
        return f"the model's frozen ResNet50 pool features (site-standardised), projected to {dim}-d"

    @property
    def uses_backbone(self) -> bool:
        return self.inception is None

    @torch.no_grad()
    def from_backbone_features(self, features: Tensor) -> np.ndarray:
        """(N, 2048) raw backbone features already computed (cached) -> (N, dim)."""
        standardised = self.model.feature_norm(features.to(self.model.feature_norm.mean.device))
        return (standardised.float().cpu() @ self.projection).double().numpy()

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 64) -> np.ndarray:
        """(N, 1, H, W) in [0, 1] -> (N, dim) float64."""
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            device = self.model.feature_norm.mean.device
            if self.inception is not None:
                x = x.expand(-1, 3, -1, -1)
                x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
                features = self.inception(x)
            else:
                self.model.backbone.eval()
                features = self.model.feature_norm(self.model.backbone(x.to(device)))
            out.append((features.float().cpu() @ self.projection).double().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.projection.shape[1]))


def _load_inception(path: Path) -> torch.nn.Module:
    from torchvision.models import inception_v3

    if not path.is_file():
        raise BackboneWeightsError(f"fid-inception-weights file {path} not found (a torchvision InceptionV3 state dict)")
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise BackboneWeightsError(f"fid-inception-weights {path} is not an InceptionV3 state dict: {exc}") from exc
    net.fc = torch.nn.Identity()
    return net.eval()
