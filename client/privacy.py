"""Sample-level differential privacy at a site: Opacus DP-SGD with a budget for the whole run.

- The privacy ledger (the accountant's history of (noise multiplier, sample rate, steps)) lives
  in the site's state directory and in Flower's ``context.state``; a daemon restart reloads it
  from disk, so the budget is never reset. When the two disagree the longer history wins.
- The noise multiplier is calibrated once, for the whole planned run (rounds x local epochs x
  steps per epoch at the site's sampling rate), so the run ends at or under the target.
- Before training, the site computes the epsilon it would reach after this round; if that is
  over its budget it does not train and replies ``budget-exhausted``.
- The privacy unit is one study (a batch row). ``dp-unit = "patient"`` samples patients and
  takes one of each sampled patient's studies, so a patient with several studies is protected
  as a whole.
- Noise, Poisson sampling and the study drawn per patient come from generators seeded with OS
  entropy at every round (``secure_generator``), never from the run config: the centre sets the
  run config, and noise it can regenerate is noise it can subtract.
- The ledger is read, charged and written under a file lock, before any training, so two runs
  charging one ledger (``dp-budget-scope = site``) can never lose an update.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import math
import secrets
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, TensorDataset

from common.training import TrainResult, per_study_loss
from client.budget import check_budget_id
from common.config import PrivacyConfig, RunConfig, SiteConfig, TrainConfig
from common.files import atomic_write_bytes
from common.dp_plan import PlannedRun, composed_epsilon, release_entry
from common.opacus_import import PrivacyEngine, wrap_data_loader
from common.private_norm import PublicNorm, ReleasedNorm, apply_public, release, release_key, unit_means
from common.inference import SiteInputs, StudyBatches
from common.model import InjuryNet

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

STATE_KEY = "clinicfl-privacy"
LOCK_TIMEOUT_S = 600.0  # another run may hold the ledger while it reserves its round
def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from OS entropy (64 bits, ``secrets``), fresh at
    every call. Opacus' ``secure_mode`` needs torchcsprng, which has no build for this torch;
    see docs/privacy.md for what this choice does and does not give."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class BudgetExhausted(Exception):
    """Training this round would take the site over its privacy budget."""

    def __init__(self, spent: float, would_reach: float, budget: float) -> None:
        super().__init__(f"privacy budget exhausted: spent epsilon {spent:.3f}, this round would reach "
                         f"{would_reach:.3f} > budget {budget:.3f}")
        self.spent, self.would_reach, self.budget = spent, would_reach, budget


@dataclass
class PrivacyLedger:
    """Everything needed to account this site's privacy over the run (JSON on disk)."""

    accountant: str
    history: list[list[float]] = field(default_factory=list)  # [noise multiplier, sample rate, steps]
    noise_multiplier: float | None = None  # fixed for the whole run once chosen
    feature_norm: dict | None = None  # the DP-released standardisation (common/private_norm.py), once charged

    @property
    def steps(self) -> int:
        return int(sum(entry[2] for entry in self.history))

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """The epsilon spent at ``delta`` (with ``extra`` charged on top). Rounds with the same noise
        multiplier and sample rate compose as one entry of their summed steps (RDP adds up per
        step; PRV composes the same mechanism that many times), so the cost of a long run's
        accounting does not grow with its rounds; the ledger keeps every round as it was charged."""
        return composed_epsilon(self.accountant, [*self.history, *([extra] if extra else [])], delta)

    # --- persistence: disk (survives a restart) and context.state (Flower's per-run state) ---
    @staticmethod
    def path(site: SiteConfig, budget_id: str) -> Path:
        name = "site" if site.dp_budget_scope == "site" else f"run-{check_budget_id(budget_id)}"
        return site.state_dir / "privacy" / f"{name}.json"

    @staticmethod
    @contextmanager
    def locked(site: SiteConfig, budget_id: str):
        """Hold the ledger's lock file (one writer at a time, across processes)."""
        path = PrivacyLedger.path(site, budget_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock")), timeout=LOCK_TIMEOUT_S):
            yield

    @classmethod
    def load(cls, site: SiteConfig, budget_id: str, accountant: str, state_json: str | None) -> "PrivacyLedger":
        candidates = [cls(accountant)]
        path = cls.path(site, budget_id)
        for text in (path.read_text() if path.is_file() else None, state_json):
            if text:
                data = json.loads(text)
                candidates.append(cls(data["accountant"], data["history"], data.get("noise_multiplier"),
                                      data.get("feature_norm")))
        ledger = max(candidates, key=lambda c: (c.steps, len(c.history)))
        if ledger.accountant != accountant:
            raise ValueError(f"the privacy ledger uses the {ledger.accountant} accountant, the run asks for {accountant}")
        return ledger

    def save(self, site: SiteConfig, budget_id: str) -> str:
        text = json.dumps(asdict(self))
        atomic_write_bytes(self.path(site, budget_id), text.encode())
        return text


@dataclass(frozen=True)
class SitePrivacy:
    """The budget that applies at this site: the server's, or the site's own if stricter."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str

    @classmethod
    def resolve(cls, config: PrivacyConfig, site: SiteConfig, n_units: int, max_delta: float = 1.0) -> "SitePrivacy":
        """``max_delta``: the site policy's cap on the automatic delta (an explicit delta above it
        is refused before this runs, common/policy.py)."""
        delta = config.dp_target_delta or min(1e-5, 1.0 / (10 * max(n_units, 1)), max_delta)
        epsilon = config.dp_target_epsilon
        if site.dp_target_epsilon is not None:
            epsilon = min(epsilon, site.dp_target_epsilon)
        if site.dp_target_delta is not None:
            delta = min(delta, site.dp_target_delta)
        return cls(epsilon, delta, config.dp_max_grad_norm, config.dp_accountant)


@functools.cache
def keep_large_allocations_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB for this whole process, once: the first call
    sets them, later calls only return its result. Returns whether the setting took (False off
    glibc, where nothing is changed). The site calls it where it starts DP work (client/app.py).

    Why: Opacus allocates the per-study gradients (e.g. batch x 128 x 2048 floats, 33 MB) afresh
    every step. glibc serves allocations that large with mmap and returns them on free, so every
    step pays page faults on 33 MB: measured here, DP steps 4.3x the plain step instead of 2.8x.
    With the higher thresholds such blocks stay in the heap for reuse.

    Process-wide and never undone: glibc has no call that reads these two thresholds back, so a
    round could not restore what it found. That is safe: the thresholds decide where the
    allocator takes memory from and when it hands freed memory back to the OS, never what a
    program computes. The cost is memory held longer: the process hands freed heap back to the
    OS only once more than 1 GiB of it lies free at the heap's top, and until then the next DP
    step (or round, in a simulation worker that serves several sites) reuses it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def privacy_units(train_index: np.ndarray, groups: list[str], unit: str) -> list[np.ndarray]:
    """The items DP sampling draws: single studies, or all studies of one patient."""
    if unit == "study" or not groups:
        return [np.array([i]) for i in train_index]
    by_group: dict[str, list[int]] = {}
    for i in train_index:
        by_group.setdefault(groups[i], []).append(int(i))
    return [np.array(v) for _, v in sorted(by_group.items())]


@dataclass
class PrivateRoundResult:
    train: TrainResult
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int  # cumulative over the run

    def metrics(self) -> dict[str, float | int]:
        return {"dp-epsilon": self.epsilon, "dp-delta": self.delta, "dp-noise-multiplier": self.noise_multiplier,
                "dp-max-grad-norm": self.max_grad_norm, "dp-sample-rate": self.sample_rate, "dp-steps": self.steps}


@dataclass(frozen=True)
class RoundCharge:
    """What one round of DP-SGD costs, reserved in the ledger before the round trains."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative, this round included
    total_steps: int  # cumulative, this round included
    batch_size: int  # the Poisson loader's batch (PlannedRun.batch_size): its sampling rate is sample_rate


