"""The site's own log: ``STATE_DIR/logs/site.log``.

Everything clinicfl logs while a site handles a message (warnings about skipped studies, the
traceback of an unexpected error) can name local paths, study folders or header values. It goes
to the site's own log file only, never to the process's console: in a simulation the console of
every ClientApp is the centre's console, and in a deployment the SuperNode's output may be
collected by other tools. The console gets one line per problem with its reason code.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SITE_LOGGERS = ("client", "common")  # the packages whose records can carry site data
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
console = logging.getLogger("clinicfl.site")  # PHI-free summaries only: codes, counts, type names


def site_log_path(state_dir: Path) -> Path:
    return state_dir / "logs" / "site.log"


@contextmanager
def site_logging(state_dir: Path) -> Iterator[Path]:
    """Send the site packages' log records to the site's log file (and nowhere else) for the
    duration; falls back to the console only when the state dir cannot hold a log file."""
    path = site_log_path(state_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        console.warning("cannot write the site log in %s (%s): site messages go to the console",
                        state_dir, exc.strerror or type(exc).__name__)
        yield path
        return
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(name) for name in SITE_LOGGERS]
    saved = [(logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        for logger, (propagate, level) in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)
        handler.close()
