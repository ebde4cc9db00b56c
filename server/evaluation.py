"""What the server measures itself: the model's efficiency figures (once per run) and, when it
holds a validation set of its own, the same catalogue computed centrally on it every round."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch.utils.flop_counter import FlopCounterMode

from common.config import RunConfig
from common.exchange import load_array_record
from common.inference import encode, evaluate_local, fit_feature_norm, pick_device
from common.metrics.catalogue import MetricValue, compute_catalogue
from common.metrics.features import FidFeatureExtractor
from common.model import InjuryNet
from common.private_norm import PublicNorm, public_clip
from common.site_encoding import load_encoded_site


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


@torch.no_grad()
def measure_efficiency(model: InjuryNet, config: RunConfig, repeats: int = 5) -> dict[str, MetricValue]:
    """Parameters, GFLOPs and inference time for one study of seq-len images (Tables 3-4)."""
    device = pick_device()
    model = model.to(device).eval()
    size, steps = config.model.image_size, config.model.seq_len
    images = torch.rand(1, steps, 1, size, size, device=device)
    mask = torch.ones(1, steps, dtype=torch.bool, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(images, mask)
    model(images, mask)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(images, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    study = f"one study of {steps} images at {size}x{size}"
    return {
        "params_total_m": MetricValue(total / 1e6),
        "params_trainable_m": MetricValue(trainable / 1e6, note="the only parameters exchanged"),
        "gflops_per_study": MetricValue(counter.get_total_flops() / 1e9,
                                        note=f"torch.utils.flop_counter, {study}"),
        "inference_ms_per_study": MetricValue(statistics.median(times),
                                              note=f"median of {repeats}, {study}, on {_device_name(device)}"),
    }


def central_cache_dir(run_root: Path) -> Path:
    """Where the centre keeps its validation clinic's caches: beside its run directories."""
    return run_root.expanduser() / ".cache" / "server-validation"


def public_feature_norm(central: "CentralValidation") -> PublicNorm:
    """The standardisation statistics of the centre's own clinic (fitted on its images, no labels)
    and the clip norm of a site's DP release from its studies: what DP sites standardise with,
    public to every site, so outside every site's privacy budget."""
    norm = central.model.feature_norm
    mean, inv_std = norm.mean.detach().cpu().clone(), norm.inv_std.detach().cpu().clone()
    inputs = central.inputs
    features = inputs.inputs if inputs.is_features else encode(central.model, inputs.inputs, inputs.mask,
                                                               central.device)
    return PublicNorm(mean, inv_std, public_clip(features.cpu(), inputs.mask.cpu(), mean, inv_std))


class CentralValidation:
    """The server's own labelled studies (a site-layout folder), all used as a test set.

    ``cache_dir`` keeps the decoded studies and their backbone features between runs, as a site's
    state folder does: the clinic does not change between the centre's runs, and reading and
    encoding it again cost more than the rounds of a short run."""

    label = "server-validation"

    def __init__(self, config: RunConfig, path: Path, model: InjuryNet, cache_dir: Path | None = None) -> None:
        self.config = config
        self.model = model
        self.device = pick_device()
        self.site, self.inputs = load_encoded_site(model, path, config.data, config.model.num_labels, self.device,
                                                   cache_dir)
        self.index = np.arange(len(self.site.studies))
        # Standardisation statistics from the validation images themselves (no labels used).
        fit_feature_norm(model, self.inputs, self.index, self.device)
        self.fid = FidFeatureExtractor(model, config.eval.fid_dim, config.eval.fid_inception_weights,
                                       config.eval.fid_image_size)

    def evaluate(self, arrays: ArrayRecord, with_fid: bool = True) -> dict[str, MetricValue]:
        load_array_record(self.model, arrays)
        if self.config.model.freeze != "frozen":
            fit_feature_norm(self.model, self.inputs, self.index, self.device)
        # The centre's own data: eval-bins as configured, no site's k applies (0).
        stats = evaluate_local(self.model, self.inputs, self.index, self.device, self.config.eval, self.fid, with_fid,
                               min_studies_per_bin=0)
        return compute_catalogue(stats, self.config.model.names(), self.fid.name)
