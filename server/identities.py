"""Who sent a reply: the node id Flower authenticated, never the name a site reports about itself.

In a deployment every site's key is registered with ``clinicfl-server register-site NAME KEY``;
the SuperLink authenticates each SuperNode by that key and stamps its node id on every reply.
The centre's registry (``sites.json``) maps node ids to names, so a reply is filed under the name
its *key* was registered with. In a simulation there is no registry: each node is one partition
(one site folder), and the name it reports first is bound to its node id for the rest of the run.

A reply whose reported name differs from its node's name is a mismatch: it is recorded with the
reason and filed under the node's own name, so no site can overwrite another's records. With a
registry, a reply from a node id that is not in it is refused (``Identity.refused``): the registry
is the list of sites the centre admitted, and a missing registry file is an error, never a silent
fall-back to the names sites report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RegistryError(ValueError):
    """The site registry the run names is missing or unreadable."""


@dataclass(frozen=True)
class Identity:
    name: str
    mismatch: str | None = None  # why the reply's own claim cannot be taken at face value
    refused: str | None = None  # why no reply from this node may be used (not a registered site)


class SiteIdentities:
    def __init__(self, registered: dict[int, str] | None = None, *, registry: bool = False) -> None:
        self.registered = dict(registered or {})  # node id -> name (deployment registry)
        self.registry = registry or bool(self.registered)  # a registry, even an empty one, admits only its sites
        self.bound: dict[int, str] = dict(self.registered)

    @classmethod
    def from_registry(cls, path: Path | None) -> "SiteIdentities":
        """``sites.json`` as ``clinicfl-server register-site`` writes it: name -> {"node-id": ...}.
        None: no registry (a simulation). A path that cannot be read is an error."""
        if path is None:
            return cls()
        try:
            entries = json.loads(path.read_text())
            registered = {int(entry["node-id"]): name for name, entry in entries.items()}
        except FileNotFoundError:
            raise RegistryError(f"site registry {path} not found: register the sites first "
                                "(clinicfl-server register-site NAME KEY)") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"site registry {path} cannot be read ({type(exc).__name__}): "
                                "it must map each site name to {\"node-id\": ...}") from None
        return cls(registered, registry=True)

    def resolve(self, node_id: int, claimed: str | None) -> Identity:
        """The name to file a reply from ``node_id`` under; ``claimed`` is the reply's own site name
        (None for an error reply, which carries none)."""
        safe = claimed if claimed is not None and _SAFE_NAME.fullmatch(claimed) else None
        if node_id in self.bound:
            name = self.bound[node_id]
            if claimed is not None and claimed != name:
                return Identity(name, f"reports site name {_shown(claimed)}, but node {node_id} is {name!r}")
            return Identity(name)
        if self.registry:
            # Node authentication admits registered keys only; a node id outside the registry
            # means the registry was edited during the run, or the SuperLink admits keys it should not.
            return Identity(f"node-{node_id}", refused=f"{self.refusal(node_id)} (reports {_shown(claimed)})")
        name = safe or f"node-{node_id}"
        mismatch = None if safe or claimed is None else f"reports an unusable site name {_shown(claimed)}"
        if name in self.bound.values():
            mismatch = f"reports site name {name!r}, which node {self.node_of(name)} already holds"
            name = f"{name}@node-{node_id}"
        self.bound[node_id] = name
        return Identity(name, mismatch)

    def refusal(self, node_id: int) -> str | None:
        """Why no reply from ``node_id`` may be used (it is not in the registry), or None."""
        if self.registry and node_id not in self.registered:
            return f"node {node_id} is not in the site registry"
        return None

    def node_of(self, name: str) -> int | None:
        return next((node for node, bound in self.bound.items() if bound == name), None)


def _shown(claimed: str | None) -> str:
    """A reported name as logs may show it: short, printable."""
    if claimed is None:
        return "nothing"
    text = "".join(c if c.isprintable() else "?" for c in claimed[:40])
    return repr(text + ("..." if len(claimed) > 40 else ""))
