"""What every layout's detection shares: the adapter's evidence (configs, base sizes, family) and the checks every
expert-LoRA group passes whatever its layout (`summary`: shapes against the base config and between roles)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families import Family, load_families
from convert.formats.adapter_layouts.group import ExpertLoraGroup, LoraFactor
from convert.formats.adapter_layouts.tables import FamilyGuess, fused_order, lora_roles, output_role, role_order


@dataclass
class Context:
    where: str
    adapter_config: dict[str, Any]
    guess: FamilyGuess
    hidden: int | None
    inter: int | None
    base_experts: int | None
    roles_of_proj: dict[str, str]
    role_counts: dict[str, int] | None = None  # role -> experts holding it, from --base-config (E + extra_experts)
    base_config: dict[str, Any] | None = None
    packings: bool = False  # the caller reads peft wrappers in any packing (orientation, lora_B order)

    def other_table(self, found: dict[str, int]) -> str:
        """A hint naming another release's table whose expert counts are `found` (role -> experts), else ""."""
        from convert.families.registry import other_table_fits

        if self.guess.family is None or not self.base_config:
            return ""
        return other_table_fits(self.guess.family, self.base_config, found)

    @property
    def family_name(self) -> str | None:
        return self.guess.family.name if self.guess.family else None

    @property
    def families(self) -> list[Family]:
        """The family when known, else every family (whose names the adapter may use)."""
        return [self.guess.family] if self.guess.family else list(load_families().values())

    @property
    def order(self) -> str | None:
        return fused_order(self.guess.family) if self.guess.family else None

    @property
    def roles(self) -> tuple[str, ...]:
        return role_order(self.guess.family)

    def is_output(self, role: str) -> bool | None:
        """Whether `role` maps intermediate -> hidden; None when the families disagree."""
        outs = {output_role(f) == role for f in self.families if role in lora_roles(f)}
        return outs.pop() if len(outs) == 1 else None

    def sides(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input roles, output roles) in order: hidden -> intermediate, and back."""
        return (tuple(r for r in self.roles if self.is_output(r) is False),
                tuple(r for r in self.roles if self.is_output(r)))

    def expected(self, role: str) -> tuple[int | None, int | None]:
        """(out, in) of `role` from the base config, None where unknown."""
        output = self.is_output(role)
        if output is None:
            return None, None
        if output:
            return self.hidden, self.inter
        return self.inter, self.hidden

    def extra_key(self, role: str) -> str | None:
        """The config key of the extra experts holding `role` (the family's `extra_experts`), None when it has none."""
        return self.guess.family.extra_experts.get(role) if self.guess.family else None

    def role_experts(self, num: int, found: dict[str, int]) -> tuple[tuple[str, int], ...]:
        """(role, count) of the roles held by more than `num` experts: `found` (detected), --base-config's counts."""
        merged = {**(self.role_counts or {}), **found}
        return tuple((r, n) for r, n in merged.items() if n != num)

    def check_experts(self, prefix: str, num: int, name: str) -> None:
        if self.base_experts is not None and num != self.base_experts:
            raise ConversionError(
                f"{self.where}: tensor {name!r} gives layer {prefix} {num} experts, "
                f"but --base-config says {self.base_experts}"
            )


def natural(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def summary(
    ctx: Context, prefix: str, pattern: str, num: int, role_rank: dict[str, int], role_dims: dict[str, tuple[int, int]],
    factors: list[LoraFactor], needs_order: bool, target_param: tuple[tuple[tuple[str, ...], str], ...] = (),
    role_experts: tuple[tuple[str, int], ...] = (),
) -> ExpertLoraGroup:
    for role, (out, inn) in role_dims.items():
        want_out, want_in = ctx.expected(role)
        if (want_out is not None and out != want_out) or (want_in is not None and inn != want_in):
            example = next(f for f in factors if role in f.roles)
            raise ConversionError(
                f"{ctx.where}: tensor {example.name!r}: the {role} projection of layer {prefix} is [out={out}, in={inn}], "
                f"but --base-config says [out={want_out}, in={want_in}]"
            )
    inputs = [r for r in ctx.roles if r in role_dims and ctx.is_output(r) is False]
    outputs = [r for r in ctx.roles if r in role_dims and ctx.is_output(r)]
    for first, r in zip(inputs, inputs[1:]):
        if role_dims[r] != role_dims[first]:
            raise ConversionError(
                f"{ctx.where}: layer {prefix}: {first} LoRA is for [out, in] = {list(role_dims[first])} but {r} LoRA "
                f"for {list(role_dims[r])}; expected the same shape"
            )
    for out_role in outputs:
        for r in inputs[:1]:
            if tuple(reversed(role_dims[r])) != role_dims[out_role]:
                raise ConversionError(
                    f"{ctx.where}: layer {prefix}: {out_role} LoRA is for [out, in] = {list(role_dims[out_role])}, "
                    f"expected {list(reversed(role_dims[r]))} (the transpose of {r})"
                )
    ctx.check_experts(prefix, num, factors[0].name)
    roles = tuple(r for r in ctx.roles if r in role_rank)
    return ExpertLoraGroup(
        prefix=prefix, pattern=pattern, num_experts=num, rank=max(role_rank.values()), roles=roles,
        dtypes=tuple(sorted({f.dtype for f in factors})), tensors=tuple(sorted(f.name for f in factors)),
        role_rank=tuple((r, role_rank[r]) for r in roles), role_dims=tuple((r, role_dims[r]) for r in roles),
        factors=tuple(factors), family=ctx.family_name, fused_order=ctx.order if needs_order else None,
        target_param=target_param, role_experts=role_experts,
    )

