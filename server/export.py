"""Export a round's global model as one self-contained file for inference anywhere.

The file holds the full state dict (backbone included, so no weights file is needed where it is
loaded), the run config, the backbone hash it was trained against, the round and label names,
and per label a calibration and operating threshold fitted on the round's pooled validation
statistics, with the calibration error they leave on validation and on test.
Load it with ``common.model.load_exported``. With ``feature-norm = site`` the standardisation
statistics are local to each site: fit them on the local images first
(``common.inference.fit_feature_norm``), as every site and the server's validation do.
"""

from __future__ import annotations

from pathlib import Path

from common.config import RunConfig
from common.metrics.calibration import Calibration, Histograms, expected_calibration_error, fit_platt, \
    operating_point
from common.files import atomic_torch_save
from common.exchange import load_array_record
from common.model import EXPORT_FORMAT, build_model, check_backbone_hash, frozen_backbone_hash
from common.rundir import RunDirectory
from server.model_card import IntendedUse, build_model_card, card_summary, write_model_card
from server.runs import best_round, chosen_round


def calibrations(payload: dict, config: RunConfig) -> dict[str, dict]:
    """Per label: Platt scaling and the operating threshold for the target sensitivity, fitted on
    the exported round's pooled validation statistics only; the ECE before and after calibration on
    them (``ece-before``, ``ece-after``) and on the pooled test statistics (``test-ece-before``,
    ``test-ece-after``: the calibration's effect on studies it was not fitted on). The test
    statistics fit nothing."""
    validation = _histograms(payload, "pooled-validation-histograms")
    test = _histograms(payload, "pooled-histograms")
    out = {}
    for label, name in enumerate(config.model.names()):
        test_before = expected_calibration_error(test, label) if test else None
        if not validation:
            out[name] = {"calibration": Calibration(method="identity", note="not fitted: the checkpoint holds no "
                                                                            "pooled validation statistics").to_json(),
                         "fitted-on": None, "operating-point": None, "ece-before": None, "ece-after": None,
                         "test-ece-before": test_before, "test-ece-after": None}
            continue
        calibration = fit_platt(validation, label)
        point = operating_point(validation, config.eval.target_sensitivity, label, calibration)
        studies = sum(int(pos[label].sum() + neg[label].sum()) for pos, neg in validation.values())
        out[name] = {"calibration": calibration.to_json(),
                     "fitted-on": f"the sites' pooled validation statistics of round {payload['round']} "
                                  f"({studies} studies)",
                     "operating-point": point.to_json() if point is not None else None,
                     "ece-before": expected_calibration_error(validation, label),
                     "ece-after": expected_calibration_error(validation, label, calibration),
                     "test-ece-before": test_before,
                     "test-ece-after": expected_calibration_error(test, label, calibration) if test else None}
    return out


def _histograms(payload: dict, key: str) -> Histograms:
    """A checkpoint's pooled histograms (resolution -> positives, negatives per label) as numpy."""
    return {int(bins): (pos.numpy(), neg.numpy()) for bins, (pos, neg) in (payload.get(key) or {}).items()}


def export_model(run: RunDirectory, server_round: int | None = None, out: Path | None = None,
                 use: IntendedUse | None = None) -> Path:
    """Export ``server_round``, or by default the run's best round (``best-metric``), to ``out`` or
    the run directory's export folder, with its model card beside it (``server/model_card.py``;
    ``use``: the centre's statement of intended use, a placeholder without one)."""
    server_round = chosen_round(run, server_round)
    arrays, payload = run.load_checkpoint_arrays(server_round)
    config = RunConfig.from_mapping(payload["config"])
    model = build_model(config.model)  # the backbone weights the run config names, loaded here
    check_backbone_hash(payload["backbone-hash"], frozen_backbone_hash(model))
    load_array_record(model, arrays)
    out = out or run.export_path(server_round)
    out.parent.mkdir(parents=True, exist_ok=True)
    export = {"format": EXPORT_FORMAT, "state_dict": model.state_dict(), "config": payload["config"],
              "backbone-hash": payload["backbone-hash"], "round": server_round,
              "label-names": config.model.names(), "run": run.name, "best-round": best_round(run),
              "last-round": run.finished_rounds()[-1], "calibration": calibrations(payload, config)}
    card = build_model_card(run, server_round, export, use or IntendedUse(),
                            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                            total=sum(p.numel() for p in model.parameters()))
    export["model-card"] = card_summary(card)  # what predict's index.html shows at the site
    atomic_torch_save(export, out)
    write_model_card(card, out)
    return out
