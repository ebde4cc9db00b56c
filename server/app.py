"""clinicfl ServerApp: FedAvg over the sites' trainable parameters, evaluated and checkpointed
every round (round 0 = the initial model)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
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
                            fid_extractor=FidFeatureExtractor.describe(config.eval.fid_dim,
                                                                       config.eval.fid_inception_weights),
                            min_site_cases=config.eval.min_site_cases,
                            fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate)
    arrays = to_array_record(model)
    efficiency = measure_efficiency(model, config)
    central = (CentralValidation(config, Path(config.eval.server_val_path).expanduser(), build_model(config.model))
               if config.eval.server_val_path else None)
    # The hash travels with every message so a site can refuse a backbone it does not have; the
    # budget id names the privacy ledger a DP site charges (a resumed run keeps its id).
    train_config = ConfigRecord({"backbone-hash": backbone_hash, "budget-id": str(context.run_id)})
    evaluate_config = ConfigRecord({"backbone-hash": backbone_hash})
    records: list[dict] = []
    clock = {"start": time.perf_counter()}
    dp = config.privacy.dp_enabled

    def finish_round(server_round: int, round_arrays: ArrayRecord) -> None:
        checkpoint = run.save_checkpoint(server_round, round_arrays)
        report = strategy.report(server_round)
        record = round_record(report, time.perf_counter() - clock["start"], checkpoint, efficiency,
                              central.evaluate(round_arrays) if central else None,
                              dict(strategy.epsilon) if dp else None)
        run.append_metrics(record)
        records.append(record)
        print_rounds(records)
        clock["start"] = time.perf_counter()

    def evaluate_round(server_round: int, round_arrays: ArrayRecord) -> None:
        messages = strategy.configure_evaluate(server_round, round_arrays, ConfigRecord(dict(evaluate_config)), grid)
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=fed.round_timeout))

    # Round 0: the initial global model, scored by the sites, so every curve has a baseline.
    evaluate_round(0, arrays)
    finish_round(0, arrays)
    if not strategy.report(0).evaluation:
        reasons = "; ".join(f"{r['site']}: {r['reason']}" for r in strategy.report(0).rejected) or "no site replied"
        print(f"clinicfl: stopping, no site could take part in round 0 ({reasons})", flush=True)
        return

    # Our own round loop over FedAvg's configure/aggregate steps (Strategy.start cannot stop early).
    for server_round in range(1, fed.num_rounds + 1):
        log.info("[ROUND %d/%d]", server_round, fed.num_rounds)
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        new_arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages,
                                                                                      timeout=fed.round_timeout))
        arrays = new_arrays if new_arrays is not None else arrays
        evaluate_round(server_round, arrays)
        report = strategy.report(server_round)
        if report.exhausted and not report.train:
            report.stopped = "every site that replied has exhausted its privacy budget"
        finish_round(server_round, arrays)
        if report.stopped:
            print(f"clinicfl: run ended after round {server_round}: {report.stopped} "
                  f"(epsilon {', '.join(f'{k} {v:.2f}' for k, v in sorted(report.exhausted.items()))})", flush=True)
            return
    print(f"clinicfl: finished {fed.num_rounds} rounds; results in {run.path}", flush=True)
