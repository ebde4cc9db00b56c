"""Image-quality figures of the ResNet50-BiGRU-attention paper: PSNR, SSIM, FID and IS.

PSNR and SSIM compare each input image with its reconstruction; sites send their sums. FID is
the Frechet distance between Gaussian fits of real and reconstructed image features; sites
send n, the sum and the sum of outer products of the features, so the server fits the pooled
Gaussians exactly. IS is exp(E_x KL(p(y|x) || p(y))) of the predicted class distribution;
sites send the sum of p(y|x) and of sum_y p log p.

Own implementations, not torchmetrics: torchmetrics' SSIM pads the borders (Wang et al. and
scikit-image crop them), and its FID/IS keep per-image state that must not leave a site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW = 0.01, 0.03, 1.5, 11
PSNR_CAP_DB = 100.0  # a perfect reconstruction has infinite PSNR; cap it so sums stay finite


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (N, H, W) tensors."""
    mse = ((images.double() - reference.double()) ** 2).flatten(1).mean(1)
    value = 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))
    return value.clamp_max(PSNR_CAP_DB)


def _gaussian_1d(device: torch.device) -> torch.Tensor:
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    return g / g.sum()


def _valid_band(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n, n - k + 1) matrix whose column j is the window ``g`` at rows j..j+k-1: ``x @ band``
    filters the last axis with 'valid' borders."""
    k = g.numel()
    rows = torch.arange(n, device=g.device).unsqueeze(1) - torch.arange(n - k + 1, device=g.device).unsqueeze(0)
    inside = (rows >= 0) & (rows < k)
    return torch.where(inside, g[rows.clamp(0, k - 1)], torch.zeros((), dtype=g.dtype, device=g.device))


def _gaussian_filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The 11x11 Gaussian window over the last two axes ('valid' borders), as two 1-D passes
    written as products with banded matrices: the same sums as the 2-D window, by BLAS."""
    return _valid_band(x.shape[-2], g).T @ (x @ _valid_band(x.shape[-1], g))


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03,
    population covariances, mean over the positions where the window fits (borders cropped)."""
    x = images.double()
    y = reference.double()
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    g = _gaussian_1d(x.device)
    # The five local moments in one pass: means, second moments and the cross moment.
    mu_x, mu_y, xx, yy, xy = _gaussian_filter(torch.stack((x, y, x * x, y * y, x * y)), g)
    var_x = xx - mu_x ** 2
    var_y = yy - mu_y ** 2
    cov = xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


@dataclass
class GaussianMoments:
    """n, sum and sum of outer products of d-dimensional features (float64)."""

    n: int
    total: np.ndarray  # (d,)
    outer: np.ndarray  # (d, d)

    @classmethod
    def empty(cls, dim: int) -> "GaussianMoments":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianMoments":
        f = np.asarray(features, np.float64)
        return cls(len(f), f.sum(0), f.T @ f)

    def __add__(self, other: "GaussianMoments") -> "GaussianMoments":
        return GaussianMoments(self.n + other.n, self.total + other.total, self.outer + other.outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (unbiased) covariance, as np.cov gives them on the pooled features."""
        mean = self.total / self.n
        cov = (self.outer - self.n * np.outer(mean, mean)) / max(self.n - 1, 1)
        return mean, cov


