"""SecAgg+ over Flower's Message API: the centre learns only the weighted sum of the sites' updates.

Flower 1.42 ships the protocol as ``SecAggPlusWorkflow``, which runs only inside the legacy
``LegacyContext``/``Strategy`` stack (``flwr.server.workflow``). This module drives the same four
stages (setup, share keys, collect masked vectors, unmask) from our ServerApp, with Flower's own
primitives (Shamir secret sharing, key agreement, its PRG, quantisation); the sites run Flower's
unmodified ``secaggplus_mod`` (client/secure_aggregation.py). No cryptography is written here.

Where it departs from the workflow, it is to validate, to survive dropouts and to survive one
hostile site (no protocol record, however malformed, raises out of ``SecureAggregation.train``):
- public keys must load and work in key agreement, and no two sites may send the same key (each
  site's mod would refuse the set); a site whose keys fail is dropped at setup;
- a site's encrypted key shares must be addressed to each of its neighbours exactly once;
- a reply that fails a check (metrics, status, shapes and names of the masked arrays, num-examples)
  is treated as a dropped site: its vector stays out of the sum and its pairwise masks are removed
  with the shares of its neighbours, as for a site that went silent;
- a site that dropped before its key shares were forwarded has masked nothing and needs no
  reconstruction (the workflow would fail the round for it);
- the masks of a dropped site are removed only against neighbours whose vectors are in the sum;
- key shares count once per site that hands them in, only for the sites it was asked about, and
  only with the Shamir index their owner gave that site; a rebuilt mask seed must have the seed's
  length and a rebuilt private key must match the public key its owner sent at setup. When all
  shares together fail but leaving one out succeeds, that one is left out (with a note); any
  other reconstruction failure drops the round's aggregation, never the run;
- the sum's weight factor must equal the one the sites' reported num-examples imply;
- the unmasked mean update must stay within the clipping range plus the quantisation error bound
  (a site that alters a masked coordinate moves the sum by a multiple of a quantisation step that
  the other checks cannot see);
- fewer than two vectors in the sum are never unmasked (that would reveal one site's update).

Sites mask their *update* (trained minus global), clipped to +-clipping range and quantised to
2**bits levels after weighting by num-examples / max-weight; the result is the FedAvg mean update,
exact up to the quantisation error that ``error_bound`` states.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, generate_key_pairs

from common.config import FederationConfig
from common.exchange import UPDATE_NAMES_KEY, payload_bytes, site_record
from server.strategy import ClinicFedAvg, RoundReport

log = logging.getLogger(__name__)

MOD_RANGE = 2 ** 32  # Flower's PRG draws masks below 2**32
SEED_BYTES = 32  # secaggplus_mod's private mask seed is os.urandom(32)


@dataclass(frozen=True)
class SecAggSettings:
    num_shares: int  # 0: every sampled site
    threshold: int  # 0: a majority of the shares
    clipping_range: float
    quantization_range: int
    max_weight: float

    @classmethod
    def from_config(cls, fed: FederationConfig) -> "SecAggSettings":
        return cls(fed.secagg_num_shares, fed.secagg_reconstruction_threshold, fed.secagg_clipping_range,
                   2 ** fed.secagg_quantization_bits, fed.secagg_max_weight)

    def for_sites(self, sites: int) -> tuple[int, int, str | None]:
        """(shares, threshold, why the round cannot run with ``sites`` sampled sites or None)."""
        shares = sites if self.num_shares == 0 else min(self.num_shares, sites)
        if shares < sites and shares % 2 == 0:  # SecAgg+ wants an odd neighbourhood
            shares += 1
        threshold = self.threshold or shares // 2 + 1
        if sites < 2:
            return shares, threshold, "secure aggregation needs at least 2 sites"
        if threshold > shares:
            return shares, threshold, (f"secagg-reconstruction-threshold {threshold} exceeds the {shares} shares "
                                       f"{sites} sites can hold")
        if sites * self.quantization_range >= MOD_RANGE:
            return shares, threshold, (f"{sites} sites x 2^bits quantisation levels would overflow the 2^32 "
                                       "modulus; lower secagg-quantization-bits")
        return shares, threshold, None

    def weight_factor(self, num_examples: int) -> int:
        """The integer weight secaggplus_mod puts in front of a site's vector."""
        return round(num_examples / self.max_weight * self.quantization_range)

    def error_bound(self, num_examples: list[int]) -> float:
        """Per coordinate, |secure mean - FedAvg mean| of updates within +-clipping range: the
        stochastic rounding of each site (< one level of 2C/Q, so k levels in the sum, divided by
        the total weight) plus the rounding of the weights themselves."""
        c = self.clipping_range
        factors = np.array([self.weight_factor(n) for n in num_examples], dtype=float)
        n = np.array(num_examples, dtype=float)
        rounding = 2 * c * len(num_examples) / factors.sum()
        weights = c * float(np.abs(factors / factors.sum() - n / n.sum()).sum())
        return rounding + weights


