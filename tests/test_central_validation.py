"""The centre's validation clinic is read and encoded once: later runs load its caches."""

from __future__ import annotations

from pathlib import Path

import torch

from common.config import RunConfig
from common.model import build_model
from server.evaluation import CentralValidation, central_cache_dir


def test_the_second_run_reads_the_validation_clinic_from_its_caches(site: Path, tmp_path: Path) -> None:
    config = RunConfig.from_mapping({"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8,
                                     "attn-dim": 8, "severity-head": False, "recon-head": False})
    cache = central_cache_dir(tmp_path / "runs")
    first = CentralValidation(config, site, build_model(config.model), cache)
    assert first.site.profile.cache_misses == len(first.site.studies) and first.site.profile.cache_hits == 0
    (features,) = list(cache.glob("features-*.pt"))
    features.write_bytes(b"")  # a torn file is recomputed, never trusted
    again = CentralValidation(config, site, build_model(config.model), cache)
    assert again.site.profile.cache_hits == len(again.site.studies) and again.site.profile.cache_misses == 0
    assert features.stat().st_size > 0, "the torn file is replaced"
    third = CentralValidation(config, site, build_model(config.model), cache)
    assert torch.equal(third.inputs.inputs, first.inputs.inputs), "cached features equal the computed ones"
    assert torch.equal(third.model.feature_norm.mean, first.model.feature_norm.mean)
