"""clinicfl ServerApp: FedAvg over the sites' trainable parameters, evaluated and checkpointed
every round (round 0 = the initial model).

Between rounds it honours the centre's control flag (pause / continue / stop). With run config
``resume-from`` it continues another run's directory from its last finished round, with the same
round numbering, metric history and privacy budget id.
"""

from __future__ import annotations

import json
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
from common.runlog import round_line
from server.runs import RunDirectory, last_finished_round, load_checkpoint_arrays, round_record
from server.identities import SiteIdentities
from server.strategy import ClinicFedAvg

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    fed = config.federation
    model = build_model(config.model)
    backbone_hash = frozen_backbone_hash(model)
    arrays = to_array_record(model)
    records: list[dict] = []
    first_round, budget_id, previous = 1, str(context.run_id), None
    if fed.resume_from:
        previous = Path(fed.resume_from).expanduser()
        last, arrays, budget_id = _resume_point(previous, backbone_hash)
        first_round = last + 1
    run = RunDirectory.create(Path(fed.run_dir), context.run_id, config.to_mapping(), backbone_hash, budget_id,
                              str(previous) if previous else None)
    print(f"clinicfl: run directory {run.path}", flush=True)
    if previous is not None:
        records = run.adopt(previous, first_round - 1)
        print(f"clinicfl: resuming {previous.name} after round {first_round - 1} (budget id {budget_id})", flush=True)

    strategy = ClinicFedAvg(spec=trainable_spec(model), backbone_hash=backbone_hash,
                            label_names=config.model.names(), min_sites=fed.min_sites,
                            fid_dim=config.eval.fid_dim if config.model.recon_head else None,
                            fid_extractor=FidFeatureExtractor.describe(config.eval.fid_dim,
                                                                       config.eval.fid_inception_weights),
                            min_site_cases=config.eval.min_site_cases,
                            fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                            aggregation=fed.aggregation, trim_fraction=fed.trim_fraction,
                            max_update_norm=fed.max_update_norm,
                            identities=SiteIdentities.from_registry(
                                Path(fed.site_registry).expanduser() if fed.site_registry else None))
    efficiency = measure_efficiency(model, config)
    central = (CentralValidation(config, Path(config.eval.server_val_path).expanduser(), build_model(config.model))
               if config.eval.server_val_path else None)
    # The hash travels with every message so a site can refuse a backbone it does not have; the
    # budget id names the privacy ledger a DP site charges (a resumed run keeps its id).
    train_config = ConfigRecord({"backbone-hash": backbone_hash, "budget-id": budget_id})
    evaluate_config = ConfigRecord({"backbone-hash": backbone_hash})
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
        run.set_state("running", server_round)
        print(f"clinicfl: {round_line(record, fed.num_rounds)}", flush=True)
        for rejected in record.get("rejected") or []:
            print(f"clinicfl: round {server_round}: {rejected['phase']} reply from {rejected['site']} rejected: "
                  f"{rejected['reason']}", flush=True)
        clock["start"] = time.perf_counter()

    def may_continue(server_round: int) -> bool:
        """Between rounds: wait while the centre has paused the run; False when it asked to stop."""
        if run.control() == "paused":
            run.set_state("paused", server_round, "clinicfl-server continue RUN resumes it")
            print(f"clinicfl: paused after round {server_round}; waiting for continue or stop", flush=True)
            while run.control() == "paused":
                time.sleep(fed.control_poll)
            print(f"clinicfl: {run.control()} requested after round {server_round}", flush=True)
        if run.control() == "stop":
            run.set_state("stopped", server_round, "stopped by the coordinating centre")
            print(f"clinicfl: stopped by the coordinating centre after round {server_round}", flush=True)
            return False
        return True

    def evaluate_round(server_round: int, round_arrays: ArrayRecord) -> None:
        messages = strategy.configure_evaluate(server_round, round_arrays, ConfigRecord(dict(evaluate_config)), grid)
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=fed.round_timeout))

    if previous is None:
        # Round 0: the initial global model, scored by the sites, so every curve has a baseline.
        evaluate_round(0, arrays)
        finish_round(0, arrays)
        if not strategy.report(0).evaluation:
            reasons = "; ".join(f"{r['site']}: {r['reason']}" for r in strategy.report(0).rejected) or "no site replied"
            print(f"clinicfl: stopping, no site could take part in round 0 ({reasons})", flush=True)
            run.set_state("stopped", 0, f"no site could take part in round 0 ({reasons})")
            return

    # Our own round loop over FedAvg's configure/aggregate steps (Strategy.start cannot stop early).
    for server_round in range(first_round, fed.num_rounds + 1):
        if not may_continue(server_round - 1):
            return
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
            run.set_state("stopped", server_round, report.stopped)
            return
    run.set_state("finished", fed.num_rounds)
    print(f"clinicfl: finished {fed.num_rounds} rounds; results in {run.path}", flush=True)


def _resume_point(previous: Path, backbone_hash: str) -> tuple[int, ArrayRecord, str]:
    """The last finished round of ``previous``, its global model and the budget id to keep."""
    meta_path = previous / "config.json"
    if not meta_path.is_file():
        raise RuntimeError(f"resume-from {previous} is not a clinicfl run directory (no config.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("backbone-hash") != backbone_hash:
        raise RuntimeError("resume-from: that run used another backbone (hash differs); resume with its config")
    last = last_finished_round(previous)
    if last is None:
        raise RuntimeError(f"resume-from {previous}: no finished round to continue from")
    arrays, _ = load_checkpoint_arrays(previous, last)
    # A chain of resumes keeps the first run's budget id: the sites' privacy ledgers continue.
    return last, arrays, str(meta.get("budget-id") or previous.name.rsplit("-run", 1)[-1])
