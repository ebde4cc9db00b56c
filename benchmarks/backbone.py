"""The backbone's forward rate: float32 against bfloat16, and a site's encode step against the
pure forward, side by side on one device.

    .venv/bin/python -m benchmarks.backbone [--device cpu|cuda] [--out runs/benchmarks/backbone.json]

- pure forward: the frozen ResNet50 trunk on a resident batch, in a loop. On CUDA three ways, and
  the fastest is the ceiling: float32; autocast (bfloat16 where supported), which casts every
  frozen weight again in each batch; the trunk's bfloat16 copy that the sites encode with;
- encode step: ``common.inference.encode`` as a site runs it over its studies (host tensors, padding
  masks, per-batch copies to the device, features back on the host); on CUDA it uses the trunk's
  low-precision copy, channels-last and pinned memory. The goal is an encode rate of at least 70%
  of the ceiling;
- on CPU, the pure forward with bfloat16 autocast against float32 (the sites use float32 on CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import write_result
from common.config import ModelConfig, SharedConfig
from common.inference import amp_dtype, encode, encoder_trunk
from common.model import build_model


def _rate(step, images: int, device: torch.device, seconds: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += images
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def best_rates(steps: dict[str, tuple], device: torch.device, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images/s of each ``name: (step, images per step)``, measured in turns (``rounds`` turns of
    seconds / rounds each), best turn of each: a drift of the machine (clocks, a busy neighbour)
    then touches every way alike, instead of whichever happened to run during it."""
    for step, _ in steps.values():
        step()  # warm-up (cudnn autotuning, allocator)
    best = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, (step, images) in steps.items():
            best[name] = max(best[name], _rate(step, images, device, seconds / rounds))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", default="runs/benchmarks/backbone.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(ModelConfig(SharedConfig(image_size=args.image_size, seq_len=8)))
    trunk = model.backbone.to(device).eval()
    batch = torch.rand(args.batch, 1, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        trunk.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(module: torch.nn.Module, inputs: torch.Tensor, dtype: torch.dtype | None):
        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                module(inputs)
        return step

    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"cpu ({torch.get_num_threads()} threads)",
                    "images": f"{args.image_size}x{args.image_size}, batch {args.batch}"}
    steps = {"fp32": (forward(trunk, batch, None), args.batch)}
    if device.type == "cpu":
        steps["bf16_autocast"] = (forward(trunk, batch, torch.bfloat16), args.batch)
        ceilings = ["fp32"]  # what the sites run on a CPU
    else:
        dtype = amp_dtype(device)
        name = str(dtype).removeprefix("torch.")
        steps[f"{name}_autocast"] = (forward(trunk, batch, dtype), args.batch)
        low, _ = encoder_trunk(model, device)
        steps[f"{name}_weights"] = (forward(low, batch.to(dtype), None), args.batch)
        ceilings = list(steps)
    images = torch.rand(args.studies, 8, 1, args.image_size, args.image_size)
    mask = torch.ones(args.studies, 8, dtype=torch.bool)
    mask[::3, 6:] = False  # some shorter studies, as real sites have
    steps["encode"] = (lambda: encode(model, images, mask, device, args.batch // 8 or 1), int(mask.sum()))
    rates = best_rates(steps, device, args.seconds * len(steps))
    rate = rates.pop("encode")
    ceiling = max(ceilings, key=rates.get)
    if device.type == "cpu":
        result["bf16_vs_fp32"] = round(rates["bf16_autocast"] / rates["fp32"], 2)
    for name, value in rates.items():
        result[f"pure_forward_{name}_images_per_s"] = round(value, 1)
    result["pure_forward_ceiling"] = ceiling
    result["encode_step_images_per_s"] = round(rate, 1)
    result["encode_vs_pure_forward"] = round(rate / rates[ceiling], 2)
    if device.type == "cuda":
        result["goal_encode_at_least_70_percent"] = rate / rates[ceiling] >= 0.7
    write_result(args.out, result)


if __name__ == "__main__":
    main()
