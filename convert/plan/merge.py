"""Merging a LoRA adapter into its base checkpoint: every output tensor and the pieces that produce it.

A pure function of metadata (the base's safetensors headers and config.json, the adapter's headers and
adapter_config.json). The output has the base's own tensors: names, shapes, dtypes (unless --dtype) and
layout. A tensor the adapter does not touch is a byte copy (or a cast) of the base's; a LoRA'd tensor is
`W + scaling * B @ A` computed in float32 and rounded once to the output dtype:

- expert tensors (any layout the family tables describe: per-expert, fused, transposed or interleaved):
  one compute piece per run of experts of one EP slice and one set of base tensors (a weight and its
  quantization scales), reading each expert's base bytes and its A_e / B_e bytes wherever the adapter's
  layout holds them (`Factor`: a per-expert tensor, rows of a folded peft lora_A, a slice of a 3-D
  factor, or the whole peft lora_B, read once per piece; peft wrappers in any packing detect_expert_lora
  reads: today's or the older orientation, rank-major or expert-major lora_B). The base bytes are decoded into
  per-expert role tensors by the family's ops (transforms.decode), merged, and encoded back.
- other LoRA modules (attention, router, dense MLP): the base tensor the module's `.weight` names, in row
  chunks (a quantized one whole).
- FP8 block-scaled weights (`X.weight` with `X.weight_scale_inv`): dequantized, merged in float32 and
  requantized with fresh per-block scales (block amax / 448, same grid, same scale dtype); with --dtype every
  FP8 weight is dequantized and written in that dtype, the scale grids dropped.
- MXFP4 expert layers (a family with `quantization.dequantize`, gpt-oss as released): the LoRA (of the target
  family's roles) merged into the dequantized values and requantized (merge_quant.mxfp4_quantize), or with
  --dtype the whole layer written in the target family's layout.
- modules_to_save tensors: the adapter's copy replaces the base tensor.
Requantizing pieces measure how much of each delta survived (merge_quant.SURVIVAL).

Refused before anything is written (ConversionError naming the tensor): adapter modules or shapes that do
not fit the base, LoRA variants a plain merge would get wrong (DoRA, LoRA bias, ...), tensors that are neither
LoRA factors nor modules_to_save tensors. No model or projection is named here: roles and layouts come from the
family tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.families import Family
from convert.formats.adapter_layouts import PEFT_PREFIX, ExpertLoraGroup, detect_expert_lora, fused_order
from convert.formats.adapter_source import AdapterSource
from convert.formats.checkpoint import Checkpoint, TensorRef
from convert.formats.lora_producers import IN_OUT, RANK_MAJOR
from convert.formats.safetensors import DTYPE_SIZES, numel
from convert.io.sources import source_file
from convert.plan.adapter_names import MODEL, KeyNames, expert_prefix, source_naming
from convert.plan.adapter_scaling import scaling, source_scale
from convert.plan.base import DEFAULT_CHUNK_BYTES, Piece, Read, TargetTensor, Write, _units, copy_pieces, target_dtype
from convert.plan.dequant import block_size, fp8_dequantize, mxfp4_dequantize
from convert.plan.merge_quant import SURVIVAL, mxfp4_quantize, squared_norm
from convert.plan.expert_groups import ExpertGroup, find_expert_groups
from convert.plan.transforms import Unit, decode, encode, from_bytes, to_bytes, torch_dtypes
from sharding.ep import expert_slices

if TYPE_CHECKING:
    import torch

ADAPTER_SOURCE = "adapter"  # the extra source name the pieces read adapter files under (convert.io.sources)
# float32 bytes one expert piece (a run of experts, at least one) works on: 48 MB of bf16 experts, 24 MB of FP8 ones
RUN_BYTES = 96 << 20
FP8_MAX = 448.0
# adapter_config.json keys of LoRA variants whose delta is not scaling * B @ A (or that change which weight
# it is added to): a merge of such an adapter as plain LoRA would be wrong, so it is refused.
VARIANT_KEYS = {
    "use_dora": "DoRA (the weight is renormalised by a learned magnitude)",
    "lora_bias": "LoRA bias (a bias is added beside the weight)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights stored [in, out])",
    "layer_replication": "layer_replication (layers are duplicated)",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_bdlora": "BD-LoRA",
}


# ----------------------------------------------------------------------------- computes


@dataclass(frozen=True)
class Factor:
    """Where one expert's LoRA factor (A as [r, in], B as [out, r]) is among a piece's read buffers.

    kind: "each" (one read per expert of the run, `read + e - first`: a per-expert tensor, or a module's
    whole factor), "run" (one read of [n, *slice] for experts first..first+n-1 of a 3-D factor or of a
    folded peft lora_A viewed [n, r, in]; `shared`: one slice for every expert), "minor" (the whole peft
    lora_B [out, r*E], expert e at `.view(out, r, E)[:, :, e]`), "major" (a whole expert-major lora_B
    [out, E*r], expert e at `.view(out, E, r)[:, e, :]`). `transpose`: the slice is [in, r] / [r, out]
    (NeMo grouped; the older peft orientation, whose lora_A rows are B_e^T and lora_B columns A_e^T); a B
    holding several roles keeps role `part` of `parts` (halves, or rows part::parts), after the transpose.
    """

    read: int
    dtype: str
    shape: tuple[int, ...]  # of one read buffer
    kind: str
    first: int = 0
    experts: int = 1
    shared: bool = False
    transpose: bool = False
    part: int = 0
    parts: int = 1
    order: str = "concat"

    def of(self, bufs: Sequence[bytes | memoryview], e: int) -> torch.Tensor:
        """Expert e's factor, from the piece's read buffers."""
        if self.kind == "each":
            x = from_bytes(bufs[self.read + e - self.first], self.dtype, self.shape)
        elif self.kind == "run":
            whole = from_bytes(bufs[self.read], self.dtype, self.shape)
            x = whole[0 if self.shared else e - self.first]
        elif self.kind == "major":
            whole = from_bytes(bufs[self.read], self.dtype, self.shape)
            x = whole.view(whole.shape[0], self.experts, whole.shape[1] // self.experts)[:, e, :]
        else:
            whole = from_bytes(bufs[self.read], self.dtype, self.shape)
            x = whole.view(whole.shape[0], whole.shape[1] // self.experts, self.experts)[:, :, e]
        if self.transpose:
            x = x.T
        if self.parts == 1:
            return x
        if self.order == "interleave":
            return x[self.part :: self.parts]
        n = x.shape[0] // self.parts
        return x[self.part * n : (self.part + 1) * n]


@dataclass(frozen=True)
class RoleDelta:
    """The LoRA of one role: its factors and each expert's scaling (the run's experts, in order)."""

    role: str
    a: Factor
    b: Factor
    scaling: tuple[float, ...]


def merged_float(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """`w + s * (b @ a)` in float32 (w of any float dtype), in peft's order: the product, scaled, then added (an
    addmm that adds the scaled product in one GEMM is faster but rounds differently from peft's delta)."""
    import torch

    delta = torch.matmul(b.to(torch.float32), a.to(torch.float32))
    delta.mul_(s)
    return delta.add_(w)  # w promoted to float32 element by element (exact): no float32 copy of the weight


