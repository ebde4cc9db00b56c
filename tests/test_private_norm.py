"""Under DP a site standardises its features with the centre's public statistics and its own mean
released under DP, charged to the same ledger as DP-SGD: no statistic fitted on the training
studies without noise shapes the training (common/private_norm.py, client/privacy.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client import app as client_app
from client.privacy import PrivacyLedger, SitePrivacy
from common.dp_plan import MAX_SGD_NOISE_INCREASE, RDP_ORDERS, RELEASE_GRID, PlannedRun
from client.session import open_session
from common.config import ConfigError, RunConfig
from common.model import FEATURE_DIM
from common.private_norm import PublicNorm, ReleasedNorm, public_clip, release, unit_means
from tests.conftest import site_message

RUN = {"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8, "batch-size": 4,
       "local-epochs": 1, "num-rounds": 3, "dp-enabled": True, "dp-target-epsilon": 8.0,
       # given noises: no calibration (seconds, tested below on its own)
       "dp-noise-multiplier": 1.0, "dp-feature-norm-noise": 2.0,
       "server-val-path": "/centre/public-clinic"}  # the centre's; a site never reads it


def _units(n: int, images: int, dim: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    g = torch.Generator().manual_seed(seed)
    features = shift + torch.randn(n, images, dim, generator=g)
    return features, torch.ones(n, images, dtype=torch.bool), [np.array([i]) for i in range(n)]


def _identity(dim: int, clip: float) -> PublicNorm:
    return PublicNorm(torch.zeros(dim), torch.ones(dim), clip)


def test_the_release_finds_the_sites_own_mean_and_shrinks_what_is_only_noise():
    # R from a public clinic like the site without its shift: twice its 0.9 quantile of norms.
    public_features, public_mask, _ = _units(200, 3, 64, shift=0.0, seed=9)
    public = _identity(64, public_clip(public_features, public_mask, torch.zeros(64), torch.ones(64)))
    assert public.clip == pytest.approx(2 * 8 / 3 ** 0.5, rel=0.2), "a unit's mean of 3 images: norm about 8 / sqrt(3)"
    features, mask, units = _units(400, 3, 64, shift=1.5, seed=0)
    shifted = release(unit_means(features, mask, units, public), public, 2.0, "k", torch.Generator().manual_seed(1))
    # every unit (norm about 12.6) is clipped to R (about 9.2): the release moves the mean most of the way
    assert shifted.clip == public.clip
    assert (shifted.mean - 1.5 * public.clip / 12.6).abs().max() < 0.4 and shifted.shrink > 0.9
    features, mask, units = _units(400, 3, 64, shift=0.0, seed=2)
    same = release(unit_means(features, mask, units, public), public, 2.0, "k", torch.Generator().manual_seed(3))
    # no shift: what the release shows is the sample mean's own scatter (0.03) under noise of 0.05
    assert same.shrink < 0.1 and same.mean.abs().max() < 0.02, "a site like the public clinic stays at its mean"
    few = release(unit_means(features[:20], mask[:20], units[:20], public), public, 2.0, "k",
                  torch.Generator().manual_seed(4))
    assert few.shrink == 0.0, "20 units: the release is within the noise's margin"
    assert torch.equal(same.inv_std, public.inv_std), "the spread is the public one"


def test_one_unit_moves_the_released_sum_by_at_most_the_clip_norm():
    """The sensitivity the noise is scaled to: adding one unit, however extreme, changes the
    clipped sum by at most R (with the noise off, so the sums can be compared)."""
    public = _identity(32, 4.0)
    features, mask, units = _units(200, 2, 32, shift=0.5, seed=4)
    outlier = torch.full((1, 2, 32), 1e6)
    base = release(unit_means(features, mask, units, public), public, 0.0, "k", torch.Generator())
    more = release(unit_means(torch.cat([features, outlier]), torch.ones(201, 2, dtype=torch.bool),
                              [*units, np.array([200])], public), public, 0.0, "k", torch.Generator())
    assert base.clip == more.clip
    moved = (more.mean * 201 - base.mean * 200).norm()
    assert moved <= base.clip * (1 + 1e-4), (float(moved), base.clip)
    assert moved > 0.5 * base.clip, "the outlier is clipped, not dropped"


def test_the_run_config_refuses_site_standardisation_under_dp_without_public_statistics():
    no_public = {k: v for k, v in RUN.items() if k != "server-val-path"}
    with pytest.raises(ConfigError, match="public feature statistics"):
        RunConfig.from_mapping(no_public)
    RunConfig.from_mapping({**no_public, "feature-norm": "none"})  # nothing to standardise: allowed


def test_the_sgd_noise_is_calibrated_with_the_release_charged():
    config = RunConfig.from_mapping({**RUN, "dp-noise-multiplier": 0.0, "num-rounds": 2})
    budget = SitePrivacy(8.0, 1e-5, 1.0, "rdp")
    plan = PlannedRun.of(config, 40)
    alone = plan.noise_multiplier(budget, [])
    release_sigma, with_release = plan.calibrate(budget, release=True)
    assert alone < with_release <= MAX_SGD_NOISE_INCREASE * alone * (1 + 1e-3)
    assert release_sigma in RELEASE_GRID[1:-1], "neither end of the grid at epsilon 8"
    smaller = RELEASE_GRID[RELEASE_GRID.index(release_sigma) - 1]
    assert plan.noise_multiplier(budget, [[smaller, 1.0, 1]]) > MAX_SGD_NOISE_INCREASE * alone, "the smallest that fits"

    def epsilon(sigma: float) -> float:
        accountant = RDPAccountant()
        accountant.history = [(release_sigma, 1.0, 1), (sigma, plan.sample_rate, plan.steps)]
        return accountant.get_epsilon(1e-5, alphas=RDP_ORDERS)

    assert epsilon(with_release) <= 8.0 + 1e-6 < epsilon(0.99 * with_release)


def _public_for(site, run: dict) -> PublicNorm:
    """Statistics standing in for the centre's clinic: shifted from this site's own."""
    config = RunConfig.from_mapping(run)
    session = open_session(config, _site_config(site, config))
    private_mean = session.model.feature_norm.mean.clone()
    return PublicNorm(private_mean * 0.9, session.model.feature_norm.inv_std.clone(), 60.0)


def _site_config(site, config):
    from common.config import SiteConfig

    return SiteConfig.from_node_config({"data-path": str(site), "state-dir": str(site.parent / "state"),
                                        "site-name": "site-a"}, config.federation)


def _context(site, run: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=7, node_id=1, node_config={"data-path": str(site), "state-dir": str(site.parent / "state"),
                                                      "site-name": "site-a"}, state=RecordDict(), run_config=run)


def test_a_dp_site_trains_on_public_statistics_and_its_released_mean_charged_once(site):
    open_session.cache_clear()
    public = _public_for(site, RUN)
    private_mean = open_session(RunConfig.from_mapping(RUN),
                                _site_config(site, RunConfig.from_mapping(RUN))).model.feature_norm.mean.clone()
    context = _context(site, RUN)
    ledger_path = site.parent / "state" / "privacy" / "run-run-7.json"

    # Round 0's evaluation comes before any training: public statistics, nothing charged.
    evaluated = client_app.evaluate(site_message(RUN, "evaluate", 0, extra_config=public.to_config()), context)
    assert evaluated.content["site"]["status"] == "ok"
    assert json.loads(ledger_path.read_text())["history"] == []
    session = open_session(RunConfig.from_mapping(RUN), _site_config(site, RunConfig.from_mapping(RUN)))
    assert torch.equal(session.model.feature_norm.mean, public.mean)

    for rnd in (1, 2):
        out = client_app.train(site_message(RUN, "train", rnd, extra_config=public.to_config()), context)
        assert out.content["site"]["status"] == "ok", dict(out.content["site"])
    ledger = json.loads(ledger_path.read_text())
    assert ledger["history"][0] == [2.0, 1.0, 1], "the release is charged first, once"
    assert [entry[1] for entry in ledger["history"]].count(1.0) == 1
    released = ledger["feature_norm"]
    assert released["units"] == len(session.data.train_index) and released["clip"] > 0
    # The standardisation in force is the release, not the private fit. At about 10 training units
    # the noise (sigma R / n on each of 2048 features) dwarfs any shift, and the James-Stein factor
    # keeps (nearly) the public mean (the synthetic test above shows a release that moves it).
    mean = session.model.feature_norm.mean
    assert torch.equal(mean, ReleasedNorm.from_json(released).mean) and not torch.allclose(mean, private_mean)
    assert 0.0 <= released["shrink"] < 0.05, released["shrink"]
    assert torch.equal(session.model.feature_norm.inv_std, public.inv_std)
    # The epsilon the site reports composes the release and every DP-SGD step.
    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in ledger["history"]]
    delta = out.content["metrics"]["dp-delta"]
    assert out.content["metrics"]["dp-epsilon"] == pytest.approx(accountant.get_epsilon(delta, alphas=RDP_ORDERS))
    assert out.content["metrics"]["dp-epsilon"] > PrivacyLedger("rdp", ledger["history"][1:]).epsilon(delta)


def test_a_dp_site_without_public_statistics_refuses_with_a_reason_code(site):
    open_session.cache_clear()
    out = client_app.train(site_message(RUN, "train", 1), _context(site, RUN))
    assert out.content["site"]["reason"] == "public-statistics-missing"
    assert not (site.parent / "state" / "privacy" / "run-run-7.json").is_file() or \
        json.loads((site.parent / "state" / "privacy" / "run-run-7.json").read_text())["history"] == []


def test_public_statistics_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="finite"):
        PublicNorm.from_config({"public-feature-mean": [0.0] * 3, "public-feature-inv-std": [1.0] * 3,
                                "public-feature-clip": 10.0}, FEATURE_DIM)
    with pytest.raises(ValueError, match="clip norm"):
        PublicNorm.from_config({"public-feature-mean": [0.0] * FEATURE_DIM, "public-feature-inv-std": [1.0] * FEATURE_DIM,
                                "public-feature-clip": -1.0}, FEATURE_DIM)
