"""The conversion plan: every output tensor, and the pieces that produce its bytes.

A plan is a pure function of source metadata, the family, the target layout and the
options. A piece reads byte ranges of source files and writes byte ranges of target
tensors; it is either a byte copy (optionally a dtype cast, which is elementwise) or
a `regroup` of one expert between layouts (transpose/interleave).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

from convert.errors import ConversionError
from convert.families import PER_EXPERT, Family
from convert.formats.checkpoint import Checkpoint, TensorRef
from convert.formats.safetensors import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo, numel
from convert.plan.expert_groups import ExpertGroup, find_expert_groups, fused_slice_shape
from convert.plan.transforms import Unit, regroup

DEFAULT_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Read:
    """Bytes [start, end) of source file `file`, holding `dtype` elements."""

    file: str
    start: int
    end: int
    dtype: str


@dataclass(frozen=True)
class Write:
    """Bytes [start, end) of the data of target tensor `tensor`, holding `dtype` elements."""

    tensor: str
    start: int
    end: int
    dtype: str


@dataclass(frozen=True)
class Regroup:
    """A compute piece: one expert, from `src` units (one read each) to `dst` units (one write each)."""

    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The expert's bytes of each `dst` unit, from its bytes of each `src` unit (one buffer per read)."""
        return regroup(self.src, list(bufs), self.dst, dict(self.role_shape))


class Compute(Protocol):
    """What a compute piece does: from the bytes of its reads (in order) to the bytes of its writes (in order).

    Regroup for base weights; the adapter transforms (convert.plan.adapter_transforms) for LoRA factors.
    """

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> Sequence[bytes | memoryview]: ...


class SteppedCompute(Compute, Protocol):
    """A compute whose writes come out a step at a time (an expert of a run): `steps(bufs)` yields each step's
    outputs, in write order (together, every write once), using only the reads that step needs, so that a
    lazily read `bufs` (convert.engine.executor.LazyReads) reads a step's bytes just before the step and its
    outputs can be written before the next step's bytes are read. `outputs` is the steps joined."""

    def steps(self, bufs: Sequence[bytes | memoryview]) -> Iterator[Sequence[bytes | memoryview]]: ...


def is_stepped(compute: Compute | None) -> TypeGuard[SteppedCompute]:
    """Whether `compute` writes in steps (SteppedCompute)."""
    return callable(getattr(compute, "steps", None))


@dataclass(frozen=True)
class Piece:
    """Reads -> (copy/cast or regroup) -> writes. `expert` is set for expert pieces (for EP ownership)."""

    reads: tuple[Read, ...]
    writes: tuple[Write, ...]
    regroup: Compute | None = None
    expert: int | None = None

    @property
    def read_bytes(self) -> int:
        return sum(r.end - r.start for r in self.reads)

    @property
    def write_bytes(self) -> int:
        return sum(w.end - w.start for w in self.writes)


@dataclass(frozen=True)
class TargetTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class Plan:
    """What a conversion will write and how; identical on every rank."""

    family: str
    target_layout: str
    num_experts: int  # expert indices the pieces use (E; more where a role of `extra_experts` has more experts)
    groups: list[tuple[str, str]]  # (layer prefix, source layout)
    targets: list[TargetTensor]
    pieces: list[Piece]
    copy_files: list[str]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    dequantized: bool = False  # quantized weights written dequantized: config.json loses quantization_config


def target_dtype(src: str, dtype: str | None) -> str:
    """The output dtype of a source tensor of `src` dtype under `--dtype` (None = keep)."""
    return dtype if dtype and src in FLOAT_DTYPES else src


def _coalesce(reads: list[Read]) -> tuple[Read, ...]:
    out: list[Read] = []
    for r in reads:
        if out and out[-1].file == r.file and out[-1].end == r.start and out[-1].dtype == r.dtype:
            out[-1] = Read(r.file, out[-1].start, r.end, r.dtype)
        else:
            out.append(r)
    return tuple(out)


