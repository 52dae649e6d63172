"""The package's shape: no import cycles in src/bincount (the graph of which module imports which, lazy imports
inside functions included, since they are cycles all the same), and no module over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import bincount

ROOT = Path(bincount.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("bincount", *path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The bincount modules `name` imports (a package's __init__ counts only where it is the target)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    siblings = {p.stem for p in path.parent.glob("*.py")}
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in siblings and package.endswith(".container"):
                    targets.add(f"{package}.{alias.name}")  # container/ imports its siblings by bare name
                else:
                    targets.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from bincount.backends.sagemaker import jobs`: the module jobs
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != name}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with a cycle (Tarjan): each a set of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# Cycles that exist on main today, each with who removes it. The list may only shrink: a cycle not listed
# fails the test, and so does a listed one that has gone (remove its line).
KNOWN: dict[frozenset[str], str] = {}  # cycles waiting for their owner to remove them: none


def test_the_package_has_no_import_cycles():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "bincount.audit.core" in graph["bincount.backends.sagemaker.transform"]  # the graph sees real edges
    found = {frozenset(c) for c in cycles(graph)}
    assert not found - set(KNOWN), f"import cycles: {[sorted(c) for c in found - set(KNOWN)]}"
    assert not set(KNOWN) - found, f"gone, remove from KNOWN: {[sorted(c) for c in set(KNOWN) - found]}"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_source_file_is_over_600_lines():
    """A module that outgrows 600 lines has more than one job: split it along its seams."""
    long = {path.relative_to(ROOT).as_posix(): n for path in ROOT.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}
