"""Layout grouped (NeMo AutoModel `GroupedExpertsLoRA`): `P.experts.lora_gate_and_up_A` [E, H, r], `_B` [E, r, 2I],
`lora_down_A` [E, I, r], `_B` [E, r, H] (x @ A @ B: transposed relative to peft).

The tensor names are the format's own (one factor pair for the input projections stacked on the out dim, one for
the output projection), not a model's; which roles they hold comes from the family tables.
"""

from __future__ import annotations

import dataclasses
import re

from convert.errors import ConversionError
from convert.formats.adapter_layouts.context import Context, summary
from convert.formats.adapter_layouts.group import ExpertLoraGroup, LoraFactor
from convert.formats.safetensors import TensorInfo

NAME = "grouped"
EXAMPLE = ""
PRODUCER = "NeMo AutoModel GroupedExpertsLoRA (x @ A @ B)"
GROUPED_INPUTS, GROUPED_OUTPUT = "gate_and_up", "down"
_RX = re.compile(
    rf"^(?P<prefix>.+)\.experts\.lora_(?P<which>{GROUPED_INPUTS}|{GROUPED_OUTPUT})_(?P<f>[AB])(?:\.weight)?$"
)


def claim(name: str, info: TensorInfo, roles_of_proj: dict[str, str]) -> str | None:
    """The layer prefix (module path before `.experts`) of tensor `name` when it is of this layout, else None."""
    m = _RX.match(name)
    return m["prefix"] if m else None


def detect(ctx: Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    """The group of layer `prefix` from its tensors `items` (every one claimed by this layout)."""
    by: dict[tuple[str, str], TensorInfo] = {}
    for name, info in items.items():
        m = _RX.match(name)
        assert m
        if len(info.shape) != 3:
            raise ConversionError(
                f"{ctx.where}: tensor {name!r} has shape {list(info.shape)}; expected 3-D ([E, in, r] for A, [E, r, out] "
                "for B)"
            )
        by[(m["which"], m["f"])] = info
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors = []
    nums = set()
    inputs, outputs = ctx.sides()
    for which, roles in ((GROUPED_INPUTS, inputs), (GROUPED_OUTPUT, outputs[:1])):
        a, b = by.get((which, "A")), by.get((which, "B"))
        if a is None and b is None:
            continue
        if a is None or b is None:
            have = a or b
            assert have is not None  # not both: skipped above
            raise ConversionError(
                f"{ctx.where}: tensor {have.name!r} has no lora_{which}_{'B' if b is None else 'A'} partner in {prefix}"
            )
        e_a, inn, r = a.shape
        e_b, rb, out = b.shape
        if e_a != e_b or rb != r:
            raise ConversionError(
                f"{ctx.where}: tensor {b.name!r} has shape {list(b.shape)}; expected [{e_a}, {r}, out] to match "
                f"{a.name!r} {list(a.shape)} ([E, in, r])"
            )
        if out % len(roles):
            raise ConversionError(
                f"{ctx.where}: tensor {b.name!r} {list(b.shape)}: last dim {out} does not split into {len(roles)} "
                f"roles ({'/'.join(roles)})"
            )
        nums.add(e_a)
        for role in roles:
            role_rank[role], role_dims[role] = r, (out // len(roles), inn)
        factors.append(LoraFactor(a.name, roles, "A", None, a.shape, a.dtype))
        factors.append(LoraFactor(b.name, roles, "B", None, b.shape, b.dtype))
    if len(nums) != 1:
        raise ConversionError(f"{ctx.where}: layer {prefix}: grouped LoRA tensors disagree on the expert count {sorted(nums)}")
    group = summary(ctx, prefix, NAME, nums.pop(), role_rank, role_dims, factors,
                    needs_order=len(inputs) > 1 and inputs[0] in role_rank)
    return dataclasses.replace(group, producer=PRODUCER)
