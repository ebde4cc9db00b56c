"""Durable file writes shared by the server (run directory) and the sites (privacy ledger, caches)."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 3600.0  # another process may be computing the same cached tensor


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file of its own, fsync, rename: a crash leaves the old file or the new
    one, never half of one, and two writers of the same path never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save, atomically (see atomic_write_bytes)."""
    import torch  # the server's CLI reads files without needing torch at import time

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_or_compute(path: Path, compute: Callable[[], "Tensor"], what: str) -> "Tensor":
    """The tensor kept in ``path``: loaded when it is there, else computed and kept.

    One process computes; another one that wants the same file waits on its lock and loads the
    result instead of computing it again. A cache that cannot be used costs time, never the
    result: a folder that cannot be written and a torn or foreign file are logged (``what`` names
    the cache) and the tensor is computed."""
    import torch
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_suffix(".lock")), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except OSError as exc:
        log.warning("cannot use the %s in %s (%s); set node config state-dir to a writable folder",
                    what, path.parent, exc.strerror or type(exc).__name__)
        return compute()
    try:
        if path.is_file():
            try:
                # Mapped, not read: a 2,000-study site's features stay in the page cache, which the
                # system reclaims, instead of the process's own memory.
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # a torn or foreign file: recompute, never trust it
                log.warning("%s %s unreadable (%s); recomputing", what, path.name, type(exc).__name__)
        value = compute()
        try:
            atomic_torch_save(value, path)
        except OSError as exc:
            log.warning("cannot write the %s in %s (%s)", what, path.parent, exc.strerror or type(exc).__name__)
        return value
    finally:
        lock.release()
