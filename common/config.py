"""One typed configuration, parsed once from Flower's run config and a site's node config.

The run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run --run-config``) is the same at the server and every site. The node config is set
per site on its SuperNode (``--node-config 'data-path="/data/site" ...'``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

FREEZE_POLICIES = ("frozen", "layer4", "full")
FEATURE_NORMS = ("site", "none")
AGGREGATIONS = ("fedavg", "fedprox", "fedmedian", "trimmed-mean")
SITE_LAYOUTS = ("auto", "dicom", "mura", "mrnet")
TRACKERS = ("none", "mlflow", "tensorboard")
BEST_METRICS = ("loss", "auc", "server-val-loss", "server-val-auc")  # common/runlog.py SELECTION_METRICS
MRNET_PLANES = ("axial", "coronal", "sagittal")
MRNET_TASKS = ("abnormal", "acl", "meniscus")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 64
    seq_len: int = 8
    num_labels: int = 1
    label_names: str = ""  # comma-separated display names, e.g. "abnormal,acl,meniscus"
    freeze: str = "frozen"
    backbone_weights: str = "none"
    proj_dim: int = 128
    gru_hidden: int = 64
    attn_dim: int = 64
    dropout: float = 0.1
    biomech_features: int = 0
    # "site": standardise backbone features with statistics of the site's own training images
    # (kept at the site, like FedBN's local statistics); "none": use them as they are.
    feature_norm: str = "site"
    # Optional heads: severity regression (trained where labels.csv has a target) and a light
    # decoder that rebuilds each image at recon-size x recon-size from its feature.
    severity_head: bool = True
    recon_head: bool = True
    recon_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_POLICIES:
            raise ConfigError(f"freeze must be one of {FREEZE_POLICIES}, got {self.freeze!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"feature-norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        for name in ("image_size", "seq_len", "num_labels", "proj_dim", "gru_hidden", "attn_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1")
        if self.image_size < 32:
            raise ConfigError("image-size must be >= 32 (ResNet50 downsamples by 32)")
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
class DataConfig:
    image_size: int = 64
    seq_len: int = 8
    series_description: str = ""
    test_fraction: float = 0.25
    seed: int = 0
    biomech_features: int = 0  # columns of biomech/<study>.csv; 0 = no biomechanical series
    mrnet_plane: str = "sagittal"  # MRNet layout: which plane's volumes form the sequence
    mrnet_labels: str = "abnormal,acl,meniscus"  # MRNet layout: the tasks, in label order

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError("test-fraction must be in (0, 1)")
        if self.biomech_features < 0:
            raise ConfigError("biomech-features must be >= 0")
        if self.mrnet_plane not in MRNET_PLANES:
            raise ConfigError(f"mrnet-plane must be one of {MRNET_PLANES}, got {self.mrnet_plane!r}")
        tasks = [t.strip() for t in self.mrnet_labels.split(",") if t.strip()]
        if not tasks or any(t not in MRNET_TASKS for t in tasks) or len(set(tasks)) != len(tasks):
            raise ConfigError(f"mrnet-labels must be distinct names from {MRNET_TASKS}, got {self.mrnet_labels!r}")


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 8
    severity_weight: float = 0.02  # targets are on a 0-10 scale: keep the MSE term below the BCE
    recon_weight: float = 1.0
    # The learning rate of round r is lr * lr-decay^(r - 1): a per-round schedule every site
    # follows (1.0: constant).
    lr_decay: float = 1.0
    seed: int = 0

    def lr_at(self, server_round: int) -> float:
        return self.lr * self.lr_decay ** max(server_round - 1, 0)

    def __post_init__(self) -> None:
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError("lr-decay must be in (0, 1]")
        if self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("local-epochs and batch-size must be >= 1 and lr > 0")
        if self.severity_weight < 0 or self.recon_weight < 0:
            raise ConfigError("severity-weight and recon-weight must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    threshold: float = 0.5  # decision threshold for the confusion-count metrics
    min_site_cases: int = 10  # per-site figures of a site with fewer test studies are not shown
    fid_dim: int = 64  # FID feature width: the statistics grow with its square
    # PSNR, SSIM and FID use a fixed subsample of each site's test images (evenly spaced, the same
    # every round; 0 = all): the reconstructions change every round and FID runs the backbone on them.
    image_metrics_sample: int = 32
    # FID features come from the model's ResNet50 on images resized to this size (0 = image-size):
    # the reconstructions carry recon-size detail, and a smaller input costs the backbone less.
    fid_image_size: int = 32
    # FID is the one catalogue figure that runs the backbone every time (on the new reconstructions,
    # ~80 ms a site on one CPU core, more than the site's training of a round here): it is computed
    # at round 0, every fid-every rounds and the last round, and reported not available in between.
    fid_every: int = 5
    fid_inception_weights: str = ""  # a local torchvision InceptionV3 .pth; empty = the model's ResNet50
    server_val_path: str = ""  # a site-layout folder the server evaluates on centrally (optional)
    # Score-histogram bins a site sends per label: 0 = by test size (about 1 study per bin,
    # 4..2048), else a fixed power of two. Fine bins on a small test split almost disclose each
    # study's (score, label) pair; see docs/privacy.md.
    eval_bins: int = 0
    # The exported model's operating threshold reaches this sensitivity on the pooled statistics.
    target_sensitivity: float = 0.9

    def fid_round(self, server_round: int, num_rounds: int) -> bool:
        """Whether the evaluation of ``server_round`` computes FID (round 0, every fid-every, the last)."""
        return server_round % self.fid_every == 0 or server_round == num_rounds

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level differential privacy at each site (Opacus DP-SGD)."""

    dp_enabled: bool = False
    dp_target_epsilon: float = 8.0  # for the whole run, not per round
    dp_target_delta: float = 0.0  # 0: 1 / (10 * training units), capped at 1e-5
    dp_max_grad_norm: float = 1.0
    dp_noise_multiplier: float = 0.0  # 0: calibrated once so the planned run ends at the target
    dp_accountant: str = "rdp"
    dp_unit: str = "study"  # "patient": one study per patient per sampled unit (patient-level privacy)

    def __post_init__(self) -> None:
        if self.dp_target_epsilon <= 0 or self.dp_max_grad_norm <= 0 or self.dp_noise_multiplier < 0:
            raise ConfigError("dp-target-epsilon and dp-max-grad-norm must be > 0, dp-noise-multiplier >= 0")
        if not 0.0 <= self.dp_target_delta < 1.0:
            raise ConfigError("dp-target-delta must be in [0, 1)")
        if self.dp_accountant not in ("rdp", "prv"):
            raise ConfigError("dp-accountant must be rdp or prv")
        if self.dp_unit not in ("study", "patient"):
            raise ConfigError("dp-unit must be study or patient")


