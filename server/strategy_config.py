"""What the centre's strategy is told about the run and the model, typed and built in one place."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import AGGREGATIONS, RunConfig
from common.exchange import ParamSpec
from common.metrics.features import FidFeatureExtractor


@dataclass(frozen=True)
class StrategyConfig:
    """The settings of ``ClinicFedAvg`` (server/strategy.py). Only the model's four fields are
    required; the defaults are those of a plain FedAvg over float32 parameters."""

    spec: dict[str, ParamSpec]  # the trainable parameters an update must have, by name
    backbone_hash: str  # a reply from a site with another frozen backbone is rejected
    label_names: list[str]
    min_sites: int  # valid replies a round needs to aggregate; also Flower's node minimums
    aggregation: str = "fedavg"  # one of common.config.AGGREGATIONS
    proximal_mu: float = 0.0  # fedprox only
    trim_fraction: float = 0.2  # trimmed-mean only
    max_update_norm: float = 0.0  # 0: no bound on an update's distance from the round's model
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    wire_dtype: str = "float32"
    wire_compression: str = "none"
    fid_dim: int | None = None  # None: the reconstruction head is off (no image statistics)
    fid_extractor: str = ""  # the FID features' description, as reports show it
    min_site_cases: int = 10  # a site with fewer test studies has no figures of its own
    # image-metrics-sample and seq-len: the image counts a site's test split can claim for
    # PSNR/SSIM/FID (None: not checked)
    image_sample: int = 0
    images_per_study: int | None = None

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    @classmethod
    def from_run_config(cls, config: RunConfig, spec: dict[str, ParamSpec], backbone_hash: str) -> StrategyConfig:
        """The strategy's settings for a run of ``config`` over a model with these trainable
        parameters and frozen backbone."""
        fed, evaluation, model = config.federation, config.eval, config.model
        return cls(spec=spec, backbone_hash=backbone_hash, label_names=model.names(), min_sites=fed.min_sites,
                   aggregation=fed.aggregation, proximal_mu=fed.proximal_mu, trim_fraction=fed.trim_fraction,
                   max_update_norm=fed.max_update_norm, fraction_train=fed.fraction_train,
                   fraction_evaluate=fed.fraction_evaluate, wire_dtype=fed.wire_dtype,
                   wire_compression=fed.wire_compression,
                   fid_dim=evaluation.fid_dim if model.recon_head else None,
                   fid_extractor=FidFeatureExtractor.describe(evaluation.fid_dim, evaluation.fid_inception_weights,
                                                              evaluation.fid_image_size or model.image_size),
                   min_site_cases=evaluation.min_site_cases, image_sample=evaluation.image_metrics_sample,
                   images_per_study=model.seq_len)
