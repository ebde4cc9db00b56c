"""Replies collected as soon as they arrive.

Flower's ``Grid.send_and_receive`` pushes the messages and then pulls the replies at a fixed
interval: every 3 s through the SuperLink's ServerAppIo API in a deployment (``HttpGrid``), every
0.1 s in a simulation (``InMemoryGrid``). A phase whose sites answer in 1.2 s therefore costs 3 s
in a deployment, and each of a round's phases (training, evaluation, the secure-aggregation
stages) pays up to one interval for nothing. ``PromptGrid`` wraps the Grid the ServerApp is given
and pulls every 10 ms at first, then every tenth of the time waited so far, at most every 0.5 s:
the last reply is seen within 10% of the phase's time (and 0.5 s) after it came, and a site that
takes minutes costs two pulls a second. Every other Grid call goes to the wrapped one unchanged.

In a deployment a reply is listed by the SuperLink as soon as its SuperNode has announced it,
while the SuperNode may still be uploading its arrays. Flower's grid then fetches them with
retries after 1 s, 2 s, 4 s..., which a prompt pull meets on nearly every training reply (the
deployment benchmark measured the training phase 1.5 s slower than with Flower's 3 s interval).
So with Flower's ``HttpGrid`` the retries start after 20 ms and double up to 0.5 s, and end at
the deadline of the ``send_and_receive`` that pulls them: a site that announces a reply and never
uploads it is answered with Flower's ``MESSAGE_UNAVAILABLE`` error reply at the round timeout, as a
silent site is, instead of holding the ServerApp for Flower's 2 h limit.

In a simulation the runtime (``vce_api``) waits too: it hands pushed messages to the site
workers from a thread that looks every 0.1 s, so each phase started up to 0.1 s (measured:
25-100 ms) after its messages were pushed. ``prompt_simulation_dispatch`` gives that thread a
wake-up, which ``PromptGrid.push_messages`` sets (the thread still looks every 0.1 s on its own,
so with ``reply-polling = "flower"``, without PromptGrid, it behaves as Flower's), and makes the
runtime's reply thread signal each reply it stores, which ends PromptGrid's wait for the next
pull at once. In a deployment neither exists and PromptGrid pulls on its own schedule.

The replacements are here; ``common/flower_patches.py`` puts them in Flower's place, and only for
the Flower versions they were written for.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from queue import Empty

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common import flower_patches
from common.flower_patches import HTTP_GRID_OBJECT_PULLS, SIMULATION_DISPATCH

SHORTEST_PULL_INTERVAL_S = 0.01
LONGEST_PULL_INTERVAL_S = 0.5
INTERVAL_FRACTION = 0.1  # of the time waited so far
OBJECT_FIRST_RETRY_S = 0.02
OBJECT_LONGEST_RETRY_S = 0.5
DISPATCH_INTERVAL_S = 0.1  # Flower's own: the simulation dispatcher looks this often without a wake-up

_pushed = threading.Event()  # set by PromptGrid.push_messages, consumed by the simulation dispatcher
_replied = threading.Event()  # set by the simulation runtime when it has stored a reply
# The monotonic time by which the replies being pulled must be complete (PromptGrid.send_and_receive
# sets it around its pulls; None: Flower's own limit). Only the ServerApp's main thread pulls.
_pull_deadline: float | None = None


def shorten_object_retries() -> None:
    """Flower's HttpGrid fetches a reply's arrays with ``pull_objects`` and its default retry
    intervals (1 s, doubling to 10 s); give it 20 ms, doubling to 0.5 s, within the round's deadline.
    Idempotent. It changes the name HttpGrid calls in this process, the ServerApp's own
    (``HTTP_GRID_OBJECT_PULLS`` in common/flower_patches.py)."""
    flower_patches.apply(HTTP_GRID_OBJECT_PULLS, {"pull_objects": pull_objects_by_deadline})


def pull_objects_by_deadline(flower_pull_objects: Callable[..., dict[str, bytes]]) -> Callable[..., dict[str, bytes]]:
    """Flower's ``pull_objects`` with short retries, bounded by ``_pull_deadline``."""

    @functools.wraps(flower_pull_objects)
    def pull_objects(*args: object, **kwargs: object) -> dict[str, bytes]:
        # No cap on the number of tries (500 at 0.5 s would give up after about 4 min); the
        # time is capped by the round's deadline, else by Flower's own limit (2 h).
        if _pull_deadline is not None:
            kwargs["max_time"] = max(0.0, _pull_deadline - time.monotonic())
        return flower_pull_objects(*args, initial_backoff=OBJECT_FIRST_RETRY_S, backoff_cap=OBJECT_LONGEST_RETRY_S,
                                   max_tries_per_object=None, **kwargs)

    return pull_objects


