"""Everything a site prepares once per process: config, data, model, encoded inputs.

Flower calls the ClientApp handlers once per message; in a simulation the same process serves
every round of a site, so the prepared session is kept (a few MB of features, one model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch

from common.inference import SiteInputs, fit_feature_norm, pick_device
from common.config import RunConfig, SiteConfig
from common.data.site import SiteData
from common.metrics.features import FidFeatureExtractor
from client.site_stats import save_stats
from common.model import InjuryNet, build_model, frozen_backbone_hash
from common.site_encoding import load_encoded_site

log = logging.getLogger(__name__)


@dataclass
class SiteSession:
    config: RunConfig
    site: SiteConfig
    data: SiteData
    model: InjuryNet
    inputs: SiteInputs
    device: torch.device
    backbone_hash: str
    fid: FidFeatureExtractor

    def refresh_feature_norm(self) -> None:
        """Frozen backbone: the statistics were fitted once. Otherwise the backbone moved, refit."""
        if self.config.model.freeze != "frozen":
            fit_feature_norm(self.model, self.inputs, self.data.train_index, self.device)
            self.keep_stats()

    def keep_stats(self) -> None:
        """Keep the standardisation statistics in the state folder, for ``predict`` at this site."""
        if self.config.model.feature_norm != "site":
            return
        try:
            save_stats(self.model, self.site.state_dir, self.backbone_hash, self.config.data, len(self.data.train_index))
        except OSError as exc:
            log.warning("cannot keep the standardisation statistics in %s (%s)", self.site.state_dir,
                        exc.strerror or type(exc).__name__)


# One session per site this process serves: a simulation worker or a study serves many sites in turn.
@lru_cache(maxsize=64)
def open_session(config: RunConfig, site: SiteConfig) -> SiteSession:
    model = build_model(config.model)
    device = pick_device()
    data, inputs = load_encoded_site(model, site.data_path, config.data, config.model.num_labels, device,
                                     site.state_dir / "cache", layout=site.layout)
    if data.skipped:
        log.warning("site %s: %d stud(ies) skipped", site.site_name, len(data.skipped))
    fit_feature_norm(model, inputs, data.train_index, device)
    fid = FidFeatureExtractor(model, config.eval.fid_dim, config.eval.fid_inception_weights,
                              config.eval.fid_image_size, site.state_dir / "cache")
    session = SiteSession(config, site, data, model, inputs, device, frozen_backbone_hash(model), fid)
    session.keep_stats()
    return session
