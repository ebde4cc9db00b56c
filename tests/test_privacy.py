"""Differential privacy at a site: accounting over the whole run, persistence across restarts,
enforcement of the budget, per-study clipping, and a DP federation that learns."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch.utils.data import DataLoader, TensorDataset

from client import app as client_app
from client.privacy import PrivacyLedger, PrivateHead, SitePrivacy, privacy_units
from common.dp_plan import PlannedRun, sampling
from client.session import open_session
from common.config import ConfigError, ModelConfig, RunConfig, SharedConfig
from common.exchange import numpy_of
from common.model import SequenceHead
from common.runlog import read_metrics
from server.strategy import ClinicFedAvg
from server.strategy_config import StrategyConfig
from simulations.inprocess import run_inprocess
from simulations.synthetic import SyntheticSpec, generate_clinics
from tests.conftest import reply, site_message

# These tests are about DP-SGD's accounting and noise: no standardisation (the DP release of a
# site's standardisation, and its charge, are tested in tests/test_private_norm.py).
RUN = {"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8, "batch-size": 4,
       "local-epochs": 1, "num-rounds": 3, "dp-enabled": True, "dp-target-epsilon": 8.0, "feature-norm": "none"}


def _context(site: Path, state_dir: Path, run_config: dict, **node) -> Context:
    return Context(run_id=7, node_id=1, node_config={"data-path": str(site), "state-dir": str(state_dir),
                                                      "site-name": "site-a", **node},
                   state=RecordDict(), run_config=run_config)


def _train_message(run_config: dict, server_round: int):
    return site_message(run_config, "train", server_round)


def _fresh_accountant_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    from common.dp_plan import RDP_ORDERS

    return accountant.get_epsilon(delta, alphas=RDP_ORDERS)


def test_epsilon_is_cumulative_and_survives_a_daemon_restart(site, tmp_path):
    open_session.cache_clear()
    context = _context(site, tmp_path / "state", RUN)
    epsilons, metrics = [], None
    for rnd in (1, 2):
        out = client_app.train(_train_message(RUN, rnd), context)
        metrics = out.content["metrics"]
        assert out.content["site"]["status"] == "ok"
        epsilons.append(metrics["dp-epsilon"])
    sigma, q, delta = metrics["dp-noise-multiplier"], metrics["dp-sample-rate"], metrics["dp-delta"]
    steps_per_round = metrics["dp-steps"] // 2
    assert metrics["dp-steps"] == 2 * steps_per_round and metrics["dp-max-grad-norm"] == 1.0
    for k, eps in enumerate(epsilons, start=1):
        assert eps == pytest.approx(_fresh_accountant_epsilon([(sigma, q, steps_per_round)] * k, delta), rel=1e-9)
    assert delta == min(1e-5, 1 / (10 * metrics["num-examples"])), "the automatic delta, at this site's size"
    # ... which follows the site's size once 1 / (10 n) is below 1e-5
    large = SitePrivacy.resolve(RunConfig.from_mapping(RUN).privacy, _site_config(site), 1_000_000)
    assert large.target_delta == pytest.approx(1e-7, rel=1e-12)

    # The daemon restarts: no process cache, an empty context.state; only the state dir remains.
    open_session.cache_clear()
    restarted = _context(site, tmp_path / "state", RUN)
    out = client_app.train(_train_message(RUN, 3), restarted)
    third = out.content["metrics"]["dp-epsilon"]
    assert third == pytest.approx(_fresh_accountant_epsilon([(sigma, q, steps_per_round)] * 3, delta), rel=1e-9)
    assert third > epsilons[1] and third <= 8.0 + 1e-6, "calibrated for the planned 3 rounds"
    assert out.content["metrics"]["dp-noise-multiplier"] == sigma, "one noise multiplier for the whole run"

    # A 4th round would exceed the budget: the site refuses, with the documented status.
    refused = client_app.train(_train_message(RUN, 4), restarted)
    assert refused.content["site"]["status"] == "budget-exhausted"
    assert refused.content["site"]["dp-epsilon"] == pytest.approx(third)
    assert not refused.content.array_records, "no parameters leave a site that did not train"


def test_a_site_can_be_stricter_than_the_server(site, tmp_path):
    open_session.cache_clear()
    fixed = {**RUN, "dp-noise-multiplier": 0.8}
    strict = _context(site, tmp_path / "strict", fixed, **{"dp-target-epsilon": 0.05})
    out = client_app.train(_train_message(fixed, 1), strict)
    assert out.content["site"]["status"] == "budget-exhausted"
    assert out.content["site"]["dp-budget"] == pytest.approx(0.05)
    budget = SitePrivacy.resolve(RunConfig.from_mapping(fixed).privacy,
                                 replace(_site_config(site), dp_target_epsilon=20.0), 10)
    assert budget.target_epsilon == 8.0, "a looser site budget never loosens the server's"


def _site_config(site: Path):
    from common.config import SiteConfig
    return SiteConfig(site, site / ".state", "x")


def test_server_survives_exhausted_sites_and_sees_who_is_exhausted():
    from common.exchange import ParamSpec
    strategy = ClinicFedAvg(StrategyConfig(spec={"w": ParamSpec((1,), np.dtype("float32"))}, backbone_hash="h",
                                           label_names=["injury"], min_sites=1))
    exhausted = RecordDict({"site": ConfigRecord({"status": "budget-exhausted", "reason": "budget-exhausted",
                                                  "site-name": "a", "backbone-hash": "h", "dp-epsilon": 7.9,
                                                  "dp-budget": 8.0})})
    arrays, metrics = strategy.aggregate_train(1, [reply(exhausted, 1)])
    assert arrays is None and metrics is None
    report = strategy.reports[1]
    assert report.exhausted == {"a": 7.9} and not report.rejected and not report.train
    assert strategy.epsilon == {"a": 7.9}


@pytest.mark.parametrize("biomech_features,physical", [(0, None), (2, None), (0, 3)])
def test_dp_step_equals_manual_per_study_clipping_without_noise(biomech_features, physical):
    """Opacus' step (noise 0) equals: per-study gradient, clip to C, sum, divide by the batch
    (also with biomechanical series beside the image features, and with the batch computed in
    chunks of ``physical`` studies, as dp-max-physical-batch splits a large sampled batch)."""
    torch.manual_seed(0)
    config = ModelConfig(SharedConfig(biomech_features=biomech_features), proj_dim=8, gru_hidden=4, attn_dim=4,
                         dropout=0.0, severity_head=False, recon_head=False)
    head = SequenceHead(config, in_dim=12)
    x = torch.randn(4, 5, 12)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 1:] = False
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    biomech = torch.randn(4, 5, biomech_features) if biomech_features else None
    clip, lr = 0.05, 1.0

    def loss_of(module, rows):
        out = module(x[rows], mask[rows], biomech[rows] if biomech is not None else None)
        return torch.nn.functional.binary_cross_entropy_with_logits(out.logits, y[rows], reduction="none").mean(1)

    manual = {name: torch.zeros_like(p) for name, p in head.named_parameters()}
    for i in range(4):
        head.zero_grad()
        loss_of(head, [i]).sum().backward()
        grads = {name: p.grad.clone() for name, p in head.named_parameters()}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for name in manual:
            manual[name] += grads[name] * factor
    expected = {name: p.detach() - lr * manual[name] / 4 for name, p in head.named_parameters()}

    private = SequenceHead(config, in_dim=12)
    private.load_state_dict(head.state_dict())
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, _ = engine.make_private(
        module=private, optimizer=torch.optim.SGD(private.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(torch.arange(4)), batch_size=4), noise_multiplier=0.0,
        max_grad_norm=clip, poisson_sampling=False)
    if physical is None:
        optimizer.zero_grad()
        loss_of(private, [0, 1, 2, 3]).mean().backward()
        optimizer.step()
    else:
        loader = wrap_data_loader(data_loader=DataLoader(TensorDataset(torch.arange(4)), batch_size=4),
                                  max_batch_size=physical, optimizer=optimizer)
        head_steps = PrivateHead(private, optimizer, loader, engine)
        chunks = [rows.tolist() for (rows,) in loader]
        assert [len(c) for c in chunks] == [2, 2], "one batch of 4, computed in two chunks"
        for rows in chunks:
            head_steps.step(loss_of(private, rows).mean(), None)
    for name, p in private._module.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-6), name
    assert any(not torch.allclose(expected[n], q) for n, q in head.named_parameters()), "the step moved something"


def test_patient_level_units_group_studies_and_sampling_matches_opacus():
    units = privacy_units(np.array([0, 1, 2, 3, 4]), ["p1", "p1", "p2", "p3", "p3"], "patient")
    assert sorted(len(u) for u in units) == [1, 2, 2]
    assert [len(u) for u in privacy_units(np.array([0, 1, 2]), ["p", "p", "p"], "study")] == [1, 1, 1]
    q, steps = sampling(34, 8)
    assert q == pytest.approx(1 / 5) and steps == 5


def test_dp_needs_the_frozen_policy():
    with pytest.raises(ConfigError, match="frozen"):
        RunConfig.from_mapping({"dp-enabled": True, "freeze": "layer4"})


def test_ledger_prefers_the_longer_history(tmp_path):
    site = _site_config(tmp_path)
    short = PrivacyLedger("rdp", [[1.0, 0.1, 10]], 1.0)
    long = PrivacyLedger("rdp", [[1.0, 0.1, 10], [1.0, 0.1, 10]], 1.0)
    long.save(site, "r1")
    import json
    loaded = PrivacyLedger.load(site, "r1", "rdp", json.dumps(short.__dict__))
    assert loaded.steps == 20, "a stale context.state must never roll the budget back"


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-e2e")
    # DP-SGD needs more studies per site than the plain tests to learn at epsilon 8.
    # A larger, longer lesion than the default phantom: the question here is whether DP-SGD training
    # learns and stays within its budget, not how faint a signal it can find (the privacy-utility
    # study measures that). The sites and the centre's clinic share one scanner (scanner-shift 0):
    # at about 70 training studies a site the DP release of a site's mean is all noise and shrinks
    # to the public mean, so a scanner unlike the centre's would leave the features unstandardised
    # (measured: AUC 0.48 at scanner-shift 0.3; the privacy-utility study measures that effect).
    spec = SyntheticSpec(sites=2, studies_per_site=100, image_size=48, slices_per_study=6, seed=8,
                         lesion_size=0.6, lesion_fraction=0.8, scanner_shift=0.0)
    generate_clinics(root / "data", spec, progress=False)
    # The centre's own clinic: the public standardisation statistics every DP site starts from.
    (public,) = generate_clinics(root / "public", replace(spec, sites=1, studies_per_site=40, seed=9), progress=False)
    # A small head: DP-SGD's noise grows with the number of trainable parameters, and at 70 training
    # studies per site the default head (about 300k parameters) learns little at epsilon 8.
    # The DP defaults (dp-batch-fraction 0.5, dp-lr) set the batch and the learning rate.
    overrides = {"num-rounds": 3, "min-sites": 2, "image-size": 48, "seq-len": 6, "local-epochs": 3,
                 "test-fraction": 0.3, "dp-enabled": True,
                 "dp-target-epsilon": 8.0, "recon-head": False, "proj-dim": 16, "gru-hidden": 16, "attn-dim": 16,
                 "eval-bins": 256,  # the centre owns every site here: fine score histograms measure learning
                 "server-val-path": str(public)}
    # In process: the real ServerApp and ClientApps, every message serialised (the property here
    # is the accounting and the learning, not Flower's runtime; tests/test_simulation.py has that).
    return run_inprocess(root / "data", root / "runs", 2, overrides)


@pytest.mark.slow
def test_dp_federation_learns_within_the_budget(dp_run):
    records = read_metrics(dp_run)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    final = records[-1]
    epsilon = final["catalogue"]["epsilon"]
    assert set(epsilon["per_site"]) == {"site-01", "site-02"}
    assert epsilon["value"] == max(epsilon["per_site"].values()) and 6.0 < epsilon["value"] <= 8.0 + 1e-6
    for rnd in (1, 2, 3):
        assert set(records[rnd]["privacy"]) == {"site-01", "site-02"}
        assert all(p["steps"] > 0 and p["noise-multiplier"] > 0 for p in records[rnd]["privacy"].values())
        # dp-batch-fraction 0.5: each step samples half the site's studies, two steps an epoch (3 epochs a
        # round), after the standardisation's release (one mechanism, counted as one step)
        assert all(p["sample-rate"] == 0.5 and p["steps"] == 1 + rnd * 3 * 2 for p in records[rnd]["privacy"].values())
    # DP noise is drawn from OS entropy, so every run differs: the assertions are statistical. The
    # pooled test loss falls from the initial model's, and the AUC is above chance by two standard
    # errors (Hanley & McNeil, from the pooled counts); the initial model's own AUC is not a bar,
    # as a random head on random features ranks by chance in either direction.
    assert final["catalogue"]["loss"]["value"] < records[0]["catalogue"]["loss"]["value"], "the model learned"
    checkpoint = torch.load(dp_run / "checkpoints" / final["checkpoint"], weights_only=True)
    pooled = list(checkpoint["pooled-histograms"].values())
    n_pos, n_neg = (int(sum(h[i].sum() for h in pooled)) for i in (0, 1))
    auc = final["catalogue"]["auc"]["value"]
    assert auc > 0.5 + 2 * _hanley_mcneil_se(0.5, n_pos, n_neg), f"AUC {auc:.3f} above chance at epsilon about 8"


def test_server_ends_the_run_when_every_site_is_exhausted(tmp_path):
    """A federation whose budget cannot pay for one round: every site refuses in round 1, the
    server records who and why, and ends the run cleanly instead of looping or crashing."""
    spec = SyntheticSpec(sites=2, studies_per_site=16, image_size=32, slices_per_study=3, seed=4)
    generate_clinics(tmp_path / "data", spec, progress=False)
    (public,) = generate_clinics(tmp_path / "public", replace(spec, sites=1, seed=5), progress=False)
    overrides = {"num-rounds": 3, "min-sites": 2, "image-size": 32, "seq-len": 3, "dp-enabled": True,
                 "dp-noise-multiplier": 0.3, "dp-target-epsilon": 1.0, "recon-head": False,
                 "server-val-path": str(public)}
    run_dir = run_inprocess(tmp_path / "data", tmp_path / "runs", 2, overrides)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1], "the run ends after the round in which all were exhausted"
    last = records[-1]
    assert set(last["exhausted"]) == {"site-01", "site-02"} and not last["train"] and not last["rejected"]
    assert last["stopped"] == "every site that replied has exhausted its privacy budget"
    assert all(v == 0.0 for v in last["exhausted"].values()), "nothing was spent"
    assert (run_dir / "checkpoints" / "round-001.pt").is_file()


# ----------------------------------------------------------------- the noise is not the centre's to know
def _train_message_with(run_config: dict, server_round: int, budget_id: str):
    return site_message(run_config, "train", server_round, budget_id)


def test_identical_dp_runs_draw_different_noise_and_sampling(site, tmp_path):
    """Same config, data, round and global model, and every seeded generator reset the same way
    before each run: the updates still differ, so nothing in the run config (or any seed the
    centre could know) reproduces the noise or the Poisson sampling."""
    run = {**RUN, "dp-noise-multiplier": 1.0}
    updates = []
    for attempt in range(2):
        open_session.cache_clear()
        torch.manual_seed(0)
        np.random.seed(0)
        out = client_app.train(_train_message(run, 1), _context(site, tmp_path / f"state{attempt}", run))
        assert out.content["site"]["status"] == "ok"
        updates.append({k: numpy_of(v) for k, v in out.content["arrays"].items()})
    assert any(not np.array_equal(updates[0][k], updates[1][k]) for k in updates[0])


def test_the_noise_generator_is_seeded_from_os_entropy_not_the_run_config():
    from client.privacy import secure_generator

    draws = [secure_generator("cpu").initial_seed() for _ in range(3)]
    assert len(set(draws)) == 3 and RunConfig.from_mapping(RUN).train.seed not in draws


def test_a_budget_id_that_is_a_path_is_refused(site, tmp_path):
    from client.budget import BadBudgetId, check_budget_id

    for bad in ("x/../../../../tmp/y", "..", "", "a b", "r" * 65):
        with pytest.raises(BadBudgetId):
            check_budget_id(bad)
    assert check_budget_id("1234567890123456789") == "1234567890123456789"
    open_session.cache_clear()
    escaped = tmp_path / "escaped"
    out = client_app.train(_train_message_with(RUN, 1, f"x/../../../../{escaped}"), _context(site, tmp_path / "s", RUN))
    assert out.content["site"]["status"] == "error" and out.content["site"]["reason"] == "bad-budget-id"
    assert not list(tmp_path.rglob("*escaped*")), "nothing was written outside the state folder"


def _charge_many(state_dir: str, rounds: int, barrier) -> None:
    """One process charging the shared site ledger ``rounds`` times (dp-budget-scope = site)."""
    from client.privacy import PrivacyLedger, SitePrivacy, reserve_round
    from common.config import SiteConfig

    site = SiteConfig(Path(state_dir), Path(state_dir), "site-a", dp_budget_scope="site")
    config = RunConfig.from_mapping({**RUN, "dp-noise-multiplier": 1.5, "dp-target-epsilon": 1e6})
    budget = SitePrivacy.resolve(config.privacy, site, 40)
    barrier.wait()
    for _ in range(rounds):
        with PrivacyLedger.locked(site, "run-x"):
            ledger = PrivacyLedger.load(site, "run-x", "rdp", None)
            reserve_round(ledger, config, budget, 40)
            ledger.save(site, "run-x")


@pytest.mark.slow
def test_two_processes_charging_one_ledger_lose_no_update(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_charge_many, args=(str(tmp_path), 15, barrier)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    from common.config import SiteConfig

    site = SiteConfig(tmp_path, tmp_path, "site-a", dp_budget_scope="site")
    ledger = PrivacyLedger.load(site, "run-x", "rdp", None)
    plan = PlannedRun.of(RunConfig.from_mapping(RUN), 40)
    q, steps = plan.sample_rate, plan.round_steps
    assert len(ledger.history) == 30 and ledger.steps == 30 * steps
    delta = 1e-5
    assert ledger.epsilon(delta) == pytest.approx(_fresh_accountant_epsilon([(1.5, q, steps)] * 30, delta), rel=1e-9)
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file is left behind"


def _hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc ** 2) + (n_neg - 1) * (q2 - auc ** 2)) / (n_pos * n_neg))
