"""What every study shares: synthetic clinics per setting and seed, the three ways to train
(federated, centralised, local only), one exact scorer for all of them, and the output folder.

- **Federated** runs the project's own ServerApp and ClientApp in this process
  (``simulations/inprocess.py``): the real strategy, handlers, DP ledger and checkpoints.
- **Centralised** and **local only** train with the same loop the sites use
  (``common/training.py``), on the same cached backbone features, each site's features
  standardised with that site's own statistics (as the federated sites do), in blocks of
  ``local-epochs`` epochs: one block per federated round, so every arm gets the same total
  number of local epochs. The optimiser restarts every block, as it does at a site every round.
- **Model selection** is the same for every arm: the round (or block) with the highest AUC on the
  centre's own validation clinic (``best-metric = server-val-auc``), which no site trains or is
  scored on, so the test figures are not biased by the selection (never a test figure: checkpoints
  are picked by ``best_checkpoint``, the run's own validation choice).
- **Training data** is the same for every arm: each site's training split; its validation split
  (which the federated sites send statistics of) and its test split are never trained on. AUC rather than loss: under
  label skew the federation's prevalence differs from the validation clinic's, and the loss would
  then reward a model for its prior, not for telling injured from healthy.
- **Scoring** is exact and the same for every arm: the model's probabilities on every site's test
  split (site j's studies standardised with site j's statistics), pooled AUC and loss with
  sklearn, and AUC per site. The study harness owns all the synthetic data; in a real
  federation only the federated figures (from sufficient statistics) would exist.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import log_loss, roc_auc_score

from client.site_stats import load_stats
from common.config import RunConfig, SiteConfig
from common.data.site import SiteData
from common.exchange import trainable_state
from common.inference import SiteInputs, fit_feature_norm, pick_device, predict
from common.provenance import provenance
from common.rundir import RunDirectory, json_safe
from common.site_encoding import load_encoded_site
from common.model import build_model, frozen_backbone_hash, load_backbone
from common.training import train_local
from simulations.inprocess import app_components, run_inprocess
from simulations.synthetic import SyntheticSpec, generate_clinics

STUDY_ROOT = Path("runs") / "studies"
# The policy of every simulated site in the studies: the centre owns these sites and asks for what
# a study measures (epsilon up to 16, exact histograms, small non-IID sites).
STUDY_SITE_POLICY = Path(__file__).with_name("site-policy.toml")


# The task's difficulty in the studies (the generator's lesion brightness; docs/data.md): at 3.0 a
# federation of five 500-study sites reaches a pooled AUC of about 0.9 without DP, where MURA
# and MRNet models sit, so that a drop does not hide under the ceiling of an easy task.
STUDY_LESION_CONTRAST = 3.0


@dataclass(frozen=True)
class StudySize:
    """The data and run size of a study; ``quick`` sizes are for tests."""

    sites: int = 3
    studies: int = 48
    image_size: int = 64
    slices: int = 8
    rounds: int = 8
    local_epochs: int = 2
    seeds: int = 3

    def run_overrides(self) -> dict[str, Any]:
        # The catalogue's severity and reconstruction heads are off in the studies: the question
        # is injury classification, and their image metrics would dominate the run time.
        return {"image-size": self.image_size, "seq-len": self.slices, "num-rounds": self.rounds,
                "local-epochs": self.local_epochs, "min-sites": self.sites, "severity-head": False,
                "recon-head": False, "eval-bins": 2048, "site-policy": str(STUDY_SITE_POLICY)}


# Two seeds: enough to check the mean and spread over seeds end to end (make test runs every study at it).
QUICK = StudySize(sites=3, studies=16, image_size=32, slices=4, rounds=2, local_epochs=1, seeds=2)


@dataclass
class Clinics:
    """One setting and seed: the sites, the centre's validation clinic, a held-out clinic."""

    root: Path
    sites: list[Path]
    server_val: Path
    holdout: Path
    spec: SyntheticSpec


