"""A site's first start: DICOM decoding and the frozen backbone at the same time.

Reading a site decodes its DICOM files study by study; the first encode then runs the ResNet50
over every image. One after the other, a 1,000-study site spends the decode time with the
backbone idle (on a GPU site, the GPU waits for the CPU the whole time). Here the backbone runs on
a worker thread and encodes each batch of studies as soon as the reader has decoded it, while the
reader goes on to the next files (torch's kernels release the GIL, and so do numpy's resize and
pydicom's pixel decoding). Studies taken from the preprocess cache are not encoded early: on a
warm start their features are in the feature cache already, and nothing is computed twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.config import DataConfig
from common.data.cache import StudyResult
from common.data.site import SiteData, load_site
from common.data.study import StudySource
from common.inference import SiteInputs, encode, prepare_inputs
from common.model import InjuryNet

log = logging.getLogger(__name__)


class OverlappedEncoder:
    """Backbone features of the studies the reader has just decoded, computed on a worker thread.

    ``submit`` is the reader's ``on_read`` hook; ``finish`` waits for the last batch and returns
    the features by study. A queue of ``queued_batches`` batches bounds the decoded images held in
    memory when decoding runs ahead of the backbone."""

    def __init__(self, model: InjuryNet, device: torch.device, config: DataConfig, batch_size: int = 32,
                 queued_batches: int = 2) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.shape = (config.seq_len, config.image_size, config.image_size)
        self.features: dict[str, Tensor] = {}
        self._pending: list[tuple[str, np.ndarray]] = []
        self._queue: queue.Queue[list[tuple[str, np.ndarray]] | None] = queue.Queue(maxsize=queued_batches)
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="clinicfl-encoder", daemon=True)
        self._worker.start()

    def submit(self, source: StudySource, result: StudyResult, decoded_now: bool) -> None:
        if not decoded_now or result.images is None or self._error is not None:
            return
        self._pending.append((source.label.study, result.images.images))
        if len(self._pending) == self.batch_size:
            self._send()

    def finish(self) -> dict[str, Tensor]:
        """Every submitted study's features (N of them: (T, 2048) each); {} when the worker failed
        (the caller then encodes after reading, as without overlap)."""
        self._send()
        self._queue.put(None)
        self._worker.join()
        if self._error is not None:
            log.warning("encoding while reading failed (%s: %s); encoding after reading instead",
                        type(self._error).__name__, self._error)
            return {}
        return self.features

    def _send(self) -> None:
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    def _work(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the reader must never block on a full queue
            try:
                self._encode(batch)
            except Exception as exc:  # noqa: BLE001 - reported by finish(); the reader goes on
                self._error = exc

    def _encode(self, batch: list[tuple[str, np.ndarray]]) -> None:
        # The rows exactly as the site's arrays hold them (common/data/site.py _padded): images
        # first, zeros after the study's last one.
        images = np.zeros((len(batch), *self.shape), dtype=np.float32)
        mask = np.zeros((len(batch), self.shape[0]), dtype=bool)
        for row, (_, study) in enumerate(batch):
            images[row, :len(study)] = study
            mask[row, :len(study)] = True
        features = encode(self.model, torch.from_numpy(images).unsqueeze(2), torch.from_numpy(mask), self.device,
                          batch_size=len(batch), progress=False)
        for (study, _), row in zip(batch, features):
            self.features[study] = row


def load_encoded_site(model: InjuryNet, site_dir: Path, config: DataConfig, num_labels: int | None,
                      device: torch.device, cache_dir: Path | None, layout: str = "auto",
                      progress: bool = True) -> tuple[SiteData, SiteInputs]:
    """``load_site`` and ``prepare_inputs`` as one step, the first encode overlapped with decoding
    (module docstring). ``cache_dir`` holds the feature cache, and the preprocess cache in its
    ``preprocessed`` folder."""
    preprocessed = cache_dir / "preprocessed" if cache_dir is not None else None
    if model.config.freeze != "frozen":  # the backbone trains: there are no features to cache
        site = load_site(site_dir, config, num_labels, progress, layout, preprocessed)
        return site, prepare_inputs(model, site, cache_dir, device)
    encoder = OverlappedEncoder(model, device, config)
    try:
        site = load_site(site_dir, config, num_labels, progress, layout, preprocessed, on_read=encoder.submit)
    finally:
        ready = encoder.finish()
    return site, prepare_inputs(model, site, cache_dir, device, ready=ready)
