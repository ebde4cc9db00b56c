"""The site's cache of preprocessed studies: decoded, windowed, resized arrays.

An entry is keyed by the content of every input file of the study (and their names relative to
the site) plus the preprocessing settings, so an edited file or a new image size is a miss and
never a stale hit. A study that could not be used is cached too, with its reason: a second run
reads no DICOM at all. Entries stay in the site's state dir, beside the feature cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from common.data.errors import StudyError
from common.data.study import Quarantine, StudyImages, StudySource
from common.files import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_VERSION = "3"  # bump when what is stored changes (2: pydicom's VOI LUT Function; 3: subgroups)


@dataclass
class StudyResult:
    """A study after preprocessing: its images, or the reason it cannot be used."""

    images: StudyImages | None
    error: StudyError | None
    quarantine: Quarantine  # unusable files of this study, relative to the site folder


class PreprocessCache:
    def __init__(self, folder: Path, site_dir: Path, settings: str) -> None:
        self.folder = folder
        self.site_dir = site_dir
        self.settings = settings
        self.hits = 0
        self.misses = 0

    def key(self, source: StudySource) -> str:
        digest = hashlib.sha256(f"{CACHE_VERSION}|{self.settings}".encode())
        for path in source.files:
            digest.update(str(path.relative_to(self.site_dir)).encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:40]

    def get(self, key: str) -> StudyResult | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                images = None
                if meta["error"] is None:
                    images = StudyImages(stored["images"].astype(np.float32), meta["modality"], meta["series"],
                                         meta["files"], list(meta["sizes"]),
                                         tuple(tuple(pair) for pair in meta["subgroups"]))
        except Exception as exc:  # a torn or foreign file is a miss, never trusted
            log.warning("preprocess cache entry %s unreadable (%s); reading the study again", path.name,
                        type(exc).__name__)
            self.misses += 1
            return None
        self.hits += 1
        error = StudyError(*meta["error"]) if meta["error"] is not None else None
        return StudyResult(images, error, [tuple(q) for q in meta["quarantine"]])

    def put(self, key: str, result: StudyResult) -> None:
        path = self._path(key)
        images = result.images
        meta = {
            "error": [result.error.code, str(result.error)] if result.error is not None else None,
            "quarantine": result.quarantine,
            "modality": images.modality if images else "",
            "series": images.series if images else 0,
            "files": images.files if images else 0,
            "sizes": images.sizes if images else [],
            "subgroups": [list(pair) for pair in images.subgroups] if images else [],
        }
        buffer = io.BytesIO()
        np.savez(buffer, images=images.images if images else np.zeros(0, np.float32), meta=np.array(json.dumps(meta)))
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:  # a read-only state dir costs speed, not the run
            log.warning("cannot write the preprocess cache in %s (%s)", self.folder, exc.strerror or exc)

    def locked(self, timeout: float = 3600.0) -> FileLock:
        """The cache's lock: two processes reading one site decode it once (the second waits, then
        hits). A state dir that cannot hold a lock file gets a no-op lock."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return FileLock(str(self.folder / ".lock"), timeout=timeout)
        except OSError:
            return nullcontext()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"
