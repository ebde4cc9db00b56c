"""clinicfl-sim: synthetic clinics and local Flower simulations.

    clinicfl-sim generate DIR [--sites 3 --studies 48 ...]
    clinicfl-sim run --data-root DIR [--rounds 3] [--site-policy FILE] [--set key=value ...]
    clinicfl-sim demo            generate 3 clinics and run a federated simulation
    clinicfl-sim study NAME [--quick]   a study: federation-vs-local, privacy-utility, heterogeneity,
                                        hyperparameter-search, local-training
    clinicfl-sim tune-dp PUBLIC_CLINIC --score-on CLINIC   dp-lr chosen on public data only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import tomllib
from dataclasses import fields, replace
from pathlib import Path

from rich.console import Console
from tqdm import tqdm

from common.config import ConfigError
from common.metrics.catalogue import CI_KEY, interval_of
from common.policy import PolicyError, SitePolicy
from common.processes import console_logging, parse_assignments
from common.rundir import CHECKPOINT_DIR, CSV_FILE, METRICS_FILE, SUMMARY_FILE, RunDirectory
from common.runlog import SELECTION_METRICS, describe_selection, round_line
from server.runs import print_status, wide_console, with_interval
from simulations.runner import PROJECT_ROOT, SimulationError, run_simulation
from simulations.synthetic import SyntheticSpec, generate_clinics

console = Console()


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(SyntheticSpec):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"(default {f.default})")


def _spec(args: argparse.Namespace) -> SyntheticSpec:
    return SyntheticSpec(**{f.name: getattr(args, f.name) for f in fields(SyntheticSpec)})


def _overrides(pairs: list[str]) -> dict[str, object]:
    try:
        return parse_assignments(pairs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    spec = _spec(args)
    sites = generate_clinics(Path(args.dir), spec)
    (Path(args.dir) / "synthetic-spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    console.print(f"wrote {len(sites)} synthetic clinics to {Path(args.dir).resolve()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    data_root = Path(args.data_root)
    sites = [p for p in data_root.iterdir() if p.is_dir() and not p.name.startswith(".")] if data_root.is_dir() else []
    if not sites:
        console.print(f"[red]error:[/] no site folders under {data_root}; run `clinicfl-sim generate {data_root}` first")
        return 2
    overrides = _overrides(args.set)
    if args.rounds is not None:
        overrides["num-rounds"] = args.rounds
    if args.site_policy:
        try:
            SitePolicy.load(Path(args.site_policy).resolve())  # refused here, not at every site's first message
        except PolicyError as exc:
            console.print(f"[red]error:[/] {exc}")
            return 2
        overrides["site-policy"] = str(Path(args.site_policy).resolve())
    overrides.setdefault("min-sites", len(sites))
    return _run_and_report(data_root, Path(args.run_root), len(sites), overrides, verbose=args.verbose)


def _run_and_report(data_root: Path, run_root: Path, num_sites: int, overrides: dict[str, object],
                    plots: bool = False, verbose: bool = False) -> int:
    started = time.perf_counter()
    rounds = int(overrides.get("num-rounds", _default_rounds()))
    progress = tqdm(total=rounds + 1, desc="federated rounds", unit="round", disable=True if verbose else None, leave=False,
                    bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}")

    def show(record: dict) -> None:
        progress.update(1)
        (console.print if verbose else progress.write)(round_line(record, rounds))

    try:
        run = RunDirectory(run_simulation(data_root, run_root, num_sites, overrides, stream=verbose, on_round=show))
    except (SimulationError, ConfigError) as exc:
        progress.close()
        console.print(f"[red]error:[/] {exc}")
        return 1
    progress.close()
    console.rule("results")
    _show_as_the_centre(run, plots)
    records = run.read_metrics()
    first, last = records[0]["catalogue"], records[-1]["catalogue"]
    state = run.state()
    best = state.get("best") or {}
    best_record = next((r for r in records if r["round"] == best.get("round")), records[-1])
    summary = {"run_dir": str(run.path), "rounds": records[-1]["round"], "state": state.get("state"),
               "detail": state.get("detail"), "wall_seconds": round(time.perf_counter() - started, 1),
               "auc_round0": first["auc"]["value"], "auc_final": last["auc"]["value"],
               "best": {**best, "auc": best_record["catalogue"]["auc"]["value"]},
               "final": {name: entry.get("value") for name, entry in last.items()},
               # Each figure's confidence interval [low, high], where it has one (docs/metrics.md).
               f"final_{CI_KEY}": _intervals(last), f"best_{CI_KEY}": _intervals(best_record["catalogue"])}
    run.write_summary(summary)
    console.print(f"AUC {_fmt_auc(first)} (round 0) -> {_fmt_auc(last)} (round {summary['rounds']}); best round "
                  f"{best.get('round', '-')} by {best.get('metric', '-')} (AUC {_fmt_auc(best_record['catalogue'])}); "
                  f"{summary['wall_seconds']} s")
    console.print(_chosen_round_line(best, records[-1]["round"]))
    console.print(f"run directory: {run.path}")
    console.print(f"  {METRICS_FILE}, {CSV_FILE}, {CHECKPOINT_DIR}/, {SUMMARY_FILE}, simulation.log"
                  + (", report/*.png" if plots else ""))
    return 0


def _intervals(catalogue: dict) -> dict[str, list[float]]:
    """name -> [low, high] of every figure of a round's catalogue that has a confidence interval."""
    return {name: list(bounds) for name, entry in catalogue.items() if (bounds := interval_of(entry)) is not None}


