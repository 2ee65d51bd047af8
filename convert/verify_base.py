"""What a correct base-weight conversion must satisfy, derived from the family tables alone.

For every expert layer, each side (source and destination) is read in whichever layout it
holds (per-expert, or any fused layout of the family); one expert is decoded to its roles in
nn.Linear [out, in] form straight from the family table's description (concat/interleave,
transposed or not) and the two sides are compared role by role. Every other tensor must
reach the destination with its name and shape unchanged. This module does not use the
converter's planner, expert grouping or transforms: it re-derives the relation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from convert.families import Family
from convert.storage import Storage
from convert.verify_checks import ExpertCheck, PassCheck, read_stored
from convert.verify_tables import Stored, Table, to_tensor


def _regex(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{prefix\}", r"(?P<prefix>.+?)").replace(r"\{e\}", r"(?P<e>0|[1-9]\d*)")
    return re.compile(f"^{body}$")


@dataclass
class LayerTensors:
    """The expert tensors of one layer on one side: per-expert by (role, e), fused by template."""

    per_expert: dict[tuple[str, int], Stored] = field(default_factory=dict)
    fused: dict[str, Stored] = field(default_factory=dict)


def classify(table: Table, family: Family) -> tuple[dict[str, LayerTensors], list[str]]:
    """Sort a side's tensors into expert layers (by prefix) and the names of every other tensor."""
    per_expert = [(role, _regex(tpl)) for role, tpl in family.per_expert.items()]
    fused = sorted({t.template for ts in family.fused.values() for t in ts})
    fused_rx = [(tpl, _regex(tpl)) for tpl in fused]
    layers: dict[str, LayerTensors] = {}
    others = []
    for name, t in table.tensors.items():
        hit = False
        for role, rx in per_expert:
            m = rx.match(name)
            if m:
                layers.setdefault(m["prefix"], LayerTensors()).per_expert[(role, int(m["e"]))] = t
                hit = True
        for tpl, rx in fused_rx:
            m = rx.match(name)
            if m:
                layers.setdefault(m["prefix"], LayerTensors()).fused[tpl] = t
                hit = True
        if not hit:
            others.append(name)
    return layers, others


@dataclass(frozen=True)
class PerExpertSide:
    """Expert e's role r is the stored tensor `tensors[r][e]`."""

    tensors: tuple[tuple[str, tuple[Stored, ...]], ...]

    def load(self, storage: Storage, e: int) -> dict[str, tuple[torch.Tensor, str]]:
        out = {}
        for role, per in self.tensors:
            t = per[e]
            out[role] = (to_tensor(read_stored(storage, t), t.dtype, t.shape), t.name)
        return out

    def expert_bytes(self, e: int) -> int:
        return sum(per[e].nbytes for _, per in self.tensors)

    def spans(self, e: int) -> list[tuple[str, int, int]]:
        """(file, start, end) of every byte range load(e) reads."""
        return [(per[e].file, per[e].start, per[e].end) for _, per in self.tensors]


@dataclass(frozen=True)
class FusedPart:
    """One fused [E, ...] tensor and how an expert's slice holds its roles (from the family table)."""

    tensor: Stored
    roles: tuple[str, ...]
    op: str
    transpose: bool


