"""Scaling: a clinicfl simulation of 5, 10 and 20 sites on this machine, with the memory of the whole
process tree (SuperLink, ServerApp, Ray workers) sampled as it runs.

    .venv/bin/python -m benchmarks.scaling [--sites 5 10 20 --rounds 6] [--out runs/benchmarks/scaling.json]

Every size takes the first N of one set of synthetic sites, whose caches one first, unmeasured run
over all of them fills. For each size: peak PSS (proportional set size: shared pages split between
the processes that share them, so the sum over the tree is the tree's real footprint), PSS at the
end of every round (it must not grow with the rounds), and the time of the rounds after the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import write_result
from common.runlog import read_metrics
from simulations.runner import run_simulation
from simulations.synthetic import SyntheticSpec, generate_clinics


def tree_pss_bytes(root: int) -> int:
    """Sum of PSS over ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class PssSampler:
    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self.samples, self._stop = interval, 0, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = tree_pss_bytes(os.getpid())
            self.peak = max(self.peak, value)
            self.samples.append((time.perf_counter(), value))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def site_subset(data: Path, sites: int, root: Path) -> Path:
    """The first ``sites`` sites of ``data`` as a data root of its own: links to their folders and
    to the shared state folder, so a smaller federation reads the caches a bigger one filled (they
    are keyed by content, not by federation)."""
    root.mkdir(parents=True, exist_ok=True)
    for site in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))[:sites]:
        (root / site.name).symlink_to(site, target_is_directory=True)
    (data / ".clinicfl-state").mkdir(exist_ok=True)
    (root / ".clinicfl-state").symlink_to(data / ".clinicfl-state", target_is_directory=True)
    return root


def run_config(sites: int, rounds: int, image_size: int, slices: int) -> dict:
    return {"num-rounds": rounds, "local-epochs": 1, "min-sites": sites, "image-size": image_size, "seq-len": slices}


def run_size(data: Path, sites: int, rounds: int, work: Path, image_size: int = 64, slices: int = 8) -> dict:
    """One measured run of the first ``sites`` sites of ``data``."""
    data = site_subset(data, sites, work / f"data-{sites}")
    config = run_config(sites, rounds, image_size, slices)
    at_round: list[int] = []
    with PssSampler() as sampler:
        start = time.perf_counter()
        run_dir = run_simulation(data, work / "runs", sites, config, flwr_home=work / "flwr-home",
                                 on_round=lambda record: at_round.append(tree_pss_bytes(os.getpid())))
        wall = time.perf_counter() - start
    seconds = [r["seconds"] for r in read_metrics(run_dir)[1:]]
    later = seconds[1:] or seconds
    mib = [round(v / 2 ** 20) for v in at_round]
    return {"sites": sites, "peak_pss_mib": round(sampler.peak / 2 ** 20), "pss_mib_after_each_round": mib,
            "pss_growth_last_vs_round1_mib": mib[-1] - mib[1] if len(mib) > 2 else None,
            # Each worker caches the sessions of the sites it served, so PSS rises until every site has
            # been seen; what must not grow is the rise per round once that has happened.
            "pss_growth_per_round_second_half_mib": (round((mib[-1] - mib[len(mib) // 2]) / (len(mib) - 1 - len(mib) // 2), 1)
                                                     if len(mib) >= 4 else None),
            "later_round_seconds_mean": round(statistics.fmean(later), 2), "whole_run_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--no-warm", action="store_true", help="do not run a first, cache-filling run")
    parser.add_argument("--out", default="runs/benchmarks/scaling.json")
    args = parser.parse_args()
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # One set of sites for every size (each size takes the first N of them), and one first run
        # over all of them that fills their caches: every measured run is the steady state of a
        # federation, and the benchmark starts one cache-filling federation, not one per size.
        most = max(args.sites)
        spec = SyntheticSpec(sites=most, studies_per_site=args.studies, image_size=args.image_size,
                             slices_per_study=args.slices, seed=most)
        generate_clinics(work / "data", spec, progress=False)
        if not args.no_warm:
            print(f"filling the caches of {most} sites", flush=True)
            run_simulation(work / "data", work / "runs", most, run_config(most, 1, args.image_size, args.slices),
                           flwr_home=work / "flwr-home")
        for sites in args.sites:
            print(f"running {sites} sites", flush=True)
            sizes.append(run_size(work / "data", sites, args.rounds, work, args.image_size, args.slices))
    first = sizes[0]
    for size in sizes:
        scale = size["sites"] / first["sites"]
        size["round_time_vs_smallest_per_site_ratio"] = round(
            size["later_round_seconds_mean"] / first["later_round_seconds_mean"] / scale, 2)
        size["peak_pss_vs_smallest"] = round(size["peak_pss_mib"] / first["peak_pss_mib"], 2)
    write_result(args.out, {"studies_per_site": args.studies, "rounds": args.rounds,
                            "images": f"{args.slices} x {args.image_size}x{args.image_size}", "sizes": sizes})


if __name__ == "__main__":
    main()
