"""Reading a site: DICOM decoded on every start (naive) vs the site's preprocess cache, side by side.

    .venv/bin/python -m benchmarks.preprocess_cache [--studies 48 --image-size 256 --slices 16]

One synthetic clinic of real DICOM files is read three ways in the same run: with no cache (every
file decoded, windowed and resized), a first run that fills the cache (decode + write), and a
second run from the cache (file hashing + one .npz per study, no DICOM decoding). The cache is
keyed by file content, so every file is still read once per start to hash it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import write_result
from common.config import DataConfig, SharedConfig
from common.data.site import load_site
from simulations.synthetic import SyntheticSpec, generate_clinics


def _seconds(site: Path, config: DataConfig, cache: Path | None) -> tuple[float, object]:
    start = time.perf_counter()
    data = load_site(site, config, num_labels=1, progress=False, cache_dir=cache)
    return time.perf_counter() - start, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=256, help="source DICOM size (rows = columns)")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/benchmarks/preprocess_cache.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clinicfl-bench-"))
    try:
        spec = SyntheticSpec(sites=1, studies_per_site=args.studies, image_size=args.image_size,
                             slices_per_study=args.slices, seed=1)
        (site,) = generate_clinics(work / "data", spec, progress=False)
        config = DataConfig(SharedConfig(image_size=64, seq_len=8))
        naive = [_seconds(site, config, None)[0] for _ in range(args.repeats)]
        cache = work / "cache"
        fill, first = _seconds(site, config, cache)
        warm = []
        for _ in range(args.repeats):
            seconds, again = _seconds(site, config, cache)
            warm.append(seconds)
        assert np.array_equal(first.images, again.images), "the cache must give the same arrays"
        files = sum(1 for _ in site.rglob("*.dcm"))
        megabytes = sum(p.stat().st_size for p in site.rglob("*.dcm")) / 1e6
        result = {
            "site": f"{args.studies} studies, {files} DICOM files ({megabytes:.1f} MB), "
                    f"{args.image_size}x{args.image_size} -> 64x64, seq-len 8",
            "naive_decode_s": round(statistics.median(naive), 3),
            "first_run_fill_cache_s": round(fill, 3),
            "cached_s": round(statistics.median(warm), 3),
            "speedup_cached_vs_naive": round(statistics.median(naive) / statistics.median(warm), 2),
            "fill_overhead_vs_naive": round(fill / statistics.median(naive), 2),
            "repeats": args.repeats,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