@dataclass(frozen=True)
class FusedSide:
    """Expert e's roles come from slice e (dim 0) of each fused tensor."""

    parts: tuple[FusedPart, ...]
    num_experts: int

    def load(self, storage: Storage, e: int) -> dict[str, tuple[torch.Tensor, str]]:
        out = {}
        for p in self.parts:
            t = p.tensor
            per = t.nbytes // self.num_experts
            sl = to_tensor(read_stored(storage, t, e * per, (e + 1) * per), t.dtype, t.shape[1:])
            k = len(p.roles)
            if p.op == "concat":  # slice = cat(parts (transposed if so), dim 0)
                pieces = list(sl.chunk(k, dim=0))
            else:  # slice = stack(parts, dim -1).flatten(-2): role j at last-dim positions j, j+k, ...
                pieces = [sl[..., j::k] for j in range(k)]
            for role, piece in zip(p.roles, pieces):
                out[role] = (piece.T if p.transpose else piece, t.name)
        return out

    def expert_bytes(self, e: int) -> int:
        return sum(p.tensor.nbytes // self.num_experts for p in self.parts)

    def spans(self, e: int) -> list[tuple[str, int, int]]:
        """(file, start, end) of every byte range load(e) reads: slice e of each fused tensor."""
        out = []
        for p in self.parts:
            per = p.tensor.nbytes // self.num_experts
            out.append((p.tensor.file, p.tensor.start + e * per, p.tensor.start + (e + 1) * per))
        return out


Side = PerExpertSide | FusedSide


def _side(family: Family, prefix: str, found: LayerTensors, E: int, where: str) -> tuple[Side | None, list[str]]:
    """The layout one side of a layer holds, or the problems that keep it from being one."""
    if found.per_expert and found.fused:
        a, b = next(iter(found.per_expert.values())), next(iter(found.fused.values()))
        return None, [f"{where}: layer {prefix} mixes per-expert ({a.name}) and fused ({b.name}) expert tensors"]
    if found.per_expert:
        problems = []
        extra = sorted(k for k in found.per_expert if k[1] >= E)
        if extra:
            t = found.per_expert[extra[0]]
            problems.append(f"{where}: tensor {t.name!r} is expert {extra[0][1]}, but there are {E} experts")
        tensors = []
        for role, tpl in family.per_expert.items():
            missing = [e for e in range(E) if (role, e) not in found.per_expert]
            if missing:
                key = tpl.format(prefix=prefix, e=missing[0])
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
        k = len(t.parts)
        axis = 1 if t.op == "concat" else len(s.shape) - 1
        if len(s.shape) < 2 or s.shape[0] != E or s.shape[axis] % k or (t.transpose and len(s.shape) != 3):
            problems.append(f"{where}: tensor {s.name!r} has shape {list(s.shape)}; expected [E={E}, ...] holding "
                            f"{k} role(s) {list(t.parts)}")
            continue
        parts.append(FusedPart(s, t.parts, t.op, t.transpose))
    return (None, problems) if problems else (FusedSide(tuple(parts), E), [])


def role_shapes(side: Side) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each role's per-expert (nn.Linear) shape and the stored tensor holding it (expert 0), from metadata."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    if isinstance(side, PerExpertSide):
        for role, per in side.tensors:
            out[role] = (per[0].shape, per[0].name)
        return out
    for p in side.parts:
        sl = list(p.tensor.shape[1:])
        axis = 0 if p.op == "concat" else len(sl) - 1
        sl[axis] //= len(p.roles)
        shape = tuple(reversed(sl)) if p.transpose else tuple(sl)
        for role in p.roles:
            out[role] = (shape, p.tensor.name)
    return out


def base_relation(
    src: Table, dst: Table, family: Family, num_experts: int
) -> tuple[list[ExpertCheck], list[PassCheck], list[str], list[str]]:
    """Checks that prove `dst` is a conversion of `src` (both read with `family`'s tables).

    Returns (expert checks, pass-through checks, source problems, destination mismatches):
    source problems mean the source itself is not a valid checkpoint of the family.
    """
    src_layers, src_others = classify(src, family)
    dst_layers, dst_others = classify(dst, family)
    src_problems: list[str] = []
    found: list[str] = []
    experts: list[ExpertCheck] = []
    for prefix in sorted(set(src_layers) | set(dst_layers)):
        if prefix not in dst_layers:
            one = next(iter({**src_layers[prefix].per_expert, **src_layers[prefix].fused}.values()))
            found.append(f"{dst.where}: expert layer {prefix} of the source (e.g. {one.name!r}) is missing")
            continue
        if prefix not in src_layers:
            one = next(iter({**dst_layers[prefix].per_expert, **dst_layers[prefix].fused}.values()))
            found.append(f"{dst.where}: expert layer {prefix} (e.g. {one.name!r}) is not in the source")
            continue
        a, pa = _side(family, prefix, src_layers[prefix], num_experts, src.where)
        b, pb = _side(family, prefix, dst_layers[prefix], num_experts, dst.where)
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
        experts.append(ExpertCheck(prefix, num_experts, a, b, streaming=True))
    passes = []
    dst_set = set(dst_others)
    for name in src_others:
        if name not in dst_set:
            where = "as an expert tensor" if name in dst.tensors else "at all"
            found.append(f"{dst.where}: tensor {name!r} of the source is not in the destination {where}")
            continue
        passes.append(PassCheck(src.tensors[name], dst.tensors[name]))
    for name in sorted(dst_set - set(src_others)):
        found.append(f"{dst.where}: tensor {name!r} is not in the source")
    return experts, passes, src_problems, found

