"""The layer rules of docs/ARCHITECTURE.md hold: no import goes up a layer, and there are no import cycles.

Imports inside functions count too (that is how cycles used to be hidden), and so do absolute ``sora_ds.`` imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "sora_ds"

# Which layer (folder of sora_ds) may import which; the same table as docs/ARCHITECTURE.md.
MAY_IMPORT = {
    "engine": set(),
    "data": set(),
    "adapters": {"engine"},
    "recipe": {"engine", "data", "adapters"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Dotted names inside sora_ds that ``node`` imports ('' is the package root)."""
    if node.level == 0:
        if not (node.module or "").startswith("sora_ds"):
            return []
        base = node.module.removeprefix("sora_ds").lstrip(".")
    else:
        here = importer.split(".") if importer else []
        package = here if is_package else here[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    if node.module is None or node.level == 0 and base == "":
        return [f"{base}.{a.name}".lstrip(".") for a in node.names]  # `from . import x`: x may be a module
    return [base]


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                deps |= {d for d in resolve(name, path.name == "__init__.py", node) if d in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("sora_ds.") for a in node.names if a.name.removeprefix("sora_ds.") in modules}
        graph[name] = deps - {name}
    return graph


def layer(module: str) -> str:
    return module.split(".")[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in graph.items():
        if module == "":  # the package's own __init__ re-exports the public API of every layer
            continue
        for dep in deps:
            if dep == "" or layer(dep) != layer(module) and layer(dep) not in MAY_IMPORT[layer(module)]:
                bad.append(f"{module} -> {dep}")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_every_module_is_in_a_layer():
    graph = import_graph()
    assert {layer(m) for m in graph} == set(MAY_IMPORT) | {""}, "a module outside the four layers"
    assert "engine" in graph["adapters.export"] or "engine.atomic" in graph["adapters.export"]  # the parse sees imports


def test_no_import_goes_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_catches_an_upward_import():
    graph = {"engine.deepspeed": {"adapters.layer"}, "adapters.layer": {"engine"}, "recipe.train": {"data.chat"}}
    assert upward_imports(graph) == ["engine.deepspeed -> adapters.layer"]
    assert upward_imports({"data.chat": {"adapters.prox"}}) == ["data.chat -> adapters.prox"]


def test_relative_imports_resolve_to_modules():
    tree = ast.parse("from ..engine import gathered\nfrom .layer import X\nfrom . import layer\nfrom sora_ds.data import chat")
    nodes = [n for n in tree.body]
    assert resolve("adapters.compact", False, nodes[0]) == ["engine"]
    assert resolve("adapters.compact", False, nodes[1]) == ["adapters.layer"]
    assert resolve("adapters", True, nodes[2]) == ["adapters.layer"]
    assert resolve("recipe.train", False, nodes[3]) == ["data"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
