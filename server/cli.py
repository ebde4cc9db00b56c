"""clinicfl-server: coordinating-centre commands.

    clinicfl-server status RUN_DIR     the per-round table of a run directory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

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
    print_rounds(records, Console())
    for record in records:
        for rejected in record.get("rejected") or []:
            print(f"round {record['round']}: {rejected['phase']} reply from {rejected['site']} rejected: "
                  f"{rejected['reason']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinicfl-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="per-round table of a run directory")
    status.add_argument("run_dir")
    status.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
