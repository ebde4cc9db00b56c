"""What a DP round leaves behind in its process: no warning filter, no allocator setting. The
allocator setting is the site's, made once per process where it starts DP work."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client import app as client_app
from client import privacy
from client.session import open_session
from common.config import RunConfig, SiteConfig
from common.data.site import load_site
from common.inference import fit_feature_norm, prepare_inputs
from common.model import build_model
from tests.conftest import site_message

RUN = {"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8, "batch-size": 4,
       "local-epochs": 1, "num-rounds": 3, "dp-enabled": True, "dp-target-epsilon": 8.0,
       "dp-noise-multiplier": 1.0, "feature-norm": "none"}  # a given noise: no calibration, which takes seconds and is not tested here
HOOK_WARNING = "Full backward hook is firing"


class _RecordingLibc:
    """Stands in for glibc: records mallopt calls and accepts them."""

    def __init__(self) -> None:
        self.mallopt_calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.mallopt_calls.append((parameter, value))
        return 1


@pytest.fixture
def recording_libc(monkeypatch: pytest.MonkeyPatch):
    """glibc replaced by a recorder, and the once-per-process memo cleared before and after, so the
    test sees the first call of a fresh process and leaves none behind for the next test."""
    libc = _RecordingLibc()
    privacy.keep_large_allocations_in_heap.cache_clear()
    monkeypatch.setattr(privacy.ctypes, "CDLL", lambda name: libc)
    yield libc
    privacy.keep_large_allocations_in_heap.cache_clear()


def test_the_heap_setting_is_made_once_per_process(recording_libc):
    assert privacy.keep_large_allocations_in_heap() is True
    assert privacy.keep_large_allocations_in_heap() is True
    assert recording_libc.mallopt_calls == [(-3, 1 << 30), (-1, 1 << 30)], "mmap then trim threshold, once"


def test_a_dp_round_leaves_no_warning_filter_and_no_allocator_setting(tiny_clinics, recording_libc):
    config = RunConfig.from_mapping(RUN)
    data = load_site(tiny_clinics[0], config.data, 1, progress=False)
    device = torch.device("cpu")
    model = build_model(config.model)
    inputs = prepare_inputs(model, data, None, device)
    fit_feature_norm(model, inputs, data.train_index, device)
    units = privacy.privacy_units(data.train_index, data.groups, "study")
    budget = privacy.SitePrivacy.resolve(config.privacy, SiteConfig(tiny_clinics[0], Path("unused"), "a"), len(units))
    charge = privacy.reserve_round(privacy.PrivacyLedger("rdp"), config, budget, len(units))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        result = privacy.train_private(model, inputs, units, config, budget, charge, device)
        assert warnings.filters == filters, "the round's warning filters ended with the round"
    assert result.steps == charge.steps
    assert not [w for w in caught if HOOK_WARNING in str(w.message)], "inside the round, torch's hook warning is off"
    assert recording_libc.mallopt_calls == [], "training itself does not touch the allocator"


def test_the_site_sets_the_heap_where_it_starts_dp_work_once_per_process(site, tmp_path, recording_libc):
    open_session.cache_clear()
    context = Context(run_id=7, node_id=1, node_config={"data-path": str(site), "state-dir": str(tmp_path / "state"),
                                                        "site-name": "site-a"},
                      state=RecordDict(), run_config=RUN)
    for server_round in (1, 2):
        out = client_app.train(site_message(RUN, "train", server_round), context)
        assert out.content["site"]["status"] == "ok"
    assert recording_libc.mallopt_calls == [(-3, 1 << 30), (-1, 1 << 30)], "set at the first DP round only"