def frechet_distance(a: GaussianMoments, b: GaussianMoments) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    a symmetric PSD matrix: symmetric eigensolvers give it without a general matrix square root
    (scipy's sqrtm, whose error estimate and ``disp`` flag are deprecated) and without the
    complex round-off that the product S1 S2 needs an epsilon offset for."""
    mu1, s1 = a.mean_cov()
    mu2, s2 = b.mean_cov()
    values, vectors = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root1 @ s2 @ root1
    trace_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_covmean)


@dataclass
class ImageStats:
    """Reconstruction quality sums and FID moments of one or more sites (moments None: FID was not
    computed in this round, see ``fid-every``)."""

    n_images: int
    psnr_sum: float
    ssim_sum: float
    real: GaussianMoments | None
    fake: GaussianMoments | None

    @classmethod
    def empty(cls, dim: int, with_fid: bool = True) -> "ImageStats":
        if not with_fid:
            return cls(0, 0.0, 0.0, None, None)
        return cls(0, 0.0, 0.0, GaussianMoments.empty(dim), GaussianMoments.empty(dim))

    @property
    def with_fid(self) -> bool:
        return self.real is not None and self.fake is not None

    def __add__(self, other: "ImageStats") -> "ImageStats":
        if self.with_fid != other.with_fid:
            raise ValueError("FID statistics from some sites and not from others")
        return ImageStats(self.n_images + other.n_images, self.psnr_sum + other.psnr_sum, self.ssim_sum + other.ssim_sum,
                          self.real + other.real if self.with_fid else None,
                          self.fake + other.fake if self.with_fid else None)

    def to_record(self) -> dict[str, list[float]]:
        record = {"img": [float(self.n_images), self.psnr_sum, self.ssim_sum]}
        if self.with_fid:
            record["fid-real"] = [float(self.real.n), *self.real.total.tolist(), *self.real.outer.ravel().tolist()]
            record["fid-fake"] = [float(self.fake.n), *self.fake.total.tolist(), *self.fake.outer.ravel().tolist()]
        return record

    @classmethod
    def from_record(cls, record: dict, dim: int, with_fid: bool = True) -> "ImageStats":
        """Parse and check a site's image statistics (ValueError when malformed or implausible);
        ``with_fid``: whether this round asked for the FID moments (they must then be there, and
        must not be otherwise)."""
        img = _vector(record["img"], 3, "img")
        n = img[0]
        if n < 0 or n % 1:
            raise ValueError("img: expected [n, psnr sum, ssim sum]")
        # PSNR of [0, 1] images is in [0, PSNR_CAP_DB]; SSIM in [-1, 1].
        if not (0 <= img[1] <= PSNR_CAP_DB * n + 1e-6 and -n - 1e-6 <= img[2] <= n + 1e-6):
            raise ValueError("img: PSNR or SSIM sums out of range for n images")

        def moments(key: str) -> GaussianMoments:
            v = _vector(record[key], 1 + dim + dim * dim, key)
            m = GaussianMoments(int(v[0]), v[1:1 + dim], v[1 + dim:].reshape(dim, dim))
            if v[0] != n or np.abs(m.total).max(initial=0) > n * FEATURE_BOUND \
                    or np.abs(m.outer).max(initial=0) > n * FEATURE_BOUND ** 2 \
                    or (np.diag(m.outer) < 0).any() or not np.allclose(m.outer, m.outer.T, rtol=1e-6, atol=1e-6):
                raise ValueError(f"{key}: expected n images, bounded sums and a symmetric {dim}x{dim} matrix")
            return m
        if not with_fid:
            if "fid-real" in record or "fid-fake" in record:
                raise ValueError("FID statistics sent in a round that did not ask for them")
            return cls(int(n), float(img[1]), float(img[2]), None, None)
        return cls(int(n), float(img[1]), float(img[2]), moments("fid-real"), moments("fid-fake"))


# Image features are standardised and orthonormally projected: real values stay far inside this.
FEATURE_BOUND = 1e4


def _vector(value: object, size: int, key: str) -> np.ndarray:
    """A list of ``size`` finite numbers from a MetricRecord value."""
    if not isinstance(value, list) or len(value) != size:
        raise ValueError(f"{key}: expected a list of {size} numbers")
    array = np.asarray(value, np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{key}: values must be finite")
    return array


@dataclass
class InceptionStats:
    """For IS per label: n, sum of p(y|x) over x (L, 2) and sum over x of sum_y p log p (L,)."""

    n: int
    p_sum: np.ndarray
    plogp_sum: np.ndarray

    @classmethod
    def empty(cls, num_labels: int) -> "InceptionStats":
        return cls(0, np.zeros((num_labels, 2)), np.zeros(num_labels))

    @classmethod
    def from_probabilities(cls, probs: np.ndarray) -> "InceptionStats":
        """probs (N, L): each label's injury probability; p(y|x) = [1 - p, p]."""
        p = np.clip(np.asarray(probs, np.float64), 1e-12, 1 - 1e-12)
        dist = np.stack([1 - p, p], axis=-1)  # (N, L, 2)
        return cls(len(p), dist.sum(0), (dist * np.log(dist)).sum(-1).sum(0))

    def __add__(self, other: "InceptionStats") -> "InceptionStats":
        return InceptionStats(self.n + other.n, self.p_sum + other.p_sum, self.plogp_sum + other.plogp_sum)

    def to_record(self) -> dict[str, list[float]]:
        return {"is": [float(self.n), *self.p_sum.ravel().tolist(), *self.plogp_sum.tolist()]}

    @classmethod
    def from_record(cls, record: dict, num_labels: int) -> "InceptionStats":
        v = _vector(record["is"], 1 + 3 * num_labels, "is")
        n = v[0]
        p_sum, plogp = v[1:1 + 2 * num_labels].reshape(num_labels, 2), v[1 + 2 * num_labels:]
        # Each study adds a distribution [1 - p, p] (sums to 1) and sum p log p in [-log 2, 0].
        if n < 0 or n % 1 or (p_sum < -1e-9).any() or not np.allclose(p_sum.sum(1), n, atol=1e-6 * (n + 1)) \
                or (plogp > 1e-9).any() or (plogp < -math.log(2) * n - 1e-6).any():
            raise ValueError("is: expected n, the p(y) sums and the p log p sums of n distributions")
        return cls(int(n), p_sum, plogp)

    def scores(self) -> np.ndarray:
        """IS per label: exp(mean_x sum_y p log p - sum_y p_bar log p_bar)."""
        if self.n == 0:
            return np.full(len(self.plogp_sum), np.nan)
        p_bar = np.clip(self.p_sum / self.n, 1e-12, 1.0)
        return np.exp(self.plogp_sum / self.n - (p_bar * np.log(p_bar)).sum(-1))


def safe_mean(total: float, n: int) -> float | None:
    return total / n if n > 0 and math.isfinite(total) else None
