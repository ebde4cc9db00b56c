"""Under DP, the site's feature standardisation: the centre's public statistics, moved towards
the site's own feature mean by a DP release charged to the site's privacy ledger.

Why: standardising with statistics fitted on the training studies (``fit_feature_norm``) makes
one study change every other study's inputs, which DP-SGD's per-study clipping does not bound;
the stated epsilon would not hold. So a DP run standardises with

- the centre's **public** statistics: the mean and inverse standard deviation of the frozen
  backbone's features on the centre's own clinic (``server-val-path``), sent with every message;
- plus the site's mean **released under DP**: each privacy unit's mean feature, in the public
  statistics' units, is clipped to an L2 norm R and summed with Gaussian noise (sensitivity R
  under adding or removing a unit). R is the 0.9 quantile of the units' norms, itself read from a
  histogram released with Gaussian noise (sensitivity 1: a unit is in one bin). The two releases
  are one ledger entry ``[sigma, 1.0, 2]`` (two Gaussian mechanisms, no subsampling), composed
  with the DP-SGD steps by the same accountant. The noisy mean is shrunk towards the public mean
  by the positive-part James-Stein factor computed from the release itself (post-processing).

The number of privacy units is treated as public, as Opacus treats a dataset's size (its
sampling rate is batch size / units).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

QUANTILE = 0.9  # the clip norm R: this quantile of the units' norms
CLIP_GRID = 2.0 ** (np.arange(-8, 65) / 4)  # candidate R, 0.25 .. 65536 (public standard deviations)
PUBLIC_MEAN_KEY = "public-feature-mean"  # run-config-like keys of the message's config record
PUBLIC_INV_STD_KEY = "public-feature-inv-std"


@dataclass(frozen=True)
class PublicNorm:
    """The centre's statistics of the frozen backbone's features on its own (public) clinic."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    @classmethod
    def from_config(cls, config: Any, dim: int) -> "PublicNorm | None":
        """From a message's config record; None when the message carries none."""
        mean, inv_std = config.get(PUBLIC_MEAN_KEY), config.get(PUBLIC_INV_STD_KEY)
        if mean is None or inv_std is None:
            return None
        mean_t = torch.tensor(list(mean), dtype=torch.float32)
        inv_t = torch.tensor(list(inv_std), dtype=torch.float32)
        if mean_t.shape != (dim,) or inv_t.shape != (dim,) or not (mean_t.isfinite().all() and inv_t.isfinite().all()) \
                or (inv_t < 0).any():
            raise ValueError(f"the public feature statistics must be {dim} finite values each (inverse std >= 0)")
        return cls(mean_t, inv_t)

    def to_config(self) -> dict[str, list[float]]:
        return {PUBLIC_MEAN_KEY: self.mean.tolist(), PUBLIC_INV_STD_KEY: self.inv_std.tolist()}

    def digest(self) -> str:
        h = hashlib.sha256(self.mean.numpy().astype(np.float32).tobytes())
        h.update(self.inv_std.numpy().astype(np.float32).tobytes())
        return h.hexdigest()[:24]


@dataclass(frozen=True)
class ReleasedNorm:
    """A site's standardisation under DP, as its ledger keeps it."""

    mean: torch.Tensor  # the public mean moved by the released shift (raw feature units)
    inv_std: torch.Tensor  # the public one
    clip: float  # R, in public standard deviations
    shrink: float  # the James-Stein factor applied to the noisy shift
    units: int
    noise_multiplier: float
    key: str  # what it was released for: public statistics, backbone, units

    def to_json(self) -> dict[str, Any]:
        return {"mean": _b64(self.mean), "inv-std": _b64(self.inv_std), "clip": self.clip, "shrink": self.shrink,
                "units": self.units, "noise-multiplier": self.noise_multiplier, "key": self.key}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ReleasedNorm":
        return cls(_unb64(data["mean"]), _unb64(data["inv-std"]), float(data["clip"]), float(data["shrink"]),
                   int(data["units"]), float(data["noise-multiplier"]), str(data["key"]))

    def apply(self, model: Any) -> None:
        with torch.no_grad():
            model.feature_norm.mean.copy_(self.mean.to(model.feature_norm.mean.device))
            model.feature_norm.inv_std.copy_(self.inv_std.to(model.feature_norm.inv_std.device))


def release_key(public: PublicNorm, backbone_hash: str, units: int) -> str:
    return f"{public.digest()}|{backbone_hash}|{units}"


def apply_public(model: Any, public: PublicNorm) -> None:
    with torch.no_grad():
        model.feature_norm.mean.copy_(public.mean.to(model.feature_norm.mean.device))
        model.feature_norm.inv_std.copy_(public.inv_std.to(model.feature_norm.inv_std.device))


def unit_means(features: torch.Tensor, mask: torch.Tensor, units: list[np.ndarray], public: PublicNorm) -> torch.Tensor:
    """(units, F): each privacy unit's mean image feature over all its studies' real images, in
    the public statistics' units ((x - mean) * inv_std; a feature with no public spread is 0)."""
    rows = []
    for unit in units:
        index = torch.as_tensor(unit, dtype=torch.long)
        images = features[index][mask[index]].float()
        rows.append(((images - public.mean) * public.inv_std).mean(0) if len(images) else torch.zeros_like(public.mean))
    return torch.stack(rows) if rows else torch.zeros((0, len(public.mean)))


def release(means: torch.Tensor, public: PublicNorm, noise_multiplier: float, key: str,
            generator: torch.Generator) -> ReleasedNorm:
    """The two Gaussian releases (clip-norm histogram, clipped sum) and the standardisation they give."""
    n = len(means)
    norms = means.norm(dim=1).numpy()
    # 1. R from a noisy histogram of the norms: each unit adds 1 to one bin.
    counts = np.bincount(np.searchsorted(CLIP_GRID, norms), minlength=len(CLIP_GRID) + 1)[: len(CLIP_GRID)]
    noisy = counts + noise_multiplier * torch.randn(len(counts), generator=generator, dtype=torch.float64).numpy()
    reached = np.flatnonzero(np.cumsum(noisy) >= QUANTILE * n)
    clip = float(CLIP_GRID[reached[0]] if len(reached) else CLIP_GRID[-1])
    # 2. The clipped sum with noise of std sigma * R on every coordinate, then the mean.
    scale = torch.clamp(clip / means.norm(dim=1).clamp_min(1e-12), max=1.0).unsqueeze(1)
    total = (means * scale).sum(0)
    noisy_mean = (total + noise_multiplier * clip * torch.randn(total.shape, generator=generator)) / max(n, 1)
    active = public.inv_std > 0  # the public statistics say these features carry nothing: left at 0
    noisy_mean = torch.where(active, noisy_mean, torch.zeros_like(noisy_mean))
    # 3. Positive-part James-Stein towards the public mean: the noise's expected squared norm is
    #    d (sigma R / n)^2; what the release shows beyond it is the site's own shift.
    noise_energy = int(active.sum()) * (noise_multiplier * clip / max(n, 1)) ** 2
    energy = float(noisy_mean.square().sum())
    shrink = max(0.0, 1.0 - noise_energy / energy) if energy > 0 else 0.0
    shift = shrink * noisy_mean
    safe_inv = torch.where(active, public.inv_std, torch.ones_like(public.inv_std))
    mean = public.mean + torch.where(active, shift / safe_inv, torch.zeros_like(shift))
    return ReleasedNorm(mean, public.inv_std.clone(), clip, shrink, n, noise_multiplier, key)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().numpy().astype(np.float32).tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())
