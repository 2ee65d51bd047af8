"""What a correct base-weight conversion must satisfy, derived from the family tables alone.

For every expert layer, each side (source and destination) is read in whichever layout it
holds (per-expert, or any fused layout of the family); one expert is decoded to its roles in
nn.Linear [out, in] form straight from the family table's description (concat/interleave,
transposed or not) and the two sides are compared role by role. Every other tensor must
reach the destination with its shape unchanged, under the name the family's rename rules
give it (a fuse renames as transformers does when loading, a split as it does when saving).
This module does not use the converter's planner, expert grouping or transforms, nor the
op classes' code: it reads the family table's op descriptions itself. Experts are loaded as
the bits of their elements (numpy; `Raw`) and unfused with numpy views and copies: checking
a conversion that moved bytes imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from convert.errors import ConversionError
from convert.families import Family
from convert.io.storage import Store
from convert.verify.checks import ExpertCheck, PassCheck, read_stored
from convert.verify.tables import Raw, Stored, Table, to_raw


def _regex(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{prefix\}", r"(?P<prefix>.+?)").replace(r"\{e\}", r"(?P<e>0|[1-9]\d*)")
    return re.compile(f"^{body}$")


@dataclass
class LayerTensors:
    """The expert tensors of one layer on one side: per-expert by (role, e), fused by template."""

    per_expert: dict[tuple[str, int], Stored] = field(default_factory=dict)
    fused: dict[str, Stored] = field(default_factory=dict)


def classify(table: Table, family: Family, rename: bool = False) -> tuple[dict[str, LayerTensors], list[str]]:
    """Sort a side's tensors into expert layers (by prefix, model naming) and the names of every other tensor.

    `rename`: match the names as the family's renames turn them into model naming (a per-expert
    side), except names that already are fused tensors' names.
    """
    per_expert = [(role, _regex(tpl)) for role, tpl in family.expert_templates.items()]
    fused = sorted({t.template for ts in family.fused.values() for t in ts})
    fused_rx = [(tpl, _regex(tpl)) for tpl in fused]
    layers: dict[str, LayerTensors] = {}
    others = []
    for name, t in table.tensors.items():
        as_fused = any(rx.match(name) for _, rx in fused_rx)  # a fused tensor is named as the model holds it
        model = family.to_model(name) if rename and not as_fused else name
        hit = False
        for role, rx in per_expert:
            m = rx.match(model)
            if m:
                layers.setdefault(m["prefix"], LayerTensors()).per_expert[(role, int(m["e"]))] = t
                hit = True
        for tpl, rx in fused_rx:
            m = rx.match(model)
            if m:
                layers.setdefault(m["prefix"], LayerTensors()).fused[tpl] = t
                hit = True
        if not hit:
            others.append(name)
    return layers, others


def _op_counts(ops: list[dict[str, Any]], n_parts: int) -> list[int]:
    """How many tensors there are before each op and after the last (n_parts before the first)."""
    counts = [n_parts]
    for op in ops:
        counts.append(1 if op["op"] in ("concat", "interleave") else
                      op.get("parts", 2) if op["op"] in ("chunk", "deinterleave") else counts[-1])
    return counts


def _unfuse(sl: np.ndarray, ops: list[dict[str, Any]], n_parts: int) -> list[np.ndarray]:
    """One expert's fused slice back to its parts, undoing the family's op descriptions last to first.

    Views where the ops only cut or transpose; the undoing of a chunk or deinterleave (parts joined
    back) copies."""
    counts = _op_counts(ops, n_parts)
    tensors = [sl]
    for op, n_in in zip(reversed(ops), reversed(counts[:-1])):
        kind = op["op"]
        if kind == "transpose":
            d0, d1 = op.get("dims", [0, 1])
            tensors = [np.swapaxes(t, d0, d1) for t in tensors]
        elif kind in ("concat", "interleave"):  # one tensor holding n_in parts along dim
            (t,) = tensors
            dim = op.get("dim", 0 if kind == "concat" else -1) % t.ndim
            size = t.shape[dim] // n_in
            index = [slice(None)] * t.ndim
            tensors = []
            for j in range(n_in):
                index[dim] = slice(j * size, (j + 1) * size) if kind == "concat" else slice(j, None, n_in)
                tensors.append(t[tuple(index)])
        elif kind in ("chunk", "deinterleave"):  # several tensors that came out of one
            dim = op.get("dim", 0 if kind == "chunk" else -1) % tensors[0].ndim
            if kind == "chunk":
                tensors = [np.concatenate(tensors, axis=dim)]
            else:
                s = np.stack(tensors, axis=dim + 1)
                tensors = [s.reshape(*s.shape[:dim], s.shape[dim] * s.shape[dim + 1], *s.shape[dim + 2 :])]
        else:
            raise ValueError(f"unknown op {kind!r}")
    return tensors


def _part_shapes(slice_shape: tuple[int, ...], ops: list[dict[str, Any]], n_parts: int) -> list[tuple[int, ...]]:
    """The shapes `_unfuse` gives the parts of an expert slice of `slice_shape`, computed from the shapes alone;
    raises IndexError or ValueError (or ZeroDivisionError) where `_unfuse` would fail."""
    counts = _op_counts(ops, n_parts)
    shapes = [tuple(slice_shape)]
    for op, n_in in zip(reversed(ops), reversed(counts[:-1])):
        kind = op["op"]
        if kind == "transpose":
            out = []
            for s in shapes:
                d0, d1 = (_axis(d, len(s)) for d in op.get("dims", [0, 1]))
                t = list(s)
                t[d0], t[d1] = t[d1], t[d0]
                out.append(tuple(t))
            shapes = out
        elif kind in ("concat", "interleave"):
            (s,) = shapes
            dim = op.get("dim", 0 if kind == "concat" else -1) % len(s)
            size = s[dim] // n_in
            held = [size] * n_in if kind == "concat" else [len(range(j, s[dim], n_in)) for j in range(n_in)]
            shapes = [(*s[:dim], k, *s[dim + 1 :]) for k in held]
        elif kind in ("chunk", "deinterleave"):
            dim = op.get("dim", 0 if kind == "chunk" else -1) % len(shapes[0])
            first = shapes[0]
            if kind == "chunk":
                if any(len(s) != len(first) or s[:dim] + s[dim + 1 :] != first[:dim] + first[dim + 1 :]
                       for s in shapes):
                    raise ValueError("parts of different shapes cannot be joined")
                shapes = [(*first[:dim], sum(s[dim] for s in shapes), *first[dim + 1 :])]
            else:
                if any(s != first for s in shapes):
                    raise ValueError("parts of different shapes cannot be interleaved")
                shapes = [(*first[:dim], first[dim] * len(shapes), *first[dim + 1 :])]
        else:
            raise ValueError(f"unknown op {kind!r}")
    return shapes


def _axis(d: int, ndim: int) -> int:
    """Dim `d` (negative: from the end) of a tensor of `ndim` dims; IndexError where there is none."""
    if not -ndim <= d < ndim:
        raise IndexError(f"dim {d} of a {ndim}-dim tensor")
    return d % ndim


def _part_shape(slice_shape: tuple[int, ...], ops: list[dict[str, Any]], n_parts: int) -> tuple[int, ...] | None:
    """Each part's shape from an expert slice's shape, by the op descriptions (None if they do not fit)."""
    try:
        return _part_shapes(slice_shape, ops, n_parts)[0]
    except (IndexError, ZeroDivisionError, ValueError):
        return None


@dataclass(frozen=True)
class PerExpertSide:
    """Expert e's role r is the stored tensor `tensors[r][e]` (a role held by fewer experts has fewer tensors).

    `roles`, where given, limits load/expert_bytes/spans to those roles (one item of a check: checks.role_groups).
    """

    tensors: tuple[tuple[str, tuple[Stored, ...]], ...]

    def load(self, storage: Store, e: int, roles: Collection[str] | None = None) -> dict[str, tuple[Raw, str]]:
        out = {}
        for role, per in self._held(e, roles):
            t = per[e]
            out[role] = (to_raw(read_stored(storage, t), t.dtype, t.shape), t.name)
        return out

    def expert_bytes(self, e: int, roles: Collection[str] | None = None) -> int:
        return sum(per[e].nbytes for _, per in self._held(e, roles))

    def spans(self, e: int, roles: Collection[str] | None = None) -> list[tuple[str, int, int]]:
        """(file, start, end) of every byte range load(e, roles) reads."""
        return [(per[e].file, per[e].start, per[e].end) for _, per in self._held(e, roles)]

    def role_sets(self) -> list[tuple[str, ...]]:
        """The roles read together (each stored tensor holds one)."""
        return [(role,) for role, _ in self.tensors]

    def role_dtypes(self) -> dict[str, set[str]]:
        """Each role's dtype(s) as stored."""
        return {role: {t.dtype for t in per} for role, per in self.tensors}

    def _held(self, e: int, roles: Collection[str] | None) -> list[tuple[str, tuple[Stored, ...]]]:
        return [(r, per) for r, per in self.tensors if e < len(per) and (roles is None or r in roles)]


