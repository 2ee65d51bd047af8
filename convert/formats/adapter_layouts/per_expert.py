"""Layout per_expert: `P.experts.{e}.<proj>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], one pair per expert
and projection (what vLLM and SGLang read for most MoE models; what ART and Megatron export).

`<proj>` is a per-expert projection name of the family tables (configs/families), never one named here.
"""

from __future__ import annotations

import re

from convert.errors import ConversionError
from convert.formats.adapter_layouts.context import Context, summary
from convert.formats.adapter_layouts.group import ExpertLoraGroup, LoraFactor
from convert.formats.safetensors import TensorInfo

NAME = "per_expert"
EXAMPLE = "'<layer>.experts.{e}.<projection>.lora_A.weight' [r, in]"
_RX = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.lora_(?P<f>[AB])\.weight$")


def claim(name: str, info: TensorInfo, roles_of_proj: dict[str, str]) -> str | None:
    """The layer prefix (module path before `.experts`) of tensor `name` when it is of this layout, else None."""
    m = _RX.match(name)
    return m["prefix"] if m and m["proj"] in roles_of_proj else None


def detect(ctx: Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    """The group of layer `prefix` from its tensors `items` (every one claimed by this layout)."""
    by: dict[tuple[str, int, str], TensorInfo] = {}
    for name, info in items.items():
        m = _RX.match(name)
        assert m
        role = ctx.roles_of_proj[m["proj"]]
        key = (role, int(m["e"]), m["f"])
        if key in by:
            raise ConversionError(
                f"{ctx.where}: tensors {by[key].name!r} and {name!r} are both the {role} lora_{m['f']} of expert "
                f"{m['e']} of {prefix}"
            )
        if len(info.shape) != 2:
            raise ConversionError(
                f"{ctx.where}: tensor {name!r} has shape {list(info.shape)}; expected 2-D ([r, in] for lora_A, [out, r] "
                "for lora_B)"
            )
        by[key] = info
    roles = sorted({k[0] for k in by}, key=ctx.roles.index)
    top = {role: max(k[1] for k in by if k[0] == role) + 1 for role in roles}
    plain = [top[r] for r in roles if not ctx.extra_key(r)]
    num = max(plain or top.values())
    counts = {r: max(top[r], num) if ctx.extra_key(r) else num for r in roles}
    if ctx.base_experts is not None:
        for role in roles:
            want = (ctx.role_counts or {}).get(role, ctx.base_experts)
            if top[role] > want:
                raise ConversionError(
                    f"{ctx.where}: layer {prefix} has LoRA for expert {top[role] - 1}, but --base-config says "
                    f"{want} experts" + (f" for role {role} (E + {ctx.extra_key(role)})" if want != ctx.base_experts else "")
                    + ctx.other_table(top)
                )
            counts[role] = want
        num = ctx.base_experts
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors = []
    for role in roles:
        for e in range(counts[role]):
            a, b = by.get((role, e, "A")), by.get((role, e, "B"))
            if a is None or b is None:
                other = by.get((role, e, "B" if a is None else "A")) or next(iter(by.values()))
                raise ConversionError(
                    f"{ctx.where}: layer {prefix}: the {role} lora_{'A' if a is None else 'B'} of expert {e} is missing "
                    f"(found e.g. {other.name!r}; expected all {counts[role]} experts)"
                )
            r, inn = a.shape
            out, rb = b.shape
            if rb != r:
                raise ConversionError(
                    f"{ctx.where}: tensor {b.name!r} has shape {list(b.shape)}; expected [out, {r}] to match "
                    f"{a.name!r} {list(a.shape)}"
                )
            if role not in role_rank:
                role_rank[role], role_dims[role] = r, (out, inn)
            elif (r, (out, inn)) != (role_rank[role], role_dims[role]):
                raise ConversionError(
                    f"{ctx.where}: tensor {a.name!r}: expert {e}'s {role} LoRA has rank {r} for [out, in] = [{out}, {inn}]"
                    f", but expert 0 has rank {role_rank[role]} for {list(role_dims[role])}; experts must agree"
                )
            factors.append(LoraFactor(a.name, (role,), "A", e, a.shape, a.dtype))
            factors.append(LoraFactor(b.name, (role,), "B", e, b.shape, b.dtype))
    return summary(ctx, prefix, "per_expert", num, role_rank, role_dims, factors, needs_order=False,
                    role_experts=ctx.role_experts(num, counts))

