"""The global model as it goes on the wire, and which site holds which copy of it.

A site keeps the model of its last evaluation message; the next train message to it names that
model by digest instead of carrying it again (docs/design.md, "The global model goes to a site
once per round")."""

from __future__ import annotations

from flwr.app import ArrayRecord

from common.exchange import arrays_digest, to_wire


class HeldModels:
    def __init__(self, wire_dtype: str = "float32", wire_compression: str = "none") -> None:
        self.wire_dtype = wire_dtype
        self.wire_compression = wire_compression
        self._last_wire: tuple[ArrayRecord, ArrayRecord, str] | None = None  # (global, on the wire, digest)
        self._evaluated: tuple[int, str] | None = None  # (round, digest of the model sent to evaluate)
        self._held: dict[int, str] = {}  # node -> digest of the model it last evaluated (and replied ok)

    def wire(self, arrays: ArrayRecord) -> tuple[ArrayRecord, str]:
        """The global model as it goes on the wire, and its digest. The evaluation message and the
        next train message carry the same model: it is converted and hashed once."""
        if self._last_wire is None or self._last_wire[0] is not arrays:
            wire = to_wire(arrays, self.wire_dtype, self.wire_compression)
            self._last_wire = (arrays, wire, arrays_digest(wire))
        return self._last_wire[1], self._last_wire[2]

    def sent_to_evaluate(self, server_round: int, digest: str) -> None:
        """The model of ``server_round``'s evaluation messages, which each site keeps once it has scored it."""
        self._evaluated = (server_round, digest)

    def evaluated(self, node: int, server_round: int) -> None:
        """``node`` scored ``server_round``'s evaluation message (its reply passed the checks): it
        holds that message's model."""
        if self._evaluated is not None and self._evaluated[0] == server_round:
            self._held[node] = self._evaluated[1]

    def forget(self, node: int) -> None:
        """Whatever ``node`` held is no longer assumed (it replied again, or said it lost it)."""
        self._held.pop(node, None)

    def holds(self, node: int, digest: str) -> bool:
        return self._held.get(node) == digest
