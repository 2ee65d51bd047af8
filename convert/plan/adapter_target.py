"""What an adapter conversion does for its target (configs/targets/*.json) beyond the layout and names.

- adapter_config.json `target_modules`: what the target needs for the experts (the MoE module
  `experts`, or each per-expert projection leaf), next to the other modules.
- rank_pattern / alpha_pattern are kept only where the target honours them. Every module must
  keep its delta: where the scaling the target applies (its own view of r, lora_alpha and
  use_rslora) differs from the module's scaling in the source, the module's lora_B is multiplied
  by s / s' (s: the source's scaling, s': the target's): B * s / s' @ A * s' = B @ A * s. The
  product is computed in float32 and rounded once to B's dtype (exact where s / s' is a power of
  two; otherwise within half an ulp of B's dtype per element: 2^-9 relative for bf16, 2^-12 for
  fp16, 2^-25 for fp32).
- Notes for what the target's loader refuses and the conversion cannot change (bias, DoRA,
  modules_to_save, ranks above the loader's default limit).
"""

from __future__ import annotations

import math
import re
from typing import Any

from convert.errors import ConversionError
from convert.families import Family
from convert.formats.adapter_layouts import lora_roles
from convert.formats.safetensors import FLOAT_DTYPES
from convert.plan.adapter_scaling import Scale, source_scale
from convert.plan.adapter_transforms import ScaledWrites
from convert.plan.base import Piece
from convert.targets import rules as target_files
from convert.targets.rules import EXPERT_LEAVES, TargetRules

_PER_EXPERT_MODULE = re.compile(r"\.experts\.\d+\.([^.]+)$")


def target_rules(target: str, family: str | None, base_config: dict[str, Any] | None = None) -> TargetRules:
    """The rules of `target` (vllm, sglang, peft, per-expert) for adapters of a `family` base model whose
    config.json (when given) names its `model_type`."""
    model_type = base_config.get("model_type") if isinstance(base_config, dict) else None
    return target_files.load_target(target).for_family(family, model_type if isinstance(model_type, str) else None)


def _factor(config: dict[str, Any], want: Scale, server: Scale, rslora: bool) -> float | None:
    """s / s' for a module whose wanted (r, alpha) is `want` under `config`, applied by the target as `server`."""
    r, alpha = want
    s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    rs, alphas = server
    s_target = alphas / math.sqrt(rs) if rslora else alphas / rs
    if s == s_target:
        return None
    if s_target == 0:
        return math.nan
    return s / s_target


def apply_target(
    b: Any, rules: TargetRules, src_config: dict[str, Any], config: dict[str, Any], family: Family | None, where: str
) -> tuple[dict[str, Any], list[str]]:
    """The output adapter_config.json for `rules` (from the rewritten `config`), and notes for the plan.

    `b`: the plan's builder (convert.plan.adapter._Builder: targets, pieces, modules, kept, b_tensors,
    expert_modules, renamed).

    Wraps the pieces of every lora_B that must be rescaled (see the module docstring) in
    ScaledWrites, in place in `b.pieces`. Raises ConversionError where a scaling cannot be kept.
    """
    notes: list[str] = []
    out = dict(config)
    dropped = [k for k, keep in (("rank_pattern", rules.rank_pattern), ("alpha_pattern", rules.alpha_pattern)) if not keep]
    for k in dropped:
        if out.get(k):
            out[k] = {}
    want: dict[str, Scale] = {m: source_scale(src_config, m) for m in b.kept}
    want.update({m: o.scale for m, o in b.modules.items()})
    factors: dict[str, float] = {}
    if src_config.get("use_rslora") and not rules.rslora:
        out["use_rslora"] = False  # the server scales by lora_alpha / r: every lora_B below carries the difference
    for module, scale in want.items():
        rslora = (bool(src_config.get("use_rslora")) and rules.rslora
                  and (module not in b.expert_modules or rules.rslora_experts))
        f = _factor(src_config, scale, source_scale(out, module), rslora)
        if f is None:
            continue
        if math.isnan(f) or math.isinf(f):
            raise ConversionError(f"{where}: module {module!r}: --target {rules.target} applies scaling 0 where the "
                                  f"adapter has {scale}; the delta cannot be kept")
        for name in b.b_tensors.get(module, []):
            factors[name] = f
    dtypes = {t.name: t.dtype for t in b.targets}
    factors = {n: f for n, f in factors.items() if n in dtypes}
    bad = [n for n in factors if dtypes[n] not in FLOAT_DTYPES]
    if bad:
        raise ConversionError(f"{where}: tensor {bad[0]!r} ({dtypes[bad[0]]}) would need rescaling for --target "
                              f"{rules.target}, which only a floating dtype allows")
    if factors:
        b.pieces[:] = [_scaled(p, factors) for p in b.pieces]
        why = []
        if dropped:
            why.append(f"it ignores {'/'.join(dropped)}")
        if src_config.get("use_rslora") and not rules.rslora:
            why.append("it applies no rsLoRA")
        elif src_config.get("use_rslora") and not rules.rslora_experts:
            why.append("it applies no rsLoRA to expert LoRA")
        modules = sorted({m for m in want if any(n in factors for n in b.b_tensors.get(m, []))})
        notes.append(f"--target {rules.target}: {' and '.join(why) or 'its scaling differs'}: lora_B of {len(modules)} "
                     f"module(s) (e.g. {modules[0]!r}) multiplied by s/s' to keep every delta (float32, rounded once to "
                     "the tensor's dtype)")
    out["target_modules"] = _target_modules(b, rules, out.get("target_modules"), family)
    notes += _loader_notes(rules, out, want)
    return out, notes


