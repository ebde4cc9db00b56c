"""Image features for FID: torchvision InceptionV3 pool features when a local weights file is
configured, else the model's own frozen ResNet50 (standardised with the real images' statistics). Both are reduced to
``fid-dim`` by one fixed, seeded orthonormal projection, so sites' statistics are summable and
their size is chosen on purpose: 2 x (d + d^2) float64 values per site (64-d: 66 KB; 2048-d:
67 MB, more than the model update).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.files import load_or_compute
from common.model import BackboneWeightsError, InjuryNet, frozen_backbone_hash, tensor_hash

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def fixed_projection(in_dim: int, out_dim: int, seed: int = 0) -> Tensor:
    if out_dim >= in_dim:
        return torch.eye(in_dim)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float64))
    return q.float()


class FidFeatureExtractor:
    """FID features of real and reconstructed images, for one site or the server's validation set.

    With the model's ResNet50 (no InceptionV3 file), images are resized to ``image_size`` and the
    pool features are standardised with the statistics of the *real* images' features (a random,
    frozen backbone gives features that are nearly one vector otherwise), then projected.

    The real images of a site's fixed sample never change, and neither does a frozen backbone or
    an InceptionV3 file: their raw features are computed once, kept in memory and, with
    ``cache_dir``, on disk, so that no other process of the site (a simulation's workers, a
    deployment's fresh ClientApp processes) runs the backbone on them again. Each round only the
    reconstructions go through it. A backbone that trains moves the real features too: they are
    computed again each time, never taken from a cache.
    """

    def __init__(self, model: InjuryNet, dim: int, inception_weights: str = "", image_size: int = 0,
                 cache_dir: Path | None = None) -> None:
        self.model = model
        self.inception = None
        self._inception_identity = ""
        if inception_weights:
            path = Path(inception_weights).expanduser()
            self.inception = _load_inception(path)
            stat = path.stat()
            self._inception_identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        self.projection = fixed_projection(2048, dim)
        self.image_size = image_size or model.config.image_size
        self.name = self.describe(dim, inception_weights, self.image_size)
        self.cache_dir = cache_dir
        self._real: dict[str, Tensor] = {}  # key of the extractor and the images -> their raw features

    @staticmethod
    def describe(dim: int, inception_weights: str = "", image_size: int = 0) -> str:
        """The extractor's name as reports show it (values compare only within one extractor)."""
        if inception_weights:
            return f"InceptionV3 pool features ({Path(inception_weights).name}), projected to {dim}-d"
        size = f" at {image_size}x{image_size}" if image_size else ""
        return (f"the model's frozen ResNet50 pool features{size}, standardised with the real images' statistics, "
                f"projected to {dim}-d")

    @torch.no_grad()
    def real_and_fake(self, real: Tensor, fake: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) real and reconstructed images in [0, 1] -> two (N, dim) float64 arrays."""
        real_raw, fake_raw = self._real_raw(real), self._raw(fake)
        if self.inception is not None:
            return self._project(real_raw), self._project(fake_raw)
        std = real_raw.std(0, unbiased=False)
        floor = 0.01 * std.median().clamp_min(1e-12)
        inv_std = torch.where(std > floor, 1.0 / std.clamp_min(1e-12), torch.zeros_like(std))
        mean = real_raw.mean(0)
        return self._project((real_raw - mean) * inv_std), self._project((fake_raw - mean) * inv_std)

    def _real_raw(self, real: Tensor) -> Tensor:
        """The real images' raw features: computed once per extractor and images where they cannot change."""
        if self.inception is not None:
            extractor = f"inception:{self._inception_identity}"
        elif self.model.config.freeze == "frozen":
            extractor = f"resnet50:{frozen_backbone_hash(self.model)}:{self.image_size}"
        else:
            return self._raw(real)
        key = tensor_hash({extractor: real})[:24]  # the extractor as the name: over it, dtype, shape, bytes
        if key not in self._real:
            if self.cache_dir is None:
                self._real[key] = self._raw(real)
            else:
                self._real[key] = load_or_compute(self.cache_dir / f"fid-real-{key}.pt", lambda: self._raw(real),
                                                  "FID feature cache")
        return self._real[key]

    def _project(self, features: Tensor) -> np.ndarray:
        return (features.float() @ self.projection).double().numpy()

    @torch.no_grad()
    def _raw(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """(N, H, W) -> (N, 2048) raw pool features on the CPU."""
        out = []
        device = self.model.feature_norm.mean.device
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].unsqueeze(1).float()
            if self.inception is not None:
                x = x.expand(-1, 3, -1, -1)
                x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                out.append(self.inception((x - _IMAGENET_MEAN) / _IMAGENET_STD).float())
                continue
            if x.shape[-1] != self.image_size:
                x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                    align_corners=False, antialias=x.shape[-1] > self.image_size)
            self.model.backbone.eval()
            out.append(self.model.backbone(x.to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros((0, 2048))


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
