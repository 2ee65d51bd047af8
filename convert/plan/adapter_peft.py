"""Layout peft_target_parameters (convert.formats.adapter_layouts.peft_target_parameters), planning and compute.

split: one piece per EP slice (FoldedSplit): the slice's lora_A rows are one byte range, lora_B is expert-minor, so
the piece gathers its experts' columns from the whole B in one strided copy; wrappers in other producers' packings
(convert.formats.lora_producers: older orientation, expert-major lora_B) go through their variant module's compute.
keep: a target loading this layout (its expert_layout "peft") gets the wrappers as they are, renamed.
fuse (`--layout peft`): lora_A rows of one expert are a byte range (copies); lora_B is built in row chunks from every
expert (FoldedBBuild), peft 0.21's packing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families import Family
from convert.formats.adapter_layouts import ExpertLoraGroup, fused_order, lora_roles, lora_tensors, module_key
from convert.formats.adapter_layouts.peft_target_parameters import NAME
from convert.formats.checkpoint import TensorRef
from convert.formats.lora_producers import IN_OUT, ORDERS, ORIENTATIONS, RANK_MAJOR, describe, stamp_current
from convert.formats.safetensors import DTYPE_SIZES, numel
from convert.io.memory import thread_scratch
from convert.plan.adapter_build import (
    Builder,
    block_read,
    expert_outputs,
    family_prefix,
    fused_wrappers,
    group_scale,
    missing_roles,
    zero_per_expert,
    zero_rank,
    zero_scale,
)
from convert.plan.adapter_scaling import keys_matching_no_module, scale_for_rank, source_scale
from convert.plan.adapter_transforms import GATHER_SCRATCH, merge_rows, torch_dtype
from convert.plan.base import Piece, Read, Write, copy_pieces
from convert.plan.transforms import from_bytes, to_bytes
from convert.targets.rules import TargetRules
from sharding.ep import expert_slices

PATTERN = NAME
LAYOUT = "peft"  # fuse_adapter --layout peft
SERVED_AS = "peft"  # the targets' expert_layout that loads it as is (peft; vLLM for gpt-oss, Qwen3.5-MoE)
NEEDS_FAMILY = True
HOLDS_EXTRA_EXPERTS = True  # each wrapper folds its own expert count


def words(g: ExpertLoraGroup) -> str:
    """The layout of `g` in words: its pattern, with the packing where it is not peft 0.21's."""
    if not keeps(g):
        return f"{g.pattern} ({describe(g.orientation, g.b_order)})"
    return g.pattern


def keeps(g: ExpertLoraGroup) -> bool:
    """Whether a target loading this layout takes `g` as it is: only in peft 0.21's packing."""
    return (g.orientation, g.b_order) == (IN_OUT, RANK_MAJOR)


def a_stacks(family: Family) -> set[tuple[str, ...]] | None:
    """Roles whose per-expert lora_A must agree for one wrapper to hold them with one lora_A (else it stacks them)."""
    return {parts for parts, _, _ in lora_tensors(family) if len(parts) > 1}


def fuse_config(family: Family, roles: list[str], params: set[str]) -> dict[str, Any]:
    """adapter_config.json edits of a fuse output: target_parameters lists the wrapped fused parameters."""
    return {"target_modules_add": [], "target_parameters": sorted(params)}


def fuse_notes(family: Family, shared_a: bool, config: dict[str, Any], kept: set[str]) -> list[str]:
    """Notes of a fuse output: stacked lora_A, and pattern keys peft 0.21 warns about (config: the rewritten one)."""
    notes = []
    if not shared_a:
        stacked = ", ".join(f"{'/'.join(p)} ({leaf})" for p, leaf, _ in lora_tensors(family) if len(p) > 1)
        notes.append(f"the roles of one fused parameter have different lora_A: {stacked}: its wrapper stacks them "
                     "(rank k*r, block-diagonal lora_B, alpha scaled to keep every delta; exact)")
    unmatched = keys_matching_no_module(config, kept)
    if unmatched:
        notes.append(f"peft 0.21 warns when it loads this adapter that the rank_pattern/alpha_pattern keys {unmatched} "
                     "'did not match any targeted module and were ignored': its check looks at target_modules only; "
                     "peft does apply them to the target_parameters they match (the deltas are exact)")
    return notes


def written_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """adapter_config.json of a fuse output: it names peft 0.21's packing, whatever packing the source was read from
    (markers say rank_major, an older peft_version is dropped: convert.formats.lora_producers.stamp_current)."""
    return stamp_current(config)