def _fmt_auc(catalogue: dict) -> str:
    return with_interval(catalogue["auc"].get("value"), interval_of(catalogue["auc"]))


def _chosen_round_line(best: dict, last_round: int) -> str:
    """Which round the run chose and by which validation figure: its test figures are reported,
    never used to choose."""
    if best.get("metric") not in SELECTION_METRICS:
        return f"no round chosen (no round has its best-metric figure): the export takes the last round, {last_round}"
    return (f"round {best['round']} chosen by {best['metric']}, {describe_selection(best['metric'])} "
            f"{best['value']:.4f}; the test figures above are reported for it, never used to choose")


def _show_as_the_centre(run: RunDirectory, plots: bool) -> None:
    """The run as the coordinating centre's own commands show it in a deployment:
    ``clinicfl-server status`` and, with ``plots``, ``clinicfl-server report``."""
    centre_console = wide_console()
    print_status(run, centre_console)
    if plots:
        from server.report import print_report  # matplotlib only when plotting

        try:
            print_report(run, centre_console)
        except (ValueError, OSError) as exc:  # as clinicfl-server says it; the run's summary still follows
            print(f"error: {exc}", file=sys.stderr)


def _default_rounds() -> int:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        return int(tomllib.load(handle)["tool"]["flwr"]["app"]["config"]["num-rounds"])


def cmd_demo(args: argparse.Namespace) -> int:
    root = Path(args.out).resolve()
    spec = _spec(args)
    console.rule("clinicfl demo: synthetic clinics")
    generate_clinics(root / "data", spec)
    # The coordinating centre's own validation set: one more clinic from another seed.
    (server_val,) = generate_clinics(root / "server", replace(spec, sites=1, seed=spec.seed + 1000))
    console.print(f"{spec.sites} clinics x {spec.studies_per_site} studies ({spec.image_size}x{spec.image_size}, "
                  f"~{spec.slices_per_study} slices) in {root / 'data'}; server validation set {server_val}")
    console.rule("federated simulation (FedAvg)")
    overrides = {"num-rounds": args.rounds, "min-sites": spec.sites, "image-size": spec.image_size,
                 "seq-len": spec.slices_per_study, "server-val-path": str(server_val), **_overrides(args.set)}
    return _run_and_report(root / "data", root / "runs", spec.sites, overrides, plots=True, verbose=args.verbose)


