"""clinicfl ServerApp: FedAvg over the sites' trainable parameters, evaluated and checkpointed
every round (round 0 = the initial model); the round loop is ``server/federation.py``.

With run config ``resume-from`` it continues another run's directory from its last finished
round, with the same round numbering, metric history and privacy budget id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from threadpoolctl import threadpool_limits

from common.config import RunConfig
from common.exchange import to_array_record, trainable_spec
from common.model import build_model, frozen_backbone_hash
from common.rundir import RunDirectory
from server.evaluation import CentralValidation, central_cache_dir, measure_efficiency
from server.federation import FederatedRun
from server.identities import SiteIdentities
from server.strategy import make_strategy
from server.strategy_config import StrategyConfig
from server.transport import PromptGrid, prompt_simulation_dispatch
from server.tracking import GuardedTracker, open_tracker

log = logging.getLogger(__name__)
app = ServerApp()
# In a Flower simulation, this import runs before the runtime starts dispatching messages to the
# sites: the only point at which its dispatcher can be made to wake on a push (server/transport.py;
# the patch, and the Flower versions it fits, in common/flower_patches.py).
prompt_simulation_dispatch()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    fed = config.federation
    # A run that names a site registry admits only its sites; a missing file stops the run here.
    identities = SiteIdentities.from_registry(Path(fed.site_registry).expanduser() if fed.site_registry else None)
    model = build_model(config.model)
    backbone_hash = frozen_backbone_hash(model)
    arrays = to_array_record(model)
    records: list[dict] = []
    first_round, budget_id, previous, optimizer_state = 1, str(context.run_id), None, None
    if fed.resume_from:
        previous = Path(fed.resume_from).expanduser()
        last, arrays, budget_id, optimizer_state = _resume_point(previous, backbone_hash)
        first_round = last + 1
    run = RunDirectory.create_under(Path(fed.run_dir), context.run_id, config.to_mapping(), backbone_hash, budget_id,
                                    str(previous) if previous else None, app_hash=grid.run.fab_hash)
    print(f"clinicfl: run directory {run.path}", flush=True)
    if previous is not None:
        records = run.adopt(RunDirectory(previous), first_round - 1)
        print(f"clinicfl: resuming {previous.name} after round {first_round - 1} (budget id {budget_id})", flush=True)

    strategy = make_strategy(StrategyConfig.from_run_config(config, trainable_spec(model), backbone_hash), identities)
    central = (CentralValidation(config, Path(config.eval.server_val_path).expanduser(), build_model(config.model),
                                 central_cache_dir(Path(fed.run_dir)))
               if config.eval.server_val_path else None)
    tracker = GuardedTracker(open_tracker(fed.tracking, run.path, config.to_mapping(), fed.tracking_uri,
                                          fed.tracking_experiment))
    # Replies are collected as they arrive, not at Flower's fixed interval (server/transport.py).
    grid = PromptGrid(grid) if fed.reply_polling == "prompt" else grid
    federation = FederatedRun(config, grid, run, strategy, measure_efficiency(model, config), central, tracker,
                              backbone_hash, budget_id, records)
    federation.restore_server_state(optimizer_state)
    state = "failed"
    try:
        # One thread for numpy's BLAS while the rounds run. OpenBLAS keeps its idle threads spinning
        # for a while after each call (the FedAvg weighted sum is one, every round), and the centre's
        # arrays are too small to gain from more: in a simulation that spin took CPU from the sites'
        # workers (docs/design.md, "Rounds that cost their work").
        with threadpool_limits(1, user_api="blas"):
            state = federation.execute(arrays, first_round)
    finally:
        if fed.tracking != "none" and run.has_metrics():
            tracker.log_artifacts(_report_pngs(run.path))
        tracker.finish(state)


def _report_pngs(run_dir: Path) -> list[Path]:
    """The report's plots, for the tracker; a plot that cannot be drawn is left out with its reason."""
    from server.report import write_report  # matplotlib only when plotting

    written = []
    for name, outcome in write_report(run_dir):
        if outcome.endswith(".png"):
            written.append(Path(outcome))
        else:
            log.info("report %s: %s", name, outcome)
    return written


def _resume_point(previous: Path, backbone_hash: str) -> tuple[int, ArrayRecord, str, dict | None]:
    """The last finished round of ``previous``, its global model, the budget id to keep and the
    server optimiser's state."""
    try:
        run = RunDirectory.open(previous)
    except ValueError as error:
        raise RuntimeError(f"resume-from {error}") from None
    if run.meta().get("backbone-hash") != backbone_hash:
        raise RuntimeError("resume-from: that run used another backbone (hash differs); resume with its config")
    last = run.last_finished_round()
    if last is None:
        raise RuntimeError(f"resume-from {previous}: no finished round to continue from")
    arrays, payload = run.load_checkpoint_arrays(last)
    # A chain of resumes keeps the first run's budget id: the sites' privacy ledgers continue.
    return last, arrays, run.budget_id(), payload.get("server-optimizer")
