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
"""

from __future__ import annotations

import sys
from typing import Any

from flwr.supernode import start_client_internal as flower

_flower_pull = flower._pull_and_store_message
_flower_push = flower._push_messages
_awaited: list[str | None] = [None]  # the message the SuperNode pulled last: its reply must be sent


def _pull_and_store_message(**kwargs: Any) -> int | None:
    receive = kwargs["receive"]

    def recording_receive():  # noqa: ANN202
        received = receive()
        _awaited[0] = None if received is None else received[0].metadata.message_id
        return received

    return _flower_pull(**{**kwargs, "receive": recording_receive})


def _push_messages(**kwargs: Any) -> None:
    sent: set[str] = set()
    send = kwargs["send"]

    def recording_send(message, object_tree, clientapp_runtime):  # noqa: ANN001, ANN202
        sent.add(message.metadata.reply_to_message_id)
        return send(message, object_tree, clientapp_runtime)

    while True:  # Flower's own push: it waits for at least one reply and sends all it has
        _flower_push(**{**kwargs, "send": recording_send})
        if _awaited[0] is None or _awaited[0] in sent:
            return


def main() -> None:
    flower._pull_and_store_message = _pull_and_store_message
    flower._push_messages = _push_messages
    from flwr.supernode.cli import flower_supernode

    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
