"""PromptGrid: the ServerApp's replies are collected as they arrive, not at Flower's fixed interval."""

from __future__ import annotations

import queue
import threading
import time

from flwr.app import ConfigRecord, RecordDict

from server.transport import PromptGrid
from tests.conftest import reply


class SlowSites:
    """A Grid whose sites answer ``delays[node]`` seconds after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.pushed_at: dict[str, tuple[int, float]] = {}
        self.pull_times: list[float] = []

    def push_messages(self, messages):
        ids = []
        for node in messages:
            self.pushed_at[f"q{node}"] = (node, time.monotonic())
            ids.append(f"q{node}")
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        self.pull_times.append(now)
        out = []
        for message_id in message_ids:
            node, pushed = self.pushed_at[message_id]
            delay = self.delays[node]
            if delay is not None and now - pushed >= delay:
                answer = reply(RecordDict({"site": ConfigRecord({"status": "ok"})}), node)
                answer.metadata.__dict__["_reply_to_message_id"] = message_id
                out.append(answer)
        return out


def test_every_reply_is_collected_soon_after_it_arrives():
    sites = SlowSites({1: 0.0, 2: 0.05, 3: 0.4})
    grid = PromptGrid(sites)
    started = time.monotonic()
    replies = grid.send_and_receive([1, 2, 3], timeout=30)
    waited = time.monotonic() - started
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    # Flower's deployment grid pulls every 3 s (this phase would cost 3 s), its simulation grid
    # every 0.1 s. Here the pull that found the last reply came within a tenth of the time waited,
    # and pulls were not wasted: about 25 for 0.4 s.
    assert waited < 0.4 * 1.1 + 0.1
    assert len(sites.pull_times) <= 40
    gaps = [b - a for a, b in zip(sites.pull_times, sites.pull_times[1:])]
    assert all(later >= earlier * 0.9 for earlier, later in zip(gaps, gaps[1:]))  # intervals only grow


def test_each_reply_is_handed_over_as_it_comes_while_other_sites_work():
    # Site 2 answers only once site 1's reply has been handed over: were replies handed over only
    # after the last had come, site 2 would never answer and the wait would end at the timeout.
    sites = SlowSites({1: 0.0, 2: None})
    handed: list[int] = []

    def each(reply) -> None:
        handed.append(reply.metadata.src_node_id)
        sites.delays[2] = 0.0

    replies = PromptGrid(sites).send_and_receive([1, 2], timeout=5, each=each)
    assert handed == [1, 2] and sorted(r.metadata.src_node_id for r in replies) == [1, 2]


def test_a_site_that_never_answers_costs_the_timeout_and_the_others_are_kept():
    sites = SlowSites({1: 0.0, 2: None})
    grid = PromptGrid(sites, longest_interval=0.05)
    started = time.monotonic()
    replies = grid.send_and_receive([1, 2], timeout=0.3)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert 0.3 <= time.monotonic() - started < 1.0
    assert max(b - a for a, b in zip(sites.pull_times, sites.pull_times[1:])) < 0.05 + 0.03  # capped interval


def test_replies_arrays_are_fetched_with_short_retries_from_flowers_deployment_grid(monkeypatch):
    """HttpGrid's object pulls get 20 ms retries doubling to 0.5 s, no cap on tries, and (outside a
    send_and_receive) Flower's own overall time limit."""
    from flwr.superlink.grid import http_grid

    from server.transport import OBJECT_FIRST_RETRY_S, OBJECT_LONGEST_RETRY_S, shorten_object_retries

    calls = []

    def flower_pull_objects(object_ids, pull_object_fn, **kwargs):  # stands for Flower's pull_objects
        calls.append(kwargs)
        return {object_id: pull_object_fn(object_id) for object_id in object_ids}

    monkeypatch.setattr(http_grid, "pull_objects", flower_pull_objects)
    shorten_object_retries()
    shorten_object_retries()  # idempotent: one layer, not two
    patched = http_grid.pull_objects
    assert patched.flower_pull_objects is flower_pull_objects
    assert patched(["a"], lambda object_id: b"content") == {"a": b"content"}
    assert calls == [{"initial_backoff": OBJECT_FIRST_RETRY_S, "backoff_cap": OBJECT_LONGEST_RETRY_S,
                      "max_tries_per_object": None}]


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
    from flwr.server.superlink.fleet.vce import vce_api

    import server.transport as transport

    original = vce_api.add_messages_to_queue, vce_api.put_message_into_state
    try:
        assert transport.prompt_simulation_dispatch()  # the runtime's module is loaded here
        assert vce_api.add_messages_to_queue is transport._add_messages_to_queue
        assert vce_api.put_message_into_state is transport._put_message_into_state
        # The runtime looks both loops up by these module-level names when it starts their threads
        # (Flower 1.42): a release that binds them otherwise would silently keep the 0.1 s clock.
        assert {"add_messages_to_queue", "put_message_into_state"} <= set(vce_api.run_api.__code__.co_names)
    finally:
        vce_api.add_messages_to_queue, vce_api.put_message_into_state = original
    import sys

    monkeypatch.delitem(sys.modules, transport.SIMULATION_RUNTIME)
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