@dataclass(frozen=True)
class FederationConfig:
    num_rounds: int = 3
    min_sites: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_timeout: float = 600.0
    run_dir: str = "runs"
    data_root: str = ""
    audit_outgoing: bool = False  # sites keep a byte-exact copy of every reply (client/audit.py)
    aggregation: str = "fedavg"  # fedavg (weighted by studies), fedmedian, trimmed-mean
    trim_fraction: float = 0.2  # trimmed-mean: the fraction cut at each end, per coordinate
    proximal_mu: float = 0.01  # fedprox: the weight of mu/2 ||w - w_global||^2 in each site's local loss
    max_update_norm: float = 0.0  # reject a site's update whose L2 distance from the global model exceeds this (0: off)
    resume_from: str = ""  # a run directory: continue from its last finished round (clinicfl-server resume)
    control_poll: float = 2.0  # seconds between checks of the pause flag while a run is paused
    # How the centre waits for the sites' replies (server/transport.py): prompt pulls them 10 ms
    # after the push, then every tenth of the time waited (at most 0.5 s); flower keeps Flower's
    # fixed interval (3 s in a deployment, 0.1 s in a simulation).
    reply_polling: str = "prompt"
    # One message per site per round: the message that trains round r first has the site evaluate
    # the model it starts from (round r-1's), so a round costs one exchange, not two, and a
    # deployed site starts one ClientApp process per round. The last round is evaluated on its own.
    # Off (two phases, as Flower's FedAvg) with DP or secure aggregation (a round trained before an
    # early stop would spend privacy budget for nothing), and with fraction-train/-evaluate below 1.
    evaluate_with_training: bool = True
    # The centre's sites.json (clinicfl-server register-site): replies are filed under the name
    # their authenticated node id is registered with. Empty in simulation: each node keeps the
    # name it first reports.
    site_registry: str = ""
    # Parameters on the wire: float32, or float16 (half the bytes both ways; the server checks,
    # widens and aggregates in float64, and keeps float32 checkpoints).
    wire_dtype: str = "float32"
    # Lossless compression of the parameters on the wire (the top byte plane deflated; common/exchange.py).
    wire_compression: str = "zlib"
    # The best global model: the round with the best pooled test loss (default), pooled AUC, or the
    # centre's own validation loss/AUC. export takes it by default. patience > 0 ends the run after
    # that many rounds without improvement.
    best_metric: str = "loss"
    patience: int = 0
    # Experiment tracking at the centre (server/tracking.py): none, mlflow or tensorboard.
    tracking: str = "none"
    tracking_uri: str = ""  # MLflow tracking URI; empty = a SQLite store beside the run directories
    tracking_experiment: str = "clinicfl"
    # Simulation only (client/drills.py): a fault drill, and the sites that run it ("" = all).
    drill: str = ""
    drill_sites: str = ""
    # Simulation only: the site policy file every simulated site applies (common/policy.py). A
    # deployed site ignores it and reads only its own (clinicfl-client start --policy).
    site_policy: str = ""
    # Secure aggregation (SecAgg+, server/secure_aggregation.py): the centre learns only the
    # weighted sum of the sites' updates. Each update is clipped to +-secagg-clipping-range,
    # quantised to 2**secagg-quantization-bits levels and masked. Shares: 0 = every sampled site;
    # threshold: 0 = a majority of the shares, so a minority of sites may drop out mid-round.
    secure_aggregation: bool = False
    secagg_num_shares: int = 0
    secagg_reconstruction_threshold: int = 0
    secagg_clipping_range: float = 1.0
    secagg_quantization_bits: int = 24
    secagg_max_weight: float = 1000.0  # the largest num-examples one site may weigh in with

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError("num-rounds must be >= 1")
        if self.min_sites < 1:
            raise ConfigError("min-sites must be >= 1")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.proximal_mu < 0:
            raise ConfigError("proximal-mu must be >= 0")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError("trim-fraction must be in [0, 0.5)")
        if self.max_update_norm < 0 or self.control_poll <= 0:
            raise ConfigError("max-update-norm must be >= 0 and control-poll > 0")
        if self.wire_dtype not in ("float32", "float16"):
            raise ConfigError(f"wire-dtype must be float32 or float16, got {self.wire_dtype!r}")
        if self.wire_compression not in ("zlib", "none"):
            raise ConfigError(f"wire-compression must be zlib or none, got {self.wire_compression!r}")
        if self.reply_polling not in ("prompt", "flower"):
            raise ConfigError(f"reply-polling must be prompt or flower, got {self.reply_polling!r}")
        if self.best_metric not in BEST_METRICS:
            raise ConfigError(f"best-metric must be one of {BEST_METRICS}, got {self.best_metric!r}")
        if self.patience < 0:
            raise ConfigError("patience must be >= 0 (0: no early stopping)")
        if self.tracking not in TRACKERS:
            raise ConfigError(f"tracking must be one of {TRACKERS}, got {self.tracking!r}")
        if self.secure_aggregation:
            self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        """Refuse what cannot work on masked updates, with a one-line reason each."""
        if self.aggregation in ("fedmedian", "trimmed-mean"):
            raise ConfigError(f"secure-aggregation cannot be used with aggregation = {self.aggregation}: "
                              "the centre sees only the sum of the updates, and a median or a trimmed mean "
                              "needs each one")
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


