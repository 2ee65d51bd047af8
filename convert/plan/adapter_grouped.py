"""Layout grouped (convert.formats.adapter_layouts.grouped, NeMo AutoModel `GroupedExpertsLoRA`), planning and compute.

split: each expert's [in, r] / [r, out] slice of a factor is transposed to nn.Linear form (GroupedSlice); fuse
(`--layout grouped`): each expert's pairs transposed into its slice (GroupedBuild), the input projections sharing
one lora_A (refused where their per-expert lora_A differ).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families import Family
from convert.formats.adapter_layouts import ExpertLoraGroup, fused_order, lora_tensors, module_key, output_role
from convert.formats.adapter_layouts.grouped import GROUPED_INPUTS, GROUPED_OUTPUT, NAME
from convert.formats.safetensors import DTYPE_SIZES
from convert.plan.adapter_build import (
    Builder,
    block_read,
    expert_outputs,
    family_prefix,
    group_scale,
    input_roles,
    zero_per_expert,
)
from convert.plan.adapter_transforms import merge_rows, part_rows, torch_dtype
from convert.plan.base import Piece, Write
from convert.plan.transforms import from_bytes, to_bytes
from convert.targets.rules import TargetRules

PATTERN = NAME
LAYOUT = NAME  # fuse_adapter --layout grouped
SERVED_AS = None  # loaded by no target
NEEDS_FAMILY = True
HOLDS_EXTRA_EXPERTS = False  # one expert count per layer


def words(g: ExpertLoraGroup) -> str:
    """The layout of `g` in words."""
    return g.pattern


def keeps(g: ExpertLoraGroup) -> bool:
    """Whether a target loading this layout takes `g` as it is."""
    return True


def a_stacks(family: Family) -> set[tuple[str, ...]] | None:
    """Roles whose per-expert lora_A must agree for one factor to hold them: the family's fused tensors of several
    roles, and every input projection (one lora_gate_and_up_A)."""
    return {parts for parts, _, _ in lora_tensors(family) if len(parts) > 1} | {input_roles(family)}


def fuse_config(family: Family, roles: list[str], params: set[str]) -> dict[str, Any]:
    """adapter_config.json edits of a fuse output: none beyond the renamed modules."""
    return {"target_modules_add": []}


def written_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """adapter_config.json of a fuse output: as rewritten (no peft wrappers, so no packing to state)."""
    return config, []


def fuse_notes(family: Family, shared_a: bool, config: dict[str, Any], kept: set[str]) -> list[str]:
    """Notes of a fuse output: none."""
    return []


def split(b: Builder, g: ExpertLoraGroup, family: Family | None, ep: int, rules: TargetRules) -> None:
    """Every expert's pair of layer `g`: its [in, r] / [r, out] slice of each grouped factor transposed (and the input
    factor's B cut into its roles); zero pairs where the target needs them."""
    assert family is not None
    prefix = family_prefix(family, g.prefix, b.where, b.names)
    _split(b, g, family, prefix)
    if rules.all_roles:
        zero_per_expert(b, g, family, prefix, rules)


def _split(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str) -> None:
    src_key = module_key(g.prefix, "experts")
    for roles in (input_roles(family), (output_role(family),)):
        if roles[0] not in g.roles:
            continue
        fa, fb = g.factor(roles, "A"), g.factor(roles, "B")
        da, db = b.out_dtype(fa), b.out_dtype(fb)
        out, inn = g.dims_of(roles[0])
        r = g.rank_of(roles[0])
        order = g.fused_order if len(roles) > 1 else None
        for e in range(g.num_experts):
            names = [expert_outputs(b, g, family, prefix, role, e, src_key, (da, db)) for role in roles]
            a_op = GroupedSlice(fa.dtype, (inn, r), 1, None, len(roles), da)
            b_op = GroupedSlice(fb.dtype, (r, out * len(roles)), len(roles), order, 1, db)
            b.pieces.append(Piece(
                (block_read(b.ref(fa), e, inn * r),),
                tuple(Write(n[0], 0, r * inn * DTYPE_SIZES[da], da) for n in names), a_op, e,
            ))
            b.pieces.append(Piece(
                (block_read(b.ref(fb), e, r * out * len(roles)),),
                tuple(Write(n[1], 0, out * r * DTYPE_SIZES[db], db) for n in names), b_op, e,
            ))


def fuse(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, shared_a: bool, rules: TargetRules) -> set[str]:
    """The grouped factors of per-expert layer `g` (one slice per expert, transposed); no target_parameters."""
    _fuse(b, g, family, prefix, shared_a)
    return set()


