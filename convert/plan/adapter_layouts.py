"""The planning half of every expert-LoRA layout: one module each (convert.plan.adapter_<layout>), next to its
detection module in convert.formats.adapter_layouts.

A plan module exposes `PATTERN` (the detected pattern it splits), `LAYOUT` (its fuse_adapter --layout name, None
when it is no fuse output), `SERVED_AS` (the targets' `expert_layout` that loads it as is, None when none does),
`NEEDS_FAMILY`, `words(g)`, `keeps(g)` (a target of its SERVED_AS takes the layer as it is), `split(b, g, family,
ep, rules)`; fuse outputs also `HOLDS_EXTRA_EXPERTS`, `a_stacks(family)`, `fuse(b, g, family, prefix, shared_a,
rules)`, `fuse_config`, `fuse_notes`, `written_config`; a layout a target loads also `split_config`. Its compute steps (piece
`regroup` objects) live in it. convert.plan.adapter dispatches through these tables only.
"""

from __future__ import annotations

from types import ModuleType

from convert.formats.adapter_layouts import PATTERNS
from convert.plan import adapter_grouped, adapter_peft, adapter_per_expert, adapter_shared_w123

MODULES: tuple[ModuleType, ...] = (adapter_per_expert, adapter_peft, adapter_grouped, adapter_shared_w123)
SPLIT = {m.PATTERN: m for m in MODULES}  # detected pattern -> its plan module
FUSE = {m.LAYOUT: m for m in MODULES if m.LAYOUT}  # fuse_adapter --layout -> its plan module
FUSED_LAYOUTS = tuple(FUSE)
SERVED = {m.SERVED_AS: m for m in MODULES if m.SERVED_AS}  # a target's expert_layout -> the module writing it
PER_EXPERT = adapter_per_expert.PATTERN
assert set(SPLIT) == set(PATTERNS), "every detected layout needs its plan module"