def fp8_requantize(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype,
                   fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize float32 `w` [out, in] to `fp8` with fresh per-block scales: scale = block amax / 448 stored
    as `scale_dtype` (a power of two rounded up for E8M0), values `w / scale` rounded to nearest, clamped to +-448.
    An all-zero block gets scale 1; `w` itself may be overwritten. Returns (quantized weight, scale grid
    [ceil(out/bm), ceil(in/bn)])."""
    import torch

    bm, bn = block
    rows, cols = w.shape
    gr, gc = -(-rows // bm), -(-cols // bn)
    if (rows, cols) == (gr * bm, gc * bn):
        padded = w.to(torch.float32)
    else:  # ragged edge blocks: zero padding (amax and values of the real elements only)
        padded = torch.zeros(gr * bm, gc * bn, dtype=torch.float32)
        padded[:rows, :cols] = w
    blocks = padded.view(gr, bm, gc, bn)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_dtype == getattr(torch, "float8_e8m0fnu", None):
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    stored = scale.to(scale_dtype)
    used = stored.to(torch.float32)
    q = blocks.div_(used[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)  # in place: `padded` is ours
    q = q.view(gr * bm, gc * bn)[:rows, :cols].to(fp8)
    return q, stored


def _expert_roles(src: Sequence[Unit], bufs: Sequence[bytes | memoryview],
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """One expert's role tensors (per-expert orientation) from its bytes of each `src` unit."""
    roles: dict[str, Any] = {}
    for unit, buf in zip(src, bufs):
        roles.update(decode(unit, buf, shapes))
    return roles


@dataclass(frozen=True)
class MergeExperts:
    """A compute piece: a run of experts' base tensors (`src` units each, one read per unit and expert, then the
    LoRA factor reads) -> the merged tensors (`dst` units each, one write per unit and expert).

    Each role of `deltas` is merged in float32 and rounded once to its `dst` unit's dtype; `quant` pairs
    (weight role, scale role) are FP8 block-scaled: dequantized before the merge and requantized after it
    (each requantized weight measured into merge_quant.SURVIVAL under `label`.experts.{e}.{role}), or, where
    not `requantize` (--dtype on an FP8 base), every pair's weight dequantized and written in its `dst` unit's
    dtype, the scale units dropped from `dst`.
    """

    experts: tuple[int, ...]
    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]
    deltas: tuple[RoleDelta, ...]
    quant: tuple[tuple[str, str], ...] = ()
    block: tuple[int, int] = (128, 128)
    requantize: bool = True
    label: str = ""

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The merged bytes of each write, from the bytes of each read."""
        shapes = dict(self.role_shape)
        scale_of = dict(self.quant)
        n = len(self.src)
        out: list[memoryview] = []
        for i, e in enumerate(self.experts):
            roles = _expert_roles(self.src, bufs[i * n : (i + 1) * n], shapes)
            for d in self.deltas:
                w = roles[d.role]
                scale = scale_of.get(d.role)
                if scale is not None:
                    w = fp8_dequantize(w, roles[scale], self.block)
                merged = merged_float(w, d.a.of(bufs, e), d.b.of(bufs, e), d.scaling[i])
                if scale is not None and self.requantize:
                    roles[d.role], roles[scale] = _fp8_requantize_measured(
                        f"{self.label}.experts.{e}.{d.role}", w, merged, self.block, roles[scale].dtype,
                        roles[d.role].dtype)
                else:
                    roles[d.role] = merged
            if not self.requantize:  # --dtype: the pairs' weights without a delta, dequantized too
                merged_roles = {d.role for d in self.deltas}
                for wr, sr in self.quant:
                    if wr not in merged_roles and wr in roles:
                        roles[wr] = fp8_dequantize(roles[wr], roles[sr], self.block)
            out += [encode(unit, roles) for unit in self.dst]
        return out


def _fp8_requantize_measured(label: str, w: torch.Tensor, merged: torch.Tensor, block: tuple[int, int],
                             scale_dtype: torch.dtype, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_requantize of `merged` (= float32 base `w` + delta; overwritten), measuring how much of the delta the
    requantized weight keeps into merge_quant.SURVIVAL under `label`."""
    delta = merged - w
    want2 = squared_norm(merged)
    q, s = fp8_requantize(merged, block, scale_dtype, fp8)
    SURVIVAL.add(label, "fp8", w, delta, want2, fp8_dequantize(q, s, block))
    return q, s