def split_config(config: dict[str, Any], family: Family, roles: list[str], names: Any) -> dict[str, Any]:
    """adapter_config.json edits of a split output in this layout (a target whose expert_layout is "peft")."""
    return {"target_modules_add": [], "target_parameters": target_parameters(config, family, roles)}


def split(b: Builder, g: ExpertLoraGroup, family: Family | None, ep: int, rules: TargetRules) -> None:
    """Layer `g` for the target: kept in this layout where the target loads it (`keep`), else every expert's pair
    gathered from the wrappers (`_split`, any packing); zero pairs where the target needs them."""
    assert family is not None
    prefix = family_prefix(family, g.prefix, b.where, b.names)
    if rules.expert_layout == SERVED_AS:
        keep(b, g, family, prefix, rules)
        return
    _split(b, g, family, prefix, ep)
    if rules.all_roles:
        zero_per_expert(b, g, family, prefix, rules)


def _split(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, ep: int) -> None:
    """One piece per EP slice (and per run of its experts held by the same wrappers, where a role has more experts
    than E): every such wrapper's lora_A rows of those experts and its whole lora_B."""
    wrappers, reads_of, names_of = [], [], []
    for roles, param in g.target_param:
        E = g.experts_of(roles[0])
        fa, fb = g.factor(roles, "A"), g.factor(roles, "B")
        r = g.rank_of(roles[0])
        out, inn = g.dims_of(roles[0])
        da, db = b.out_dtype(fa), b.out_dtype(fb)
        src_key = module_key(g.prefix, "experts", param)
        names = {
            (role, e): expert_outputs(b, g, family, prefix, role, e, src_key, (da, db)) for e in range(E) for role in roles
        }
        order = g.fused_order if len(roles) > 1 else None
        wrappers.append(FoldedFactors(fa.dtype, fb.dtype, out * len(roles), inn, r, E, len(roles), order, da, db,
                                      g.orientation, g.b_order))
        reads_of.append((b.ref(fa), b.ref(fb)))
        names_of.append((roles, names, r * inn * DTYPE_SIZES[da], out * r * DTYPE_SIZES[db], da, db))
    bounds = sorted({f.experts for f in wrappers})
    for whole in expert_slices(g.slots, ep):
        cuts = [whole.start, *(n for n in bounds if whole.start < n < whole.stop), whole.stop]
        for experts in (range(lo, hi) for lo, hi in zip(cuts, cuts[1:])):
            if len(experts):
                _split_piece(b, experts, wrappers, reads_of, names_of)


def _split_piece(b: Builder, experts: range, wrappers: list[FoldedFactors],
                      reads_of: list[tuple[TensorRef, TensorRef]], names_of: list[Any]) -> None:
    """The piece splitting `experts` (held by the same wrappers) out of every wrapper that holds them."""
    held = [i for i, f in enumerate(wrappers) if experts.stop <= f.experts]
    reads: list[Read] = []
    writes: list[Write] = []
    for i in held:
        f, (ra, rb), (roles, names, a_bytes, b_bytes, da, db) = wrappers[i], reads_of[i], names_of[i]
        first = block_read(ra, experts.start, f.rank * f.a_cols)
        reads += [Read(ra.file, first.start, first.start + len(experts) * (first.end - first.start), ra.info.dtype),
                  Read(rb.file, rb.info.start, rb.info.end, rb.info.dtype)]
        for e in experts:
            for role in roles:
                writes += [Write(names[(role, e)][0], 0, a_bytes, da), Write(names[(role, e)][1], 0, b_bytes, db)]
    split = FoldedSplit(tuple(wrappers[i] for i in held), experts.start, experts.stop)
    b.pieces.append(Piece(tuple(reads), tuple(writes), split, experts.start))


