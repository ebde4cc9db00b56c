"""Export a round's global model as one self-contained file for inference anywhere.

The file holds the full state dict (backbone included, so no weights file is needed where it is
loaded), the run config, the backbone hash it was trained against, the round and label names.
Load it with ``common.model.load_exported``. With ``feature-norm = site`` the standardisation
statistics are local to each site: fit them on the local images first
(``common.inference.fit_feature_norm``), as every site and the server's validation do.
"""

from __future__ import annotations

from pathlib import Path

from common.config import RunConfig
from common.metrics.calibration import Calibration, expected_calibration_error, fit_platt, operating_point
from common.files import atomic_torch_save
from common.exchange import load_array_record
from common.model import EXPORT_FORMAT, build_model, check_backbone_hash, frozen_backbone_hash
from common.rundir import RunDirectory
from server.runs import best_round, chosen_round


def calibrations(payload: dict, config: RunConfig) -> dict[str, dict]:
    """Per label: Platt scaling fitted on the exported round's pooled evaluation statistics, the
    operating threshold for the target sensitivity, and the ECE before and after."""
    histograms = {int(bins): (pos.numpy(), neg.numpy()) for bins, (pos, neg) in
                  (payload.get("pooled-histograms") or {}).items()}
    out = {}
    for label, name in enumerate(config.model.names()):
        if not histograms:
            out[name] = {"calibration": Calibration(method="identity", note="not fitted: the checkpoint holds no "
                                                                            "pooled evaluation statistics").to_json(),
                         "operating-point": None, "ece-before": None, "ece-after": None}
            continue
        calibration = fit_platt(histograms, label)
        point = operating_point(histograms, config.eval.target_sensitivity, label, calibration)
        out[name] = {"calibration": calibration.to_json(),
                     "operating-point": point.to_json() if point is not None else None,
                     "ece-before": expected_calibration_error(histograms, label),
                     "ece-after": expected_calibration_error(histograms, label, calibration)}
    return out


def export_model(run: RunDirectory, server_round: int | None = None, out: Path | None = None) -> Path:
    """Export ``server_round``, or by default the run's best round (``best-metric``), to ``out`` or
    the run directory's export folder."""
    server_round = chosen_round(run, server_round)
    arrays, payload = run.load_checkpoint_arrays(server_round)
    config = RunConfig.from_mapping(payload["config"])
    model = build_model(config.model)  # the backbone weights the run config names, loaded here
    check_backbone_hash(payload["backbone-hash"], frozen_backbone_hash(model))
    load_array_record(model, arrays)
    out = out or run.export_path(server_round)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"format": EXPORT_FORMAT, "state_dict": model.state_dict(), "config": payload["config"],
                       "backbone-hash": payload["backbone-hash"], "round": server_round,
                       "label-names": config.model.names(), "run": run.name, "best-round": best_round(run),
                       "last-round": run.finished_rounds()[-1],
                       "calibration": calibrations(payload, config)}, out)
    return out
