"""What a target's rules (configs/targets/*.json) make a split/fuse add to or refuse in its output.

Run on a plan's builder (convert.plan.adapter._Builder) once every tensor is planned, before
adapter_config.json is written:

- `refuse_modules`: a LoRA module the server drops or rejects is refused (ConversionError naming
  the tensor and the reason; nothing is written).
- `needs_with`: where a layer has LoRA on a leaf (q_proj) but not on a partner the server stacks
  it with (v_proj), the partner gets an exact zero pair (delta 0) whose shape comes from the layer's
  other partners or the base model's config.json; refused, naming the layer, where neither tells it.
- `fixed_rank` / `uniform_expert_rank`: every LoRA pair of rank below the rank the target needs
  (adapter_config's r; the largest rank of the projection's experts in the layer) is padded
  exactly: lora_A with zero rows, lora_B with zero columns (B @ A unchanged; the scaling stays the
  module's, rescaled by adapter_target where the target computes another). A larger rank is refused.
"""

from __future__ import annotations

import re
from typing import Any

from convert.errors import ConversionError
from convert.formats.safetensors import DTYPE_SIZES, numel
from convert.plan.adapter_scaling import scale_for_rank
from convert.plan.adapter_transforms import PadRank, ZeroFill
from convert.plan.base import Piece, TargetTensor, Write
from convert.targets.rules import PARTNER_HEADS, TargetRules

_A, _B = ".lora_A.weight", ".lora_B.weight"
_EXPERT = re.compile(r"\.experts\.\d+\.")


def _pairs(b: Any) -> dict[str, tuple[TargetTensor, TargetTensor]]:
    """module -> (lora_A, lora_B) targets of the 2-D LoRA pairs of the plan."""
    targets = {t.name: t for t in b.targets}
    out = {}
    for t in b.targets:
        if t.name.endswith(_A) and len(t.shape) == 2:
            module = t.name[: -len(_A)]
            tb = targets.get(module + _B)
            if tb is not None and len(tb.shape) == 2 and tb.shape[1] == t.shape[0]:
                out[module] = (t, tb)
    return out


def apply_rules(b: Any, rules: TargetRules, config: dict[str, Any], base_config: dict[str, Any] | None,
                where: str) -> list[str]:
    """Apply `rules` to the plan of builder `b` (source adapter_config `config`, the base model's config.json
    `base_config`, `where` the source for messages); returns notes for the plan. Raises ConversionError."""
    for t in b.targets:
        if ".lora_" not in t.name:
            continue
        module = t.name[: t.name.index(".lora_")]
        for rx, why in rules.refuse_modules:
            if re.search(rx, module + "."):
                raise ConversionError(f"{where}: tensor {t.name!r}: --target {rules.target} cannot hold it: {why}")
    r = int(config.get("r", 8))
    notes = _add_partners(b, rules, config, base_config, r, where)
    notes += _pad_ranks(b, rules, r, where)
    return notes


def _heads_out(base_config: dict[str, Any] | None, leaf: str) -> int | None:
    cfg = base_config or {}
    if "num_attention_heads" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    key = PARTNER_HEADS.get(leaf)
    heads = cfg.get(key) if key else None
    if heads is None and key == "num_key_value_heads":
        heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim")
    if head_dim is None and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    return heads * head_dim


def _add_partners(b: Any, rules: TargetRules, config: dict[str, Any], base_config: dict[str, Any] | None, r: int,
                  where: str) -> list[str]:
    if not rules.needs_with:
        return []
    pairs = {m: p for m, p in _pairs(b).items() if not _EXPERT.search(m + ".")}
    by_parent: dict[str, dict[str, tuple[TargetTensor, TargetTensor]]] = {}
    for module, pair in pairs.items():
        parent, _, leaf = module.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = pair
    added = []
    for parent, leaves in sorted(by_parent.items()):
        for leaf, partners in rules.needs_with:
            if leaf not in leaves:
                continue
            for partner in partners:
                if partner in leaves:
                    continue
                ta, tb = leaves[leaf]
                same = [leaves[x][1].shape[0] for x in leaves
                        if x in PARTNER_HEADS and PARTNER_HEADS[x] == PARTNER_HEADS.get(partner)]
                out = same[0] if same else _heads_out(base_config, partner)
                if out is None:
                    raise ConversionError(
                        f"{where}: layer {parent}: --target {rules.target} needs LoRA on {partner} wherever there is "
                        f"LoRA on {leaf} (the server stacks them), and its shape is unknown: pass --base-config with the "
                        "base model's config.json (num_key_value_heads, head_dim)")
                r0 = r if rules.fixed_rank else (ta.shape[0] if rules.zero_rank == "layer" else int(rules.zero_rank))
                scale = scale_for_rank(config, (r, config.get("lora_alpha", 8)), r0)
                module = f"{parent}.{partner}"
                b.zero_pair(module, (r0, ta.shape[1]), (out, r0), ta.dtype, scale,
                            re.escape(".".join(module.split(".")[-2:])), None, expert_module=False)
                leaves[partner] = (TargetTensor(module + _A, ta.dtype, (r0, ta.shape[1])),
                                   TargetTensor(module + _B, tb.dtype, (out, r0)))
                added.append(module)
    if not added:
        return []
    return [f"--target {rules.target}: {len(added)} zero LoRA pair(s) (delta 0) added where the server needs a "
            f"partner module, e.g. {added[0]!r}"]


