"""The package layout holds: no import cycles, dependencies run one way, no library module parses flags."""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1] / "zscir"

# Lower layers never import higher ones (lazy imports inside functions included).
LAYERS = [
    {"zscir.config", "zscir.registry", "zscir.checkpoint", "zscir.losses", "zscir.precision", "zscir.viz",
     "zscir.runs", "zscir.hub"},
    {"zscir.models", "zscir.data", "zscir.shapes", "zscir.search"},
    {"zscir.composer"},
    {"zscir.train", "zscir.eval"},
    {"zscir.demo", "zscir.serve"},
    {"zscir.cli", "zscir.__main__"},
]


def module_name(path: Path) -> str:
    """Dotted module name of a file under the package root."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def package_modules() -> Dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` tests TYPE_CHECKING (bare or as typing.TYPE_CHECKING)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Package modules that `name` imports anywhere in its file (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: Set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    # imports only for type checkers are not run-time dependencies
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "zscir":
                found.add(target)
    return found


@functools.lru_cache(maxsize=None)
def import_graph() -> Dict[str, Set[str]]:
    """Module -> package modules it imports."""
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(name: str) -> int:
    """Index of the layer a module belongs to."""
    for index, layer in enumerate(LAYERS):
        if any(name == top or name.startswith(top + ".") for top in layer):
            return index
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py: add it where it belongs")


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_real_imports():
    graph = import_graph()
    assert "zscir.models.backbone" in graph["zscir.composer"]
    assert "zscir.composer" in graph["zscir.train.stage2"]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exports its own submodules; that is not a cycle of the design
    design = {v: {w for w in ws if not (v.startswith(w + ".") and package_modules()[w].name == "__init__.py")}
              for v, ws in graph.items()}
    assert cycles(design) == []


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_dependencies_run_one_way(name):
    if name == "zscir":
        return
    graph = import_graph()
    upward = sorted(t for t in graph[name] if layer_of(t) > layer_of(name))
    assert not upward, f"{name} (layer {layer_of(name)}) imports higher layers: {upward}"


def test_only_cli_parses_flags():
    offenders = []
    for name, path in package_modules().items():
        if name.startswith("zscir.cli"):
            continue
        text = path.read_text()
        if "import argparse" in text or "add_argument(" in text or "argparse.Namespace" in text:
            offenders.append(name)
    assert offenders == []
