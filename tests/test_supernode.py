"""The SuperNode's repair (client/supernode.py): a stale reply from a stopped run does not make
the reply to the message just pulled wait for the next message."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from client import supernode


class ReplyStore:
    """The part of Flower's NodeState and ObjectStore that ``_push_messages`` uses."""

    def __init__(self, replies: list) -> None:
        self.replies, self.lock = replies, threading.Lock()

    def get_messages_legacy(self, is_reply: bool):  # noqa: ANN201
        with self.lock:
            taken, self.replies = self.replies, []
        return taken

    def get_message_processing_duration(self, message_id: str) -> float:
        return 0.0

    def delete_messages(self, message_ids) -> None:  # noqa: ANN001
        pass

    def get_object_tree(self, message_id: str):  # noqa: ANN201
        return SimpleNamespace(object_id=message_id, children=[])

    def delete(self, message_id: str) -> None:
        pass


def _reply(run_id: int, to: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(run_id=run_id, reply_to_message_id=to, message_id=f"re-{to}",
                                                    group_id="", message_type="train"))


def test_the_reply_to_the_pulled_message_is_sent_before_the_next_pull():
    from flwr.supernode import start_client_internal as flower

    store = ReplyStore([_reply(1, "stale")])  # left by a run the centre stopped
    received = SimpleNamespace(metadata=SimpleNamespace(message_id="fresh"))
    in_step = supernode.RepliesInStep()
    pull = in_step.pull_and_store_message(lambda **kwargs: kwargs["receive"]() and 2)  # Flower's pull: its receive only
    assert pull(receive=lambda: (received, None)) == 2
    push = in_step.push_messages(flower._push_messages)  # Flower's own push around the replacement
    sent = []

    def send(message, tree, runtime):  # noqa: ANN001, ANN202
        sent.append(message.metadata.reply_to_message_id)
        if sent == ["stale"]:  # the app answers the fresh message while the SuperNode pushes the stale reply
            store.replies.append(_reply(2, "fresh"))
        return set(), ""

    push(state=store, object_store=store, push_object=None, send=send)
    assert sent == ["stale", "fresh"], "Flower's own push returns after the stale reply alone"