@dataclass(frozen=True)
class FusedPart:
    """One fused [E, ...] tensor and how an expert's slice holds its roles (the family table's ops).

    `num_experts`: its dim 0 (E, or more for roles of the family's `extra_experts`)."""

    tensor: Stored
    roles: tuple[str, ...]
    ops: tuple[tuple[tuple[str, Any], ...], ...]  # each op description as sorted items (hashable)
    num_experts: int

    def op_list(self) -> list[dict[str, Any]]:
        return [dict(o) for o in self.ops]


@dataclass(frozen=True)
class FusedSide:
    """Expert e's roles come from slice e (dim 0) of each fused tensor that has one.

    `roles`, where given, limits load/expert_bytes/spans to the fused tensors holding any of them.
    """

    parts: tuple[FusedPart, ...]

    def load(self, storage: Store, e: int, roles: Collection[str] | None = None) -> dict[str, tuple[Raw, str]]:
        out = {}
        for p in self._held(e, roles):
            t = p.tensor
            per = t.nbytes // p.num_experts
            sl = to_raw(read_stored(storage, t, e * per, (e + 1) * per), t.dtype, t.shape[1:])
            for role, piece in zip(p.roles, _unfuse(sl.bits, p.op_list(), len(p.roles))):
                out[role] = (Raw(piece, t.dtype), t.name)
        return out

    def expert_bytes(self, e: int, roles: Collection[str] | None = None) -> int:
        return sum(p.tensor.nbytes // p.num_experts for p in self._held(e, roles))

    def spans(self, e: int, roles: Collection[str] | None = None) -> list[tuple[str, int, int]]:
        """(file, start, end) of every byte range load(e, roles) reads: slice e of each fused tensor."""
        out = []
        for p in self._held(e, roles):
            per = p.tensor.nbytes // p.num_experts
            out.append((p.tensor.file, p.tensor.start + e * per, p.tensor.start + (e + 1) * per))
        return out

    def role_sets(self) -> list[tuple[str, ...]]:
        """The roles read together (those of one fused tensor)."""
        return [p.roles for p in self.parts]

    def role_dtypes(self) -> dict[str, set[str]]:
        """Each role's dtype as stored."""
        return {role: {p.tensor.dtype} for p in self.parts for role in p.roles}

    def _held(self, e: int, roles: Collection[str] | None) -> list[FusedPart]:
        return [p for p in self.parts if e < p.num_experts and (roles is None or any(r in roles for r in p.roles))]


Side = PerExpertSide | FusedSide


def _side(family: Family, prefix: str, found: LayerTensors, counts: dict[str, int], where: str
          ) -> tuple[Side | None, list[str]]:
    """The layout one side of a layer holds, or the problems that keep it from being one (`counts`: role -> experts)."""
    if found.per_expert and found.fused:
        a, b = next(iter(found.per_expert.values())), next(iter(found.fused.values()))
        return None, [f"{where}: layer {prefix} mixes per-expert ({a.name}) and fused ({b.name}) expert tensors"]
    if found.per_expert:
        problems = []
        extra = sorted(k for k in found.per_expert if k[1] >= counts[k[0]])
        if extra:
            stray = found.per_expert[extra[0]]
            problems.append(f"{where}: tensor {stray.name!r} is expert {extra[0][1]}, but there are {counts[extra[0][0]]} "
                            "experts" + (f" of role {extra[0][0]}" if extra[0][0] in family.extra_experts else ""))
        tensors = []
        for role, tpl in family.expert_templates.items():
            E = counts[role]
            missing = [e for e in range(E) if (role, e) not in found.per_expert]
            if missing:
                key = family.to_disk(tpl.format(prefix=prefix, e=missing[0]))
                problems.append(f"{where}: tensor {key!r} (expert {missing[0]} of {prefix}) is missing"
                                + (f", and {len(missing) - 1} more experts' {role}" if len(missing) > 1 else ""))
                continue
            tensors.append((role, tuple(found.per_expert[(role, e)] for e in range(E))))
        return (None, problems) if problems else (PerExpertSide(tuple(tensors)), [])
    names = {tpl.format(prefix=prefix): tpl for tpl in found.fused}
    layouts = [lay for lay, ts in family.fused.items() if {t.template for t in ts} == set(found.fused)]
    if len(layouts) != 1:
        return None, [f"{where}: layer {prefix} has fused tensors {sorted(names)}, not exactly one {family.name} "
                      f"layout ({sorted(family.fused)})"]
    parts, problems = [], []
    for t in family.fused[layouts[0]]:
        s = found.fused[t.template]
        ops = t.pipeline.to_json()
        k = len(t.parts)
        E = counts[t.parts[0]]
        if len(s.shape) < 2 or s.shape[0] != E or _part_shape(s.shape[1:], ops, k) is None:
            problems.append(f"{where}: tensor {s.name!r} has shape {list(s.shape)}; expected [E={E}, ...] holding "
                            f"{k} role(s) {list(t.parts)} as {ops}")
            continue
        parts.append(FusedPart(s, t.parts, tuple(tuple(sorted(o.items())) for o in ops), E))
    return (None, problems) if problems else (FusedSide(tuple(parts)), [])


def role_shapes(side: Side) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each role's per-expert (nn.Linear) shape and the stored tensor holding it (expert 0), from metadata."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    if isinstance(side, PerExpertSide):
        for role, per in side.tensors:
            out[role] = (per[0].shape, per[0].name)
        return out
    for p in side.parts:
        shape = _part_shape(p.tensor.shape[1:], p.op_list(), len(p.roles))
        assert shape is not None  # checked by _side
        for role in p.roles:
            out[role] = (shape, p.tensor.name)
    return out


def _stray_expert_tensors(table: Table, family: Family, others: list[str], rename: bool) -> list[str]:
    """Problems for tensors among `others` (not classified as expert tensors) named as expert tensors.

    A name under the experts module that is a numbered expert's tensor (`experts.{e}.*`) or starts
    with a fused tensor's name (`experts.gate_up_proj_*`) but is none of the family's (e.g. a
    quantization scale the family does not know) would otherwise pass as an ordinary tensor.
    """
    container = re.escape(f".{family.container}") if family.container else ""
    rx = re.compile(rf"^.+?{container}\.experts\.(?P<rest>.+)$")
    fused_leaves = family.fused_leaf_prefixes()
    problems = []
    for name in others:
        m = rx.match(family.to_model(name) if rename else name) or rx.match(name)
        if m and (re.match(r"\d+\.", m["rest"]) or m["rest"].startswith(fused_leaves)):
            problems.append(f"{table.where}: tensor {name!r} is named as an expert tensor but is not one of the "
                            f"{family.name} expert tensors ({sorted(family.role_leaves.values())} per expert, "
                            f"{list(fused_leaves)} fused)")
    return problems


def _fused_layers(table: Table, family: Family) -> int:
    layers, _ = classify(table, family)
    return sum(1 for lt in layers.values() if lt.fused)


def _merged(src: Table, dst: Table, family: Family, names: list[str], split: bool, config: dict[str, Any]
            ) -> tuple[list[PassCheck], set[str], set[str], list[str]]:
    """Pass checks for the tensors the family's merges and splits join or cut (Merge.cuts), from the table's patterns.

    Returns (checks, source names used, destination names produced, problems). Joining and cutting are along
    dim 0: part j of the joined tensor is its j-th contiguous run of rows, sized by the merge (equal parts) or
    the split (the config's shares).
    """
    checks: list[PassCheck] = []
    used_src: set[str] = set()
    made_dst: set[str] = set()
    problems: list[str] = []
    for merge in family.merges:
        try:
            cuts = merge.cuts(names, not split, family.to_model, family.to_disk, config, src.where)
        except ConversionError as exc:
            problems.append(str(exc))
            continue
        for cut in cuts:
            whole_side, part_side = (src, dst) if cut.read_whole else (dst, src)
            joined_t = whole_side.tensors.get(cut.whole)
            part_ts = [part_side.tensors.get(p) for p in cut.parts]
            missing = [n for n, t in ((cut.whole, joined_t), *zip(cut.parts, part_ts)) if t is None]
            if missing or joined_t is None or not joined_t.shape:
                problems.append(f"{dst.where}: tensor {(missing or [cut.whole])[0]!r} (joined from {len(cut.parts)} "
                                "tensors) is missing")
                continue
            try:
                sizes = merge.part_sizes(joined_t.shape[0], len(cut.parts), config, src.where)
            except ConversionError as exc:
                problems.append(f"{whole_side.where}: tensor {cut.whole!r} {list(joined_t.shape)}: {exc}")
                continue
            row = joined_t.nbytes // joined_t.shape[0]
            start = joined_t.start
            for _part, part_t, rows in zip(cut.parts, part_ts, sizes):
                assert part_t is not None
                sub = Stored(joined_t.name, joined_t.file, joined_t.dtype, (rows, *joined_t.shape[1:]), start,
                             start + rows * row)
                start += rows * row
                checks.append(PassCheck(sub, part_t) if cut.read_whole else PassCheck(part_t, sub))
            if cut.read_whole:
                used_src.add(cut.whole)
                made_dst.update(cut.parts)
            else:
                used_src.update(cut.parts)
                made_dst.add(cut.whole)
    return checks, used_src, made_dst, problems


def base_relation(
    src: Table, dst: Table, family: Family, num_experts: int, config: dict[str, Any] | None = None
) -> tuple[list[ExpertCheck], list[PassCheck], list[str], list[str]]:
    """Checks that prove `dst` is a conversion of `src` (both read with `family`'s tables).

    The direction is the one that fuses layers: a split when the source has more fused expert
    layers than the destination, else a fuse. A fuse reads the source's names through the
    family's renames (as transformers loads) and the destination as it is; a split reads the
    source as it is and expects every destination name to be what the renames' inverses give
    (as transformers saves). Returns (expert checks, pass-through checks, source problems,
    destination mismatches): source problems mean the source itself is not a valid checkpoint
    of the family. `config`: the source's config.json (for merges whose part count it gives, and the
    experts of roles held by more than `num_experts`, the family's `extra_experts`).
    """
    quantized_src, quantized_dst = family.companions_in(src.tensors), family.companions_in(dst.tensors)
    if quantized_src and not quantized_dst and any(t.dtype in ("F8_E4M3", "F8_E5M2") for t in src.tensors.values()):
        return [], [], [], [f"{dst.where}: holds no quantization scales ({quantized_src}) where the source has them: a "
                            "dequantized copy (--dtype on an FP8 source); convert.verify checks lossless conversions "
                            "only, not dequantization"]
    family = family.with_companions(quantized_src or quantized_dst)
    try:
        counts = family.role_experts(config or {}, num_experts, src.where)
    except ConversionError as exc:
        return [], [], [str(exc)], []
    split = _fused_layers(src, family) > _fused_layers(dst, family)
    src_layers, src_others = classify(src, family, rename=not split)
    dst_layers, dst_others = classify(dst, family, rename=split)
    src_problems: list[str] = _stray_expert_tensors(src, family, src_others, not split)
    found: list[str] = _stray_expert_tensors(dst, family, dst_others, split)
    experts: list[ExpertCheck] = []
    if split:  # each per-expert name must be exactly what a split writes
        for layer in dst_layers.values():
            for t in layer.per_expert.values():
                if family.to_disk(family.to_model(t.name)) != t.name:
                    found.append(f"{dst.where}: tensor {t.name!r} should be named "
                                 f"{family.to_disk(family.to_model(t.name))!r} (as save_pretrained names it)")
    for prefix in sorted(set(src_layers) | set(dst_layers)):
        if prefix not in dst_layers:
            one = next(chain(src_layers[prefix].per_expert.values(), src_layers[prefix].fused.values()))
            found.append(f"{dst.where}: expert layer {prefix} of the source (e.g. {one.name!r}) is missing")
            continue
        if prefix not in src_layers:
            one = next(chain(dst_layers[prefix].per_expert.values(), dst_layers[prefix].fused.values()))
            found.append(f"{dst.where}: expert layer {prefix} (e.g. {one.name!r}) is not in the source")
            continue
        a, pa = _side(family, prefix, src_layers[prefix], counts, src.where)
        b, pb = _side(family, prefix, dst_layers[prefix], counts, dst.where)
        src_problems += pa
        found += pb
        if a is None or b is None:
            continue
        ra, rb = role_shapes(a), role_shapes(b)
        bad = [r for r in sorted(set(ra) | set(rb)) if r not in ra or r not in rb or ra[r][0] != rb[r][0]]
        if bad:
            r = bad[0]
            if r not in rb or r not in ra:
                found.append(f"{dst.where}: layer {prefix} role {r} is only on one side")
            else:
                found.append(f"{dst.where}: tensor {rb[r][1]!r} gives role {r} the per-expert shape "
                             f"{list(rb[r][0])}; the source ({ra[r][1]!r}) has {list(ra[r][0])}")
            continue
        experts.append(ExpertCheck(prefix, max(counts.values()), a, b, streaming=True))
    passes, used_src, made_dst, problems = _merged(src, dst, family, src_others, split, config or {})
    found += problems
    rename = family.to_disk if split else family.to_model
    dst_set = set(dst_others)
    accounted = set(made_dst)
    for name in src_others:
        if name in used_src:
            continue
        out = rename(name)
        accounted.add(out)
        if out not in dst_set:
            where = "as an expert tensor" if out in dst.tensors else "at all"
            named = f" (as {out!r})" if out != name else ""
            found.append(f"{dst.where}: tensor {name!r} of the source is not in the destination{named} {where}")
            continue
        passes.append(PassCheck(src.tensors[name], dst.tensors[out]))
    for name in sorted(dst_set - accounted):
        found.append(f"{dst.where}: tensor {name!r} is not in the source")
    return experts, passes, src_problems, found