def release_charge(ledger: PrivacyLedger) -> list[list[float]]:
    """The ledger's charge for its DP-released standardisation, as history entries ([] without one)."""
    return [release_entry(float(ledger.feature_norm["noise-multiplier"]))] if ledger.feature_norm else []


def reserve_round(ledger: PrivacyLedger, config: RunConfig, budget: SitePrivacy, n_units: int) -> RoundCharge:
    """Charge the ledger for one round, or raise BudgetExhausted and charge nothing.

    Called under the ledger's lock, before any data is touched: a round that later fails has
    still been paid for, which errs on the side of the patients."""
    plan = PlannedRun.of(config, n_units)
    q, round_steps = plan.sample_rate, plan.round_steps
    if ledger.noise_multiplier is None:
        ledger.noise_multiplier = config.privacy.dp_noise_multiplier or plan.noise_multiplier(
            budget, release_charge(ledger))
    sigma = float(ledger.noise_multiplier)
    spent = ledger.epsilon(budget.target_delta)
    would_reach = ledger.epsilon(budget.target_delta, (sigma, q, round_steps))
    if would_reach > budget.target_epsilon + 1e-9:
        raise BudgetExhausted(spent, would_reach, budget.target_epsilon)
    ledger.history.append([sigma, q, round_steps])
    return RoundCharge(sigma, q, round_steps, would_reach, ledger.steps, plan.batch_size)


