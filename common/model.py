"""The ResNet50-BiGRU-attention network for sports-injury prediction (Xiao et al. 2023).

    images (B, T, C, H, W) --ResNet50 trunk--> 2048-d per image --standardise--> Linear --(+ biomech)-->
    BiGRU --scaled dot-product attention pool (Eq. 6)--> injury logits (B, L)

Only the trainable part travels between server and sites (see ``common.exchange``); the frozen
backbone is identified by a hash that both sides compare. The batch dimension is one study in
every trainable module, so per-sample gradients (DP-SGD) are per study.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from urllib.error import URLError

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import ResNet50_Weights, resnet50

from common.config import ModelConfig, RunConfig
from common.reason_codes import ReasonCodeError

log = logging.getLogger(__name__)

FEATURE_DIM = 2048
# ImageNet statistics: torchvision's ResNet50 weights expect inputs normalised this way.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(ReasonCodeError, RuntimeError):
    """The configured backbone weights cannot be loaded."""

    code = "backbone-weights-unavailable"


class BackboneMismatchError(ReasonCodeError, RuntimeError):
    """The frozen backbone differs between server and site."""

    code = "backbone-mismatch"


@dataclass
class InjuryOutput:
    logits: Tensor  # (B, L) injury logits
    attention: Tensor  # (B, T) weight of each image in the pooled study vector; 0 on padding
    severity: Tensor | None = None  # (B,) predicted severity, when the head is on
    reconstruction: Tensor | None = None  # (B, T, r, r) images rebuilt from their features, in [0, 1]


class ResNetTrunk(nn.Module):
    """torchvision's ResNet50 without its classifier: (N, C, H, W) in [0, 1] -> (N, 2048).

    BatchNorm layers always run in eval mode: running statistics are buffers, not parameters,
    so they would silently diverge between sites if they were updated locally.
    """

    def __init__(self, freeze: str = "frozen", net: nn.Module | None = None) -> None:
        super().__init__()
        if net is None:
            net = resnet50(weights=None)
            net.fc = nn.Identity()
        self.net = net
        self.freeze = freeze
        self.frozen_hash: tuple | None = None  # frozen_backbone_hash's last digest, with what it covered
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        trainable_prefixes = {"frozen": (), "layer4": ("layer4.",), "full": ("",)}[freeze]
        for name, param in self.net.named_parameters():
            param.requires_grad = any(name.startswith(p) for p in trainable_prefixes)

    def train(self, mode: bool = True) -> "ResNetTrunk":
        if self.freeze == "frozen":  # nothing in it trains: it stays in eval mode, without a walk over
            self.training = mode     # its 160 modules on every train()/eval() of the model (~3 ms on a CPU)
            if self.net.training:
                self.net.eval()
            return self
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:  # grayscale studies: the same channel thrice, as a view
            images = images.expand(-1, 3, -1, -1)
        x = (images - self.mean) / self.std
        n = self.net
        # The frozen stages need no autograd graph (saves memory and time), unless the caller wants
        # gradients with respect to the images themselves (saliency maps).
        to_input = torch.is_grad_enabled() and images.requires_grad
        with torch.set_grad_enabled(to_input or (torch.is_grad_enabled() and self.freeze == "full")):
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            x = n.layer3(n.layer2(n.layer1(x)))
        with torch.set_grad_enabled(to_input or (torch.is_grad_enabled() and self.freeze != "frozen")):
            x = n.layer4(x)
        return torch.flatten(n.avgpool(x), 1)


class FeatureStandardizer(nn.Module):
    """Per-feature standardisation of backbone features with fixed, site-local statistics.

    A frozen backbone (random or ImageNet) gives features dominated by one common vector; the
    differences between images are tiny next to it and a small head cannot learn from them.
    Standardising with the statistics of the site's own training images (computed once, never
    sent) makes them usable, and also absorbs part of a scanner's intensity shift, like FedBN's
    local statistics.
    """

    def __init__(self, dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: Tensor) -> None:
        """Set the statistics from (N, dim) features of training images. A feature that (almost)
        never varies there (e.g. a dead ReLU channel) carries no information and is zeroed, so a
        tiny deviation at test time cannot be blown up by a near-zero standard deviation."""
        std = features.std(0, unbiased=False)
        floor = 0.01 * std.median().clamp_min(1e-12)
        self.mean.copy_(features.mean(0))
        self.inv_std.copy_(torch.where(std > floor, 1.0 / std.clamp_min(1e-12), torch.zeros_like(std)))

    def forward(self, features: Tensor) -> Tensor:
        return (features - self.mean) * self.inv_std


class LinearGRU(nn.Module):
    """One GRU direction with PyTorch's gate equations and nn.GRU's parameter layout.

    Why not nn.GRU: Opacus cannot compute its per-sample gradients, and its DPGRU replacement
    runs a hooked Linear per time step (~35x slower than no DP). Here the input projection of
    all steps is one matmul, and the per-sample gradients of all four tensors are computed in one
    einsum each (``_per_sample_gradients``, registered with Opacus below) from the gate
    gradients that tensor hooks record during backward. Masked steps keep the previous state and
    output zero, so padding never reaches a real step (the same result as a packed sequence).
    """

    def __init__(self, input_size: int, hidden_size: int, reverse: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.reverse = reverse
        bound = 1.0 / math.sqrt(hidden_size)  # nn.GRU's initialisation
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size).uniform_(-bound, bound))
        self._trace: dict | None = None

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, _ = x.shape
        gates_x = F.linear(x, self.weight_ih, self.bias_ih)  # (B, T, 3H)
        record = torch.is_grad_enabled() and self.weight_hh.requires_grad
        trace: dict = {"x": x, "h_prev": [None] * t, "d_gates_h": [None] * t, "d_gates_x": None}
        if record and gates_x.requires_grad:
            gates_x.register_hook(lambda g: trace.__setitem__("d_gates_x", g))
        h = x.new_zeros(b, self.hidden_size)
        outputs: list[Tensor] = [x.new_zeros(0)] * t
        for step in (range(t - 1, -1, -1) if self.reverse else range(t)):
            gates_h = F.linear(h, self.weight_hh, self.bias_hh)
            if record and gates_h.requires_grad:
                trace["h_prev"][step] = h.detach()
                gates_h.register_hook(lambda g, step=step: trace["d_gates_h"].__setitem__(step, g))
            r_x, z_x, n_x = gates_x[:, step].chunk(3, dim=-1)
            r_h, z_h, n_h = gates_h.chunk(3, dim=-1)
            r = torch.sigmoid(r_x + r_h)
            z = torch.sigmoid(z_x + z_h)
            n = torch.tanh(n_x + r * n_h)
            keep = mask[:, step].unsqueeze(-1).to(x.dtype)
            h = keep * ((1 - z) * n + z * h) + (1 - keep) * h
            outputs[step] = h * keep
        output = torch.stack(outputs, dim=1)
        if record and output.requires_grad:
            output.register_hook(lambda g: trace.__setitem__("d_output", g))
        self._trace = trace if record else None
        return output

    def _per_sample_gradients(self, output_grad: Tensor | None = None) -> dict[nn.Parameter, Tensor]:
        """Per-study gradients from the recorded gate gradients. ``output_grad``: the gradient of
        this module's output as the caller sees it; Opacus scales it by the batch size for a
        mean-reduced loss, and the recorded gradients get the same factor."""
        trace = self._trace
        if trace is None or trace["d_gates_x"] is None or any(g is None for g in trace["d_gates_h"]):
            raise RuntimeError("LinearGRU per-sample gradients need a backward pass through the recurrence")
        scale: Tensor | float = 1.0
        recorded = trace.get("d_output")
        if output_grad is not None and recorded is not None:
            # torch.where, not an if: reading the tensor on the host would wait for a GPU every step
            denominator = (recorded * recorded).sum()
            positive = denominator > 0
            scale = torch.where(positive, (output_grad * recorded).sum() / torch.where(positive, denominator, 1.0), 1.0)
        d_x, x = trace["d_gates_x"] * scale, trace["x"].detach().to(trace["d_gates_x"].dtype)
        d_h = torch.stack(trace["d_gates_h"], dim=1) * scale  # (B, T, 3H)
        h_prev = torch.stack(trace["h_prev"], dim=1).to(d_h.dtype)  # (B, T, H)
        self._trace = None
        return {self.weight_ih: torch.einsum("bto,bti->boi", d_x, x), self.bias_ih: d_x.sum(1),
                self.weight_hh: torch.einsum("bto,bti->boi", d_h, h_prev), self.bias_hh: d_h.sum(1)}


class BiGRU(nn.Module):
    """h_t = [GRU_forward(x_t, h_{t-1}); GRU_backward(x_t, h_{t+1})] over the real steps."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.forward_gru = LinearGRU(input_size, hidden_size)
        self.backward_gru = LinearGRU(input_size, hidden_size, reverse=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.cat([self.forward_gru(x, mask), self.backward_gru(x, mask)], dim=-1)


class AttentionPool(nn.Module):
    """Scaled dot-product attention, softmax(Q K^T / sqrt(d)) V (Eq. 6), pooling a sequence.

    One query per study, projected from the masked mean of the sequence; keys and values from
    every step. All projections are nn.Linear, which Opacus handles per sample.
    """

    def __init__(self, in_dim: int, attn_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_dim, attn_dim)
        self.key = nn.Linear(in_dim, attn_dim)
        self.value = nn.Linear(in_dim, in_dim)
        self.scale = 1.0 / math.sqrt(attn_dim)

    def forward(self, seq: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        maskf = mask.unsqueeze(-1).to(seq.dtype)
        mean = (seq * maskf).sum(1) / maskf.sum(1).clamp_min(1.0)
        q = self.query(mean).unsqueeze(1)  # (B, 1, d)
        k = self.key(seq)  # (B, T, d)
        scores = (q * k).sum(-1) * self.scale  # (B, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        pooled = (weights.unsqueeze(-1) * self.value(seq)).sum(1)
        return pooled, weights


class ReconstructionDecoder(nn.Module):
    """Rebuilds each image at size x size from its projected feature (two Linear layers).

    Linear layers on (B, T, d) keep the batch dimension = one study, so DP-SGD per-sample
    gradients stay per study; the reconstruction is upsampled (no parameters) for PSNR/SSIM.
    """

    def __init__(self, in_dim: int, size: int, hidden: int = 256) -> None:
        super().__init__()
        self.size = size
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, size * size)

    def forward(self, features: Tensor) -> Tensor:
        b, t, _ = features.shape
        return torch.sigmoid(self.out(torch.relu(self.hidden(features)))).view(b, t, self.size, self.size)


class SequenceHead(nn.Module):
    """Projection -> (+ biomechanical features) -> BiGRU -> attention pool -> classifier,
    plus the optional severity and reconstruction heads."""

    def __init__(self, config: ModelConfig, in_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, config.proj_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = BiGRU(config.proj_dim + config.biomech_features, config.gru_hidden)
        self.attention = AttentionPool(2 * config.gru_hidden, config.attn_dim)
        self.classifier = nn.Linear(2 * config.gru_hidden, config.num_labels)
        self.severity = nn.Linear(2 * config.gru_hidden, 1) if config.severity_head else None
        self.decoder = ReconstructionDecoder(config.proj_dim, config.recon_size) if config.recon_head else None
        self.biomech_features = config.biomech_features

    def forward(self, features: Tensor, mask: Tensor, biomech: Tensor | None = None) -> InjuryOutput:
        check_mask(mask)
        projected = torch.relu(self.project(features))
        reconstruction = self.decoder(projected) if self.decoder is not None else None
        x = self.dropout(projected)
        if self.biomech_features:
            if biomech is None or biomech.shape[-1] != self.biomech_features:
                raise ValueError(f"model expects {self.biomech_features} biomechanical features per step")
            x = torch.cat([x, biomech.to(x.dtype)], dim=-1)
        elif biomech is not None:
            raise ValueError("biomechanical features given but the model was built with biomech-features = 0")
        seq = self.gru(x, mask)
        pooled, weights = self.attention(seq, mask)
        pooled = self.dropout(pooled)
        severity = self.severity(pooled).squeeze(-1) if self.severity is not None else None
        return InjuryOutput(self.classifier(pooled), weights, severity, reconstruction)


def upsample_reconstruction(reconstruction: Tensor, size: int) -> Tensor:
    """(..., r, r) -> (..., size, size), bilinear, for comparison with the input images."""
    lead = reconstruction.shape[:-2]
    flat = reconstruction.reshape(-1, 1, *reconstruction.shape[-2:])
    up = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return up.view(*lead, size, size)


def check_mask(mask: Tensor) -> None:
    """A mask (B, T) must mark a prefix of each study (real images first, then padding), with at
    least one real image. Checked where the mask is on the host; on a GPU the check would make the
    host wait for the device at every step, and the masks there come through
    ``common.inference.StudyBatches``, which checks the site's whole mask on the host once."""
    if mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor (B, T)")
    if mask.device.type != "cpu":
        return
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError("every study needs at least one image")
    expected = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(mask, expected):
        raise ValueError("mask must mark a prefix of each sequence (real images first, then padding)")


class InjuryNet(nn.Module):
    """ResNet50 trunk + site feature standardisation + sequence head."""

    def __init__(self, config: ModelConfig, backbone: "ResNetTrunk | None" = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else ResNetTrunk(config.freeze)
        self.feature_norm = FeatureStandardizer(FEATURE_DIM)
        self.head = SequenceHead(config)

    def encode(self, images: Tensor, mask: Tensor, real: Tensor | None = None) -> Tensor:
        """(B, T, C, H, W) -> (B, T, 2048) raw backbone features; only real images are encoded.
        ``real``: the positions of the real images in the flattened (B * T), when the caller found
        them on the host (on a GPU, finding them from the mask makes the host wait for the device)."""
        if real is None:
            real = mask.flatten().nonzero().squeeze(1)
        flat = self.backbone(images.flatten(0, 1).index_select(0, real))
        return flat.new_zeros(mask.numel(), flat.shape[-1]).index_copy(0, real, flat).view(*mask.shape, -1)

    def forward_features(self, features: Tensor, mask: Tensor, biomech: Tensor | None = None) -> InjuryOutput:
        """The trainable path from raw backbone features (used with cached features)."""
        if self.config.feature_norm == "site":
            features = self.feature_norm(features) * mask.unsqueeze(-1)
        return self.head(features, mask, biomech)

    def forward(self, images: Tensor, mask: Tensor, biomech: Tensor | None = None) -> InjuryOutput:
        return self.forward_features(self.encode(images, mask), mask, biomech)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """torch's global generator (and a CUDA device's) seeded for the block and restored after it:
    what the block draws (initial weights, dropout masks) does not depend on what the process drew
    before, and the process draws after it as if the block had not run."""
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def build_model(config: ModelConfig) -> InjuryNet:
    """The model with its backbone weights loaded; the head is initialised from ``config.seed``
    so that the server's initial global model is reproducible.

    A frozen backbone is shared by every model built in this process for the same weights: no
    code path changes it (it has no trainable parameter and always runs in eval mode), and a
    process that serves several sites (a simulation worker, a study) would otherwise build and
    hold one 94 MB ResNet50 per site."""
    shared = frozen_trunk(config.backbone_weights, config.seed) if config.freeze == "frozen" else None
    with seeded(config.seed):
        model = InjuryNet(config, backbone=shared)
    if shared is None:
        model.backbone.net.load_state_dict(load_backbone(config.backbone_weights, config.seed))
    return model


@lru_cache(maxsize=8)
def trainable_parameter_count(config: ModelConfig) -> int:
    """How many parameters the model ``config`` builds would train, counted on the meta device: no
    memory, no weights file read (a site checks this before it builds anything)."""
    with torch.device("meta"):
        model = InjuryNet(config, backbone=ResNetTrunk(config.freeze, net=_empty_trunk()))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@lru_cache(maxsize=2)
def frozen_trunk(weights: str, seed: int) -> "ResNetTrunk":
    # The loaded trunk itself, whose tensors are the cached state: nothing changes a frozen trunk.
    return ResNetTrunk("frozen", net=loaded_trunk(weights, seed)).eval()


def _empty_trunk() -> nn.Module:
    """A ResNet50 trunk (no fc) on the meta device, to be given real tensors with
    ``load_state_dict(..., assign=True)``: a random init of 23.5 M parameters that is overwritten
    anyway costs ~0.2 s, which a fresh site process would pay on every message."""
    with torch.device("meta"):
        net = resnet50(weights=None)
    net.fc = nn.Identity()
    return net


def load_backbone(weights: str, seed: int) -> dict[str, Tensor]:
    """The ResNet50 trunk state for ``backbone-weights`` (the cached trunk's tensors)."""
    return loaded_trunk(weights, seed).state_dict()


@lru_cache(maxsize=2)
def loaded_trunk(weights: str, seed: int) -> nn.Module:
    """The ResNet50 trunk (no fc) with the weights of ``backbone-weights``, checked to fit (cached
    per process: reading 94 MB and building the trunk once per site process, not once per round)."""
    if weights == "none":
        log.warning("backbone-weights = none: the ResNet50 is randomly initialised (seed %d). "
                    "Use 'imagenet' or a .pth file for real data.", seed)
        with seeded(seed):
            net = resnet50(weights=None)
        state = net.state_dict()
    elif weights == "imagenet":
        state = _imagenet_state()
    else:
        state = _file_state(Path(weights).expanduser())
    # float32 as the model computes (assign keeps a file's dtype, where copying would cast it)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith("fc.")}
    trunk = _empty_trunk()
    try:
        missing, unexpected = trunk.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise BackboneWeightsError(f"backbone-weights {weights!r} does not fit a ResNet50: "
                                   f"{str(exc).splitlines()[-1].strip()}") from exc
    if missing or unexpected:
        raise BackboneWeightsError(
            f"backbone-weights {weights!r} is not a ResNet50 state dict: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    return trunk


def _imagenet_state() -> dict[str, Tensor]:
    spec = ResNet50_Weights.IMAGENET1K_V2
    try:
        return spec.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as exc:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        filename = Path(spec.url).name
        raise BackboneWeightsError(
            f"ImageNet ResNet50 weights are not cached and cannot be downloaded here ({type(exc).__name__}). "
            f"Copy {filename} (from {spec.url}, fetched on a machine with internet) into {hub}/, "
            f"or set backbone-weights to the path of a local ResNet50 .pth state dict.") from exc


def _file_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(
            f"backbone-weights file {path} not found: give 'none', 'imagenet' or the path of a ResNet50 .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and tensor errors all mean "not a usable file"
        raise BackboneWeightsError(f"backbone-weights file {path} cannot be read as a state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"backbone-weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def tensor_hash(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_backbone_hash(model: InjuryNet) -> str:
    """Hash of every backbone tensor that does not travel: frozen parameters and all buffers.

    The policy is part of the hash, so a site fine-tuning layer4 never pairs with a frozen server.
    """
    trunk = model.backbone
    params = dict(trunk.net.named_parameters())
    frozen = {name: t for name, t in trunk.net.state_dict().items()
              if name not in params or not params[name].requires_grad}
    # Hashing 94 MB takes ~0.07 s, which a site process would pay on every message. The digest is
    # kept with the tensors' identities and version counters (an in-place write, such as a
    # load_state_dict, bumps them), so it is reused only for the very same, unchanged tensors.
    identity = tuple((t.data_ptr(), t._version) for t in frozen.values())
    if trunk.frozen_hash is not None and trunk.frozen_hash[0] == (model.config.freeze, identity):
        return trunk.frozen_hash[1]
    digest = f"{model.config.freeze}:{tensor_hash(frozen)[:32]}"
    trunk.frozen_hash = ((model.config.freeze, identity), digest)
    return digest


EXPORT_FORMAT = "clinicfl-model/1"


def load_exported(path: Path) -> tuple[InjuryNet, dict]:
    """A model written by ``clinicfl-server export``: no backbone weights file needed (they are in
    it), and its backbone hash is checked. Returns the model (eval mode) and the file's metadata."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a clinicfl model export ({EXPORT_FORMAT})")
    config = RunConfig.from_mapping(payload["config"])
    with torch.random.fork_rng(devices=[]):
        model = InjuryNet(replace(config.model, backbone_weights="none"))
    model.load_state_dict(payload["state_dict"])
    check_backbone_hash(payload["backbone-hash"], frozen_backbone_hash(model))
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.eval(), meta


def check_backbone_hash(expected: str, actual: str) -> None:
    if expected != actual:
        raise BackboneMismatchError(
            f"frozen backbone differs from the server's (server {expected}, site {actual}): "
            "check backbone-weights, freeze and seed in the run config and the weights file at this site")
