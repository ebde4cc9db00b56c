"""clinicfl ServerApp: FedAvg over the sites' trainable parameters, evaluated and checkpointed
every round (round 0 = the initial model)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.exchange import to_array_record, trainable_spec
from common.model import build_model, frozen_backbone_hash
from common.metrics.features import FidFeatureExtractor
from server.evaluation import CentralValidation, measure_efficiency
from server.runs import RunDirectory, print_rounds, round_record
from server.strategy import ClinicFedAvg

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    fed = config.federation
    model = build_model(config.model)
    backbone_hash = frozen_backbone_hash(model)
    run = RunDirectory.create(Path(fed.run_dir), context.run_id, config.to_mapping(), backbone_hash)
    print(f"clinicfl: run directory {run.path}", flush=True)

    strategy = ClinicFedAvg(spec=trainable_spec(model), backbone_hash=backbone_hash,
                            label_names=config.model.names(), min_sites=fed.min_sites,
                            fid_dim=config.eval.fid_dim if config.model.recon_head else None,
                            fid_extractor=FidFeatureExtractor(model, config.eval.fid_dim,
                                                              config.eval.fid_inception_weights).name,
                            min_site_cases=config.eval.min_site_cases,
                            fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate)
    arrays = to_array_record(model)
    efficiency = measure_efficiency(model, config)
    central = (CentralValidation(config, Path(config.eval.server_val_path).expanduser(), build_model(config.model))
               if config.eval.server_val_path else None)
    # The hash travels with every message so a site can refuse a backbone it does not have.
    train_config = ConfigRecord({"backbone-hash": backbone_hash})
    evaluate_config = ConfigRecord({"backbone-hash": backbone_hash})
    records: list[dict] = []
    clock = {"start": time.perf_counter()}

    def finish_round(server_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
        checkpoint = run.save_checkpoint(server_round, round_arrays)
        report = strategy.report(server_round)
        record = round_record(report, time.perf_counter() - clock["start"], checkpoint, efficiency,
                              central.evaluate(round_arrays) if central else None)
        run.append_metrics(record)
        records.append(record)
        print_rounds(records)
        clock["start"] = time.perf_counter()
        return None

    # Round 0: the initial global model, scored by the sites, so every curve has a baseline.
    replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(dict(evaluate_config)), grid),
                                    timeout=fed.round_timeout)
    strategy.aggregate_evaluate(0, replies)
    finish_round(0, arrays)
    if not strategy.report(0).evaluation:
        reasons = "; ".join(f"{r['site']}: {r['reason']}" for r in strategy.report(0).rejected) or "no site replied"
        print(f"clinicfl: stopping, no site could take part in round 0 ({reasons})", flush=True)
        return

    # evaluate_fn runs after each round's federated evaluation: our hook to checkpoint and log.
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=fed.num_rounds, timeout=fed.round_timeout,
                   train_config=train_config, evaluate_config=evaluate_config,
                   evaluate_fn=lambda rnd, arr: finish_round(rnd, arr) if rnd > 0 else None)
    print(f"clinicfl: finished {fed.num_rounds} rounds; results in {run.path}", flush=True)
