"""Layout shared_w123: 3-D `P.experts.<proj>.lora_A.weight` [1|E, r, in] and `.lora_B.weight` [E|1, out, r]; a dim 0 of
1 is shared by every expert (delta_e = B[e or 0] @ A[e or 0]).

Two producers' variants of it, told apart by which factors are shared (`variant`, named by convert.inspect):
- shared-outer (Tinker, Megatron-Bridge, SkyRL; SGLang loads it natively): the input projections' lora_A and the
  output projection's lora_B are shared, the other factors per expert;
- Tinker's general 3-D w1/w2/w3 (tinker-cookbook 0.6.1 `weights/_merge.py` `expand_expert_lora_tensors`): either
  factor of any projection may have 1 expert, broadcast to E.
`<proj>` is a per-expert projection name of the family tables (w1/w2/w3 or gate_proj/...), never one named here.
"""

from __future__ import annotations

import dataclasses
import re

from convert.errors import ConversionError
from convert.formats.adapter_layouts.context import Context, summary
from convert.formats.adapter_layouts.group import ExpertLoraGroup, LoraFactor
from convert.formats.safetensors import TensorInfo

NAME = "shared_w123"
EXAMPLE = "3-D [E|1, r, in] factors"
_RX = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<proj>[A-Za-z0-9_]+)\.lora_(?P<f>[AB])\.weight$")
SHARED_OUTER = "shared-outer (input projections' lora_A and the output projection's lora_B shared by every expert: " \
               "Tinker, Megatron-Bridge, SkyRL)"
BROADCAST = "3-D w1/w2/w3 with a factor of 1 expert broadcast to every expert (Tinker)"
PER_EXPERT_3D = "3-D w1/w2/w3, every factor per expert"


def claim(name: str, info: TensorInfo, roles_of_proj: dict[str, str]) -> str | None:
    """The layer prefix (module path before `.experts`) of tensor `name` when it is of this layout, else None."""
    m = _RX.match(name)
    return m["prefix"] if m and m["proj"] in roles_of_proj and len(info.shape) == 3 else None


def variant(ctx: Context, group: ExpertLoraGroup) -> str:
    """Which producer's variant `group` is, in words: shared-outer, Tinker's broadcast, or nothing shared."""
    shared = {(f.roles[0], f.factor) for f in group.factors if f.shared}
    if not shared:
        return PER_EXPERT_3D
    outer = {(r, "B" if ctx.is_output(r) else "A") for r in group.roles}
    return SHARED_OUTER if shared == outer else BROADCAST


def detect(ctx: Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    """The group of layer `prefix` from its tensors `items` (every one claimed by this layout)."""
    by: dict[tuple[str, str], TensorInfo] = {}
    for name, info in items.items():
        m = _RX.match(name)
        assert m
        role = ctx.roles_of_proj[m["proj"]]
        if (role, m["f"]) in by:
            raise ConversionError(f"{ctx.where}: tensors {by[(role, m['f'])].name!r} and {name!r} are both {role} lora_{m['f']}")
        by[(role, m["f"])] = info
    roles = sorted({r for r, _ in by}, key=ctx.roles.index)
    dim0 = {info.shape[0] for info in by.values()} - {1}
    if len(dim0) > 1:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: 3-D expert LoRA tensors have dim 0 in {sorted(dim0 | {1})}; expected 1 (shared) "
            "or the number of experts E"
        )
    num = dim0.pop() if dim0 else ctx.base_experts
    if num is None:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: every 3-D expert LoRA tensor has dim 0 = 1, so the number of experts is "
            "unknown; pass --base-config"
        )
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors = []
    for role in roles:
        a, b = by.get((role, "A")), by.get((role, "B"))
        if a is None or b is None:
            have = a or b
            assert have is not None  # `roles` are those of `by`: each has one of them
            raise ConversionError(
                f"{ctx.where}: tensor {have.name!r} has no lora_{'B' if b is None else 'A'} partner in layer {prefix}"
            )
        _, r, inn = a.shape
        _, out, rb = b.shape
        if rb != r:
            raise ConversionError(
                f"{ctx.where}: tensor {b.name!r} has shape {list(b.shape)}; expected [E or 1, out, {r}] to match "
                f"{a.name!r} {list(a.shape)} ([E or 1, r, in])"
            )
        role_rank[role], role_dims[role] = r, (out, inn)
        factors.append(LoraFactor(a.name, (role,), "A", None, a.shape, a.dtype, shared=a.shape[0] == 1 and num != 1))
        factors.append(LoraFactor(b.name, (role,), "B", None, b.shape, b.dtype, shared=b.shape[0] == 1 and num != 1))
    group = summary(ctx, prefix, NAME, num, role_rank, role_dims, factors, needs_order=False)
    return dataclasses.replace(group, producer=variant(ctx, group))

