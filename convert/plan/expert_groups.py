"""Find the expert tensors of a checkpoint: which layers hold experts, in which layout, with what shapes.

An expert group is the experts of one MoE layer (one key prefix, e.g. `model.layers.3`, in
model naming). Tensor names are read in model naming: with `rename`, a checkpoint's names
are first renamed as transformers renames them when loading (a per-expert checkpoint, the
source of a fuse); without, they are taken as they are (a fused checkpoint, the source of a
split). Every other tensor of the checkpoint is a pass-through tensor.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from convert.errors import ConversionError
from convert.families import PER_EXPERT, Family, FusedTensor
from convert.formats.checkpoint import Checkpoint, TensorRef

_INDEXED = re.compile(r"^(?P<e>\d+)\.(?P<leaf>.+)$")


@dataclass
class ExpertGroup:
    """The experts of one layer in the source.

    `role_shape`/`role_dtype` describe one expert's tensor of each role in per-expert
    (nn.Linear [out, in]) form, whatever the source layout. `role_experts`: how many experts
    hold each role (`num_experts` = E, or more for a role of the family's `extra_experts`);
    `slots` is the largest (expert e holds the roles whose count exceeds e).
    """

    prefix: str
    layout: str
    num_experts: int
    role_experts: dict[str, int] = field(default_factory=dict)
    role_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    role_dtype: dict[str, str] = field(default_factory=dict)
    per_expert: dict[tuple[str, int], TensorRef] = field(default_factory=dict)
    fused: dict[str, TensorRef] = field(default_factory=dict)  # fused template -> source tensor

    @property
    def slots(self) -> int:
        """How many experts hold at least one role (E unless the family has `extra_experts`)."""
        return max([self.num_experts, *self.role_experts.values()])


def fused_slice_shape(t: FusedTensor, part_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one expert's slice of fused tensor `t` whose parts each have `part_shape`."""
    return t.pipeline.slice_shape(part_shape)


def part_shape_of(t: FusedTensor, slice_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """Inverse of fused_slice_shape: the per-expert shape of each part of `t` (they share one shape)."""
    try:
        shapes = t.pipeline.part_shapes(slice_shape)
    except ConversionError as exc:
        raise ConversionError(f"{where}: expert slice shape {list(slice_shape)} cannot hold {list(t.parts)} ({exc})") from exc
    return shapes[0]


def experts_regex(family: Family) -> re.Pattern[str]:
    """Matches a model-naming tensor name under a family's experts module: groups `prefix` and `rest`."""
    container = re.escape(f".{family.container}") if family.container else ""
    return re.compile(rf"^(?P<prefix>.+?){container}\.experts\.(?P<rest>.+)$")


def _display(family: Family, model_name: str, rename: bool) -> str:
    """A model-naming name as the checkpoint being read names it."""
    return family.to_disk(model_name) if rename else model_name


def find_expert_groups(
    ckpt: Checkpoint, family: Family, num_experts: int, rename: bool = True
) -> tuple[list[ExpertGroup], list[str]]:
    """Split the checkpoint's tensors into expert groups (validated) and pass-through tensor names (as stored).

    `rename`: read names through the family's renames (disk naming, as a per-expert checkpoint
    has them; a tensor already named as a fused one is taken as it is); otherwise as they are
    (model naming). `num_experts` is E; a role of the family's `extra_experts` has more (read from
    the checkpoint's config). Raises ConversionError naming the file
    and tensor for a refused tensor, an expert tensor that is not one of the family's roles,
    or an expert layer that is incomplete or inconsistent.
    """
    counts = family.role_experts(ckpt.config or {}, num_experts, ckpt.storage.display("config.json"))
    rx = experts_regex(family)
    leaf_role = {leaf: role for role, leaf in family.role_leaves.items()}
    fused_by_leaf = {t.leaf: t for ts in family.fused.values() for t in ts}
    refuse = [(re.compile(p), msg) for p, msg in family.refuse.items()]
    per_prefix_pe: dict[str, dict[tuple[str, int], TensorRef]] = defaultdict(dict)
    per_prefix_fused: dict[str, dict[str, TensorRef]] = defaultdict(dict)
    passthrough: list[str] = []
    for name, ref in ckpt.tensors.items():
        for pattern, msg in refuse:
            if pattern.search(name):
                raise ConversionError(f"{ckpt.storage.display(ref.file)}: tensor {name!r}: {msg}")
        m = rx.match(name)
        if rename and not (m and m["rest"] in fused_by_leaf):  # a fused tensor is named as the model holds it
            m = rx.match(family.to_model(name))
        if not m:
            passthrough.append(name)
            continue
        rest = m["rest"]
        indexed = _INDEXED.match(rest)
        if indexed:
            role = leaf_role.get(indexed["leaf"])
            if role is None:
                raise ConversionError(
                    f"{ckpt.storage.display(ref.file)}: tensor {name!r} is a per-expert tensor but not one of the "
                    f"{family.name} expert tensors ({sorted(leaf_role)}); quantized or extra expert tensors are "
                    "not converted (dequantize first, or describe them in the family file)"
                )
            per_prefix_pe[m["prefix"]][(role, int(indexed["e"]))] = ref
        elif rest in fused_by_leaf:
            per_prefix_fused[m["prefix"]][fused_by_leaf[rest].template] = ref
        elif rest.startswith(family.fused_leaf_prefixes()):
            raise ConversionError(
                f"{ckpt.storage.display(ref.file)}: tensor {name!r} is an expert tensor but not one of the "
                f"{family.name} fused expert tensors ({sorted(fused_by_leaf)}); quantized or extra expert tensors "
                "are not converted (dequantize first, or describe them in the family file)"
            )
        else:
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
            groups.append(_per_expert_group(ckpt, family, prefix, pe, num_experts, counts, rename))
        else:
            groups.append(_fused_group(ckpt, family, prefix, fused or {}, num_experts, counts))
    return groups, passthrough


def _count_text(family: Family, role: str, n: int) -> str:
    """`n experts`, saying where a role's count is more than E comes from."""
    key = family.extra_experts.get(role)
    return f"{n} experts" + (f" for role {role} (E + {key})" if key else "")


def _other_table(ckpt: Checkpoint, family: Family, found: dict[str, int]) -> str:
    """A hint naming another release's table whose expert counts are `found` (role -> experts), else ""."""
    from convert.families.registry import other_table_fits

    return other_table_fits(family, ckpt.config or {}, found)


def _per_expert_group(
    ckpt: Checkpoint, family: Family, prefix: str, found: dict[tuple[str, int], TensorRef], num_experts: int,
    counts: dict[str, int], rename: bool,
) -> ExpertGroup:
    group = ExpertGroup(prefix, PER_EXPERT, num_experts, dict(counts))
    held = {role: 1 + max(e for r, e in found if r == role) for role in {r for r, _ in found}}
    for (role, e), stored in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if e >= counts[role]:
            raise ConversionError(
                f"{ckpt.storage.display(stored.file)}: tensor {stored.info.name!r} is expert {e}, "
                f"but config.json says there are {_count_text(family, role, counts[role])}"
                + _other_table(ckpt, family, held)
            )
    for role, template in family.expert_templates.items():
        for e in range(counts[role]):
            ref = found.get((role, e))
            key = _display(family, template.format(prefix=prefix, e=e), rename)
            if ref is None:
                raise ConversionError(
                    f"{ckpt.storage.display()}: missing expert {e} of {prefix}: tensor {key!r} not found "
                    f"(expected {_count_text(family, role, counts[role])})" + _other_table(ckpt, family, held)
                )
            shape, dtype = ref.info.shape, ref.info.dtype
            if role not in group.role_shape:
                group.role_shape[role], group.role_dtype[role] = shape, dtype
            elif (shape, dtype) != (group.role_shape[role], group.role_dtype[role]):
                raise ConversionError(
                    f"{ckpt.storage.display(ref.file)}: tensor {ref.info.name!r} is {dtype} {list(shape)}, but expert 0 "
                    f"of {prefix} has {group.role_dtype[role]} {list(group.role_shape[role])}; experts must agree"
                )
            group.per_expert[(role, e)] = ref
    for tensors in family.fused.values():
        for t in tensors:
            shapes = {group.role_shape[p] for p in t.parts}
            dtypes = {group.role_dtype[p] for p in t.parts}
            if len(shapes) > 1 or len(dtypes) > 1:
                raise ConversionError(
                    f"{prefix}: roles {list(t.parts)} must have one shape and dtype to fuse into {t.template!r}, got "
                    f"{sorted(shapes)} {sorted(dtypes)}"
                )
            try:
                t.pipeline.slice_shape(next(iter(shapes)))
            except ConversionError as exc:
                raise ConversionError(f"{prefix}: roles {list(t.parts)} cannot fuse into {t.template!r}: {exc}") from exc
    return group


def _fused_group(
    ckpt: Checkpoint, family: Family, prefix: str, found: dict[str, TensorRef], num_experts: int,
    counts: dict[str, int],
) -> ExpertGroup:
    exact = [layout for layout, tensors in family.fused.items() if {t.template for t in tensors} == set(found)]
    if len(exact) != 1:
        names = sorted(ref.info.name for ref in found.values())
        wanted = {lay: [t.template.format(prefix=prefix) for t in ts] for lay, ts in family.fused.items()}
        raise ConversionError(
            f"{ckpt.storage.display()}: layer {prefix} has fused expert tensors {names}, which are not exactly "
            f"one {family.name} layout (expected one of {wanted})"
        )
    layout = exact[0]
    group = ExpertGroup(prefix, layout, num_experts, dict(counts))
    held = {p: found[t.template].info.shape[0] for t in family.fused[layout] for p in t.parts if found[t.template].info.shape}
    for t in family.fused[layout]:
        ref = found[t.template]
        key = ref.info.name
        where = f"{ckpt.storage.display(ref.file)}: tensor {key!r}"
        n = counts[t.parts[0]]
        if not ref.info.shape or ref.info.shape[0] != n:
            raise ConversionError(
                f"{where} has shape {list(ref.info.shape)}; expected dim 0 = "
                f"{_count_text(family, t.parts[0], n)} (config.json)" + _other_table(ckpt, family, held)
            )
        part = part_shape_of(t, ref.info.shape[1:], where)
        for role in t.parts:
            if role in group.role_shape and group.role_shape[role] != part:
                raise ConversionError(f"{where}: role {role} shape {list(part)} disagrees with {group.role_shape[role]}")
            group.role_shape[role], group.role_dtype[role] = part, ref.info.dtype
        group.fused[t.template] = ref
    return group
