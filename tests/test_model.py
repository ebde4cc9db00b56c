"""The network: shapes, masking, freeze policies, backbone weights and hash, trainable exchange."""

from __future__ import annotations

import logging
from dataclasses import replace
from urllib.error import URLError

import pytest
import torch
from torchvision.models import resnet50

from common.exchange import to_array_record, trainable_state
from common.model import (BackboneMismatchError, BackboneWeightsError, build_model, check_backbone_hash,
                          frozen_backbone_hash, loaded_trunk, tensor_hash)


@pytest.fixture(autouse=True)
def _fresh_backbone_cache():
    loaded_trunk.cache_clear()
    yield
    loaded_trunk.cache_clear()


def _batch(b: int = 2, t: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.rand(b, t, 1, size, size)
    mask = torch.ones(b, t, dtype=torch.bool)
    if b > 1:
        mask[1, 2:] = False
    return images, mask


def test_output_shapes_and_attention(tiny_model_config):
    model = build_model(replace(tiny_model_config, num_labels=3)).eval()
    images, mask = _batch()
    out = model(images, mask)
    assert out.logits.shape == (2, 3)
    assert out.attention.shape == (2, 4)
    assert torch.allclose(out.attention.sum(1), torch.ones(2))
    assert torch.all(out.attention[1, 2:] == 0), "padding must get no attention"


def test_padding_never_changes_a_prediction(tiny_model_config):
    model = build_model(tiny_model_config).eval()
    images, mask = _batch(b=1, t=4)
    mask[0, 3:] = False
    reference = model(images, mask).logits
    junk = images.clone()
    junk[0, 3:] = torch.rand_like(junk[0, 3:]) * 5  # garbage where the mask says padding
    assert torch.allclose(model(junk, mask).logits, reference, atol=1e-6)
    longer = torch.cat([images, torch.rand(1, 3, 1, 32, 32)], dim=1)  # more padding steps
    longer_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    assert torch.allclose(model(longer, longer_mask).logits, reference, atol=1e-6)
    # ...and a real image in that position does change it, so the check above can fail.
    assert not torch.allclose(model(junk, torch.ones_like(mask)).logits, reference, atol=1e-4)


def test_mask_must_be_a_prefix(tiny_model_config):
    model = build_model(tiny_model_config).eval()
    images, mask = _batch()
    mask[0] = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match="prefix"):
        model(images, mask)


def test_biomechanical_features_join_each_step(tiny_model_config):
    model = build_model(tiny_model_config.with_shared(biomech_features=3)).eval()
    images, mask = _batch()
    biomech = torch.randn(2, 4, 3)
    a = model(images, mask, biomech).logits
    b = model(images, mask, biomech + 1.0).logits
    assert a.shape == (2, 1) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="biomechanical"):
        model(images, mask)


def _train_steps(model, steps: int = 3) -> None:
    images, mask = _batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(images, mask).logits.sum().backward()
        optimizer.step()


def test_frozen_policy_keeps_weights_and_batchnorm_statistics(tiny_model_config):
    model = build_model(tiny_model_config)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    _train_steps(model)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone (incl. BN stats) changed"
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


def test_layer4_policy_trains_only_the_last_stage(tiny_model_config):
    model = build_model(replace(tiny_model_config, freeze="layer4"))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _train_steps(model)
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("net.layer4.") for k in changed)
    assert not any("running_" in k for k in changed), "BatchNorm statistics must stay frozen"


def test_only_trainable_parameters_are_exchanged(tiny_model_config):
    model = build_model(tiny_model_config)
    names = list(to_array_record(model).keys())
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and not any(n.startswith("backbone.") for n in names)
    sent = sum(t.numel() for t in trainable_state(model).values())
    frozen = sum(p.numel() for p in model.backbone.parameters())
    assert frozen > 23_000_000 and sent < 0.01 * frozen
    layer4 = build_model(replace(tiny_model_config, freeze="layer4"))
    layer4_names = set(to_array_record(layer4).keys())
    assert any(n.startswith("backbone.net.layer4.") for n in layer4_names)
    assert not any(n.startswith("backbone.net.layer3.") for n in layer4_names)


def test_backbone_hash_identifies_the_frozen_weights(tiny_model_config):
    a = frozen_backbone_hash(build_model(tiny_model_config))
    assert a == frozen_backbone_hash(build_model(replace(tiny_model_config, proj_dim=32)))
    other_seed = frozen_backbone_hash(build_model(tiny_model_config.with_shared(seed=1)))
    other_policy = frozen_backbone_hash(build_model(replace(tiny_model_config, freeze="layer4")))
    assert len({a, other_seed, other_policy}) == 3
    check_backbone_hash(a, a)
    with pytest.raises(BackboneMismatchError, match="backbone"):
        check_backbone_hash(a, other_seed)