def keep(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, rules: TargetRules) -> None:
    """A peft target_parameters layer kept in that layout under the target's names; with rules.all_roles, a
    zero wrapper for each fused parameter it lacks (the wrappers re-nested in the family's declared order)."""
    present = {roles: param for roles, param in g.target_param}
    wanted = [(parts, leaf) for parts, leaf, _ in lora_tensors(family)
              if parts in present or (rules.all_roles and not set(parts) & set(g.roles))]
    partial = [parts for parts, _ in wanted if parts not in present and set(parts) & set(g.roles)]
    if partial:
        raise ConversionError(f"{b.where}: layer {g.prefix}: the peft wrapper of {'/'.join(partial[0])} holds only some of "
                              "its roles; the peft layout cannot hold that")
    experts = b.names.out_module(family.experts_path.format(prefix=prefix))
    r0 = zero_rank(rules, g, b.src.config)
    for i, (parts, leaf) in enumerate(wanted):
        nest = "base_layer." * (len(wanted) - 1 - i)
        name_a, name_b = f"{experts}.{nest}lora_A.weight", f"{experts}.{nest}lora_B.weight"
        key = module_key(experts, leaf)
        if parts in present:
            fa, fb = g.factor(parts, "A"), g.factor(parts, "B")
            for f, name in ((fa, name_a), (fb, name_b)):
                t, p = copy_pieces(b.ref(f), name, b.dtype, b.chunk)
                b.targets.append(t)
                b.pieces += p
            src_key = module_key(g.prefix, "experts", present[parts])
            b.module(key, source_scale(b.src.config, src_key), re.escape(f"experts.{leaf}"), (name_b,))
            continue
        out, inn = missing_roles(family, g)[[r for r, _ in missing_roles(family, g)].index(parts[0])][1]
        dt = b.out_dtype(g.factors[0])
        E = g.experts_of(parts[0])
        for name, shape in ((name_a, (E * r0, inn)), (name_b, (out * len(parts), r0 * E))):
            b.target(name, dt, shape)
            b.zeros(name, numel(shape) * DTYPE_SIZES[dt], dt, None)
        b.module(key, zero_scale(b.src.config, r0), re.escape(f"experts.{leaf}"), (name_b,))


