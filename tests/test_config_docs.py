"""The typed configuration (common/config.py) is the one source: pyproject.toml's run config and the
README's configuration tables are what it renders, choices come from its enumerations, and the
settings several sections read are defined once."""

from __future__ import annotations

import json
from enum import Enum

import pytest
from flwr.app import ConfigRecord

from common.config import SECTIONS, ConfigError, DataConfig, ModelConfig, RunConfig, SharedConfig, SiteConfig, \
    TrainConfig, FederationConfig, settings
from common.config_docs import BEGIN, END, PROJECT_ROOT, TABLE_HEADER, pyproject_table, readme_section, \
    render_pyproject_table, render_readme_section, stale, write

CHOICE_FIELDS = [(f.name.replace("_", "-"), type(f.default)) for section in SECTIONS.values()
                 for f in settings(section) if isinstance(f.default, Enum)]


def test_pyproject_and_readme_are_what_the_typed_config_renders():
    assert pyproject_table((PROJECT_ROOT / "pyproject.toml").read_text()) == render_pyproject_table(), \
        "regenerate with python -m common.config_docs --write"
    assert readme_section((PROJECT_ROOT / "README.md").read_text()) == render_readme_section(), \
        "regenerate with python -m common.config_docs --write"


def test_write_replaces_only_the_generated_parts(tmp_path):
    pyproject, readme = tmp_path / "pyproject.toml", tmp_path / "README.md"
    pyproject.write_text(f'[project]\nname = "x"\n\n{TABLE_HEADER}\nnum-rounds = 99\n\n[tool.other]\nkept = 1\n')
    readme.write_text(f"# Title\n\nbefore\n\n{BEGIN}\nstale table\n{END}\n\nafter\n")
    assert stale(pyproject, readme) == [pyproject, readme]
    assert write(pyproject, readme) == [pyproject, readme]
    text = pyproject.read_text()
    assert text.startswith('[project]\nname = "x"\n\n' + render_pyproject_table())
    assert text.endswith("\n[tool.other]\nkept = 1\n") and "num-rounds = 99" not in text
    assert readme.read_text() == f"# Title\n\nbefore\n\n{render_readme_section()}\n\nafter\n"
    assert write(pyproject, readme) == [] and stale(pyproject, readme) == []  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        write(pyproject, readme)


def test_every_key_has_help_and_is_defined_once():
    keys = [f.name for section in SECTIONS.values() for f in settings(section)]
    assert len(keys) == len(set(keys)), "a key defined in two sections can disagree with itself"
    for section in SECTIONS.values():
        assert section.title and section.__doc__
        for f in settings(section):
            assert f.metadata["help"].strip().endswith("."), f.name
    readme = render_readme_section()
    for key in ("image-size", "seq-len", "seed", "biomech-features"):
        assert readme.count(f"| `{key}` |") == 1
    for section in (ModelConfig, DataConfig, TrainConfig):
        assert not {"image_size", "seq_len", "seed", "biomech_features"} & {f.name for f in settings(section)}


@pytest.mark.parametrize(("key", "enumeration"), CHOICE_FIELDS, ids=[key for key, _ in CHOICE_FIELDS])
def test_a_choice_is_validated_by_its_enumeration(key, enumeration):
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_mapping({key: "no-such-choice"})
    assert str(refused.value).startswith(f"{key} must be one of ")
    assert all(member.value in str(refused.value) for member in enumeration)
    for member in enumeration:
        values = {key: member.value, "server-val-path": "/val"}  # server-val-* best metrics need it
        parsed = RunConfig.from_mapping(values).to_mapping()[key]
        assert parsed == member.value and type(parsed) is str


def test_to_mapping_gives_plain_values_that_flower_and_json_take():
    config = RunConfig.from_mapping({"freeze": "layer4", "aggregation": "trimmed-mean", "wire-dtype": "float16",
                                     "tracking": "mlflow", "dp-unit": "patient", "mrnet-plane": "axial"})
    assert config.model.freeze == "layer4" and config.federation.aggregation == "trimmed-mean"
    flat = config.to_mapping()
    assert {type(v) for v in flat.values()} <= {str, int, float, bool}
    assert json.loads(json.dumps(flat)) == flat
    assert dict(ConfigRecord(flat)) == flat
    assert RunConfig.from_mapping(flat) == config


def test_from_mapping_stays_strict():
    with pytest.raises(ConfigError, match="unknown run-config key.*image_size"):
        RunConfig.from_mapping({"image_size": 64})
    with pytest.raises(ConfigError, match="seq-len must be an integer"):
        RunConfig.from_mapping({"seq-len": 8.0})
    with pytest.raises(ConfigError, match="freeze must be a string"):
        RunConfig.from_mapping({"freeze": 1})
    with pytest.raises(ConfigError, match="image-size must be >= 32"):
        RunConfig.from_mapping({"image-size": 16})


def test_the_sections_read_one_shared_setting():
    config = RunConfig.from_mapping({"image-size": 96, "seq-len": 5, "seed": 3, "biomech-features": 2})
    assert config.model.shared is config.data.shared is config.train.shared is config.shared
    assert (config.model.image_size, config.data.image_size, config.model.seq_len, config.data.seq_len) == (96, 96, 5, 5)
    assert (config.train.seed, config.data.seed, config.model.biomech_features) == (3, 3, 2)
    assert config.model.with_shared(seed=4).seed == 4 and config.model.with_shared(seed=4).image_size == 96
    with pytest.raises(ConfigError, match="share one SharedConfig"):
        RunConfig(config.model, config.data.with_shared(image_size=64), config.train, config.eval, config.privacy,
                  config.federation)
    with pytest.raises(ConfigError, match="recon-size must be between 4 and image-size"):
        ModelConfig(SharedConfig(image_size=32), recon_size=48)


def test_node_config_choices_come_from_their_enumerations(tmp_path):
    fed = FederationConfig()
    site = SiteConfig.from_node_config({"data-path": str(tmp_path), "layout": "mura", "dp-budget-scope": "site"}, fed)
    assert (type(site.layout), site.layout, type(site.dp_budget_scope), site.dp_budget_scope) == (str, "mura", str, "site")
    with pytest.raises(ConfigError, match="node config layout must be one of auto, dicom, mura, mrnet, got 'png'"):
        SiteConfig.from_node_config({"data-path": str(tmp_path), "layout": "png"}, fed)
    with pytest.raises(ConfigError, match="node config dp-budget-scope must be one of run, site"):
        SiteConfig.from_node_config({"data-path": str(tmp_path), "dp-budget-scope": "forever"}, fed)
