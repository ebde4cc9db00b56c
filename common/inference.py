"""Running the model over a site's studies: encode, predict, and evaluate into sufficient
statistics. Shared by the sites (client) and the server's own validation set.

With the default freeze policy the ResNet50 never changes, so each image is encoded once per
site and cached on disk (keyed by the backbone hash and the image content); training and
evaluation then run the sequence head only. Other policies encode every batch.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from common.config import EvalConfig
from common.files import load_or_compute
from common.data.site import SiteData
from common.metrics.catalogue import EvaluationStats
from common.metrics.classification import ClassificationStats, histogram_bins
from common.metrics.errors import ErrorStats
from common.metrics.subgroup_stats import site_subgroup_stats
from common.metrics.features import FidFeatureExtractor
from common.metrics.images import GaussianMoments, ImageStats, InceptionStats, psnr, ssim
from common.model import InjuryNet, InjuryOutput, check_mask, frozen_backbone_hash, upsample_reconstruction
from common.progress import progress_bar


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def move_to(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module.to(device)``, skipped when it is there already: ``to`` walks every submodule of the
    ResNet50 (about 4 ms on a CPU), and so would a check of every tensor (about 6 ms). A model is
    moved whole or by its parts (``model.backbone.to``), so the first tensor of the module itself
    and of each of its parts tells where it is."""
    target = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
    probes = [*module.parameters(recurse=False), *module.buffers(recurse=False),
              *(next(itertools.chain(part.parameters(), part.buffers()), None) for part in module.children())]
    if any(t is not None and t.device != target for t in probes):
        module.to(device)
    return module


@dataclass
class SiteInputs:
    """What the trainable path consumes for every study of a site."""

    inputs: Tensor  # (N, T, 2048) cached backbone features, or (N, T, 1, H, W) images
    mask: Tensor  # (N, T) bool
    labels: Tensor  # (N, L) float
    is_features: bool
    images: Tensor | None = None  # (N, T, 1, H, W): reconstruction targets and image metrics
    targets: Tensor | None = None  # (N,) severity, NaN where unknown
    biomech: Tensor | None = None  # (N, T, F) site-standardised biomechanical series

    _recon: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def biomech_of(self, index: Tensor, device: torch.device) -> Tensor | None:
        return self.biomech[index].to(device) if self.biomech is not None else None

    def recon_targets(self, size: int) -> Tensor:
        """Every study's images pooled to the decoder's resolution, (N, T, r, r): the reconstruction
        targets, computed once for the site (its images do not change)."""
        if self.images is None:
            raise ValueError("the reconstruction head needs the site's images; these inputs have none")
        if size not in self._recon:
            n, t = self.images.shape[:2]
            self._recon[size] = F.adaptive_avg_pool2d(self.images.reshape(n * t, 1, *self.images.shape[-2:]),
                                                      size).view(n, t, size, size)
        return self._recon[size]