def fuse(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, shared_a: bool,
         rules: TargetRules | None = None) -> set[str]:
    """The peft wrappers of layer `g` (and, with rules.all_roles, a zero wrapper for each fused parameter none of
    whose roles the layer has); returns the target_parameters entries."""
    wrappers = fused_wrappers(family, tuple(lora_roles(family)) if rules and rules.all_roles else g.roles)
    targeted = set()
    for i, (roles, template) in enumerate(wrappers):
        E = g.experts_of(roles[0])
        missing = [r for r in roles if r not in g.roles]
        if missing and len(missing) == len(roles):
            assert rules is not None
            experts_path, param = template.format(prefix=prefix).rsplit(".", 1)
            experts_path = b.names.out_module(experts_path)
            nest = "base_layer." * (len(wrappers) - 1 - i)
            r0 = zero_rank(rules, g, b.src.config)
            out, inn = dict(missing_roles(family, g))[roles[0]]
            dt = b.out_dtype(g.factors[0])
            names = []
            for which, shape in (("A", (E * r0, inn)), ("B", (out * len(roles), r0 * E))):
                name = f"{experts_path}.{nest}lora_{which}.weight"
                b.target(name, dt, shape)
                b.zeros(name, numel(shape) * DTYPE_SIZES[dt], dt, None)
                names.append(name)
            b.module(module_key(experts_path, param), zero_scale(b.src.config, r0), re.escape(f"experts.{param}"),
                     (names[1],))
            targeted.add(template.replace("{prefix}.", ""))
            continue
        if missing:
            raise ConversionError(
                f"{b.where}: layer {g.prefix} has LoRA for {'/'.join(r for r in roles if r in g.roles)} but not "
                f"{'/'.join(missing)}; the peft {template.rsplit('.', 1)[-1]} wrapper needs both"
            )
        experts_path, param = template.format(prefix=prefix).rsplit(".", 1)
        experts_path = b.names.out_module(experts_path)
        nest = "base_layer." * (len(wrappers) - 1 - i)
        name_a, name_b = f"{experts_path}.{nest}lora_A.weight", f"{experts_path}.{nest}lora_B.weight"
        r = g.rank_of(roles[0])
        out, inn = g.dims_of(roles[0])
        k = len(roles)
        expand = k > 1 and not shared_a
        R = r * k if expand else r
        a0, b0 = g.factor((roles[0],), "A", 0), g.factor((roles[0],), "B", 0)
        da, db = b.out_dtype(a0), b.out_dtype(b0)
        b.target(name_a, da, (E * R, inn))
        b.target(name_b, db, (out * k, R * E))
        src_scale = group_scale(b, g, family, prefix, roles)
        key = module_key(experts_path, param)
        b.module(key, scale_for_rank(b.src.config, src_scale, R), re.escape(f"experts.{param}"), (name_b,))
        targeted.add(template.replace("{prefix}.", ""))
        a_roles = roles if expand else roles[:1]
        a_bytes = R * inn * DTYPE_SIZES[da]
        for e in range(E):
            reads = tuple(block_read(b.ref(g.factor((role,), "A", e)), 0, r * inn) for role in a_roles)
            b.pieces.append(Piece(reads, (Write(name_a, e * a_bytes, (e + 1) * a_bytes, da),), None, e))
        row_bytes = R * E * DTYPE_SIZES[db]
        step = max(1, b.chunk // max(1, row_bytes * k))
        order = fused_order(family, roles) if k > 1 else None
        for lo in range(0, out, step):
            hi = min(out, lo + step)
            b_reads: list[Read] = []
            for role in roles:
                for e in range(E):
                    ref = b.ref(g.factor((role,), "B", e))
                    item = ref.info.itemsize
                    b_reads.append(Read(ref.file, ref.info.start + lo * r * item, ref.info.start + hi * r * item, ref.info.dtype))
            if k > 1 and order == "interleave":
                writes: tuple[Write, ...] = (Write(name_b, k * lo * row_bytes, k * hi * row_bytes, db),)
            else:
                writes = tuple(Write(name_b, (j * out + lo) * row_bytes, (j * out + hi) * row_bytes, db) for j in range(k))
            build = FoldedBBuild(tuple(rd.dtype for rd in b_reads), hi - lo, r, E, k, order, expand, db)
            b.pieces.append(Piece(tuple(b_reads), writes, build, None))
    return targeted


def target_parameters(config: dict[str, Any], family: Family, roles: list[str]) -> list[str]:
    """target_parameters of a peft-layout output: the family's fused expert parameters of `roles`, and the source's
    entries for other parameters (e.g. a router's weight)."""
    fused = {t.replace("{prefix}.", "") for _, t in fused_wrappers(family, tuple(roles))}
    leaves = {t.rsplit(".", 1)[-1] for t in fused}
    other = [t for t in config.get("target_parameters") or [] if ".experts." not in f".{t}" or
             t.rsplit(".", 1)[-1] not in leaves]
    return sorted(fused | set(other))


# ----------------------------------------------------------------------------- compute


@dataclass(frozen=True)
class FoldedFactors:
    """One peft target_parameters wrapper: lora_A [E*r, in] (expert-major) and lora_B [out, r*E] (expert-minor).

    `out` counts the rows of every role; `parts` roles share the wrapper's lora_A and split
    lora_B's rows (halves or interleaved by `order`).
    """

    a_dtype: str
    b_dtype: str
    out: int
    inn: int
    rank: int
    experts: int
    parts: int
    order: str | None
    dst_a: str
    dst_b: str
    orientation: str = IN_OUT
    b_order: str = RANK_MAJOR

    @property
    def a_cols(self) -> int:
        """Columns of the stored lora_A: `in` in peft >= 0.19.1's orientation, `out` (every role) in the older one."""
        return ORIENTATIONS[self.orientation].stored_dims(self.out, self.inn)[0]

    @property
    def b_rows(self) -> int:
        """Rows of the stored lora_B: `out` (every role), or `in` in the older orientation."""
        return ORIENTATIONS[self.orientation].stored_dims(self.out, self.inn)[1]


@dataclass(frozen=True)
class FoldedSplit:
    """peft target_parameters wrappers -> each expert's per-role lora_A [r, in] and lora_B [out/parts, r].

    For the experts [first, last) of one EP slice. Reads, per wrapper in order: the lora_A rows
    of those experts (one range), then the whole lora_B. Writes, per wrapper, per expert, per
    role: lora_A (the wrapper's A, for every role), then lora_B. The A outputs are views of the
    read; all B matrices of a wrapper come from one strided copy, back to back.
    """

    wrappers: tuple[FoldedFactors, ...]
    first: int
    last: int

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The writes' bytes, in write order (views of this thread's scratch or of `bufs`)."""
        n_e = self.last - self.first
        out: list[memoryview] = []
        for i, f in enumerate(self.wrappers):
            if (f.orientation, f.b_order) != (IN_OUT, RANK_MAJOR):  # another producer's packing
                out += self._general(f, bufs[2 * i], bufs[2 * i + 1], GATHER_SCRATCH + 2 * i)
                continue
            a_size = f.rank * f.inn * DTYPE_SIZES[f.dst_a]
            a = memoryview(bufs[2 * i]).cast("B")
            if f.dst_a != f.a_dtype:
                cast = thread_scratch(n_e * a_size, GATHER_SCRATCH + 2 * i + 1)
                from_bytes(cast, f.dst_a, (n_e * f.rank, f.inn)).copy_(from_bytes(a, f.a_dtype, (n_e * f.rank, f.inn)))
                a = cast
            n = f.out // f.parts
            b = from_bytes(bufs[2 * i + 1], f.b_dtype, (f.out, f.rank, f.experts))[:, :, self.first : self.last]
            if f.parts > 1 and f.order == "interleave":
                picked = b.view(n, f.parts, f.rank, n_e).permute(3, 1, 0, 2)  # role j = rows j::parts
            else:
                picked = b.view(f.parts, n, f.rank, n_e).permute(3, 0, 1, 2)  # role j = the j-th block of rows
            b_size = n * f.rank * DTYPE_SIZES[f.dst_b]
            gathered = thread_scratch(n_e * f.parts * b_size, GATHER_SCRATCH + 2 * i)
            from_bytes(gathered, f.dst_b, (n_e, f.parts, n, f.rank)).copy_(picked)  # one copy (and cast) for all
            for e in range(n_e):
                a_e = a[e * a_size : (e + 1) * a_size]
                for j in range(f.parts):
                    k = e * f.parts + j
                    out += [a_e, gathered[k * b_size : (k + 1) * b_size]]
        return out

    def _general(self, f: FoldedFactors, a_buf: bytes | memoryview, b_buf: bytes | memoryview,
                 slot: int) -> list[memoryview]:
        """Wrappers in another producer's packing: per expert and role, lora_A [r, in] then lora_B [out/parts, r].

        Expert e's stored factors: A_e = A.view(E, r, a_cols)[e]; B_e from lora_B's column-order module
        (convert.formats.lora_producers.rank_major / expert_major); the orientation module (peft_current /
        peft_legacy) turns (A_e, B_e) into nn.Linear form (the older orientation: lora_A B_e^T, lora_B A_e^T).
        """
        n_e = self.last - self.first
        a = from_bytes(a_buf, f.a_dtype, (n_e, f.rank, f.a_cols))
        whole_b = from_bytes(b_buf, f.b_dtype, (f.b_rows, f.rank * f.experts))
        b = ORDERS[f.b_order].expert_columns(whole_b, f.rank, f.experts)[self.first : self.last]
        new_a, new_b = ORIENTATIONS[f.orientation].to_linear(a, b)  # [n_e, r, in], [n_e, out, r]
        n = f.out // f.parts
        if f.parts > 1 and f.order == "interleave":
            parts = new_b.reshape(n_e, n, f.parts, f.rank).permute(0, 2, 1, 3)
        else:
            parts = new_b.reshape(n_e, f.parts, n, f.rank)
        a_size, b_size = f.rank * f.inn * DTYPE_SIZES[f.dst_a], n * f.rank * DTYPE_SIZES[f.dst_b]
        buf_a = thread_scratch(n_e * a_size, slot + 1)
        from_bytes(buf_a, f.dst_a, (n_e, f.rank, f.inn)).copy_(new_a)
        buf_b = thread_scratch(n_e * f.parts * b_size, slot)
        from_bytes(buf_b, f.dst_b, (n_e, f.parts, n, f.rank)).copy_(parts)
        out: list[memoryview] = []
        for e in range(n_e):
            for j in range(f.parts):
                k = e * f.parts + j
                out += [buf_a[e * a_size : (e + 1) * a_size], buf_b[k * b_size : (k + 1) * b_size]]
        return out


@dataclass(frozen=True)
class FoldedBBuild:
    """Rows [lo, hi) of every expert's per-role B_e [n, r] -> the matching rows of peft lora_B, expert-minor.

    Reads, in order: for each of `parts` roles, for each of the `experts` experts, rows [lo, hi)
    of that role's B_e (`hi - lo` x `rank`). With `expand`, each role gets its own block of the
    folded rank (rank * parts per expert, role j in block j; the matching lora_A stacks the
    roles' A), which is exact when gate and up have different lora_A. Writes: "concat": one
    block of rows per role (role j's rows j*n+lo .. j*n+hi); "interleave": rows 2*lo .. 2*hi.
    """

    dtypes: tuple[str, ...]
    rows: int
    rank: int
    experts: int
    parts: int
    order: str | None
    expand: bool
    dst_dtype: str

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The fused B rows of this chunk, one buffer per write."""
        import torch

        dst = torch_dtype(self.dst_dtype)
        folded_rank = self.rank * (self.parts if self.expand else 1)
        blocks = []
        for j in range(self.parts):
            per_e = [
                from_bytes(bufs[j * self.experts + e], self.dtypes[j * self.experts + e], (self.rows, self.rank))
                for e in range(self.experts)
            ]
            full = torch.zeros((self.rows, folded_rank, self.experts), dtype=dst)
            at = j * self.rank if self.expand else 0
            full[:, at : at + self.rank, :] = torch.stack(per_e, dim=-1).to(dst)
            blocks.append(full.reshape(self.rows, folded_rank * self.experts))
        if self.parts > 1 and self.order == "interleave":
            return [to_bytes(merge_rows(blocks, "interleave"))]
        return [to_bytes(b) for b in blocks]
