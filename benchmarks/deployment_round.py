"""What a round costs in a real deployment, side by side on the same TLS SuperLink and site daemons:
- one exchange per site per round (the default: the message that trains a round first has the site
  score the model it starts from) against two (``evaluate-with-training = false``: a train message,
  then an evaluation message, as Flower's FedAvg), both collecting replies as they arrive;
- the centre collecting replies as they arrive (``reply-polling = prompt``) against Flower's fixed
  3 s pull interval (``flower``), both with two exchanges per round.

    .venv/bin/python -m benchmarks.deployment_round [--sites 2 --studies 16 --rounds 5] [--publish]

``--publish`` also writes ``docs/benchmarks/deployment_round.json`` and renders the table in
docs/deployment.md ("What a round costs") from it.

Everything is real and local: ``clinicfl-server certs/start/register-site``, each site's
``clinicfl-client approve`` and ``start`` (SuperNode, site gate and its zygote), then one
``clinicfl-server run`` per arm. Reported per arm: the time of each round from the second to the
one before the last (the run's own clock between the ends of consecutive rounds; their median, and
the mean beside it) and where it went (``phase_seconds``). Round 1 fills the sites' caches, and
with one exchange per round the last round's record holds its evaluation only.
A phase also waits for each SuperNode to fetch its message: Flower's SuperNode asks for work every
3 s when idle, which the centre cannot change (it is part of every arm alike).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import replace_between, write_result
from benchmarks.loopback_deployment import Deployment
from common.rundir import ENDED_STATES
from simulations.synthetic import SyntheticSpec, generate_clinics

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "benchmarks" / "deployment_round.json"
DOC = ROOT / "docs" / "deployment.md"
BEGIN, END = "<!-- deployment-round:begin -->", "<!-- deployment-round:end -->"
SETTINGS = ["--set", "image-size=32", "--set", "seq-len=4", "--set", "local-epochs=1", "--set", "min-site-cases=2"]


# Each arm's run-config settings.
ARMS = {"prompt, one exchange per round": ['reply-polling="prompt"', "evaluate-with-training=true"],
        "prompt, two exchanges per round": ['reply-polling="prompt"', "evaluate-with-training=false"],
        "flower, two exchanges per round": ['reply-polling="flower"', "evaluate-with-training=false"]}


def run_arm(dep: Deployment, sites: int, rounds: int, name: str) -> dict:
    run_id = dep.run("run", "--rounds", str(rounds), "--min-sites", str(sites), *SETTINGS,
                     *[a for setting in ARMS[name] for a in ("--set", setting)])
    dep.wait(lambda: dep.state(run_id).get("state") in ENDED_STATES, 900, f"the {name} run")
    records = dep.records(run_id)
    if dep.state(run_id)["state"] != "finished" or len(records) != rounds + 1:
        raise RuntimeError(f"the {name} run did not finish its {rounds} rounds: {dep.state(run_id)}")
    later = records[2:-1]  # round 0 scores the initial model; round 1 fills the caches; the last may only score
    phases = sorted({name for r in later for name in r["phase_seconds"]})
    return {"round_seconds": [r["seconds"] for r in records[1:]],
            "later_round_s": round(statistics.median(r["seconds"] for r in later), 2),
            "later_rounds_mean_s": round(statistics.fmean(r["seconds"] for r in later), 2),
            "later_rounds_phase_seconds_mean": {p: round(statistics.fmean(r["phase_seconds"].get(p, 0.0)
                                                                          for r in later), 2) for p in phases}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="runs/benchmarks/deployment_round.json")
    parser.add_argument("--publish", action="store_true", help="also write docs/benchmarks/deployment_round.json")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dep = Deployment(Path(tmp))
        names = [f"site-{i + 1:02d}" for i in range(args.sites)]
        spec = SyntheticSpec(sites=args.sites, studies_per_site=args.studies, image_size=32, slices_per_study=4,
                             seed=5)
        dep.data.update(zip(names, generate_clinics(Path(tmp) / "data", spec, progress=False)))
        dep.server("certs", "--host", "localhost", *[a for n in names for a in ("--site", n)])
        dep.server("start", "--address", f"127.0.0.1:{dep.port}")
        try:
            for name in names:
                dep.server("register-site", name, str(dep.centre / "sites" / f"{name}.pub"))
                dep.approve(name)
                dep.start_site(name)
            dep.wait_online(set(names))
            arms = {name: run_arm(dep, args.sites, args.rounds, name) for name in ARMS}
        finally:
            dep.stop_all()
    one, prompt, flower = (arms[name] for name in ARMS)
    result = {
        "workload": {"sites": args.sites, "studies_per_site": args.studies, "images": "4 x 32x32",
                     "rounds": args.rounds, "transport": "TLS SuperLink, authenticated SuperNodes, site gate"},
        "arms": arms,
        "two_vs_one_exchange_later_round": round(prompt["later_round_s"] / one["later_round_s"], 2),
        "flower_vs_prompt_later_round": round(flower["later_round_s"] / prompt["later_round_s"], 2),
        "benchmark_seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.out, result)
    if args.publish:
        write_result(PUBLISHED, result)
        replace_between(DOC, BEGIN, END, render_table(result))


def render_table(result: dict) -> str:
    """The table docs/deployment.md shows, from a result of this benchmark."""
    arms, work = result["arms"], result["workload"]
    phases = sorted({name for arm in arms.values() for name in arm["later_rounds_phase_seconds_mean"]})
    lines = [BEGIN, "", f"{work['sites']} sites, {work['rounds']} rounds, {work['transport']} "
             f"(`docs/benchmarks/deployment_round.json`, generated by `python -m benchmarks.deployment_round "
             f"--publish`):", "",
             "| arm | later round, median (s) | mean (s) | " + " | ".join(f"{p} (s)" for p in phases) + " |",
             "|---|---|---|" + "---|" * len(phases)]
    for name, arm in arms.items():
        lines.append(f"| {name} | {arm['later_round_s']} | {arm['later_rounds_mean_s']} | "
                     + " | ".join(str(arm["later_rounds_phase_seconds_mean"].get(p, "-")) for p in phases) + " |")
    if "two_vs_one_exchange_later_round" in result:
        lines += ["", f"Two exchanges / one exchange per round, later round: {result['two_vs_one_exchange_later_round']}x."]
    lines += ["", f"Flower's interval / prompt, later round: {result['flower_vs_prompt_later_round']}x.", "", END]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
