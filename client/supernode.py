"""Flower's SuperNode (``flower-supernode``, 1.42) with one repair: each message's reply is sent
before the next message is taken.

The SuperNode pulls a message, then sends "the replies it has" and pulls again. A reply to a
message of a run the centre stopped can be left in its store: when the stop lands while the
SuperNode confirms a message, Flower's ``RunNotRunningException`` (a BaseException) skips the
clean-up, and the app still answers. The next time, that stale reply is all that is sent, so every
later reply goes out one message late; a resumed run then waits its whole round-timeout for
replies that sit at the sites (seen on a loopback deployment: sites trained in 5 s, the centre
waited 600 s). Here the SuperNode keeps sending until the reply to the message it just pulled has
gone; the stale reply is still sent first (the SuperLink refuses it, as before).

``main`` puts the replacements in Flower's place through ``common/flower_patches.py``, which
refuses a Flower they were not written for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from common import flower_patches
from common.flower_patches import SUPERNODE_REPLIES_IN_STEP


class RepliesInStep:
    """Replacements of Flower's ``_pull_and_store_message`` and ``_push_messages`` that share the
    message the SuperNode pulled last, whose reply must be sent before the next pull."""

    def __init__(self) -> None:
        self.awaited: str | None = None

    def pull_and_store_message(self, flower_pull: Callable[..., int | None]) -> Callable[..., int | None]:
        """Flower's pull, recording the message it received."""

        def pull(**kwargs: Any) -> int | None:
            receive = kwargs["receive"]

            def recording_receive():  # noqa: ANN202
                received = receive()
                self.awaited = None if received is None else received[0].metadata.message_id
                return received

            return flower_pull(**{**kwargs, "receive": recording_receive})

        return pull

    def push_messages(self, flower_push: Callable[..., None]) -> Callable[..., None]:
        """Flower's push, repeated until the reply to the recorded message has been sent."""

        def push(**kwargs: Any) -> None:
            sent: set[str] = set()
            send = kwargs["send"]

            def recording_send(message, object_tree, clientapp_runtime):  # noqa: ANN001, ANN202
                sent.add(message.metadata.reply_to_message_id)
                return send(message, object_tree, clientapp_runtime)

            while True:  # Flower's own push: it waits for at least one reply and sends all it has
                flower_push(**{**kwargs, "send": recording_send})
                if self.awaited is None or self.awaited in sent:
                    return

        return push


def main() -> None:
    in_step = RepliesInStep()
    flower_patches.apply(SUPERNODE_REPLIES_IN_STEP, {"_pull_and_store_message": in_step.pull_and_store_message,
                                                     "_push_messages": in_step.push_messages})
    from flwr.supernode.cli import flower_supernode

    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
