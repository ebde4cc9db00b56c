"""The backbone's forward rate: float32 against bfloat16 autocast, and a site's encode step against
the pure forward, side by side on one device.

    .venv/bin/python -m benchmarks.backbone [--device cpu|cuda] [--out runs/benchmarks/backbone.json]

- pure forward: the frozen ResNet50 trunk on a resident batch, in a loop (the ceiling);
- encode step: ``common.inference.encode`` as a site runs it over its studies (host tensors, padding
  masks, per-batch copies to the device, features back on the host);
- on CPU, the pure forward with bfloat16 autocast against float32 (the sites use float32 on CPU);
- on CUDA, the encode step uses autocast (bfloat16 where supported), channels-last and pinned
  memory; the goal is an encode rate of at least 70% of the pure forward rate.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import write_result
from common.config import ModelConfig
from common.inference import amp_dtype, encode
from common.model import build_model


def _rate(step, images: int, device: torch.device, seconds: float = 6.0) -> float:
    step()  # warm-up (cudnn autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += images
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


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
    model = build_model(ModelConfig(image_size=args.image_size, seq_len=8))
    trunk = model.backbone.to(device).eval()
    batch = torch.rand(args.batch, 1, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        trunk.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(dtype: torch.dtype | None):
        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                trunk(batch)
        return step

    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"cpu ({torch.get_num_threads()} threads)",
                    "images": f"{args.image_size}x{args.image_size}, batch {args.batch}"}
    fp32 = _rate(forward(None), args.batch, device, args.seconds)
    result["pure_forward_fp32_images_per_s"] = round(fp32, 1)
    if device.type == "cpu":
        bf16 = _rate(forward(torch.bfloat16), args.batch, device, args.seconds)
        result["pure_forward_bf16_autocast_images_per_s"] = round(bf16, 1)
        result["bf16_vs_fp32"] = round(bf16 / fp32, 2)
    else:
        amp = _rate(forward(amp_dtype(device)), args.batch, device, args.seconds)
        result[f"pure_forward_{str(amp_dtype(device)).removeprefix('torch.')}_autocast_images_per_s"] = round(amp, 1)
        fp32 = amp  # the encode step runs with autocast on CUDA: compare like with like
    images = torch.rand(args.studies, 8, 1, args.image_size, args.image_size)
    mask = torch.ones(args.studies, 8, dtype=torch.bool)
    mask[::3, 6:] = False  # some shorter studies, as real sites have
    real = int(mask.sum())

    def encode_step():
        encode(model, images, mask, device, args.batch // 8 or 1)

    rate = _rate(encode_step, real, device, args.seconds)
    result["encode_step_images_per_s"] = round(rate, 1)
    result["encode_vs_pure_forward"] = round(rate / fp32, 2)
    if device.type == "cuda":
        result["goal_encode_at_least_70_percent"] = rate / fp32 >= 0.7
    write_result(args.out, result)


if __name__ == "__main__":
    main()
