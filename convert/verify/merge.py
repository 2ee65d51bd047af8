"""Check a merged checkpoint against its base and adapter, independently of the merge planner.

The base and the output are read with the verifier's own layout reader (convert.verify.base: the family
tables' op descriptions, numpy), the adapter with its own LoRA reader (convert.verify.adapter: `lora_side`,
each expert's delta B_e @ A_e * scaling in float64 under peft's scaling rules). For every expert of every
LoRA'd layer and every other LoRA module: `merged` must be `base + delta` within one ulp of the output
dtype (the merge rounds once from float32). FP8 block-scaled weights are dequantized on both sides by the
128x128 formula; the merged value must be within one FP8 step (of its fresh block scale) of base + delta, and
how much of each delta survived the requantization is reported (`survived`: the share of the delta's
projection the requantized weight keeps; `rel_err`: |Q(W + delta) - (W + delta)| / |W + delta|). MXFP4 expert
weights (gpt-oss as released, merged without --dtype): the base's and the output's blocks decoded here from the
MXFP4 definition (FP4 E2M1 nibbles, low nibble first, E8M0 block scales; not the merge's convert.plan.dequant), each
merged value within half an FP4 step (of its block's output scale) of base + delta, the survival reported too;
with --dtype every expert layer, in the target family's layout, within one ulp of the dequantized base (+ delta),
its cast roles (biases) the exact cast. The adapter's roles are those of the family the MXFP4 one dequantizes
to. Every other tensor must be byte-identical (or the exact cast, with --dtype). Ranks split the work item by item.

Shared with the merge: the family tables (convert.families), the header and adapter-layout readers
(convert.formats) and the adapter key naming (convert.plan.adapter_names: which base tensor a LoRA module's
key names); none of the merge's planning or arithmetic.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from convert.errors import ConversionError
from convert.families import Family, dequantized_family, detect_family
from convert.formats.adapter_layouts import PEFT_PREFIX, ExpertLoraGroup, detect_expert_lora
from convert.formats.checkpoint import INDEX_NAME
from convert.formats.safetensors import TensorInfo
from convert.io.storage import Storage, Store, read_json
from convert.plan.adapter_names import MODEL, KeyNames, source_naming
from convert.settings import Settings, StorageSettings
from convert.verify.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_INDEX,
    ADAPTER_WEIGHTS,
    LoraSide,
    cut_factor,
    layer_key,
    lora_side,
    module_scale,
)
from convert.verify.base import LayerTensors, Side, _side, classify
from convert.verify.checks import read_stored
from convert.verify.tables import Table, read_table, to_tensor, torch_dtype
from launch.dist import Dist

CHUNK = 8 << 20
F32_EPS = 2.0 ** -24  # the merge computes in float32: its rounding beside the output's one ulp
MANTISSA = {"F64": 53, "F32": 24, "F16": 11, "BF16": 8}
WARN_SURVIVED = 0.5  # a requantized delta keeping less than half of itself is mostly below the quantization step
# FP4 E2M1 magnitudes of codes 0..7 (bit 3 is the sign): the OCP Microscaling (MX) spec, independent of the planner's
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def ulp(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The spacing of `dtype` values at |x| (float64; subnormal spacing below the smallest normal)."""
    p = MANTISSA[dtype]
    info = torch.finfo(torch_dtype(dtype))
    _, ex = torch.frexp(x.abs().clamp(min=info.tiny))
    return torch.ldexp(torch.ones_like(x), (ex - p).to(torch.int32))


def fp8_step(t: torch.Tensor) -> torch.Tensor:
    """The spacing of float8_e4m3fn values at |t| (3 mantissa bits; subnormal spacing 2**-9)."""
    _, ex = torch.frexp(t.abs().clamp(min=2.0 ** -6))
    return torch.ldexp(torch.ones_like(t), (ex - 4).to(torch.int32))


