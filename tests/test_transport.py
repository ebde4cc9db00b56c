"""PromptGrid: the ServerApp's replies are collected as they arrive, not at Flower's fixed interval."""

from __future__ import annotations

import queue
import threading

import pytest
from flwr.app import ConfigRecord, RecordDict

from server.transport import PromptGrid
from tests.conftest import reply


class ManualClock:
    """A clock the test controls: time passes only when PromptGrid waits between pulls."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


class SlowSites:
    """A Grid whose sites answer ``delays[node]`` seconds after the push (None: never), on ``clock``."""

    def __init__(self, delays: dict[int, float | None], clock: ManualClock | None = None) -> None:
        self.delays = delays
        self.clock = clock or ManualClock()
        self.pushed_at: dict[str, tuple[int, float]] = {}
        self.pull_times: list[float] = []
        self.found_at: dict[int, float] = {}  # node -> the time of the pull that found its reply

    def push_messages(self, messages):
        ids = []
        for node in messages:
            self.pushed_at[f"q{node}"] = (node, self.clock())
            ids.append(f"q{node}")
        return ids

    def pull_messages(self, message_ids):
        now = self.clock()
        self.pull_times.append(now)
        out = []
        for message_id in message_ids:
            node, pushed = self.pushed_at[message_id]
            delay = self.delays[node]
            if delay is not None and now - pushed >= delay:
                answer = reply(RecordDict({"site": ConfigRecord({"status": "ok"})}), node)
                answer.metadata.__dict__["_reply_to_message_id"] = message_id
                out.append(answer)
                self.found_at[node] = now
        return out

    def grid(self, **kwargs) -> PromptGrid:
        return PromptGrid(self, clock=self.clock, wait=self.clock.wait, **kwargs)


def test_every_reply_is_collected_soon_after_it_arrives():
    """Flower's deployment grid pulls every 3 s (this phase would cost 3 s), its simulation grid
    every 0.1 s. PromptGrid's pull that finds a reply comes within a tenth of the time waited (at
    least 10 ms, at most 0.5 s) after it came, and pulls are not wasted: they space out as the
    wait grows."""
    sites = SlowSites({1: 0.0, 2: 0.05, 3: 0.4})
    replies = sites.grid().send_and_receive([1, 2, 3], timeout=30)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    for node, came in ((1, 0.0), (2, 0.05), (3, 0.4)):
        assert came <= sites.found_at[node] <= came + max(0.01, 0.1 * sites.found_at[node]) + 1e-9, node
    assert len(sites.pull_times) <= 40
    gaps = sites.clock.waits
    assert gaps[0] == 0.01 and all(later >= earlier for earlier, later in zip(gaps, gaps[1:])), "intervals only grow"
    # At 30 s the interval is capped at 0.5 s: a site that takes minutes costs two pulls a second.
    slow = SlowSites({1: 30.0})
    slow.grid().send_and_receive([1], timeout=60)
    assert max(slow.clock.waits) == 0.5 and slow.found_at[1] <= 30.5


def test_each_reply_is_handed_over_as_it_comes_while_other_sites_work():
    # Site 2 answers only once site 1's reply has been handed over: were replies handed over only
    # after the last had come, site 2 would never answer and the wait would end at the timeout.
    sites = SlowSites({1: 0.0, 2: None})
    handed: list[int] = []

    def each(reply) -> None:
        handed.append(reply.metadata.src_node_id)
        sites.delays[2] = 0.0

    replies = sites.grid().send_and_receive([1, 2], timeout=5, each=each)
    assert handed == [1, 2] and sorted(r.metadata.src_node_id for r in replies) == [1, 2]


def test_a_site_that_never_answers_costs_the_timeout_and_the_others_are_kept():
    sites = SlowSites({1: 0.0, 2: None})
    replies = sites.grid(longest_interval=0.05).send_and_receive([1, 2], timeout=0.3)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert sites.clock() == pytest.approx(0.3) and sites.pull_times[-1] == pytest.approx(0.3), \
        "the last pull is at the timeout, not after it"
    assert max(sites.clock.waits) <= 0.05, "the interval is capped"


def test_replies_arrays_are_fetched_with_short_retries_from_flowers_deployment_grid(monkeypatch):
    """HttpGrid's object pulls get 20 ms retries doubling to 0.5 s, no cap on tries, and (outside a
    send_and_receive) Flower's own overall time limit."""
    from flwr.superlink.grid import http_grid

    from common.flower_patches import HTTP_GRID_OBJECT_PULLS, flower_function
    from server.transport import OBJECT_FIRST_RETRY_S, OBJECT_LONGEST_RETRY_S, shorten_object_retries

    calls = []

    def flower_pull_objects(object_ids, pull_object_fn, *, max_concurrent_pulls=1, max_time=None,
                            max_tries_per_object=None, initial_backoff=1.0, backoff_cap=10.0):  # Flower's parameters
        calls.append({"max_time": max_time, "max_tries_per_object": max_tries_per_object,
                      "initial_backoff": initial_backoff, "backoff_cap": backoff_cap})
        return {object_id: pull_object_fn(object_id) for object_id in object_ids}

    monkeypatch.setattr(http_grid, "pull_objects", flower_pull_objects)
    shorten_object_retries()
    shorten_object_retries()  # idempotent: one layer, not two
    assert flower_function(HTTP_GRID_OBJECT_PULLS, "pull_objects") is flower_pull_objects
    assert http_grid.pull_objects.__wrapped__ is flower_pull_objects
    assert http_grid.pull_objects(["a"], lambda object_id: b"content") == {"a": b"content"}
    assert calls == [{"max_time": None, "max_tries_per_object": None, "initial_backoff": OBJECT_FIRST_RETRY_S,
                      "backoff_cap": OBJECT_LONGEST_RETRY_S}]