def copy_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """To a GPU from pinned memory without blocking, so the host does not wait for the device; on a
    CPU the tensor itself."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class StudyBatch:
    """One batch of studies, on the device a loop runs on."""

    inputs: Tensor  # (B, T, 2048) features, or (B, T, 1, H, W) images
    mask: Tensor  # (B, T) bool
    labels: Tensor  # (B, L)
    is_features: bool
    real: Tensor | None = None  # images only: positions of the real images in the flattened (B * T)
    targets: Tensor | None = None  # (B,) severity, NaN where unknown
    biomech: Tensor | None = None  # (B, T, F)
    recon: Tensor | None = None  # (B, T, r, r) reconstruction targets

    def __len__(self) -> int:
        return self.mask.shape[0]


class StudyBatches:
    """A site's studies, batch by batch, on the device a loop runs on; ``batches(index)`` takes a
    host index tensor.

    On a GPU each tensor the loop reads is copied there once, when it fits in a quarter of the free
    memory, and a batch is gathered on the device; a tensor that does not fit (a large site's images)
    is gathered on the host and copied from pinned memory without blocking. The positions of the real
    images come from the host mask. So a step never waits for the device: a blocking copy or a
    boolean-mask gather would make the host wait for the GPU at every step, and the GPU then idles
    while the host prepares the next one (``benchmarks/device_path.py`` counts the waits). On a CPU
    the batches are plain slices of the site's tensors.

    ``recon_size``: batches carry the reconstruction targets at that size (``for_training`` sets it
    when the model has the reconstruction head)."""

    def __init__(self, data: SiteInputs, device: torch.device, recon_size: int | None = None,
                 resident_fraction: float = 0.25) -> None:
        self.is_features, self.device = data.is_features, device
        check_mask(data.mask)  # here, on the host, once: the model does not check a mask on a GPU
        self.host: dict[str, Tensor | None] = {
            "inputs": data.inputs, "mask": data.mask, "labels": data.labels, "targets": data.targets,
            "biomech": data.biomech, "recon": data.recon_targets(recon_size) if recon_size is not None else None}
        self.resident: dict[str, Tensor] = {}
        if device.type == "cuda":
            budget = torch.cuda.mem_get_info(device)[0] * resident_fraction
            for name, tensor in sorted(((k, v) for k, v in self.host.items() if v is not None),
                                       key=lambda item: item[1].nbytes):
                if tensor.nbytes <= budget:  # one blocking copy per loop, outside its steps
                    self.resident[name], budget = tensor.to(device), budget - tensor.nbytes

    @classmethod
    def for_training(cls, model: InjuryNet, data: SiteInputs, device: torch.device) -> "StudyBatches":
        """Batches for a training loop: with the reconstruction targets when the model has that head."""
        return cls(data, device, model.config.recon_size if model.config.recon_head else None)

    def __call__(self, index: Tensor) -> StudyBatch:
        device_index = copy_to_device(index, self.device)

        def take(name: str) -> Tensor | None:
            if name in self.resident:
                return self.resident[name].index_select(0, device_index)
            tensor = self.host[name]
            return None if tensor is None else copy_to_device(tensor[index], self.device)

        # Which images are real, from the host mask: on the device this would make the host wait.
        real = None if self.is_features else copy_to_device(
            self.host["mask"][index].flatten().nonzero().squeeze(1), self.device)
        return StudyBatch(take("inputs"), take("mask"), take("labels"), self.is_features, real, take("targets"),
                          take("biomech"), take("recon"))


def prepare_inputs(model: InjuryNet, site: SiteData, cache_dir: Path | None, device: torch.device,
                   batch_size: int = 32, ready: dict[str, Tensor] | None = None) -> SiteInputs:
    """The site's arrays as the model consumes them: with a frozen backbone, its features (from
    the feature cache in ``cache_dir``, else encoded; ``ready`` holds studies' features encoded
    already, see common/site_encoding.py)."""
    images = torch.from_numpy(site.images).unsqueeze(2)
    mask = torch.from_numpy(site.mask)
    labels = torch.from_numpy(site.labels)
    targets = torch.from_numpy(site.targets)
    biomech = torch.from_numpy(site.biomech) if site.biomech is not None else None
    if model.config.freeze != "frozen":
        return SiteInputs(images, mask, labels, False, images, targets, biomech)
    features = encode_cached(model, site, cache_dir, device, batch_size, ready)
    return SiteInputs(features, mask, labels, True, images, targets, biomech)


def encode_cached(model: InjuryNet, site: SiteData, cache_dir: Path | None, device: torch.device,
                  batch_size: int = 32, ready: dict[str, Tensor] | None = None) -> Tensor:
    """Raw backbone features (N, T, 2048) of a site, from the disk cache when present; else the
    studies in ``ready`` (by study id) are taken from it and the others encoded."""
    key = hashlib.sha256()
    key.update(frozen_backbone_hash(model).encode())
    key.update(memoryview(np.ascontiguousarray(site.images)).cast("B"))  # no copy of the site's images
    key.update(site.mask.tobytes())

    def compute() -> Tensor:
        return _encode_missing(model, site, device, batch_size, ready or {})

    if cache_dir is None:
        return compute()
    return load_or_compute(cache_dir / f"features-{key.hexdigest()[:24]}.pt", compute, "feature cache")


def _encode_missing(model: InjuryNet, site: SiteData, device: torch.device, batch_size: int,
                    ready: dict[str, Tensor]) -> Tensor:
    if len(set(site.studies)) != len(site.studies):
        ready = {}  # ids that repeat cannot say which row is which
    todo = [row for row, study in enumerate(site.studies) if study not in ready]
    if not ready:
        return encode(model, torch.from_numpy(site.images).unsqueeze(2), torch.from_numpy(site.mask), device,
                      batch_size)
    features = torch.zeros((len(site.studies), site.mask.shape[1], 2048))
    for row, study in enumerate(site.studies):
        if study in ready:
            features[row] = ready[study]
    if todo:
        rows = np.array(todo)
        features[rows] = encode(model, torch.from_numpy(site.images[rows]).unsqueeze(2),
                                torch.from_numpy(site.mask[rows]), device, batch_size)
    return features


# A frozen trunk's copy for each device it encodes on (see encoder_trunk), dropped with the trunk.
_TRUNK_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def encoder_trunk(model: InjuryNet, device: torch.device) -> tuple[torch.nn.Module, torch.dtype]:
    """The backbone as ``encode`` runs it on ``device``, and the dtype its inputs take.

    On a GPU: a copy in the mixed-precision dtype (bfloat16 where supported), channels-last.
    Autocast would cast every weight again in every batch (it caches the casts of trainable weights
    only, and a frozen trunk has none): at 64x64 on an H200 that made the autocast forward slower
    than float32 (``benchmarks/backbone.py``). A frozen trunk never changes, so its copy is made
    once per process and device; a trunk that trains is copied on each call. On a CPU: the trunk
    itself, in float32."""
    trunk = model.backbone
    if device.type != "cuda":
        return move_to(trunk, device).eval(), torch.float32
    copies = _TRUNK_COPIES.setdefault(trunk, {}) if trunk.freeze == "frozen" else {}
    key = str(torch.empty(0, device=device).device)
    if key not in copies:
        dtype = amp_dtype(device)
        copies[key] = copy.deepcopy(trunk).to(device, dtype).to(memory_format=torch.channels_last).eval()
    return copies[key], amp_dtype(device)


@torch.no_grad()
def encode(model: InjuryNet, images: Tensor, mask: Tensor, device: torch.device, batch_size: int = 32,
           progress: bool = True) -> Tensor:
    """Raw backbone features (N, T, 2048) of the real images (the mask's), batch by batch.

    On CUDA: the trunk's mixed-precision copy (``encoder_trunk``); each batch copied whole from
    pinned memory without blocking (one parallel host copy; the padding slots cross too, which costs
    less than gathering the real images on the host) and its real images gathered on the device, at
    positions found from the host mask. The features stay on the GPU until the end, so the loop
    never waits for the device. On a CPU the real images are gathered before the forward."""
    cuda = device.type == "cuda"
    trunk, dtype = encoder_trunk(model, device)
    chunks = []
    for start in progress_bar(range(0, len(images), batch_size), "encoding images", "batch",
                              enabled=progress):
        m = mask[start:start + batch_size]
        real = m.flatten().nonzero().squeeze(1)
        x = images[start:start + batch_size].flatten(0, 1)
        if cuda:
            x, real = copy_to_device(x, device), copy_to_device(real, device)
            x = x.index_select(0, real).to(dtype).contiguous(memory_format=torch.channels_last)
        else:
            x = x.index_select(0, real)
        flat = trunk(x).float()
        chunks.append(flat.new_zeros(m.numel(), flat.shape[-1]).index_copy_(0, real, flat).view(*m.shape, -1))
    return torch.cat(chunks).cpu() if chunks else torch.zeros((0, mask.shape[1], 2048))


def fit_feature_norm(model: InjuryNet, data: SiteInputs, train_index: np.ndarray, device: torch.device) -> None:
    """Site-local standardisation statistics from the training studies' real images."""
    if model.config.feature_norm != "site":
        return
    idx = torch.as_tensor(train_index)
    features = data.inputs[idx] if data.is_features else encode(model, data.inputs[idx], data.mask[idx], device)
    model.feature_norm.fit(features[data.mask[idx]].to(model.feature_norm.mean.device))


def forward(model: InjuryNet, batch: StudyBatch) -> InjuryOutput:
    if batch.is_features:
        return model.forward_features(batch.inputs, batch.mask, batch.biomech)
    return model.forward_features(model.encode(batch.inputs, batch.mask, batch.real), batch.mask, batch.biomech)


def autocast(device: torch.device):
    """Mixed precision on GPU only (bfloat16 where the GPU has it, else float16 with the loss
    scaler): on CPU autocast would slow the GRU down and change numerics (benchmarks/backbone.py
    measures the backbone alone)."""
    return torch.autocast("cuda", dtype=amp_dtype(device), enabled=device.type == "cuda")


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass
class Predictions:
    probs: Tensor  # (n, L)
    attention: Tensor  # (n, T)
    severity: Tensor | None  # (n,)
    reconstruction: Tensor | None  # (n, T, r, r)


@torch.no_grad()
def predict(model: InjuryNet, data: SiteInputs, index: np.ndarray, device: torch.device,
            batch_size: int = 64) -> Predictions:
    """Every output of the model for the given studies."""
    move_to(model, device).eval()
    batches = StudyBatches(data, device)
    parts: list[InjuryOutput] = []
    for start in range(0, len(index), batch_size):
        with autocast(device):
            parts.append(forward(model, batches(torch.as_tensor(index[start:start + batch_size]))))

    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        # one copy to the host per output: a copy per batch would make the host wait for each
        return None if not values or values[0] is None else torch.cat([v.float() for v in values]).cpu()

    return Predictions(torch.sigmoid(cat("logits")), cat("attention"), cat("severity"), cat("reconstruction"))


def image_sample(mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(study rows, image slots) of a fixed, evenly spaced sample of ``size`` real images (all of
    them when size is 0 or there are fewer): the image metrics' subsample, the same every round."""
    rows, slots = torch.nonzero(mask, as_tuple=True)
    if size and len(rows) > size:
        keep = torch.as_tensor(np.linspace(0, len(rows) - 1, size).round().astype(np.int64))
        rows, slots = rows[keep], slots[keep]
    return rows, slots


def evaluate_local(model: InjuryNet, data: SiteInputs, test_index: np.ndarray, device: torch.device,
                   config: EvalConfig, fid: FidFeatureExtractor | None = None,
                   with_fid: bool = True, min_studies_per_bin: int = 1) -> EvaluationStats:
    """Sufficient statistics of the site's test split: no per-study value leaves this function.
    ``with_fid`` False: no FID moments (the round does not compute FID, see ``fid-every``).
    ``min_studies_per_bin``: the site policy's k, which caps the histogram resolution."""
    fid_dim = config.fid_dim if model.config.recon_head else None
    if len(test_index) == 0:
        return EvaluationStats.empty(data.labels.shape[1], fid_dim, with_fid)
    index = torch.as_tensor(test_index)
    pred = predict(model, data, test_index, device)
    labels = data.labels[index]
    targets = data.targets[index].numpy() if data.targets is not None else np.full(len(index), np.nan)
    severity = pred.severity.numpy() if pred.severity is not None else None
    images = None
    if pred.reconstruction is not None:
        rows, slots = image_sample(data.mask[index], config.image_metrics_sample)
        real = data.images[index][rows, slots, 0]  # (k, H, W): the same images every round
        fake = upsample_reconstruction(pred.reconstruction[rows, slots], real.shape[-1])
        real_moments = fake_moments = None
        if with_fid:
            fid = fid or FidFeatureExtractor(model, config.fid_dim, config.fid_inception_weights, config.fid_image_size)
            real_features, fake_features = fid.real_and_fake(real, fake)
            real_moments, fake_moments = GaussianMoments.of(real_features), GaussianMoments.of(fake_features)
        images = ImageStats(len(real), float(psnr(fake, real).sum()), float(ssim(fake, real).sum()), real_moments,
                            fake_moments)
    return EvaluationStats(
        _classification_stats(pred.probs, labels, config, min_studies_per_bin),
        ErrorStats.from_predictions(pred.probs.numpy(), labels.numpy(), severity, targets),
        images,
        InceptionStats.from_probabilities(pred.probs.numpy()),
    )


def validation_stats(model: InjuryNet, data: SiteInputs, val_index: np.ndarray, device: torch.device,
                     config: EvalConfig, min_studies_per_bin: int = 1) -> ClassificationStats:
    """Sufficient statistics of the site's validation split: confusion counts, score histograms at
    the same policy-capped resolution rule as the test split's, and the loss sum. The centre
    chooses the round, stops early, calibrates and sets the threshold on their pooled sums."""
    if len(val_index) == 0:
        return ClassificationStats.empty(data.labels.shape[1])
    pred = predict(model, data, val_index, device)
    return _classification_stats(pred.probs, data.labels[torch.as_tensor(val_index)], config, min_studies_per_bin)


def subgroup_stats(model: InjuryNet, data: SiteInputs, subgroups: list[dict[str, str]], test_index: np.ndarray,
                   device: torch.device, config: EvalConfig, min_studies_per_bin: int,
                   min_count: int) -> dict[tuple[str, str], ClassificationStats]:
    """The test split's statistics per subgroup the site may report (common/metrics/subgroup_stats.py):
    ``subgroups`` holds each study's categories (``SiteData.subgroups``), ``min_count`` the site
    policy's min-reported-count."""
    if len(test_index) < max(min_count, 1) or not subgroups:
        return {}  # no subgroup can reach the minimum: no second pass over the test split
    pred = predict(model, data, test_index, device)
    return site_subgroup_stats(pred.probs.numpy(), data.labels[torch.as_tensor(test_index)].numpy(),
                               [subgroups[i] for i in test_index], config.threshold, config.eval_bins,
                               min_studies_per_bin, min_count)


def _classification_stats(probs: Tensor, labels: Tensor, config: EvalConfig,
                          min_studies_per_bin: int) -> ClassificationStats:
    """Counts, histograms (``histogram_bins`` of the split's size, capped by the site's k) and BCE sum."""
    loss_sum = F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7).double(), labels.double(), reduction="sum").item()
    return ClassificationStats.from_predictions(probs.numpy(), labels.numpy(), loss_sum, config.threshold,
                                                histogram_bins(len(probs), config.eval_bins, min_studies_per_bin))
