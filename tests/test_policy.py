"""A site's policy: what the centre's run config cannot lower (privacy) or raise (resources).

Every message runs through the real ClientApp handlers with a real site folder of DICOM files;
a refused message must read no data and charge no privacy budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from client import app as client_app
from client.cli import main as client_cli
from client.session import open_session
from common.config import RunConfig, SiteConfig, FederationConfig
from common.model import build_model, frozen_backbone_hash, trainable_parameter_count
from common.policy import PolicyError, PolicyRefused, SitePolicy
from server.strategy import ClinicFedAvg
from server.strategy_config import StrategyConfig
from tests.conftest import reply, site_message

RUN = {"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8, "batch-size": 4,
       "local-epochs": 1, "num-rounds": 2}


def _context(site: Path, state_dir: Path, run_config: dict, **node: object) -> Context:
    return Context(run_id=7, node_id=1, node_config={"data-path": str(site), "state-dir": str(state_dir),
                                                      "site-name": "site-a", **node},
                   state=RecordDict(), run_config=run_config)


def _message(run_config: dict, message_type: str = "train", server_round: int = 1):
    return site_message(run_config, message_type, server_round)


def _policy_file(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site-policy.toml"
    path.write_text(text)
    return path


def _refusal(out) -> tuple[str, str]:
    site = out.content["site"]
    assert site["status"] == "error", dict(site)
    return site["reason"], site.get("policy-key", "")


STRICT = """
require-dp = true
max-epsilon = 4.0
max-delta = 1e-6
dp-unit = "patient"
max-eval-bins = 64
min-image-metrics-sample = 16
max-fid-dim = 32
max-image-size = 64
max-seq-len = 8
max-trainable-parameters = 200000
"""


# A run config that meets STRICT; each case below changes one key of it.
MEETS_STRICT = {"dp-enabled": True, "dp-target-epsilon": 4.0, "dp-target-delta": 1e-6, "dp-unit": "patient",
                "fid-dim": 8, "image-metrics-sample": 16, "feature-norm": "none"}


@pytest.mark.parametrize("override, key", [
    ({"dp-enabled": False}, "dp-enabled"),  # the centre switches DP off
    ({"dp-target-epsilon": 8.0}, "dp-target-epsilon"),
    ({"dp-target-delta": 0.5}, "dp-target-delta"),
    ({"dp-unit": "study"}, "dp-unit"),
    ({"eval-bins": 2048}, "eval-bins"),
    ({"image-metrics-sample": 1}, "image-metrics-sample"),
    ({"fid-dim": 2048}, "fid-dim"),
    ({"image-size": 128}, "image-size"),
    ({"seq-len": 64}, "seq-len"),
    ({"proj-dim": 512}, "max-trainable-parameters"),
    ({"dp-max-physical-batch": 512}, "dp-max-physical-batch"),  # DP's studies held at once: max-batch-size
])
def test_a_run_config_below_the_policy_is_refused_before_any_data_is_read(override, key, tmp_path):
    """The data folder does not even exist: a refusal that came after reading it would be a
    data-error. Nothing is charged: the privacy ledger folder is never created."""
    open_session.cache_clear()
    state = tmp_path / "state"
    policy = _policy_file(tmp_path / "admin", STRICT)
    run = {**RUN, **MEETS_STRICT, **override}
    context = _context(tmp_path / "no-such-site", state, run, **{"site-policy": str(policy)})
    for handler, kind in ((client_app.train, "train"), (client_app.evaluate, "evaluate")):
        out = handler(_message(run, kind), context)
        assert _refusal(out) == ("policy-refused", key)
        assert not out.content.array_records and not out.content.metric_records, "nothing but the refusal"
    assert not (state / "privacy").exists(), "nothing charged to the ledger"
    assert "4.0" not in json.dumps(dict(out.content["site"])), "no value of the site's policy in the reply"


def test_a_site_with_its_own_budget_is_not_switched_off_dp_by_the_centre(tmp_path):
    """Seen before: node config dp-target-epsilon = 1 and the centre's dp-enabled = false trained
    without DP. A site that states its budget requires DP, whatever its policy file says."""
    open_session.cache_clear()
    run = {**RUN, "dp-enabled": False}
    context = _context(tmp_path / "no-such-site", tmp_path / "state", run, **{"dp-target-epsilon": 1.0})
    assert _refusal(client_app.train(_message(run), context)) == ("policy-refused", "dp-enabled")


def test_the_same_run_config_passes_a_policy_it_meets(site, tmp_path):
    open_session.cache_clear()
    run = {**RUN, **MEETS_STRICT}
    policy = _policy_file(tmp_path / "admin", STRICT)
    out = client_app.train(_message(run), _context(site, tmp_path / "state", run, **{"site-policy": str(policy)}))
    assert out.content["site"]["status"] == "ok"
    assert out.content["metrics"]["dp-epsilon"] <= 4.0 and out.content["metrics"]["dp-delta"] <= 1e-6


def test_the_centre_shows_the_refusal_per_site_with_the_key():
    """The centre files the refusal like the other reason codes, with the key and nothing else."""
    from common.exchange import trainable_spec

    model = build_model(RunConfig.from_mapping(RUN).model)
    strategy = ClinicFedAvg(StrategyConfig(spec=trainable_spec(model), backbone_hash=frozen_backbone_hash(model),
                                           label_names=["injury"], min_sites=1))
    refusal = RecordDict({"site": ConfigRecord({"status": "error", "reason": "policy-refused", "site-name": "a",
                                                "policy-key": "dp-enabled"})})
    strategy.aggregate_train(1, [reply(refusal, node_id=3)])
    (rejected,) = strategy.report(1).rejected
    assert rejected["reason"] == "site reported error: policy-refused (dp-enabled)"
    odd = RecordDict({"site": ConfigRecord({"status": "error", "reason": "policy-refused", "site-name": "a",
                                           "policy-key": "/data/Müller Hans/1.dcm"})})
    strategy.aggregate_train(2, [reply(odd, node_id=3)])
    assert strategy.report(2).rejected[0]["reason"] == "site reported error: policy-refused", \
        "a key that is not a plain key name is not shown"


def test_automatic_delta_is_capped_by_the_policy_and_k_coarsens_the_histograms(site, tmp_path):
    """Limits the site applies however the centre asks: the automatic delta (dp-target-delta = 0)
    stays under max-delta, and a 2048-bin request gives one bin per k test studies at most, and
    one bin per k validation studies in the validation statistics."""
    open_session.cache_clear()
    policy = _policy_file(tmp_path / "admin", "max-delta = 1e-7\nmin-studies-per-bin = 2\n")
    run = {**RUN, "dp-enabled": True, "eval-bins": 2048, "feature-norm": "none"}
    context = _context(site, tmp_path / "state", run, **{"site-policy": str(policy)})
    out = client_app.train(_message(run), context)
    assert out.content["metrics"]["dp-delta"] == pytest.approx(1e-7)
    evaluated = client_app.evaluate(_message(run, "evaluate"), context)
    metrics = evaluated.content["metrics"]
    n_test = metrics["n"]
    assert metrics["bins"] <= max(n_test // 2, 4) and metrics["bins"] < 2048
    validation = evaluated.content["validation"]
    assert validation["n"] > 0 and validation["bins"] <= max(validation["n"] // 2, 4) and validation["bins"] < 2048


def test_secure_aggregation_required_means_every_train_message_uses_it(site, tmp_path):
    open_session.cache_clear()
    policy = _policy_file(tmp_path / "admin", "require-secure-aggregation = true\n")
    for run, key in (({**RUN}, "secure-aggregation"),  # the run config does not ask for it
                     ({**RUN, "secure-aggregation": True}, "secure-aggregation")):  # it asks, the message does not
        context = _context(site, tmp_path / "state", run, **{"site-policy": str(policy)})
        assert _refusal(client_app.train(_message(run), context)) == ("policy-refused", key)
    evaluated = client_app.evaluate(_message({**RUN, "secure-aggregation": True}, "evaluate"), context)
    assert evaluated.content["site"]["status"] == "ok", "evaluation statistics do not go through SecAgg+"


def test_a_site_too_small_to_train_says_so(site, tmp_path):
    open_session.cache_clear()
    policy = _policy_file(tmp_path / "admin", "min-training-studies = 500\n")
    out = client_app.train(_message(RUN), _context(site, tmp_path / "state", RUN, **{"site-policy": str(policy)}))
    assert _refusal(out) == ("policy-refused", "min-training-studies")


def test_a_policy_file_that_cannot_be_read_refuses_everything(site, tmp_path):
    open_session.cache_clear()
    for name, text in (("missing.toml", None), ("typo.toml", "requre-dp = true\n"), ("bad.toml", "max-epsilon = 'a'")):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        out = client_app.train(_message(RUN), _context(site, tmp_path / "state", RUN, **{"site-policy": str(path)}))
        assert _refusal(out) == ("policy-error", ""), name
    with pytest.raises(PolicyError, match="unknown key"):
        SitePolicy.load(tmp_path / "typo.toml")


def test_a_deployed_site_ignores_a_policy_the_run_config_names(site, tmp_path):
    """site-policy in the run config is for simulations (node config partition-id) only: a centre
    cannot point a hospital at a laxer file."""
    lax = _policy_file(tmp_path / "centre", "max-image-size = 4096\n")
    run = {**RUN, "site-policy": str(lax)}
    deployed = SiteConfig.from_node_config({"data-path": str(site)}, RunConfig.from_mapping(run).federation)
    assert deployed.policy_path is None
    simulated = SiteConfig.from_node_config({"partition-id": 0},
                                            FederationConfig(data_root=str(site.parent), site_policy=str(lax)))
    assert simulated.policy_path == lax
    open_session.cache_clear()
    big = {**run, "image-size": 1024}
    assert _refusal(client_app.train(_message(big), _context(site, tmp_path / "s", big))) == \
        ("policy-refused", "image-size"), "the defaults still apply at the deployed site"


def test_the_trainable_parameter_count_matches_the_built_model():
    config = RunConfig.from_mapping({**RUN, "proj-dim": 24}).model
    model = build_model(config)
    assert trainable_parameter_count(config) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_default_policy_passes_the_default_run_config():
    """The demo runs unchanged: the app's own defaults meet the defaults of the policy."""
    from simulations.inprocess import app_components

    _, _, defaults = app_components()
    config = RunConfig.from_mapping(defaults)
    SitePolicy().check_run_config(config, trainable_parameter_count(config.model))
    with pytest.raises(PolicyRefused):
        SitePolicy(require_dp=True).check_run_config(config, trainable_parameter_count(config.model))


