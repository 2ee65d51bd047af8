"""Conversion plans for LoRA adapters: every output tensor and the pieces that produce it.

Same model as the base-weight planner (convert.plan.base): a piece reads byte ranges of the
source and writes byte ranges of output tensors, either as a byte copy/cast or through a
compute step. Expert pieces carry their expert, so EP rank k converts only the experts of its
slices. Output key names come from the family tables (configs/families/*.json).

Each expert-LoRA layout is a pair of modules: its detection (convert.formats.adapter_layouts.<layout>) and its
split / fuse planning and compute (convert.plan.adapter_<layout>, listed in convert.plan.adapter_layouts). This
module only orchestrates: detect, pick the family and the target's rules, dispatch every layer to its layout's
module, then the target's rules and adapter_config.json.

- split (any expert-LoRA layout -> what the target loads: per-expert, or the peft layout kept as is);
- fuse (per-expert -> peft / grouped / shared_w123), exact or refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from convert.errors import ConversionError
from convert.families import Family, load_families, representative, template_regex
from convert.formats.adapter_layouts import (
    ExpertLoraGroup,
    detect_expert_lora,
    family_by_name,
    guess_family,
    lora_roles,
    role_order,
)
from convert.formats.adapter_source import AdapterSource
from convert.formats.checkpoint import TensorRef
from convert.formats.safetensors import DTYPE_SIZES, TensorInfo, numel
from convert.plan.adapter_build import Builder, expert_leaf_renames, family_prefix, pairs_identical, proj_name
from convert.plan.adapter_layouts import FUSE, FUSED_LAYOUTS, PER_EXPERT, SERVED, SPLIT
from convert.plan.adapter_names import MODEL, KeyNames, source_naming
from convert.plan.adapter_rules import apply_rules
from convert.plan.adapter_scaling import rewrite_config
from convert.plan.adapter_target import apply_target, target_rules
from convert.plan.base import DEFAULT_CHUNK_BYTES, Piece, TargetTensor
from convert.targets.rules import TargetRules

__all__ = ["AdapterPlan", "FUSED_LAYOUTS", "NeedsPerExpertFirst", "plan_fix", "plan_fuse", "plan_split"]
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class NeedsPerExpertFirst(ConversionError):
    """plan_split's refusal where the target loads a fused layout (`layout`, fuse_adapter --layout) and a layer is in
    another layout or packing: split it to per-expert first, then fuse."""

    def __init__(self, layout: str, message: str) -> None:
        super().__init__(message)
        self.layout = layout


@dataclass
class AdapterPlan:
    """What an adapter conversion writes and how; identical on every rank."""

    description: str
    targets: list[TargetTensor]
    pieces: list[Piece]
    num_experts: int
    config: dict[str, Any]
    groups: list[ExpertLoraGroup]
    notes: list[str] = field(default_factory=list)
    target: str | None = None
    family: str | None = None


# ----------------------------------------------------------------------------- split


def plan_split(src: AdapterSource, dtype: str | None, ep: int, chunk: int = DEFAULT_CHUNK_BYTES,
               target: str = "per-expert", read: bool = True) -> AdapterPlan:
    """Plan converting `src` to what `target` (configs/targets/<target>.json) loads for the base model's family.

    A target whose expert layout for the family is per-expert gets every expert-LoRA layer as
    per-expert LoRA (`ep`: the number of expert slices; peft lora_B is gathered once per slice);
    one whose layout is peft's gets the target_parameters layout (plan_fuse for a per-expert source).
    Every key is named as the target names it, projections the target needs and the source lacks
    become zero pairs, and adapter_config.json is rewritten for the target (`read`: as plan_fuse's). Raises
    ConversionError when the input is inconsistent, the family is needed and unknown, or the target cannot hold it
    (NeedsPerExpertFirst where splitting to per-expert first, then fusing, would).
    """
    groups, passthrough = detect_expert_lora(src.infos, src.config, src.base_config, src.display(), packings=True)
    family = _split_family(groups, src)
    rules = target_rules(target, family.name if family else None, src.base_config)
    writer = SERVED[rules.expert_layout]  # the layout the target loads
    if writer.PATTERN != PER_EXPERT and groups:
        if all(g.pattern == PER_EXPERT for g in groups):
            return plan_fuse(src, writer.LAYOUT, dtype, chunk, target=target, read=read)
        other = [g for g in groups if SPLIT[g.pattern] is not writer]  # another layout, then another packing
        other += [g for g in groups if SPLIT[g.pattern] is writer and not writer.keeps(g)]
        if other:
            raise NeedsPerExpertFirst(writer.LAYOUT,
                f"{src.display()}: --target {target} loads {family.name if family else 'this'} adapters in the peft "
                f"target_parameters layout, and layer {other[0].prefix} is in the {SPLIT[other[0].pattern].words(other[0])} "
                f"layout: convert it with --target per-expert first, then with fuse_adapter --layout {writer.LAYOUT} "
                f"--target {target}"
            )
    _check_extra_experts(groups, family, rules, src.display())
    names = KeyNames(family, source_naming(family, groups, [*passthrough, *(f.name for g in groups for f in g.factors)]),
                     rules.naming, expert_leaf_renames(family, rules))
    b = Builder(src, dtype, chunk, names)
    b.passthrough(passthrough)
    convert = [g for g in groups if SPLIT[g.pattern].NEEDS_FAMILY]
    notes = list(src.notes)
    if convert and family is None:
        family = _family_of(convert, src, "the per-expert names and fused role order depend on it")
    for g in groups:
        SPLIT[g.pattern].split(b, g, family, ep, rules)
    notes += apply_rules(b, rules, src.config, src.base_config, src.display())
    b.check_unique()
    if family is not None:
        roles = sorted({r for g in groups for r in g.roles}, key=role_order(family).index)
        if rules.all_roles and groups:
            roles = list(lora_roles(family))
        config = rewrite_config(src.config, list(b.modules.values()), b.kept, src.display("adapter_config.json"),
                                **writer.split_config(src.config, family, roles, names))
    else:
        config = dict(src.config)
    if not groups:
        notes.append("no expert LoRA: every tensor passed through" + (" under the target's names" if family else ""))
    config, more = apply_target(b, rules, src.config, config, family, src.display("adapter_config.json"))
    notes += more
    patterns = sorted({g.pattern for g in groups}) or ["no expert LoRA"]
    desc = (f"split_adapter --target {target}: {'/'.join(patterns)} -> {writer.PATTERN}; {len(groups)} expert layers"
            + (f", E={max(g.num_experts for g in groups)}" if groups else "") + (f", family {family.name}" if family else "")
            + f", {rules.naming} names")
    return AdapterPlan(desc, b.targets, b.pieces, max((g.slots for g in groups), default=1), config, groups, notes,
                       target=target, family=family.name if family else None)


def _check_extra_experts(groups: list[ExpertLoraGroup], family: Family | None, rules: TargetRules, where: str,
                         layout: str | None = None) -> None:
    """Refuse layers with roles held by more experts than E (the family's `extra_experts`) where the output cannot
    hold them: a target whose loader takes experts e < E only (`rules.extra_experts` false), or `layout` (one E)."""
    for g in groups:
        more = [(r, g.experts_of(r)) for r in g.roles if g.experts_of(r) != g.num_experts]
        if more and (layout or not rules.extra_experts):
            key = family.extra_experts.get(more[0][0]) if family else None
            holder = layout or f"--target {rules.target} (its loader: docs/SERVERS.md)"
            raise ConversionError(
                f"{where}: layer {g.prefix}: its {more[0][0]} LoRA has {more[0][1]} experts (E = {g.num_experts}"
                + (f" + {key}" if key else "") + f"), and {holder} holds LoRA for the model's E experts only; "
                + ("use --layout peft" if layout else "convert it with --target per-expert or peft")
            )


def _split_family(groups: list[ExpertLoraGroup], src: AdapterSource) -> Family | None:
    """The base model's family when it can be told (configs, or per-expert key names), else None."""
    known = {g.family for g in groups if g.family}
    if len(known) == 1:
        return family_by_name(str(known.pop()))
    guess = guess_family(src.config, src.base_config, src.display())
    if guess.family is not None:
        return guess.family
    if groups and all(g.pattern == "per_expert" for g in groups):
        try:
            return _fuse_family(groups, src)
        except ConversionError:
            return None
    return None


def _family_of(groups: list[ExpertLoraGroup], src: AdapterSource, why: str) -> Family:
    names = {g.family for g in groups}
    if None in names or len(names) != 1:
        raise ConversionError(
            f"{src.display()}: cannot tell the base model's family from adapter_config.json, and {why}: "
            "pass --base-config with the base model's config.json"
        )
    return family_by_name(str(names.pop()))


# ----------------------------------------------------------------------------- fuse


def _fuse_family(groups: list[ExpertLoraGroup], src: AdapterSource) -> Family:
    """The family of a per-expert adapter: from the configs, else from key names only one family produces."""
    if all(g.family for g in groups) and len({g.family for g in groups}) == 1:
        return family_by_name(str(groups[0].family))
    matched = set()
    names = [f.name for g in groups for f in g.factors]
    for fam in load_families().values():
        rxs = [template_regex(t[: -len(".weight")] + ".lora_A.weight") for t in fam.per_expert.values()]
        if any(rx.match(n) for rx in rxs for n in names[:64]):
            matched.add(fam.name)
    rep = representative(matched)  # families that share these names and differ only in other tensors agree
    if rep is not None:
        return rep
    return _family_of([g for g in groups if g.family is None] or groups, src,
                      "the fused names and role order depend on it")


def plan_fuse(src: AdapterSource, layout: str, dtype: str | None, chunk: int = DEFAULT_CHUNK_BYTES,
              target: str = "peft", read: bool = True) -> AdapterPlan:
    """Plan converting a per-expert adapter to `layout` (peft, grouped or shared_w123); the rest passes through.

    `target` (configs/targets/<target>.json) names the keys and rewrites adapter_config.json; `layout`
    peft needs a target that loads the family's adapters in that layout, grouped and shared_w123
    (loaded by no server) the default target peft. Reads the lora_A tensors of roles fused into one factor (and, for shared_w123, the factors that must be shared) at
    plan time to decide what is exact (`read` False: reads nothing and takes such lora_A as equal, for a preview whose
    output shapes then assume one shared lora_A). Raises ConversionError for non-per-expert input and for
    conversions that would not be exact.
    """
    if layout not in FUSED_LAYOUTS:
        raise ConversionError(f"--layout {layout!r}: expected one of {list(FUSED_LAYOUTS)}")
    groups, passthrough = detect_expert_lora(src.infos, src.config, src.base_config, src.display())
    if not groups:
        raise ConversionError(f"{src.display()}: holds no expert LoRA; there is nothing to fuse")
    other = [g for g in groups if g.pattern != PER_EXPERT]
    if other:
        raise ConversionError(
            f"{src.display()}: layer {other[0].prefix} is already in the {other[0].pattern} layout; fuse_adapter "
            "takes per-expert adapters (run convert.split_adapter first)"
        )
    family = _fuse_family(groups, src)
    rules = target_rules(target, family.name, src.base_config)
    mod = FUSE[layout]
    if mod.SERVED_AS and rules.expert_layout != mod.SERVED_AS:
        raise ConversionError(
            f"fuse_adapter --target {target}: {target} loads {family.name} adapters per expert ({rules.source}), not in "
            f"the {layout} layout; use split_adapter --target {target} (or fuse_adapter --target peft for peft itself)"
        )
    if not mod.SERVED_AS and target != "peft":
        raise ConversionError(f"fuse_adapter --layout {layout}: no target loads this layout; leave --target at its "
                              "default (peft names and adapter_config.json)")
    _check_extra_experts(groups, family, rules, src.display(), None if mod.HOLDS_EXTRA_EXPERTS else f"the {layout} layout")
    names = KeyNames(family, source_naming(family, groups, [*passthrough, *(f.name for g in groups for f in g.factors)]),
                     rules.naming)
    b = Builder(src, dtype, chunk, names)
    b.passthrough(passthrough)
    notes = list(src.notes)
    shared_a = True
    stacks = mod.a_stacks(family)
    if stacks is not None and read:
        # roles fused into one tensor share one lora_A in the fused layout when their per-expert lora_A agree
        pairs = [
            (b.ref(g.factor((parts[0],), "A", e)), b.ref(g.factor((other,), "A", e)))
            for g in groups for parts in stacks if set(parts) <= set(g.roles)
            for other in parts[1:] for e in range(g.experts_of(parts[0]))
        ]
        shared_a = pairs_identical(src, pairs)
    params: set[str] = set()
    for g in groups:
        params |= mod.fuse(b, g, family, family_prefix(family, g.prefix, b.where, names), shared_a, rules)
    notes += apply_rules(b, rules, src.config, src.base_config, src.display())
    b.check_unique()
    roles = sorted({r for g in groups for r in g.roles}, key=role_order(family).index)
    kept_leaves = {k.rsplit(".", 1)[-1] for k in b.kept}
    leaves = {proj_name(family, r, n) for r in roles for n in (None, KeyNames(family, MODEL, MODEL))}
    drop = [leaf for leaf in sorted(leaves) if leaf not in kept_leaves]
    config = rewrite_config(src.config, list(b.modules.values()), b.kept, src.display("adapter_config.json"),
                            target_modules_drop=drop, **mod.fuse_config(family, roles, params))
    notes += mod.fuse_notes(family, shared_a, config, b.kept)
    config, stamped = mod.written_config(config)
    notes += stamped
    config, more = apply_target(b, rules, src.config, config, family, src.display("adapter_config.json"))
    notes += more
    desc = (f"fuse_adapter --target {target}: per_expert -> {layout}; {len(groups)} expert layers, "
            f"E={max(g.num_experts for g in groups)}, family {family.name}, {rules.naming} names")
    return AdapterPlan(desc, b.targets, b.pieces, max(g.slots for g in groups), config, groups, notes,
                       target=target, family=family.name)


# ----------------------------------------------------------------------------- preview


def plan_fix(src: AdapterSource, target: str) -> tuple[list[tuple[str, tuple[str, ...]]], AdapterPlan]:
    """The conversion steps that turn `src` into what `target` loads, and the plan of the last step's output, planned
    from metadata only (for convert.inspect, which checks that output against the target's rules).

    Steps are (tool, flags): `split_adapter --target T`, or, where T loads a fused layout and a layer is in another
    layout or packing, `split_adapter --target per-expert` then `fuse_adapter --layout L --target T` (the second
    planned on the first's output as it would be written). Raises ConversionError where a step refuses.
    """
    try:
        return [("split_adapter", ("--target", target))], plan_split(src, None, 1, target=target, read=False)
    except NeedsPerExpertFirst as exc:
        first = plan_split(src, None, 1, target="per-expert", read=False)
        written = _as_written(src, first)
        steps = [("split_adapter", ("--target", "per-expert")), ("fuse_adapter", ("--layout", exc.layout, "--target", target))]
        return steps, plan_fuse(written, exc.layout, None, target=target, read=False)


def _as_written(src: AdapterSource, plan: AdapterPlan) -> AdapterSource:
    """The source `plan`'s output would be (one adapter_model.safetensors, its tensors back to back): metadata only."""
    tensors, at = {}, 0
    for t in plan.targets:
        end = at + numel(t.shape) * DTYPE_SIZES[t.dtype]
        tensors[t.name] = TensorRef(ADAPTER_WEIGHTS, TensorInfo(t.name, t.dtype, tuple(t.shape), at, end))
        at = end
    return AdapterSource(src.storage, plan.config, tensors, src.base_config, src.base_config_source, [], [],
                         {ADAPTER_WEIGHTS: at})
