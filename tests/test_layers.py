"""The import direction between the packages: common/ is the base both sides share, client/ and
server/ never import each other, and the site's gate (sitegate/) imports nothing of the app it
vets. Checked on the source, every import (module level or inside a function) counts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations", "sitegate", "benchmarks")

# package -> the project packages it must never import
FORBIDDEN = {
    "common": {"client", "server", "simulations", "sitegate", "benchmarks", "tests"},
    "client": {"server", "simulations", "benchmarks", "tests"},
    "server": {"client", "simulations", "benchmarks", "tests"},
    "sitegate": {"common", "client", "server", "simulations", "benchmarks", "tests"},
    "simulations": {"benchmarks", "tests"},
    "benchmarks": {"tests"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _project_imports() -> dict[str, list[tuple[str, str]]]:
    """package -> [(file:line, imported project module)]."""
    edges: dict[str, list[tuple[str, str]]] = {package: [] for package in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in _imports(path):
                if module.split(".")[0] in (*PACKAGES, "tests"):
                    edges[package].append((f"{path.relative_to(ROOT)}:{line}", module))
    return edges


def test_packages_import_only_downwards():
    wrong = [f"{where} imports {module}" for package, edges in _project_imports().items()
             for where, module in edges if module.split(".")[0] in FORBIDDEN[package]]
    assert not wrong, "imports against the direction common <- client | server <- simulations:\n" + "\n".join(wrong)


def test_no_module_of_the_app_imports_itself_in_a_cycle():
    """Modules of the app (common, client, server) form no import cycle (e.g. predict <-> pacs)."""
    graph: dict[str, set[str]] = {}
    for package in ("common", "client", "server"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[name] = {module for _, module in _imports(path) if module.split(".")[0] in ("common", "client",
                                                                                             "server")}
    modules = set(graph)
    graph = {name: {m for m in targets if m in modules and m != name} for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
