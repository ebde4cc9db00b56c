"""Every replacement of a Flower-internal function, in one place.

clinicfl changes three things inside Flower: the simulation runtime's dispatch loops, the object
pulls of the deployment grid, and the SuperNode's pull/push step. Each is declared here as a
``FlowerPatch``: what it replaces, why, where the replacement lives, and the Flower versions it was
checked against. Only ``apply`` assigns to Flower's module attributes; the code that needs a patch
applies it explicitly (``server/app.py`` at import, ``server/transport.PromptGrid``,
``client/supernode.main``).

Private functions change without notice between Flower releases, so ``apply`` refuses to patch a
Flower outside a patch's ``flower_versions``, or one whose function has another name, signature,
or is no longer looked up where the patch relies on it (``tests/test_flower_patches.py`` checks the
installed Flower the same way). After a Flower upgrade: compare each patched function in the new
Flower's source with its replacement, adapt the replacement, then widen ``flower_versions``.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from types import ModuleType
from typing import Any

# A replacement is built from the Flower function it replaces (a wrapper calls it; a loop
# replaced whole ignores it).
ReplacementFactory = Callable[[Callable[..., Any]], Callable[..., Any]]


class FlowerPatchError(RuntimeError):
    """The installed Flower is not the one a patch was written for."""


@dataclass(frozen=True)
class FlowerPatch:
    name: str
    module: str  # Flower's module whose attributes are replaced
    parameters: Mapping[str, tuple[str, ...]]  # attribute -> the parameter names of Flower's function
    looked_up_by: tuple[str, ...]  # Flower's functions (in ``module``) that look the attributes up when they run
    replacement: str  # where clinicfl's replacement lives
    why: str
    written_for: str  # the Flower release whose source the replacement was compared with
    flower_versions: tuple[str, str]  # the releases it may be applied to: from the first, below the second
    only_if_imported: bool = False  # True: patched only in a process that has already imported ``module``

    def attributes(self) -> str:
        return ", ".join(f"{self.module}.{name}" for name in self.parameters)

    def allowed(self) -> str:
        return f">={self.flower_versions[0]},<{self.flower_versions[1]}"


SIMULATION_DISPATCH = FlowerPatch(
    name="simulation-dispatch",
    module="flwr.server.superlink.fleet.vce.vce_api",
    parameters={"add_messages_to_queue": ("state", "queue", "nodes_mapping", "f_stop"),
                "put_message_into_state": ("state", "queue", "f_stop")},
    looked_up_by=("run_api",),
    replacement="server/transport.py (_add_messages_to_queue, _put_message_into_state)",
    why="The simulation runtime hands pushed messages to the sites from a loop that looks every 0.1 s, and "
        "stores replies without telling anyone: each phase started up to 0.1 s late and PromptGrid could "
        "not see a reply before its next pull. The replacements are Flower's loops plus a wake-up on a "
        "push and a signal on each stored reply.",
    written_for="1.42.0",
    flower_versions=("1.42", "1.43"),
    # The runtime exists only in a simulation's own process, which imports the ServerApp before it
    # starts these loops; a deployment's ServerApp must not import it (nor Ray).
    only_if_imported=True,
)

HTTP_GRID_OBJECT_PULLS = FlowerPatch(
    name="http-grid-object-pulls",
    module="flwr.superlink.grid.http_grid",
    parameters={"pull_objects": ("object_ids", "pull_object_fn", "max_concurrent_pulls", "max_time",
                                 "max_tries_per_object", "initial_backoff", "backoff_cap")},
    looked_up_by=("HttpGrid.pull_messages",),
    replacement="server/transport.py (pull_objects_by_deadline)",
    why="HttpGrid fetches a reply's arrays with retries after 1 s, 2 s, 4 s ... up to 2 h; a prompt pull "
        "meets an upload in progress on nearly every training reply. The replacement retries after 20 ms, "
        "doubling to 0.5 s, and gives up at the round's deadline (PromptGrid's send_and_receive).",
    written_for="1.42.0",
    flower_versions=("1.42", "1.43"),
)

SUPERNODE_REPLIES_IN_STEP = FlowerPatch(
    name="supernode-replies-in-step",
    module="flwr.supernode.start_client_internal",
    parameters={"_pull_and_store_message": ("state", "object_store", "node_config", "receive", "get_run", "get_fab",
                                            "pull_object", "confirm_message_received", "trusted_entities"),
                "_push_messages": ("state", "object_store", "send", "push_object")},
    looked_up_by=("start_client_internal",),
    replacement="client/supernode.py (RepliesInStep)",
    why="A stale reply of a stopped run made the SuperNode send every later reply one message late, and a "
        "resumed run waited its whole round-timeout. The replacements record the message just pulled and "
        "keep pushing until its reply has gone.",
    written_for="1.42.0",
    flower_versions=("1.42", "1.43"),
)

PATCHES = (SIMULATION_DISPATCH, HTTP_GRID_OBJECT_PULLS, SUPERNODE_REPLIES_IN_STEP)

# (module, attribute) -> (Flower's function, the replacement installed in its place)
_installed: dict[tuple[str, str], tuple[Callable[..., Any], Callable[..., Any]]] = {}


def installed_flower_version() -> str:
    return version("flwr")


def check_version(patch: FlowerPatch) -> None:
    """Raise ``FlowerPatchError`` unless the installed Flower is one ``patch`` was written for."""
    found = installed_flower_version()
    lowest, above = patch.flower_versions
    if _release(lowest) <= _release(found) < _release(above):
        return
    raise FlowerPatchError(
        f"clinicfl's Flower patch {patch.name!r} replaces {patch.attributes()}; it was written for Flower "
        f"{patch.written_for} (allowed: {patch.allowed()}), but Flower {found} is installed. Install the "
        f"tested Flower (the project's pin in pyproject.toml), or compare those functions in Flower {found}'s "
        f"source with the replacement in {patch.replacement}, adapt it, then widen flower_versions of "
        f"{patch.name!r} in common/flower_patches.py.")


def _release(version_text: str) -> tuple[int, ...]:
    """The release numbers of a version, padded to three: "1.43.0rc1" -> (1, 43, 0), "1.43" -> (1, 43, 0).
    A pre-release counts as its release, so it is refused where that release would be."""
    match = re.match(r"\d+(\.\d+)*", version_text)
    if match is None:
        raise FlowerPatchError(f"cannot read the Flower version {version_text!r}: reinstall flwr (pip show flwr)")
    numbers = tuple(int(number) for number in match.group(0).split("."))
    return numbers + (0,) * (3 - len(numbers))


def mismatches(patch: FlowerPatch, module: ModuleType) -> list[str]:
    """What in ``module`` no longer matches ``patch``: a missing function, other parameters, or a caller
    that no longer looks the function up by its module name (the patch would then change nothing)."""
    found = []
    for attribute, expected in patch.parameters.items():
        function = _flower_function(patch, module, attribute)
        if function is None:
            found.append(f"{patch.module}.{attribute} does not exist")
            continue
        parameters = tuple(inspect.signature(function).parameters)
        if parameters != expected:
            found.append(f"{patch.module}.{attribute} takes {parameters}, the patch expects {expected}")
    for caller in patch.looked_up_by:
        looker: Any = module
        for part in caller.split("."):
            looker = getattr(looker, part, None)
        names = getattr(getattr(looker, "__code__", None), "co_names", ())
        for attribute in patch.parameters:
            if attribute not in names:
                found.append(f"{patch.module}.{caller} does not look up {attribute}")
    return found


def apply(patch: FlowerPatch, replacements: Mapping[str, ReplacementFactory]) -> bool:
    """Replace each of ``patch``'s functions with ``replacements[attribute](flower_function)``; an
    attribute that already holds its replacement is left as it is, so applying twice patches once.
    Returns False when the patch is ``only_if_imported`` and this process has not imported its module
    (nothing is changed), else True. Raises ``FlowerPatchError`` on another Flower."""
    if set(replacements) != set(patch.parameters):
        raise ValueError(f"patch {patch.name!r} replaces {sorted(patch.parameters)}, given {sorted(replacements)}")
    if patch.only_if_imported and patch.module not in sys.modules:
        return False
    check_version(patch)
    module = importlib.import_module(patch.module)
    if problems := mismatches(patch, module):
        raise FlowerPatchError(
            f"clinicfl's Flower patch {patch.name!r} does not fit the installed Flower {installed_flower_version()}: "
            f"{'; '.join(problems)}. Compare with the replacement in {patch.replacement} and update the patch "
            f"in common/flower_patches.py.")
    for attribute, build in replacements.items():
        key = (patch.module, attribute)
        current = getattr(module, attribute)
        if key in _installed and _installed[key][1] is current:
            continue
        replacement = build(current)
        _installed[key] = (current, replacement)
        setattr(module, attribute, replacement)
    return True


def flower_function(patch: FlowerPatch, attribute: str) -> Callable[..., Any] | None:
    """Flower's own function behind one of ``patch``'s attributes, whether or not it is patched."""
    return _flower_function(patch, importlib.import_module(patch.module), attribute)


def _flower_function(patch: FlowerPatch, module: ModuleType, attribute: str) -> Callable[..., Any] | None:
    current = getattr(module, attribute, None)
    original, replacement = _installed.get((patch.module, attribute), (None, None))
    return original if current is not None and current is replacement else current
