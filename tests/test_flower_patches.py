"""common/flower_patches.py: the Flower-internal functions clinicfl replaces are still there, with
the signatures the replacements expect, and a patch refuses a Flower it was not written for."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest

from common import flower_patches
from common.flower_patches import PATCHES, SUPERNODE_REPLIES_IN_STEP, FlowerPatch, FlowerPatchError


@pytest.mark.parametrize("patch", PATCHES, ids=lambda patch: patch.name)
def test_each_patched_function_exists_in_the_installed_flower_as_the_patch_expects(patch: FlowerPatch):
    flower_patches.check_version(patch)
    assert flower_patches.mismatches(patch, importlib.import_module(patch.module)) == []


def _fake_flower(monkeypatch, source: str) -> FlowerPatch:
    """A module standing for a Flower release, and a patch of its ``step`` called by its ``loop``."""
    module = ModuleType("fake_flower_release")
    exec(source, module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return FlowerPatch(name="fake-step", module=module.__name__, parameters={"step": ("state", "send")},
                       looked_up_by=("loop",), replacement="nowhere", why="a test", written_for="1.42.0",
                       flower_versions=("1.42", "1.43"))


def test_a_renamed_parameter_or_a_caller_that_binds_the_function_otherwise_is_found(monkeypatch):
    patch = _fake_flower(monkeypatch, "def step(state, push):\n    pass\n"
                                      "def loop(step=step):\n    step(None, None)\n")
    module = sys.modules[patch.module]
    flower_step = module.step
    assert flower_patches.mismatches(patch, module) == [
        "fake_flower_release.step takes ('state', 'push'), the patch expects ('state', 'send')",
        "fake_flower_release.loop does not look up step"]
    with pytest.raises(FlowerPatchError, match="does not fit the installed Flower"):
        flower_patches.apply(patch, {"step": lambda flower_step: flower_step})
    assert module.step is flower_step  # nothing was replaced


@pytest.mark.parametrize("found", ["1.43.0", "1.43.0rc1", "1.41.2", "2.0"])
def test_another_flower_version_is_refused_with_what_to_do(monkeypatch, found: str):
    from flwr.supernode import start_client_internal as flower

    monkeypatch.setattr(flower_patches, "installed_flower_version", lambda: found)
    before = flower._push_messages, flower._pull_and_store_message
    with pytest.raises(FlowerPatchError) as refused:
        flower_patches.apply(SUPERNODE_REPLIES_IN_STEP, {"_pull_and_store_message": lambda flower_pull: print,
                                                         "_push_messages": lambda flower_push: print})
    message = str(refused.value)
    for part in ("'supernode-replies-in-step'", "flwr.supernode.start_client_internal._push_messages",
                 "written for Flower 1.42.0", ">=1.42,<1.43", f"Flower {found} is installed",
                 "client/supernode.py", "widen flower_versions"):
        assert part in message
    assert (flower._push_messages, flower._pull_and_store_message) == before  # nothing was replaced


def test_applying_twice_patches_once(monkeypatch):
    from flwr.supernode import start_client_internal as flower

    flower_pull, flower_push = flower._pull_and_store_message, flower._push_messages
    monkeypatch.setattr(flower, "_pull_and_store_message", flower_pull)  # restored after the test
    monkeypatch.setattr(flower, "_push_messages", flower_push)
    built: list[object] = []

    def wrapping(flower_function):  # noqa: ANN001, ANN202
        built.append(flower_function)
        return lambda **kwargs: flower_function(**kwargs)

    replacements = {"_pull_and_store_message": wrapping, "_push_messages": wrapping}
    assert flower_patches.apply(SUPERNODE_REPLIES_IN_STEP, replacements)
    first = flower._pull_and_store_message, flower._push_messages
    assert flower_patches.apply(SUPERNODE_REPLIES_IN_STEP, replacements)
    assert (flower._pull_and_store_message, flower._push_messages) == first
    assert built == [flower_pull, flower_push], "each replacement wraps Flower's function, once"
    assert flower_patches.flower_function(SUPERNODE_REPLIES_IN_STEP, "_push_messages") is flower_push
    assert flower_patches.mismatches(SUPERNODE_REPLIES_IN_STEP, flower) == []  # checked behind the replacement


@pytest.mark.parametrize("found", ["1.42.0", "1.42.7", "1.42.1.dev3"])
def test_a_release_of_the_patched_line_is_accepted(monkeypatch, found: str):
    monkeypatch.setattr(flower_patches, "installed_flower_version", lambda: found)
    flower_patches.check_version(SUPERNODE_REPLIES_IN_STEP)


def test_a_patch_needs_a_replacement_for_each_function_it_names():
    with pytest.raises(ValueError, match="_push_messages"):
        flower_patches.apply(SUPERNODE_REPLIES_IN_STEP, {"_pull_and_store_message": lambda flower_pull: print})