@dataclass(frozen=True)
class MergeTensor:
    """A compute piece: rows of one base weight (read 0; with its FP8 scale grid, read 1, where `scale_dtype`),
    then the module's lora_A (whole) and the lora_B rows of those rows -> the merged rows (and scale grid)."""

    shape: tuple[int, ...]  # of the rows read
    dtype: str
    out_dtype: str
    a_shape: tuple[int, ...]
    a_dtype: str
    b_shape: tuple[int, ...]
    b_dtype: str
    scaling: float
    scale_shape: tuple[int, ...] = ()
    scale_dtype: str = ""
    block: tuple[int, int] = (128, 128)
    requantize: bool = True  # False (--dtype on an FP8 base): the merged weight is written as `out_dtype`
    label: str = ""  # the tensor's name, for the FP8 survival report

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The merged rows' bytes (and the fresh scale grid's, for an FP8 weight requantized)."""
        w = from_bytes(bufs[0], self.dtype, self.shape)
        k = 1
        if self.scale_dtype:
            w = fp8_dequantize(w, from_bytes(bufs[1], self.scale_dtype, self.scale_shape), self.block)
            k = 2
        a = from_bytes(bufs[k], self.a_dtype, self.a_shape)
        b = from_bytes(bufs[k + 1], self.b_dtype, self.b_shape)
        merged = merged_float(w, a, b, self.scaling)
        if self.scale_dtype and self.requantize:
            dtypes = torch_dtypes()
            q, s = _fp8_requantize_measured(self.label, w, merged, self.block, dtypes[self.scale_dtype],
                                            dtypes[self.dtype])
            return [to_bytes(q), to_bytes(s)]
        return [to_bytes(merged.to(torch_dtypes()[self.out_dtype]))]


# ----------------------------------------------------------------------------- plan


@dataclass
class MergePlan:
    """What a merge writes and how; identical on every rank."""

    family: str
    targets: list[TargetTensor]  # the base's tensors, in the base's order (file by file)
    files: dict[str, list[str]]  # base shard name -> its tensors in data order (the output keeps them)
    pieces: list[Piece]
    num_experts: int
    groups: list[tuple[str, str, str]]  # (layer prefix, base layout, adapter pattern) of each merged expert layer
    modules: list[str]  # other LoRA modules merged (attention, router, dense), model naming
    copy_files: list[str]
    metadata: dict[str, dict[str, str]]  # base shard name -> its header's __metadata__
    notes: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)  # base tensors the merge changes
    dequantized: bool = False  # quantized weights written as --dtype: config.json loses quantization_config


def refuse_variants(adapter: AdapterSource) -> None:
    """Refuse (ConversionError naming the file or tensor) an adapter a plain `W + s * B @ A` merge gets wrong."""
    cfg = adapter.config
    where = adapter.display("adapter_config.json")
    ptype = str(cfg.get("peft_type") or "LORA").upper()
    if ptype != "LORA":
        raise ConversionError(f"{where}: peft_type {ptype!r} is not LoRA; only LoRA adapters are merged")
    for key, what in VARIANT_KEYS.items():
        value = cfg.get(key)
        if value not in (None, False, "none", [], {}, 0):
            raise ConversionError(f"{where}: {key} = {value!r}: {what} cannot be merged as plain LoRA; refusing")
    saved = saved_modules(adapter)
    for name, ref in adapter.tensors.items():
        if name.endswith((".lora_A.weight", ".lora_B.weight")) or ".lora_" in name and _folded_name(name):
            continue
        if name in saved:
            continue
        if "lora_magnitude_vector" in name:
            raise ConversionError(f"{adapter.display(ref.file)}: tensor {name!r} is a DoRA magnitude: DoRA cannot be "
                                  "merged as plain LoRA; refusing")
        if ".lora_" in name:
            raise ConversionError(f"{adapter.display(ref.file)}: tensor {name!r} is a LoRA variant's tensor (bias, "
                                  "embedding or other): only lora_A/lora_B weight pairs are merged; refusing")
        raise ConversionError(f"{adapter.display(ref.file)}: tensor {name!r} is not a LoRA factor nor a tensor of a "
                              "module adapter_config.json's modules_to_save names: merging it is not supported; refusing")


def saved_modules(adapter: AdapterSource) -> dict[str, str]:
    """The adapter's `modules_to_save` tensors: adapter tensor name -> the base tensor (model naming, without
    peft's prefix) it replaces. peft saves a module of `modules_to_save` (matched as a suffix of the module's
    name) as `<prefix><module>.<param>`, and merge_and_unload puts that trained copy in the base module's place."""
    wanted = adapter.config.get("modules_to_save") or []
    if isinstance(wanted, str):
        wanted = [wanted]
    out = {}
    for name in adapter.tensors:
        if ".lora_" in name:
            continue
        module = _strip(name).rsplit(".", 1)[0]
        if any(module == m or module.endswith("." + m) for m in wanted):
            out[name] = _strip(name)
    return out


def _folded_name(name: str) -> bool:
    """NeMo grouped factor names (`lora_gate_and_up_A`): LoRA factors without `.weight`."""
    return name.rsplit(".", 1)[-1].startswith("lora_") and name[-2:] in ("_A", "_B")


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


class _Reads:
    """A piece's reads, deduplicated: the index of each range."""

    def __init__(self) -> None:
        self.reads: list[Read] = []
        self._at: dict[Read, int] = {}

    def add(self, read: Read) -> int:
        if read not in self._at:
            self._at[read] = len(self.reads)
            self.reads.append(read)
        return self._at[read]


def _adapter_read(ref: TensorRef, start: int = 0, end: int | None = None) -> Read:
    """A byte range of an adapter tensor (relative to its data), as the job's pieces read it."""
    info = ref.info
    return Read(source_file(ADAPTER_SOURCE, ref.file), info.start + start,
                info.start + (info.nbytes if end is None else end), info.dtype)


def _factors(g: ExpertLoraGroup, adapter: AdapterSource, role: str, run: range, reads: _Reads,
             order: str | None) -> tuple[Factor, Factor]:
    """Reads and Factor specs of `role`'s A and B for the experts of `run` (g's layout)."""
    e0, n = run.start, len(run)
    if g.pattern == "per_expert":
        out = []
        for which in "AB":
            refs = [adapter.tensors[g.factor((role,), which, e).name] for e in run]
            idx = [reads.add(_adapter_read(ref)) for ref in refs]
            if idx != list(range(idx[0], idx[0] + n)):  # a factor shared by two experts: not a run of reads
                raise ConversionError(f"{adapter.display()}: tensor {refs[0].info.name!r} is read twice in one piece")
            out.append(Factor(idx[0], refs[0].info.dtype, refs[0].info.shape, "each", first=e0))
        return out[0], out[1]
    fa = next(f for f in g.factors if role in f.roles and f.factor == "A")
    fb = next(f for f in g.factors if role in f.roles and f.factor == "B")
    a, b = adapter.tensors[fa.name], adapter.tensors[fb.name]
    k, part = len(fb.roles), fb.roles.index(role)
    if k > 1 and order is None:
        raise ConversionError(f"{adapter.display(b.file)}: tensor {fb.name!r}: cannot tell how it orders "
                              f"{'/'.join(fb.roles)} without the base model's family")
    split = dict(part=part, parts=k, order=order or "concat")
    if g.pattern == "peft_target_parameters":
        E = a.info.shape[0] // g.rank_of(role)
        r = a.info.shape[0] // E
        row = a.info.nbytes // a.info.shape[0]
        ia = reads.add(_adapter_read(a, e0 * r * row, (e0 + n) * r * row))
        ib = reads.add(_adapter_read(b))
        E_b = b.info.shape[1] // r
        rows = Factor(ia, a.info.dtype, (n, r, a.info.shape[1]), "run", first=e0)
        cols = Factor(ib, b.info.dtype, b.info.shape, "minor" if g.b_order == RANK_MAJOR else "major", experts=E_b)
        if g.orientation == IN_OUT:  # peft >= 0.19.1: lora_A rows are A_e [r, in], lora_B columns B_e [out, r]
            return rows, replace(cols, **split)
        # older shapes: delta_e = (B_e @ A_e)^T = A_e^T @ B_e^T: the lora_B columns [in, r] transposed are the A
        # factor, the lora_A rows [r, out] transposed the B factor (the roles split on its out rows)
        return replace(cols, transpose=True), replace(rows, transpose=True, **split)
    transpose = g.pattern == "grouped"
    out = []
    for ref, extra in ((a, {}), (b, split)):
        shape = ref.info.shape
        size = ref.info.nbytes // shape[0]
        shared = shape[0] == 1 and g.num_experts != 1
        lo, hi = (0, 1) if shared else (e0, e0 + n)
        idx = reads.add(_adapter_read(ref, lo * size, hi * size))
        out.append(Factor(idx, ref.info.dtype, (hi - lo, *shape[1:]), "run", first=e0, shared=shared,
                          transpose=transpose, **extra))
    return out[0], out[1]


