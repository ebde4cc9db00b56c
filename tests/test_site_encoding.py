"""A site's first start encodes while it decodes: the same features as encoding after reading,
nothing encoded early on a warm start, a failed worker costs only the overlap, and the reading
shows its progress with the time left in the site's log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from common.config import DataConfig, ModelConfig
from common.data.site import load_site
from common.inference import prepare_inputs
from common.model import build_model
from common import progress
from common import site_encoding
from common.site_encoding import OverlappedEncoder, load_encoded_site


def _break_one_study(site: Path) -> str:
    victim = sorted((site / "studies").iterdir())[3]
    for path in victim.rglob("*.dcm"):
        path.write_bytes(b"this is not DICOM")
    return victim.name


def test_first_start_gives_the_features_of_encoding_after_reading(site: Path, tmp_path: Path,
                                                                   tiny_model_config: ModelConfig,
                                                                   tiny_data_config: DataConfig) -> None:
    broken = _break_one_study(site)  # the rows of the usable studies must still line up
    model = build_model(tiny_model_config)
    device = torch.device("cpu")
    data, inputs = load_encoded_site(model, site, tiny_data_config, 1, device, tmp_path / "cache", progress=False)
    assert broken not in data.studies and len(data.studies) == 15
    after = prepare_inputs(model, load_site(site, tiny_data_config, 1, progress=False), None, device)
    assert inputs.is_features and inputs.inputs.shape == after.inputs.shape
    torch.testing.assert_close(inputs.inputs, after.inputs, rtol=1e-5, atol=1e-5)
    assert inputs.inputs.abs().sum() > 0
    again, cached = load_encoded_site(model, site, tiny_data_config, 1, device, tmp_path / "cache", progress=False)
    assert again.profile.cache_hits == 16, "the second start reads the preprocess cache"
    assert torch.equal(cached.inputs, inputs.inputs), "and the feature cache"


def test_a_warm_start_encodes_nothing_early(site: Path, tmp_path: Path, tiny_model_config: ModelConfig,
                                           tiny_data_config: DataConfig) -> None:
    model = build_model(tiny_model_config)
    cache = tmp_path / "preprocessed"
    first = OverlappedEncoder(model, torch.device("cpu"), tiny_data_config, batch_size=5)
    load_site(site, tiny_data_config, 1, progress=False, cache_dir=cache, on_read=first.submit)
    assert len(first.finish()) == 16, "decoded now: every study encoded while reading (in batches of 5)"
    warm = OverlappedEncoder(model, torch.device("cpu"), tiny_data_config)
    load_site(site, tiny_data_config, 1, progress=False, cache_dir=cache, on_read=warm.submit)
    assert warm.finish() == {}, "from the preprocess cache: the feature cache has them"


def test_a_failed_worker_falls_back_to_encoding_after_reading(site: Path, tmp_path: Path,
                                                              tiny_model_config: ModelConfig,
                                                              tiny_data_config: DataConfig,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    model = build_model(tiny_model_config)
    device = torch.device("cpu")
    expected = prepare_inputs(model, load_site(site, tiny_data_config, 1, progress=False), None, device).inputs

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(site_encoding, "encode", fails)
    encoder = OverlappedEncoder(model, device, tiny_data_config, batch_size=4, queued_batches=1)
    load_site(site, tiny_data_config, 1, progress=False, cache_dir=tmp_path / "p", on_read=encoder.submit)
    with caplog.at_level(logging.WARNING):
        assert encoder.finish() == {}, "every batch after the failure is drained, the reader never blocks"
    assert "encoding after reading instead" in caplog.text
    with caplog.at_level(logging.WARNING):
        _, inputs = load_encoded_site(model, site, tiny_data_config, 1, device, tmp_path / "cache", progress=False)
    torch.testing.assert_close(inputs.inputs, expected, rtol=1e-5, atol=1e-5)


def test_reading_logs_its_progress_with_the_time_left(site: Path, tiny_data_config: DataConfig,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)  # a daemon's log, not a terminal
    with caplog.at_level(logging.INFO, logger="common.progress"):
        load_site(site, tiny_data_config, 1, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "common.progress"]
    assert lines and lines[-1].startswith("reading site: 16/16 (100%)")
    assert all("ETA" in line and "study/s" in line for line in lines)