def _pad_ranks(b: Any, rules: TargetRules, r: int, where: str) -> list[str]:
    if not (rules.fixed_rank or rules.uniform_expert_rank):
        return []
    pairs = _pairs(b)
    rank = {m: ta.shape[0] for m, (ta, _) in pairs.items()}
    if rules.fixed_rank:
        want = {m: r for m in pairs}
    else:
        top: dict[str, int] = {}
        for m in pairs:
            key = _EXPERT.sub(".experts.*.", m)
            if key != m:
                top[key] = max(top.get(key, 0), rank[m])
        want = {m: top.get(_EXPERT.sub(".experts.*.", m), rank[m]) for m in pairs}
    over = sorted(m for m in pairs if rank[m] > want[m])
    if over:
        raise ConversionError(
            f"{where}: tensor {over[0] + _A!r} has LoRA rank {rank[over[0]]}, but --target {rules.target} needs every "
            f"LoRA pair to have rank r = {r} (the server cuts every LoRA tensor by r): a smaller rank is padded "
            "exactly with zeros, a larger one cannot be")
    pad = {m: want[m] for m in pairs if rank[m] < want[m]}
    if not pad:
        return []
    widths = {}  # lora_B name -> (rows, rank, to)
    for m, to in pad.items():
        ta, tb = pairs[m]
        widths[tb.name] = (tb.shape[0], ta.shape[0], to)
    _pad_a(b, {pairs[m][0].name: to for m, to in pad.items()})
    _pad_b(b, widths, where)
    return [f"--target {rules.target}: {len(pad)} LoRA pair(s) padded with zeros to the rank the server needs "
            f"(delta unchanged), e.g. {sorted(pad)[0]!r} from rank {rank[sorted(pad)[0]]} to {pad[sorted(pad)[0]]}"]


def _pad_a(b: Any, to: dict[str, int]) -> None:
    """lora_A [rank, in] -> [to, in]: the rows stay where they are, zero rows follow."""
    expert = {w.tensor: p.expert for p in b.pieces for w in p.writes if w.tensor in to}
    for i, t in enumerate(b.targets):
        if t.name not in to:
            continue
        item = DTYPE_SIZES[t.dtype]
        lo, hi = numel(t.shape) * item, to[t.name] * t.shape[1] * item
        b.targets[i] = TargetTensor(t.name, t.dtype, (to[t.name], t.shape[1]))
        step = max(item, b.chunk - b.chunk % item)
        for start in range(lo, hi, step):
            end = min(hi, start + step)
            b.pieces.append(Piece((), (Write(t.name, start, end, t.dtype),), ZeroFill((end - start,)), expert.get(t.name)))


def _pad_b(b: Any, widths: dict[str, tuple[int, int, int]], where: str) -> None:
    """lora_B [rows, rank] -> [rows, to] (zero columns): pieces writing a whole lora_B are wrapped in PadRank;
    the copy pieces of one lora_B are merged into one; zero fills are redone at the new size."""
    dtypes = {t.name: t.dtype for t in b.targets}
    copies: dict[str, list[Piece]] = {}
    zeros: dict[str, int | None] = {}
    kept: list[Piece] = []
    for p in b.pieces:
        hit = [w for w in p.writes if w.tensor in widths]
        if not hit:
            kept.append(p)
        elif isinstance(p.regroup, ZeroFill) and len(p.writes) == 1:
            zeros[hit[0].tensor] = p.expert
        elif p.regroup is None and len(p.writes) == 1:
            copies.setdefault(hit[0].tensor, []).append(p)
        else:
            full = all(w.start == 0 and w.end == numel(widths[w.tensor][:2]) * DTYPE_SIZES[w.dtype] for w in hit)
            if not full:
                raise ConversionError(f"{where}: tensor {hit[0].tensor!r} cannot be padded to the target's rank here")
            kept.append(_wrap(p, widths))
    for name, ps in copies.items():
        ps.sort(key=lambda p: p.writes[0].start)
        rows, rank, _ = widths[name]
        whole = Piece(tuple(rd for p in ps for rd in p.reads),
                      (Write(name, 0, rows * rank * DTYPE_SIZES[dtypes[name]], dtypes[name]),), None, ps[0].expert)
        kept.append(_wrap(whole, widths))
    for name, expert in zeros.items():
        rows, _, to = widths[name]
        n = rows * to * DTYPE_SIZES[dtypes[name]]
        kept.append(Piece((), (Write(name, 0, n, dtypes[name]),), ZeroFill((n,)), expert))
    b.pieces[:] = kept
    for i, t in enumerate(b.targets):
        if t.name in widths:
            b.targets[i] = TargetTensor(t.name, t.dtype, (t.shape[0], widths[t.name][2]))


def _wrap(p: Piece, widths: dict[str, tuple[int, int, int]]) -> Piece:
    pads = tuple(widths.get(w.tensor) for w in p.writes)
    sizes = tuple(w.end - w.start for w in p.writes)
    writes = tuple(Write(w.tensor, 0, pad[0] * pad[2] * DTYPE_SIZES[w.dtype], w.dtype) if pad else w
                   for w, pad in zip(p.writes, pads))
    compute = PadRank(p.regroup, tuple(r.dtype for r in p.reads), sizes, tuple(w.dtype for w in p.writes), pads)
    return Piece(p.reads, writes, compute, p.expert)
