"""What the installed package imports is what it declares: a fresh install of clinicfl (without the
``dev`` extra) must not fail on an import that only happened to be installed here."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations", "sitegate")


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module -> the files that import it (module level or inside a function)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _normalised(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """The dependencies and the optional extras a user installs on purpose (not ``dev``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for name, reqs in project.get("optional-dependencies", {}).items() if name != "dev" for r in reqs]
    return {_normalised(r) for r in [*project["dependencies"], *extras]}


def test_every_third_party_import_is_a_declared_dependency():
    distributions = packages_distributions()
    declared = _declared()
    # Distributions that come with a declared one (e.g. flwr's protobuf and grpc modules,
    # torch's own packages) count as declared only if a declared distribution requires them.
    from importlib.metadata import requires

    def closure(names: set[str]) -> set[str]:
        seen, todo = set(), list(names)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                todo += [_normalised(r) for r in (requires(name) or []) if "extra ==" not in r]
            except Exception:  # noqa: BLE001 - a declared name that is not installed is reported below
                continue
        return seen

    transitive = closure(declared)
    gaps = {}
    for module, files in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
            continue
        owners = {_normalised(d) for d in distributions.get(module, [])}
        assert owners, f"{module} (imported by {sorted(files)[0]}) is not installed at all"
        if not owners & declared:
            gaps[module] = (sorted(owners), sorted(files)[:3], "only transitively" if owners & transitive else "")
    assert not gaps, "imported but not declared in pyproject.toml [project] dependencies: " + "; ".join(
        f"{module} (distribution {', '.join(owners)}; {', '.join(files)}){' ' + note if note else ''}"
        for module, (owners, files, note) in gaps.items())