@dataclass
class _Round:
    """The protocol's state for one round (node ids throughout)."""

    sampled: list[int]
    shares: int
    threshold: int
    neighbours: dict[int, set[int]]
    public_keys: dict[int, tuple[bytes, bytes]]
    traffic: dict[int, list[int]]  # node -> [bytes sent, bytes received]
    dropped: dict[int, str]  # node -> stage and reason
    seconds: dict[str, float]
    # owner -> holder -> the Shamir index of the share the owner made for that holder: the mod
    # numbers its shares in the order of the public keys the centre forwarded to it (from 1)
    share_index: dict[int, dict[int, int]] = field(default_factory=dict)


class SecureAggregation:
    """One SecAgg+ train round at a time, for ``FederatedRun`` (server/federation.py)."""

    def __init__(self, settings: SecAggSettings, strategy: ClinicFedAvg, grid: Grid, timeout: float) -> None:
        self.settings = settings
        self.strategy = strategy
        self.grid = grid
        self.timeout = timeout

    def train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord | None:
        """The new global model, or None when the round could not aggregate (the reason is in
        the round's notes)."""
        report = self.strategy.report(server_round)
        train_messages = {m.metadata.dst_node_id: m for m in
                          self.strategy.configure_train(server_round, arrays, config, self.grid)}
        sampled = list(train_messages)
        shares, threshold, problem = self.settings.for_sites(len(sampled))
        if problem:
            return self._give_up(report, problem)
        order = random.sample(sampled, len(sampled))
        half = shares >> 1
        neighbours = {nid: {order[(i + offset) % len(order)] for offset in range(-half, half + 1)}
                      for i, nid in enumerate(order)}
        state = _Round(sampled, shares, threshold, neighbours, {}, {n: [0, 0] for n in sampled}, {}, {})
        try:
            keyed = self._share_keys(server_round, state, self._setup(server_round, state))
            accepted = self._collect(server_round, arrays, state, keyed, train_messages, report)
            result = self._unmask(server_round, arrays, state, keyed, accepted, report)
        except _Abort as abort:
            result = self._give_up(report, str(abort))
        except Exception as exc:  # noqa: BLE001 - no site may end the run; the checks missed this one
            log.exception("round %d: secure aggregation failed", server_round)
            result = self._give_up(report, f"the protocol failed ({type(exc).__name__})")
        finally:
            self._report(report, state)
        return result

    # ------------------------------------------------------------------ stages
    def _setup(self, server_round: int, state: _Round) -> set[int]:
        s = self.settings
        config = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(state.sampled), Key.SHARE_NUMBER: state.shares,
                  Key.THRESHOLD: state.threshold, Key.CLIPPING_RANGE: float(s.clipping_range),
                  Key.TARGET_RANGE: s.quantization_range, Key.MOD_RANGE: MOD_RANGE,
                  Key.MAX_WEIGHT: float(s.max_weight)}
        replies = self._exchange(server_round, state, Stage.SETUP, {n: ConfigRecord(config) for n in state.sampled})
        # A key the sites cannot use would make every neighbour's mod fail in the next stages:
        # each key must load and agree with a throwaway key of the centre's, as the sites' will.
        probe = generate_key_pairs()[0]
        keys: dict[int, tuple[bytes, bytes]] = {}
        for node, cfg in replies.items():
            pk1, pk2 = cfg.get(Key.PUBLIC_KEY_1), cfg.get(Key.PUBLIC_KEY_2)
            problem = _public_keys_problem(pk1, pk2, probe)
            if problem:
                state.dropped[node] = f"{Stage.SETUP}: {problem}"
            else:
                keys[node] = (pk1, pk2)
        # Each site's mod refuses a set of keys with a repeat: a key two sites sent drops both.
        sent = Counter(key for pair in keys.values() for key in pair)
        active = set()
        for node, pair in keys.items():
            if any(sent[key] > 1 for key in pair):
                state.dropped[node] = f"{Stage.SETUP}: a public key another site also sent"
            else:
                state.public_keys[node] = pair
                active.add(node)
        self._check_threshold(state, active, Stage.SETUP)
        return active

    def _share_keys(self, server_round: int, state: _Round, active: set[int]) -> dict[int, tuple[list, list]]:
        """Forward each site's neighbours' public keys; returns node -> (sources, ciphertexts) to
        forward to it (only from sites that completed this stage: they have masked with it)."""
        def config(node: int) -> ConfigRecord:
            members = sorted(state.neighbours[node] & active)
            state.share_index[node] = {holder: i + 1 for i, holder in enumerate(members)}
            record = ConfigRecord({str(nb): list(state.public_keys[nb]) for nb in members})
            record[Key.STAGE] = Stage.SHARE_KEYS
            return record

        replies = self._exchange(server_round, state, Stage.SHARE_KEYS, {n: config(n) for n in active})
        forward: dict[int, tuple[list, list]] = {}
        for node, cfg in replies.items():
            dsts, texts = cfg.get(Key.DESTINATION_LIST), cfg.get(Key.CIPHERTEXT_LIST)
            if not (isinstance(dsts, list) and isinstance(texts, list) and len(dsts) == len(texts)
                    and all(type(d) is int for d in dsts) and all(isinstance(t, bytes) for t in texts)):
                state.dropped[node] = f"{Stage.SHARE_KEYS}: malformed key shares"
                continue
            # A neighbour left without this site's shares would not mask against it, while the
            # others would: the masks would not cancel.
            if len(set(dsts)) != len(dsts) or set(dsts) != (state.neighbours[node] & active) - {node}:
                state.dropped[node] = f"{Stage.SHARE_KEYS}: key shares not addressed to each neighbour once"
                continue
            forward.setdefault(node, ([], []))
            for dst, text in zip(dsts, texts):
                forward.setdefault(dst, ([], []))
                forward[dst][0].append(node)
                forward[dst][1].append(text)
        keyed = {node: forward[node] for node in replies if node not in state.dropped}
        self._check_threshold(state, set(keyed), Stage.SHARE_KEYS)
        return keyed

    def _collect(self, server_round: int, arrays: ArrayRecord, state: _Round, keyed: dict[int, tuple[list, list]],
                 train_messages: dict[int, Message], report: RoundReport) -> dict[int, tuple[list[np.ndarray], int]]:
        """Send the train messages with the forwarded key shares; returns node -> (masked vector,
        num-examples) for every reply that passed the checks."""
        def content(node: int, message: Message) -> RecordDict:
            record = RecordDict(dict(message.content.items()))  # the train message's records (model or digest)
            srcs, texts = keyed[node]
            record[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                                                       Key.CIPHERTEXT_LIST: texts, Key.SOURCE_LIST: srcs})
            return record

        stage = Stage.COLLECT_MASKED_VECTORS
        replies = self._send(server_round, state, stage, {n: content(n, train_messages[n]) for n in keyed})
        resend = self.strategy.resend_in_full(server_round, arrays, list(replies.values()))
        if resend:  # a site that did not hold the model it was named by digest: same stage, model in full
            again = self._send(server_round, state, stage, {m.metadata.dst_node_id: content(
                m.metadata.dst_node_id, m) for m in resend})
            replies.update(again)
        accepted: dict[int, tuple[list[np.ndarray], int]] = {}
        for node, reply in replies.items():
            site = self.strategy.site_of(reply, "train", report)
            taken, vector = None, []
            try:
                taken = self.strategy.take_train_reply(server_round, site, reply, report, masked=True)
                problem = None if taken is not None else "no update (see the round's rejections)"
                if taken is not None:
                    vector, problem = self._masked_vector(reply)
                if problem is None and report.train[site]["num-examples"] > self.settings.max_weight:
                    problem = (f"num-examples {report.train[site]['num-examples']} exceeds secagg-max-weight "
                               f"{self.settings.max_weight:g} (its weighted update would be clipped)")
            except Exception as exc:  # noqa: BLE001 - no reply may end the run
                problem = f"malformed reply ({type(exc).__name__})"
                report.reject(site, "train", problem)
            if problem is None:
                accepted[node] = (vector, report.train[site]["num-examples"])
            else:
                state.dropped[node] = f"{stage}: {problem}"
                if taken is not None:
                    report.train.pop(site, None)
                    report.reject(site, "train", f"secure aggregation: {problem}")
        for node in set(keyed) - set(replies):
            state.dropped.setdefault(node, f"{stage}: no reply")
        # Every site that shared keys has masked against its neighbours: each needs enough summed
        # neighbours to hand in shares for its masks.
        self._check_threshold(state, set(accepted), stage, owners=set(keyed))
        return accepted

    def _masked_vector(self, reply: Message) -> tuple[list[np.ndarray], str | None]:
        """The reply's masked arrays, or why they cannot be summed (shapes and names are all the
        centre can check of a masked update)."""
        spec = self.strategy.settings.spec
        names = site_record(reply).get(UPDATE_NAMES_KEY)
        if names != list(spec):
            return [], "masked update: parameter names or their order differ from the model's"
        raw = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
        if not isinstance(raw, list) or len(raw) != len(spec) + 1 or not all(isinstance(b, bytes) for b in raw):
            return [], f"masked update: expected {len(spec) + 1} arrays"
        vector = [bytes_to_ndarray(b) for b in raw]
        shapes = [(1,)] + [p.shape for p in spec.values()]
        for name, array, shape in zip(["weight"] + list(spec), vector, shapes):
            if array.shape != shape or array.dtype.kind not in "iu":
                return [], f"masked update: {name} has shape {array.shape} ({array.dtype}), expected {shape}"
            if array.size and (array.min() < 0 or array.max() >= MOD_RANGE):
                return [], f"masked update: {name} is outside the modulus"
        return [a.astype(np.int64) for a in vector], None

    def _unmask(self, server_round: int, arrays: ArrayRecord, state: _Round, keyed: dict[int, tuple[list, list]],
                accepted: dict[int, tuple[list[np.ndarray], int]], report: RoundReport) -> ArrayRecord | None:
        if len(accepted) < max(2, self.strategy.settings.min_sites):
            raise _Abort(f"only {len(accepted)} masked updates passed the checks (min-sites "
                         f"{self.strategy.settings.min_sites}; secure aggregation never unmasks fewer than 2)")
        alive, dead = set(accepted), set(keyed) - set(accepted)
        configs = {node: ConfigRecord({Key.STAGE: Stage.UNMASK,
                                       Key.ACTIVE_NODE_ID_LIST: sorted(state.neighbours[node] & alive),
                                       Key.DEAD_NODE_ID_LIST: sorted(state.neighbours[node] & dead)})
                   for node in alive}
        replies = self._exchange(server_round, state, Stage.UNMASK, configs)
        held = self._gather_shares(state, configs, replies, alive | dead, report)
        short = sorted(node for node, shares in held.items() if len(shares) < state.threshold)
        if short:
            raise _Abort(f"too few key shares to remove the masks of {', '.join(map(self._name, short))} "
                         f"(threshold {state.threshold}, counted once per site that hands them in)")
        # Every secret is rebuilt and checked before any mask is computed.
        seeds = {node: self._rebuild(state, node, held[node], "private mask seed", _seed_problem, report)
                 for node in sorted(alive)}
        keys = {node: bytes_to_private_key(self._rebuild(state, node, held[node], "first private key",
                                                         _key_check(state.public_keys[node][0]), report))
                for node in sorted(dead)}
        shapes = [(1,)] + [p.shape for p in self.strategy.settings.spec.values()]
        total = [np.zeros(shape, dtype=np.int64) for shape in shapes]
        for vector, _ in accepted.values():
            total = [(t + v) % MOD_RANGE for t, v in zip(total, vector)]
        for node in alive:  # the private mask of each summed vector
            mask = pseudo_rand_gen(seeds[node], MOD_RANGE, shapes)
            total = [t - m for t, m in zip(total, mask)]
        for node, private in keys.items():  # the pairwise masks summed sites added against a site that then dropped
            for other in (state.neighbours[node] & alive) - {node}:
                mask = pseudo_rand_gen(generate_shared_key(private, bytes_to_public_key(state.public_keys[other][0])),
                                       MOD_RANGE, shapes)
                total = [t + m if node > other else t - m for t, m in zip(total, mask)]
        weight, summed = factor_extract(parameters_mod(total, MOD_RANGE))
        counts = [n for _, n in accepted.values()]
        expected = sum(self.settings.weight_factor(n) for n in counts) % MOD_RANGE
        if int(weight) != expected or expected == 0:
            raise _Abort("the sum's weight does not match the sites' reported num-examples")
        mean = dequantize(summed, self.settings.clipping_range, self.settings.quantization_range)
        offset = -(len(accepted) - 1) * self.settings.clipping_range
        scale = self.settings.quantization_range / int(weight)
        # An honest mean update lies within the clipping range up to the quantisation error; a
        # masked coordinate a site moved lands outside it, unless it moved it by a legitimate amount.
        bound = self.settings.error_bound(counts)
        limit = self.settings.clipping_range + bound
        updates = [(update + offset) * scale for update in mean]
        for name, update in zip(self.strategy.settings.spec, updates):
            if not np.all(np.abs(update) <= limit):  # NaN fails it too
                raise _Abort(f"the unmasked mean update of {name} reaches {float(np.max(np.abs(update))):.4g}, "
                             f"outside the clipping range {self.settings.clipping_range:g} plus the quantisation "
                             f"error bound {bound:.3g}: a site altered its masked vector or key shares")
        combined = ArrayRecord()
        for name, update in zip(self.strategy.settings.spec, updates):
            value = (arrays[name].numpy().astype(np.float64) + update).astype(self.strategy.settings.spec[name].dtype)
            if not np.all(np.isfinite(value)):
                raise _Abort("the unmasked aggregate is not finite in float32")
            combined[name] = Array(value)
        report.aggregated = True
        report.secure_aggregation["quantization_error_bound"] = bound
        return combined

    def _gather_shares(self, state: _Round, configs: dict[int, ConfigRecord], replies: dict[int, ConfigRecord],
                       owners: set[int], report: RoundReport) -> dict[int, dict[int, bytes]]:
        """owner -> holder -> the share that holder handed in: one per holder and owner (so one site
        cannot fill a threshold alone), only for the owners the holder was asked about, and only
        a share with the Shamir index its owner made for that holder. Whatever else is left out
        with a note."""
        held: dict[int, dict[int, bytes]] = {node: {} for node in owners}
        for holder, cfg in replies.items():
            asked = set(configs[holder][Key.ACTIVE_NODE_ID_LIST]) | set(configs[holder][Key.DEAD_NODE_ID_LIST])
            named, shares = cfg.get(Key.NODE_ID_LIST), cfg.get(Key.SHARE_LIST)
            problem = None
            if not (isinstance(named, list) and isinstance(shares, list) and len(named) == len(shares)):
                problem = "malformed share lists"
            elif not all(type(owner) is int and owner in asked for owner in named):
                problem = "shares for sites it was not asked about"
            elif len(set(named)) != len(named):
                problem = "more than one share for one site"
            if problem:
                self._note(report, f"the key shares {self._name(holder)} handed in were left out: {problem}")
                continue
            for owner, share in zip(named, shares):
                problem = _share_problem(share, state.share_index.get(owner, {}).get(holder))
                if problem:
                    self._note(report, f"the key share {self._name(holder)} handed in for {self._name(owner)} "
                                       f"was left out: {problem}")
                else:
                    held[owner][holder] = share
        return held

    def _rebuild(self, state: _Round, owner: int, held: dict[int, bytes], what: str,
                 check: Callable[[bytes], str | None], report: RoundReport) -> bytes:
        """The secret ``owner`` shared, rebuilt from the shares in ``held`` and passing ``check``.
        Where all of them together fail but leaving out exactly one share (of more than the
        threshold) succeeds, that share was wrong, altered by its holder or made wrong by its
        owner: it is left out with a note. Otherwise the round cannot be unmasked."""
        secret, problem = _combined(list(held.values()), check, state.threshold)
        if secret is not None:
            return secret
        found: dict[int, bytes] = {}
        if len(held) > state.threshold:
            for holder in held:
                candidate, _ = _combined([share for h, share in held.items() if h != holder], check, state.threshold)
                if candidate is not None:
                    found[holder] = candidate
        if len(found) == 1:
            ((holder, secret),) = found.items()
            self._note(report, f"the key share {self._name(holder)} handed in for {self._name(owner)} does not "
                               "fit the others: left out")
            return secret
        raise _Abort(f"could not rebuild the {what} of {self._name(owner)} from its key shares: {problem}")

    # ------------------------------------------------------------------ messaging
    def _exchange(self, server_round: int, state: _Round, stage: str,
                  configs: dict[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        """Send one protocol stage; returns node -> its reply's protocol record, for the nodes
        that answered it (the others are recorded as dropped)."""
        replies = self._send(server_round, state, stage,
                             {node: RecordDict({RECORD_KEY_CONFIGS: cfg}) for node, cfg in configs.items()})
        answered = {}
        for node, reply in replies.items():
            record = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if record is None:
                reason = site_record(reply).get("reason") if not reply.has_error() else "Flower error"
                state.dropped[node] = f"{stage}: {reason if isinstance(reason, str) else 'no protocol record'}"
            else:
                answered[node] = record
        for node in set(configs) - set(replies):
            state.dropped.setdefault(node, f"{stage}: no reply")
        return answered

    def _send(self, server_round: int, state: _Round, stage: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        started = time.perf_counter()
        messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
                    for node, content in contents.items()]
        # kept so that an error reply the SuperLink makes (naming only our message) finds its node
        self.strategy.traffic.remember_sent(server_round, "train", messages, append=stage != Stage.SETUP)
        for message in messages:
            state.traffic[message.metadata.dst_node_id][0] += payload_bytes(message)
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = self.strategy.traffic.node_of(reply)
            if node in contents:
                replies[node] = reply
                state.traffic[node][1] += payload_bytes(reply)
        state.seconds[stage] = state.seconds.get(stage, 0.0) + time.perf_counter() - started
        return replies

    def _check_threshold(self, state: _Round, active: set[int], stage: str, owners: set[int] | None = None) -> None:
        """Every site whose masks may need removing (``owners``, by default the active ones) must
        keep ``threshold`` active neighbours to hand in its shares."""
        for node in active if owners is None else owners:
            if len(state.neighbours[node] & active) < state.threshold:
                raise _Abort(f"after {stage}, {len(active)} of {len(state.sampled)} sites remain: too few to "
                             f"reach the reconstruction threshold {state.threshold}")

    def _give_up(self, report: RoundReport, why: str) -> None:
        report.notes.append(f"secure aggregation: {why}: global model unchanged")
        log.warning("round %d: %s", report.server_round, report.notes[-1])
        return None

    def _name(self, node: int) -> str:
        """A node's site name; never binds a name: a node's first claim does that."""
        return self.strategy.identities.bound.get(node, f"node-{node}")

    def _note(self, report: RoundReport, note: str) -> None:
        report.notes.append(f"secure aggregation: {note}")
        log.warning("round %d: %s", report.server_round, report.notes[-1])

    def _report(self, report: RoundReport, state: _Round) -> None:
        for node, (sent, received) in state.traffic.items():
            if sent or received:
                report.count_traffic(self._name(node), sent, received)
        info: dict[str, Any] = report.secure_aggregation
        info.update({"sites": len(state.sampled), "shares": state.shares, "threshold": state.threshold,
                     "dropped": {self._name(node): why for node, why in sorted(state.dropped.items())},
                     "stage_seconds": {stage: round(t, 3) for stage, t in state.seconds.items()}})


class _Abort(Exception):
    """The round cannot complete securely; the message says why."""


def _public_keys_problem(pk1: object, pk2: object, probe: Any) -> str | None:
    """Why a site's two public keys cannot be used (None: they can): the sites load each and
    agree a shared key with it, as ``probe`` (a private key) does here."""
    if not (isinstance(pk1, bytes) and isinstance(pk2, bytes) and pk1 and pk2 and pk1 != pk2):
        return "no public keys in the reply"
    try:
        for key in (pk1, pk2):
            generate_shared_key(probe, bytes_to_public_key(key))
    except Exception as exc:  # noqa: BLE001 - any failure to load or agree makes the key unusable
        return f"unusable public key ({type(exc).__name__})"
    return None


def _share_problem(share: object, index: int | None) -> str | None:
    """Why a handed-in share cannot be used (None: it can). Flower's shares are a 4-byte
    little-endian index and 16 bytes per chunk of the padded secret."""
    if not isinstance(share, bytes) or len(share) < 20 or (len(share) - 4) % 16:
        return "not a Shamir share"
    got = int.from_bytes(share[:4], "little")
    if index is None or got != index:
        return f"Shamir index {got}, expected {index}"
    return None


def _combined(shares: list[bytes], check: Callable[[bytes], str | None],
              threshold: int) -> tuple[bytes | None, str | None]:
    """(the secret the shares combine to and that passes ``check``, or None; why not)."""
    try:
        secret = combine_shares(shares)
        # More shares than the threshold must lie on one polynomial: without the first one they
        # rebuild the same secret. A share that does not fit changes the secret (each 16-byte
        # chunk on its own, so an altered chunk can leave the padding, and ``check``, intact).
        if len(shares) > threshold and combine_shares(shares[1:]) != secret:
            return None, "the shares do not agree"
    except Exception as exc:  # noqa: BLE001 - Shamir/unpadding errors on shares that do not fit
        return None, f"the shares do not combine ({type(exc).__name__})"
    problem = check(secret)
    return (None, problem) if problem else (secret, None)


def _seed_problem(secret: bytes) -> str | None:
    return None if len(secret) == SEED_BYTES else f"the rebuilt seed has {len(secret)} bytes, not {SEED_BYTES}"


def _key_check(public_key: bytes) -> Callable[[bytes], str | None]:
    """A check that a rebuilt private key belongs to ``public_key`` (its owner's, sent at setup):
    a site may share a private key other than the one its neighbours agreed masks with."""
    expected = bytes_to_public_key(public_key).public_numbers()  # loaded at setup already

    def check(secret: bytes) -> str | None:
        try:
            numbers = bytes_to_private_key(secret).public_key().public_numbers()
        except Exception as exc:  # noqa: BLE001 - not a private key at all
            return f"the rebuilt private key does not load ({type(exc).__name__})"
        return None if numbers == expected else "the rebuilt private key does not match the public key it sent at setup"
    return check