def _fuse(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, shared_a: bool) -> None:
    inputs = input_roles(family)
    if len(inputs) > 1 and set(inputs) <= set(g.roles) and not shared_a:
        raise ConversionError(
            f"{b.where}: {'/'.join(inputs)} LoRA have different lora_A (e.g. in layer {g.prefix}); the grouped layout "
            f"shares one lora_{GROUPED_INPUTS}_A between them, so it cannot hold this adapter exactly (use --layout peft)"
        )
    E = g.num_experts
    experts_path = b.names.out_module(family.experts_path.format(prefix=prefix))
    ranks = {g.rank_of(r) for r in g.roles}
    if len(ranks) != 1:
        raise ConversionError(f"{b.where}: layer {g.prefix}: the grouped layout has one rank, the experts have {sorted(ranks)}")
    scale = group_scale(b, g, family, prefix, g.roles)
    b.module(module_key(experts_path), scale, re.escape("experts"),
             tuple(f"{experts_path}.lora_{tag}_B" for tag in (GROUPED_INPUTS, GROUPED_OUTPUT)))
    r = ranks.pop()
    for roles, tag in ((inputs, GROUPED_INPUTS), ((output_role(family),), GROUPED_OUTPUT)):
        present = [x for x in roles if x in g.roles]
        if not present:
            continue
        if len(present) != len(roles):
            raise ConversionError(f"{b.where}: layer {g.prefix} has LoRA for {present} but the grouped layout needs {list(roles)}")
        out, inn = g.dims_of(roles[0])
        k = len(roles)
        a0, b0 = g.factor((roles[0],), "A", 0), g.factor((roles[0],), "B", 0)
        da, db = b.out_dtype(a0), b.out_dtype(b0)
        name_a, name_b = f"{experts_path}.lora_{tag}_A", f"{experts_path}.lora_{tag}_B"
        b.target(name_a, da, (E, inn, r))
        b.target(name_b, db, (E, r, out * k))
        order = fused_order(family) if k > 1 else None
        a_bytes, b_bytes = inn * r * DTYPE_SIZES[da], r * out * k * DTYPE_SIZES[db]
        for e in range(E):
            fa = g.factor((roles[0],), "A", e)
            op_a = GroupedBuild("A", (fa.dtype,), ((r, inn),), 1, None, False, da)
            b.pieces.append(Piece((block_read(b.ref(fa), 0, r * inn),), (Write(name_a, e * a_bytes, (e + 1) * a_bytes, da),),
                                  op_a, e))
            fbs = [g.factor((role,), "B", e) for role in roles]
            op_b = GroupedBuild("B", tuple(f.dtype for f in fbs), tuple((out, r) for _ in fbs), k, order, False, db)
            b.pieces.append(Piece(tuple(block_read(b.ref(f), 0, out * r) for f in fbs),
                                  (Write(name_b, e * b_bytes, (e + 1) * b_bytes, db),), op_b, e))


# ----------------------------------------------------------------------------- compute


@dataclass(frozen=True)
class GroupedSlice:
    """One expert's grouped (x @ A @ B) factor -> per-expert nn.Linear-form factors.

    The read is the expert's [in, r] slice of A or [r, out] slice of B (`shape`); it is
    transposed, split into `parts` roles by rows (B of gate_and_up), and each part is
    written `copies` times (A of gate_and_up is gate's and up's lora_A).
    """

    dtype: str
    shape: tuple[int, int]
    parts: int
    order: str | None
    copies: int
    dst_dtype: str

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The transposed slice, one buffer per role part and copy."""
        m = from_bytes(bufs[0], self.dtype, self.shape).transpose(0, 1).to(torch_dtype(self.dst_dtype))
        out = []
        for rs in part_rows(m.shape[0], self.parts, self.order):
            data = to_bytes(m[rs])
            out += [data] * self.copies
        return out


@dataclass(frozen=True)
class GroupedBuild:
    """One expert's per-expert factors -> its slice of a grouped (x @ A @ B) factor.

    `which` "A": reads lora_A [r, in] of each distinct A (one when gate and up share it, else
    one per role, stacked on the rank); writes A^T [in, R]. `which` "B": reads lora_B [n, r]
    of each of `parts` roles; writes [R, out] where out = n * parts (halves or interleaved),
    with each role in its own rank block when `expand`.
    """

    which: str
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    parts: int
    order: str | None
    expand: bool
    dst_dtype: str

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The expert's grouped slice."""
        import torch

        dst = torch_dtype(self.dst_dtype)
        mats = [from_bytes(b, d, s).to(dst) for b, d, s in zip(bufs, self.dtypes, self.shapes)]
        if self.which == "A":
            return [to_bytes(torch.cat(mats, dim=0).transpose(0, 1))]
        if self.expand:
            r = mats[0].shape[1]
            padded = []
            for j, m in enumerate(mats):
                z = torch.zeros((m.shape[0], r * self.parts), dtype=dst)
                z[:, j * r : (j + 1) * r] = m
                padded.append(z)
            mats = padded
        return [to_bytes(merge_rows(mats, self.order).transpose(0, 1))]