def copy_pieces(
    ref: TensorRef, out_name: str, dtype: str | None, chunk: int, expert: int | None = None
) -> tuple[TargetTensor, list[Piece]]:
    """A whole source tensor `ref` copied (or cast to `dtype`) unchanged as `out_name`, in `chunk`-byte pieces.

    Returns the target tensor and its pieces; `expert` marks them as that expert's (for EP ownership).
    """
    info = ref.info
    out_dtype = target_dtype(info.dtype, dtype)
    src_item, dst_item = DTYPE_SIZES[info.dtype], DTYPE_SIZES[out_dtype]
    n = numel(info.shape)
    step = max(1, chunk // max(src_item, dst_item))
    pieces = [
        Piece(
            (Read(ref.file, info.start + i * src_item, info.start + min(n, i + step) * src_item, info.dtype),),
            (Write(out_name, i * dst_item, min(n, i + step) * dst_item, out_dtype),),
            None,
            expert,
        )
        for i in range(0, max(n, 1), step)
    ]
    return TargetTensor(out_name, out_dtype, info.shape), pieces


def _units(family: Family, group: ExpertGroup, layout: str, dtype: str | None, side: str,
           dequantized: frozenset[str] = frozenset()) -> list[tuple[Unit, str]]:
    """(unit, key template in model naming) of each tensor of one expert of `group` in `layout`.

    `dequantized`: roles whose (quantized) weights are written as `dtype` on the "dst" side.
    """
    def dt(role: str) -> str:
        if side == "dst" and role in dequantized:
            return str(dtype)
        return target_dtype(group.role_dtype[role], dtype) if side == "dst" else group.role_dtype[role]

    if layout == PER_EXPERT:
        return [(Unit(None, role, dt(role)), tpl) for role, tpl in family.expert_templates.items()]
    return [(Unit(t, None, dt(t.parts[0])), t.template) for t in family.fused[layout]]


def _unit_nbytes(unit: Unit, group: ExpertGroup) -> int:
    return sum(numel(group.role_shape[r]) for r in unit.roles) * DTYPE_SIZES[unit.dtype]


def expert_read(group: ExpertGroup, unit: Unit, tpl: str, e: int) -> Read:
    """The Read of expert `e`'s bytes of source `unit` (key template `tpl`) of `group`: its own tensor, or its
    slice of the fused one."""
    if unit.fused is None:
        ref = group.per_expert[(str(unit.role), e)]
        return Read(ref.file, ref.info.start, ref.info.end, unit.dtype)
    ref = group.fused[tpl]
    size = ref.info.nbytes // ref.info.shape[0]
    return Read(ref.file, ref.info.start + e * size, ref.info.start + (e + 1) * size, unit.dtype)


def _count(group: ExpertGroup, unit: Unit) -> int:
    """How many experts hold `unit` (the roles of one tensor share one count)."""
    return group.role_experts.get(unit.roles[0], group.num_experts)


def _held(units: list[tuple[Unit, str]], group: ExpertGroup, e: int) -> list[tuple[Unit, str]]:
    """The units of `units` that expert `e` holds (all of them unless the family has `extra_experts`)."""
    return [(u, tpl) for u, tpl in units if e < _count(group, u)]


def _group_plan(
    ckpt: Checkpoint, family: Family, group: ExpertGroup, layout: str, dtype: str | None
) -> tuple[list[TargetTensor], list[Piece]]:
    all_src = _units(family, group, group.layout, dtype, "src")
    all_dst = _units(family, group, layout, dtype, "dst")
    targets = []
    for unit, tpl in all_dst:
        if unit.fused is None:  # per-expert outputs are named as a per-expert checkpoint names them
            shape = group.role_shape[str(unit.role)]
            targets += [TargetTensor(family.to_disk(tpl.format(prefix=group.prefix, e=e)), unit.dtype, shape)
                        for e in range(_count(group, unit))]
        else:
            slice_shape = fused_slice_shape(unit.fused, group.role_shape[unit.fused.parts[0]])
            targets.append(TargetTensor(tpl.format(prefix=group.prefix), unit.dtype, (_count(group, unit), *slice_shape)))

    byte_copy = all(u.is_byte_copy for u, _ in all_src + all_dst)
    role_shape = tuple(sorted(group.role_shape.items()))
    pieces = []
    for e in range(group.slots):
        src_units, dst_units = _held(all_src, group, e), _held(all_dst, group, e)
        # One read per source unit: a per-expert tensor, or expert e's slice of a fused tensor.
        unit_reads = [(unit, expert_read(group, unit, tpl, e)) for unit, tpl in src_units]
        writes = []
        for unit, tpl in dst_units:
            size = _unit_nbytes(unit, group)
            if unit.fused is None:
                writes.append(Write(family.to_disk(tpl.format(prefix=group.prefix, e=e)), 0, size, unit.dtype))
            else:
                writes.append(Write(tpl.format(prefix=group.prefix), e * size, (e + 1) * size, unit.dtype))
        if byte_copy:
            # Each role's bytes are a contiguous sub-range of its source read; order them as the target wants.
            role_read: dict[str, Read] = {}
            for unit, read in unit_reads:
                part = (read.end - read.start) // len(unit.roles)
                for j, role in enumerate(unit.roles):
                    role_read[role] = Read(read.file, read.start + j * part, read.start + (j + 1) * part, read.dtype)
            # One piece per dtype: the executor copies (or casts) a piece's reads as one run of one dtype.
            by_dtype: dict[str, list[int]] = {}
            for i, (unit, _) in enumerate(dst_units):
                by_dtype.setdefault(role_read[unit.roles[0]].dtype, []).append(i)
            for idx in by_dtype.values():
                ordered = [role_read[role] for i in idx for role in dst_units[i][0].roles]
                pieces.append(Piece(_coalesce(ordered), tuple(writes[i] for i in idx), None, e))
        else:
            regroup = Regroup(tuple(u for u, _ in src_units), tuple(u for u, _ in dst_units), role_shape)
            pieces.append(Piece(tuple(r for _, r in unit_reads), tuple(writes), regroup, e))
    return targets, pieces


def _merge_pieces(
    ckpt: Checkpoint, family: Family, names: list[str], fusing: bool, dtype: str | None, chunk: int
) -> tuple[list[TargetTensor], list[Piece], set[str]]:
    """Non-expert tensors the family's merges and splits join or cut (Merge.cuts): targets, pieces, source names used.

    Both are along dim 0, so each part is a contiguous byte range of the joined tensor: a byte copy (or cast).
    """
    targets: list[TargetTensor] = []
    pieces: list[Piece] = []
    used: set[str] = set()
    where = ckpt.storage.display("config.json")
    for merge in family.merges:
        for cut in merge.cuts(names, fusing, family.to_model, family.to_disk, ckpt.config, where):
            fp8 = [n for n in (cut.whole, *cut.parts) if n in ckpt.tensors and ckpt.tensors[n].info.dtype.startswith("F8_")]
            if fp8 and dtype:  # a cast of FP8 bytes without their scales would be wrong values
                raise ConversionError(f"{ckpt.storage.display(ckpt.tensors[fp8[0]].file)}: tensor {fp8[0]!r} is FP8 and "
                                      "joined or cut by the family's merges/splits, which --dtype cannot dequantize; "
                                      "convert with --dtype keep")
            if cut.read_whole:
                ref = ckpt.tensors[cut.whole]
                shape = ref.info.shape
                try:
                    if not shape or not shape[0]:
                        raise ConversionError("it has no dim 0 to cut")
                    sizes = merge.part_sizes(shape[0], len(cut.parts), ckpt.config, where)
                except ConversionError as exc:
                    raise ConversionError(f"{ckpt.storage.display(ref.file)}: tensor {cut.whole!r} has shape {list(shape)}; "
                                          f"it cannot be cut along dim 0 into {list(cut.parts)}: {exc}") from None
                row = ref.info.nbytes // shape[0]
                start = ref.info.start
                for part, rows in zip(cut.parts, sizes):
                    piece_ref = TensorRef(ref.file, TensorInfo(part, ref.info.dtype, (rows, *shape[1:]), start, start + rows * row))
                    t, ps = copy_pieces(piece_ref, part, dtype, chunk)
                    targets.append(t)
                    pieces += ps
                    start += rows * row
                used.add(cut.whole)
                continue
            refs = [ckpt.tensors[p] for p in cut.parts]
            lengths = [r.info.shape[0] if r.info.shape else 0 for r in refs]
            problem = None
            if len({r.info.shape[1:] for r in refs}) != 1 or len({r.info.dtype for r in refs}) != 1 or 0 in lengths:
                problem = "they must have one dtype and the same shape but for dim 0"
            else:
                try:
                    if merge.part_sizes(sum(lengths), len(refs), ckpt.config, where) != lengths:
                        problem = (f"their sizes along dim 0 {lengths} are not the parts' shares of {sum(lengths)} "
                                   f"({merge.part_sizes(sum(lengths), len(refs), ckpt.config, where)})")
                except ConversionError as exc:
                    problem = str(exc)
            if problem:
                raise ConversionError(
                    f"{ckpt.storage.display()}: tensors {[r.info.name for r in refs]} "
                    f"({[f'{r.info.dtype} {list(r.info.shape)}' for r in refs]}) cannot join into {cut.whole!r}: {problem}"
                )
            out_dtype = target_dtype(refs[0].info.dtype, dtype)
            offset = 0
            for ref in refs:
                _, ps = copy_pieces(ref, cut.whole, dtype, chunk)
                pieces += [Piece(p.reads, tuple(Write(w.tensor, w.start + offset, w.end + offset, w.dtype)
                                                for w in p.writes)) for p in ps]
                offset += numel(ref.info.shape) * DTYPE_SIZES[out_dtype]
                used.add(ref.info.name)
            targets.append(TargetTensor(cut.whole, out_dtype, (sum(lengths), *refs[0].info.shape[1:])))
    return targets, pieces, used


def plan_conversion(
    ckpt: Checkpoint,
    family: Family,
    target_layout: str,
    dtype: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    num_experts: int | None = None,
    renaming: bool = False,
) -> Plan:
    """Plan converting every expert group of `ckpt` to `target_layout`; everything else passes through.

    Fusing reads the source's names as transformers does when loading (the family's renames,
    then the expert templates) and writes model naming; splitting reads model naming and
    writes the names transformers' `save_pretrained` would (renames undone). Raises
    ConversionError when there are no expert tensors or all are already in `target_layout` (unless `renaming`:
    the job changes tensor names, convert.families.namings).
    """
    plain = family
    family = family.with_companions(family.companions_in(ckpt.tensors))
    dequant = bool(dtype) and bool(family.companion_roles)
    if target_layout in family.companions_dropped and not dequant:
        raise ConversionError(
            f"{ckpt.storage.display()}: quantized expert weights (with {list(family.companion_roles)[:2]}...) cannot "
            f"go to the {target_layout!r} layout: {family.companions_dropped[target_layout]} (dequantize with --dtype)"
        )
    if target_layout not in plain.layouts and not (dtype and plain.dequantize is not None):
        raise ConversionError(f"family {family.name} has no layout {target_layout!r} (it has {list(family.layouts)})")
    where = ckpt.storage.display("config.json")
    if dtype and plain.dequantize is not None:
        n = num_experts if num_experts is not None else plain.num_experts(ckpt.config, where)
        return _mxfp4_plan(ckpt, plain, target_layout, str(dtype), chunk_bytes, n)
    if dtype and not dequant and isinstance(ckpt.config.get("quantization_config"), dict):
        raise ConversionError(
            f"{where}: a {ckpt.config['quantization_config'].get('quant_method')!r}-quantized checkpoint cannot be "
            f"cast with --dtype (dequantizing is supported for FP8 block-scaled weights only); use --dtype keep"
        )
    if num_experts is None:
        if not ckpt.config:
            raise ConversionError(f"{ckpt.storage.display()}: no config.json (needed for the number of experts)")
        num_experts = family.num_experts(ckpt.config, where)
    if dequant:
        return _dequant_plan(ckpt, plain, family, target_layout, str(dtype), chunk_bytes, num_experts)
    fusing = target_layout != PER_EXPERT
    out_name = family.to_model if fusing else family.to_disk
    groups, passthrough = find_expert_groups(ckpt, family, num_experts, rename=fusing)
    if not groups:
        raise ConversionError(
            f"{ckpt.storage.display()}: no {family.name} expert tensors found "
            f"(looked for e.g. {family.per_expert[family.roles[0]].format(prefix='<layer>', e=0)!r})"
        )
    casting = bool(dtype) and any(target_dtype(r.info.dtype, dtype) != r.info.dtype for r in ckpt.tensors.values())
    consolidating = ckpt.container != "safetensors"  # a trainer's container: written as an HF checkpoint
    if all(g.layout == target_layout for g in groups) and not (renaming or casting or consolidating):
        raise ConversionError(
            f"{ckpt.storage.display()}: every expert layer is already in the {target_layout!r} layout; nothing to do"
            + (f" (and every floating tensor is already {dtype})" if dtype else "")
        )
    targets, pieces, merged = _merge_pieces(ckpt, family, passthrough, fusing, dtype, chunk_bytes)
    for name in passthrough:
        if name not in merged:
            t, p = copy_pieces(ckpt.tensors[name], out_name(name), dtype, chunk_bytes)
            targets.append(t)
            pieces += p
    notes = [f"skipped {what}" for what in ckpt.skipped] + _extra_notes(family, groups, num_experts)
    for group in groups:
        if group.layout == target_layout:
            notes.append(f"{group.prefix}: already {target_layout}, copied unchanged")
            if target_layout != PER_EXPERT:
                named = [(tpl.format(prefix=group.prefix), ref) for tpl, ref in group.fused.items()]
            else:
                templates = family.expert_templates
                named = [(family.to_disk(templates[role].format(prefix=group.prefix, e=e)), ref)
                         for (role, e), ref in group.per_expert.items()]
            for name, ref in named:
                t, p = copy_pieces(ref, name, dtype, chunk_bytes)
                targets.append(t)
                pieces += p
            continue
        group_targets, group_pieces = _group_plan(ckpt, family, group, target_layout, dtype)
        targets += group_targets
        pieces += group_pieces
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            raise ConversionError(f"{ckpt.storage.display()}: output tensor {t.name!r} would be written twice")
        seen.add(t.name)
    return Plan(
        family=family.name,
        target_layout=target_layout,
        num_experts=max(num_experts, *(g.slots for g in groups)),
        groups=[(g.prefix, g.layout) for g in groups],
        targets=targets,
        pieces=pieces,
        copy_files=list(ckpt.other_files),
        metadata=ckpt.metadata or {"format": "pt"},
        notes=notes,
    )


def _extra_notes(family: Family, groups: list[ExpertGroup], num_experts: int) -> list[str]:
    """A plan note for roles held by more than E experts (the family's `extra_experts`), else none."""
    counts = groups[0].role_experts if groups else {}
    more = {r: n for r, n in counts.items() if n != num_experts and r in family.extra_experts}
    if not more:
        return []
    return ["experts per role: E=" + str(num_experts) + "; " + ", ".join(
        f"{r} {n} (E + {family.extra_experts[r]})" for r, n in more.items())]


def _dequant_plan(
    ckpt: Checkpoint, plain: Family, family: Family, target_layout: str, dtype: str, chunk_bytes: int, num_experts: int
) -> Plan:
    """Plan a conversion that dequantizes FP8 block-scaled weights (experts and others) to `dtype`.

    `family` carries the scale companions as roles (the source), `plain` does not (the target): every
    expert is read with its scales and written dequantized, one expert per piece; a non-expert
    `X.weight` with a companion `X.weight<suffix>` is dequantized whole, and the companion dropped.
    """
    from convert.plan.dequant import DequantRegroup, DequantTensor, block_size

    block = block_size(ckpt.config)
    fusing = target_layout != PER_EXPERT
    out_name = family.to_model if fusing else family.to_disk
    groups, passthrough = find_expert_groups(ckpt, family, num_experts, rename=fusing)
    if not groups:
        raise ConversionError(f"{ckpt.storage.display()}: no {family.name} expert tensors found")
    pairs = tuple((role, f"{role}{sfx}") for sfx in family.companions_in(ckpt.tensors) for role in plain.roles
                  if f"{role}{sfx}" in family.role_leaves)
    weights = frozenset(w for w, _ in pairs)
    targets: list[TargetTensor] = []
    pieces: list[Piece] = []
    for group in groups:
        all_src = _units(family, group, group.layout, dtype, "src")
        all_dst = _units(plain, group, target_layout, dtype, "dst", weights)
        for unit, tpl in all_dst:
            if unit.fused is None:
                shape = group.role_shape[str(unit.role)]
                targets += [TargetTensor(plain.to_disk(tpl.format(prefix=group.prefix, e=e)), unit.dtype, shape)
                            for e in range(_count(group, unit))]
            else:
                slice_shape = fused_slice_shape(unit.fused, group.role_shape[unit.fused.parts[0]])
                targets.append(TargetTensor(tpl.format(prefix=group.prefix), unit.dtype,
                                            (_count(group, unit), *slice_shape)))
        for e in range(group.slots):
            src_units, dst_units = _held(all_src, group, e), _held(all_dst, group, e)
            held = {r for u, _ in src_units for r in u.roles}
            compute = DequantRegroup(tuple(u for u, _ in src_units), tuple(u for u, _ in dst_units),
                                     tuple(sorted(group.role_shape.items())),
                                     tuple((w, sc) for w, sc in pairs if w in held), block)
            reads = [expert_read(group, unit, tpl, e) for unit, tpl in src_units]
            writes = []
            for unit, tpl in dst_units:
                size = _unit_nbytes(unit, group)
                if unit.fused is None:
                    writes.append(Write(plain.to_disk(tpl.format(prefix=group.prefix, e=e)), 0, size, unit.dtype))
                else:
                    writes.append(Write(tpl.format(prefix=group.prefix), e * size, (e + 1) * size, unit.dtype))
            pieces.append(Piece(tuple(reads), tuple(writes), compute, e))
    merged_t, merged_p, merged = _merge_pieces(ckpt, family, passthrough, fusing, dtype, chunk_bytes)
    targets += merged_t
    pieces += merged_p
    names = set(passthrough)
    scale_of = {w: f"{w}{sfx}" for w in names for sfx in family.companions if f"{w}{sfx}" in names}
    dropped = {c for w, c in scale_of.items() if ckpt.tensors[w].info.dtype.startswith("F8_")}
    for name in passthrough:
        if name in merged or name in dropped:
            continue
        ref = ckpt.tensors[name]
        if name in scale_of and ref.info.dtype.startswith("F8_"):
            sref = ckpt.tensors[scale_of[name]]
            compute_t = DequantTensor(ref.info.shape, ref.info.dtype, sref.info.shape, sref.info.dtype, dtype, block)
            out = out_name(name)
            nbytes = numel(ref.info.shape) * DTYPE_SIZES[dtype]
            targets.append(TargetTensor(out, dtype, ref.info.shape))
            pieces.append(Piece((Read(ref.file, ref.info.start, ref.info.end, ref.info.dtype),
                                 Read(sref.file, sref.info.start, sref.info.end, sref.info.dtype)),
                                (Write(out, 0, nbytes, dtype),), compute_t))
            continue
        t, p = copy_pieces(ref, out_name(name), dtype, chunk_bytes)
        targets.append(t)
        pieces += p
    return Plan(
        family=family.name, target_layout=target_layout, num_experts=max(num_experts, *(g.slots for g in groups)),
        groups=[(g.prefix, g.layout) for g in groups], targets=targets, pieces=pieces,
        copy_files=list(ckpt.other_files), metadata=ckpt.metadata or {"format": "pt"},
        notes=[f"skipped {what}" for what in ckpt.skipped] + _extra_notes(plain, groups, num_experts) + [f"FP8 weights dequantized to {dtype} ({block[0]}x{block[1]} blocks)"],
        dequantized=True,
    )


def _mxfp4_plan(ckpt: Checkpoint, family: Family, target_layout: str, dtype: str, chunk_bytes: int, num_experts: int
                ) -> Plan:
    """Plan dequantizing an MXFP4 family's experts (`family.dequantize`) to `dtype` into its target family's
    `target_layout`, one expert per piece; every other tensor passes through, cast to `dtype`."""
    from convert.families import load_families
    from convert.plan.dequant import Mxfp4Regroup

    assert family.dequantize is not None
    target_name, mx, cast = family.dequantize
    target = load_families().get(target_name)
    if target is None:
        raise ConversionError(f"{family.source}: quantization.dequantize names unknown family {target_name!r}")
    if target_layout not in target.layouts:
        raise ConversionError(f"family {target.name} has no layout {target_layout!r} (it has {list(target.layouts)})")
    if family.extra_experts or target.extra_experts:
        raise ConversionError(f"{family.source}: MXFP4 dequantization of a family with 'extra_experts' is not supported")
    groups, passthrough = find_expert_groups(ckpt, family, num_experts, rename=False)
    if not groups:
        raise ConversionError(f"{ckpt.storage.display()}: no {family.name} expert tensors found")
    targets: list[TargetTensor] = []
    pieces: list[Piece] = []
    for group in groups:
        shape = {t: (*group.role_shape[b][:-2], group.role_shape[b][-2] * group.role_shape[b][-1] * 2)
                 for t, (b, _) in mx.items()}
        shape.update({t: group.role_shape[r] for t, r in cast.items()})
        missing = [r for r in target.roles if r not in shape]
        if missing:
            raise ConversionError(f"{family.source}: quantization.dequantize gives no source for {target.name} roles {missing}")
        if target_layout == PER_EXPERT:
            dst = [(Unit(None, role, dtype), tpl) for role, tpl in target.expert_templates.items()]
        else:
            dst = [(Unit(t, None, dtype), t.template) for t in target.fused[target_layout]]
        src = _units(family, group, group.layout, None, "src")
        sizes = [sum(numel(shape[r]) for r in u.roles) * DTYPE_SIZES[dtype] for u, _ in dst]
        for (unit, tpl), _size in zip(dst, sizes):
            if unit.fused is None:
                targets += [TargetTensor(target.to_disk(tpl.format(prefix=group.prefix, e=e)), dtype, shape[str(unit.role)])
                            for e in range(group.num_experts)]
            else:
                slice_shape = fused_slice_shape(unit.fused, shape[unit.fused.parts[0]])
                targets.append(TargetTensor(tpl.format(prefix=group.prefix), dtype, (group.num_experts, *slice_shape)))
        compute = Mxfp4Regroup(tuple(u for u, _ in src), tuple(u for u, _ in dst), tuple(sorted(group.role_shape.items())),
                               tuple((t, b, s) for t, (b, s) in mx.items()), tuple(cast.items()))
        for e in range(group.num_experts):
            reads = [expert_read(group, unit, tpl, e) for unit, tpl in src]
            writes = [Write(target.to_disk(tpl.format(prefix=group.prefix, e=e)), 0, size, dtype) if unit.fused is None
                      else Write(tpl.format(prefix=group.prefix), e * size, (e + 1) * size, dtype)
                      for (unit, tpl), size in zip(dst, sizes)]
            pieces.append(Piece(tuple(reads), tuple(writes), compute, e))
    for name in passthrough:
        t, p = copy_pieces(ckpt.tensors[name], name, dtype, chunk_bytes)
        targets.append(t)
        pieces += p
    return Plan(
        family=family.name, target_layout=target_layout, num_experts=num_experts,
        groups=[(g.prefix, g.layout) for g in groups], targets=targets, pieces=pieces,
        copy_files=list(ckpt.other_files), metadata=ckpt.metadata or {"format": "pt"},
        notes=[f"skipped {what}" for what in ckpt.skipped]
        + [f"MXFP4 experts dequantized to {dtype} into {target.name}'s {target_layout!r} layout"],
        dequantized=True,
    )