def make_clinics(root: Path, spec: SyntheticSpec, public_studies: int | None = None) -> Clinics:
    """Generate once; a folder already written for the same spec is reused. The centre's
    validation clinic and the held-out clinic have ``public_studies`` studies each (default: as
    many as a site)."""
    marker = root / "spec.json"
    public = public_studies or spec.studies_per_site
    wanted = json.dumps({**spec.__dict__, **({"public_studies": public} if public_studies else {})}, sort_keys=True)
    if marker.is_file() and marker.read_text() == wanted:
        sites = sorted(p for p in (root / "sites").iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        sites = generate_clinics(root / "sites", spec, progress=False)
        # The centre's validation clinic and a held-out clinic: other seeds, IID, never trained on.
        generate_clinics(root / "server", replace(spec, sites=1, seed=spec.seed + 1000, dirichlet_alpha=0.0,
                                                  size_spread=0.0, studies_per_site=public), progress=False)
        generate_clinics(root / "holdout", replace(spec, sites=1, seed=spec.seed + 2000, dirichlet_alpha=0.0,
                                                   size_spread=0.0, studies_per_site=public), progress=False)
        marker.write_text(wanted)
    return Clinics(root, sites, root / "server" / "site-01", root / "holdout" / "site-01", spec)


def cohort_folder(spec: SyntheticSpec, public_studies: int | None = None, root: Path = STUDY_ROOT) -> Path:
    """Where a study's generated cohort lives, outside the timestamped output folders: a rerun of
    the study (or another study on the same cohort) reuses its DICOM files and cached features."""
    key = json.dumps({**spec.__dict__, "public_studies": public_studies}, sort_keys=True)
    return root.resolve() / "cohorts" / hashlib.sha256(key.encode()).hexdigest()[:12]


def fixed_backbone(folder: Path) -> dict[str, str]:
    """Run settings that give every seed one and the same frozen backbone: the randomly
    initialised ResNet50 of seed 0, written once as a weights file, as a site's pretrained weights
    are one file. Its features are then encoded once per clinic and reused by every seed (the
    cache is keyed by the backbone's hash); ``seed`` still varies the head, the split and the
    shuffling."""
    path = folder / "backbone-seed0.pth"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(load_backbone("none", 0), path)
    return {"backbone-weights": str(path)}


def seeded(overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    """The run settings of one seed: ``seed`` seeds the model's initialisation (the random
    backbone's too), the patients' train/validation/test split and the local shuffling, so a
    study's seeds vary all of them along with the generated data."""
    return {**overrides, "seed": seed}


def run_config(overrides: dict[str, Any]) -> RunConfig:
    """The app's defaults with the study's overrides, as a run would see them."""
    defaults = app_components()[2]
    return RunConfig.from_mapping({**defaults, **overrides})


# ------------------------------------------------------------------------------ scoring
@dataclass
class PreparedSite:
    name: str
    data: SiteData
    inputs: SiteInputs
    mean: torch.Tensor  # this site's feature standardisation statistics
    inv_std: torch.Tensor


class Scorer:
    """Every site's (and the validation and holdout clinics') cached features and statistics, so
    any trainable state can be scored exactly on any of them."""

    def __init__(self, clinics: Clinics, config: RunConfig) -> None:
        self.config = config
        self.device = pick_device()
        self.model = build_model(config.model)
        self.norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sites = [self._prepare(path, i, fit_on="train") for i, path in enumerate(clinics.sites)]
        # The validation and holdout clinics standardise with their own images, as the server's
        # validation set does (server/evaluation.py).
        self.server_val = self._prepare(clinics.server_val, None, fit_on="all")
        self.holdout = self._prepare(clinics.holdout, None, fit_on="all")

    def _prepare(self, path: Path, partition: int | None, fit_on: str) -> PreparedSite:
        data, inputs = load_encoded_site(self.model, path, self.config.data, self.config.model.num_labels,
                                         self.device, path.parent / ".clinicfl-state" / path.name / "cache",
                                         progress=False)
        index = data.train_index if fit_on == "train" else np.arange(len(data.studies))
        fit_feature_norm(self.model, inputs, index, self.device)
        norm = self.model.feature_norm
        return PreparedSite(path.name, data, inputs, norm.mean.clone(), norm.inv_std.clone())

    def _use(self, site: PreparedSite) -> None:
        mean, inv_std = self.norms.get(site.name, (site.mean, site.inv_std))
        self.model.feature_norm.mean.copy_(mean)
        self.model.feature_norm.inv_std.copy_(inv_std)

    def standardised_as_run(self, norms: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Score the sites with the statistics a run's sites standardised with (under DP: the
        public statistics and each site's DP release), not with their private fit; {} resets."""
        self.norms = dict(norms)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable(self.model, state)

    def probabilities(self, site: PreparedSite, index: np.ndarray) -> np.ndarray:
        self._use(site)
        return predict(self.model, site.inputs, index, self.device).probs[:, 0].numpy()

    def score(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Pooled test AUC and loss over every site's test split, and AUC per site."""
        p, y, per_site = self.pooled(state)
        return {"auc": auc_or_nan(y, p), "loss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
                "per_site_auc": per_site, "n_test": int(len(y))}

    def pooled(self, state: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """(every site's test probabilities, their labels, in site order; AUC per site)."""
        self.load(state)
        probs, labels, per_site = [], [], {}
        for site in self.sites:
            p = self.probabilities(site, site.data.test_index)
            y = site.data.labels[site.data.test_index, 0]
            probs.append(p)
            labels.append(y)
            per_site[site.name] = auc_or_nan(y, p)
        return np.concatenate(probs), np.concatenate(labels), per_site

    def validation_scores(self, state: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) of every study of the centre's validation clinic."""
        self.load(state)
        site = self.server_val
        return site.data.labels[:, 0], self.probabilities(site, np.arange(len(site.data.studies)))

    def validation(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(AUC, loss) on the centre's validation clinic."""
        y, p = self.validation_scores(state)
        return auc_or_nan(y, p), float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))

    def holdout_scores(self, state: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) of every study of the held-out clinic."""
        self.load(state)
        index = np.arange(len(self.holdout.data.studies))
        return self.holdout.data.labels[:, 0], self.probabilities(self.holdout, index)

    def holdout_auc(self, state: dict[str, torch.Tensor]) -> float:
        return auc_or_nan(*self.holdout_scores(state))


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a trainable state (a checkpoint's ``trainable``) into ``model``'s parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def auc_or_nan(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(roc_auc_score(labels, probs)) if 0 < labels.sum() < len(labels) else float("nan")


# ------------------------------------------------------------------------------ the three arms
@dataclass
class ArmResult:
    best: dict[str, Any]  # score of the selected round/block
    final: dict[str, Any]  # score of the last round/block
    best_round: int
    curve: list[dict[str, float]] = field(default_factory=list)  # per round/block: val loss, test auc, loss
    run_dir: str | None = None
    best_probs: np.ndarray | None = None  # the selected round's pooled test probabilities (for paired intervals)
    labels: np.ndarray | None = None
    best_state: dict[str, torch.Tensor] | None = None  # the selected round's trainable parameters
    final_val: tuple[np.ndarray, np.ndarray] | None = None  # the last round's (labels, probs) on the validation clinic


def federated(clinics: Clinics, overrides: dict[str, Any], scorer: Scorer, run_root: Path,
              curve: bool = False) -> ArmResult:
    """The real ServerApp and ClientApp, in process; the best round by the server's validation AUC."""
    overrides = {**overrides, "server-val-path": str(clinics.server_val), "best-metric": "server-val-auc"}
    run = RunDirectory(run_inprocess(clinics.root / "sites", run_root, len(clinics.sites), overrides))
    records = run.read_metrics()
    best_round, best_state = best_checkpoint(run)
    scorer.standardised_as_run(_site_norms(clinics, overrides, scorer))
    best = scorer.score(best_state)
    best_probs, labels, _ = scorer.pooled(best_state)
    final_state = run.load_checkpoint(records[-1]["round"])["trainable"]
    final = scorer.score(final_state)
    final_val = scorer.validation_scores(final_state)
    points = []
    if curve:
        for record in records:
            score = scorer.score(run.load_checkpoint(record["round"])["trainable"])
            points.append({"round": record["round"], "test_auc": score["auc"], "test_loss": score["loss"],
                           "val_loss": (record.get("server_validation") or {}).get("loss", {}).get("value")})
    result = ArmResult(best, final, int(best_round), points, str(run.path), best_probs, labels, best_state, final_val)
    result.final["epsilon"] = (records[-1]["catalogue"].get("epsilon") or {}).get("value")
    multipliers = [p.get("noise-multiplier") for r in records for p in (r.get("privacy") or {}).values()]
    result.final["noise_multiplier"] = max((m for m in multipliers if m is not None), default=None)
    result.final["state"] = run.state().get("state")
    scorer.standardised_as_run({})
    return result


def _site_norms(clinics: Clinics, overrides: dict[str, Any],
                scorer: Scorer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Under DP with site standardisation, the statistics each site kept after the run (its DP
    release; ``client/site_stats.py``), which the run trained and evaluated with."""
    config = run_config(overrides)
    if not (config.privacy.dp_enabled and config.model.feature_norm == "site"):
        return {}
    norms = {}
    for path in clinics.sites:
        state_dir = SiteConfig.from_node_config({"data-path": str(path)}, config.federation).state_dir
        stored = load_stats(scorer.model, state_dir, frozen_backbone_hash(scorer.model), config.data)
        if stored is not None:
            norms[path.name] = (stored["mean"].clone(), stored["inv_std"].clone())
    return norms


def best_checkpoint(run: RunDirectory) -> tuple[int, dict[str, torch.Tensor]]:
    """The run's best round (by its own best-metric, as its state says) and its trainable state;
    the last round when no round had the figure."""
    best_round = (run.state().get("best") or {}).get("round")
    if best_round is None:
        best_round = run.read_metrics()[-1]["round"]
    return int(best_round), run.load_checkpoint(int(best_round))["trainable"]


def trained_blocks(scorer: Scorer, sites: list[PreparedSite], config: RunConfig, curve: bool = False) -> ArmResult:
    """Centralised (several sites pooled) or local only (one site): ``num-rounds`` blocks of
    ``local-epochs`` epochs, the block with the highest validation AUC kept."""
    model = build_model(config.model)
    inputs, index = _pooled(sites)
    # The features are already standardised per site: the model's own standardiser is the identity.
    model.feature_norm.mean.zero_()
    model.feature_norm.inv_std.fill_(1.0)
    best_state, best_auc, best_block, points = None, -math.inf, 0, []
    final_state = None
    for block in range(1, config.federation.num_rounds + 1):
        train_local(model, inputs, index, config.train, scorer.device, server_round=block)
        state = {k: v.detach().clone() for k, v in trainable_state(model).items()}
        val_auc, val_loss = scorer.validation(state)
        if best_state is None or (math.isfinite(val_auc) and val_auc > best_auc):
            best_state, best_auc, best_block = state, val_auc, block
        if curve:
            score = scorer.score(state)
            points.append({"round": block, "test_auc": score["auc"], "test_loss": score["loss"], "val_loss": val_loss})
        final_state = state
    best_probs, labels, _ = scorer.pooled(best_state)
    return ArmResult(scorer.score(best_state), scorer.score(final_state), best_block, points,
                     best_probs=best_probs, labels=labels, best_state=best_state)


def fine_tuned(scorer: Scorer, site: PreparedSite, state: dict[str, torch.Tensor], config: RunConfig,
               blocks: int = 1) -> dict[str, torch.Tensor]:
    """The global model ``state`` trained on; at ``site`` alone for ``blocks`` blocks of
    ``local-epochs`` epochs (its training studies only): what a site gets if it adapts the
    federation's model to its own patients."""
    model = build_model(config.model)
    load_trainable(model, state)
    model.feature_norm.mean.zero_()  # the pooled features below are standardised already
    model.feature_norm.inv_std.fill_(1.0)
    inputs, index = _pooled([site])
    for block in range(1, blocks + 1):
        train_local(model, inputs, index, config.train, scorer.device, server_round=block)
    return {k: v.detach().clone() for k, v in trainable_state(model).items()}


def _pooled(sites: list[PreparedSite]) -> tuple[SiteInputs, np.ndarray]:
    """(the sites' inputs as one, each site's features standardised with its own statistics; the
    index of their training studies): the studies a federated site trains on, never its
    validation or test studies."""
    features, masks, labels, targets, train_index = [], [], [], [], []
    offset = 0
    for site in sites:
        mask = site.inputs.mask
        features.append((site.inputs.inputs - site.mean) * site.inv_std * mask.unsqueeze(-1))
        masks.append(mask)
        labels.append(site.inputs.labels)
        targets.append(site.inputs.targets if site.inputs.targets is not None else
                       torch.full((len(mask),), float("nan")))
        train_index.append(site.data.train_index + offset)
        offset += len(mask)
    inputs = SiteInputs(torch.cat(features), torch.cat(masks), torch.cat(labels), True, None, torch.cat(targets))
    return inputs, np.concatenate(train_index)


# ------------------------------------------------------------------------------ intervals
def paired_auc_difference(labels: list[np.ndarray], reference: list[np.ndarray],
                          other: list[np.ndarray] | list[list[np.ndarray]], resamples: int = 2000,
                          seed: int = 0) -> dict[str, Any]:
    """AUC(reference) - AUC(other), the mean over seeds, with a 95% paired bootstrap interval: each
    resample draws every seed's test studies with replacement and scores both arms on the same
    draw, so what the arms share (the studies) cancels in the difference. An ``other`` entry that
    is a list of score arrays (several models, e.g. each site's local-only model) counts as the
    mean of their AUCs."""
    rng = np.random.default_rng(seed)
    models = [o if isinstance(o, list) else [o] for o in other]
    point = float(np.mean([auc_or_nan(y, a) - float(np.nanmean([auc_or_nan(y, m) for m in b]))
                           for y, a, b in zip(labels, reference, models)]))
    draws = np.zeros(resamples)
    for y, a, b in zip(labels, reference, models):
        index = rng.integers(0, len(y), size=(resamples, len(y)))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every model's AUC is NaN
            draws += _auc_rows(y[index], a[index]) - np.nanmean([_auc_rows(y[index], m[index]) for m in b], axis=0)
    draws /= len(labels)
    finite = draws[np.isfinite(draws)]
    low, high = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (math.nan, math.nan))
    return {"mean": point, "ci95": [float(low), float(high)], "method": f"paired bootstrap over test studies, "
            f"{resamples} resamples, {len(labels)} seed(s)", "n_test": [int(len(y)) for y in labels]}


def paired_loss_difference(labels: list[np.ndarray], reference: list[np.ndarray], other: list[np.ndarray],
                           resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean log loss (BCE) of ``reference`` minus that of ``other`` on the same studies, the mean
    over seeds, with a 95% paired bootstrap interval (each resample draws every seed's studies
    with replacement and takes both arms' losses on the same draw)."""
    rng = np.random.default_rng(seed)

    def losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))

    per_study = [losses(y, a) - losses(y, b) for y, a, b in zip(labels, reference, other)]
    draws = np.zeros(resamples)
    for diff in per_study:
        draws += diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(1)
    draws /= len(per_study)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(np.mean([d.mean() for d in per_study])), "ci95": [float(low), float(high)],
            "method": f"paired bootstrap over validation studies, {resamples} resamples, {len(labels)} seed(s)",
            "n": [int(len(y)) for y in labels]}


def _auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row-wise AUC (Mann-Whitney, ties counted half) of (resamples, n) labels and scores; NaN for
    a row with one class only."""
    ranks = np.apply_along_axis(rankdata, 1, scores)
    n_pos = labels.sum(1)
    n_neg = labels.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ------------------------------------------------------------------------------ figures and files
def spread(values: list[float]) -> dict[str, Any]:
    """Mean over seeds with its spread; NaN values (undefined AUC) are left out and counted."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": values}
    return {"mean": statistics.fmean(finite), "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite), "max": max(finite), "n": len(finite), "values": values}


def fmt(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def fmt_interval(entry: dict[str, Any]) -> str:
    """A difference with its interval: '+0.012 [-0.004, +0.027]'."""
    low, high = entry["ci95"]
    return f"{entry['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


class StudyOutput:
    """runs/studies/NAME/<timestamp>/: results.json, report.md, PNG plots, the runs and data."""

    def __init__(self, name: str, root: Path = STUDY_ROOT) -> None:
        self.name = name
        self.folder = root.resolve() / name / time.strftime("%Y%m%d-%H%M%S")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()

    @property
    def runs(self) -> Path:
        return self.folder / "runs"

    def data(self, tag: str) -> Path:
        return self.folder / "data" / tag

    def write(self, results: dict[str, Any], report: str) -> None:
        # What reproduces it: the commit (and whether files were modified) and the command.
        results = {**results, "study": self.name, "folder": str(self.folder),
                   "wall_seconds": round(time.perf_counter() - self.started, 1),
                   "provenance": provenance(), "command": " ".join(["clinicfl-sim", *map(shlex.quote, sys.argv[1:])])}
        (self.folder / "results.json").write_text(json.dumps(json_safe(results), indent=2))
        (self.folder / "report.md").write_text(report)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


Progress = Callable[[str], None]
