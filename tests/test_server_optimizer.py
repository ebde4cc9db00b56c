"""The centre's optimiser over the aggregate (FedAvgM, FedAdam) and logit adjustment against label
skew: the equations, the state a resumed run continues from, and what DP refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.config import ConfigError, RunConfig
from common.training import per_study_loss, prior_log_odds
from server.server_optimizer import ServerOptimizer


def _record(values: dict[str, list[float]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _values(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in record.items()}


W0 = {"w": [1.0, -2.0, 0.5], "b": [0.25]}
MEANS = [{"w": [0.8, -1.5, 0.5], "b": [0.0]}, {"w": [0.5, -1.0, 0.7], "b": [-0.1]}, {"w": [0.4, -1.1, 0.6], "b": [0.3]}]


def _run(optimizer: ServerOptimizer, start: dict, means: list[dict]) -> list[dict[str, np.ndarray]]:
    current, seen = _record(start), []
    for mean in means:
        current = optimizer.step(current, _record(mean))
        seen.append(_values(current))
    return seen


def test_none_is_fedavg_and_momentum_zero_at_rate_one_is_fedavg_too():
    for optimizer in (ServerOptimizer("none", 1.0, 0.9), ServerOptimizer("momentum", 1.0, 0.0)):
        for got, mean in zip(_run(optimizer, W0, MEANS), MEANS):
            for name in mean:
                np.testing.assert_allclose(got[name], mean[name], rtol=1e-6)


def test_momentum_is_heavy_ball_sgd_on_the_pseudo_gradient():
    lr, beta = 0.7, 0.9
    got = _run(ServerOptimizer("momentum", lr, beta), W0, MEANS)
    w = {k: np.asarray(v, dtype=np.float64) for k, v in W0.items()}
    buffer: dict[str, np.ndarray] = {}
    for r, mean in enumerate(MEANS):
        for name in w:
            g = w[name] - np.asarray(mean[name])
            buffer[name] = g if r == 0 else beta * buffer[name] + g
            w[name] = w[name] - lr * buffer[name]
            np.testing.assert_allclose(got[r][name], w[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[-1]["w"], MEANS[-1]["w"]), "momentum carries the earlier rounds' direction"


def test_adam_follows_flowers_fedadam():
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    got = _run(ServerOptimizer("adam", eta, beta_1, beta_2, tau), W0, MEANS)
    w = {k: np.asarray(v, dtype=np.float64) for k, v in W0.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for r, mean in enumerate(MEANS, start=1):
        # flwr.serverapp.strategy.FedAdam.aggregate_train, with its bias-corrected step size
        step = eta * np.sqrt(1 - beta_2 ** (r + 1)) / (1 - beta_1 ** (r + 1))
        for name in w:
            delta = np.asarray(mean[name]) - w[name]
            m[name] = beta_1 * m[name] + (1 - beta_1) * delta
            v[name] = beta_2 * v[name] + (1 - beta_2) * delta ** 2
            w[name] = w[name] + step * m[name] / (np.sqrt(v[name]) + tau)
            np.testing.assert_allclose(got[r - 1][name], w[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_a_resumed_optimiser_continues_where_the_checkpoint_left_it(kind, tmp_path):
    whole = _run(ServerOptimizer(kind, 0.3, 0.9), W0, MEANS)
    first = ServerOptimizer(kind, 0.3, 0.9)
    after_two = _run(first, W0, MEANS[:2])
    path = tmp_path / "state.pt"
    torch.save(first.state(), path)
    resumed = ServerOptimizer(kind, 0.3, 0.9)
    resumed.restore(torch.load(path, weights_only=True))
    (last,) = _run(resumed, {k: v.tolist() for k, v in after_two[-1].items()}, MEANS[2:])
    for name in last:
        np.testing.assert_allclose(last[name], whole[-1][name], rtol=1e-5)
    fresh = _run(ServerOptimizer(kind, 0.3, 0.9), {k: v.tolist() for k, v in after_two[-1].items()}, MEANS[2:])
    assert not np.allclose(fresh[-1]["w"], whole[-1]["w"]), "without the state the step differs"


def test_the_run_config_checks_the_server_optimiser():
    config = RunConfig.from_mapping({"server-optimizer": "momentum", "server-lr": 1.0, "server-momentum": 0.9})
    assert ServerOptimizer.of(config.federation).kind == "momentum"
    with pytest.raises(ConfigError, match="server-momentum"):
        RunConfig.from_mapping({"server-momentum": 1.0})
    with pytest.raises(ConfigError):
        RunConfig.from_mapping({"server-optimizer": "sgd"})


def test_logit_adjustment_adds_the_sites_prior_log_odds_in_training_only():
    labels = torch.tensor([[1.0]] * 9 + [[0.0]] * 1)
    prior = prior_log_odds(labels, 1.0, torch.device("cpu"))
    assert prior.item() == pytest.approx(np.log(9.5 / 11 / (1 - 9.5 / 11)))
    assert prior_log_odds(labels, 0.0, torch.device("cpu")) is None
    assert prior_log_odds(torch.ones(4, 1), 1.0, torch.device("cpu")).isfinite().all(), "one class only: finite"

    class Out:
        logits = torch.tensor([[0.3], [-1.2]])
        severity = None
        reconstruction = None

    class Batch:
        labels = torch.tensor([[1.0], [0.0]])

    train = RunConfig.from_mapping({}).train
    adjusted = per_study_loss(Out(), Batch(), train, prior)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(Out.logits + prior, Batch.labels,
                                                                    reduction="none").mean(1)
    assert torch.allclose(adjusted, expected)
    assert not torch.allclose(adjusted, per_study_loss(Out(), Batch(), train))


def test_logit_adjustment_is_refused_under_dp():
    with pytest.raises(ConfigError, match="logit-adjust"):
        RunConfig.from_mapping({"logit-adjust": 1.0, "dp-enabled": True, "server-val-path": "/centre/clinic"})


def test_a_federation_with_server_momentum_checkpoints_its_state_and_a_resumed_run_continues_it(tmp_path):
    """The real ServerApp and ClientApps in process: every checkpoint keeps the optimiser's state,
    and a run resumed from one continues its step count and buffer."""
    from common.rundir import RunDirectory
    from simulations.inprocess import run_inprocess
    from simulations.synthetic import SyntheticSpec, generate_clinics

    spec = SyntheticSpec(sites=2, studies_per_site=16, image_size=32, slices_per_study=3, seed=31)
    generate_clinics(tmp_path / "data", spec, progress=False)
    overrides = {"num-rounds": 2, "min-sites": 2, "image-size": 32, "seq-len": 3, "recon-head": False,
                 "local-epochs": 1, "server-optimizer": "momentum", "server-lr": 1.0, "server-momentum": 0.9}
    first = RunDirectory(run_inprocess(tmp_path / "data", tmp_path / "runs", 2, overrides))
    state = first.load_checkpoint(2)["server-optimizer"]
    assert state["kind"] == "momentum" and state["steps"] == 2
    assert set(state["first"]) == set(first.load_checkpoint(2)["trainable"]), "a buffer per trainable tensor"
    resumed = RunDirectory(run_inprocess(tmp_path / "data", tmp_path / "runs", 2,
                                         {**overrides, "num-rounds": 3, "resume-from": str(first.path)}))
    assert resumed.load_checkpoint(3)["server-optimizer"]["steps"] == 3, "the resumed run continued the state"
    fedavg = RunDirectory(run_inprocess(tmp_path / "data", tmp_path / "runs", 2,
                                        {**overrides, "server-optimizer": "none"}))
    assert fedavg.load_checkpoint(2)["server-optimizer"] == {}
    moved = {k: v for k, v in first.load_checkpoint(2)["trainable"].items()}
    plain = fedavg.load_checkpoint(2)["trainable"]
    assert any(not torch.allclose(moved[k], plain[k]) for k in plain), "momentum moved the model elsewhere"
