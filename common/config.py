"""One typed configuration, parsed once from Flower's run config and a site's node config.

The run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run --run-config``) is the same at the server and every site. The node config is set
per site on its SuperNode (``--node-config 'data-path="/data/site" ...'``).

The dataclasses below are the one source of every run-config key: its default, its type, its
choices (an enumeration) and its help text. pyproject.toml's ``[tool.flwr.app.config]`` and the
README's configuration tables are rendered from them by ``python -m common.config_docs --write``
(tests/test_config_docs.py checks that both are what it renders).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Self

from common.reason_codes import ReasonCodeError


class FreezePolicy(StrEnum):
    FROZEN = "frozen"
    LAYER4 = "layer4"
    FULL = "full"


class FeatureNorm(StrEnum):
    SITE = "site"
    NONE = "none"


class Aggregation(StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDMEDIAN = "fedmedian"
    TRIMMED_MEAN = "trimmed-mean"
    SCAFFOLD = "scaffold"


class ServerOptimizerKind(StrEnum):
    NONE = "none"
    MOMENTUM = "momentum"
    ADAM = "adam"


class SiteLayout(StrEnum):
    AUTO = "auto"
    DICOM = "dicom"
    MURA = "mura"
    MRNET = "mrnet"


class Tracking(StrEnum):
    NONE = "none"
    MLFLOW = "mlflow"
    TENSORBOARD = "tensorboard"


class BestMetric(StrEnum):  # common/runlog.py SELECTION_METRICS; never a test figure
    VAL_LOSS = "val-loss"
    VAL_AUC = "val-auc"
    SERVER_VAL_LOSS = "server-val-loss"
    SERVER_VAL_AUC = "server-val-auc"


class MrnetPlane(StrEnum):
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"


class MrnetTask(StrEnum):
    ABNORMAL = "abnormal"
    ACL = "acl"
    MENISCUS = "meniscus"


class DpAccountant(StrEnum):
    RDP = "rdp"
    PRV = "prv"


class DpUnit(StrEnum):
    STUDY = "study"
    PATIENT = "patient"


class DpBudgetScope(StrEnum):
    RUN = "run"
    SITE = "site"


class WireDtype(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class WireCompression(StrEnum):
    ZLIB = "zlib"
    NONE = "none"


class ReplyPolling(StrEnum):
    PROMPT = "prompt"
    FLOWER = "flower"


def choices(enumeration: type[StrEnum]) -> tuple[str, ...]:
    """The plain-string values of an enumeration (argparse choices, messages)."""
    return tuple(member.value for member in enumeration)


# Plain strings for the modules that offer them as choices (argparse, server/strategy.py).
AGGREGATIONS = choices(Aggregation)
SITE_LAYOUTS = choices(SiteLayout)
TRACKERS = choices(Tracking)
MRNET_TASKS = choices(MrnetTask)


class ConfigError(ReasonCodeError, ValueError):
    """A configuration value is missing, unknown or out of range."""

    code = "config-error"


def setting(default: Any, help: str) -> Any:
    """A run-config field: its default and the help text the generated pyproject.toml and README show.
    A default that is an enumeration member makes the field a choice of that enumeration."""
    return field(default=default, metadata={"help": help})


def choice(enumeration: type[StrEnum], key: str, value: Any) -> StrEnum:
    """``value`` as a member of ``enumeration``; a ConfigError naming the key and the choices if it is none."""
    try:
        return enumeration(value)
    except ValueError:
        raise ConfigError(f"{key} must be one of {', '.join(choices(enumeration))}, got {value!r}") from None


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


class Section:
    """A run-config section: a frozen dataclass whose fields are all made with ``setting``."""

    title: ClassVar[str]

    def __post_init__(self) -> None:
        for f in settings(type(self)):
            if isinstance(f.default, Enum):  # a choice: stored as the member, validated here
                object.__setattr__(self, f.name, choice(type(f.default), _key(f.name), getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Refuse out-of-range values, with the key and what to set instead."""


def settings(section: type) -> Iterator[Any]:
    """The run-config fields of a section (those made with ``setting``), in declaration order."""
    return (f for f in fields(section) if "help" in f.metadata)


