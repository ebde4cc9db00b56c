"""A site's loops on its device: how often each step makes the host wait for the device, and the
training rate, side by side with the naive batches (blocking copies, real images found on the device).

    .venv/bin/python -m benchmarks.device_path [--device cpu|cuda] [--out runs/benchmarks/device_path.json]

- waits per step: host-device synchronisations per step (CUDA's sync debug mode reports each one)
  of ``encode``, ``train_local`` on cached features and on images (the backbone's layer4 trained),
  ``predict`` and a DP-SGD round (``train_private``). Each is counted from two calls of different
  lengths, so what a call does once (copying the site's inputs to the device, reading the loss at
  the end) is not counted per step. Where each wait came from is listed (file:line:function).
- train rate: studies/s of ``train_local``, with the site's batches (``StudyBatches``) against the
  naive batches, in the same run.

On a CPU there is no host-device wait: those figures are reported as not available, and only the
rates are measured.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from benchmarks import write_result
from common.config import DataConfig, EvalConfig, FeatureNorm, FederationConfig, ModelConfig, PrivacyConfig, \
    RunConfig, SharedConfig, TrainConfig
from common.inference import SiteInputs, StudyBatch, StudyBatches, encode, predict
from common.model import build_model
from common.training import train_local

PROJECT_DIRS = ("/common/", "/client/", "/benchmarks/")


class NaiveBatches(StudyBatches):
    """The loop as a plain recipe writes it: each batch gathered on the host and copied with
    blocking copies, the real images found from the mask on the device."""

    def __init__(self, data: SiteInputs, device: torch.device, recon_size: int | None = None) -> None:
        super().__init__(data, device, recon_size)
        self.resident = {}

    def __call__(self, index: torch.Tensor) -> StudyBatch:
        def take(name: str) -> torch.Tensor | None:
            tensor = self.host[name]
            return None if tensor is None else tensor[index].to(self.device)

        mask = take("mask")
        real = None if self.is_features else mask.flatten().nonzero().squeeze(1)
        return StudyBatch(take("inputs"), mask, take("labels"), self.is_features, real, take("targets"),
                          take("biomech"), take("recon"))


class WaitCounter:
    """Counts CUDA synchronisations while active, with the project line each one came from."""

    def __init__(self) -> None:
        self.count, self.sources = 0, Counter()

    @contextmanager
    def active(self) -> Iterator[None]:
        def record(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" not in str(message):
                return
            self.count += 1
            frames = [f for f in traceback.extract_stack()[:-1] if any(d in f.filename for d in PROJECT_DIRS)
                      and not f.filename.endswith("device_path.py")]
            where = frames[-1] if frames else None
            self.sources[f"{where.filename.rsplit('/', 2)[-2]}/{where.filename.rsplit('/', 1)[-1]}:{where.lineno}:"
                         f"{where.name}" if where else "outside the project"] += 1

        torch.cuda.synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")


def waits_per_step(run: Callable[[int], int], short: int, long: int) -> dict[str, Any]:
    """Syncs per step from two calls: ``run(size)`` does the work and returns its number of steps."""
    run(short)  # warm-up: lazy initialisation (cuBLAS handles, autotuning) syncs once
    counts = []
    sources: Counter = Counter()
    for size in (short, long):
        counter = WaitCounter()
        with counter.active():
            steps = run(size)
        counts.append((counter.count, steps))
        sources.update(counter.sources)
    (waits_short, steps_short), (waits_long, steps_long) = counts
    # A one-off wait in the shorter call (a lazy initialisation) can make the difference negative.
    per_step = max(0.0, (waits_long - waits_short) / max(steps_long - steps_short, 1))
    return {"waits_per_step": round(per_step, 3),
            "waits_in_calls": [waits_short, waits_long], "steps_in_calls": [steps_short, steps_long],
            "where": dict(sources.most_common(8))}


def site_inputs(studies: int, slices: int, image_size: int, features: bool) -> SiteInputs:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(studies, slices, 1, image_size, image_size, generator=generator)
    mask = torch.ones(studies, slices, dtype=torch.bool)
    mask[::3, slices - 2:] = False  # some shorter studies, as real sites have
    labels = (torch.rand(studies, 1, generator=generator) > 0.5).float()
    targets = torch.rand(studies, generator=generator) * 10
    targets[::4] = float("nan")
    inputs = torch.randn(studies, slices, 2048, generator=generator) * mask.unsqueeze(-1) if features else images
    return SiteInputs(inputs, mask, labels, features, images, targets)


def timed(device: torch.device, work: Callable[[], Any]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--studies", type=int, default=256, help="studies of the cached-features site")
    parser.add_argument("--image-studies", type=int, default=32, help="studies of the site trained on images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/benchmarks/device_path.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = ModelConfig(SharedConfig(image_size=args.image_size, seq_len=args.slices))
    train = TrainConfig(config.shared)
    frozen = build_model(config)
    partial = build_model(replace(config, freeze="layer4"))
    cached = site_inputs(args.studies, args.slices, args.image_size, True)
    raw = site_inputs(args.image_studies, args.slices, args.image_size, False)
    everyone = np.arange(args.studies)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "site": f"{args.studies} studies of cached features, {args.image_studies} of images; {args.slices} x "
                f"{args.image_size}x{args.image_size} images each, batch {train.batch_size}"}

    def epochs(model, data, n: int, batches_type: type[StudyBatches] = StudyBatches) -> Callable[[], Any]:
        return lambda: train_local(model, data, np.arange(len(data.mask)), replace(train, local_epochs=n), device,
                                   batches_type=batches_type)

    # Rates: the site's batches against the naive ones, interleaved, best of three.
    rates: dict[str, dict[str, float]] = {}
    for name, model, data in (("cached_features", frozen, cached), ("images_layer4_trained", partial, raw)):
        epochs(model, data, 1)()  # warm-up
        best = {"site_batches": math.inf, "naive_batches": math.inf}
        for _ in range(3):
            best["site_batches"] = min(best["site_batches"], timed(device, epochs(model, data, args.epochs)))
            best["naive_batches"] = min(best["naive_batches"],
                                        timed(device, epochs(model, data, args.epochs, NaiveBatches)))
        studies = args.epochs * len(data.mask)
        rates[name] = {f"{arm}_studies_per_s": round(studies / seconds, 1) for arm, seconds in best.items()}
        rates[name]["site_vs_naive"] = round(best["naive_batches"] / best["site_batches"], 2)
    result["train_rate"] = rates

    if not cuda:
        result["waits_per_step"] = "not available: a CPU has no host-device synchronisation to count"
        write_result(args.out, result)
        return

    waits: dict[str, Any] = {}

    def train_steps(model, data, batches_type: type[StudyBatches] = StudyBatches) -> Callable[[int], int]:
        def run(n: int) -> int:
            train_local(model, data, np.arange(len(data.mask)), replace(train, local_epochs=n), device,
                        batches_type=batches_type)
            return n * math.ceil(len(data.mask) / train.batch_size)
        return run

    waits["train_local, cached features"] = waits_per_step(train_steps(frozen, cached), 1, 3)
    waits["train_local, images (layer4 trained)"] = waits_per_step(train_steps(partial, raw), 1, 3)
    waits["train_local, cached features, naive batches"] = waits_per_step(train_steps(frozen, cached, NaiveBatches),
                                                                          1, 3)

    def encode_steps(n: int) -> int:
        encode(frozen, raw.images[:n], raw.mask[:n], device, batch_size=1)
        return n

    waits["encode"] = waits_per_step(encode_steps, max(1, args.image_studies // 4), args.image_studies)

    def predict_steps(n: int) -> int:
        predict(frozen, cached, everyone[:n], device, batch_size=16)
        return math.ceil(n / 16)

    waits["predict"] = waits_per_step(predict_steps, 32, 128)
    waits["train_private (DP-SGD)"] = dp_waits(frozen, cached, device, train)
    result["against_cpu"] = against_cpu(config, raw, device, train)
    result["waits_per_step"] = waits
    result["no_wait_in_the_inner_loops"] = all(
        w["waits_per_step"] == 0 for k, w in waits.items() if "naive" not in k and "DP" not in k)
    write_result(args.out, result)


def against_cpu(config: ModelConfig, data: SiteInputs, device: torch.device, train: TrainConfig) -> dict[str, Any]:
    """The same features and the same training on the device (mixed precision) and on the CPU
    (float32). Dropout draws from the global generator, so the losses agree in size, not exactly."""
    cpu = torch.device("cpu")
    outcome: dict[str, Any] = {}
    model = build_model(config)
    on_device = encode(model, data.images, data.mask, device)
    on_cpu = encode(model, data.images, data.mask, cpu)
    outcome["encode_relative_difference"] = round(float((on_device - on_cpu).norm() / on_cpu.norm()), 4)
    features = replace(data, inputs=on_cpu, is_features=True)
    losses = {}
    for where in (device, cpu):
        model = build_model(config)  # the same seed: the same head
        losses[where.type] = train_local(model, features, np.arange(len(data.mask)), replace(train, local_epochs=5),
                                         where).loss
    outcome["train_loss_5_epochs"] = {k: round(v, 4) for k, v in losses.items()}
    return outcome


def dp_waits(model, data: SiteInputs, device: torch.device, train: TrainConfig) -> dict[str, Any]:
    from client.privacy import PrivacyLedger, SitePrivacy, reserve_round, train_private

    units = [np.array([i]) for i in range(len(data.mask))]

    def run(n: int) -> int:
        # The DP step itself, without standardisation (its DP release is a one-off per run, not a step).
        model_config = replace(model.config, feature_norm=FeatureNorm.NONE)
        config = RunConfig(model_config, DataConfig(model.config.shared), replace(train, local_epochs=n), EvalConfig(),
                           PrivacyConfig(dp_enabled=True, dp_noise_multiplier=1.0), FederationConfig())
        budget = SitePrivacy(1e6, 1e-5, 1.0, config.privacy.dp_accountant)
        charge = reserve_round(PrivacyLedger(budget.accountant), config, budget, len(units))
        train_private(model, data, units, config, budget, charge, device)
        return charge.steps

    return waits_per_step(run, 1, 3)


if __name__ == "__main__":
    main()
