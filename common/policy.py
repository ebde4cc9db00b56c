"""A site's own policy: the privacy floor and resource caps that the centre's run config cannot lower.

The run config is the centre's; the policy is the site admin's (a TOML file, ``clinicfl-client
start --policy FILE``). Every message is checked against it before the site reads any data: a run
config that asks for less privacy or more resources than the policy allows is refused with the
code ``policy-refused`` and the offending key's name, never a value of the site. No training, no
evaluation statistics, nothing charged to the privacy ledger.

Some settings are not refusals but limits the site applies however the centre asks:
``min-studies-per-bin`` coarsens the score histograms, and ``max-delta`` caps the delta that
``dp-target-delta = 0`` (automatic) would choose.

Without a file, ``SitePolicy()``'s defaults apply (docs/privacy.md, "The site policy").
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from common.config import ConfigError, DpUnit, RunConfig, SiteConfig

POLICY_REFUSED = "policy-refused"
POLICY_ERROR = "policy-error"
DP_UNITS = tuple(DpUnit)  # in order of increasing protection (a patient holds one or more studies)


class PolicyError(ConfigError):
    """The site's policy file is missing, unreadable or invalid: the site takes part in nothing."""

    code = POLICY_ERROR


class PolicyRefused(Exception):
    """The message asks for less privacy or more resources than the site's policy allows."""

    code = POLICY_REFUSED

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key  # a run-config or policy key name: the only detail the centre gets