@dataclass(frozen=True)
class SharedConfig(Section):
    """Settings the model, the data pipeline and local training all read: defined once, so they cannot disagree."""

    title: ClassVar[str] = "Shared by the model, the data and training"

    image_size: int = setting(64, "Every image is resized to image-size x image-size pixels (>= 32: ResNet50 "
                                  "downsamples by 32).")
    seq_len: int = setting(8, "Images per study: longer studies are sampled down to this many, shorter ones padded "
                              "(masked).")
    biomech_features: int = setting(0, "Columns of each study's biomech/<study>.csv, fed beside its images "
                                       "(0 = images only); see docs/data.md.")
    seed: int = setting(0, "Seeds the head's initialisation (and the backbone's with backbone-weights = none), each "
                           "site's train/validation/test split and its local training.")

    def check(self) -> None:
        if self.image_size < 32:
            raise ConfigError("image-size must be >= 32 (ResNet50 downsamples by 32)")
        if self.seq_len < 1:
            raise ConfigError("seq-len must be >= 1")
        if self.biomech_features < 0:
            raise ConfigError("biomech-features must be >= 0")


class ReadsShared(Section):
    """A section that reads the shared settings as its own (``config.image_size``)."""

    shared: SharedConfig

    @property
    def image_size(self) -> int:
        return self.shared.image_size

    @property
    def seq_len(self) -> int:
        return self.shared.seq_len

    @property
    def biomech_features(self) -> int:
        return self.shared.biomech_features

    @property
    def seed(self) -> int:
        return self.shared.seed

    def with_shared(self, **changes: Any) -> Self:
        """A copy with some shared settings changed, e.g. ``config.with_shared(seed=1)``. In a RunConfig,
        change ``shared`` in every section at once (``RunConfig.from_mapping``) or they disagree."""
        return replace(self, shared=replace(self.shared, **changes))


@dataclass(frozen=True)
class ModelConfig(ReadsShared):
    """The ResNet50 trunk, the site feature standardiser and the BiGRU-attention head; see docs/design.md."""

    title: ClassVar[str] = "Model"

    shared: SharedConfig = field(default_factory=SharedConfig)
    num_labels: int = setting(1, "Labels the model predicts, one sigmoid output each.")
    label_names: str = setting("", "Comma-separated display names of the labels, e.g. abnormal,acl,meniscus "
                                   "(empty: injury, or label1, label2, ...).")
    freeze: FreezePolicy = setting(FreezePolicy.FROZEN, "What of the ResNet50 trunk trains: nothing (frozen, the "
                                                        "paper's default and needed for DP), its last block "
                                                        "(layer4) or all of it (full).")
    backbone_weights: str = setting("none", "ResNet50 weights: none (seeded random init, warns), imagenet (the torch "
                                            "hub cache) or the path of a .pth file.")
    proj_dim: int = setting(128, "Width of each image's projected backbone feature.")
    gru_hidden: int = setting(64, "Hidden width of each direction of the BiGRU.")
    attn_dim: int = setting(64, "Width of the attention that pools the sequence.")
    dropout: float = setting(0.1, "Dropout on the projected features, in [0, 1).")
    # Kept at the site, like FedBN's local statistics: they describe the site's own scanners.
    feature_norm: FeatureNorm = setting(FeatureNorm.SITE, "site: standardise backbone features with statistics of "
                                                          "the site's own training images (never sent); none: use "
                                                          "them as they are.")
    severity_head: bool = setting(True, "A severity regression head, trained where labels.csv has a target.")
    recon_head: bool = setting(True, "A light decoder that rebuilds each image from its feature (PSNR, SSIM, FID).")
    recon_size: int = setting(16, "Side of the rebuilt images, between 4 and image-size.")

    def check(self) -> None:
        for name in ("num_labels", "proj_dim", "gru_hidden", "attn_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be >= 1")
        if self.label_names and len(self.label_names.split(",")) != self.num_labels:
            raise ConfigError(f"label-names has {len(self.label_names.split(','))} names but num-labels = {self.num_labels}")
        if not 4 <= self.recon_size <= self.image_size:
            raise ConfigError("recon-size must be between 4 and image-size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout must be in [0, 1)")

    def names(self) -> list[str]:
        if self.label_names:
            return [n.strip() for n in self.label_names.split(",")]
        return ["injury"] if self.num_labels == 1 else [f"label{i + 1}" for i in range(self.num_labels)]


