"""Conversion plans for LoRA adapters: every output tensor and the pieces that produce it.

Same model as the base-weight planner (convert.plan.base): a piece reads byte ranges of the
source and writes byte ranges of output tensors, either as a byte copy/cast or through a
compute step (convert.plan.adapter_transforms). Expert pieces carry their expert, so EP rank k
converts only the experts of its slices. Output key names come from the family tables
(configs/families/*.json); the adapter layouts from convert.formats.adapter_layouts.

- split (any expert-LoRA layout -> per-expert): one piece per EP slice of a peft layer: the
  slice's lora_A rows are one byte range, and lora_B is expert-minor, so the piece gathers its
  experts' columns from the whole B in one strided copy; shared_w123 factors are byte copies (a shared
  factor is copied to every expert); grouped factors are transposed per expert.
- fuse (per-expert -> peft / grouped / shared_w123): peft lora_A rows of one expert are a
  byte range (copies); peft lora_B is built in row chunks from every expert; grouped slices
  are transposed per expert; shared_w123 is written only where the shared factor is
  identical across experts.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from convert.formats.adapter_dir import is_lora, lora_module
from convert.formats.adapter_layouts import (
    GROUPED_INPUTS, GROUPED_OUTPUT, ExpertLoraGroup, LoraFactor, detect_expert_lora, family_by_name, fused_order,
    guess_family,
    lora_roles, lora_tensors, module_key, output_role, role_order,
)
from convert.formats.lora_producers import IN_OUT, RANK_MAJOR, describe
from convert.plan.adapter_scaling import (
    OutputModule, Scale, keys_matching_no_module, rewrite_config, scale_for_rank, source_scale,
)
from convert.formats.adapter_source import AdapterSource
from convert.plan.adapter_names import MODEL, KeyNames, expert_prefix, source_naming
from convert.plan.adapter_rules import apply_rules
from convert.plan.adapter_target import apply_target, target_rules
from convert.plan.adapter_transforms import (
    FoldedBBuild, FoldedFactors, FoldedSplit, GroupedBuild, GroupedSlice, ZeroFill,
)
from convert.formats.checkpoint import TensorRef
from convert.errors import ConversionError
from convert.families import Family, load_families, representative, template_regex
from convert.targets.rules import TargetRules
from convert.plan.base import DEFAULT_CHUNK_BYTES, Piece, Read, TargetTensor, Write, copy_pieces, target_dtype
from convert.formats.safetensors import DTYPE_SIZES, numel
from sharding.ep import expert_slices

FUSED_LAYOUTS = ("peft", "grouped", "shared_w123")


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


# ----------------------------------------------------------------------------- names


def family_prefix(family: Family, group_prefix: str, where: str, names: KeyNames | None = None) -> str:
    """The family template `{prefix}` (model naming) of an expert-LoRA group whose module path before `.experts`
    is `group_prefix` (in the source's naming, `names.source`; model naming when `names` is None)."""
    prefix = expert_prefix(family, names or KeyNames(family, MODEL, MODEL), group_prefix)
    if prefix is not None:
        return prefix
    containers = {t[: t.index(".experts")] for t in family.per_expert.values()}
    containers |= {t.template[: t.template.index(".experts")] for ts in family.fused.values() for t in ts}
    raise ConversionError(
        f"{where}: expert LoRA module {group_prefix}.experts does not fit the {family.name} family's names "
        f"(expected one of {sorted(c.replace('{prefix}', '<layer>') + '.experts' for c in containers)})"
    )


def per_expert_module(family: Family, prefix: str, role: str, e: int) -> str:
    """The per-expert module name of `role` of expert `e` in model naming (e.g. `...experts.3.gate_proj`)."""
    template = family.expert_templates[role]
    return template[: -len(".weight")].format(prefix=prefix, e=e)


def proj_name(family: Family, role: str, names: KeyNames | None = None) -> str:
    """The per-expert projection leaf name of `role` (gate_proj, w1, ...) under `names`' target naming
    (checkpoint naming when None)."""
    if names is None:
        return family.per_expert[role].rsplit(".", 2)[-2]
    return names.out_module(per_expert_module(family, "P", role, 0)).rsplit(".", 1)[-1]


def expert_leaf_renames(family: Family | None, rules: TargetRules) -> tuple[tuple[str, str], ...]:
    """(family leaf, target leaf) of the per-expert projections `rules` names otherwise than the family
    (rules.expert_names[0] "canonical" or "w123"); empty for "checkpoint" or an unknown family."""
    if family is None:
        return ()
    out: dict[str, str] = {}
    for role in lora_roles(family):
        new = rules.expert_leaf(role)
        if new is None:
            continue
        for template in (family.per_expert[role], family.expert_templates[role]):
            old = template.rsplit(".", 2)[-2]
            if old != new:
                out[old] = new
    return tuple(out.items())


def fused_wrappers(family: Family, roles: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    """(roles, `P.experts.<param>` template) of the family's fused parameters that hold `roles`, in declaration order."""
    return [(parts, f"{family.experts_path}.{leaf}") for parts, leaf, _ in lora_tensors(family) if set(parts) & set(roles)]


def shared_w123_proj(family: Family, role: str) -> str:
    """The 3-D partially shared layout's own name of `role`: w1/w3 for the input projections, w2 for the output.

    The layout numbers the projections as the original Mixtral experts did (w1 the first input
    projection, w3 the second, w2 the output), whatever the family calls them.
    """
    names = {**dict(zip(input_roles(family), ("w1", "w3"))), output_role(family): "w2"}
    if role not in names:
        raise ConversionError(f"the shared 3-D layout names two input projections and one output; the "
                              f"{family.name} family's role {role!r} has no name there")
    return names[role]


def input_roles(family: Family) -> tuple[str, ...]:
    """The family's roles that map hidden -> intermediate (every role but the output one), in order."""
    return tuple(r for r in lora_roles(family) if r != output_role(family))


def _general_keys(name: str, tail: str) -> tuple[str, ...]:
    """Pattern keys naming module `name` (without base_model.model.): every layer's `tail`, then exactly it."""
    return (tail, re.escape(name))


def _tail(module: str) -> str:
    """A pattern key naming every layer's (and expert's) module of the same kind as `module`."""
    m = re.search(r"\.experts\.\d+\.([^.]+)$", module)
    if m:
        return r"experts\.\d+\." + re.escape(m[1])
    return re.escape(".".join(module.split(".")[-2:]))


def missing_roles(family: Family, g: ExpertLoraGroup) -> list[tuple[str, tuple[int, int]]]:
    """(role, (out, in)) of the family's LoRA roles that layer `g` has no LoRA for, with their shapes.

    An input projection has the shape of the layer's other input projections, or the transpose of
    its output projection; the output projection the transpose of an input one (as detection checked).
    """
    out = []
    for role in lora_roles(family):
        if role in g.roles:
            continue
        if role == output_role(family):
            dims = tuple(reversed(g.dims_of(next(r for r in g.roles if r != role))))
        else:
            same = [r for r in g.roles if r != output_role(family)]
            dims = g.dims_of(same[0]) if same else tuple(reversed(g.dims_of(output_role(family))))
        out.append((role, (int(dims[0]), int(dims[1]))))
    return out


# ----------------------------------------------------------------------------- pieces


def _block_read(ref: TensorRef, index: int, block_elems: int) -> Read:
    """Block `index` of `block_elems` elements of a tensor (its dim-0 slice when blocks are slices)."""
    item = ref.info.itemsize
    start = ref.info.start + index * block_elems * item
    return Read(ref.file, start, start + block_elems * item, ref.info.dtype)


class _Builder:
    """Collects targets, pieces and the output modules' scales of one plan.

    `names` renames source keys to the target's naming; `b_tensors` lists each output module's
    lora_B tensors (what a rescale multiplies), `expert_modules` the modules of expert LoRA.
    """

    def __init__(self, src: AdapterSource, dtype: str | None, chunk: int, names: KeyNames | None = None) -> None:
        self.src, self.dtype, self.chunk = src, dtype, chunk
        self.names = names or KeyNames(None, MODEL, MODEL)
        self.where = src.display()
        self.targets: list[TargetTensor] = []
        self.pieces: list[Piece] = []
        self.modules: dict[str, OutputModule] = {}
        self.kept: set[str] = set()
        self.b_tensors: dict[str, list[str]] = {}
        self.expert_modules: set[str] = set()
        self.renamed: dict[str, str] = {}  # source module -> output module, of modules copied under a new name

    def ref(self, f: LoraFactor) -> TensorRef:
        return self.src.tensors[f.name]

    def out_dtype(self, f: LoraFactor) -> str:
        return target_dtype(f.dtype, self.dtype)

    def target(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.targets.append(TargetTensor(name, dtype, tuple(shape)))

    def module(self, name: str, scale: Scale, tail: str, b_names: tuple[str, ...] = (), expert: bool = True) -> None:
        key = module_key(name)
        old = self.modules.get(key)
        if old is not None and old.scale != scale:
            raise ConversionError(f"{self.where}: output module {key!r} would need two scalings {old.scale} and {scale}")
        self.modules[key] = OutputModule(key, scale, _general_keys(key, tail))
        self.b_tensors.setdefault(key, []).extend(b_names)
        if expert:
            self.expert_modules.add(key)

    def passthrough(self, names: list[str], expert_of: dict[str, int] | None = None) -> None:
        """Copy (or cast) tensors `names` whole under the target's names; `expert_of` marks expert tensors."""
        for name in names:
            out = self.names.key(name)
            t, p = copy_pieces(self.src.tensors[name], out, self.dtype, self.chunk, (expert_of or {}).get(name))
            self.targets.append(t)
            self.pieces += p
            if not is_lora(name):
                continue
            src_mod, out_mod = module_key(lora_module(name)), module_key(lora_module(out))
            is_b = ".lora_B" in out[len(lora_module(out)):] or ".lora_embedding_B" in out[len(lora_module(out)):]
            if out_mod == src_mod:
                self.kept.add(out_mod)
                self.b_tensors.setdefault(out_mod, [])
            else:
                self.renamed[src_mod] = out_mod
                scale = source_scale(self.src.config, src_mod)
                self.module(out_mod, scale, _tail(out_mod), expert=expert_of is not None and name in expert_of)
            if is_b:
                self.b_tensors[out_mod].append(out)
            if expert_of is not None and name in expert_of:
                self.expert_modules.add(out_mod)

    def zero_pair(self, module: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...], dtype: str, scale: Scale,
                  tail: str, expert: int | None, expert_module: bool = True) -> None:
        """A LoRA pair of zeros (delta exactly 0) for output module `module`, written without reading the source
        (`expert_module`: a module of expert LoRA)."""
        for which, shape in (("A", shape_a), ("B", shape_b)):
            name = f"{module}.lora_{which}.weight"
            self.target(name, dtype, shape)
            self.zeros(name, numel(shape) * DTYPE_SIZES[dtype], dtype, expert)
        self.module(module, scale, tail, (f"{module}.lora_B.weight",), expert=expert_module)

    def zeros(self, name: str, nbytes: int, dtype: str, expert: int | None) -> None:
        """Pieces writing `nbytes` zero bytes of tensor `name`, at most one chunk each."""
        step = max(DTYPE_SIZES[dtype], self.chunk - self.chunk % DTYPE_SIZES[dtype])
        for lo in range(0, max(nbytes, 1), step):
            hi = min(nbytes, lo + step)
            self.pieces.append(Piece((), (Write(name, lo, hi, dtype),), ZeroFill((hi - lo,)), expert))

    def check_unique(self) -> None:
        seen: set[str] = set()
        for t in self.targets:
            if t.name in seen:
                raise ConversionError(f"{self.where}: output tensor {t.name!r} would be written twice")
            seen.add(t.name)


def _family_of(groups: list[ExpertLoraGroup], src: AdapterSource, why: str) -> Family:
    names = {g.family for g in groups}
    if None in names or len(names) != 1:
        raise ConversionError(
            f"{src.display()}: cannot tell the base model's family from adapter_config.json, and {why}: "
            "pass --base-config with the base model's config.json"
        )
    return family_by_name(str(names.pop()))


def _zero_scale(config: dict[str, Any], r0: int) -> Scale:
    """The (r, alpha) of a zero pair of rank r0: the global scaling at that rank (no pattern key when r0 == r)."""
    return scale_for_rank(config, (int(config.get("r", 8)), config.get("lora_alpha", 8)), r0)


def _zero_rank(rules: TargetRules, g: ExpertLoraGroup, config: dict[str, Any]) -> int:
    """The rank of a zero pair in layer `g`: adapter_config's r where the target needs every pair at r (fixed_rank),
    else rules.zero_rank ("layer": the layer's rank)."""
    if rules.fixed_rank:
        return int(config.get("r", 8))
    return g.rank if rules.zero_rank == "layer" else int(rules.zero_rank)


# ----------------------------------------------------------------------------- split


def plan_split(src: AdapterSource, dtype: str | None, ep: int, chunk: int = DEFAULT_CHUNK_BYTES,
               target: str = "per-expert") -> AdapterPlan:
    """Plan converting `src` to what `target` (configs/targets/<target>.json) loads for the base model's family.

    A target whose expert layout for the family is per-expert gets every expert-LoRA layer as
    per-expert LoRA (`ep`: the number of expert slices; peft lora_B is gathered once per slice);
    one whose layout is peft's gets the target_parameters layout (plan_fuse for a per-expert source).
    Every key is named as the target names it, projections the target needs and the source lacks
    become zero pairs, and adapter_config.json is rewritten for the target. Raises ConversionError
    when the input is inconsistent, the family is needed and unknown, or the target cannot hold it.
    """
    groups, passthrough = detect_expert_lora(src.infos, src.config, src.base_config, src.display(), packings=True)
    family = _split_family(groups, src)
    rules = target_rules(target, family.name if family else None, src.base_config)
    if rules.expert_layout == "peft" and groups:
        if all(g.pattern == "per_expert" for g in groups):
            return plan_fuse(src, "peft", dtype, chunk, target=target)
        other = [g for g in groups if g.pattern not in ("peft_target_parameters",)]
        other += [g for g in groups if g.pattern == "peft_target_parameters" and (g.orientation, g.b_order) != (IN_OUT, RANK_MAJOR)]
        if other:
            raise ConversionError(
                f"{src.display()}: --target {target} loads {family.name if family else 'this'} adapters in the peft "
                f"target_parameters layout, and layer {other[0].prefix} is in the {_layout_words(other[0])} layout: convert it "
                f"with --target per-expert first, then with fuse_adapter --layout peft --target {target}"
            )
    _check_extra_experts(groups, family, rules, src.display())
    names = KeyNames(family, source_naming(family, groups, [*passthrough, *(f.name for g in groups for f in g.factors)]),
                     rules.naming, expert_leaf_renames(family, rules))
    b = _Builder(src, dtype, chunk, names)
    b.passthrough(passthrough)
    convert = [g for g in groups if g.pattern != "per_expert"]
    notes = list(src.notes)
    if convert and family is None:
        family = _family_of(convert, src, "the per-expert names and fused role order depend on it")
    for g in groups:
        if g.pattern == "per_expert":
            b.passthrough(sorted(f.name for f in g.factors), {f.name: int(f.expert) for f in g.factors})  # type: ignore[arg-type]
            if family is not None and rules.all_roles:
                _zero_per_expert(b, g, family, family_prefix(family, g.prefix, b.where, names), rules)
            continue
        assert family is not None
        prefix = family_prefix(family, g.prefix, b.where, names)
        if g.pattern == "peft_target_parameters":
            if rules.expert_layout == "peft":
                _keep_peft(b, g, family, prefix, rules)
                continue
            _split_peft(b, g, family, prefix, ep)
        elif g.pattern == "shared_w123":
            _split_shared(b, g, family, prefix)
        else:
            _split_grouped(b, g, family, prefix)
        if rules.all_roles:
            _zero_per_expert(b, g, family, prefix, rules)
    notes += apply_rules(b, rules, src.config, src.base_config, src.display())
    b.check_unique()
    if family is not None:
        roles = sorted({r for g in groups for r in g.roles}, key=role_order(family).index)
        if rules.all_roles and groups:
            roles = list(lora_roles(family))
        peft_out = rules.expert_layout == "peft"
        config = rewrite_config(
            src.config, list(b.modules.values()), b.kept, src.display("adapter_config.json"),
            target_modules_add=[] if peft_out else [proj_name(family, r, names) for r in roles],
            target_parameters=_peft_parameters(src.config, family, roles) if peft_out else None,
        )
    else:
        config = dict(src.config)
    if not groups:
        notes.append("no expert LoRA: every tensor passed through" + (" under the target's names" if family else ""))
    config, more = apply_target(b, rules, src.config, config, family, src.display("adapter_config.json"))
    notes += more
    patterns = sorted({g.pattern for g in groups}) or ["no expert LoRA"]
    out_layout = "peft_target_parameters" if rules.expert_layout == "peft" else "per_expert"
    desc = (f"split_adapter --target {target}: {'/'.join(patterns)} -> {out_layout}; {len(groups)} expert layers"
            + (f", E={max(g.num_experts for g in groups)}" if groups else "") + (f", family {family.name}" if family else "")
            + f", {rules.naming} names")
    return AdapterPlan(desc, b.targets, b.pieces, max((g.slots for g in groups), default=1), config, groups, notes,
                       target=target, family=family.name if family else None)


def _layout_words(g: ExpertLoraGroup) -> str:
    """A group's layout in words: its pattern, with the packing of a peft layer that is not peft 0.21's."""
    if g.pattern == "peft_target_parameters" and (g.orientation, g.b_order) != (IN_OUT, RANK_MAJOR):
        return f"{g.pattern} ({describe(g.orientation, g.b_order)})"
    return g.pattern


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


def _peft_parameters(config: dict[str, Any], family: Family, roles: list[str]) -> list[str]:
    """target_parameters of a peft-layout output: the family's fused expert parameters of `roles`, and the source's
    entries for other parameters (e.g. a router's weight)."""
    fused = {t.replace("{prefix}.", "") for _, t in fused_wrappers(family, tuple(roles))}
    leaves = {t.rsplit(".", 1)[-1] for t in fused}
    other = [t for t in config.get("target_parameters") or [] if ".experts." not in f".{t}" or
             t.rsplit(".", 1)[-1] not in leaves]
    return sorted(fused | set(other))


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


def _zero_per_expert(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str, rules: TargetRules) -> None:
    """Zero pairs for every expert of the roles layer `g` lacks (rules.all_roles)."""
    r0 = _zero_rank(rules, g, b.src.config)
    dt = b.out_dtype(g.factors[0])
    for role, (out, inn) in missing_roles(family, g):
        for e in range(g.experts_of(role)):
            module = b.names.out_module(per_expert_module(family, prefix, role, e))
            tail = r"experts\.\d+\." + re.escape(module.rsplit(".", 1)[-1])
            b.zero_pair(module, (r0, inn), (out, r0), dt, _zero_scale(b.src.config, r0), tail, e)


def _split_scale(b: _Builder, g: ExpertLoraGroup, src_key: str, role: str) -> Scale:
    return scale_for_rank(b.src.config, source_scale(b.src.config, src_key), g.rank_of(role))


def _expert_outputs(
    b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str, role: str, e: int, src_key: str, dtypes: tuple[str, str]
) -> tuple[str, str]:
    """Register expert e's `role` lora_A and lora_B targets; returns their names."""
    module = b.names.out_module(per_expert_module(family, prefix, role, e))
    out, inn = g.dims_of(role)
    r = g.rank_of(role)
    b.target(module + ".lora_A.weight", dtypes[0], (r, inn))
    b.target(module + ".lora_B.weight", dtypes[1], (out, r))
    tail = r"experts\.\d+\." + re.escape(module.rsplit(".", 1)[-1])
    b.module(module, _split_scale(b, g, src_key, role), tail, (module + ".lora_B.weight",))
    return module + ".lora_A.weight", module + ".lora_B.weight"


def _keep_peft(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str, rules: TargetRules) -> None:
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
    r0 = _zero_rank(rules, g, b.src.config)
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
        b.module(key, _zero_scale(b.src.config, r0), re.escape(f"experts.{leaf}"), (name_b,))


def _split_peft(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str, ep: int) -> None:
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
            (role, e): _expert_outputs(b, g, family, prefix, role, e, src_key, (da, db)) for e in range(E) for role in roles
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
                _split_peft_piece(b, experts, wrappers, reads_of, names_of)


def _split_peft_piece(b: _Builder, experts: range, wrappers: list[FoldedFactors],
                      reads_of: list[tuple[TensorRef, TensorRef]], names_of: list[Any]) -> None:
    """The piece splitting `experts` (held by the same wrappers) out of every wrapper that holds them."""
    held = [i for i, f in enumerate(wrappers) if experts.stop <= f.experts]
    reads: list[Read] = []
    writes: list[Write] = []
    for i in held:
        f, (ra, rb), (roles, names, a_bytes, b_bytes, da, db) = wrappers[i], reads_of[i], names_of[i]
        first = _block_read(ra, experts.start, f.rank * f.a_cols)
        reads += [Read(ra.file, first.start, first.start + len(experts) * (first.end - first.start), ra.info.dtype),
                  Read(rb.file, rb.info.start, rb.info.end, rb.info.dtype)]
        for e in experts:
            for role in roles:
                writes += [Write(names[(role, e)][0], 0, a_bytes, da), Write(names[(role, e)][1], 0, b_bytes, db)]
    split = FoldedSplit(tuple(wrappers[i] for i in held), experts.start, experts.stop)
    b.pieces.append(Piece(tuple(reads), tuple(writes), split, experts.start))  # type: ignore[arg-type]


def _split_shared(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str) -> None:
    for role in g.roles:
        fa, fb = g.factor((role,), "A"), g.factor((role,), "B")
        proj = fa.name.split(".")[-3]
        src_key = module_key(g.prefix, "experts", proj)
        da, db = b.out_dtype(fa), b.out_dtype(fb)
        out, inn = g.dims_of(role)
        r = g.rank_of(role)
        for e in range(g.num_experts):
            name_a, name_b = _expert_outputs(b, g, family, prefix, role, e, src_key, (da, db))
            for f, name, block, dt in ((fa, name_a, r * inn, da), (fb, name_b, out * r, db)):
                read = _block_read(b.ref(f), 0 if f.shared else e, block)
                b.pieces.append(Piece((read,), (Write(name, 0, block * DTYPE_SIZES[dt], dt),), None, e))


def _split_grouped(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str) -> None:
    src_key = module_key(g.prefix, "experts")
    for roles in (input_roles(family), (output_role(family),)):
        if roles[0] not in g.roles:
            continue
        fa, fb = g.factor(roles, "A"), g.factor(roles, "B")
        da, db = b.out_dtype(fa), b.out_dtype(fb)
        out, inn = g.dims_of(roles[0])
        r = g.rank_of(roles[0])
        order = g.fused_order if len(roles) > 1 else None
        for e in range(g.num_experts):
            names = [_expert_outputs(b, g, family, prefix, role, e, src_key, (da, db)) for role in roles]
            a_op = GroupedSlice(fa.dtype, (inn, r), 1, None, len(roles), da)
            b_op = GroupedSlice(fb.dtype, (r, out * len(roles)), len(roles), order, 1, db)
            b.pieces.append(Piece(
                (_block_read(b.ref(fa), e, inn * r),),
                tuple(Write(n[0], 0, r * inn * DTYPE_SIZES[da], da) for n in names), a_op, e,  # type: ignore[arg-type]
            ))
            b.pieces.append(Piece(
                (_block_read(b.ref(fb), e, r * out * len(roles)),),
                tuple(Write(n[1], 0, out * r * DTYPE_SIZES[db], db) for n in names), b_op, e,  # type: ignore[arg-type]
            ))


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


def _identical(src: AdapterSource, refs: list[TensorRef]) -> int | None:
    """Index of the first tensor whose bytes differ from refs[0]'s, or None when all are identical."""
    def data(ref: TensorRef) -> bytes:
        return src.storage.read_range(ref.file, ref.info.start, ref.info.end)

    first = data(refs[0])
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, blob in enumerate(pool.map(data, refs[1:]), start=1):
            if blob != first:
                return i
    return None


def _pairs_identical(src: AdapterSource, pairs: list[tuple[TensorRef, TensorRef]]) -> bool:
    """True when the two tensors of every pair hold the same bytes."""
    def same(pair: tuple[TensorRef, TensorRef]) -> bool:
        a, c = pair
        if (a.info.shape, a.info.dtype) != (c.info.shape, c.info.dtype):
            return False
        return src.storage.read_range(a.file, a.info.start, a.info.end) == src.storage.read_range(c.file, c.info.start, c.info.end)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return all(pool.map(same, pairs))


def plan_fuse(src: AdapterSource, layout: str, dtype: str | None, chunk: int = DEFAULT_CHUNK_BYTES,
              target: str = "peft") -> AdapterPlan:
    """Plan converting a per-expert adapter to `layout` (peft, grouped or shared_w123); the rest passes through.

    `target` (configs/targets/<target>.json) names the keys and rewrites adapter_config.json; `layout`
    peft needs a target that loads the family's adapters in that layout, grouped and shared_w123
    (loaded by no server) the default target peft. Reads the lora_A tensors of roles fused into one factor (and, for shared_w123, the factors that must be shared) at
    plan time to decide what is exact. Raises ConversionError for non-per-expert input and for
    conversions that would not be exact.
    """
    if layout not in FUSED_LAYOUTS:
        raise ConversionError(f"--layout {layout!r}: expected one of {list(FUSED_LAYOUTS)}")
    groups, passthrough = detect_expert_lora(src.infos, src.config, src.base_config, src.display())
    if not groups:
        raise ConversionError(f"{src.display()}: holds no expert LoRA; there is nothing to fuse")
    other = [g for g in groups if g.pattern != "per_expert"]
    if other:
        raise ConversionError(
            f"{src.display()}: layer {other[0].prefix} is already in the {other[0].pattern} layout; fuse_adapter "
            "takes per-expert adapters (run convert.split_adapter first)"
        )
    family = _fuse_family(groups, src)
    rules = target_rules(target, family.name, src.base_config)
    if layout == "peft" and rules.expert_layout != "peft":
        raise ConversionError(
            f"fuse_adapter --target {target}: {target} loads {family.name} adapters per expert ({rules.source}), not in "
            f"the peft layout; use split_adapter --target {target} (or fuse_adapter --target peft for peft itself)"
        )
    if layout != "peft" and target != "peft":
        raise ConversionError(f"fuse_adapter --layout {layout}: no target loads this layout; leave --target at its "
                              "default (peft names and adapter_config.json)")
    _check_extra_experts(groups, family, rules, src.display(), None if layout == "peft" else f"the {layout} layout")
    names = KeyNames(family, source_naming(family, groups, [*passthrough, *(f.name for g in groups for f in g.factors)]),
                     rules.naming)
    b = _Builder(src, dtype, chunk, names)
    b.passthrough(passthrough)
    notes = list(src.notes)
    shared_a = True
    if layout in ("peft", "grouped"):
        # roles fused into one tensor share one lora_A in the fused layout when their per-expert lora_A agree
        stacks = {parts for parts, _, _ in lora_tensors(family) if len(parts) > 1}
        if layout == "grouped":
            stacks.add(input_roles(family))
        pairs = [
            (b.ref(g.factor((parts[0],), "A", e)), b.ref(g.factor((other,), "A", e)))
            for g in groups for parts in stacks if set(parts) <= set(g.roles)
            for other in parts[1:] for e in range(g.experts_of(parts[0]))
        ]
        shared_a = _pairs_identical(src, pairs)
    params: set[str] = set()
    for g in groups:
        prefix = family_prefix(family, g.prefix, b.where, names)
        if layout == "peft":
            params |= _fuse_peft(b, g, family, prefix, shared_a, rules)
        elif layout == "grouped":
            _fuse_grouped(b, g, family, prefix, shared_a)
        else:
            _fuse_shared(b, g, family, prefix)
    notes += apply_rules(b, rules, src.config, src.base_config, src.display())
    if layout == "peft" and not shared_a:
        stacked = ", ".join(f"{'/'.join(p)} ({leaf})" for p, leaf, _ in lora_tensors(family) if len(p) > 1)
        notes.append(f"the roles of one fused parameter have different lora_A: {stacked}: its wrapper stacks them "
                     "(rank k*r, block-diagonal lora_B, alpha scaled to keep every delta; exact)")
    b.check_unique()
    roles = sorted({r for g in groups for r in g.roles}, key=role_order(family).index)
    kept_leaves = {k.rsplit(".", 1)[-1] for k in b.kept}
    leaves = {proj_name(family, r, n) for r in roles for n in (None, KeyNames(family, MODEL, MODEL))}
    drop = [leaf for leaf in sorted(leaves) if leaf not in kept_leaves]
    add = [shared_w123_proj(family, r) for r in roles] if layout == "shared_w123" else []
    config = rewrite_config(
        src.config, list(b.modules.values()), b.kept, src.display("adapter_config.json"),
        target_modules_add=add, target_modules_drop=drop,
        target_parameters=sorted(params) if layout == "peft" else None,
    )
    unmatched = keys_matching_no_module(config, b.kept) if layout == "peft" else []
    if unmatched:
        notes.append(f"peft 0.21 warns when it loads this adapter that the rank_pattern/alpha_pattern keys {unmatched} "
                     "'did not match any targeted module and were ignored': its check looks at target_modules only; "
                     "peft does apply them to the target_parameters they match (the deltas are exact)")
    config, more = apply_target(b, rules, src.config, config, family, src.display("adapter_config.json"))
    notes += more
    desc = (f"fuse_adapter --target {target}: per_expert -> {layout}; {len(groups)} expert layers, "
            f"E={max(g.num_experts for g in groups)}, family {family.name}, {rules.naming} names")
    return AdapterPlan(desc, b.targets, b.pieces, max(g.slots for g in groups), config, groups, notes,
                       target=target, family=family.name)


def _group_scale(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str, roles: tuple[str, ...]) -> Scale:
    """The one (r, alpha) of every expert of `roles` in the per-expert source; refuses if they differ."""
    scales = {
        source_scale(b.src.config, module_key(lora_module(g.factor((role,), "A", e).name)))
        for role in roles for e in range(g.experts_of(role))
    }
    ranks = {g.rank_of(role) for role in roles}
    if len(scales) != 1 or len(ranks) != 1:
        raise ConversionError(
            f"{b.where}: layer {g.prefix}: {'/'.join(roles)} LoRA of its experts have different ranks or alphas "
            f"({sorted(scales)}, ranks {sorted(ranks)}); one fused factor needs one"
        )
    return scales.pop()


def _fuse_peft(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str, shared_a: bool,
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
            r0 = _zero_rank(rules, g, b.src.config)
            out, inn = dict(missing_roles(family, g))[roles[0]]
            dt = b.out_dtype(g.factors[0])
            names = []
            for which, shape in (("A", (E * r0, inn)), ("B", (out * len(roles), r0 * E))):
                name = f"{experts_path}.{nest}lora_{which}.weight"
                b.target(name, dt, shape)
                b.zeros(name, numel(shape) * DTYPE_SIZES[dt], dt, None)
                names.append(name)
            b.module(module_key(experts_path, param), _zero_scale(b.src.config, r0), re.escape(f"experts.{param}"),
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
        src_scale = _group_scale(b, g, family, prefix, roles)
        key = module_key(experts_path, param)
        b.module(key, scale_for_rank(b.src.config, src_scale, R), re.escape(f"experts.{param}"), (name_b,))
        targeted.add(template.replace("{prefix}.", ""))
        a_roles = roles if expand else roles[:1]
        a_bytes = R * inn * DTYPE_SIZES[da]
        for e in range(E):
            reads = tuple(_block_read(b.ref(g.factor((role,), "A", e)), 0, r * inn) for role in a_roles)
            b.pieces.append(Piece(reads, (Write(name_a, e * a_bytes, (e + 1) * a_bytes, da),), None, e))
        row_bytes = R * E * DTYPE_SIZES[db]
        step = max(1, b.chunk // max(1, row_bytes * k))
        order = fused_order(family, roles) if k > 1 else None
        for lo in range(0, out, step):
            hi = min(out, lo + step)
            reads = []
            for role in roles:
                for e in range(E):
                    ref = b.ref(g.factor((role,), "B", e))
                    item = ref.info.itemsize
                    reads.append(Read(ref.file, ref.info.start + lo * r * item, ref.info.start + hi * r * item, ref.info.dtype))
            if k > 1 and order == "interleave":
                writes: tuple[Write, ...] = (Write(name_b, k * lo * row_bytes, k * hi * row_bytes, db),)
            else:
                writes = tuple(Write(name_b, (j * out + lo) * row_bytes, (j * out + hi) * row_bytes, db) for j in range(k))
            build = FoldedBBuild(tuple(rd.dtype for rd in reads), hi - lo, r, E, k, order, expand, db)
            b.pieces.append(Piece(tuple(reads), writes, build, None))  # type: ignore[arg-type]
    return targeted


def _fuse_grouped(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str, shared_a: bool) -> None:
    inputs = input_roles(family)
    if len(inputs) > 1 and set(inputs) <= set(g.roles) and not shared_a:
        raise ConversionError(
            f"{b.where}: {'/'.join(inputs)} LoRA have different lora_A (e.g. in layer {g.prefix}); the grouped layout "
            f"shares one lora_{GROUPED_INPUTS}_A between them, so it cannot hold this adapter exactly (use --layout peft)"
        )
    E = g.num_experts
    experts_path = b.names.out_module(family.experts_path.format(prefix=prefix))
    ranks = {g.rank_of(r) for r in g.roles}
    if len(ranks) != 1:
        raise ConversionError(f"{b.where}: layer {g.prefix}: the grouped layout has one rank, the experts have {sorted(ranks)}")
    scale = _group_scale(b, g, family, prefix, g.roles)
    b.module(module_key(experts_path), scale, re.escape("experts"),
             tuple(f"{experts_path}.lora_{tag}_B" for tag in (GROUPED_INPUTS, GROUPED_OUTPUT)))
    r = ranks.pop()
    for roles, tag in ((inputs, GROUPED_INPUTS), ((output_role(family),), GROUPED_OUTPUT)):
        present = [x for x in roles if x in g.roles]
        if not present:
            continue
        if len(present) != len(roles):
            raise ConversionError(f"{b.where}: layer {g.prefix} has LoRA for {present} but the grouped layout needs {list(roles)}")
        out, inn = g.dims_of(roles[0])
        k = len(roles)
        a0, b0 = g.factor((roles[0],), "A", 0), g.factor((roles[0],), "B", 0)
        da, db = b.out_dtype(a0), b.out_dtype(b0)
        name_a, name_b = f"{experts_path}.lora_{tag}_A", f"{experts_path}.lora_{tag}_B"
        b.target(name_a, da, (E, inn, r))
        b.target(name_b, db, (E, r, out * k))
        order = fused_order(family) if k > 1 else None
        a_bytes, b_bytes = inn * r * DTYPE_SIZES[da], r * out * k * DTYPE_SIZES[db]
        for e in range(E):
            fa = g.factor((roles[0],), "A", e)
            op_a = GroupedBuild("A", (fa.dtype,), ((r, inn),), 1, None, False, da)
            b.pieces.append(Piece((_block_read(b.ref(fa), 0, r * inn),), (Write(name_a, e * a_bytes, (e + 1) * a_bytes, da),),
                                  op_a, e))  # type: ignore[arg-type]
            fbs = [g.factor((role,), "B", e) for role in roles]
            op_b = GroupedBuild("B", tuple(f.dtype for f in fbs), tuple((out, r) for _ in fbs), k, order, False, db)
            b.pieces.append(Piece(tuple(_block_read(b.ref(f), 0, out * r) for f in fbs),
                                  (Write(name_b, e * b_bytes, (e + 1) * b_bytes, db),), op_b, e))  # type: ignore[arg-type]


def _fuse_shared(b: _Builder, g: ExpertLoraGroup, family: Family, prefix: str) -> None:
    E = g.num_experts
    experts_path = b.names.out_module(family.experts_path.format(prefix=prefix))
    for role in g.roles:
        shared_factor = "B" if role == output_role(family) else "A"
        refs = [b.ref(g.factor((role,), shared_factor, e)) for e in range(E)]
        bad = _identical(b.src, refs)
        if bad is not None:
            raise ConversionError(
                f"{b.where}: the shared w1/w2/w3 layout keeps one {role} lora_{shared_factor} for all experts, but "
                f"{refs[bad].info.name!r} differs from {refs[0].info.name!r}: not exact; use --layout peft or grouped"
            )
        proj = shared_w123_proj(family, role)
        out, inn = g.dims_of(role)
        r = g.rank_of(role)
        scale = _group_scale(b, g, family, prefix, (role,))
        module = f"{experts_path}.{proj}"
        b.module(module, scale, re.escape(f"experts.{proj}"), (f"{module}.lora_B.weight",))
        for which, block, shape_e in (("A", r * inn, (r, inn)), ("B", out * r, (out, r))):
            f0 = g.factor((role,), which, 0)
            dt = b.out_dtype(f0)
            name = f"{module}.lora_{which}.weight"
            shared = which == shared_factor
            b.target(name, dt, (1 if shared else E, *shape_e))
            nbytes = block * DTYPE_SIZES[dt]
            for e in range(1 if shared else E):
                ref = b.ref(g.factor((role,), which, e))
                b.pieces.append(Piece((_block_read(ref, 0, block),), (Write(name, e * nbytes, (e + 1) * nbytes, dt),), None, e))
