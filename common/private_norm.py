"""Under DP, the site's feature standardisation: the centre's public statistics, moved towards
the site's own feature mean by a DP release charged to the site's privacy ledger.

Why: standardising with statistics fitted on the training studies (``fit_feature_norm``) makes
one study change every other study's inputs, which DP-SGD's per-study clipping does not bound;
the stated epsilon would not hold. So a DP run standardises with

- the centre's **public** statistics: the mean and inverse standard deviation of the frozen
  backbone's features on the centre's own clinic (``server-val-path``), sent with every message;
- plus the site's mean **released under DP**: each privacy unit's mean feature, in the public
  statistics' units, is clipped to an L2 norm R and summed with Gaussian noise (sensitivity R
  under adding or removing a unit). R comes from the public clinic too: twice the 0.9 quantile of
  its studies' norms in the same units, so choosing it costs the site nothing. The release is one
  ledger entry ``[sigma, 1.0, 1]`` (a Gaussian mechanism, no subsampling), composed with the
  DP-SGD steps by the same accountant. The noisy mean is shrunk towards the public mean by a
  James-Stein factor computed from the release itself (post-processing), with a margin: a release
  whose energy is within two standard deviations of what noise alone gives moves nothing.

The number of privacy units is treated as public, as Opacus treats a dataset's size (its
sampling rate is batch size / units).
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

CLIP_QUANTILE, CLIP_FACTOR = 0.9, 2.0  # R: twice this quantile of the public clinic's norms
PUBLIC_MEAN_KEY = "public-feature-mean"  # run-config-like keys of the message's config record
PUBLIC_INV_STD_KEY = "public-feature-inv-std"
PUBLIC_CLIP_KEY = "public-feature-clip"


@dataclass(frozen=True)
class PublicNorm:
    """The centre's statistics of the frozen backbone's features on its own (public) clinic."""

    mean: torch.Tensor
    inv_std: torch.Tensor
    clip: float  # R for the site's release, in public standard deviations (``public_clip``)

    @classmethod
    def from_config(cls, config: Any, dim: int) -> "PublicNorm | None":
        """From a message's config record; None when the message carries none."""
        mean, inv_std, clip = (config.get(key) for key in (PUBLIC_MEAN_KEY, PUBLIC_INV_STD_KEY, PUBLIC_CLIP_KEY))
        if mean is None or inv_std is None or clip is None:
            return None
        mean_t = torch.tensor(list(mean), dtype=torch.float32)
        inv_t = torch.tensor(list(inv_std), dtype=torch.float32)
        if mean_t.shape != (dim,) or inv_t.shape != (dim,) or not (mean_t.isfinite().all() and inv_t.isfinite().all()) \
                or (inv_t < 0).any() or isinstance(clip, bool) or not isinstance(clip, (int, float)) \
                or not 0 < clip < 1e6:
            raise ValueError(f"the public feature statistics must be {dim} finite values each (inverse std >= 0) "
                             "and a clip norm in (0, 1e6)")
        return cls(mean_t, inv_t, float(clip))

    def to_config(self) -> dict[str, Any]:
        return {PUBLIC_MEAN_KEY: self.mean.tolist(), PUBLIC_INV_STD_KEY: self.inv_std.tolist(),
                PUBLIC_CLIP_KEY: self.clip}

    def digest(self) -> str:
        h = hashlib.sha256(self.mean.numpy().astype(np.float32).tobytes())
        h.update(self.inv_std.numpy().astype(np.float32).tobytes())
        h.update(np.float64(self.clip).tobytes())
        return h.hexdigest()[:24]


def public_clip(features: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> float:
    """R from the public clinic's own studies: twice the 0.9 quantile of their mean features'
    norms in the public units. A site's studies sit further out only by its shift; a unit beyond R
    is clipped (pulled towards the public mean), never dropped."""
    norms = [float(((features[i][mask[i]].float() - mean) * inv_std).mean(0).norm()) for i in range(len(mask))
             if mask[i].any()]
    return CLIP_FACTOR * float(np.quantile(norms, CLIP_QUANTILE)) if norms else 1.0


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
    """The Gaussian release of the clipped sum, and the standardisation it gives."""
    n = len(means)
    clip = public.clip
    # The clipped sum with noise of std sigma * R on every coordinate, then the mean.
    scale = torch.clamp(clip / means.norm(dim=1).clamp_min(1e-12), max=1.0).unsqueeze(1)
    total = (means * scale).sum(0)
    noisy_mean = (total + noise_multiplier * clip * torch.randn(total.shape, generator=generator)) / max(n, 1)
    active = public.inv_std > 0  # the public statistics say these features carry nothing: left at 0
    noisy_mean = torch.where(active, noisy_mean, torch.zeros_like(noisy_mean))
    # James-Stein towards the public mean: the noise's squared norm is about d (sigma R / n)^2, give
    # or take sqrt(2 d) of those units (chi-square); only energy beyond that margin is the site's
    # shift, and a release within it (noise alone, as at small sites) moves nothing.
    d = int(active.sum())
    noise_energy = (d + 2 * math.sqrt(2 * d)) * (noise_multiplier * clip / max(n, 1)) ** 2
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