def dequant(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 `w` [out, in] times its block's scale (float64), the 128x128 formula of FORMATS.md."""
    bm, bn = block
    s = scale.double().repeat_interleave(bm, 0)[: w.shape[0]].repeat_interleave(bn, 1)[:, : w.shape[1]]
    return w.double() * s


def mxfp4_values(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 values [..., G*32] of MXFP4 `blocks` U8 [..., G, 16] (two FP4 E2M1 codes a byte, the low nibble
    first) under E8M0 `scales` U8 [..., G] (2 ** (s - 127))."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32).long()
    mag = torch.tensor(FP4_E2M1, dtype=torch.float64)[codes & 7]
    vals = torch.where((codes & 8) != 0, -mag, mag)
    scale = torch.pow(torch.tensor(2.0, dtype=torch.float64), scales.double() - 127.0)
    return (vals * scale.unsqueeze(-1)).reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def fp4_half_step(want: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Half the FP4 spacing at each value of `want` [..., G*32] under its block's E8M0 `scales` [..., G]: the spacing
    is 0.5, 1 and 2 times the scale for |value| / scale in [0, 2), [2, 4) and [4, 6]."""
    scale = torch.pow(torch.tensor(2.0, dtype=torch.float64), scales.double() - 127.0).repeat_interleave(32, dim=-1)
    m = want.abs() / scale
    return torch.where(m < 2, 0.25, torch.where(m < 4, 0.5, 1.0)) * scale


def _strip(name: str) -> str:
    """`name` without peft's `base_model.model.` prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _expert_tensor_names(base_layers: dict[str, LayerTensors], dst_layers: dict[str, LayerTensors]) -> set[str]:
    """The names of the expert tensors of every layer of both sides."""
    return {st.name for lt in [*base_layers.values(), *dst_layers.values()]
            for st in [*lt.per_expert.values(), *lt.fused.values()]}


def _block(config: dict[str, Any]) -> tuple[int, int]:
    q = config.get("quantization_config") or {}
    size = q.get("weight_block_size") if isinstance(q, dict) else None
    return (int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else (128, 128)


class MergeCheck:
    """The items of one check (base, adapter, merged output) and how to check each."""

    def __init__(self, base: Store, adapter: Store, dst: Store, family_name: str | None) -> None:
        """Read the three directories' metadata and plan the items; what is wrong from metadata alone goes to
        `problems` (raises ConversionError where the base or the adapter cannot be read as one)."""
        self.base, self.adapter, self.dst = base, adapter, dst
        self.problems: list[str] = []
        self.base_cfg = read_json(base, "config.json")
        plain = detect_family(self.base_cfg, base.display("config.json"), family_name)
        self.block = _block(self.base_cfg)
        self._read_tables()
        self.a_cfg = read_json(adapter, ADAPTER_CONFIG)
        self._set_families(plain)
        base_layers, base_others = classify(self.base_table, self.family, rename=True)
        dst_layers, _ = classify(self.dst_table, self.out_family, rename=True)
        # MXFP4 --dtype: the expert tensors of both sides, checked expert by expert
        renamed = _expert_tensor_names(base_layers, dst_layers) if self.mx_dtype else set()
        self._check_names(renamed)
        counts = self._role_counts()
        infos = {n: TensorInfo(n, t.dtype, t.shape, t.start, t.end) for n, t in self.a_table.tensors.items()}
        groups, others = detect_expert_lora(infos, self.a_cfg, self.base_cfg, adapter.display(), packings=True)
        names = KeyNames(self.lfam, source_naming(self.lfam, groups, list(self.a_table.tensors)), MODEL)
        self.items: list[tuple[Any, ...]] = []
        merged: set[str] = set()
        for g in groups:
            merged |= self._plan_lora_layer(g, names, base_layers, dst_layers, counts)
        if self.mx_dtype:  # every other expert layer: dequantized into the target family's layout too
            self._plan_dequantized_layers(base_layers, dst_layers, counts)
            merged |= {n for n in renamed if n in self.base_table.tensors}
        base_by_model = {plain.to_model(n): n for n in base_others}
        merged |= self._plan_modules(others, names, base_by_model)
        merged |= self._plan_saved(base_by_model)
        self._plan_unmerged(merged)
        self.report: list[tuple[str, str, float, float]] = []  # (format, tensor, survived, rel_err)

    def _read_tables(self) -> None:
        """Read the base's, the output's and the adapter's tensors (the output's problems into `problems`); raises
        where the base or the adapter is not valid."""
        self.base_table, bad = read_table(self.base, INDEX_NAME, require_index=False, single_name="model.safetensors",
                                          strict=False)
        if bad:
            raise ConversionError(f"the base is not valid: {bad[0]}")
        self.dst_table, found = read_table(self.dst, INDEX_NAME, require_index=True, strict=True)
        self.problems += found
        self.a_table, bad = read_table(self.adapter, ADAPTER_INDEX, require_index=False, single_name=ADAPTER_WEIGHTS,
                                       strict=False)
        if bad:
            raise ConversionError(f"the adapter is not valid: {bad[0]}")

    def _set_families(self, plain: Family) -> None:
        """The families and quantization of both sides from the base's family `plain`: its companions (FP8 scale
        grids), MXFP4 roles, the adapter's family (`lfam`), whether --dtype dequantized and the output's family."""
        sfx = [s for s in plain.companions if any(n.endswith(s) for n in self.base_table.tensors)]
        self.family: Family = plain.with_companions(plain.companions_in(self.base_table.tensors)) if sfx else plain
        self.plain = plain
        # an MXFP4 base (a family with quantization.dequantize): target role -> (blocks role, scales role); the
        # adapter's LoRA has the target family's roles and names
        self.mx: dict[str, tuple[str, str]] = dict(plain.dequantize[1]) if plain.dequantize else {}
        self.lfam = dequantized_family(plain)
        self.mx_cast: dict[str, str] = dict(plain.dequantize[2]) if plain.dequantize else {}
        # --dtype on an MXFP4 base: every expert layer written in the target family's layout (no U8 blocks left)
        self.mx_dtype = bool(self.mx) and not any(t.dtype == "U8" and n in self.dst_table.tensors
                                                  for n, t in self.base_table.tensors.items())
        self.pairs = {w: f"{w}{s}" for s in self.family.companions_in(self.base_table.tensors) for w in plain.roles
                      if f"{w}{s}" in self.family.role_leaves}
        # --dtype on an FP8 base: the output holds every FP8 weight dequantized and none of the scale grids
        self.scales = {n + s: n for n, t in self.base_table.tensors.items() if t.dtype.startswith("F8_")
                       for s in plain.companions if n + s in self.base_table.tensors}
        self.dequant = bool(self.scales) and not any(n in self.dst_table.tensors for n in self.scales)
        self.out_family = plain if self.dequant else self.lfam if self.mx_dtype else self.family

    def _check_names(self, renamed: set[str]) -> None:
        """Into `problems`: base tensors missing from the output or of another shape there, and output tensors not
        in the base (`renamed`: the expert tensors of an MXFP4 --dtype merge, checked expert by expert)."""
        for name, t in self.base_table.tensors.items():
            if name in renamed and name not in self.dst_table.tensors:
                continue
            d = self.dst_table.tensors.get(name)
            if d is None and self.dequant and name in self.scales:
                continue
            if d is None:
                self.problems.append(f"{self.dst.display()}: tensor {name!r} of the base is missing")
            elif d.shape != t.shape:
                self.problems.append(f"{self.dst.display(d.file)}: tensor {name!r} has shape {list(d.shape)}, the base "
                                     f"{list(t.shape)}")
        for name in sorted(set(self.dst_table.tensors) - set(self.base_table.tensors) - renamed):
            self.problems.append(f"{self.dst.display()}: tensor {name!r} is not in the base")

    def _role_counts(self) -> dict[str, int]:
        """Role -> how many experts hold it (config.json's E, plus extra experts), scale, MXFP4 and cast roles too."""
        plain = self.plain
        counts = plain.role_experts(self.base_cfg, plain.num_experts(self.base_cfg, "config.json"), "config.json")
        counts.update({s: counts.get(w, 0) for w, s in self.pairs.items()})
        counts.update({t: counts.get(bl, 0) for t, (bl, _) in self.mx.items()})
        counts.update({t: counts.get(src, 0) for t, src in self.mx_cast.items()})
        return counts

    def _layer_sides(self, layer: str, base_layers: dict[str, LayerTensors], dst_layers: dict[str, LayerTensors],
                     counts: dict[str, int]) -> tuple[Side, Side] | None:
        """The base's and the output's side of expert layer `layer`; None (the problems into `problems`) where
        either holds no layout."""
        bside, pb = _side(self.family, layer, base_layers[layer], counts, self.base.display())
        dside, pd = _side(self.out_family, layer, dst_layers[layer], counts, self.dst.display())
        if bside is None or dside is None:
            self.problems += pb + pd
            return None
        return bside, dside

    def _plan_lora_layer(self, g: ExpertLoraGroup, names: KeyNames, base_layers: dict[str, LayerTensors],
                         dst_layers: dict[str, LayerTensors], counts: dict[str, int]) -> set[str]:
        """Items checking each expert of the layer of expert LoRA `g`; returns the base tensors its LoRA merges into."""
        layer = _strip(layer_key(names.canonical_module(g.prefix), self.lfam))
        if layer not in base_layers or layer not in dst_layers:
            raise ConversionError(f"{self.adapter.display()}: expert LoRA of layer {layer!r} has no expert layer in "
                                  "the base or the output")
        sides = self._layer_sides(layer, base_layers, dst_layers, counts)
        if sides is None:
            return set()
        side, pa = lora_side(g, self.a_table, self.a_cfg, self.lfam, self.adapter.display())
        self.problems += pa
        roles = set(g.roles) | {self.pairs[r] for r in g.roles if r in self.pairs} \
            | {x for r in g.roles if r in self.mx for x in self.mx[r]}
        for e in range(g.slots):
            self.items.append(("expert", layer, e, *sides, side))
        return self._holding(base_layers[layer], roles)

    def _holding(self, found: LayerTensors, roles: set[str]) -> set[str]:
        """The names of the tensors of `found` (a base layer) that hold any of `roles`."""
        out: set[str] = set()
        for key, stored in found.per_expert.items():
            if key[0] in roles:
                out.add(stored.name)
        for template, stored in found.fused.items():
            parts = [p for t in self.family.fused.get(self._layout(template), ()) if t.template == template
                     for p in t.parts]
            if any(p in roles for p in parts):
                out.add(stored.name)
        return out

    def _plan_dequantized_layers(self, base_layers: dict[str, LayerTensors], dst_layers: dict[str, LayerTensors],
                                 counts: dict[str, int]) -> None:
        """MXFP4 --dtype: items checking each expert of every expert layer without LoRA (dequantized only)."""
        for layer in sorted(set(base_layers) - {it[1] for it in self.items}):
            if layer not in dst_layers:
                self.problems.append(f"{self.dst.display()}: expert layer {layer!r} of the base is missing")
                continue
            sides = self._layer_sides(layer, base_layers, dst_layers, counts)
            if sides is None:
                continue
            for e in range(max(counts.get(r, 0) for r in self.mx)):
                self.items.append(("expert", layer, e, *sides, LoraSide(())))

    def _plan_modules(self, others: list[str], names: KeyNames, base_by_model: dict[str, str]) -> set[str]:
        """Items checking each other LoRA module (attention, router, dense) of the adapter tensors `others`;
        returns the base tensors merged into (with their FP8 scale grids)."""
        merged: set[str] = set()
        for module in sorted({n.rsplit(".lora_", 1)[0] for n in others if ".lora_" in n}):
            target = base_by_model.get(names.canonical_module(module)[len(PEFT_PREFIX):] + ".weight")
            if target is None:
                self.problems.append(f"{self.adapter.display()}: LoRA module {module!r} has no base tensor")
                continue
            scale = next((target + s for s in self.plain.companions if target + s in self.base_table.tensors), None)
            merged.add(target)
            if scale is not None and self.base_table.tensors[target].dtype.startswith("F8_"):
                merged.add(scale)
            else:
                scale = None
            self.items.append(("module", module, target, scale, module_scale(self.a_cfg, _strip(module))[2]))
        return merged

    def _plan_saved(self, base_by_model: dict[str, str]) -> set[str]:
        """Items checking each modules_to_save tensor (the adapter's copy in the base tensor's place); returns the
        base tensors replaced."""
        merged: set[str] = set()
        wanted = self.a_cfg.get("modules_to_save") or []
        wanted = [wanted] if isinstance(wanted, str) else wanted
        for name in self.a_table.tensors:
            plain_name = _strip(name)
            module = plain_name.rsplit(".", 1)[0]
            if ".lora_" in name or not any(module == m or module.endswith("." + m) for m in wanted):
                continue
            target = base_by_model.get(plain_name)
            if target is None:
                self.problems.append(f"{self.adapter.display()}: modules_to_save tensor {name!r} has no base tensor")
                continue
            merged.add(target)
            self.items.append(("saved", name, target))
        return merged

    def _plan_unmerged(self, merged: set[str]) -> None:
        """Items checking every base tensor outside `merged`: FP8 weights dequantized (--dtype), the rest copied or
        cast, chunk by chunk."""
        for name in sorted(set(self.base_table.tensors) - merged):
            if self.dequant and name in self.scales:
                continue
            if self.dequant and name in self.scales.values() and name in self.dst_table.tensors:
                self.items.append(("dequant", name, next(sc for sc, w in self.scales.items() if w == name)))
                continue
            if name in self.dst_table.tensors and self.dst_table.tensors[name].shape == self.base_table.tensors[name].shape:
                n = self.base_table.tensors[name].nbytes
                for start in range(0, max(n, 1), CHUNK):
                    self.items.append(("copy", name, start, min(n, start + CHUNK)))

    def _layout(self, template: str) -> str:
        return next((lay for lay, ts in self.family.fused.items() if any(t.template == template for t in ts)), "")

    def run(self, rank: int, world: int) -> tuple[list[str], list[tuple[str, str, float, float]], int]:
        """Check this rank's share of the items; (problems, FP8 / MXFP4 survival rows, items checked)."""
        problems: list[str] = []
        mine = self.items[rank::world]
        for item in mine:
            try:
                problems += getattr(self, f"_{item[0]}")(*item[1:])
            except ConversionError as exc:
                problems.append(str(exc))
        return problems, self.report, len(mine)

    def _check(self, what: str, base: torch.Tensor, merged: torch.Tensor, delta: torch.Tensor, dtype: str,
               slack: torch.Tensor | float = 0.0) -> list[str]:
        want = base.double() + delta
        diff = (merged.double() - want).abs()
        tol = ulp(want, dtype) + slack + 1e-300
        bad = diff > tol
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            return [f"{what}: element {i} is {float(merged.reshape(-1)[i].double())}, base + delta is "
                    f"{float(want.reshape(-1)[i])} ({int(bad.sum())} elements off by more than one ulp of {dtype}; "
                    f"max abs diff {float(diff.max()):.3g})"]
        return []

    def _check_fp8(self, what: str, w: torch.Tensor, ws: torch.Tensor, m: torch.Tensor, ms: torch.Tensor,
                   delta: torch.Tensor) -> list[str]:
        base = dequant(w, ws, self.block)
        want = base + delta
        got = dequant(m, ms, self.block)
        s = ms.double().repeat_interleave(self.block[0], 0)[: m.shape[0]].repeat_interleave(self.block[1], 1)[:, : m.shape[1]]
        tol = fp8_step(want / s) * s
        bad = (got - want).abs() > tol * 1.0001
        dd = float((delta * delta).sum())
        survived = float(((got - base) * delta).sum()) / dd if dd > 0 else 1.0
        rel = float((got - want).norm() / want.norm().clamp(min=1e-300))
        self.report.append(("fp8", what, survived, rel))
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            return [f"{what}: element {i} is {float(got.reshape(-1)[i])}, base + delta is {float(want.reshape(-1)[i])} "
                    f"(more than one FP8 step of its block apart; {int(bad.sum())} elements)"]
        return []

    def _check_mxfp4(self, what: str, wb: torch.Tensor, ws: torch.Tensor, mb: torch.Tensor, ms: torch.Tensor,
                     delta: torch.Tensor, slack: torch.Tensor | float) -> list[str]:
        """MXFP4 blocks/scales of the base (`wb`, `ws`) and the output (`mb`, `ms`), one expert's [out, G, 16] /
        [out, G]: every output value within half an FP4 step (of its block's output scale) of base + delta, plus
        the float32 merge's own rounding (`slack`, and the base's float32 eps)."""
        base = mxfp4_values(wb, ws)  # the verifier's own decoder, not the conversion's (convert.plan.dequant)
        if base.shape != delta.shape:
            return [f"{what}: the MXFP4 weight is {list(base.shape)} [out, in], the LoRA delta {list(delta.shape)}"]
        want = base + delta
        got = mxfp4_values(mb, ms)
        tol = fp4_half_step(want, ms) + slack + base.abs() * F32_EPS * 2
        diff = (got - want).abs()
        bad = diff > tol * 1.0001
        dd = float((delta * delta).sum())
        survived = float(((got - base) * delta).sum()) / dd if dd > 0 else 1.0
        rel = float((got - want).norm() / want.norm().clamp(min=1e-300))
        self.report.append(("mxfp4", what, survived, rel))
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            return [f"{what}: element {i} is {float(got.reshape(-1)[i])}, base + delta is {float(want.reshape(-1)[i])} "
                    f"(more than half an FP4 step of its block's scale apart; {int(bad.sum())} elements; max abs "
                    f"diff {float(diff.max()):.3g})"]
        return []

    def _expert(self, layer: str, e: int, bside: Any, dside: Any, side: Any) -> list[str]:
        deltas = side.load(self.adapter, e)
        slack = {}
        for rl in side.roles:  # the float32 computation's own error bound: (r + 2) eps32 (|B| @ |A|) |s|
            if e < len(rl.scaling):
                ca, cb = rl.cuts(e)
                a, bb = cut_factor(self.adapter, ca, e).double(), cut_factor(self.adapter, cb, e).double()
                slack[rl.role] = (bb.abs() @ a.abs()) * abs(rl.scaling[e]) * (a.shape[0] + 2) * F32_EPS
        b = bside.load(self.base, e)
        m = dside.load(self.dst, e)
        problems: list[str] = []
        if self.mx_dtype:
            return self._mx_dequantized(e, b, m, deltas, slack)
        mx_merged = {x for r, (d, _) in deltas.items() if d is not None and r in self.mx for x in self.mx[r]}
        for role, (raw, name) in b.items():
            if role in deltas or role in self.pairs.values() or role in mx_merged:
                continue
            if self.dequant and role in self.pairs:  # dequantized: the 128x128 formula, rounded once
                problems += self._check(f"{self.dst.display()}: tensor {m[role][1]!r} expert {e} {role} (no LoRA)",
                                        dequant(raw.tensor(), b[self.pairs[role]][0].tensor(), self.block),
                                        m[role][0].tensor(), torch.zeros(()), m[role][0].dtype)
                continue
            if raw.dtype != m[role][0].dtype:  # --dtype: the exact cast
                if not torch.equal(raw.tensor().to(torch_dtype(m[role][0].dtype)), m[role][0].tensor()):
                    problems.append(f"{self.dst.display()}: tensor {name!r} expert {e} {role}: not the base's cast")
                continue
            if not (raw.bits == m[role][0].bits).all():
                problems.append(f"{self.dst.display()}: tensor {name!r} expert {e} {role}: not the base's bytes")
        for role, (delta, _module) in deltas.items():
            if delta is None:
                continue
            if role in self.mx:
                bl, sc = self.mx[role]
                problems += self._check_mxfp4(f"{self.dst.display()}: tensor {m[bl][1]!r} expert {e} {role}",
                                              b[bl][0].tensor(), b[sc][0].tensor(), m[bl][0].tensor(),
                                              m[sc][0].tensor(), delta, slack.get(role, 0.0))
                continue
            what = f"{self.dst.display()}: tensor {m[role][1]!r} expert {e} {role}"
            if role in self.pairs and self.dequant:
                w = dequant(b[role][0].tensor(), b[self.pairs[role]][0].tensor(), self.block)
                problems += self._check(what, w, m[role][0].tensor(), delta, m[role][0].dtype,
                                        slack.get(role, 0.0) + w.abs() * F32_EPS * 2)
            elif role in self.pairs:
                sr = self.pairs[role]
                problems += self._check_fp8(what, b[role][0].tensor(), b[sr][0].tensor(), m[role][0].tensor(),
                                            m[sr][0].tensor(), delta)
            else:
                problems += self._check(what, b[role][0].tensor(), m[role][0].tensor(), delta, m[role][0].dtype,
                                        slack.get(role, 0.0) + b[role][0].tensor().double().abs() * F32_EPS)
        return problems

    def _mx_dequantized(self, e: int, b: dict[str, Any], m: dict[str, Any], deltas: dict[str, Any],
                        slack: dict[str, Any]) -> list[str]:
        """--dtype on an MXFP4 base, expert e: each target role the base's blocks dequantized (plus its delta), rounded
        once to the output dtype; each cast role (the biases) the base's exact cast."""
        problems: list[str] = []
        for role, (bl, sc) in self.mx.items():
            if role not in m:
                problems.append(f"{self.dst.display()}: expert {e} {role}: not in the output")
                continue
            got, name = m[role]
            w = mxfp4_values(b[bl][0].tensor(), b[sc][0].tensor())
            delta = deltas.get(role, (None, ""))[0]
            what = f"{self.dst.display()}: tensor {name!r} expert {e} {role}" + ("" if delta is not None else " (no LoRA)")
            if w.shape != got.shape:
                problems.append(f"{what}: shape {list(got.shape)}, the dequantized base {list(w.shape)}")
                continue
            problems += self._check(what, w, got.tensor(), delta if delta is not None else torch.zeros(()), got.dtype,
                                    slack.get(role, 0.0) + w.abs() * F32_EPS * 2 if delta is not None else 0.0)
        for role, src in self.mx_cast.items():
            if role not in m or src not in b:
                problems.append(f"{self.dst.display()}: expert {e} {role}: not in the output")
                continue
            got, name = m[role]
            if not torch.equal(b[src][0].tensor().to(torch_dtype(got.dtype)), got.tensor()):
                problems.append(f"{self.dst.display()}: tensor {name!r} expert {e} {role}: not the base's cast")
        return problems

    def _load(self, table: Table, storage: Store, name: str) -> torch.Tensor:
        t = table.tensors[name]
        return to_tensor(read_stored(storage, t), t.dtype, t.shape)

    def _module(self, module: str, target: str, scale: str | None, s: float) -> list[str]:
        a = self._load(self.a_table, self.adapter, f"{module}.lora_A.weight").double()
        b = self._load(self.a_table, self.adapter, f"{module}.lora_B.weight").double()
        delta = (b @ a) * s
        w = self._load(self.base_table, self.base, target)
        m = self._load(self.dst_table, self.dst, target)
        what = f"{self.dst.display()}: tensor {target!r}"
        slack = (b.abs() @ a.abs()) * abs(s) * (a.shape[0] + 2) * F32_EPS
        if scale is not None and self.dequant:
            wd = dequant(w, self._load(self.base_table, self.base, scale), self.block)
            return self._check(what, wd, m, delta, self.dst_table.tensors[target].dtype, slack + wd.abs() * F32_EPS * 2)
        if scale is not None:
            return self._check_fp8(what, w, self._load(self.base_table, self.base, scale), m,
                                   self._load(self.dst_table, self.dst, scale), delta)
        slack = (b.abs() @ a.abs()) * abs(s) * (a.shape[0] + 2) * F32_EPS + w.double().abs() * F32_EPS
        return self._check(what, w, m, delta, self.dst_table.tensors[target].dtype, slack)

    def _saved(self, name: str, target: str) -> list[str]:
        """A modules_to_save tensor: the output's `target` is the adapter's `name`, cast to the output's dtype."""
        want = self._load(self.a_table, self.adapter, name).to(torch_dtype(self.dst_table.tensors[target].dtype))
        if not torch.equal(self._load(self.dst_table, self.dst, target), want):
            return [f"{self.dst.display()}: tensor {target!r} is not the adapter's modules_to_save tensor {name!r}"]
        return []

    def _dequant(self, name: str, scale: str) -> list[str]:
        """An FP8 weight no LoRA touches, dequantized (--dtype): the 128x128 formula rounded once."""
        w = dequant(self._load(self.base_table, self.base, name), self._load(self.base_table, self.base, scale),
                    self.block)
        m = self._load(self.dst_table, self.dst, name)
        return self._check(f"{self.dst.display()}: tensor {name!r} (no LoRA, dequantized)", w, m, torch.zeros(()),
                           self.dst_table.tensors[name].dtype, w.abs() * F32_EPS * 2)

    def _copy(self, name: str, start: int, end: int) -> list[str]:
        t, d = self.base_table.tensors[name], self.dst_table.tensors[name]
        a = read_stored(self.base, t, start, end)
        if d.dtype == t.dtype:
            if bytes(a) != bytes(read_stored(self.dst, d, start, end)):
                return [f"{self.dst.display(d.file)}: tensor {name!r} (no LoRA) differs from the base in bytes "
                        f"[{start}, {end})"]
            return []
        k = int(torch.tensor([], dtype=torch_dtype(d.dtype)).element_size())
        j = int(torch.tensor([], dtype=torch_dtype(t.dtype)).element_size())
        want = to_tensor(a, t.dtype, ((end - start) // j,)).to(torch_dtype(d.dtype))
        got = to_tensor(read_stored(self.dst, d, start // j * k, end // j * k), d.dtype, ((end - start) // j,))
        if not torch.equal(want.view(torch.uint8) if want.numel() else want, got.view(torch.uint8) if got.numel() else got):
            return [f"{self.dst.display(d.file)}: tensor {name!r} (no LoRA) is not the base's cast to {d.dtype}"]
        return []


def verify_merge(base: str, adapter: str, dst: str, storage_options: dict[str, Any], family: str | None,
                 dist: Dist, settings: StorageSettings | None = None) -> tuple[int, list[str]]:
    """Check `dst` on every rank (each its share); (exit code, lines printed by rank 0). 0 ok, 1 mismatch.
    `settings`: the store settings its stores are opened with (None: the defaults)."""
    stores = [Storage(u, storage_options, settings) for u in (base, adapter, dst)]
    try:
        check = MergeCheck(stores[0], stores[1], stores[2], family)
        problems, report, n = check.run(dist.rank, dist.world_size)
    finally:
        for s in stores:
            s.close()
    gathered = dist.gather_main((problems, report, n))
    if not dist.is_main:
        return 0, []
    assert gathered is not None
    problems = check.problems + [p for ps, _, _ in gathered for p in ps]
    rows = [r for _, rs, _ in gathered for r in rs]
    total = sum(n for _, _, n in gathered)
    lines = [f"verify merge: {total} items checked ({len(check.items)} planned) on {dist.world_size} rank(s)"]
    for fmt, what, survived, rel in sorted(rows):
        flag = (f"  warning: the delta is mostly below the {fmt.upper()} quantization step"
                if survived < WARN_SURVIVED else "")
        lines.append(f"  {fmt} requantized {what}: delta survived {survived:.3f}, rel_err {rel:.3g}{flag}")
    for fmt in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == fmt]
        worst = min(r[2] for r in mine)
        lines.append(f"  {fmt}: {len(mine)} requantized tensor(s), the least surviving delta {worst:.3f}"
                     + (f"; {sum(r[2] < WARN_SURVIVED for r in mine)} mostly below the quantization step"
                        if worst < WARN_SURVIVED else ""))
    lines += [f"mismatch: {p}" for p in problems[:50]]
    if len(problems) > 50:
        lines.append(f"... and {len(problems) - 50} more")
    lines.append("verify merge: OK" if not problems else f"verify merge: {len(problems)} problem(s)")
    return (1 if problems else 0), lines


def verify_merge_after(args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None,
                       settings: StorageSettings | None = None) -> int:
    """`--verify` of convert.merge_adapter: verify on the same ranks; on a mismatch rank 0 renames the index to
    `*.unverified` (the output never looks complete) and every rank returns 1. `settings`: the store settings of
    every store it opens; None reads them from the environment now, as the check starts (the same variables the
    merge's job_environment read)."""
    settings = Settings.from_env().storage if settings is None else settings
    try:
        code, lines = verify_merge(args.src, args.adapter, args.dst, args.storage_options, args.family, dist,
                                   settings)
    except ConversionError as exc:
        code, lines = 2, [f"error: cannot verify: {exc}"]
    if dist.is_main:
        for line in lines:
            print(line, file=sys.stderr if line.startswith(("mismatch", "error")) else sys.stdout)
        if report is not None:
            report["verify"] = code
        if code == 1:
            dst = Storage(args.dst, args.storage_options, settings)
            if dst.exists(INDEX_NAME):
                dst.rename(INDEX_NAME, INDEX_NAME + ".unverified")
                print(f"error: renamed {dst.display(INDEX_NAME)} to {INDEX_NAME}.unverified: the output is not a "
                      "correct merge; do not use it", file=sys.stderr)
            dst.close()
    code = dist.broadcast(code if dist.is_main else None)
    return int(code) if code != 2 else 1


__all__ = ["verify_merge", "verify_merge_after", "MergeCheck", "ulp"]
