"""One federated run at the centre: round 0 (the initial model, scored by the sites), then train,
aggregate, evaluate and checkpoint every round, until the last round, an early stop or the
centre's stop.

By default (``evaluate-with-training``) a round is one exchange with each site: the message that
trains round r has the site score the model it starts from first, which is round r-1's evaluation,
so round r-1 is recorded once round r's replies are in, and the last round is scored on its own.
With DP, secure aggregation or sampled sites a round is two exchanges, training then evaluation.

Between rounds the run honours the centre's control flag (pause / continue / stop), keeps the
best round by the configured criterion (``best-metric``: the sites' pooled validation statistics
or the centre's validation clinic, never a test figure), stops early after ``patience`` rounds
without improvement of it, and logs every round to the experiment tracker. Every early end is recorded
with its reason in ``state.json`` and the round's record.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common.config import RunConfig
from common.exchange import EVALUATE_FIRST_KEY, FID_KEY, STATUS_OK, site_record
from common.rundir import RunDirectory
from common.runlog import round_line, select_best
from common.model import trainable_parameter_count
from server.evaluation import CentralValidation, public_feature_norm
from server.privacy_plan import log_planned_ratio, plans_from_replies
from server.runs import round_record
from server.secure_aggregation import SecAggSettings, SecureAggregation
from server.scaffold import ControlVariate
from server.server_optimizer import ServerOptimizer
from server.strategy import ClinicFedAvg
from server.tracking import Tracker
from server.transport import PromptGrid

log = logging.getLogger(__name__)


class FederatedRun:
    def __init__(self, config: RunConfig, grid: Grid, run: RunDirectory, strategy: ClinicFedAvg,
                 efficiency: dict, central: CentralValidation | None, tracker: Tracker, backbone_hash: str,
                 budget_id: str, records: list[dict[str, Any]] | None = None) -> None:
        self.config = config
        self.fed = config.federation
        self.grid = grid
        self.run = run
        self.strategy = strategy
        self.efficiency = efficiency
        self.central = central
        self.tracker = tracker
        self.records = list(records or [])  # adopted rounds of a resumed run come first
        # The hash travels with every message so a site can refuse a backbone it does not have;
        # the budget id names the privacy ledger a DP site charges (a resumed run keeps its id).
        self.train_config: dict[str, Any] = {"backbone-hash": backbone_hash, "budget-id": budget_id}
        self.evaluate_config: dict[str, Any] = {"backbone-hash": backbone_hash}
        if config.privacy.dp_enabled:
            # A DP site evaluates with the standardisation its ledger holds, and standardises with
            # public statistics (the centre's own clinic), never with a fit on its training studies.
            self.evaluate_config["budget-id"] = budget_id
            if config.model.feature_norm == "site" and central is not None:
                public = public_feature_norm(central).to_config()
                self.train_config.update(public)
                self.evaluate_config.update(public)
        self.secure = (SecureAggregation(SecAggSettings.from_config(self.fed), strategy, grid, self.fed.round_timeout)
                       if self.fed.secure_aggregation else None)
        self.server_optimizer = ServerOptimizer.of(self.fed)  # resume: restored by the ServerApp
        self.control = ControlVariate(strategy.settings.spec) if self.fed.aggregation == "scaffold" else None
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.first_round = 1

    # ------------------------------------------------------------------ the loop
    def execute(self, arrays: ArrayRecord, first_round: int) -> str:
        """Run rounds ``first_round``..num-rounds from ``arrays``; returns the final state. An
        error ends the run as failed, with its reason in state.json, and is raised again."""
        try:
            return self._rounds(arrays, first_round)
        except Exception as error:  # state.json says failed and why, not 'running' for good
            self.end("failed", self.records[-1]["round"] if self.records else None, f"{type(error).__name__}: {error}")
            raise

    def _rounds(self, arrays: ArrayRecord, first_round: int) -> str:
        self.first_round = first_round  # pause-after-round pauses only after a round this run trains
        for record in self.records:
            self.tracker.log_round(record)
        unscored = 0 if first_round == 1 else None  # the last round whose model the sites have not scored
        for server_round in range(first_round, self.fed.num_rounds + 1):
            arrays, stopped = self.run_round(server_round, arrays, unscored)
            if stopped:
                return self.end("stopped", server_round - 1, stopped)
            unscored = server_round
        if unscored is not None and (stopped := self.evaluate_and_finish(unscored, arrays)):
            return self.end("stopped", unscored, stopped)
        return self.end("finished", self.fed.num_rounds, f"finished {self.fed.num_rounds} rounds")

    def run_round(self, server_round: int, arrays: ArrayRecord, unscored: int | None
                  ) -> tuple[ArrayRecord, str | None]:
        """Round ``server_round``: the scores of round ``unscored`` (server_round - 1, or None when
        it has them) first, in the same exchange as the training when it can, then the training.
        Returns the global model and why the run ends after round server_round - 1, if it does."""
        if server_round - 1 == self.fed.pause_after_round >= self.first_round and self.run.control() == "running":
            self.run.set_control("paused")  # pause-after-round: as clinicfl-server pause would write it
        together = unscored is not None and self.evaluate_with_training and self.run.control() == "running"
        if unscored is not None and not together:  # scored before the centre's pause or stop takes effect
            if stopped := self.evaluate_and_finish(unscored, arrays):
                return arrays, stopped
        if self.wait_while_paused(server_round - 1) == "stop":
            return arrays, "stopped by the coordinating centre"
        log.info("[ROUND %d/%d]", server_round, self.fed.num_rounds)
        if together:
            return self.score_and_train(server_round, arrays)
        return self.train(server_round, arrays), None

    @property
    def evaluate_with_training(self) -> bool:
        """Whether a round's evaluation rides in the next round's training messages: not with DP
        or secure aggregation (a round trained before an early stop would spend privacy budget
        for nothing), nor with sampled sites (each phase samples its own)."""
        return (self.fed.evaluate_with_training and not self.config.privacy.dp_enabled and self.secure is None
                and self.fed.fraction_train == 1.0 and self.fed.fraction_evaluate == 1.0)

    def score_and_train(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, str | None]:
        """One exchange: the sites score round server_round - 1's model, then train round
        ``server_round`` from it. Round server_round - 1 is recorded first; when the run ends after
        it, this round's training is left unaggregated. Returns as ``run_round``."""
        started = time.perf_counter()
        replies = self.send_train(server_round, arrays, evaluate_first=True)
        self.phases["evaluate_and_next_training_at_sites"] = time.perf_counter() - started
        self.pool_evaluation(server_round - 1, replies, within_training=True)
        if stopped := self.finish_scored(server_round - 1, arrays):
            if any(not r.has_error() and site_record(r).get("status") == STATUS_OK for r in replies):
                stopped += f"; round {server_round}'s training came with that evaluation and was not aggregated"
            return arrays, stopped
        started = time.perf_counter()
        arrays = self.aggregate_train(server_round, arrays, replies)
        self.phases["train_pooling"] = time.perf_counter() - started
        return arrays, None

    def train(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The training phase of two: the new global model (``arrays`` when none could be formed)."""
        started = time.perf_counter()
        if self.secure is not None:  # SecAgg+: only the sum of the updates is ever seen
            new_arrays = self.secure.train(server_round, arrays, ConfigRecord(dict(self.train_config)))
            arrays = self.server_optimizer.step(arrays, new_arrays) if new_arrays is not None else arrays
        else:
            arrays = self.aggregate_train(server_round, arrays, self.send_train(server_round, arrays))
        self.phases["train"] = time.perf_counter() - started
        return arrays

    def aggregate_train(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        """The new global model from the replies; ``arrays`` when no aggregate could be formed."""
        new_arrays, _ = self.strategy.aggregate_train(server_round, replies)
        deltas = self.strategy.control_deltas.pop(server_round, {})
        if self.control is not None and new_arrays is not None:
            self.control.update([deltas[site] for site in sorted(deltas)], sampled=len(replies))
        return self.server_optimizer.step(arrays, new_arrays) if new_arrays is not None else arrays

    def server_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the centre's own state: the server optimiser's, SCAFFOLD's c."""
        return {**self.server_optimizer.state(), **(self.control.state() if self.control is not None else {})}

    def restore_server_state(self, state: dict[str, Any] | None) -> None:
        self.server_optimizer.restore(state)
        if self.control is not None:
            self.control.restore(state)

    def send_train(self, server_round: int, arrays: ArrayRecord, evaluate_first: bool = False) -> list[Message]:
        """The sites' replies to this round's train messages (``evaluate_first``: each message
        also has its site score the model it carries, as round server_round - 1's evaluation)."""
        values = dict(self.train_config)
        if evaluate_first:
            values.update(self.evaluate_config)
            values.update({EVALUATE_FIRST_KEY: True, FID_KEY: self.fid_round(server_round - 1)})
        messages = self.strategy.configure_train(server_round, arrays, ConfigRecord(values), self.grid)
        if self.control is not None:
            messages = self.control.attach(list(messages))
        replies = self._send_and_receive(server_round, messages)
        resend = self.strategy.resend_in_full(server_round, arrays, replies)
        if resend and self.control is not None:
            resend = self.control.attach(resend)
        if resend:  # sites that did not hold the model the message named by digest
            again = {m.metadata.dst_node_id for m in resend}
            replies = [r for r in replies if r.has_error() or r.metadata.src_node_id not in again]
            replies += self._send_and_receive(server_round, resend)
        return replies

    def _send_and_receive(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """Train replies. With PromptGrid each update is decoded and checked as it comes, while
        the other sites still train, rather than all of them after the last one has come."""
        if isinstance(self.grid, PromptGrid):
            check = self.strategy.validator.check_early
            return list(self.grid.send_and_receive(messages, timeout=self.fed.round_timeout,
                                                   each=lambda reply: check(server_round, reply)))
        return list(self.grid.send_and_receive(messages, timeout=self.fed.round_timeout))

    def evaluate_and_finish(self, server_round: int, arrays: ArrayRecord) -> str | None:
        """The evaluation phase of ``server_round`` on its own, then its record; why the run ends, if it does."""
        started = time.perf_counter()
        config = ConfigRecord({**self.evaluate_config, FID_KEY: self.fid_round(server_round)})
        messages = self.strategy.configure_evaluate(server_round, arrays, config, self.grid)
        replies = self.grid.send_and_receive(messages, timeout=self.fed.round_timeout)
        self.phases["evaluate_at_sites"] = time.perf_counter() - started
        self.pool_evaluation(server_round, replies)
        return self.finish_scored(server_round, arrays)

    def pool_evaluation(self, server_round: int, replies: Iterable[Message], within_training: bool = False) -> None:
        started = time.perf_counter()
        self.strategy.aggregate_evaluate(server_round, replies, within_training)
        self.phases["evaluate_pooling"] = time.perf_counter() - started

    def finish_scored(self, server_round: int, arrays: ArrayRecord) -> str | None:
        """Record a round the sites have scored; why the run ends after it, if it does."""
        report = self.strategy.report(server_round)
        if server_round > 0 and report.exhausted and not report.train:
            report.stopped = "every site that replied has exhausted its privacy budget"
        if server_round == 1 and report.privacy:  # a run's first DP round: what the whole run will give
            log_planned_ratio(plans_from_replies(report.privacy, report.train, self.fed.num_rounds,
                                                 trainable_parameter_count(self.config.model)), log)
        stopped = self.finish_round(server_round, arrays)
        if server_round == 0 and not report.evaluation:
            reasons = "; ".join(f"{r['site']}: {r['reason']}" for r in report.rejected) or "no site replied"
            return f"no site could take part in round 0 ({reasons})"
        return stopped

    def fid_round(self, server_round: int) -> bool:
        return self.config.eval.fid_round(server_round, self.fed.num_rounds)

    def finish_round(self, server_round: int, arrays: ArrayRecord) -> str | None:
        """Checkpoint, record, track and report one round; returns why the run ends after it."""
        started = time.perf_counter()
        pooled = self.strategy.pooled.get(server_round)
        validation = self.strategy.pooled_validation.get(server_round)
        checkpoint = self.run.save_checkpoint(server_round, arrays,
                                              pooled.classification.histograms if pooled is not None else None,
                                              validation.histograms if validation is not None else None,
                                              self.server_state())
        report = self.strategy.report(server_round)
        central = self.central.evaluate(arrays, self.fid_round(server_round)) if self.central else None
        # The round ends here. Its bookkeeping below (metrics files, state, tracker, console) is
        # timed into the next round: every second of the run is in exactly one round's seconds.
        ended = time.perf_counter()
        record = round_record(report, ended - self.started, checkpoint, self.efficiency, central,
                              dict(self.strategy.epsilon) if self.config.privacy.dp_enabled else None)
        self.started = ended
        self.phases["checkpoint_and_validation"] = ended - started
        # Where the round's time went (server's view; "at_sites" includes the messages' transport).
        record["phase_seconds"] = {name: round(value, 3) for name, value in self.phases.items()}
        self.phases = {}
        self.records.append(record)
        if not record.get("stopped") and (why := self.early_stop_reason(server_round)):
            record["stopped"] = report.stopped = why
        self.run.append_metrics(record)
        self.run.set_state("running", server_round, best=self.best())
        self.tracker.log_round(record)
        self.print_round(server_round, record)
        self.phases["previous_round_records"] = time.perf_counter() - ended
        return record.get("stopped")

    def print_round(self, server_round: int, record: dict[str, Any]) -> None:
        """The round's line on the console, and a line per rejected reply and per site secure aggregation dropped."""
        print(f"clinicfl: {round_line(record, self.fed.num_rounds)}", flush=True)
        for rejected in record.get("rejected") or []:
            print(f"clinicfl: round {server_round}: {rejected['phase']} reply from {rejected['site']} rejected: "
                  f"{rejected['reason']}", flush=True)
        for site, why in (record.get("secure_aggregation") or {}).get("dropped", {}).items():
            print(f"clinicfl: round {server_round}: secure aggregation went on without {site} ({why})", flush=True)

    # ------------------------------------------------------------------ between rounds
    def best(self) -> dict[str, Any] | None:
        found = select_best(self.records, self.fed.best_metric)
        return None if found is None else {"round": found[0], "metric": self.fed.best_metric, "value": found[1]}

    def early_stop_reason(self, server_round: int) -> str | None:
        """Patience: ``patience`` rounds since the best one (this round recorded)."""
        if self.fed.patience <= 0:
            return None
        best = select_best(self.records, self.fed.best_metric)
        if best is None or server_round - best[0] < self.fed.patience:
            return None
        return (f"early stop: {self.fed.best_metric} has not improved for {server_round - best[0]} rounds "
                f"(patience {self.fed.patience}; best round {best[0]})")

    def wait_while_paused(self, server_round: int) -> str:
        """Between rounds: wait while the centre has paused the run; returns running or stop."""
        if self.run.control() == "paused":
            detail = "clinicfl-server continue RUN resumes it"
            self.run.set_state("paused", server_round, detail, best=self.best(), paused_checks=0)
            print(f"clinicfl: paused after round {server_round}; waiting for continue or stop", flush=True)
            checks = 0
            while self.run.control() == "paused":
                time.sleep(self.fed.control_poll)
                checks += 1
                if self.run.control() == "paused":
                    self.run.set_state("paused", server_round, detail, best=self.best(), paused_checks=checks)
            print(f"clinicfl: {self.run.control()} requested after round {server_round}", flush=True)
        return "stop" if self.run.control() == "stop" else "running"

    def end(self, state: str, last_round: int | None, detail: str) -> str:
        best = self.best()
        self.run.set_state(state, last_round, detail if state != "finished" else "", best=best)
        if best is not None:
            print(f"clinicfl: best round {best['round']} ({best['metric']} {best['value']:.4f}); "
                  f"last round {last_round}", flush=True)
        if state == "finished":
            print(f"clinicfl: finished {self.fed.num_rounds} rounds; results in {self.run.path}", flush=True)
        else:
            print(f"clinicfl: run ended after round {last_round}: {detail}", flush=True)
        return state