def test_the_policy_commands_print_the_policy_in_force(site, tmp_path, capsys):
    policy = _policy_file(tmp_path / "admin", "require-dp = true\nmax-epsilon = 3.0\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / "node-config.toml").write_text(f'site-policy = "{policy}"\n')  # as the daemon writes it
    assert client_cli(["policy", "--state-dir", str(state), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["require-dp"] is True and shown["max-epsilon"] == 3.0 and str(policy) in shown["source"]
    assert client_cli(["policy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["require-dp"] is False, "no file: the defaults"
    assert client_cli(["check-data", str(site), "--image-size", "32", "--seq-len", "4", "--state-dir", str(state),
                       "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"]["max-epsilon"] == 3.0 and summary["train_studies"] > 0
    assert client_cli(["policy", "--policy", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_clinicfl_sim_run_gives_every_simulated_site_the_policy(tmp_path, monkeypatch):
    """--site-policy is checked before Flower starts and reaches every site as run config site-policy
    (which only a simulated site honours, test above)."""
    from simulations import cli as sim_cli

    (tmp_path / "data" / "site-01").mkdir(parents=True)
    seen = {}
    monkeypatch.setattr(sim_cli, "_run_and_report", lambda data_root, run_root, sites, overrides, **_: seen.update(
        overrides) or 0)
    policy = _policy_file(tmp_path / "admin", "require-dp = true\n")
    assert sim_cli.main(["run", "--data-root", str(tmp_path / "data"), "--site-policy", str(policy)]) == 0
    assert seen["site-policy"] == str(policy.resolve())
    (tmp_path / "typo.toml").write_text("require-dpp = true\n")
    assert sim_cli.main(["run", "--data-root", str(tmp_path / "data"), "--site-policy", str(tmp_path / "typo.toml")]) == 2
