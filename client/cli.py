"""clinicfl-client: site-side commands.

    clinicfl-client check-data SITE_DIR [--image-size 64 --seq-len 8 --num-labels 1]

Reads the site exactly as training would and prints what it found, on this screen only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.config import ConfigError, DataConfig
from common.data.errors import DataError
from common.data.site import load_site


def cmd_check_data(args: argparse.Namespace) -> int:
    config = DataConfig(image_size=args.image_size, seq_len=args.seq_len, series_description=args.series_description,
                        test_fraction=args.test_fraction)
    site = load_site(Path(args.site_dir), config, args.num_labels, progress=sys.stderr.isatty())
    table = Table(title=f"site {Path(args.site_dir).name}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("usable studies", str(len(site.studies)))
    table.add_row("train / test", f"{len(site.train_index)} / {len(site.test_index)}")
    table.add_row("images used", str(int(site.mask.sum())))
    for j, name in enumerate(site.label_names):
        positives = int(site.labels[:, j].sum())
        table.add_row(f"{name}: positive / negative", f"{positives} / {len(site.studies) - positives}")
    if np.isfinite(site.targets).any():
        table.add_row("studies with a severity target", str(int(np.isfinite(site.targets).sum())))
    table.add_row("skipped studies", str(len(site.skipped)))
    console = Console()
    console.print(table)
    if site.quarantine:
        # Relative paths on this screen only: they never go to the server.
        by_reason: dict[str, list[str]] = {}
        for path, code in site.quarantine:
            by_reason.setdefault(code, []).append(path)
        quarantine = Table(title="quarantine (left out, with the reason)")
        for column in ("reason", "count", "examples"):
            quarantine.add_column(column)
        for code, paths in sorted(by_reason.items()):
            quarantine.add_row(code, str(len(paths)), ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else ""))
        console.print(quarantine)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="clinicfl-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-data", help="read a site folder and summarise what training would use")
    check.add_argument("site_dir")
    defaults = DataConfig()
    check.add_argument("--image-size", type=int, default=defaults.image_size)
    check.add_argument("--seq-len", type=int, default=defaults.seq_len)
    check.add_argument("--num-labels", type=int, default=1)
    check.add_argument("--series-description", default=defaults.series_description)
    check.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    check.set_defaults(func=cmd_check_data)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ConfigError) as exc:
        # One line a site admin can act on, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
