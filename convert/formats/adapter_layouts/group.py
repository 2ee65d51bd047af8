"""What detection finds: one expert-LoRA group per MoE layer, the source tensors with their meaning.

Shared by every layout module (convert.formats.adapter_layouts.<layout>); names no layout's keys and no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from convert.formats.lora_producers import IN_OUT, RANK_MAJOR

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactor:
    """One source tensor of an expert-LoRA group.

    `roles`: the roles whose LoRA factor it holds (("gate", "up") for a fused gate_up factor);
    `factor`: "A" or "B"; `expert`: the expert of a per_expert tensor, else None (all experts);
    `shared`: shared_w123 factor with dim 0 = 1 (the same for every expert).
    """

    name: str
    roles: tuple[str, ...]
    factor: str
    expert: int | None
    shape: tuple[int, ...]
    dtype: str
    shared: bool = False


@dataclass(frozen=True)
class ExpertLoraGroup:
    """The expert LoRA of one MoE layer.

    `prefix`: module path before ".experts" (e.g. "base_model.model.model.layers.3.mlp");
    `rank`: per-expert rank r (the largest over roles; peft's saved tensors have E*r);
    `role_rank`: (role, r) per role; `role_dims`: (role, (out, in)) of one expert's delta;
    `factors`: every source tensor with its meaning; `family`: the family name when known;
    `fused_order`: how a factor holding several roles stacks them on its out dim, as the family's
    fused tensor does: "concat" (halves) or "interleave" (role j = rows j::k); None when no factor
    holds several roles or the family is unknown;
    `target_param`: (role tuple, parameter name) of each peft wrapper, innermost first (the
    family's fused tensors, e.g. qwen3_moe's two wrappers of its 2-role and 1-role tensors);
    `role_experts`: (role, count) of roles held by more experts than `num_experts` (E), the
    family's `extra_experts` (e.g. a fused gate_up of E + zero experts); every other role has E;
    `orientation`/`b_order` (peft wrappers only, convert.formats.lora_producers): "in_out" (peft >= 0.19.1:
    lora_A [E*r, in], lora_B [out, E*r]) or "out_in" (older: lora_A [E*r, out], lora_B [in, E*r], the
    expert's delta the transpose of B_e @ A_e), and lora_B's columns "rank_major" (peft's B.view(., r, E))
    or "expert_major" (B.view(., E, r)); `producer`: what was found, in words (inspect shows it).
    """

    prefix: str
    pattern: str
    num_experts: int
    rank: int
    roles: tuple[str, ...]
    dtypes: tuple[str, ...]
    tensors: tuple[str, ...]
    role_rank: tuple[tuple[str, int], ...] = ()
    role_dims: tuple[tuple[str, tuple[int, int]], ...] = ()
    factors: tuple[LoraFactor, ...] = ()
    family: str | None = None
    fused_order: str | None = None
    target_param: tuple[tuple[tuple[str, ...], str], ...] = ()
    role_experts: tuple[tuple[str, int], ...] = ()
    orientation: str = IN_OUT
    b_order: str = RANK_MAJOR
    producer: str = ""

    def experts_of(self, role: str) -> int:
        """How many experts hold `role`'s LoRA: E, or more for a role of the family's `extra_experts`."""
        return dict(self.role_experts).get(role, self.num_experts)

    @property
    def slots(self) -> int:
        """How many experts hold at least one role (E unless some role has extra experts)."""
        return max([self.num_experts, *(n for _, n in self.role_experts)])

    def rank_of(self, role: str) -> int:
        """The per-expert rank of `role`."""
        return dict(self.role_rank)[role]

    def dims_of(self, role: str) -> tuple[int, int]:
        """(out, in) of one expert's `role` projection."""
        return dict(self.role_dims)[role]

    def factor(self, roles: tuple[str, ...], which: str, expert: int | None = None) -> LoraFactor:
        """The source factor `which` ("A"/"B") holding `roles` (of `expert` for per_expert groups)."""
        for f in self.factors:
            if f.roles == roles and f.factor == which and f.expert == expert:
                return f
        raise KeyError((roles, which, expert))


def pattern_value(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """peft's `rank_pattern`/`alpha_pattern` lookup: the first pattern matching the end of `key`."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def module_key(prefix: str, *rest: str) -> str:
    """The module name peft matches patterns against: without `base_model.model.`."""
    name = ".".join((prefix, *rest))
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