def prompt_simulation_dispatch() -> bool:
    """Replace the simulation runtime's dispatcher and reply loop (``vce_api.add_messages_to_queue``
    and ``put_message_into_state``) with ones that a push wakes and that signal each stored reply;
    returns whether this process runs that runtime. Idempotent (``SIMULATION_DISPATCH`` in
    common/flower_patches.py).

    The runtime starts both threads after it has imported the ServerApp, and looks the functions
    up when it does, so the ServerApp's module calls this when it is imported. A process
    without the runtime (a deployment's ServerApp, an in-process federation) is left alone: the
    runtime's module is not even imported."""
    # Flower's loops are replaced whole: the replacements do not call them.
    return flower_patches.apply(SIMULATION_DISPATCH, {"add_messages_to_queue": lambda _: _add_messages_to_queue,
                                                      "put_message_into_state": lambda _: _put_message_into_state})


def _add_messages_to_queue(state, queue, nodes_mapping, f_stop: threading.Event) -> None:  # noqa: ANN001
    """Flower's dispatcher loop, woken by a push as well as by its 0.1 s clock. Clearing before
    the scan means a push during the scan makes the wait return at once: nothing waits a tick."""
    while not f_stop.is_set():
        _pushed.clear()
        for node_id in nodes_mapping.keys():
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        _pushed.wait(DISPATCH_INTERVAL_S)


def _put_message_into_state(state, queue, f_stop: threading.Event) -> None:  # noqa: ANN001
    """Flower's reply loop (``vce_api.put_message_into_state``), signalling each stored reply."""
    while not f_stop.is_set():
        try:
            reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(reply)
        _replied.set()


def wait_for_a_reply(seconds: float) -> None:
    """Wait ``seconds``, or less when a simulation's runtime stores a reply. Clearing after the wait
    (before the pull that follows) means a reply stored during the pull is not missed."""
    _replied.wait(seconds)
    _replied.clear()


class PromptGrid(Grid):
    """``clock`` and ``wait`` are the time source and the pause between pulls (a test gives a
    clock it controls)."""

    def __init__(self, grid: Grid, shortest_interval: float = SHORTEST_PULL_INTERVAL_S,
                 longest_interval: float = LONGEST_PULL_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], None] = wait_for_a_reply) -> None:
        from flwr.superlink.grid import HttpGrid

        if isinstance(grid, HttpGrid):
            shorten_object_retries()
        self.grid = grid
        self.shortest_interval = shortest_interval
        self.longest_interval = longest_interval
        self.clock = clock
        self.wait = wait

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = self.grid.push_messages(messages)
        _pushed.set()  # in a simulation: the runtime's dispatcher looks now, not at its next tick
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         each: Callable[[Message], None] | None = None) -> Iterable[Message]:
        """Push ``messages``; return their replies once all have come, or what came by ``timeout``
        seconds (None: wait for all), as Flower's own method does. ``each`` is called with every
        reply as it comes, while the other sites are still at work."""
        global _pull_deadline
        waiting = set(self.push_messages(list(messages)))
        started = self.clock()
        deadline = None if timeout is None else started + timeout
        replies: list[Message] = []
        while waiting:
            now = self.clock()
            interval = min(self.longest_interval, max(self.shortest_interval, INTERVAL_FRACTION * (now - started)))
            self.wait(interval if deadline is None else max(0.0, min(interval, deadline - now)))
            # Flower's object pulls run on the process's monotonic clock: the time left, on it.
            _pull_deadline = None if deadline is None else time.monotonic() + max(0.0, deadline - self.clock())
            try:
                arrived = list(self.pull_messages(waiting))
            finally:
                _pull_deadline = None
            replies.extend(arrived)
            for reply in arrived if each is not None else ():
                each(reply)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if deadline is not None and self.clock() >= deadline:
                break
        return replies