def train_private(model: InjuryNet, data: SiteInputs, units: list[np.ndarray], config: RunConfig,
                  budget: SitePrivacy, charge: RoundCharge, device: torch.device,
                  proximal_mu: float = 0.0, server_round: int = 1) -> PrivateRoundResult:
    """One round of DP-SGD on the trainable head, exactly as ``charge`` reserved it: make the
    head private, run the round's steps, copy the trained head back into ``model``, and check that
    the accountant saw exactly the reserved steps."""
    train: TrainConfig = config.train
    if not data.is_features:
        raise ValueError("DP training runs on cached backbone features (freeze = frozen)")
    start = time.perf_counter()
    model.feature_norm.to(device)
    private = PrivateHead.of(model, len(units), train, budget, charge, device,
                             train.lr_at(server_round, config.privacy.dp_lr),
                             config.privacy.dp_max_physical_batch)
    total, seen = _train_steps(model, private, data, units, train, device, proximal_mu)
    private.copy_to(model)
    private.module._close()
    private.check_accounted(charge)
    result = TrainResult(num_examples=len(units), loss=float(total) / max(seen, 1), seconds=time.perf_counter() - start)
    return PrivateRoundResult(result, charge.epsilon, budget.target_delta, charge.noise_multiplier,
                              budget.max_grad_norm, charge.sample_rate, charge.total_steps)


@dataclass
class PrivateHead:
    """A copy of the model's trainable head as Opacus trains it for one round."""

    module: GradSampleModule  # records each study's gradient with hooks
    optimizer: DPOptimizer  # clips each study's gradient, adds the noise, steps the accountant
    loader: DataLoader  # Poisson sampling of the privacy units
    engine: PrivacyEngine  # its accountant's history is what ran

    @classmethod
    def of(cls, model: InjuryNet, n_units: int, train: TrainConfig, budget: SitePrivacy, charge: RoundCharge,
           device: torch.device, lr: float, max_physical_batch: int) -> "PrivateHead":
        head = copy.deepcopy(model.head).to(device).train()
        optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=train.weight_decay)
        # Poisson sampling draws from the loader's generator (CPU), the noise from one on the
        # parameters' device; both are seeded from OS entropy, never from the run config.
        loader = DataLoader(TensorDataset(torch.arange(n_units)), batch_size=charge.batch_size,
                            generator=secure_generator("cpu"))
        with warnings.catch_warnings():
            # Opacus warns whenever secure_mode is off; our generators are seeded from OS entropy
            # (secure_generator), which is the point of that warning.
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            engine = PrivacyEngine(accountant=budget.accountant)
        module, optimizer, loader = engine.make_private(
            module=head, optimizer=optimizer, data_loader=loader, noise_multiplier=charge.noise_multiplier,
            max_grad_norm=budget.max_grad_norm, poisson_sampling=True, noise_generator=secure_generator(device))
        # A sampled batch (about half the site's units by default) is computed in chunks: each chunk's
        # per-study gradients are clipped and summed, and only the batch's last chunk adds the noise,
        # steps and is accounted (Opacus' BatchMemoryManager sampler).
        loader = wrap_data_loader(data_loader=loader, max_batch_size=max_physical_batch, optimizer=optimizer)
        return cls(module, optimizer, loader, engine)

    def step(self, loss: torch.Tensor, proximal: "ProximalTerm | None") -> None:
        """One DP-SGD step on ``loss``: Opacus' DPOptimizer.step in its two halves (clip, noise and
        account; then the optimiser's step), with the proximal gradient added between them."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optimizer.pre_step():
            if proximal is not None:
                proximal.add_gradient()
            self.optimizer.original_optimizer.step()

    def copy_to(self, model: InjuryNet) -> None:
        """The trained parameters into ``model``'s own head."""
        trained = dict(self.module._module.named_parameters())
        with torch.no_grad():
            for name, param in model.head.named_parameters():
                param.copy_(trained[name])

    def check_accounted(self, charge: RoundCharge) -> None:
        """The reservation must be exactly what ran, or the ledger under-counts."""
        ran = [(float(s), float(r), int(n)) for s, r, n in self.engine.accountant.history]
        reserved = (charge.noise_multiplier, charge.sample_rate, charge.steps)
        if ran != [reserved]:
            raise RuntimeError(f"DP round ran {ran}, but the ledger reserved {reserved}")


