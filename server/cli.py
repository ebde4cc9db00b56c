"""clinicfl-server: coordinating-centre commands.

    clinicfl-server status RUN_DIR     the per-round tables of a run directory
    clinicfl-server report RUN_DIR     PNG plots: metric curves, ROC, attention, reconstructions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.runs import print_rounds, read_metrics


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        print(f"error: {run_dir} is not a clinicfl run directory (no config.json)", file=sys.stderr)
        return 2
    records = read_metrics(run_dir)
    if not records:
        print(f"{run_dir}: no finished round yet")
        return 0
    print_rounds(records)
    for record in records[:-1]:  # the last round's rejections are printed with the tables
        for rejected in record.get("rejected") or []:
            print(f"round {record['round']}: {rejected['phase']} reply from {rejected['site']} rejected: "
                  f"{rejected['reason']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from server.report import write_report  # matplotlib only when plotting

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        print(f"error: {run_dir} is not a clinicfl run directory (no config.json)", file=sys.stderr)
        return 2
    try:
        results = write_report(run_dir, Path(args.out) if args.out else None)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, outcome in results:
        print(f"{name:20s} {outcome}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinicfl-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="per-round table of a run directory")
    status.add_argument("run_dir")
    status.set_defaults(func=cmd_status)
    report = sub.add_parser("report", help="write PNG plots of a run")
    report.add_argument("run_dir")
    report.add_argument("--out", help="folder for the PNGs (default RUN_DIR/report)")
    report.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
