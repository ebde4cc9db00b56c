"""SCAFFOLD (aggregation = scaffold): the sites' gradient correction and control variates, the
centre's c, its checkpoint, and the replies it refuses."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Message

from common.config import ConfigError, ModelConfig, RunConfig, SharedConfig, TrainConfig
from common.exchange import ParamSpec
from common.inference import SiteInputs
from common.model import build_model
from common.scaffold import CONTROL_DELTA_KEY
from common.training import per_study_loss, train_local
from server.scaffold import ControlVariate


def _site(n: int = 12) -> tuple[torch.nn.Module, SiteInputs, TrainConfig]:
    shared = SharedConfig(image_size=32, seq_len=4)
    model = build_model(ModelConfig(shared, proj_dim=16, gru_hidden=8, attn_dim=8, dropout=0.0,
                                    severity_head=False, recon_head=False))
    generator = torch.Generator().manual_seed(0)
    inputs = SiteInputs(torch.randn(n, 4, 2048, generator=generator), torch.ones(n, 4, dtype=torch.bool),
                        (torch.arange(n) % 2).float().unsqueeze(1), True, None, torch.full((n,), float("nan")))
    return model, inputs, replace(TrainConfig(shared), local_epochs=1, batch_size=n)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_a_zero_correction_trains_as_plain_and_the_mean_gradient_is_the_steps_gradient() -> None:
    model, inputs, config = _site()
    index = np.arange(12)
    reference = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    train_local(plain, inputs, index, config, torch.device("cpu"))
    zero = [torch.zeros_like(p) for p in _params(model)]
    result = train_local(model, inputs, index, config, torch.device("cpu"), correction=zero)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(plain)))
    # one step on the whole site: the mean gradient is the loss's gradient at the round's start
    from common.inference import StudyBatches, forward
    batch = StudyBatches.for_training(reference, inputs, torch.device("cpu"))(torch.as_tensor(index))
    reference.train()
    loss = per_study_loss(forward(reference, batch), batch, config).mean()
    expected = torch.autograd.grad(loss, [p for p in reference.parameters() if p.requires_grad])
    assert len(result.mean_gradients) == len(expected)
    for got, want in zip(result.mean_gradients, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_correction_moves_the_local_path() -> None:
    model, inputs, config = _site()
    plain = copy.deepcopy(model)
    train_local(plain, inputs, np.arange(12), config, torch.device("cpu"))
    shift = [torch.full_like(p, 0.5) for p in _params(model)]
    train_local(model, inputs, np.arange(12), config, torch.device("cpu"), correction=shift)
    assert any(not torch.allclose(a, b) for a, b in zip(_params(model), _params(plain)))


def test_the_centre_moves_c_by_the_accepted_deltas_over_the_sampled_sites() -> None:
    spec = {"w": ParamSpec((2,), np.dtype("float32")), "b": ParamSpec((1,), np.dtype("float32"))}
    control = ControlVariate(spec)
    deltas = [{"w": np.array([3.0, 0.0], np.float32), "b": np.array([1.0], np.float32)},
              {"w": np.array([0.0, 6.0], np.float32), "b": np.array([2.0], np.float32)}]
    control.update(deltas, sampled=3)  # a third site was sampled and did not deliver
    assert np.allclose(control.c["w"], [1.0, 2.0]) and np.allclose(control.c["b"], [1.0])
    again = ControlVariate(spec)
    again.restore(control.state())
    assert all(np.array_equal(again.c[k], control.c[k]) for k in spec)
    again.restore({"kind": "momentum"})  # another run's server state: ignored
    assert np.allclose(again.c["w"], [1.0, 2.0])


def test_scaffold_is_refused_with_dp_and_with_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="scaffold"):
        RunConfig.from_mapping({"aggregation": "scaffold", "dp-enabled": True, "server-val-path": "/centre/clinic"})
    with pytest.raises(ConfigError, match="scaffold"):
        RunConfig.from_mapping({"aggregation": "scaffold", "secure-aggregation": True})


def test_a_scaffold_federation_keeps_c_in_its_checkpoints_and_refuses_a_malformed_delta(tmp_path: Path) -> None:
    """The real ServerApp and ClientApps in process."""
    from common.rundir import RunDirectory
    from simulations.inprocess import run_inprocess
    from simulations.synthetic import SyntheticSpec, generate_clinics

    spec = SyntheticSpec(sites=2, studies_per_site=16, image_size=32, slices_per_study=3, seed=31)
    generate_clinics(tmp_path / "data", spec, progress=False)
    overrides = {"num-rounds": 2, "min-sites": 2, "image-size": 32, "seq-len": 3, "recon-head": False,
                 "local-epochs": 1, "aggregation": "scaffold"}
    run = RunDirectory(run_inprocess(tmp_path / "data", tmp_path / "runs", 2, overrides))
    records = run.read_metrics()
    assert [r["round"] for r in records][-1] == 2 and not any(r["rejected"] for r in records)
    c = run.load_checkpoint(2)["server-optimizer"]["scaffold"]
    assert set(c) == set(run.load_checkpoint(2)["trainable"]), "c has every trainable tensor"
    assert any(float(v.abs().sum()) > 0 for v in c.values()), "the sites' deltas moved c"

    def truncated_delta(reply: Message) -> Message:
        if not reply.has_error() and CONTROL_DELTA_KEY in reply.content.array_records:
            record = reply.content.array_records[CONTROL_DELTA_KEY]
            name = next(iter(record))
            record[name] = Array(np.zeros(3, np.float32))
        return reply

    broken = RunDirectory(run_inprocess(tmp_path / "data", tmp_path / "runs", 2, {**overrides, "num-rounds": 1},
                                        reply_filter=truncated_delta))
    (record,) = [r for r in broken.read_metrics() if r["round"] == 1]
    reasons = [r["reason"] for r in record["rejected"] if r["phase"] == "train"]
    assert len(reasons) == 2 and all(r.startswith("malformed control variate update") for r in reasons)