@dataclass(frozen=True)
class DataConfig(ReadsShared):
    """How each site reads and splits its studies (every site preprocesses to the same shape); see docs/data.md."""

    title: ClassVar[str] = "Data"

    shared: SharedConfig = field(default_factory=SharedConfig)
    series_description: str = setting("", "DICOM layout: use the series whose SeriesDescription contains this text "
                                           "(case-insensitive; empty: the series with the most images).")
    test_fraction: float = setting(0.25, "Fraction of each site's patients held out for testing, unless labels.csv "
                                         "has a split column; in (0, 1).")
    # 0.1, rounded down, at least one patient: a 16-study site (13-15 patients) gives one patient
    # to validation and keeps the 10 training studies the site policy's default asks for.
    val_fraction: float = setting(0.1, "Fraction of each site's patients held out for validation (what chooses "
                                       "the round, stops early, calibrates and sets the threshold; rounded down, "
                                       "at least one), unless labels.csv's split column names val studies (a "
                                       "column of train and test only: taken from its training patients); in "
                                       "(0, 1), test-fraction + val-fraction below 1.")
    mrnet_plane: MrnetPlane = setting(MrnetPlane.SAGITTAL, "MRNet layout: the plane whose volume forms the "
                                                           "sequence.")
    mrnet_labels: str = setting("abnormal,acl,meniscus", "MRNet layout: the tasks, comma-separated, in label order "
                                                         "(from abnormal, acl, meniscus).")

    def check(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError("test-fraction must be in (0, 1)")
        if not 0.0 < self.val_fraction < 1.0 or self.test_fraction + self.val_fraction >= 1.0:
            raise ConfigError("val-fraction must be in (0, 1) and test-fraction + val-fraction below 1 (the rest "
                              "trains)")
        tasks = [t.strip() for t in self.mrnet_labels.split(",") if t.strip()]
        if not tasks or any(t not in MRNET_TASKS for t in tasks) or len(set(tasks)) != len(tasks):
            raise ConfigError(f"mrnet-labels must be distinct names from {', '.join(MRNET_TASKS)}, "
                              f"got {self.mrnet_labels!r}")


@dataclass(frozen=True)
class TrainConfig(ReadsShared):
    """Adam on each site's training split, every round."""

    title: ClassVar[str] = "Local training"

    shared: SharedConfig = field(default_factory=SharedConfig)
    local_epochs: int = setting(2, "Epochs of local training per round.")
    lr: float = setting(1e-3, "Adam's learning rate in round 1.")
    weight_decay: float = setting(1e-2, "Adam's weight decay; 1e-2 has the lowest final loss on the centre's "
                                        "validation clinic among the constant-lr settings of the local-training "
                                        "study (README, Results).")
    batch_size: int = setting(8, "Studies per batch.")
    severity_weight: float = setting(0.02, "Weight of the severity loss; its targets are on a 0-10 scale, so the MSE "
                                           "term stays below the BCE.")
    recon_weight: float = setting(1.0, "Weight of the reconstruction loss.")
    lr_decay: float = setting(1.0, "Round r trains with lr * lr-decay^(r-1), a per-round schedule every site "
                                   "follows (1.0 = constant); in (0, 1].")
    # Under label skew a site's local optimum leans to its own prevalence; adding tau x its prior
    # log-odds to the logits while training (Menon et al. 2021, logit adjustment) leaves the model's
    # own logits free of that prior, so the sites' updates agree more.
    logit_adjust: float = setting(0.0, "Train on logit + tau x log(p / (1 - p)), p the site's training prevalence of "
                                       "each label (logit adjustment against label skew); predictions use the logit "
                                       "itself; 0 = off. Not with DP (the prevalence is not privatised).")

    def lr_at(self, server_round: int, lr: float | None = None) -> float:
        """Round ``server_round``'s rate: ``lr`` (default: the lr setting) x lr-decay^(r-1)."""
        return (lr or self.lr) * self.lr_decay ** max(server_round - 1, 0)

    def check(self) -> None:
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError("lr-decay must be in (0, 1]")
        if self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("local-epochs and batch-size must be >= 1 and lr > 0")
        if self.severity_weight < 0 or self.recon_weight < 0:
            raise ConfigError("severity-weight and recon-weight must be >= 0")
        if self.logit_adjust < 0:
            raise ConfigError("logit-adjust must be >= 0 (0: off)")


@dataclass(frozen=True)
class EvalConfig(Section):
    """The metric catalogue each site computes and the centre pools; see docs/metrics.md."""

    title: ClassVar[str] = "Evaluation"

    threshold: float = setting(0.5, "Decision threshold of the confusion-count metrics.")
    min_site_cases: int = setting(10, "A site with fewer test studies gets no per-site figures.")
    fid_dim: int = setting(64, "FID feature width, in [2, 2048]: the statistics a site sends grow with its square.")
    # The reconstructions change every round and FID runs the backbone on them: a fixed sample keeps
    # the figures comparable across rounds and the cost bounded.
    image_metrics_sample: int = setting(32, "PSNR, SSIM and FID use this many of each site's test images, evenly "
                                            "spaced and the same every round (0 = all).")
    # The reconstructions carry recon-size detail, and a smaller input costs the backbone less.
    fid_image_size: int = setting(32, "FID features come from the model's ResNet50 on images resized to this size "
                                      "(0 = image-size).")
    # FID is the one figure that runs the backbone every time (~80 ms a site on one CPU core, more
    # than the site's training of a round here).
    fid_every: int = setting(5, "FID at round 0, every fid-every rounds and the last round (not available in "
                                "between); the other figures every round.")
    fid_inception_weights: str = setting("", "A local torchvision InceptionV3 .pth for the FID features (empty: the "
                                             "model's ResNet50).")
    server_val_path: str = setting("", "A site-layout folder the server evaluates on itself every round (optional; "
                                       "best-metric server-val-loss/-auc needs it).")
    eval_bins: int = setting(0, "Score-histogram bins per label a site sends: 0 = by its test size (about one study "
                                "a bin, 4..2048; the AUC error bound is reported), else a power of two. Fine bins "
                                "on a small test split almost disclose each study's score and label; see "
                                "docs/privacy.md.")
    target_sensitivity: float = setting(0.9, "export: the operating threshold reaches this sensitivity on the "
                                             "exported round's pooled validation statistics.")

    def fid_round(self, server_round: int, num_rounds: int) -> bool:
        """Whether the evaluation of ``server_round`` computes FID (round 0, every fid-every, the last)."""
        return server_round % self.fid_every == 0 or server_round == num_rounds

    def check(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("threshold must be in (0, 1)")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError("target-sensitivity must be in (0, 1]")
        if self.eval_bins and (self.eval_bins < 4 or self.eval_bins > 2048 or self.eval_bins & (self.eval_bins - 1)):
            raise ConfigError("eval-bins must be 0 (by test size) or a power of two in [4, 2048]")
        if self.fid_dim < 2 or self.fid_dim > 2048:
            raise ConfigError("fid-dim must be in [2, 2048]")
        if self.image_metrics_sample < 0:
            raise ConfigError("image-metrics-sample must be >= 0 (0: every test image)")
        if self.fid_every < 1:
            raise ConfigError("fid-every must be >= 1 (1: every round)")
        if self.fid_image_size and self.fid_image_size < 32:
            raise ConfigError("fid-image-size must be 0 or >= 32 (ResNet50 downsamples by 32)")


DP_LR_DEFAULT = 0.01


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """Sample-level differential privacy at each site (Opacus DP-SGD), with a budget for the whole run; a site's
    node config or policy may be stricter. See docs/privacy.md."""

    title: ClassVar[str] = "Differential privacy"

    dp_enabled: bool = setting(False, "Train with DP-SGD (needs freeze = frozen).")
    dp_target_epsilon: float = setting(8.0, "The epsilon the whole run may spend, not per round.")
    dp_target_delta: float = setting(0.0, "The delta, in [0, 1); 0 = 1 / (10 x training units), capped at 1e-5.")
    dp_max_grad_norm: float = setting(1.0, "Each unit's gradient is clipped to this L2 norm.")
    dp_noise_multiplier: float = setting(0.0, "0 = calibrated once so the planned run ends at the target epsilon.")
    dp_accountant: DpAccountant = setting(DpAccountant.RDP, "Opacus' privacy accountant.")
    dp_unit: DpUnit = setting(DpUnit.STUDY, "What DP protects: each study, or each patient (one study per patient "
                                            "per sampled unit).")
    # DP-SGD's noise on the mean gradient shrinks as 1/batch at the same noise multiplier, so under DP
    # a site samples a large share of its units per step (docs/privacy.md, planning).
    dp_batch_fraction: float = setting(0.5, "Each DP-SGD step samples this fraction of the site's training units "
                                            "(Poisson; an expected batch of fraction x units); 0 = batch-size.")
    # A DP round is a few large-batch steps (two an epoch at the default fraction), where training
    # without DP takes dozens of small ones: Adam needs a larger step to cover the same ground.
    dp_lr: float = setting(DP_LR_DEFAULT, "Adam's learning rate in round 1 under DP (lr-decay applies); 0 = lr. "
                                          "Chosen on public data only (docs/privacy.md).")
    dp_max_physical_batch: int = setting(256, "DP-SGD computes a sampled batch in chunks of at most this many "
                                              "studies (per-study gradients are held per chunk); the step and the "
                                              "accounting are the whole batch's.")
    dp_feature_norm_noise: float = setting(0.0, "feature-norm = site under DP: the noise multiplier of the DP "
                                                "release of the site's feature mean (charged to the same ledger); 0 = "
                                                "the smallest that raises DP-SGD's noise by at most 5%. See "
                                                "docs/privacy.md.")

    def check(self) -> None:
        if self.dp_target_epsilon <= 0 or self.dp_max_grad_norm <= 0 or self.dp_noise_multiplier < 0:
            raise ConfigError("dp-target-epsilon and dp-max-grad-norm must be > 0, dp-noise-multiplier >= 0")
        if not 0.0 <= self.dp_target_delta < 1.0:
            raise ConfigError("dp-target-delta must be in [0, 1)")
        if self.dp_feature_norm_noise < 0:
            raise ConfigError("dp-feature-norm-noise must be >= 0 (0: chosen automatically)")
        if not 0.0 <= self.dp_batch_fraction <= 1.0:
            raise ConfigError("dp-batch-fraction must be in [0, 1] (0: batch-size)")
        if self.dp_lr < 0:
            raise ConfigError("dp-lr must be >= 0 (0: lr)")
        if self.dp_max_physical_batch < 1:
            raise ConfigError("dp-max-physical-batch must be >= 1")


@dataclass(frozen=True)
class FederationConfig(Section):
    """Rounds, sites, aggregation, the wire and the centre's bookkeeping."""

    title: ClassVar[str] = "Federation"

    num_rounds: int = setting(3, "Rounds of federated training.")
    min_sites: int = setting(2, "Sites that must reply for a round to update the model.")
    fraction_train: float = setting(1.0, "Fraction of the connected sites asked to train each round.")
    fraction_evaluate: float = setting(1.0, "Fraction of the connected sites asked to evaluate each round.")
    round_timeout: float = setting(600.0, "Seconds a round waits for the sites' replies.")
    run_dir: str = setting("runs", "The folder of the centre's run directories.")
    data_root: str = setting("", "Simulation only: the sites are the sorted sub-folders of data-root, one per "
                                 "partition.")
    audit_outgoing: bool = setting(False, "Every site keeps a byte-exact copy of each message it sends in "
                                          "STATE_DIR/audit (client/audit.py); also a node-config key.")
    aggregation: Aggregation = setting(Aggregation.FEDAVG, "fedavg: the mean weighted by studies; fedprox: FedAvg "
                                                           "with proximal-mu/2 ||w - w_global||^2 in the sites' "
                                                           "local loss; fedmedian: the coordinate-wise median; "
                                                           "trimmed-mean: the mean after cutting trim-fraction at "
                                                           "each end; scaffold: FedAvg with SCAFFOLD's control "
                                                           "variates correcting each site's gradients for client "
                                                           "drift (server/scaffold.py; not with DP or "
                                                           "secure-aggregation).")
    trim_fraction: float = setting(0.2, "trimmed-mean: the fraction cut at each end, per coordinate, in [0, 0.5).")
    proximal_mu: float = setting(0.01, "fedprox: the weight mu of the proximal term.")
    # Under label skew the sites' updates pull apart and their mean moves little per round; a
    # server optimiser steps on global - mean as on a gradient (server/server_optimizer.py).
    server_optimizer: ServerOptimizerKind = setting(ServerOptimizerKind.NONE, "The centre's step on the aggregate "
                                                    "(global - aggregate as a pseudo-gradient): none (the aggregate "
                                                    "is the new model), momentum (FedAvgM) or adam (FedAdam).")
    server_lr: float = setting(1.0, "The server optimiser's learning rate (momentum: 1 with server-momentum 0 is "
                                    "FedAvg; adam: about 0.01-0.1).")
    server_momentum: float = setting(0.9, "momentum: the heavy-ball factor; adam: beta_1; in [0, 1).")
    max_update_norm: float = setting(0.0, "Reject a site's update farther (L2) than this from the global model it "
                                          "started from (0 = no bound).")
    resume_from: str = setting("", "A run directory to continue from its last finished round (clinicfl-server "
                                   "resume sets it).")
    control_poll: float = setting(2.0, "Seconds between checks of the pause flag while a run is paused "
                                       "(clinicfl-server pause/continue).")
    pause_after_round: int = setting(0, "Pause the run after this round, as clinicfl-server pause does; "
                                        "clinicfl-server continue resumes it (0 = never).")
    reply_polling: ReplyPolling = setting(ReplyPolling.PROMPT, "How the centre waits for the sites' replies "
                                                               "(server/transport.py): prompt pulls them 10 ms "
                                                               "after the push, then every tenth of the time waited "
                                                               "(at most every 0.5 s); flower keeps Flower's fixed "
                                                               "interval (3 s deployed, 0.1 s simulated).")
    # A round trained before an early stop would spend privacy budget for nothing: DP and secure
    # aggregation keep the two phases, and so do fractions below 1 (different sites per phase).
    evaluate_with_training: bool = setting(True, "One exchange per site per round: the message that trains round r "
                                                 "has the site score round r-1's model first (the last round is "
                                                 "scored on its own). Two exchanges (train, then evaluate) with DP, "
                                                 "secure aggregation, fractions below 1 or false; see "
                                                 "docs/design.md.")
    site_registry: str = setting("", "The centre's sites.json (clinicfl-server register-site; clinicfl-server run "
                                     "sets it): replies are filed under the name their authenticated node is "
                                     "registered with. Empty (simulation): each node keeps the name it first "
                                     "reports.")
    wire_dtype: WireDtype = setting(WireDtype.FLOAT32, "Parameters on the wire; float16 halves the bytes both ways "
                                                       "(the server widens and aggregates in float64 and keeps "
                                                       "float32 checkpoints).")
    wire_compression: WireCompression = setting(WireCompression.ZLIB, "Lossless compression of the parameters on "
                                                                      "the wire: zlib deflates the sign-and-exponent "
                                                                      "byte of each value (about 16% fewer bytes in "
                                                                      "a few ms); none sends Flower's plain numpy "
                                                                      "arrays.")
    best_metric: BestMetric = setting(BestMetric.VAL_LOSS, "The best global model (export's default, and what "
                                                           "patience watches): the round with the best loss or AUC "
                                                           "of the sites' pooled validation splits, or of the "
                                                           "centre's own validation clinic (server-val-path). Test "
                                                           "figures never choose.")
    patience: int = setting(0, "End the run after this many rounds without improvement of best-metric (0 = never).")
    tracking: Tracking = setting(Tracking.NONE, "Experiment tracking at the centre (server/tracking.py): mlflow "
                                                "(extra .[mlflow]) or tensorboard (event files in the run directory, "
                                                "extra .[tensorboard]).")
    tracking_uri: str = setting("", "mlflow: the tracking URI (empty: a SQLite store beside the run directories).")
    tracking_experiment: str = setting("clinicfl", "mlflow: the experiment the runs are filed under.")
    drill: str = setting("", "Simulation only: a fault drill, nan-update, wrong-shape-update or raise-phi "
                             "(client/drills.py).")
    drill_sites: str = setting("", "Simulation only: the sites that run the drill, comma-separated (empty: all).")
    site_policy: str = setting("", "Simulation only: the site policy file every simulated site applies "
                                   "(common/policy.py); a deployed site reads only its own (clinicfl-client start "
                                   "--policy).")
    secure_aggregation: bool = setting(False, "SecAgg+ (server/secure_aggregation.py): the centre learns only the "
                                              "weighted sum of the sites' updates. Not with fedmedian, trimmed-mean "
                                              "or max-update-norm (refused at start-up); its cost: "
                                              "docs/security.md.")
    secagg_num_shares: int = setting(0, "SecAgg+: the shares of each site's secrets (0 = every sampled site, else "
                                        ">= 3).")
    secagg_reconstruction_threshold: int = setting(0, "SecAgg+: the shares that rebuild a secret (0 = a majority of "
                                                      "the shares, so a minority of sites may drop out mid-round).")
    secagg_clipping_range: float = setting(1.0, "SecAgg+: each update is clipped to +-this before it is quantised.")
    secagg_quantization_bits: int = setting(24, "SecAgg+: updates are quantised to 2^bits levels (8..28; masks are "
                                                "taken modulo 2^32).")
    secagg_max_weight: float = setting(1000.0, "SecAgg+: the largest num-examples one site may weigh in with.")

    def check(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError("num-rounds must be >= 1")
        if self.min_sites < 1:
            raise ConfigError("min-sites must be >= 1")
        if self.proximal_mu < 0:
            raise ConfigError("proximal-mu must be >= 0")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError("trim-fraction must be in [0, 0.5)")
        if self.max_update_norm < 0 or self.control_poll <= 0:
            raise ConfigError("max-update-norm must be >= 0 and control-poll > 0")
        if self.patience < 0:
            raise ConfigError("patience must be >= 0 (0: no early stopping)")
        if self.pause_after_round < 0:
            raise ConfigError("pause-after-round must be >= 0 (0: never)")
        if self.server_lr <= 0 or not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError("server-lr must be > 0 and server-momentum in [0, 1)")
        if self.secure_aggregation:
            self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        """Refuse what cannot work on masked updates, with a one-line reason each."""
        if self.aggregation in (Aggregation.FEDMEDIAN, Aggregation.TRIMMED_MEAN):
            raise ConfigError(f"secure-aggregation cannot be used with aggregation = {self.aggregation}: "
                              "the centre sees only the sum of the updates, and a median or a trimmed mean "
                              "needs each one")
        if self.aggregation == Aggregation.SCAFFOLD:
            raise ConfigError("secure-aggregation cannot be used with aggregation = scaffold: each site's control "
                              "variate update would travel unmasked beside its masked model update")
        if self.max_update_norm > 0:
            raise ConfigError("secure-aggregation cannot be used with max-update-norm: the norm of a masked "
                              "update cannot be checked (set max-update-norm = 0)")
        if self.secagg_num_shares != 0 and self.secagg_num_shares < 3:
            raise ConfigError("secagg-num-shares must be 0 (every sampled site) or >= 3")
        if self.secagg_reconstruction_threshold != 0 and self.secagg_reconstruction_threshold < 2:
            raise ConfigError("secagg-reconstruction-threshold must be 0 (a majority of the shares) or >= 2")
        if self.secagg_num_shares and self.secagg_reconstruction_threshold >= self.secagg_num_shares:
            raise ConfigError("secagg-reconstruction-threshold must be below secagg-num-shares, or no site "
                              "could drop out")
        if not 8 <= self.secagg_quantization_bits <= 28:
            raise ConfigError("secagg-quantization-bits must be in 8..28 (masks are taken modulo 2**32)")
        if self.secagg_clipping_range <= 0 or self.secagg_max_weight <= 0:
            raise ConfigError("secagg-clipping-range and secagg-max-weight must be > 0")


# The run config's sections, in the order the generated pyproject.toml and README list them.
# The shared section's keys are parsed once and handed to every section that reads them.
SECTIONS: dict[str, type[Section]] = {
    "federation": FederationConfig,
    "shared": SharedConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "privacy": PrivacyConfig,
}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    privacy: PrivacyConfig
    federation: FederationConfig

    @property
    def shared(self) -> SharedConfig:
        return self.model.shared

    def __post_init__(self) -> None:
        if not self.model.shared == self.data.shared == self.train.shared:
            raise ConfigError("the model, data and train sections must share one SharedConfig (image-size, seq-len, "
                              "biomech-features, seed): build them with the same one")
        if self.federation.best_metric.startswith("server-val") and not self.eval.server_val_path:
            raise ConfigError(f"best-metric = {self.federation.best_metric} needs a server validation set "
                              "(server-val-path)")
        if self.privacy.dp_enabled and self.model.freeze != FreezePolicy.FROZEN:
            raise ConfigError("dp-enabled needs freeze = frozen: the backbone's BatchNorm layers cannot be trained "
                              "with per-sample gradients")
        if self.privacy.dp_enabled and self.federation.aggregation == Aggregation.SCAFFOLD:
            raise ConfigError("aggregation = scaffold cannot be used with dp-enabled: a site's control variate is its "
                              "mean gradient, which DP-SGD's noise does not cover")
        if self.privacy.dp_enabled and self.train.logit_adjust > 0:
            raise ConfigError("logit-adjust cannot be used with dp-enabled: the site's training prevalence it adds to "
                              "the logits is a statistic of its private studies that DP-SGD does not cover")
        if self.privacy.dp_enabled and self.model.feature_norm == FeatureNorm.SITE and not self.eval.server_val_path:
            raise ConfigError("dp-enabled with feature-norm = site needs public feature statistics: set server-val-path "
                              "(the centre's own clinic), or feature-norm = none. Statistics fitted on a site's "
                              "training studies would sit outside the DP guarantee (docs/privacy.md)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Parse a Flower run config (kebab-case keys). Unknown keys are an error, not ignored."""
        known = {_key(f.name) for section in SECTIONS.values() for f in settings(section)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
        parts: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            kwargs: dict[str, Any] = {f.name: _coerce(_key(f.name), values[_key(f.name)], f.default)
                                      for f in settings(section) if _key(f.name) in values}
            if issubclass(section, ReadsShared):
                kwargs["shared"] = parts["shared"]
            parts[name] = section(**kwargs)
        del parts["shared"]  # RunConfig.shared is the one the sections hold
        return cls(**parts)

    def to_mapping(self) -> dict[str, Any]:
        """The flat kebab-case form with plain str/int/float/bool values, e.g. for a checkpoint, a
        run-config override or a Flower ConfigRecord."""
        flat: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            values = getattr(self, name)
            for f in settings(section):
                value = getattr(values, f.name)
                flat[_key(f.name)] = value.value if isinstance(value, Enum) else value
        return flat


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Flower hands TOML values through; accept ints for floats, reject anything else odd."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class NodeSetting:
    """A node-config key: read by the site's ClientApp from its SuperNode's ``--node-config``."""

    key: str
    default: Any  # None: required, or derived as the help says
    help: str


# The node config's documentation, rendered into the README next to the run config's.
NODE_SETTINGS: tuple[NodeSetting, ...] = (
    NodeSetting("data-path", None, "The site folder (required in a deployment; clinicfl-client start sets it). In a "
                                   "simulation the site is sub-folder partition-id of data-root instead."),
    NodeSetting("state-dir", None, "The site's private state: privacy ledger, caches, audit copies (default: "
                                   ".clinicfl-state/<site> beside data-path)."),
    NodeSetting("site-name", None, "The name the site reports (default: the data-path folder's name)."),
    NodeSetting("layout", SiteLayout.AUTO, "The site folder's layout: dicom (labels.csv + studies/), mura, mrnet, "
                                           "or auto (detected); see docs/data.md."),
    NodeSetting("dp-target-epsilon", None, "This site's DP budget: the smaller of it and the run's applies."),
    NodeSetting("dp-target-delta", None, "This site's DP delta: the smaller of it and the run's applies."),
    NodeSetting("dp-budget-scope", DpBudgetScope.RUN, "run: a privacy ledger per run; site: one ledger for every "
                                                      "run on this data."),
    NodeSetting("audit-outgoing", False, "Keep a byte-exact copy of each message the site sends in STATE_DIR/audit "
                                         "(client/audit.py)."),
    NodeSetting("drill", None, "A fault drill this site runs (client/drills.py), whatever the run config says."),
    NodeSetting("site-policy", None, "The site admin's policy file (common/policy.py; clinicfl-client start "
                                     "--policy sets it); without one, the policy's defaults."),
)


@dataclass(frozen=True)
class SiteConfig:
    """Where a site's data and private state live. Never sent to the server."""

    data_path: Path
    state_dir: Path
    site_name: str
    # A site may be stricter than the server: the smaller budget wins.
    dp_target_epsilon: float | None = None
    dp_target_delta: float | None = None
    dp_budget_scope: str = DpBudgetScope.RUN.value  # "site": one ledger for every run on this data
    layout: str = SiteLayout.AUTO.value  # dicom (labels.csv + studies/), mura, mrnet, or auto (detected)
    # The site admin's policy file (common/policy.py); None: the policy's defaults.
    policy_path: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], federation: FederationConfig) -> "SiteConfig":
        """Deployment: ``data-path`` (and optional ``state-dir``, ``site-name``) come from the
        SuperNode's node config. Simulation: the site is sub-folder ``partition-id`` of data-root."""
        policy = node_config.get("site-policy")
        if "data-path" in node_config:
            data_path = Path(str(node_config["data-path"])).expanduser()
            site_name = str(node_config.get("site-name", data_path.name))
        elif "partition-id" in node_config:
            data_path = simulated_site_path(federation.data_root, int(node_config["partition-id"]))
            site_name = data_path.name
            policy = policy or federation.site_policy  # a simulation's sites may share one policy
        else:
            raise ConfigError("node config has no data-path: start the SuperNode with "
                              "--node-config 'data-path=\"/path/to/site\"'")
        state = node_config.get("state-dir")
        state_dir = Path(str(state)).expanduser() if state else data_path.parent / ".clinicfl-state" / data_path.name
        # Plain strings: the node config goes back into Flower's and the daemon's own files.
        scope = choice(DpBudgetScope, "node config dp-budget-scope", node_config.get("dp-budget-scope", "run")).value
        layout = choice(SiteLayout, "node config layout", node_config.get("layout", "auto")).value
        return cls(data_path=data_path, state_dir=state_dir, site_name=site_name, layout=layout,
                   dp_target_epsilon=_optional_float(node_config, "dp-target-epsilon"),
                   dp_target_delta=_optional_float(node_config, "dp-target-delta"), dp_budget_scope=scope,
                   policy_path=Path(str(policy)).expanduser() if policy else None)


def _optional_float(values: Mapping[str, Any], key: str) -> float | None:
    if key not in values:
        return None
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"node config {key} must be a positive number, got {value!r}")
    return float(value)


def simulated_site_path(data_root: str, partition_id: int) -> Path:
    """The site folder of a simulated partition: the sorted sub-folders of data-root."""
    if not data_root:
        raise ConfigError("simulation needs run-config data-root: generate sites with "
                          "`clinicfl-sim generate DIR` and pass --run-config \"data-root='DIR'\"")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data-root {root} does not exist")
    sites = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if partition_id >= len(sites):
        raise ConfigError(f"partition {partition_id} has no site: data-root holds {len(sites)} site folder(s)")
    return sites[partition_id]
