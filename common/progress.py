"""Progress of long site work (reading, encoding) with its rate and time left, wherever it runs.

On a terminal: a tqdm bar. Where stderr is not a terminal (a SuperNode daemon, a service's log):
the count, percentage, rate, elapsed time and time left as a log record at most every
``LOG_EVERY_S`` seconds, so that a site admin who tails the log of a 2,000-study first start
sees how far it is and how long it will take. TQDM_DISABLE=1 silences both.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)  # under "common": a site's records go to its own log (client/sitelog.py)

LOG_EVERY_S = 30.0
T = TypeVar("T")


class _LogLines:
    """A file for tqdm that turns each refreshed line into one log record."""

    def write(self, text: str) -> None:
        line = text.strip("\r\n \x1b[A")
        if line:
            log.info("%s", line)

    def flush(self) -> None:
        pass


def progress_bar(items: Iterable[T], desc: str, unit: str, total: int | None = None,
                 enabled: bool = True) -> Iterable[T]:
    """``items`` with progress shown as the module docstring says; ``enabled`` False shows none."""
    if not enabled:
        return items
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, unit=unit, total=total, leave=False)
    return tqdm(items, desc=desc, unit=f" {unit}", total=total, file=_LogLines(), mininterval=LOG_EVERY_S,
                bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {rate_fmt}, "
                           "elapsed {elapsed}, ETA {remaining}")
