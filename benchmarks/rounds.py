"""What a round costs: clinicfl against the plain and the lean Flower recipe, side by side, through
the same Flower simulation path (a SuperLink of our own, Ray, ``flwr run``), on the same sites.

    .venv/bin/python -m benchmarks.rounds [--sites 3 --studies 40 --rounds 3] [--out runs/benchmarks/rounds.json]

Arms (every one on the same synthetic DICOM sites, 1 local epoch, ``--rounds`` rounds, the same
network: the model of clinicfl's default configuration, severity and reconstruction heads included):
- plain: Flower's PyTorch quickstart pattern, the whole state dict each way and the ResNet50 on every
  batch (``benchmarks/recipes``);
- lean: trainable parameters only, features encoded once per site (``benchmarks/recipes``);
- clinicfl with its default configuration (every catalogue metric every round; one exchange per
  site per round, whose message has the site score the model before it trains from it), clinicfl
  with Flower's two exchanges per round (``evaluate-with-training = false``) and clinicfl with
  float16 on the wire;
- clinicfl with the heads off, beside the lean recipe with the heads off (the same smaller network).
Reported: the median time of the rounds after the first (each arm's own clock between the ends of
consecutive rounds; the median, so that one hiccup of the machine does not decide a ratio; the mean
is kept beside it). The two arms of the goals, clinicfl default and the lean recipe, run
``--repeats`` times each (default 2), alternately and spread over the benchmark, and their rounds are
pooled over the runs: this machine's speed drifts by a third within minutes, and a ratio of two
single runs minutes apart moves with it. Also reported: the whole run's wall time (from starting the
SuperLink to its end, as a user waits for it; the median over repeats), bytes per site per round
(payloads, both directions, evaluation included, against one copy of the model's full fp32 state
dict) and the ratios between arms. Unless ``--no-warm``, a first one-round run of clinicfl fills the
sites' caches (decoded DICOM, encoded features), which every later run reuses; it is reported on
its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import write_result
from common.config import ModelConfig, SharedConfig
from common.model import build_model
from common.runlog import read_metrics
from simulations.runner import PROJECT_ROOT, run_flower_app, run_simulation
from simulations.synthetic import SyntheticSpec, generate_clinics

RECIPES = PROJECT_ROOT / "benchmarks" / "recipes"


def recipe_arm(recipe: str, data_root: Path, sites: int, rounds: int, spec: SyntheticSpec, work: Path,
               heads: bool = True) -> dict:
    result_path = work / f"{recipe}-{time.time_ns()}.json"
    config = {"recipe": recipe, "heads": heads, "data-root": str(data_root), "num-rounds": rounds, "local-epochs": 1,
              "image-size": spec.image_size, "seq-len": spec.slices_per_study, "result-path": str(result_path)}
    start = time.perf_counter()
    code = run_flower_app(RECIPES, config, sites, work / "flwr-home", work / f"{recipe}.log")
    wall = time.perf_counter() - start
    if code != 0 or not result_path.is_file():
        raise RuntimeError(f"the {recipe} recipe failed (flwr exit {code}); see {work / f'{recipe}.log'}")
    result = json.loads(result_path.read_text())
    later = result["round_seconds"][1:] or result["round_seconds"]
    return {"round_seconds": [round(s, 3) for s in result["round_seconds"]],
            "later_round_s": round(statistics.median(later), 3),
            "later_rounds_mean_s": round(statistics.fmean(later), 3), "whole_run_s": round(wall, 1),
            "bytes_per_site_per_round": int(result["bytes_per_site_per_round"])}


def clinicfl_arm(data_root: Path, sites: int, rounds: int, spec: SyntheticSpec, work: Path, overrides: dict) -> dict:
    config = {"num-rounds": rounds, "local-epochs": 1, "min-sites": sites, "image-size": spec.image_size,
              "seq-len": spec.slices_per_study, **overrides}
    start = time.perf_counter()
    run_dir = run_simulation(data_root, work / "runs", sites, config, flwr_home=work / "flwr-home")
    wall = time.perf_counter() - start
    records = read_metrics(run_dir)
    seconds = [r["seconds"] for r in records[1:]]  # round 0 is the initial model's evaluation
    later = seconds[1:] or seconds
    # FID runs the backbone on the new reconstructions in the rounds fid-every names (the last
    # included): those rounds are reported on their own, beside the median and mean of all.
    with_fid = [r["catalogue"]["fid"]["value"] is not None for r in records[1:]]
    fid_later = [s for s, fid in zip(seconds[1:], with_fid[1:]) if fid]
    traffic = [sum(t["sent"] + t["received"] for t in r["traffic"].values()) / max(len(r["traffic"]), 1)
               for r in records[1:]]
    return {"round_seconds": seconds, "later_round_s": round(statistics.median(later), 3),
            "later_rounds_mean_s": round(statistics.fmean(later), 3), "rounds_with_fid": with_fid,
            "later_round_with_fid_s": round(statistics.median(fid_later), 3) if fid_later else None,
            "whole_run_s": round(wall, 1), "bytes_per_site_per_round": int(statistics.fmean(traffic)),
            "final_auc": records[-1]["catalogue"]["auc"]["value"]}


def pooled(runs: list[dict]) -> dict:
    """Repeated runs of one arm as one: the rounds after the first of every run pooled for the
    median and mean, the median whole run, the mean payload; each run's own figures kept in ``runs``."""
    if len(runs) == 1:
        return runs[0]
    later = [s for run in runs for s in (run["round_seconds"][1:] or run["round_seconds"])]
    result = {"repeats": len(runs), "later_round_s": round(statistics.median(later), 3),
              "later_rounds_mean_s": round(statistics.fmean(later), 3),
              "whole_run_s": round(statistics.median(run["whole_run_s"] for run in runs), 1),
              "bytes_per_site_per_round": int(statistics.fmean(run["bytes_per_site_per_round"] for run in runs)),
              "runs": runs}
    if "rounds_with_fid" in runs[0]:
        flags = [f for run in runs for f in run["rounds_with_fid"][1:]]
        seconds = [s for run in runs for s in run["round_seconds"][1:]]
        fid = [s for s, f in zip(seconds, flags) if f]
        result["rounds_with_fid"] = runs[0]["rounds_with_fid"]  # the same in every run
        result["later_round_with_fid_s"] = round(statistics.median(fid), 3) if fid else None
        result["final_auc"] = runs[0]["final_auc"]
        result["final_auc_every_run"] = [run["final_auc"] for run in runs]
    return result


