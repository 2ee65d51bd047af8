"""Layout per_expert (convert.formats.adapter_layouts.per_expert), planning: the layout every other one splits to.

split: its pairs are copied (or cast) under the target's names; with the target's `all_roles`, zero pairs stand in
for the projections a layer lacks. It is no fuse output (the fused layouts are built from it). No compute step.
"""

from __future__ import annotations

from typing import Any

from convert.families import Family
from convert.formats.adapter_layouts import ExpertLoraGroup
from convert.formats.adapter_layouts.per_expert import NAME
from convert.plan.adapter_build import Builder, family_prefix, proj_name, zero_per_expert
from convert.targets.rules import TargetRules

PATTERN = NAME
LAYOUT = None  # fuse_adapter writes no per-expert output: split_adapter does
SERVED_AS = "per_expert"  # the targets' expert_layout that loads it as is
NEEDS_FAMILY = False  # split without the base model's family (its names pass through)


def words(g: ExpertLoraGroup) -> str:
    """The layout of `g` in words."""
    return g.pattern


def keeps(g: ExpertLoraGroup) -> bool:
    """Whether a target loading this layout takes `g` as it is."""
    return True


def split(b: Builder, g: ExpertLoraGroup, family: Family | None, ep: int, rules: TargetRules) -> None:
    """Layer `g` under the target's names, each tensor one expert's piece; zero pairs where the target needs them."""
    # a per_expert group's factors each have their expert (never None here)
    b.passthrough(sorted(f.name for f in g.factors), {f.name: int(f.expert) for f in g.factors})  # type: ignore[arg-type]
    if family is not None and rules.all_roles:
        zero_per_expert(b, g, family, family_prefix(family, g.prefix, b.where, b.names), rules)


def split_config(config: dict[str, Any], family: Family, roles: list[str], names: Any) -> dict[str, Any]:
    """adapter_config.json edits of a split output in this layout: target_modules gains each projection's leaf."""
    return {"target_modules_add": [proj_name(family, r, names) for r in roles], "target_parameters": None}
