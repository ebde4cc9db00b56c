"""Who sent a reply: the node id Flower authenticated, never the name a site reports about itself.

In a deployment every site's key is registered with ``clinicfl-server register-site NAME KEY``;
the SuperLink authenticates each SuperNode by that key and stamps its node id on every reply.
The centre's registry (``sites.json``) maps node ids to names, so a reply is filed under the name
its *key* was registered with. In a simulation there is no registry: each node is one partition
(one site folder), and the name it reports first is bound to its node id for the rest of the run.

A reply whose reported name differs from its node's name is a mismatch: it is recorded with the
reason and filed under the node's own name, so no site can overwrite another's records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Identity:
    name: str
    mismatch: str | None = None  # why the reply's own claim cannot be taken at face value


class SiteIdentities:
    def __init__(self, registered: dict[int, str] | None = None) -> None:
        self.registered = dict(registered or {})  # node id -> name (deployment registry)
        self.bound: dict[int, str] = dict(self.registered)

    @classmethod
    def from_registry(cls, path: Path | None) -> "SiteIdentities":
        """``sites.json`` as ``clinicfl-server register-site`` writes it: name -> {"node-id": ...}."""
        if path is None or not path.is_file():
            return cls()
        entries = json.loads(path.read_text())
        return cls({int(entry["node-id"]): name for name, entry in entries.items()})

    def resolve(self, node_id: int, claimed: str | None) -> Identity:
        """The name to file a reply from ``node_id`` under; ``claimed`` is the reply's own site name
        (None for an error reply, which carries none)."""
        safe = claimed if claimed is not None and _SAFE_NAME.fullmatch(claimed) else None
        if node_id in self.bound:
            name = self.bound[node_id]
            if claimed is not None and claimed != name:
                return Identity(name, f"reports site name {_shown(claimed)}, but node {node_id} is {name!r}")
            return Identity(name)
        if self.registered:
            # Node authentication admits registered keys only; a node id outside the registry
            # means the registry was edited during the run.
            name = f"node-{node_id}"
            self.bound[node_id] = name
            return Identity(name, f"node {node_id} is not in the site registry (reports {_shown(claimed)})")
        name = safe or f"node-{node_id}"
        mismatch = None if safe or claimed is None else f"reports an unusable site name {_shown(claimed)}"
        if name in self.bound.values():
            mismatch = f"reports site name {name!r}, which node {self.node_of(name)} already holds"
            name = f"{name}@node-{node_id}"
        self.bound[node_id] = name
        return Identity(name, mismatch)

    def node_of(self, name: str) -> int | None:
        return next((node for node, bound in self.bound.items() if bound == name), None)


def _shown(claimed: str | None) -> str:
    """A reported name as logs may show it: short, printable."""
    if claimed is None:
        return "nothing"
    text = "".join(c if c.isprintable() else "?" for c in claimed[:40])
    return repr(text + ("..." if len(claimed) > 40 else ""))
