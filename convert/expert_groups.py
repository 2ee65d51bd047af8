"""Find the expert tensors of a checkpoint: which layers hold experts, in which layout, with what shapes.

An expert group is the experts of one MoE layer (one key prefix, e.g. `model.layers.3`).
Every other tensor of the checkpoint is a pass-through tensor.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from convert.checkpoint import Checkpoint, TensorRef
from convert.errors import ConversionError
from convert.families import PER_EXPERT, Family, FusedTensor, template_regex


@dataclass
class ExpertGroup:
    """The experts of one layer in the source.

    `role_shape`/`role_dtype` describe one expert's tensor of each role in per-expert
    (nn.Linear [out, in]) form, whatever the source layout.
    """

    prefix: str
    layout: str
    num_experts: int
    role_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    role_dtype: dict[str, str] = field(default_factory=dict)
    per_expert: dict[tuple[str, int], TensorRef] = field(default_factory=dict)
    fused: dict[str, TensorRef] = field(default_factory=dict)  # fused template -> source tensor


def fused_slice_shape(t: FusedTensor, part_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one expert's slice of fused tensor `t` whose parts each have `part_shape`."""
    shape = tuple(reversed(part_shape)) if t.transpose else part_shape
    k = len(t.parts)
    if t.op == "concat":
        return (shape[0] * k, *shape[1:])
    return (*shape[:-1], shape[-1] * k)


def part_shape_of(t: FusedTensor, slice_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """Inverse of fused_slice_shape: the per-expert shape of each part of `t`."""
    k = len(t.parts)
    axis = 0 if t.op == "concat" else len(slice_shape) - 1
    if not slice_shape or slice_shape[axis] % k:
        raise ConversionError(f"{where}: expert slice shape {list(slice_shape)} cannot hold {k} equal parts {t.parts}")
    shape = list(slice_shape)
    shape[axis] //= k
    if t.transpose:
        if len(shape) != 2:
            raise ConversionError(f"{where}: expected a 2-D expert slice to transpose, got {list(slice_shape)}")
        shape.reverse()
    return tuple(shape)


def _matchers(family: Family) -> list[tuple[str, str | FusedTensor, re.Pattern[str]]]:
    out: list[tuple[str, str | FusedTensor, re.Pattern[str]]] = []
    for role, template in family.per_expert.items():
        out.append((PER_EXPERT, role, template_regex(template)))
    for layout, tensors in family.fused.items():
        for t in tensors:
            out.append((layout, t, template_regex(t.template)))
    return out


def find_expert_groups(ckpt: Checkpoint, family: Family, num_experts: int) -> tuple[list[ExpertGroup], list[str]]:
    """Split the checkpoint's tensors into expert groups (validated) and pass-through tensor names."""
    matchers = _matchers(family)
    refuse = [(re.compile(p), msg) for p, msg in family.refuse.items()]
    per_prefix_pe: dict[str, dict[tuple[str, int], TensorRef]] = defaultdict(dict)
    per_prefix_fused: dict[str, dict[str, TensorRef]] = defaultdict(dict)
    passthrough: list[str] = []
    for name, ref in ckpt.tensors.items():
        for rx, msg in refuse:
            if rx.search(name):
                raise ConversionError(f"{ckpt.storage.display(ref.file)}: tensor {name!r}: {msg}")
        matched = False
        for layout, what, rx in matchers:
            m = rx.match(name)
            if not m:
                continue
            matched = True
            if layout == PER_EXPERT:
                per_prefix_pe[m["prefix"]][(str(what), int(m["e"]))] = ref
            else:
                assert isinstance(what, FusedTensor)
                per_prefix_fused[m["prefix"]][what.template] = ref
        if not matched:
            passthrough.append(name)

    groups = []
    for prefix in sorted(set(per_prefix_pe) | set(per_prefix_fused)):
        pe, fused = per_prefix_pe.get(prefix), per_prefix_fused.get(prefix)
        if pe and fused:
            raise ConversionError(
                f"{prefix}: holds both per-expert tensors (e.g. {next(iter(pe.values())).info.name!r}) "
                f"and fused ones (e.g. {next(iter(fused.values())).info.name!r}); expected one layout per layer"
            )
        if pe:
            groups.append(_per_expert_group(ckpt, family, prefix, pe, num_experts))
        else:
            groups.append(_fused_group(ckpt, family, prefix, fused or {}, num_experts))
    return groups, passthrough


def _per_expert_group(
    ckpt: Checkpoint, family: Family, prefix: str, found: dict[tuple[str, int], TensorRef], num_experts: int
) -> ExpertGroup:
    group = ExpertGroup(prefix, PER_EXPERT, num_experts)
    for (role, e), ref in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if e >= num_experts:
            raise ConversionError(
                f"{ckpt.storage.display(ref.file)}: tensor {ref.info.name!r} is expert {e}, "
                f"but config.json says there are {num_experts} experts"
            )
    for role, template in family.per_expert.items():
        for e in range(num_experts):
            ref = found.get((role, e))
            key = template.format(prefix=prefix, e=e)
            if ref is None:
                raise ConversionError(
                    f"{ckpt.storage.display()}: missing expert {e} of {prefix}: tensor {key!r} not found "
                    f"(expected {num_experts} experts)"
                )
            shape, dtype = ref.info.shape, ref.info.dtype
            if role not in group.role_shape:
                group.role_shape[role], group.role_dtype[role] = shape, dtype
            elif (shape, dtype) != (group.role_shape[role], group.role_dtype[role]):
                raise ConversionError(
                    f"{ckpt.storage.display(ref.file)}: tensor {key!r} is {dtype} {list(shape)}, but expert 0 of "
                    f"{prefix} has {group.role_dtype[role]} {list(group.role_shape[role])}; experts must agree"
                )
            group.per_expert[(role, e)] = ref
    for tensors in family.fused.values():
        for t in tensors:
            shapes = {group.role_shape[p] for p in t.parts}
            if len(shapes) > 1:
                raise ConversionError(
                    f"{prefix}: roles {list(t.parts)} must have one shape to fuse into {t.template!r}, got {sorted(shapes)}"
                )
    return group


def _fused_group(
    ckpt: Checkpoint, family: Family, prefix: str, found: dict[str, TensorRef], num_experts: int
) -> ExpertGroup:
    exact = [layout for layout, tensors in family.fused.items() if {t.template for t in tensors} == set(found)]
    if len(exact) != 1:
        names = sorted(t.format(prefix=prefix) for t in found)
        wanted = {lay: [t.template.format(prefix=prefix) for t in ts] for lay, ts in family.fused.items()}
        raise ConversionError(
            f"{ckpt.storage.display()}: layer {prefix} has fused expert tensors {names}, which are not exactly "
            f"one {family.name} layout (expected one of {wanted})"
        )
    layout = exact[0]
    group = ExpertGroup(prefix, layout, num_experts)
    for t in family.fused[layout]:
        ref = found[t.template]
        key = ref.info.name
        where = f"{ckpt.storage.display(ref.file)}: tensor {key!r}"
        if not ref.info.shape or ref.info.shape[0] != num_experts:
            raise ConversionError(
                f"{where} has shape {list(ref.info.shape)}; expected dim 0 = {num_experts} experts (config.json)"
            )
        part = part_shape_of(t, ref.info.shape[1:], where)
        for role in t.parts:
            if role in group.role_shape and group.role_shape[role] != part:
                raise ConversionError(f"{where}: role {role} shape {list(part)} disagrees with {group.role_shape[role]}")
            group.role_shape[role], group.role_dtype[role] = part, ref.info.dtype
        group.fused[t.template] = ref
    return group