def test_a_site_that_announces_a_reply_but_never_uploads_it_ends_at_the_round_timeout(monkeypatch):
    """The SuperLink lists the reply, its arrays never come. Flower's real pull_objects retries;
    PromptGrid's deadline ends it with Flower's MESSAGE_UNAVAILABLE reply, as for a silent site.
    Without the deadline the pulls would go on (here: the 40th try fails the test)."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode
    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    from server.transport import shorten_object_retries

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    shorten_object_retries()
    tries = []

    def never_uploaded(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) >= 40:
            raise AssertionError("still pulling an object that never comes, past the round's deadline")
        raise ObjectUnavailableError(object_id)

    class AnnouncedNeverUploaded(SlowSites):
        """HttpGrid.pull_messages as Flower 1.42 has it: a listed reply whose objects cannot be
        pulled becomes an error reply."""

        def pull_messages(self, message_ids):
            out = []
            for message_id in message_ids:
                try:
                    http_grid.pull_objects([f"{message_id}-arrays"], pull_object_fn=never_uploaded)
                except ObjectPullError:
                    answer = reply(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="objects unavailable"),
                                   self.pushed_at[message_id][0])
                    answer.metadata.__dict__["_reply_to_message_id"] = message_id
                    out.append(answer)
            return out

    (answer,) = PromptGrid(AnnouncedNeverUploaded({1: None})).send_and_receive([1], timeout=0.3)
    assert answer.has_error() and answer.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert 0 < len(tries) < 40


class PendingMessages:
    """The simulation runtime's LinkState as its dispatcher sees it: messages waiting per node."""

    def __init__(self) -> None:
        self.waiting: dict[int, list[str]] = {7: []}
        self.scanned = threading.Event()

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        taken, self.waiting[node_id] = self.waiting[node_id][:limit], self.waiting[node_id][limit:]
        self.scanned.set()
        return taken


def test_a_push_wakes_the_simulation_dispatcher(monkeypatch):
    import server.transport as transport

    # Without a wake-up the dispatcher would look again only after 10 minutes.
    monkeypatch.setattr(transport, "DISPATCH_INTERVAL_S", 600.0)
    state, dispatched, stop = PendingMessages(), queue.Queue(), threading.Event()
    dispatcher = threading.Thread(target=transport._add_messages_to_queue, args=(state, dispatched, {7: 0}, stop),
                                  daemon=True)
    dispatcher.start()
    assert state.scanned.wait(10)  # its first look found nothing; now it waits
    grid = PromptGrid(SlowSites({7: 0.0}))

    def push(node_ids):  # the message lands in the runtime's state, as InMemoryGrid puts it there
        state.waiting[7].append("train for site 7")
        return [f"q{node}" for node in node_ids]

    grid.grid.push_messages = push
    grid.push_messages([7])
    assert dispatched.get(timeout=30) == "train for site 7"
    stop.set()
    transport._pushed.set()
    dispatcher.join(10)
    assert not dispatcher.is_alive()


def test_the_simulation_runtime_takes_the_prompt_dispatcher(monkeypatch):
    import sys

    from flwr.server.superlink.fleet.vce import vce_api

    import server.transport as transport
    from common.flower_patches import SIMULATION_DISPATCH

    for name in ("add_messages_to_queue", "put_message_into_state"):  # restored after the test
        monkeypatch.setattr(vce_api, name, getattr(vce_api, name))
    assert transport.prompt_simulation_dispatch()  # the runtime's module is loaded here
    assert vce_api.add_messages_to_queue is transport._add_messages_to_queue
    assert vce_api.put_message_into_state is transport._put_message_into_state
    monkeypatch.delitem(sys.modules, SIMULATION_DISPATCH.module)
    assert not transport.prompt_simulation_dispatch()  # a deployment's ServerApp: nothing to change


class StoredReplies:
    """The simulation runtime's LinkState as PromptGrid's pulls see it: replies stored so far."""

    def __init__(self) -> None:
        self.stored: list = []

    def store_message_res(self, message) -> None:
        self.stored.append(message)

    def push_messages(self, messages):
        return [f"q{node}" for node in messages]

    def pull_messages(self, message_ids):
        return [m for m in self.stored if m.metadata.reply_to_message_id in set(message_ids)]


def test_a_stored_reply_ends_the_wait_for_the_next_pull():
    import server.transport as transport

    state, replies, stop = StoredReplies(), queue.Queue(), threading.Event()
    storer = threading.Thread(target=transport._put_message_into_state, args=(state, replies, stop), daemon=True)
    storer.start()
    # Pulls 10 minutes apart: only the runtime's signal can end the wait in time.
    grid = PromptGrid(state, shortest_interval=600.0, longest_interval=600.0)
    collected = []
    waiter = threading.Thread(target=lambda: collected.extend(grid.send_and_receive([7], timeout=None)), daemon=True)
    waiter.start()
    answer = reply(RecordDict({"site": ConfigRecord({"status": "ok"})}), 7)
    answer.metadata.__dict__["_reply_to_message_id"] = "q7"
    replies.put(answer)  # a site worker's reply, as the runtime queues it
    waiter.join(30)
    stop.set()
    storer.join(10)
    assert [m.metadata.src_node_id for m in collected] == [7]
