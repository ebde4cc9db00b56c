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


def test_the_reply_to_the_pulled_message_is_sent_before_the_next_pull(monkeypatch):
    store = ReplyStore([_reply(1, "stale")])  # left by a run the centre stopped
    received = SimpleNamespace(metadata=SimpleNamespace(message_id="fresh"))
    monkeypatch.setattr(supernode, "_flower_pull", lambda **kwargs: kwargs["receive"]() and 2)  # its receive only
    assert supernode._pull_and_store_message(receive=lambda: (received, None)) == 2
    sent = []
    # the app answers the fresh message a moment after the SuperNode started pushing
    threading.Timer(0.2, lambda: store.replies.append(_reply(2, "fresh"))).start()
    supernode._push_messages(state=store, object_store=store, push_object=None,
                             send=lambda message, tree, runtime: sent.append(message.metadata.reply_to_message_id)
                             or (set(), ""))
    assert sent == ["stale", "fresh"], "Flower's own push returns after the stale reply alone"