def _module_of(g: ExpertLoraGroup, role: str, e: int) -> str:
    """The module name peft matches rank_pattern / alpha_pattern keys against, for expert e's `role`."""
    if g.pattern == "per_expert":
        return _strip(g.factor((role,), "A", e).name.rsplit(".lora_A", 1)[0])
    if g.pattern == "peft_target_parameters":
        param = next(p for roles, p in g.target_param if role in roles)
        return _strip(f"{g.prefix}.experts.{param}")
    if g.pattern == "shared_w123":
        fa = next(f for f in g.factors if role in f.roles and f.factor == "A")
        return _strip(fa.name.rsplit(".lora_A", 1)[0])
    return _strip(f"{g.prefix}.experts")


def _unit_sets(units: list[tuple[Unit, str]], pairs: dict[str, str]) -> list[list[int]]:
    """Indices of `units` in sets that must be in one piece: a weight's unit with its scale grid's unit."""
    owner = list(range(len(units)))

    def find(i: int) -> int:
        while owner[i] != i:
            i = owner[i]
        return i

    role_unit = {r: i for i, (u, _) in enumerate(units) for r in u.roles}
    for w, s in pairs.items():
        if w in role_unit and s in role_unit:
            owner[find(role_unit[w])] = find(role_unit[s])
    sets: dict[int, list[int]] = {}
    for i in range(len(units)):
        sets.setdefault(find(i), []).append(i)
    return list(sets.values())


def _unit_read(group: ExpertGroup, unit: Unit, tpl: str, e: int) -> tuple[Read, str, int, int]:
    """(read of expert e's bytes of `unit`, the base tensor's name, start and end within its data)."""
    if unit.fused is None:
        ref = group.per_expert[(str(unit.role), e)]
        return Read(ref.file, ref.info.start, ref.info.end, unit.dtype), ref.info.name, 0, ref.info.nbytes
    ref = group.fused[tpl]
    size = ref.info.nbytes // ref.info.shape[0]
    return (Read(ref.file, ref.info.start + e * size, ref.info.start + (e + 1) * size, unit.dtype), ref.info.name,
            e * size, (e + 1) * size)