def _scaled(piece: Piece, factors: dict[str, float]) -> Piece:
    fs = tuple(factors.get(w.tensor) for w in piece.writes)
    if all(f is None for f in fs):
        return piece
    compute = ScaledWrites(piece.regroup, tuple(r.dtype for r in piece.reads), tuple(w.end - w.start for w in piece.writes),
                           tuple(w.dtype for w in piece.writes), fs)
    return Piece(piece.reads, piece.writes, compute, piece.expert)


def _target_modules(b: Any, rules: TargetRules, tm: Any, family: Family | None) -> Any:
    """target_modules for the output: renamed modules under their new leaf names, the experts' entries
    replaced by what `rules` needs (the MoE module `experts`; the canonical leaves gate_proj/up_proj/down_proj
    for "projections"; by default the per-expert leaves where the output is per-expert, nothing where it is
    peft's target_parameters layout). A regex string stays, unless the target needs a list
    (target_modules_list): then the output's module leaves. With target_modules_cover (or a per-expert
    output) every non-expert LoRA module's leaf is named."""
    if isinstance(tm, str) and rules.target_modules_list and tm not in ("all", "all-linear"):
        tm = []
    if not (isinstance(tm, list) or tm is None):
        return tm
    names = list(tm or [])
    for src, dst in b.renamed.items():
        old, new = src.rsplit(".", 1)[-1], dst.rsplit(".", 1)[-1]
        if old != new and old in names:
            names = [new if t == old else t for t in names]
    projections = sorted({m[1] for key in b.expert_modules if (m := _PER_EXPERT_MODULE.search(key))})
    role_of = {leaf: role for names_ in EXPERT_LEAVES.values() for role, leaf in names_.items()}
    if family is not None:
        for role in lora_roles(family):
            for template in (family.per_expert[role], family.expert_templates[role]):
                role_of[template.rsplit(".", 2)[-2]] = role
    family_leaves = set(projections) | set(role_of)
    other_leaves = {k.rsplit(".", 1)[-1] for k in [*b.kept, *b.modules] if k not in b.expert_modules}
    names = [t for t in names if t not in family_leaves | {"experts"} or t in other_leaves]
    if rules.target_modules_experts == "experts":
        names.append("experts")
    elif rules.target_modules_experts == "projections":
        names += [EXPERT_LEAVES["canonical"].get(role_of.get(p, ""), p) for p in projections]
    else:
        names += projections
    if rules.expert_layout != "peft" or rules.target_modules_cover:  # e.g. a router LoRA peft held through
        others = sorted(k for k in [*b.kept, *b.modules] if k not in b.expert_modules)  # target_parameters: now a module
        names += [k.rsplit(".", 1)[-1] for k in others if not any(k == t or k.endswith("." + t) for t in names)]
    names = list(dict.fromkeys(names))
    return sorted(names) if names else None


def _loader_notes(rules: TargetRules, config: dict[str, Any], want: dict[str, Scale]) -> list[str]:
    """What the target's loader refuses in this adapter (the conversion keeps these as they are)."""
    notes = []
    t = rules.target
    bias = config.get("bias", "none")
    if bias not in rules.bias:
        notes.append(f"warning: --target {t} accepts bias {list(rules.bias)}; this adapter has bias={bias!r}")
    if config.get("use_dora") and not rules.dora:
        notes.append(f"warning: --target {t} does not load DoRA (use_dora) adapters")
    mts = config.get("modules_to_save") or []
    if rules.modules_to_save is not None and any(m not in rules.modules_to_save for m in mts):
        notes.append(f"warning: --target {t} accepts modules_to_save only {list(rules.modules_to_save)}; this adapter "
                     f"has {mts}")
    top = max((r for r, _ in want.values()), default=0)
    if rules.max_rank is not None and top > rules.max_rank:
        notes.append(f"note: the largest rank is {top}, above {t}'s default limit {rules.max_rank} (raise the "
                     "server's maximum LoRA rank to load it)")
    return notes
