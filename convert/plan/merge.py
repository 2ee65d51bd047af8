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
  per-expert role tensors by the family's ops (transforms.decode), merged, and encoded back, an expert at a
  time (MergeExperts.steps: the executor writes each expert's outputs before it reads the next one's bytes).
- other LoRA modules (attention, router, dense MLP): the base tensor the module's `.weight` names, in row
  chunks (a quantized one whole).
- FP8 block-scaled weights (`X.weight` with `X.weight_scale_inv`): dequantized, merged in float32 and
  requantized with fresh per-block scales (block amax / 448, same grid, same scale dtype); with --dtype every
  FP8 weight is dequantized and written in that dtype, the scale grids dropped.
- MXFP4 expert layers (a family with `quantization.dequantize`, gpt-oss as released): the LoRA (of the target
  family's roles) merged into the dequantized values and requantized (merge_quant.mxfp4_quantize), or with
  --dtype the whole layer written in the target family's layout.
- modules_to_save tensors: the adapter's copy replaces the base tensor.
The pieces' computes are convert.plan.merge_compute's; requantizing ones measure how much of each delta survived
(merge_quant.SURVIVAL). They compute in numpy (convert.plan.ndarrays: bf16 and FP8 by integer ops that round as
torch does), so a merge never loads torch (1-6 s of start-up).

Refused before anything is written (ConversionError naming the tensor): adapter modules or shapes that do
not fit the base, LoRA variants a plain merge would get wrong (DoRA, LoRA bias, ...), tensors that are neither
LoRA factors nor modules_to_save tensors. No model or projection is named here: roles and layouts come from the
family tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from convert.errors import ConversionError
from convert.families import Family, dequantized_family
from convert.formats.adapter_layouts import PEFT_PREFIX, ExpertLoraGroup, detect_expert_lora, fused_order
from convert.formats.adapter_source import AdapterSource
from convert.formats.checkpoint import Checkpoint, TensorRef
from convert.formats.lora_producers import IN_OUT, RANK_MAJOR
from convert.formats.safetensors import DTYPE_SIZES, numel
from convert.io.sources import source_file
from convert.plan.adapter_names import MODEL, KeyNames, expert_prefix, source_naming
from convert.plan.adapter_scaling import scaling, source_scale
from convert.plan.base import (
    DEFAULT_CHUNK_BYTES,
    Piece,
    Read,
    TargetTensor,
    Write,
    _units,
    copy_pieces,
    expert_read,
    target_dtype,
)
from convert.plan.dequant import block_size
from convert.plan.expert_groups import ExpertGroup, find_expert_groups
from convert.plan.merge_compute import CastRun, Factor, MergeExperts, MergeMxfp4, MergeTensor, RoleDelta
from convert.plan.merge_quant import FP8_MAX
from convert.plan.transforms import Unit
from convert.settings import DEFAULT_SETTINGS
from sharding.ep import expert_slices

ADAPTER_SOURCE = "adapter"  # the extra source name the pieces read adapter files under (convert.io.sources)
# float32 bytes one expert piece (a run of experts, at least one) works on unless MOE_CONVERT_MERGE_RUN_BYTES says:
# 24 MB of bf16 experts, 12 MB of FP8 ones. A worker holds about 1.5x this (its reads, the float32 merges, the
# outputs): with merge_adapter's 4 workers a rank's pieces stay near 300 MB (4 layers of Qwen3-30B-A3B shapes, 1
# rank: 676 MB peak RSS; 842 MB with 96 MiB runs)
RUN_BYTES = DEFAULT_SETTINGS.merge_run_bytes
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
    split: dict[str, Any] = dict(part=part, parts=k, order=order or "concat")
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
        at = reads.add(_adapter_read(ref, lo * size, hi * size))
        out.append(Factor(at, ref.info.dtype, (hi - lo, *shape[1:]), "run", first=e0, shared=shared,
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
    read = expert_read(group, unit, tpl, e)
    ref = group.per_expert[(str(unit.role), e)] if unit.fused is None else group.fused[tpl]
    start = read.start - ref.info.start
    return read, ref.info.name, start, start + read.end - read.start


def plan_merge(ckpt: Checkpoint, family: Family, adapter: AdapterSource, dtype: str | None, ep: int,
               chunk: int = DEFAULT_CHUNK_BYTES, run_bytes: int = RUN_BYTES) -> MergePlan:
    """Plan merging `adapter` into the base `ckpt` of `family` (see the module docstring); `dtype` casts every
    floating output tensor (None: keep the base's); `ep` expert slices (a piece never spans two)."""
    refuse_variants(adapter)
    _check_base_quantization(ckpt, family)
    return _MergePlanner(ckpt, family, adapter, dtype, ep, chunk, run_bytes).plan()


def _check_base_quantization(ckpt: Checkpoint, family: Family) -> None:
    """Raise unless the base is unquantized, FP8 block-scaled or MXFP4 of a family that dequantizes it."""
    where = ckpt.storage.display("config.json")
    quant = ckpt.config.get("quantization_config") if isinstance(ckpt.config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in (None, "fp8") and not (method == "mxfp4" and family.dequantize is not None):
        raise ConversionError(f"{where}: a {method!r}-quantized base cannot be merged into (FP8 block-scaled, MXFP4 "
                              "and unquantized bases are supported)")


_FLOATS = ("F32", "F16", "BF16", "F64")  # dtypes a LoRA merges into, and a modules_to_save tensor is


class _MergePlanner:
    """plan_merge's work: the base, its expert layers and the adapter's LoRA read once (raising where they do not
    fit), then the pieces planned in the base's order of kinds (expert LoRA, quantized layers without LoRA, other
    modules, modules_to_save, copies) while `touched`, `done` and `replaced` record what they write."""

    def __init__(self, ckpt: Checkpoint, family: Family, adapter: AdapterSource, dtype: str | None, ep: int,
                 chunk: int, run_bytes: int) -> None:
        """Read the base's family, expert layers and the adapter's LoRA (raising where they do not fit)."""
        self.ckpt, self.family, self.adapter, self.dtype = ckpt, family, adapter, dtype
        self.chunk, self.run_bytes = chunk, run_bytes
        where = ckpt.storage.display("config.json")
        self.lfam = dequantized_family(family)  # whose roles and names the adapter's LoRA has (the MXFP4 family's target)
        self.qfamily = family.with_companions(family.companions_in(ckpt.tensors))
        # --dtype on an FP8 base: every FP8 weight dequantized
        self.dequant = bool(dtype) and bool(self.qfamily.companion_roles)
        self.block = block_size(ckpt.config)
        num_experts = family.num_experts(ckpt.config, where)
        self.groups, self.passthrough = find_expert_groups(ckpt, self.qfamily, num_experts, rename=True)
        self.by_prefix = {g.prefix: g for g in self.groups}
        self.saved = saved_modules(adapter)
        lora_infos = {n: i for n, i in adapter.infos.items() if n not in self.saved}
        self.lora_groups, self.others = detect_expert_lora(lora_infos, adapter.config, ckpt.config, adapter.display(),
                                                           packings=True)
        self.names = KeyNames(self.lfam, source_naming(self.lfam, self.lora_groups, list(lora_infos)), MODEL)
        self.order = fused_order(self.lfam)
        self.pairs = {w: f"{w}{sfx}" for sfx in self.qfamily.companions_in(ckpt.tensors) for w in family.roles
                      if f"{w}{sfx}" in self.qfamily.role_leaves}
        self.weights = frozenset(self.pairs) if self.dequant else frozenset()
        self.done: set[tuple[str, tuple[int, ...]]] = set()  # (layer, unit set) of expert pieces planned
        # base tensors written under another name / dropped (MXFP4 --dtype)
        self.replaced: dict[str, TargetTensor | None] = {}
        self.pieces: list[Piece] = []
        self.touched: set[str] = set()
        self.merged_groups: list[tuple[str, str, str]] = []
        self.modules: list[str] = []
        self.slots = max([num_experts, *(g.slots for g in self.groups)]) if self.groups else num_experts
        self.slices = expert_slices(self.slots, min(ep, self.slots))

    def plan(self) -> MergePlan:
        """Every piece and output tensor of the merge, in the base's order."""
        for lg in self.lora_groups:
            self._expert_layer(lg)
        if self.dequant:  # the FP8 expert weights no LoRA touches, dequantized too
            self.pieces += _fp8_dequant_pieces(self.qfamily, self.groups, self.pairs, self.done, self.dtype,
                                               self.block, self.touched)
        if self.family.dequantize is not None and self.dtype:  # MXFP4 --dtype: every expert layer in the target's layout
            for group in self.groups:
                if (group.prefix, ()) not in self.done:
                    self.pieces += self._mx_pieces(group, None)
        # other LoRA modules: the base tensor their `.weight` names
        base_by_model = {self.family.to_model(n): n for n in self.passthrough}
        for module in sorted({n.rsplit(".lora_", 1)[0] for n in self.others}):
            self._module(module, base_by_model)
        # modules_to_save: the adapter's trained copy replaces the base tensor (cast to its output dtype)
        for name, model_name in self.saved.items():
            self._saved(name, model_name, base_by_model)
        # everything else: byte copies (or casts), and the base's tensor order file by file
        scales = _fp8_scale_names(self.ckpt, self.family) if self.dequant else {}
        self.replaced.update({n: None for n in scales})  # --dtype on an FP8 base: the scale grids are dropped
        files = self._files()
        targets = self._targets(scales)
        family, dtype = self.family, self.dtype
        return MergePlan(family=family.name, targets=targets, files=files, pieces=self.pieces, num_experts=self.slots,
                         groups=self.merged_groups, modules=self.modules, copy_files=list(self.ckpt.other_files),
                         metadata={f: dict(h.metadata) for f, h in self.ckpt.headers.items()}, notes=self._notes(),
                         touched=sorted(self.touched),
                         dequantized=self.dequant or (family.dequantize is not None and bool(dtype)))

    # ------------------------------------------------------------------ expert LoRA

    def _expert_layer(self, lg: ExpertLoraGroup) -> None:
        """The pieces merging expert LoRA `lg` into its base layer (raises where there is none, or it does not fit)."""
        prefix = expert_prefix(self.lfam, self.names, lg.prefix)
        group = self.by_prefix.get(_strip(prefix)) if prefix is not None else None
        if group is None:
            raise ConversionError(f"{self.adapter.display()}: tensor {lg.tensors[0]!r}: the base has no "
                                  f"{self.family.name} expert layer {_strip(lg.prefix)!r} for this expert LoRA to "
                                  "merge into")
        if self.family.dequantize is not None:  # an MXFP4 base
            self.pieces += self._mx_pieces(group, lg)
            self.merged_groups.append((group.prefix, group.layout, lg.pattern))
            self.done.add((group.prefix, ()))
            return
        self._check_fits(lg, group)
        self.merged_groups.append((group.prefix, group.layout, lg.pattern))
        units = _units(self.qfamily, group, group.layout, None, "src")
        dst_units = _merge_dst_units(self.qfamily, group, self.dtype, self.weights, set(self.pairs.values()))
        for members in _unit_sets(units, self.pairs):
            roles = [r for i in members for r in units[i][0].roles if r in lg.roles]
            if not roles:
                continue
            self.done.add((group.prefix, tuple(members)))
            self._unit_set_pieces(lg, group, [units[i] for i in members], [dst_units[i] for i in members], roles)

    def _mx_pieces(self, group: ExpertGroup, lg: ExpertLoraGroup | None) -> list[Piece]:
        """The pieces of MXFP4 expert layer `group` with the LoRA `lg` (None: none; see _mx_group_pieces)."""
        return _mx_group_pieces(self.family, self.lfam, group, lg, self.adapter, self.dtype, self.slices,
                                self.run_bytes, self.order, self.touched, self.replaced)

    def _check_fits(self, lg: ExpertLoraGroup, group: ExpertGroup) -> None:
        """Raise where a role's LoRA of `lg` is for another [out, in] or number of experts than base layer `group`."""
        for role in lg.roles:
            shape = group.role_shape.get(role)
            out_in = lg.dims_of(role)
            if shape is None or tuple(shape) != tuple(out_in):
                name = lg.factor((role,), "A", 0).name if lg.pattern == "per_expert" else lg.tensors[0]
                raise ConversionError(
                    f"{self.adapter.display()}: tensor {name!r}: "
                    f"the {role} LoRA of layer {group.prefix} is for [out, in] = {list(out_in)}, the base's "
                    f"{role} weight is {list(shape) if shape else 'absent'}")
            if lg.experts_of(role) != group.role_experts.get(role, group.num_experts):
                raise ConversionError(f"{self.adapter.display()}: layer {group.prefix}: the {role} LoRA has "
                                      f"{lg.experts_of(role)} experts, the base "
                                      f"{group.role_experts.get(role, group.num_experts)}")

    def _unit_set_pieces(self, lg: ExpertLoraGroup, group: ExpertGroup, src: list[tuple[Unit, str]],
                         dst: list[tuple[Unit, str] | None], roles: list[str]) -> None:
        """The pieces of one unit set (`src` units, their output units `dst`) of expert layer `group` merging
        `roles` of `lg`: one per run of experts of one EP slice, as many as fit `run_bytes` in float32."""
        held = {r for unit, _ in src for r in unit.roles}
        quant_pairs = tuple((w, s) for w, s in self.pairs.items() if w in (held if self.dequant else roles))
        per_expert = sum(_unit_read(group, unit, tpl, 0)[0].end - _unit_read(group, unit, tpl, 0)[0].start
                         for unit, tpl in src)
        count = min(group.role_experts.get(unit.roles[0], group.num_experts) for unit, _ in src)
        widen = 4 // min(DTYPE_SIZES[unit.dtype] for unit, _ in src)  # merged in float32
        step = max(1, self.run_bytes // max(1, per_expert * widen))
        role_shape = tuple(sorted(group.role_shape.items()))
        for sl in self.slices:
            for e0 in range(sl.start, min(sl.stop, count), step):
                run = range(e0, min(e0 + step, sl.stop, count))
                self.pieces.append(self._run_piece(lg, group, src, dst, roles, run, role_shape, quant_pairs))

    def _run_piece(self, lg: ExpertLoraGroup, group: ExpertGroup, src: list[tuple[Unit, str]],
                   dst: list[tuple[Unit, str] | None], roles: list[str], run: range,
                   role_shape: tuple[tuple[str, tuple[int, ...]], ...], quant_pairs: tuple[tuple[str, str], ...]
                   ) -> Piece:
        """The piece merging `roles` into the experts of `run`: each expert's base reads (in order, never
        deduplicated) and writes, then the LoRA factor reads."""
        reads = _Reads()
        writes: list[Write] = []
        for e in run:
            for (unit, tpl), out in zip(src, dst):
                read, name, ws, we = _unit_read(group, unit, tpl, e)
                reads.reads.append(read)  # base reads first, in order (never deduplicated)
                self.touched.add(name)
                if out is None:  # a scale grid dropped (--dtype on an FP8 base)
                    continue
                out_item = DTYPE_SIZES[out[0].dtype] / DTYPE_SIZES[unit.dtype]
                writes.append(Write(name, int(ws * out_item), int(we * out_item), out[0].dtype))
        deltas = tuple(self._role_delta(lg, role, run, reads) for role in roles)
        compute = MergeExperts(tuple(run), tuple(unit for unit, _ in src), tuple(o[0] for o in dst if o is not None),
                               role_shape, deltas, quant_pairs, self.block, not self.dequant, group.prefix)
        return Piece(tuple(reads.reads), tuple(writes), compute, run.start)

    def _role_delta(self, lg: ExpertLoraGroup, role: str, run: range, reads: _Reads) -> RoleDelta:
        """`role`'s LoRA factors of `lg` for the experts of `run` (their reads added to `reads`) and scalings."""
        fa, fb = _factors(lg, self.adapter, role, run, reads, lg.fused_order or self.order)
        cfg = self.adapter.config
        return RoleDelta(role, fa, fb, tuple(scaling(cfg, source_scale(cfg, _module_of(lg, role, e))) for e in run))

    # ------------------------------------------------------------------ other LoRA modules

    def _module(self, module: str, base_by_model: dict[str, str]) -> None:
        """The pieces merging LoRA `module` (attention, router, dense MLP) into the base tensor its `.weight` names."""
        adapter = self.adapter
        an, bn = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if an not in adapter.tensors or bn not in adapter.tensors:
            have = an if an in adapter.tensors else bn
            raise ConversionError(f"{adapter.display()}: tensor {have!r} has no lora_{'B' if have == an else 'A'} partner")
        a, b = adapter.tensors[an], adapter.tensors[bn]
        model_module = _strip(self.names.canonical_module(module))
        target = base_by_model.get(model_module + ".weight")
        if target is None:
            raise ConversionError(f"{adapter.display()}: tensor {an!r}: the base has no tensor "
                                  f"{model_module + '.weight'!r} (or its checkpoint name) for this LoRA to merge into")
        ref = self.ckpt.tensors[target]
        if len(ref.info.shape) != 2 or len(a.info.shape) != 2 or len(b.info.shape) != 2 \
                or a.info.shape[0] != b.info.shape[1] or (b.info.shape[0], a.info.shape[1]) != tuple(ref.info.shape):
            raise ConversionError(
                f"{adapter.display()}: tensors {an!r} {list(a.info.shape)} / {bn!r} {list(b.info.shape)} do not fit "
                f"the base tensor {target!r} {list(ref.info.shape)} ([out, in] = [lora_B rows, lora_A columns])")
        s = scaling(adapter.config, source_scale(adapter.config, _strip(module)))
        self.modules.append(model_module)
        self.touched.add(target)
        scale_name = next((target + sfx for sfx in self.family.companions if target + sfx in self.ckpt.tensors), None)
        if scale_name is not None and ref.info.dtype.startswith("F8_"):
            self.pieces.append(self._fp8_module_piece(target, ref, scale_name, self.ckpt.tensors[scale_name], a, b, s))
            return
        if ref.info.dtype not in _FLOATS:
            raise ConversionError(f"{self.ckpt.storage.display(ref.file)}: tensor {target!r} is {ref.info.dtype}: "
                                  "cannot merge LoRA into it")
        self.pieces += self._row_pieces(target, ref, a, b, s)

    def _fp8_module_piece(self, target: str, ref: TensorRef, scale_name: str, sref: TensorRef, a: TensorRef,
                          b: TensorRef, s: float) -> Piece:
        """The one piece merging LoRA factors `a`, `b` (scaling `s`) into FP8 weight `target` (`ref`) with scale grid
        `scale_name` (`sref`): requantized, or written as --dtype without its grid."""
        self.touched.add(scale_name)
        out_dtype = str(self.dtype if self.dequant else ref.info.dtype)
        compute = MergeTensor(ref.info.shape, ref.info.dtype, out_dtype, a.info.shape, a.info.dtype,
                              b.info.shape, b.info.dtype, s, sref.info.shape, sref.info.dtype, self.block,
                              not self.dequant, target)
        writes = [Write(target, 0, numel(ref.info.shape) * DTYPE_SIZES[out_dtype], out_dtype)]
        if not self.dequant:
            writes.append(Write(scale_name, 0, sref.info.nbytes, sref.info.dtype))
        return Piece((Read(ref.file, ref.info.start, ref.info.end, ref.info.dtype),
                      Read(sref.file, sref.info.start, sref.info.end, sref.info.dtype),
                      _adapter_read(a), _adapter_read(b)), tuple(writes), compute)

    def _row_pieces(self, target: str, ref: TensorRef, a: TensorRef, b: TensorRef, s: float) -> list[Piece]:
        """The pieces merging LoRA factors `a`, `b` (scaling `s`) into float weight `target` (`ref`), `chunk` bytes of
        rows each."""
        out_dtype = target_dtype(ref.info.dtype, self.dtype)
        rows, cols = ref.info.shape
        row_in, row_out = cols * DTYPE_SIZES[ref.info.dtype], cols * DTYPE_SIZES[out_dtype]
        b_row = b.info.nbytes // rows
        step = max(1, self.chunk // max(row_in, 1))
        pieces: list[Piece] = []
        for i in range(0, rows, step):
            j = min(rows, i + step)
            compute = MergeTensor((j - i, cols), ref.info.dtype, out_dtype, a.info.shape, a.info.dtype,
                                  (j - i, b.info.shape[1]), b.info.dtype, s)
            pieces.append(Piece((Read(ref.file, ref.info.start + i * row_in, ref.info.start + j * row_in,
                                      ref.info.dtype),
                                 _adapter_read(a), _adapter_read(b, i * b_row, j * b_row)),
                                (Write(target, i * row_out, j * row_out, out_dtype),), compute))
        return pieces

    def _saved(self, name: str, model_name: str, base_by_model: dict[str, str]) -> None:
        """The pieces writing modules_to_save tensor `name` (model naming `model_name`) in its base tensor's place."""
        target = base_by_model.get(model_name)
        ref, sref = self.ckpt.tensors.get(target or ""), self.adapter.tensors[name]
        where = self.adapter.display(sref.file)
        if ref is None or target in self.touched:
            raise ConversionError(f"{where}: tensor {name!r} (modules_to_save): the base has no tensor "
                                  f"{model_name!r} for it to replace" if ref is None else
                                  f"{where}: tensor {name!r} (modules_to_save) replaces {target!r}, which a LoRA also "
                                  "merges into")
        if tuple(ref.info.shape) != tuple(sref.info.shape) or ref.info.dtype not in _FLOATS \
                or sref.info.dtype not in _FLOATS:
            raise ConversionError(f"{where}: tensor {name!r} (modules_to_save) is "
                                  f"{sref.info.dtype} {list(sref.info.shape)}; it cannot replace the base's {target!r} "
                                  f"({ref.info.dtype} {list(ref.info.shape)})")
        out_dtype = target_dtype(ref.info.dtype, self.dtype)
        _, ps = copy_pieces(TensorRef(source_file(ADAPTER_SOURCE, sref.file), sref.info), str(target), out_dtype,
                            self.chunk)
        # a compute piece, not a byte copy: the engine's range copies read the job's own source only
        self.pieces += [Piece(p.reads, p.writes, CastRun(sref.info.dtype, out_dtype)) for p in ps]
        self.touched.add(str(target))
        self.modules.append(model_name.rsplit(".", 1)[0] + " (modules_to_save)")

    # ------------------------------------------------------------------ the output

    def _output_name(self, name: str) -> str | None:
        """The output name of base tensor `name`: its own, its replacement's, or None where it is dropped."""
        if name not in self.replaced:
            return name
        new = self.replaced[name]
        return new.name if new is not None else None

    def _files(self) -> dict[str, list[str]]:
        """Base shard name -> the output's tensors of it in data order (a shard that held only dropped scale grids
        is not written)."""
        files: dict[str, list[str]] = {}
        for fname, header in self.ckpt.headers.items():
            ordered = (t.name for t in sorted(header.tensors.values(), key=lambda t: t.start))
            kept = [out for out in map(self._output_name, ordered) if out is not None]
            if kept:
                files[fname] = kept
        return files

    def _targets(self, scales: dict[str, str]) -> list[TargetTensor]:
        """Every output tensor in the base's order, with the pieces of those no other piece writes: FP8 weights
        dequantized (`scales`: scale grid -> weight, --dtype), byte copies (or casts) of the rest."""
        targets: list[TargetTensor] = []
        for name, ref in self.ckpt.tensors.items():
            if name in self.replaced:
                new = self.replaced[name]
                if new is not None:
                    targets.append(new)
                continue
            if name in scales.values():  # an FP8 weight, dequantized
                targets.append(TargetTensor(name, str(self.dtype), ref.info.shape))
                if name not in self.touched:
                    sref = self.ckpt.tensors[_scale_of(scales, name)]
                    self.pieces.append(_fp8_dequant_tensor(ref, sref, str(self.dtype), self.block))
                continue
            t, ps = copy_pieces(ref, name, self.dtype, self.chunk)
            targets.append(t)
            if name not in self.touched:
                self.pieces += ps
        return targets

    def _notes(self) -> list[str]:
        """What the merge does, for the job's report."""
        dtype, block = self.dtype, self.block
        notes = [f"merged expert LoRA of {len(self.merged_groups)} layer(s), {len(self.modules)} other LoRA "
                 f"module(s); {len(self.touched)} of {len(self.ckpt.tensors)} base tensors change, the rest are byte "
                 "copies" + (" (cast)" if dtype else "")]
        if self.pairs and self.dequant:
            notes.append(f"every FP8 weight is dequantized ({block[0]}x{block[1]} blocks) and written as {dtype}, the "
                         "touched ones merged in float32 first; the scale grids and quantization_config are dropped")
        elif self.pairs:
            notes.append(f"FP8 weights the adapter touches are dequantized, merged in float32 and requantized with "
                         f"fresh {block[0]}x{block[1]} block scales (amax / {FP8_MAX:g})")
        if self.family.dequantize is not None:
            notes.append("MXFP4 expert weights the adapter touches are dequantized, merged in float32 and " + (
                f"written as {dtype} (every expert layer, in {self.lfam.name}'s layout; quantization_config dropped)"
                if dtype else "requantized with fresh E8M0 scales per 32 values"))
        return notes


# ----------------------------------------------------------------------------- quantized bases
# (--dtype on an FP8 base; MXFP4 bases): kept apart from plan_merge's piece sizing


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


__all__ = ["ADAPTER_SOURCE", "saved_modules", "MergePlan", "plan_merge", "refuse_variants", "check_counts"]
