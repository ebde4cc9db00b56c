"""A site's first start, from DICOM files to cached backbone features, against the pure backbone.

    .venv/bin/python -m benchmarks.site_ready [--studies 200 --source-size 256 --image-size 64]
                                              [--device cpu|cuda]

One synthetic clinic of real DICOM files (``--source-size`` pixels a side, resized to
``--image-size`` as a site's run config asks), read three ways in the same run, each with empty
caches (each way ``--repeats`` times, in turns, the best time of each):

- pure backbone forward: the frozen trunk on resident batches of the same images, the ceiling;
- decode, then encode: the whole site read (and its preprocess cache written), then encoded (and
  its feature cache written), one after the other;
- overlapped (what a site runs, ``common/site_encoding.py``): the backbone encodes each batch of
  studies while the reader decodes the next.

Figures in studies a second; the goal is the overlapped rate at least 80% of the pure forward.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_result
from benchmarks.backbone import best_rates
from common.config import DataConfig, ModelConfig, SharedConfig
from common.data.site import load_site
from common.inference import encoder_trunk, prepare_inputs
from common.model import build_model
from common.site_encoding import load_encoded_site
from simulations.synthetic import SyntheticSpec, generate_clinics

GOAL = 0.8  # overlapped / pure forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--source-size", type=int, default=256, help="the DICOM files' rows = columns")
    parser.add_argument("--image-size", type=int, default=64, help="the run config's image-size")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="passes of each arm, in turns")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the pure forward is timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/benchmarks/site_ready.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    shared = SharedConfig(image_size=args.image_size, seq_len=args.slices)
    data_config = DataConfig(shared)
    model = build_model(ModelConfig(shared))
    work = Path(tempfile.mkdtemp(prefix="clinicfl-site-ready-"))
    try:
        spec = SyntheticSpec(sites=1, studies_per_site=args.studies, image_size=args.source_size,
                             slices_per_study=args.slices, seed=3)
        (site,) = generate_clinics(work / "data", spec, progress=False)
        images = int(load_site(site, data_config, 1, progress=False).mask.sum())  # warms the file cache too
        # The trunk as a site's encode runs it on this device (a low-precision copy on a GPU), on a
        # resident batch of a site's encode batch size; one forward first, so that no arm pays the
        # first call's set-up.
        trunk, dtype = encoder_trunk(model, device)
        batch = torch.rand(32 * args.slices, 1, args.image_size, args.image_size, device=device, dtype=dtype)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        forward(trunk, batch)

        # Each arm twice with empty caches, in turns, best time of each: the first pass of either
        # arm sets up the backbone's kernels for the site's batch shapes.
        sequential_s, overlapped_s, decoded = math.inf, math.inf, math.inf
        for turn in range(args.repeats):
            start = time.perf_counter()
            data = load_site(site, data_config, 1, progress=False,
                             cache_dir=work / f"sequential-{turn}" / "preprocessed")
            decoded = min(decoded, time.perf_counter() - start)
            sequential = prepare_inputs(model, data, work / f"sequential-{turn}", device)
            sequential_s = min(sequential_s, time.perf_counter() - start)

            start = time.perf_counter()
            _, overlapped = load_encoded_site(model, site, data_config, 1, device, work / f"overlapped-{turn}",
                                              progress=False)
            overlapped_s = min(overlapped_s, time.perf_counter() - start)
        assert torch.allclose(overlapped.inputs, sequential.inputs, rtol=1e-4, atol=1e-4), "the same features"

        rates = best_rates({"pure": (lambda: forward(trunk, batch), len(batch))}, device, args.seconds)
        pure = rates["pure"] * len(data.studies) / images  # images/s -> studies/s at this site's images per study
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(data.studies)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "site": f"{n} studies, {images} images, DICOM {args.source_size}x{args.source_size} -> "
                f"{args.image_size}x{args.image_size}",
        "pure_forward_studies_per_s": round(pure, 2),
        "decode_then_encode_studies_per_s": round(n / sequential_s, 2),
        "decode_then_encode_decode_share": round(decoded / sequential_s, 2),
        "repeats": args.repeats,
        "overlapped_studies_per_s": round(n / overlapped_s, 2),
        "overlapped_vs_pure_forward": round(n / overlapped_s / pure, 2),
        "overlapped_vs_decode_then_encode": round(sequential_s / overlapped_s, 2),
        "goal_overlapped_at_least_80_percent": n / overlapped_s / pure >= GOAL,
    }
    write_result(args.out, result)


@torch.no_grad()
def forward(trunk: torch.nn.Module, batch: torch.Tensor) -> None:
    trunk(batch)


if __name__ == "__main__":
    main()