@dataclass(frozen=True)
class ProximalTerm:
    """FedProx's proximal term mu/2 ||w - w_global||^2 on the trainable parameters.

    It depends on no data: its gradient mu (w - w_global) is added after Opacus has clipped and
    noised the data gradient (post-processing, no privacy cost), instead of being clipped with
    each study's gradient."""

    params: list[torch.nn.Parameter]
    anchor: list[torch.Tensor]  # the global model's values, where the round starts
    mu: float

    @classmethod
    def at_start(cls, module: torch.nn.Module, mu: float) -> "ProximalTerm | None":
        """The term anchored at ``module``'s current parameters; None for mu = 0 (plain FedAvg)."""
        if mu <= 0:
            return None
        params = [p for p in module.parameters() if p.requires_grad]
        return cls(params, [p.detach().clone() for p in params], mu)

    def add_gradient(self) -> None:
        for p, a in zip(self.params, self.anchor):
            p.grad.add_(p.detach() - a, alpha=self.mu)


def _train_steps(model: InjuryNet, private: PrivateHead, data: SiteInputs, units: list[np.ndarray],
                 train: TrainConfig, device: torch.device, proximal_mu: float) -> tuple[torch.Tensor, int]:
    """Every DP-SGD step of the round: (the summed per-study loss, on the device, and the number
    of studies it sums)."""
    rng = np.random.default_rng(secrets.randbits(128))  # which study of a sampled patient
    proximal = ProximalTerm.at_start(private.module, proximal_mu)
    batches = StudyBatches.for_training(model, data, device)
    total, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    with warnings.catch_warnings():
        # Opacus records per-sample activations with full backward hooks; the head's input (cached
        # features) needs no gradient, and torch warns about exactly that on every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                                  "respect to module outputs since no inputs require gradients")
        for _ in range(train.local_epochs):
            for (unit_batch,) in private.loader:
                # One study per sampled unit: a batch row is the privacy unit.
                batch = batches(torch.as_tensor([int(rng.choice(units[u])) for u in unit_batch.tolist()],
                                                dtype=torch.long))
                standardised = (model.feature_norm(batch.inputs) * batch.mask.unsqueeze(-1)
                                if model.config.feature_norm == "site" else batch.inputs)
                losses = per_study_loss(private.module(standardised, batch.mask, batch.biomech), batch, train)
                loss = losses.sum() / max(len(batch), 1)  # the mean, and 0 (not NaN) for an empty Poisson batch
                private.step(loss, proximal)
                total += losses.detach().sum()
                seen += len(batch)
    return total, seen


def standardise_privately(ledger: PrivacyLedger, config: RunConfig, budget: SitePrivacy, model: InjuryNet,
                          data: SiteInputs, units: list[np.ndarray], public: PublicNorm, backbone_hash: str,
                          charge: bool) -> ReleasedNorm | None:
    """Set ``model``'s standardisation under DP (``feature-norm = site``): the ledger's release
    when it holds one for these public statistics, backbone and units; else, with ``charge``,
    release the site's mean now and charge it (BudgetExhausted, and nothing charged, when it does
    not fit); else the public statistics alone. Called under the ledger's lock. Returns the
    release in force, or None for the public statistics."""
    key = release_key(public, backbone_hash, len(units))
    if ledger.feature_norm and ledger.feature_norm.get("key") == key:
        released = ReleasedNorm.from_json(ledger.feature_norm)
        released.apply(model)
        return released
    if not charge:
        apply_public(model, public)
        return None
    plan = PlannedRun.of(config, len(units))
    spent = ledger.epsilon(budget.target_delta)
    try:
        sigma, sgd_sigma = plan.calibrate(budget, True, config.privacy.dp_feature_norm_noise,
                                          config.privacy.dp_noise_multiplier)
    except ValueError as exc:  # no noise fits the budget at all
        raise BudgetExhausted(spent, math.inf, budget.target_epsilon) from exc
    # The release is charged only if the first round can follow it within the budget: a release
    # that leaves no room to train would spend the patients' budget for nothing.
    released_entry = release_entry(sigma)
    with_release = PrivacyLedger(ledger.accountant, [*ledger.history, released_entry])
    would_reach = with_release.epsilon(budget.target_delta, (sgd_sigma, plan.sample_rate, plan.round_steps))
    if would_reach > budget.target_epsilon + 1e-9:
        raise BudgetExhausted(spent, would_reach, budget.target_epsilon)
    means = unit_means(data.inputs, data.mask, units, public)
    released = release(means, public, sigma, key, secure_generator("cpu"))
    ledger.history.append(released_entry)
    ledger.feature_norm = released.to_json()
    ledger.noise_multiplier = sgd_sigma  # calibrated above with the release charged: reserve_round keeps it
    released.apply(model)
    return released