CORE_ARMS = ("plain recipe", "lean recipe", "clinicfl default")


def other_arm_ratios(results: dict[str, dict], lean: dict, ours: dict, full_bytes: int) -> dict[str, float]:
    """The ratios of the arms beyond the goals' three, for those that ran."""
    ratios = {}
    if two := results.get("clinicfl two phases"):
        ratios["clinicfl_two_phases_later_round_vs_lean"] = round(two["later_round_s"] / lean["later_round_s"], 2)
    if (off := results.get("clinicfl heads off")) and (lean_off := results.get("lean recipe, heads off")):
        ratios["clinicfl_heads_off_later_round_vs_lean_heads_off"] = round(
            off["later_round_s"] / lean_off["later_round_s"], 2)
    if half := results.get("clinicfl float16 wire"):
        ratios["clinicfl_float16_bytes_vs_full_state_dict"] = round(half["bytes_per_site_per_round"] / full_bytes, 4)
        ratios["float16_final_auc_minus_float32"] = round(half["final_auc"] - ours["final_auc"], 4)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of clinicfl default and of the lean recipe, alternately (their rounds pooled)")
    parser.add_argument("--no-warm", action="store_true", help="do not discard a first, cache-filling run")
    parser.add_argument("--core-arms", action="store_true",
                        help="only the arms of the goals (plain recipe, lean recipe, clinicfl default): the other "
                             "arms are the same harness with other settings (the suite's --tiny smoke test)")
    parser.add_argument("--out", default="runs/benchmarks/rounds.json")
    args = parser.parse_args()
    spec = SyntheticSpec(sites=args.sites, studies_per_site=args.studies, image_size=args.image_size,
                         slices_per_study=args.slices, seed=13)
    arms = {
        "plain recipe": lambda: recipe_arm("plain", data, args.sites, args.rounds, spec, work),
        "lean recipe": lambda: recipe_arm("lean", data, args.sites, args.rounds, spec, work),
        "clinicfl default": lambda: clinicfl_arm(data, args.sites, args.rounds, spec, work, {}),
        # Flower's two exchanges per round (train, then evaluate) instead of one that scores first
        "clinicfl two phases": lambda: clinicfl_arm(data, args.sites, args.rounds, spec, work,
                                                    {"evaluate-with-training": False}),
        "clinicfl heads off": lambda: clinicfl_arm(data, args.sites, args.rounds, spec, work,
                                                   {"severity-head": False, "recon-head": False}),
        "lean recipe, heads off": lambda: recipe_arm("lean", data, args.sites, args.rounds, spec, work, heads=False),
        "clinicfl float16 wire": lambda: clinicfl_arm(data, args.sites, args.rounds, spec, work,
                                                      {"wire-dtype": "float16"}),
    }
    if args.core_arms:
        arms = {name: arm for name, arm in arms.items() if name in CORE_ARMS}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        generate_clinics(data, spec, progress=False)
        if not args.no_warm:
            # A site's first run decodes its DICOM and encodes its images into its caches; every
            # later run reuses them. This first run is reported on its own.
            print("running clinicfl default (cold caches, one round)", flush=True)
            results["clinicfl default, cold caches"] = clinicfl_arm(data, args.sites, 1, spec, work, {})
        # The repeats of the two arms of the goals come last, alternately: lean, clinicfl, lean, ...
        order = list(arms) + ["lean recipe", "clinicfl default"] * (max(args.repeats, 1) - 1)
        runs: dict[str, list[dict]] = {}
        for name in order:
            print(f"running {name}" + (f" (repeat {len(runs.get(name, [])) + 1})" if name in runs else ""), flush=True)
            runs.setdefault(name, []).append(arms[name]())
        results.update({name: pooled(arm_runs) for name, arm_runs in runs.items()})
    plain, lean, ours = results["plain recipe"], results["lean recipe"], results["clinicfl default"]
    # The denominator of the traffic goal: one copy of the model's full state dict in fp32 (backbone
    # included), as the plain recipe sends it each way.
    model = build_model(ModelConfig(SharedConfig(image_size=args.image_size, seq_len=args.slices)))
    full_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    result = {
        "full_state_dict_fp32_bytes": full_bytes,
        "workload": {"sites": args.sites, "studies_per_site": args.studies, "images": f"{args.slices} x "
                     f"{args.image_size}x{args.image_size}", "local_epochs": 1, "rounds": args.rounds,
                     "repeats_of_lean_and_clinicfl_default": max(args.repeats, 1)},
        "arms": results,
        "ratios": {
            "clinicfl_later_round_vs_lean": round(ours["later_round_s"] / lean["later_round_s"], 2),
            "clinicfl_later_rounds_mean_vs_lean": round(ours["later_rounds_mean_s"] / lean["later_round_s"], 2),
            "clinicfl_fid_round_vs_lean": (round(ours["later_round_with_fid_s"] / lean["later_round_s"], 2)
                                           if ours["later_round_with_fid_s"] else None),
            "plain_later_round_vs_clinicfl": round(plain["later_round_s"] / ours["later_round_s"], 1),
            "clinicfl_whole_run_vs_lean": round(ours["whole_run_s"] / lean["whole_run_s"], 2),
            "clinicfl_bytes_vs_full_state_dict": round(ours["bytes_per_site_per_round"] / full_bytes, 4),
            "plain_bytes_vs_full_state_dict": round(plain["bytes_per_site_per_round"] / full_bytes, 4),
            **other_arm_ratios(results, lean, ours, full_bytes),
        },
        "goals": {"later round <= lean": None, "later round >= 20x faster than plain": None,
                  "whole run <= 1.5x lean": None, "bytes <= 3.6% of the full state dict": None,
                  "float16 bytes <= 2%": None},
    }
    r = result["ratios"]
    result["goals"] = {"later round <= lean": r["clinicfl_later_round_vs_lean"] <= 1.0,
                       "later round >= 20x faster than plain": r["plain_later_round_vs_clinicfl"] >= 20,
                       "whole run <= 1.5x lean": r["clinicfl_whole_run_vs_lean"] <= 1.5,
                       "bytes <= 3.6% of the full state dict": r["clinicfl_bytes_vs_full_state_dict"] <= 0.036}
    if "clinicfl_float16_bytes_vs_full_state_dict" in r:
        result["goals"]["float16 bytes <= 2%"] = r["clinicfl_float16_bytes_vs_full_state_dict"] <= 0.02
    write_result(args.out, result)


if __name__ == "__main__":
    main()
