"""The package structure the README states: no import cycles, and dependencies pointing one way.

entry points -> engine / verify / inspect -> plan -> families / formats -> io -> errors;
`sharding/` and `launch/dist.py` import nothing from `convert/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

# A package may import from its own level or below, never above.
LEVEL = {"io": 0, "families": 1, "formats": 1, "targets": 1, "plan": 2, "engine": 3, "verify": 3, "inspect": 3}


def import_graph() -> dict[str, set[str]]:
    """module -> modules of this repository it imports (anywhere in its body, lazy imports included)."""
    modules: dict[str, Path] = {}
    for top in ("convert", "launch", "sharding"):
        for path in (REPO / top).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in modules else node.module
                    if target in modules:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def level(module: str) -> int | None:
    parts = module.split(".")
    return LEVEL.get(parts[1]) if parts[0] == "convert" and len(parts) > 2 else None


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_dependencies_point_down():
    graph = import_graph()
    upward = [(m, t) for m, targets in graph.items() for t in targets
              if level(m) is not None and level(t) is not None and level(t) > level(m)]  # type: ignore[operator]
    assert upward == []
    outside = [(m, t) for m, targets in graph.items() for t in targets
               if (m.startswith("sharding") or m == "launch.dist") and t.startswith("convert")]
    assert outside == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_environment_variable_is_documented():
    """docs/ENVIRONMENT.md lists exactly the MOE_CONVERT_* variables the code reads."""
    import re

    used = set()
    for top in ("convert", "launch", "sharding"):
        for path in (REPO / top).rglob("*.py"):
            used |= set(re.findall(r"MOE_CONVERT_[A-Z0-9_]+", path.read_text()))
    documented = set(re.findall(r"`(MOE_CONVERT_[A-Z0-9_]+)`", (REPO / "docs" / "ENVIRONMENT.md").read_text()))
    assert used - documented == set(), f"read by the code but not in docs/ENVIRONMENT.md: {sorted(used - documented)}"
    assert documented - used == set(), f"in docs/ENVIRONMENT.md but read nowhere: {sorted(documented - used)}"
