"""FedProx: Flower's FedProx strategy sends mu; the sites' local loss gets mu/2 ||w - w_global||^2
(with and without DP). mu = 0 is FedAvg; a large mu keeps the local model near the global one."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.config import RunConfig
from common.exchange import ParamSpec, trainable_state
from common.inference import fit_feature_norm, pick_device, prepare_inputs
from common.model import build_model
from common.data.site import load_site
from common.training import train_local
from server.strategy import ClinicFedProx, make_strategy
from server.strategy_config import StrategyConfig

RUN = {"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8, "dropout": 0.0,
       "recon-head": False, "severity-head": False, "batch-size": 4, "local-epochs": 2, "lr": 0.01}


class _Grid:
    def get_node_ids(self):
        return [11, 22]


def test_flowers_fedprox_strategy_sends_mu_with_every_train_message():
    from simulations.inprocess import _task_identity  # messages take their run id from the task identity

    spec = {"w": ParamSpec((2,), np.dtype("float32"))}
    strategy = make_strategy(StrategyConfig(spec=spec, backbone_hash="h", label_names=["injury"], min_sites=1,
                                            aggregation="fedprox", proximal_mu=0.5))
    assert isinstance(strategy, ClinicFedProx)
    with _task_identity(1):
        messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                                                 ConfigRecord({}), _Grid()))
    assert len(messages) == 2 and all(m.content["config"]["proximal-mu"] == 0.5 for m in messages)
    assert not isinstance(make_strategy(StrategyConfig(spec=spec, backbone_hash="h", label_names=["injury"],
                                                       min_sites=1, proximal_mu=0.5)), ClinicFedProx)


def _site(tiny_clinics):
    config = RunConfig.from_mapping(RUN)
    data = load_site(tiny_clinics[0], config.data, 1, progress=False)
    return config, data


def _trained(config, data, mu: float) -> tuple[dict, dict]:
    model = build_model(config.model)
    device = pick_device()
    inputs = prepare_inputs(model, data, None, device)
    fit_feature_norm(model, inputs, data.train_index, device)
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    train_local(model, inputs, data.train_index, config.train, device, server_round=1, proximal_mu=mu)
    return start, {k: v.clone() for k, v in trainable_state(model).items()}


def _distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_mu_zero_is_fedavg_and_a_large_mu_keeps_the_local_model_near_the_global_one(tiny_clinics):
    config, data = _site(tiny_clinics)
    start, plain = _trained(config, data, 0.0)
    _, zero = _trained(config, data, 0.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain), "same seed, mu 0: identical to plain training"
    _, small = _trained(config, data, 0.01)
    _, large = _trained(config, data, 100.0)
    moved = _distance(start, plain)
    assert moved > 0.05
    assert _distance(start, small) < moved + 1e-6
    assert _distance(start, large) < 0.25 * moved, "mu = 100 pulls every step back to the global model"


def test_the_proximal_term_under_dp_keeps_the_model_near_the_global_one(tiny_clinics):
    from client.privacy import PrivacyLedger, SitePrivacy, privacy_units, reserve_round, train_private
    from common.config import SiteConfig

    run = {**RUN, "dp-enabled": True, "dp-noise-multiplier": 0.5, "dp-target-epsilon": 1e6, "feature-norm": "none"}
    config = RunConfig.from_mapping(run)
    data = load_site(tiny_clinics[0], config.data, 1, progress=False)
    distances = {}
    for mu in (0.0, 100.0):
        model = build_model(config.model)
        device = pick_device()
        inputs = prepare_inputs(model, data, None, device)
        fit_feature_norm(model, inputs, data.train_index, device)
        start = {k: v.clone() for k, v in trainable_state(model).items()}
        units = privacy_units(data.train_index, data.groups, "study")
        site = SiteConfig(tiny_clinics[0], tiny_clinics[0] / ".unused", "a")
        budget = SitePrivacy.resolve(config.privacy, site, len(units))
        charge = reserve_round(PrivacyLedger("rdp"), config, budget, len(units))
        result = train_private(model, inputs, units, config, budget, charge, device, proximal_mu=mu)
        assert result.steps == charge.steps, "the proximal step does not change what is accounted"
        distances[mu] = _distance(start, dict(trainable_state(model)))
    assert distances[100.0] < 0.5 * distances[0.0]


def test_a_sites_round_trains_alike_whatever_its_process_drew_before(tiny_clinics):
    """Dropout draws from torch's global generator, which a simulation's worker shares between the
    sites it serves in no fixed order: the round seeds it, and hands the caller's state back."""
    config = RunConfig.from_mapping({**RUN, "dropout": 0.5})
    data = load_site(tiny_clinics[0], config.data, 1, progress=False)
    device = pick_device()
    model = build_model(config.model)
    inputs = prepare_inputs(model, data, None, device)
    fit_feature_norm(model, inputs, data.train_index, device)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trained = []
    for draws in (0, 7):
        model.load_state_dict(start)
        torch.rand(draws)  # another site's round, before this one
        before = torch.get_rng_state()
        train_local(model, inputs, data.train_index, config.train, device, server_round=3)
        assert torch.equal(torch.get_rng_state(), before), "the caller's generator is left as it was"
        trained.append({k: v.clone() for k, v in trainable_state(model).items()})
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    model.load_state_dict(start)
    train_local(model, inputs, data.train_index, config.train, device, server_round=4)
    other_round = trainable_state(model)
    assert any(not torch.equal(trained[0][k], v) for k, v in other_round.items()), "another round trains otherwise"