def test_the_kept_backbone_hash_follows_any_write_to_the_weights(tiny_model_config):
    model = build_model(replace(tiny_model_config, freeze="layer4"))  # a trunk of its own, not the shared one
    first = frozen_backbone_hash(model)
    original = model.backbone.net.bn1.running_mean.clone()
    assert frozen_backbone_hash(model) == first  # kept: the same tensors, unchanged
    with torch.no_grad():
        model.backbone.net.bn1.running_mean.add_(1.0)  # a frozen buffer written in place
    changed = frozen_backbone_hash(model)
    assert changed != first
    model.backbone.net.load_state_dict({"bn1.running_mean": original}, strict=False)
    assert frozen_backbone_hash(model) == first == tensor_hash_of(model)


def tensor_hash_of(model) -> str:
    """The digest computed from scratch (nothing kept)."""
    params = dict(model.backbone.net.named_parameters())
    frozen = {name: t for name, t in model.backbone.net.state_dict().items()
              if name not in params or not params[name].requires_grad}
    return f"{model.config.freeze}:{tensor_hash(frozen)[:32]}"


def test_random_backbone_warns(tiny_model_config, caplog):
    from common.model import frozen_trunk, loaded_trunk

    loaded_trunk.cache_clear()  # the warning is given once per process, when the weights are made
    frozen_trunk.cache_clear()
    with caplog.at_level(logging.WARNING):
        build_model(tiny_model_config)
    assert "randomly initialised" in caplog.text


def test_local_weights_file_is_loaded(tiny_model_config, tmp_path):
    torch.manual_seed(123)
    reference = resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model = build_model(replace(tiny_model_config, backbone_weights=str(path)))
    assert torch.equal(model.backbone.net.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.net.layer4[2].bn3.running_var, reference.layer4[2].bn3.running_var)


@pytest.mark.parametrize("content", [None, b"not a checkpoint", "wrong-keys"])
def test_bad_weights_file_is_a_clear_error(tiny_model_config, tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "wrong-keys":
        torch.save({"conv1.weight": torch.zeros(3)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(BackboneWeightsError, match="backbone-weights"):
        build_model(replace(tiny_model_config, backbone_weights=str(path)))


def test_imagenet_offline_says_how_to_provide_the_file(tiny_model_config, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneWeightsError) as info:
        build_model(replace(tiny_model_config, backbone_weights="imagenet"))
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message and str(tmp_path) in message and "backbone-weights" in message


def test_tensor_hash_sees_every_byte():
    a = {"w": torch.zeros(4), "n": torch.tensor(3)}
    b = {"w": torch.zeros(4), "n": torch.tensor(4)}
    assert tensor_hash(a) == tensor_hash({k: v.clone() for k, v in a.items()})
    assert tensor_hash(a) != tensor_hash(b)


def test_pyproject_run_config_matches_the_typed_config():
    """Keys, values and types: pyproject.toml's defaults are the dataclasses' (python -m common.config_docs --write)."""
    import tomllib
    from pathlib import Path

    from common.config import RunConfig

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    values = pyproject["tool"]["flwr"]["app"]["config"]
    config = RunConfig.from_mapping(values)  # every key known, every type right
    defaults = RunConfig.from_mapping({}).to_mapping()
    assert config.to_mapping() == defaults
    assert {k: (type(v), v) for k, v in values.items()} == {k: (type(v), v) for k, v in defaults.items()}


def test_linear_bigru_equals_torch_gru_on_packed_sequences():
    """Our DP-capable BiGRU computes exactly what nn.GRU computes on packed sequences."""
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from common.model import BiGRU

    torch.manual_seed(0)
    ours = BiGRU(5, 4)
    ref = nn.GRU(5, 4, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for suffix, gru in (("", ours.forward_gru), ("_reverse", ours.backward_gru)):
            getattr(ref, f"weight_ih_l0{suffix}").copy_(gru.weight_ih)
            getattr(ref, f"bias_ih_l0{suffix}").copy_(gru.bias_ih)
            getattr(ref, f"weight_hh_l0{suffix}").copy_(gru.weight_hh)
            getattr(ref, f"bias_hh_l0{suffix}").copy_(gru.bias_hh)
    x = torch.randn(3, 6, 5)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    packed, _ = ref(pack_padded_sequence(x, mask.sum(1), batch_first=True, enforce_sorted=False))
    expected, _ = pad_packed_sequence(packed, batch_first=True, total_length=6)
    assert torch.allclose(ours(x, mask), expected, atol=1e-6)


def test_move_to_moves_a_model_only_when_it_or_one_of_its_parts_is_elsewhere():
    from common.inference import move_to

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    moves = []
    original = model.to
    model.to = lambda *args, **kwargs: moves.append(args) or original(*args, **kwargs)
    move_to(model, torch.device("cpu"))
    assert moves == []  # already there: no walk over every submodule
    model[1].to(torch.device("meta"))  # one part moved on its own
    move_to(model, torch.device("meta"))
    assert len(moves) == 1 and all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
