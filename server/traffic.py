"""The centre's ledger of what it sent: payload bytes per round, phase and node, and the messages
of each phase's latest exchange, which name the node an error reply stands for."""

from __future__ import annotations

from typing import Iterable

from flwr.app import Message

from common.exchange import payload_bytes


class TrafficLedger:
    def __init__(self) -> None:
        self._bytes: dict[tuple[int, str, int], int] = {}  # (round, phase, node) -> payload bytes sent
        self._messages: dict[str, list[Message]] = {}  # phase -> the messages of its latest exchange

    def remember_sent(self, server_round: int, phase: str, messages: Iterable[Message], append: bool = False,
                      counted_as: tuple[int, str] | None = None) -> list[Message]:
        """Keep the messages of a phase (``append``: to those kept, else instead of them); their
        bytes count for that round and phase, or for ``counted_as`` (round, phase)."""
        messages = list(messages)
        for msg in messages:
            key = (*(counted_as or (server_round, phase)), msg.metadata.dst_node_id)
            self._bytes[key] = self._bytes.get(key, 0) + payload_bytes(msg)
        # The grid sets each message's id when it pushes it; an error reply the SuperLink makes
        # for an unreachable node names only that id, so the messages are kept to find the node.
        self._messages[phase] = (self._messages.get(phase, []) if append else []) + messages
        return messages

    def sent_bytes(self, server_round: int, phase: str, node: int) -> int:
        """Payload bytes sent to ``node`` in that round's phase (0 when nothing was)."""
        return self._bytes.get((server_round, phase, node), 0)

    def sent_to(self, phase: str, node: int) -> list[Message]:
        """The kept messages of ``phase`` that went to ``node``, oldest first."""
        return [m for m in self._messages.get(phase, []) if m.metadata.dst_node_id == node]

    def node_of(self, msg: Message) -> int:
        """The node a reply comes from; for the SuperLink's error reply on behalf of an unreachable
        node (which names only our message), the node that message went to."""
        if msg.has_error():
            for sent in (m for batch in self._messages.values() for m in batch):
                if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return sent.metadata.dst_node_id
        return msg.metadata.src_node_id