# Which run-config key feeds which field. Keys shared by several sections (image-size, seed)
# are listed under each of them, so the sections can never disagree.
_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "privacy": PrivacyConfig,
    "federation": FederationConfig,
}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    privacy: PrivacyConfig
    federation: FederationConfig

    def __post_init__(self) -> None:
        if self.federation.best_metric.startswith("server-val") and not self.eval.server_val_path:
            raise ConfigError(f"best-metric = {self.federation.best_metric} needs a server validation set "
                              "(server-val-path)")
        if self.privacy.dp_enabled and self.model.freeze != "frozen":
            raise ConfigError("dp-enabled needs freeze = frozen: the backbone's BatchNorm layers cannot be trained "
                              "with per-sample gradients")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Parse a Flower run config (kebab-case keys). Unknown keys are an error, not ignored."""
        known = {_key(f.name) for section in _SECTIONS.values() for f in fields(section)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
        parts: dict[str, Any] = {}
        for name, section in _SECTIONS.items():
            kwargs = {}
            for f in fields(section):
                if _key(f.name) in values:
                    kwargs[f.name] = _coerce(_key(f.name), values[_key(f.name)], f.default)
            parts[name] = section(**kwargs)
        return cls(**parts)

    def to_mapping(self) -> dict[str, Any]:
        """The flat kebab-case form, e.g. for a checkpoint or a run-config override."""
        flat: dict[str, Any] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            for f in fields(section):
                flat[_key(f.name)] = getattr(section, f.name)
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
class SiteConfig:
    """Where a site's data and private state live. Never sent to the server."""

    data_path: Path
    state_dir: Path
    site_name: str
    # A site may be stricter than the server: the smaller budget wins.
    dp_target_epsilon: float | None = None
    dp_target_delta: float | None = None
    dp_budget_scope: str = "run"  # "site": one ledger for every run on this data
    layout: str = "auto"  # dicom (labels.csv + studies/), mura, mrnet, or auto (detected)
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
        scope = str(node_config.get("dp-budget-scope", "run"))
        if scope not in ("run", "site"):
            raise ConfigError("node config dp-budget-scope must be run or site")
        layout = str(node_config.get("layout", "auto"))
        if layout not in SITE_LAYOUTS:
            raise ConfigError(f"node config layout must be one of {SITE_LAYOUTS}, got {layout!r}")
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