def cmd_study(args: argparse.Namespace) -> int:
    import shutil

    from flwr.common.logger import update_console_handler
    from rich.table import Table

    from simulations.studies import registry

    studies = registry()
    if args.name not in studies:
        console.print(f"[red]error:[/] no study {args.name!r}; studies: {', '.join(studies)}")
        return 2
    # Flower's INFO lines (one per sampled round) would bury the study's own progress lines.
    update_console_handler(level=logging.WARNING)
    started = time.strftime("%H:%M:%S")
    out, results = studies[args.name].run(quick=args.quick, seeds=args.seeds,
                                          progress=lambda text: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {text}"))
    table = Table(title=f"{args.name}{' (quick size)' if args.quick else ''}: mean ± std over {results['seeds']} seeds")
    for column in results["headline_columns"]:
        table.add_column(column)
    for row in results["headline"]:
        table.add_row(*row)
    console.print(table)
    console.print(f"started {started}; report, results.json and plots in {out.folder}")
    if args.publish:
        from simulations.studies.publish import publish

        console.print(f"published to {publish(out.folder, args.name)} and the README's Results section")
    if not args.keep_runs:  # the run directories and synthetic clinics are large; the figures are in results.json
        for folder in (out.runs, out.folder / "data"):
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def cmd_tune_dp(args: argparse.Namespace) -> int:
    from rich.table import Table

    from simulations.dp_tuning import chosen, tune_dp_lr, write

    public, score_on = Path(args.public_clinic), Path(args.score_on)
    for folder in (public, score_on):
        if not (folder / "labels.csv").is_file():
            console.print(f"[red]error:[/] {folder} is not a site folder (no labels.csv)")
            return 2
    try:
        lrs = [float(x) for x in args.lr.split(",") if x.strip()]
    except ValueError:
        console.print(f"[red]error:[/] --lr takes comma-separated numbers, got {args.lr!r}")
        return 2
    overrides = _overrides(args.set)
    trials = tune_dp_lr(public, score_on, lrs, overrides, Path(args.run_root), progress=True)
    table = Table(title=f"dp-lr on public data: {public.parent.name}/{public.name} trains under DP, "
                        f"{score_on.parent.name}/{score_on.name} scores")
    for column in ("dp-lr", "best AUC", "at round", "final AUC", "epsilon spent", "seconds"):
        table.add_column(column, justify="right")
    best = chosen(trials)

    def shown(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    for t in trials:
        mark = " (chosen)" if best is not None and t is best else ""
        table.add_row(f"{t.lr:g}{mark}", shown(t.best_auc, 3), str(t.best_round), shown(t.final_auc, 3),
                      shown(t.epsilon, 2), f"{t.seconds:.0f}")
    console.print(table)
    out = Path(args.out)
    write(trials, out, {"public_clinic": str(public.resolve()), "score_on": str(score_on.resolve()),
                        "overrides": overrides, "command": " ".join(["clinicfl-sim", *sys.argv[1:]])})
    console.print(f"wrote {out}" + (f"; run with dp-lr={best.lr:g}" if best else "; no trial could be scored"))
    return 0


def main(argv: list[str] | None = None) -> int:
    console_logging()
    parser = argparse.ArgumentParser(prog="clinicfl-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write synthetic DICOM clinics")
    gen.add_argument("dir")
    _add_spec_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    run = sub.add_parser("run", help="federated simulation over the sites in a folder")
    run.add_argument("--data-root", required=True)
    run.add_argument("--run-root", default="runs", help="where run directories go (default ./runs)")
    run.add_argument("--verbose", action="store_true", help="show Flower's whole output instead of a progress bar")
    run.add_argument("--rounds", type=int)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    run.add_argument("--site-policy", help="a site policy file (TOML) every simulated site applies")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="synthetic clinics + federated simulation")
    demo.add_argument("--out", default="runs/demo", help="data and runs go here (default ./runs/demo)")
    demo.add_argument("--verbose", action="store_true", help="show Flower's whole output instead of a progress bar")
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    _add_spec_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    study = sub.add_parser("study", help="run a study: federation-vs-local, privacy-utility, heterogeneity, "
                                         "hyperparameter-search, local-training")
    study.add_argument("name")
    study.add_argument("--quick", action="store_true", help="the small size the tests use (a few minutes)")
    study.add_argument("--seeds", type=int, help="seeds per setting (default 3)")
    study.add_argument("--keep-runs", action="store_true", help="keep every run directory and the synthetic data")
    study.add_argument("--publish", action="store_true",
                       help="copy the results into docs/results/NAME and regenerate the README's Results section")
    study.set_defaults(func=cmd_study)

    tune = sub.add_parser("tune-dp", help="choose dp-lr on public data: the centre's clinic trains alone under DP "
                                          "at each rate, a second public clinic scores it")
    tune.add_argument("public_clinic", help="a site folder of public data that trains (e.g. the centre's clinic)")
    tune.add_argument("--score-on", required=True, help="another public site folder that chooses and scores")
    tune.add_argument("--lr", default="0.001,0.003,0.01,0.03,0.1", help="the rates to try, comma-separated")
    tune.add_argument("--run-root", default="runs/tune-dp", help="where the trials' run directories go")
    tune.add_argument("--out", default="runs/tune-dp/results.json", help="the trials as JSON")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    tune.set_defaults(func=cmd_tune_dp)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