def plan_merge(ckpt: Checkpoint, family: Family, adapter: AdapterSource, dtype: str | None, ep: int,
               chunk: int = DEFAULT_CHUNK_BYTES, run_bytes: int = RUN_BYTES) -> MergePlan:
    """Plan merging `adapter` into the base `ckpt` of `family` (see the module docstring); `dtype` casts every
    floating output tensor (None: keep the base's); `ep` expert slices (a piece never spans two)."""
    refuse_variants(adapter)
    where = ckpt.storage.display("config.json")
    quant = ckpt.config.get("quantization_config") if isinstance(ckpt.config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in (None, "fp8") and not (method == "mxfp4" and family.dequantize is not None):
        raise ConversionError(f"{where}: a {method!r}-quantized base cannot be merged into (FP8 block-scaled, MXFP4 "
                              "and unquantized bases are supported)")
    lfam = _lora_family(family)  # whose roles and names the adapter's LoRA has (the MXFP4 family's target)
    qfamily = family.with_companions(family.companions_in(ckpt.tensors))
    dequant = bool(dtype) and bool(qfamily.companion_roles)  # --dtype on an FP8 base: every FP8 weight dequantized
    block = block_size(ckpt.config)
    num_experts = family.num_experts(ckpt.config, where)
    groups, passthrough = find_expert_groups(ckpt, qfamily, num_experts, rename=True)
    by_prefix = {g.prefix: g for g in groups}

    saved = saved_modules(adapter)
    lora_infos = {n: i for n, i in adapter.infos.items() if n not in saved}
    lora_groups, others = detect_expert_lora(lora_infos, adapter.config, ckpt.config, adapter.display(),
                                             packings=True)
    names = KeyNames(lfam, source_naming(lfam, lora_groups, list(lora_infos)), MODEL)
    order = fused_order(lfam)
    pairs = {w: f"{w}{sfx}" for sfx in qfamily.companions_in(ckpt.tensors) for w in family.roles
             if f"{w}{sfx}" in qfamily.role_leaves}
    weights = frozenset(pairs) if dequant else frozenset()
    done: set[tuple[str, tuple[int, ...]]] = set()  # (layer, unit set) of expert pieces planned
    replaced: dict[str, TargetTensor | None] = {}  # base tensors written under another name / dropped (MXFP4 --dtype)

    pieces: list[Piece] = []
    touched: set[str] = set()
    merged_groups: list[tuple[str, str, str]] = []
    slots = max([num_experts, *(g.slots for g in groups)]) if groups else num_experts
    slices = expert_slices(slots, min(ep, slots))
    for lg in lora_groups:
        prefix = expert_prefix(lfam, names, lg.prefix)
        group = by_prefix.get(_strip(prefix)) if prefix is not None else None
        if group is None:
            raise ConversionError(f"{adapter.display()}: tensor {lg.tensors[0]!r}: the base has no {family.name} "
                                  f"expert layer {_strip(lg.prefix)!r} for this expert LoRA to merge into")
        if family.dequantize is not None:  # an MXFP4 base
            pieces += _mx_group_pieces(family, lfam, group, lg, adapter, dtype, slices, run_bytes, order, touched,
                                       replaced)
            merged_groups.append((group.prefix, group.layout, lg.pattern))
            done.add((group.prefix, ()))
            continue
        for role in lg.roles:
            shape = group.role_shape.get(role)
            out_in = lg.dims_of(role)
            if shape is None or tuple(shape) != tuple(out_in):
                raise ConversionError(
                    f"{adapter.display()}: tensor {lg.factor((role,), 'A', 0).name if lg.pattern == 'per_expert' else lg.tensors[0]!r}: "
                    f"the {role} LoRA of layer {group.prefix} is for [out, in] = {list(out_in)}, the base's "
                    f"{role} weight is {list(shape) if shape else 'absent'}")
            if lg.experts_of(role) != group.role_experts.get(role, group.num_experts):
                raise ConversionError(f"{adapter.display()}: layer {group.prefix}: the {role} LoRA has "
                                      f"{lg.experts_of(role)} experts, the base {group.role_experts.get(role, group.num_experts)}")
        merged_groups.append((group.prefix, group.layout, lg.pattern))
        units = _units(qfamily, group, group.layout, None, "src")
        dst_units = _merge_dst_units(qfamily, group, dtype, weights, set(pairs.values()))
        role_shape = tuple(sorted(group.role_shape.items()))
        for members in _unit_sets(units, pairs):
            roles = [r for i in members for r in units[i][0].roles if r in lg.roles]
            if not roles:
                continue
            done.add((group.prefix, tuple(members)))
            held = {r for i in members for r in units[i][0].roles}
            quant_pairs = tuple((w, s) for w, s in pairs.items() if w in (held if dequant else roles))
            per_expert = sum(_unit_read(group, units[i][0], units[i][1], 0)[0].end
                             - _unit_read(group, units[i][0], units[i][1], 0)[0].start for i in members)
            count = min(group.role_experts.get(units[i][0].roles[0], group.num_experts) for i in members)
            widen = 4 // min(DTYPE_SIZES[units[i][0].dtype] for i in members)  # merged in float32
            step = max(1, run_bytes // max(1, per_expert * widen))
            for sl in slices:
                for e0 in range(sl.start, min(sl.stop, count), step):
                    run = range(e0, min(e0 + step, sl.stop, count))
                    reads = _Reads()
                    writes: list[Write] = []
                    for e in run:
                        for i in members:
                            read, name, ws, we = _unit_read(group, units[i][0], units[i][1], e)
                            reads.reads.append(read)  # base reads first, in order (never deduplicated)
                            touched.add(name)
                            dst_unit = dst_units[i]
                            if dst_unit is None:  # a scale grid dropped (--dtype on an FP8 base)
                                continue
                            out_item = DTYPE_SIZES[dst_unit[0].dtype] / DTYPE_SIZES[units[i][0].dtype]
                            writes.append(Write(name, int(ws * out_item), int(we * out_item), dst_unit[0].dtype))
                    deltas = []
                    for role in roles:
                        fa, fb = _factors(lg, adapter, role, run, reads, lg.fused_order or order)
                        scales = tuple(scaling(adapter.config, source_scale(adapter.config, _module_of(lg, role, e)))
                                       for e in run)
                        deltas.append(RoleDelta(role, fa, fb, scales))
                    compute = MergeExperts(tuple(run), tuple(units[i][0] for i in members),
                                           tuple(dst_units[i][0] for i in members if dst_units[i] is not None),
                                           role_shape, tuple(deltas), quant_pairs, block, not dequant, group.prefix)
                    pieces.append(Piece(tuple(reads.reads), tuple(writes), compute, run.start))

    if dequant:  # the FP8 expert weights no LoRA touches, dequantized too
        pieces += _fp8_dequant_pieces(qfamily, groups, pairs, done, dtype, block, touched)
    if family.dequantize is not None and dtype:  # MXFP4 --dtype: every expert layer written in the target's layout
        for group in groups:
            if (group.prefix, ()) not in done:
                pieces += _mx_group_pieces(family, lfam, group, None, adapter, dtype, slices, run_bytes, order,
                                           touched, replaced)

    # other LoRA modules: the base tensor their `.weight` names
    base_by_model = {family.to_model(n): n for n in passthrough}
    modules: list[str] = []
    lora_others = sorted({n.rsplit(".lora_", 1)[0] for n in others})
    for module in lora_others:
        an, bn = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if an not in adapter.tensors or bn not in adapter.tensors:
            have = an if an in adapter.tensors else bn
            raise ConversionError(f"{adapter.display()}: tensor {have!r} has no lora_{'B' if have == an else 'A'} partner")
        a, b = adapter.tensors[an], adapter.tensors[bn]
        model_module = _strip(names.canonical_module(module))
        target = base_by_model.get(model_module + ".weight")
        if target is None:
            raise ConversionError(f"{adapter.display()}: tensor {an!r}: the base has no tensor "
                                  f"{model_module + '.weight'!r} (or its checkpoint name) for this LoRA to merge into")
        ref = ckpt.tensors[target]
        if len(ref.info.shape) != 2 or len(a.info.shape) != 2 or len(b.info.shape) != 2 \
                or a.info.shape[0] != b.info.shape[1] or (b.info.shape[0], a.info.shape[1]) != tuple(ref.info.shape):
            raise ConversionError(
                f"{adapter.display()}: tensors {an!r} {list(a.info.shape)} / {bn!r} {list(b.info.shape)} do not fit "
                f"the base tensor {target!r} {list(ref.info.shape)} ([out, in] = [lora_B rows, lora_A columns])")
        s = scaling(adapter.config, source_scale(adapter.config, _strip(module)))
        modules.append(model_module)
        touched.add(target)
        scale_name = next((target + sfx for sfx in family.companions if target + sfx in ckpt.tensors), None)
        if scale_name is not None and ref.info.dtype.startswith("F8_"):
            sref = ckpt.tensors[scale_name]
            touched.add(scale_name)
            out_dtype = dtype if dequant else ref.info.dtype
            compute = MergeTensor(ref.info.shape, ref.info.dtype, str(out_dtype), a.info.shape, a.info.dtype,
                                  b.info.shape, b.info.dtype, s, sref.info.shape, sref.info.dtype, block,
                                  not dequant, target)
            writes = (Write(target, 0, numel(ref.info.shape) * DTYPE_SIZES[str(out_dtype)], str(out_dtype)),)
            if not dequant:
                writes += (Write(scale_name, 0, sref.info.nbytes, sref.info.dtype),)
            pieces.append(Piece((Read(ref.file, ref.info.start, ref.info.end, ref.info.dtype),
                                 Read(sref.file, sref.info.start, sref.info.end, sref.info.dtype),
                                 _adapter_read(a), _adapter_read(b)), writes, compute))
            continue
        if ref.info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise ConversionError(f"{ckpt.storage.display(ref.file)}: tensor {target!r} is {ref.info.dtype}: cannot "
                                  "merge LoRA into it")
        out_dtype = target_dtype(ref.info.dtype, dtype)
        rows, cols = ref.info.shape
        row_in, row_out = cols * DTYPE_SIZES[ref.info.dtype], cols * DTYPE_SIZES[out_dtype]
        b_row = b.info.nbytes // rows
        step = max(1, chunk // max(row_in, 1))
        for i in range(0, rows, step):
            j = min(rows, i + step)
            compute = MergeTensor((j - i, cols), ref.info.dtype, out_dtype, a.info.shape, a.info.dtype,
                                  (j - i, b.info.shape[1]), b.info.dtype, s)
            pieces.append(Piece((Read(ref.file, ref.info.start + i * row_in, ref.info.start + j * row_in, ref.info.dtype),
                                 _adapter_read(a), _adapter_read(b, i * b_row, j * b_row)),
                                (Write(target, i * row_out, j * row_out, out_dtype),), compute))

    # modules_to_save: the adapter's trained copy replaces the base tensor (cast to its output dtype)
    for name, model_name in saved.items():
        target = base_by_model.get(model_name)
        ref, sref = ckpt.tensors.get(target or ""), adapter.tensors[name]
        if ref is None or target in touched:
            raise ConversionError(f"{adapter.display(sref.file)}: tensor {name!r} (modules_to_save): the base has no "
                                  f"tensor {model_name!r} for it to replace" if ref is None else
                                  f"{adapter.display(sref.file)}: tensor {name!r} (modules_to_save) replaces "
                                  f"{target!r}, which a LoRA also merges into")
        if tuple(ref.info.shape) != tuple(sref.info.shape) or ref.info.dtype not in ("F32", "F16", "BF16", "F64") \
                or sref.info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise ConversionError(f"{adapter.display(sref.file)}: tensor {name!r} (modules_to_save) is "
                                  f"{sref.info.dtype} {list(sref.info.shape)}; it cannot replace the base's {target!r} "
                                  f"({ref.info.dtype} {list(ref.info.shape)})")
        out_dtype = target_dtype(ref.info.dtype, dtype)
        _, ps = copy_pieces(TensorRef(source_file(ADAPTER_SOURCE, sref.file), sref.info), str(target), out_dtype, chunk)
        # a compute piece, not a byte copy: the engine's range copies read the job's own source only
        pieces += [Piece(p.reads, p.writes, CastRun(sref.info.dtype, out_dtype)) for p in ps]
        touched.add(str(target))
        modules.append(model_name.rsplit(".", 1)[0] + " (modules_to_save)")

    # everything else: byte copies (or casts), and the base's tensor order file by file
    targets: list[TargetTensor] = []
    files: dict[str, list[str]] = {}
    scales = _fp8_scale_names(ckpt, family) if dequant else {}
    replaced.update({n: None for n in scales})  # --dtype on an FP8 base: the scale grids are dropped
    for fname, header in ckpt.headers.items():
        kept = [replaced[n].name if replaced.get(n) else n  # type: ignore[union-attr]
                for n in (t.name for t in sorted(header.tensors.values(), key=lambda t: t.start))
                if n not in replaced or replaced[n] is not None]
        if kept:  # a shard that held only scale grids is not written
            files[fname] = kept
    for name, ref in ckpt.tensors.items():
        if name in replaced:
            if replaced[name] is not None:
                targets.append(replaced[name])  # type: ignore[arg-type]
            continue
        if name in scales.values():  # an FP8 weight, dequantized
            targets.append(TargetTensor(name, str(dtype), ref.info.shape))
            if name not in touched:
                pieces.append(_fp8_dequant_tensor(ref, ckpt.tensors[_scale_of(scales, name)], str(dtype), block))
            continue
        t, ps = copy_pieces(ref, name, dtype, chunk)
        targets.append(t)
        if name not in touched:
            pieces += ps
    notes = [f"merged expert LoRA of {len(merged_groups)} layer(s), {len(modules)} other LoRA module(s); "
             f"{len(touched)} of {len(ckpt.tensors)} base tensors change, the rest are byte copies"
             + (" (cast)" if dtype else "")]
    if pairs and dequant:
        notes.append(f"every FP8 weight is dequantized ({block[0]}x{block[1]} blocks) and written as {dtype}, the "
                     "touched ones merged in float32 first; the scale grids and quantization_config are dropped")
    elif pairs:
        notes.append(f"FP8 weights the adapter touches are dequantized, merged in float32 and requantized with fresh "
                     f"{block[0]}x{block[1]} block scales (amax / {FP8_MAX:g})")
    if family.dequantize is not None:
        notes.append(f"MXFP4 expert weights the adapter touches are dequantized, merged in float32 and " + (
            f"written as {dtype} (every expert layer, in {lfam.name}'s layout; quantization_config dropped)" if dtype
            else "requantized with fresh E8M0 scales per 32 values"))
    return MergePlan(family=family.name, targets=targets, files=files, pieces=pieces, num_experts=slots,
                     groups=merged_groups, modules=modules, copy_files=list(ckpt.other_files),
                     metadata={f: dict(h.metadata) for f, h in ckpt.headers.items()}, notes=notes,
                     touched=sorted(touched), dequantized=dequant or (family.dequantize is not None and bool(dtype)))


# ----------------------------------------------------------------------------- quantized bases
# (--dtype on an FP8 base; MXFP4 bases): kept apart from plan_merge's piece sizing


@dataclass(frozen=True)
class CastRun:
    """A compute piece: one read of `dtype` elements -> the same elements as `out_dtype` (a copy where equal)."""

    dtype: str
    out_dtype: str

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The read's elements in `out_dtype`."""
        if self.dtype == self.out_dtype:
            return [memoryview(bufs[0])]
        x = from_bytes(bufs[0], self.dtype, (len(bufs[0]) // DTYPE_SIZES[self.dtype],))
        return [to_bytes(x.to(torch_dtypes()[self.out_dtype]))]


def _lora_family(family: Family) -> Family:
    """The family whose roles and names an adapter's LoRA uses: an MXFP4 family's dequantization target (its LoRA
    was trained on the dequantized model), else `family` itself."""
    if family.dequantize is None:
        return family
    from convert.families import load_families

    target = load_families().get(family.dequantize[0])
    if target is None:
        raise ConversionError(f"{family.source}: quantization.dequantize names unknown family {family.dequantize[0]!r}")
    return target


def _merge_dst_units(qfamily: Family, group: ExpertGroup, dtype: str | None, weights: frozenset[str],
                     scale_roles: set[str]) -> list[tuple[Unit, str] | None]:
    """The output unit of each source unit of `group` (aligned with `_units(qfamily, ..., "src")`): the same unit
    in the output dtype; with `weights` (--dtype on an FP8 base) those FP8 weights in `dtype` and a unit of scale
    grids only None (dropped)."""
    units = _units(qfamily, group, group.layout, dtype, "dst", weights)
    if not weights:
        return list(units)
    return [None if set(u.roles) <= scale_roles else (u, tpl) for u, tpl in units]


def _fp8_dequant_pieces(qfamily: Family, groups: list[ExpertGroup], pairs: dict[str, str],
                        done: set[tuple[str, tuple[int, ...]]], dtype: str | None, block: tuple[int, int],
                        touched: set[str]) -> list[Piece]:
    """--dtype on an FP8 base: one piece per expert of every unit set holding an FP8 weight that no LoRA piece
    wrote (`done`), dequantizing it (MergeExperts without deltas); the names read are added to `touched`."""
    pieces: list[Piece] = []
    weights = frozenset(pairs)
    for group in groups:
        units = _units(qfamily, group, group.layout, None, "src")
        dst_units = _merge_dst_units(qfamily, group, dtype, weights, set(pairs.values()))
        role_shape = tuple(sorted(group.role_shape.items()))
        for members in _unit_sets(units, pairs):
            held = {r for i in members for r in units[i][0].roles}
            quant = tuple((w, s) for w, s in pairs.items() if w in held)
            if (group.prefix, tuple(members)) in done or not quant:
                continue
            count = min(group.role_experts.get(units[i][0].roles[0], group.num_experts) for i in members)
            dst = tuple(dst_units[i][0] for i in members if dst_units[i] is not None)  # type: ignore[index]
            compute = MergeExperts((), tuple(units[i][0] for i in members), dst, role_shape, (), quant, block, False)
            for e in range(count):
                reads, writes = [], []
                for i in members:
                    read, name, ws, we = _unit_read(group, units[i][0], units[i][1], e)
                    reads.append(read)
                    touched.add(name)
                    d = dst_units[i]
                    if d is not None:
                        item = DTYPE_SIZES[d[0].dtype] / DTYPE_SIZES[units[i][0].dtype]
                        writes.append(Write(name, int(ws * item), int(we * item), d[0].dtype))
                pieces.append(Piece(tuple(reads), tuple(writes), _with_experts(compute, (e,)), e))
    return pieces


def _with_experts(compute: MergeExperts, experts: tuple[int, ...]) -> MergeExperts:
    from dataclasses import replace

    return replace(compute, experts=experts)


def _fp8_scale_names(ckpt: Checkpoint, family: Family) -> dict[str, str]:
    """scale grid name -> its FP8 weight's name, for every FP8 weight of `ckpt` with a companion scale."""
    return {n + sfx: n for n, ref in ckpt.tensors.items() if ref.info.dtype.startswith("F8_")
            for sfx in family.companions if n + sfx in ckpt.tensors}


def _scale_of(scales: dict[str, str], weight: str) -> str:
    return next(sc for sc, w in scales.items() if w == weight)


def _fp8_dequant_tensor(ref: TensorRef, sref: TensorRef, dtype: str, block: tuple[int, int]) -> Piece:
    """A non-expert FP8 weight no LoRA touches, dequantized whole to `dtype` (--dtype on an FP8 base)."""
    from convert.plan.dequant import DequantTensor

    compute = DequantTensor(ref.info.shape, ref.info.dtype, sref.info.shape, sref.info.dtype, dtype, block)
    return Piece((Read(ref.file, ref.info.start, ref.info.end, ref.info.dtype),
                  Read(sref.file, sref.info.start, sref.info.end, sref.info.dtype)),
                 (Write(ref.info.name, 0, numel(ref.info.shape) * DTYPE_SIZES[dtype], dtype),), compute)


@dataclass(frozen=True)
class MergeMxfp4:
    """A compute piece: a run of experts of an MXFP4 expert layer (`src` units each, one read per unit and
    expert, then the LoRA factor reads) -> `dst` units each (one write per unit and expert).

    `mx` names each (target role, blocks role, scales role); a role of `deltas` (target roles) is dequantized,
    merged in float32 and requantized (merge_quant.mxfp4_quantize, measured into SURVIVAL under
    `label`.experts.{e}.{role}), or, with `dequant` (--dtype), every target role is dequantized (merged where it
    has a delta), each `cast` (target role, source role) taken as it is, and `dst` holds the target family's units.
    """

    experts: tuple[int, ...]
    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]
    deltas: tuple[RoleDelta, ...]
    mx: tuple[tuple[str, str, str], ...]
    cast: tuple[tuple[str, str], ...] = ()
    dequant: bool = False
    label: str = ""

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The merged bytes of each write, from the bytes of each read."""
        shapes = dict(self.role_shape)
        mx = {t: (b, s) for t, b, s in self.mx}
        n = len(self.src)
        out: list[memoryview] = []
        for i, e in enumerate(self.experts):
            roles = _expert_roles(self.src, bufs[i * n : (i + 1) * n], shapes)
            values: dict[str, Any] = {}
            for d in self.deltas:
                b, s = mx[d.role]
                w = mxfp4_dequantize(roles[b], roles[s])
                merged = merged_float(w, d.a.of(bufs, e), d.b.of(bufs, e), d.scaling[i])
                if self.dequant:
                    values[d.role] = merged
                    continue
                delta = merged - w
                q, sc = mxfp4_quantize(merged)
                SURVIVAL.add(f"{self.label}.experts.{e}.{d.role}", "mxfp4", w, delta, squared_norm(merged),
                             mxfp4_dequantize(q, sc))
                roles[b], roles[s] = q, sc
            if self.dequant:
                for t, (b, s) in mx.items():
                    if t not in values:
                        values[t] = mxfp4_dequantize(roles[b], roles[s])
                values.update({t: roles[r] for t, r in self.cast})
                roles = values
            out += [encode(unit, roles) for unit in self.dst]
        return out


def _mx_group_pieces(family: Family, target: Family, group: ExpertGroup, lg: ExpertLoraGroup | None,
                     adapter: AdapterSource, dtype: str | None, slices: Sequence[range], run_bytes: int,
                     order: str | None, touched: set[str], replaced: dict[str, TargetTensor | None]) -> list[Piece]:
    """The pieces of one expert layer of an MXFP4 `family` base (gpt-oss as released): the LoRA `lg` (of `target`'s
    roles) merged into the blocks/scales it names and requantized; with `dtype`, the whole layer (LoRA or none)
    written in `target`'s layout as `dtype` (`replaced` gets the renamed and dropped base tensors)."""
    from convert.families import PER_EXPERT
    from convert.plan.expert_groups import fused_slice_shape

    assert family.dequantize is not None
    _, mxmap, cast = family.dequantize
    tshape = {t: (*group.role_shape[b][:-2], group.role_shape[b][-2] * group.role_shape[b][-1] * 2)
              for t, (b, _) in mxmap.items()}
    tshape.update({t: group.role_shape[r] for t, r in cast.items()})
    lora_roles = tuple(lg.roles) if lg is not None else ()
    for role in lora_roles:
        if role not in mxmap or tuple(tshape[role]) != tuple(lg.dims_of(role)):  # type: ignore[union-attr]
            raise ConversionError(
                f"{adapter.display()}: tensor {lg.tensors[0]!r}: the {role} LoRA of layer {group.prefix} is for "  # type: ignore[union-attr]
                f"[out, in] = {list(lg.dims_of(role))}, the base's MXFP4 {role} weight is "  # type: ignore[union-attr]
                f"{list(tshape[role]) if role in tshape else 'absent'}")
        if lg.experts_of(role) != group.num_experts:  # type: ignore[union-attr]
            raise ConversionError(f"{adapter.display()}: layer {group.prefix}: the {role} LoRA has "
                                  f"{lg.experts_of(role)} experts, the base {group.num_experts}")  # type: ignore[union-attr]
    src = _units(family, group, group.layout, None, "src")
    if dtype:
        if group.layout == PER_EXPERT or group.layout not in target.fused:
            raise ConversionError(f"layer {group.prefix}: --dtype on a per-expert MXFP4 base is not supported (fuse "
                                  f"it first: convert.fuse_experts), or merge with --dtype keep")
        dst = [(Unit(t, None, dtype), t.template) for t in target.fused[group.layout]]
        sets = [list(range(len(src)))]
    else:
        dst = list(src)
        wanted = {mxmap[r][0] for r in lora_roles}
        sets = [m for m in _unit_sets(src, {b: s for b, s in mxmap.values()})
                if any(r in wanted for i in m for r in src[i][0].roles)]
    role_shape = tuple(sorted(group.role_shape.items()))
    if dtype:  # the output tensors: each target tensor in place of the first base tensor feeding it
        feeds = {t: set(mxmap[t]) if t in mxmap else {cast[t]} for t in tshape}
        for unit, tpl in dst:
            assert unit.fused is not None
            shape = (group.num_experts, *fused_slice_shape(unit.fused, tshape[unit.fused.parts[0]]))
            need = set().union(*(feeds[p] for p in unit.fused.parts))
            first = next(_unit_read(group, u, t, 0)[1] for u, t in src if set(u.roles) & need)
            replaced[first] = TargetTensor(tpl.format(prefix=group.prefix), dtype, shape)
        for u, t in src:
            replaced.setdefault(_unit_read(group, u, t, 0)[1], None)
    pieces: list[Piece] = []
    per_float = 4 * sum(numel(s) for s in tshape.values())  # one expert's float32 values
    step = max(1, run_bytes // max(1, per_float))
    for members in sets:
        roles = [r for r in lora_roles if any(mxmap[r][0] in src[i][0].roles for i in members)]
        out_units = dst if dtype else [dst[i] for i in members]
        mx = tuple((t, b, s) for t, (b, s) in mxmap.items() if any(b in src[i][0].roles for i in members))
        for sl in slices:
            for e0 in range(sl.start, min(sl.stop, group.num_experts), step):
                run = range(e0, min(e0 + step, sl.stop, group.num_experts))
                reads = _Reads()
                writes: list[Write] = []
                for e in run:
                    for i in members:
                        read, name, ws, we = _unit_read(group, src[i][0], src[i][1], e)
                        reads.reads.append(read)
                        touched.add(name)
                        if not dtype:
                            writes.append(Write(name, ws, we, src[i][0].dtype))
                    if dtype:
                        for unit, tpl in out_units:
                            assert unit.fused is not None
                            size = numel(fused_slice_shape(unit.fused, tshape[unit.fused.parts[0]])) * DTYPE_SIZES[dtype]
                            writes.append(Write(tpl.format(prefix=group.prefix), e * size, (e + 1) * size, dtype))
                deltas = []
                for role in roles:
                    fa, fb = _factors(lg, adapter, role, run, reads, lg.fused_order or order)  # type: ignore[arg-type, union-attr]
                    scales = tuple(scaling(adapter.config, source_scale(adapter.config, _module_of(lg, role, e)))  # type: ignore[arg-type]
                                   for e in run)
                    deltas.append(RoleDelta(role, fa, fb, scales))
                compute = MergeMxfp4(tuple(run), tuple(src[i][0] for i in members), tuple(u for u, _ in out_units),
                                     role_shape, tuple(deltas), mx, tuple(cast.items()) if dtype else (), bool(dtype),
                                     group.prefix)
                pieces.append(Piece(tuple(reads.reads), tuple(writes), compute, run.start))
    return pieces


def check_counts(plan: MergePlan) -> None:
    """Every base tensor is written exactly once (a planning bug otherwise)."""
    sizes = {t.name: t.nbytes for t in plan.targets}
    covered: dict[str, int] = {}
    for p in plan.pieces:
        for w in p.writes:
            covered[w.tensor] = covered.get(w.tensor, 0) + w.end - w.start
    wrong = [n for n in sizes if covered.get(n, 0) != sizes[n]]
    if wrong:
        raise AssertionError(f"merge plan writes {covered.get(wrong[0], 0)} of {sizes[wrong[0]]} bytes of {wrong[0]!r}")


__all__ = ["ADAPTER_SOURCE", "saved_modules", "MergePlan", "MergeExperts", "MergeMxfp4", "MergeTensor", "Factor", "fp8_requantize", "plan_merge",
           "refuse_variants", "check_counts"]
