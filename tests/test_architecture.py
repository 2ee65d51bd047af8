"""The package structure docs/ARCHITECTURE.md states: no import cycles, between modules or between packages,
and every dependency pointing down the layers.

    launch.batch, launch.manifest (the batch runner)
      -> entry points: convert/<command>.py, convert.cli, convert.kinds, convert.example
      -> convert/engine, convert/verify, convert/inspect
      -> convert/plan
      -> convert/formats, convert/targets
      -> convert/families
      -> convert/io
      -> convert.errors, convert.settings, convert.flag_types, convert.toplevel
      -> sharding/, the ranks' group (launch.dist, launch.local, launch.hub, launch.store)

A unit is a package under convert/ (its modules together), a top-level module of convert/, `sharding`, or one
of launch/'s two layers. Every module of the repository must belong to a layer: a new module is placed here.
Lazy imports count (the graph is read from every import statement), and so does convert.kinds' importlib of
the entry points it names.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Collection, Mapping
from pathlib import Path

from helpers import REPO

# Bottom to top. A unit may import its own layer's units (without a cycle between units) or lower layers.
LAYERS: list[tuple[str, ...]] = [
    ("sharding", "launch.group"),
    ("convert", "convert.errors", "convert.settings", "convert.flag_types", "convert.toplevel"),
    ("convert.io",),
    ("convert.families",),
    ("convert.formats", "convert.targets"),
    ("convert.plan",),
    ("convert.engine", "convert.verify", "convert.inspect"),
    ("convert.cli", "convert.kinds", "convert.example", "convert.fuse_experts", "convert.split_experts",
     "convert.fuse_adapter", "convert.split_adapter", "convert.merge_adapter"),
    ("launch.batch",),
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
# launch/ holds two layers: the ranks' group at the bottom (imports nothing from convert/) and the batch runner
# at the top (it runs the entry points through convert.kinds).
BATCH_RUNNER = {"launch.batch", "launch.manifest"}
# Upward imports that exist and are not yet fixed (issue 26), each an exact edge: the test fails on any other,
# and on one of these once it is gone (then delete it here). families.namings.apply_source_naming reads a
# convert.formats.checkpoint.Checkpoint: it belongs in formats/ or plan/ (its callers: engine.job, inspect.report).
KNOWN_UPWARD = {
    ("convert.families.namings", "convert.formats.checkpoint"),
    ("convert.families.namings", "convert.formats.safetensors"),
}


def unit(module: str) -> str:
    """The unit `module` belongs to (see the module docstring)."""
    parts = module.split(".")
    if parts[0] == "launch":
        return "launch.batch" if module in BATCH_RUNNER else "launch.group"
    if parts[0] == "convert" and len(parts) > 1:
        return ".".join(parts[:2])  # a package's modules, or a top-level module itself
    return parts[0]


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    """module -> modules of this repository it imports (anywhere in its body, lazy imports included)."""
    modules: dict[str, Path] = {}
    for top in ("convert", "launch", "sharding"):
        for path in (REPO / top).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: a relative import (write it absolute)"
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in modules else node.module
                    if target in modules:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    from convert.kinds import KINDS  # entry_point() imports these by name

    graph["convert.kinds"].update(KINDS.values())
    return {m: frozenset(ts) for m, ts in graph.items()}  # cached: read-only


def cycles(graph: Mapping[str, Collection[str]]) -> list[list[str]]:
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


def unit_graph(graph: Mapping[str, Collection[str]]) -> dict[str, set[str]]:
    """unit -> the other units its modules import."""
    units: dict[str, set[str]] = {unit(m): set() for m in graph}
    for m, targets in graph.items():
        units[unit(m)].update(unit(t) for t in targets if unit(t) != unit(m))
    return units


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_cycles_between_packages():
    """No two units import each other, directly or around a loop (convert/families <-> convert/formats would be one)."""
    graph = import_graph()
    known = {(unit(a), unit(b)) for a, b in KNOWN_UPWARD}
    units = unit_graph({m: {t for t in ts if (m, t) not in KNOWN_UPWARD} for m, ts in graph.items()})
    assert cycles(units) == []
    assert all(b in unit_graph(graph)[a] for a, b in known)


def test_every_module_has_a_layer():
    assert sorted({unit(m) for m in import_graph()} - set(LAYER)) == []


def test_dependencies_point_down():
    graph = import_graph()
    upward = sorted((m, t) for m, targets in graph.items() for t in targets if LAYER[unit(t)] > LAYER[unit(m)])
    assert [edge for edge in upward if edge not in KNOWN_UPWARD] == []
    assert sorted(KNOWN_UPWARD - set(upward)) == [], "fixed: remove these from KNOWN_UPWARD"


def test_the_bottom_layer_imports_nothing_from_convert():
    """sharding/ and the ranks' group (launch.dist, local, hub, store) import nothing from convert/; only the batch
    runner of launch/ does."""
    graph = import_graph()
    outside = sorted((m, t) for m, targets in graph.items() for t in targets
                     if unit(m) in ("sharding", "launch.group") and not t.startswith(("sharding", "launch")))
    assert outside == []
    assert sorted({m for m, targets in graph.items() if m.startswith("launch")
                   and any(t.startswith("convert") for t in targets)}) == sorted(BATCH_RUNNER)


def test_the_verifier_does_not_import_the_cli_or_the_planner():
    """convert/verify takes its launcher wrapper from convert.toplevel, not convert.cli (the conversions' flags),
    and from convert/plan only the adapter key naming (docs/ARCHITECTURE.md: what the verifier shares)."""
    graph = import_graph()
    used = {t for m, targets in graph.items() if unit(m) == "convert.verify" for t in targets}
    assert "convert.cli" not in used
    assert sorted(t for t in used if unit(t) == "convert.plan") == ["convert.plan.adapter_names"]


def test_the_layers_catch_a_new_top_level_module():
    assert unit("convert.new_tool") == "convert.new_tool" and "convert.new_tool" not in LAYER
    assert unit("convert.plan.base") == "convert.plan" and unit("launch.manifest") == "launch.batch"
    assert unit("launch.hub") == "launch.group" and unit("sharding.ep") == "sharding"


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