@dataclass(frozen=True)
class SitePolicy:
    # Privacy
    require_dp: bool = False  # refuse any run without DP-SGD at this site
    max_epsilon: float = 10.0  # the largest dp-target-epsilon (whole run) the site accepts
    max_delta: float = 1e-5  # the largest dp-target-delta; also caps the automatic delta
    dp_unit: str = "study"  # the weakest privacy unit accepted: study, or patient (all of a patient's studies)
    require_secure_aggregation: bool = False  # every update goes through SecAgg+ or is not sent
    min_training_studies: int = 10  # a site with fewer does not take part
    # What the evaluation statistics disclose
    max_eval_bins: int = 2048  # the finest score histogram a run config may ask for
    # k: at most one histogram bin per k test studies, however the centre asks (0: as the centre asks,
    # for a site that wants exact figures, e.g. a simulation whose sites the centre owns)
    min_studies_per_bin: int = 1
    # The smallest count of studies the site lets the centre publish (model cards print 1..k-1 as "<k"),
    # and the fewest studies a subgroup figure is computed over (smaller subgroups are never sent).
    min_reported_count: int = 10
    min_image_metrics_sample: int = 16  # PSNR/SSIM/FID over at least this many test images (0 in the config = all)
    max_fid_dim: int = 64  # FID feature width: the moments grow with its square
    # Resources
    max_image_size: int = 512  # image-size and fid-image-size
    max_seq_len: int = 64
    max_batch_size: int = 256
    max_local_epochs: int = 20
    max_trainable_parameters: int = 30_000_000  # every trainable parameter of the model the config builds

    def __post_init__(self) -> None:
        if self.dp_unit not in DP_UNITS:
            raise PolicyError(f"site policy dp-unit must be one of {DP_UNITS}, got {self.dp_unit!r}")
        if not self.max_epsilon > 0 or not 0 < self.max_delta < 1:
            raise PolicyError("site policy max-epsilon must be > 0 and max-delta in (0, 1)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise PolicyError(f"site policy {_key(f.name)} must be an integer >= 0, got {value!r}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "site policy") -> "SitePolicy":
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PolicyError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        kwargs = {}
        for key, value in values.items():
            f = known[key]
            if f.type == "bool" and not isinstance(value, bool):
                raise PolicyError(f"{source}: {key} must be true or false, got {value!r}")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise PolicyError(f"{source}: {key} must be a number, got {value!r}")
                value = float(value)
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: Path | None) -> "SitePolicy":
        """The policy in ``path``; the defaults when ``path`` is None. A named file that cannot be
        read is an error (the site refuses everything), never a silent fall-back to the defaults."""
        if path is None:
            return cls()
        try:
            with path.open("rb") as handle:
                values = tomllib.load(handle)
        except FileNotFoundError:
            raise PolicyError(f"site policy {path} not found: fix the path given to --policy") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"site policy {path} cannot be read: {exc}") from None
        return cls.from_mapping(values, f"site policy {path}")

    @classmethod
    def of_site(cls, site: SiteConfig) -> "SitePolicy":
        """The policy in force at ``site``: its file (or the defaults), and DP required where the
        site set a privacy budget of its own in its node config (``dp-target-epsilon``): a site that
        states its budget does not train without DP because the centre turned DP off."""
        policy = cls.load(site.policy_path)
        if site.dp_target_epsilon is not None and not policy.require_dp:
            policy = replace(policy, require_dp=True)
        return policy

    def to_mapping(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ checks
    def check_run_config(self, config: RunConfig, trainable_parameters: int) -> None:
        """Raise PolicyRefused (with the run-config key) when the run config asks for less privacy
        or more resources than this policy allows. Reads no data."""
        privacy, model, train, evaluation = config.privacy, config.model, config.train, config.eval
        if self.require_dp and not privacy.dp_enabled:
            raise PolicyRefused("dp-enabled", "this site takes part only with differential privacy")
        if privacy.dp_enabled:
            if privacy.dp_target_epsilon > self.max_epsilon:
                raise PolicyRefused("dp-target-epsilon", f"above the site's max-epsilon {self.max_epsilon:g}")
            if privacy.dp_target_delta > self.max_delta:
                raise PolicyRefused("dp-target-delta", f"above the site's max-delta {self.max_delta:g}")
            if DP_UNITS.index(privacy.dp_unit) < DP_UNITS.index(self.dp_unit):
                raise PolicyRefused("dp-unit", f"the site protects each {self.dp_unit} as a unit")
            # A DP step samples a share of the site's units; what memory holds at once is one chunk.
            if privacy.dp_max_physical_batch > self.max_batch_size:
                raise PolicyRefused("dp-max-physical-batch", f"above the site's max-batch-size {self.max_batch_size}")
        if self.require_secure_aggregation and not config.federation.secure_aggregation:
            raise PolicyRefused("secure-aggregation", "this site sends updates through secure aggregation only")
        if evaluation.eval_bins > self.max_eval_bins:
            raise PolicyRefused("eval-bins", f"above the site's max-eval-bins {self.max_eval_bins}")
        if evaluation.image_metrics_sample and evaluation.image_metrics_sample < self.min_image_metrics_sample:
            raise PolicyRefused("image-metrics-sample",
                                f"below the site's min-image-metrics-sample {self.min_image_metrics_sample}")
        if model.recon_head and evaluation.fid_dim > self.max_fid_dim:
            raise PolicyRefused("fid-dim", f"above the site's max-fid-dim {self.max_fid_dim}")
        for key, value in (("image-size", model.image_size), ("fid-image-size", evaluation.fid_image_size)):
            if value > self.max_image_size:
                raise PolicyRefused(key, f"above the site's max-image-size {self.max_image_size}")
        if model.seq_len > self.max_seq_len:
            raise PolicyRefused("seq-len", f"above the site's max-seq-len {self.max_seq_len}")
        if train.batch_size > self.max_batch_size:
            raise PolicyRefused("batch-size", f"above the site's max-batch-size {self.max_batch_size}")
        if train.local_epochs > self.max_local_epochs:
            raise PolicyRefused("local-epochs", f"above the site's max-local-epochs {self.max_local_epochs}")
        if trainable_parameters > self.max_trainable_parameters:
            # proj-dim, gru-hidden, attn-dim, freeze, ... together: the model's size is the resource.
            raise PolicyRefused("max-trainable-parameters",
                                f"the model has {trainable_parameters} trainable parameters, above the site's "
                                f"max-trainable-parameters {self.max_trainable_parameters}")

    def check_secure_message(self, secure: bool) -> None:
        """A train message must go through secure aggregation where the policy requires it (the run
        config may say so while the message does not)."""
        if self.require_secure_aggregation and not secure:
            raise PolicyRefused("secure-aggregation", "the train message does not use secure aggregation")

    def check_training_size(self, training_studies: int) -> None:
        if training_studies < self.min_training_studies:
            raise PolicyRefused("min-training-studies", f"the site has {training_studies} training studies")


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")

