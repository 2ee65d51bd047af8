"""Expert-LoRA layouts of adapter files, detected from safetensors metadata alone (no tensor data).

The four layouts (see FORMATS.md, "LoRA adapters"), for the experts of one MoE layer whose
module path is `P.experts` (E experts, per-expert rank r, nn.Linear orientation [out, in]):

- per_expert: `P.experts.{e}.<proj>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
- peft_target_parameters: peft `ParamWrapper` on the fused 3-D parameters; the expert
  dimension is folded into the rank: `P.experts.(base_layer.)*lora_A.weight` [E*r, in]
  (expert-major) and `lora_B.weight` [out, r*E] (expert-minor). One wrapper per targeted
  parameter (the family's fused tensors, e.g. gate_up_proj and down_proj); which is which is
  decided by shape and by the family's tables, never by a name in code.
- shared_w123: 3-D `P.experts.<proj>.lora_A.weight` [1|E, r, in], `.lora_B.weight`
  [E|1, out, r]; a dim 0 of 1 is shared by every expert.
- grouped: NeMo `P.experts.lora_gate_and_up_A` [E, H, r], `_B` [E, r, 2I],
  `lora_down_A` [E, I, r], `_B` [E, r, H] (x @ A @ B: transposed relative to peft).

Projection names (e.g. `gate_proj`/`w1` -> role gate), which roles a fused factor holds, and
their order inside it (halves or interleaved) come from the family tables in configs/, so
this module names no model.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families import Family, find_family, load_families
from convert.formats.lora_producers import (
    IN_OUT, OUT_IN, RANK_MAJOR, b_order, describe, marker_fix, version_orientation,
)
from convert.formats.safetensors import TensorInfo

PATTERNS = ("per_expert", "peft_target_parameters", "shared_w123", "grouped")
PEFT_PREFIX = "base_model.model."

_PER_EXPERT_RX = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.lora_(?P<f>[AB])\.weight$")
_PEFT_RX = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<nest>(?:base_layer\.)*)lora_(?P<f>[AB])\.weight$")
_SHARED_RX = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<proj>[A-Za-z0-9_]+)\.lora_(?P<f>[AB])\.weight$")
# NeMo GroupedExpertsLoRA's own tensor names (the format's, not a model's): one factor pair for the
# input projections stacked on the out dim, one for the output projection.
GROUPED_INPUTS, GROUPED_OUTPUT = "gate_and_up", "down"
_GROUPED_RX = re.compile(
    rf"^(?P<prefix>.+)\.experts\.lora_(?P<which>{GROUPED_INPUTS}|{GROUPED_OUTPUT})_(?P<f>[AB])(?:\.weight)?$"
)
_EXPERT_LORA_RX = re.compile(r"\.experts\..*lora_")


@dataclass(frozen=True)
class LoraFactor:
    """One source tensor of an expert-LoRA group.

    `roles`: the roles whose LoRA factor it holds (("gate", "up") for a fused gate_up factor);
    `factor`: "A" or "B"; `expert`: the expert of a per_expert tensor, else None (all experts);
    `shared`: shared_w123 factor with dim 0 = 1 (the same for every expert).
    """

    name: str
    roles: tuple[str, ...]
    factor: str
    expert: int | None
    shape: tuple[int, ...]
    dtype: str
    shared: bool = False


@dataclass(frozen=True)
class ExpertLoraGroup:
    """The expert LoRA of one MoE layer.

    `prefix`: module path before ".experts" (e.g. "base_model.model.model.layers.3.mlp");
    `rank`: per-expert rank r (the largest over roles; peft's saved tensors have E*r);
    `role_rank`: (role, r) per role; `role_dims`: (role, (out, in)) of one expert's delta;
    `factors`: every source tensor with its meaning; `family`: the family name when known;
    `fused_order`: how a factor holding several roles stacks them on its out dim, as the family's
    fused tensor does: "concat" (halves) or "interleave" (role j = rows j::k); None when no factor
    holds several roles or the family is unknown;
    `target_param`: (role tuple, parameter name) of each peft wrapper, innermost first (the
    family's fused tensors, e.g. qwen3_moe's two wrappers of its 2-role and 1-role tensors);
    `role_experts`: (role, count) of roles held by more experts than `num_experts` (E), the
    family's `extra_experts` (e.g. a fused gate_up of E + zero experts); every other role has E;
    `orientation`/`b_order` (peft wrappers only, convert.formats.lora_producers): "in_out" (peft >= 0.19.1:
    lora_A [E*r, in], lora_B [out, E*r]) or "out_in" (older: lora_A [E*r, out], lora_B [in, E*r], the
    expert's delta the transpose of B_e @ A_e), and lora_B's columns "rank_major" (peft's B.view(., r, E))
    or "expert_major" (B.view(., E, r)); `producer`: what was found, in words (inspect shows it).
    """

    prefix: str
    pattern: str
    num_experts: int
    rank: int
    roles: tuple[str, ...]
    dtypes: tuple[str, ...]
    tensors: tuple[str, ...]
    role_rank: tuple[tuple[str, int], ...] = ()
    role_dims: tuple[tuple[str, tuple[int, int]], ...] = ()
    factors: tuple[LoraFactor, ...] = ()
    family: str | None = None
    fused_order: str | None = None
    target_param: tuple[tuple[tuple[str, ...], str], ...] = ()
    role_experts: tuple[tuple[str, int], ...] = ()
    orientation: str = IN_OUT
    b_order: str = RANK_MAJOR
    producer: str = ""

    def experts_of(self, role: str) -> int:
        """How many experts hold `role`'s LoRA: E, or more for a role of the family's `extra_experts`."""
        return dict(self.role_experts).get(role, self.num_experts)

    @property
    def slots(self) -> int:
        """How many experts hold at least one role (E unless some role has extra experts)."""
        return max([self.num_experts, *(n for _, n in self.role_experts)])

    def rank_of(self, role: str) -> int:
        """The per-expert rank of `role`."""
        return dict(self.role_rank)[role]

    def dims_of(self, role: str) -> tuple[int, int]:
        """(out, in) of one expert's `role` projection."""
        return dict(self.role_dims)[role]

    def factor(self, roles: tuple[str, ...], which: str, expert: int | None = None) -> LoraFactor:
        """The source factor `which` ("A"/"B") holding `roles` (of `expert` for per_expert groups)."""
        for f in self.factors:
            if f.roles == roles and f.factor == which and f.expert == expert:
                return f
        raise KeyError((roles, which, expert))


@dataclass(frozen=True)
class FamilyGuess:
    """The family of an adapter's base model, and how it was found (or why it was not)."""

    family: Family | None
    source: str  # e.g. "--base-config model_type 'gpt_oss'", or the reason it is unknown


# ----------------------------------------------------------------------------- family tables


def lora_roles(family: Family) -> tuple[str, ...]:
    """The family's roles that LoRA can target (those of weight tensors), in the family's order."""
    return tuple(r for r, leaf in family.role_leaves.items() if leaf.endswith(".weight"))


def role_order(family: Family | None = None) -> tuple[str, ...]:
    """Roles in a stable order: `family`'s, then every other family's (first seen first)."""
    out: dict[str, None] = {}
    for fam in ([family] if family else []) + list(load_families().values()):
        out.update(dict.fromkeys(lora_roles(fam)))
    return tuple(out)


def output_role(family: Family) -> str:
    """The role that maps the expert's intermediate size back to the hidden size: the family's last one.

    Every other role maps hidden -> intermediate (the families' roles are listed input projections
    first, as transformers' conversion table lists them).
    """
    return lora_roles(family)[-1]


def lora_tensors(family: Family) -> tuple[tuple[tuple[str, ...], str, str], ...]:
    """(roles, parameter name, order) of each fused weight tensor of the family's default layout.

    These are the parameters peft's `target_parameters` wraps; `order` says how several roles
    share the out dim ("concat" halves or "interleave"), from the tensor's op pipeline.
    """
    weights = set(lora_roles(family))
    return tuple(
        (t.parts, t.leaf, t.op) for t in family.fused[family.default_fused] if set(t.parts) <= weights
    )


def proj_roles(family: Family | None = None) -> dict[str, str]:
    """Per-expert projection module name -> role, from the family tables (`family`'s names win)."""
    out: dict[str, str] = {}
    for fam in list(load_families().values()) + ([family] if family else []):
        for role in lora_roles(fam):
            out[fam.per_expert[role].rsplit(".", 2)[-2]] = role
    return out


def fused_param_roles(family: Family | None = None) -> dict[str, tuple[str, ...]]:
    """Fused parameter name -> roles it holds, from `family`'s tables (every family's when None)."""
    fams = [family] if family else list(load_families().values())
    out: dict[str, tuple[str, ...]] = {}
    for fam in fams:
        for roles, leaf, _ in lora_tensors(fam):
            out.setdefault(leaf, roles)
    return out


def fused_order(family: Family, roles: tuple[str, ...] | None = None) -> str | None:
    """How the family's fused tensor holding several roles (`roles` when given) orders them: concat or interleave."""
    for parts, _, op in lora_tensors(family):
        if len(parts) > 1 and (roles is None or parts == roles):
            return op
    return None


def family_by_name(name: str) -> Family:
    """The family called `name` (as in configs/)."""
    return load_families()[name]


def base_dims(
    base_config: dict[str, Any] | None, family: Family | None = None
) -> tuple[int | None, int | None, int | None]:
    """(hidden size H, expert intermediate size I, number of experts E) from a config.json, None where absent.

    E is read with `family`'s config keys (every family's when None).
    """
    if not base_config:
        return None, None, None
    cfg = base_config.get("text_config", base_config) if "hidden_size" not in base_config else base_config
    hidden = cfg.get("hidden_size")
    inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    keys = family.num_experts_keys if family else tuple(
        dict.fromkeys(k for f in load_families().values() for k in f.num_experts_keys)
    )
    experts = None
    for key in keys:
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            experts = cfg[key]
            break
    return hidden, inter, experts


def guess_family(adapter_config: dict[str, Any], base_config: dict[str, Any] | None, where: str) -> FamilyGuess:
    """The base model's family: from `base_config` (config.json) when given, else from adapter_config.json.

    Both go through the one family detection (convert.families.find_family): config.json's
    model_type / architectures / text_config; adapter_config.json's peft `auto_mapping`
    (`base_model_class`, `parent_library`). Besides, `base_model_name_or_path` containing a
    family's model_type (e.g. "gpt-oss") counts; used only when every piece of evidence names
    the same family. Raises ConversionError when `base_config` names no known family.
    """
    if base_config is not None:
        fam, how = find_family(base_config)
        if fam is None:
            known = sorted(t for f in load_families().values() for t in f.model_types)
            raise ConversionError(f"--base-config: {how} (known: {known})")
        return FamilyGuess(fam, f"--base-config {how}")
    found: dict[str, str] = {}
    fam, how = find_family({**adapter_config, "auto_mapping": adapter_config.get("auto_mapping") or {}})
    if fam is not None:
        found[fam.name] = how
    name = str(adapter_config.get("base_model_name_or_path") or "")
    if name:
        norm = re.sub(r"[^a-z0-9]+", "_", name.lower())
        hits = {
            fam.name
            for fam in load_families().values()
            for t in fam.model_types
            if re.search(rf"(^|_){re.escape(t)}(_|$)", norm)
        }
        for h in hits:
            found.setdefault(h, f"base_model_name_or_path {name!r}")
    if len(found) == 1:
        fam_name, how = next(iter(found.items()))
        return FamilyGuess(load_families()[fam_name], f"adapter_config.json {how}")
    if not found:
        return FamilyGuess(None, f"{where}: adapter_config.json does not name the base model's family")
    return FamilyGuess(None, f"{where}: adapter_config.json names several families ({sorted(found)})")


# ----------------------------------------------------------------------------- rank patterns


def pattern_value(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """peft's `rank_pattern`/`alpha_pattern` lookup: the first pattern matching the end of `key`."""
    for pat in patterns or {}:
        if re.match(rf"(.*\.)?({pat})$", key):
            return patterns[pat]  # type: ignore[index]
    return default


def module_key(prefix: str, *rest: str) -> str:
    """The module name peft matches patterns against: without `base_model.model.`."""
    name = ".".join((prefix, *rest))
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


# ----------------------------------------------------------------------------- detection


def detect_expert_lora(
    tensors: dict[str, TensorInfo],
    adapter_config: dict[str, Any],
    base_config: dict[str, Any] | None,
    where: str,
    packings: bool = False,
) -> tuple[list[ExpertLoraGroup], list[str]]:
    """Expert-LoRA groups found in `tensors` (every tensor of the adapter, from safetensors headers), and
    names of every other tensor (passed through unchanged).

    `adapter_config`: adapter_config.json; `base_config`: the base model's config.json when the user
    gave one; `where`: display name of the adapter directory for messages; `packings`: whether the caller reads
    peft wrappers in other producers' packings (older peft shapes, expert-major lora_B: the group's `orientation`
    and `b_order`); a caller that does not is refused such a layer, naming the command that converts it. Raises ConversionError
    naming the tensor and the expected shapes when expert LoRA is present but inconsistent or
    undecidable (e.g. a lone peft wrapper that could be gate_up or down).
    """
    guess = guess_family(adapter_config, base_config, where)
    roles_of_proj = proj_roles(guess.family)
    found: dict[str, dict[str, dict[str, TensorInfo]]] = defaultdict(lambda: defaultdict(dict))
    passthrough: list[str] = []
    for name in sorted(tensors):
        info = tensors[name]
        m = _PER_EXPERT_RX.match(name)
        if m and m["proj"] in roles_of_proj:
            found["per_expert"][m["prefix"]][name] = info
            continue
        m = _PEFT_RX.match(name)
        if m and len(info.shape) == 2:
            found["peft_target_parameters"][m["prefix"]][name] = info
            continue
        m = _SHARED_RX.match(name)
        if m and m["proj"] in roles_of_proj and len(info.shape) == 3:
            found["shared_w123"][m["prefix"]][name] = info
            continue
        m = _GROUPED_RX.match(name)
        if m:
            found["grouped"][m["prefix"]][name] = info
            continue
        if _EXPERT_LORA_RX.search(name):
            raise ConversionError(
                f"{where}: tensor {name!r} ({info.dtype} {list(info.shape)}) looks like expert LoRA but matches none "
                f"of the known layouts ({', '.join(PATTERNS)}); expected e.g. '<layer>.experts.{{e}}.<projection>."
                "lora_A.weight' [r, in], peft '<layer>.experts.lora_A.weight' [E*r, in], or 3-D [E|1, r, in] factors"
            )
        passthrough.append(name)

    prefixes: dict[str, str] = {}
    for pattern, by_prefix in found.items():
        for prefix in by_prefix:
            if prefix in prefixes:
                raise ConversionError(
                    f"{where}: layer {prefix!r} holds expert LoRA in two layouts ({prefixes[prefix]} and {pattern}); "
                    "expected one layout per layer"
                )
            prefixes[prefix] = pattern

    hidden, inter, base_e = base_dims(base_config, guess.family)
    counts = guess.family.role_experts(base_config, base_e, "--base-config") if base_config and guess.family and base_e else None
    ctx = _Context(where, adapter_config, guess, hidden, inter, base_e, roles_of_proj, counts, base_config, packings)
    groups: list[ExpertLoraGroup] = []
    for prefix in sorted(prefixes, key=_natural):
        pattern = prefixes[prefix]
        items = found[pattern][prefix]
        if pattern == "per_expert":
            groups.append(_per_expert(ctx, prefix, items))
        elif pattern == "peft_target_parameters":
            groups.append(_peft(ctx, prefix, items))
        elif pattern == "shared_w123":
            groups.append(_shared(ctx, prefix, items))
        else:
            groups.append(_grouped(ctx, prefix, items))
    return groups, passthrough


@dataclass
class _Context:
    where: str
    adapter_config: dict[str, Any]
    guess: FamilyGuess
    hidden: int | None
    inter: int | None
    base_experts: int | None
    roles_of_proj: dict[str, str]
    role_counts: dict[str, int] | None = None  # role -> experts holding it, from --base-config (E + extra_experts)
    base_config: dict[str, Any] | None = None
    packings: bool = False  # the caller reads peft wrappers in any packing (orientation, lora_B order)

    def other_table(self, found: dict[str, int]) -> str:
        """A hint naming another release's table whose expert counts are `found` (role -> experts), else ""."""
        from convert.families.registry import other_table_fits

        if self.guess.family is None or not self.base_config:
            return ""
        return other_table_fits(self.guess.family, self.base_config, found)

    @property
    def family_name(self) -> str | None:
        return self.guess.family.name if self.guess.family else None

    @property
    def families(self) -> list[Family]:
        """The family when known, else every family (whose names the adapter may use)."""
        return [self.guess.family] if self.guess.family else list(load_families().values())

    @property
    def order(self) -> str | None:
        return fused_order(self.guess.family) if self.guess.family else None

    @property
    def roles(self) -> tuple[str, ...]:
        return role_order(self.guess.family)

    def is_output(self, role: str) -> bool | None:
        """Whether `role` maps intermediate -> hidden; None when the families disagree."""
        outs = {output_role(f) == role for f in self.families if role in lora_roles(f)}
        return outs.pop() if len(outs) == 1 else None

    def sides(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input roles, output roles) in order: hidden -> intermediate, and back."""
        return (tuple(r for r in self.roles if self.is_output(r) is False),
                tuple(r for r in self.roles if self.is_output(r)))

    def expected(self, role: str) -> tuple[int | None, int | None]:
        """(out, in) of `role` from the base config, None where unknown."""
        output = self.is_output(role)
        if output is None:
            return None, None
        if output:
            return self.hidden, self.inter
        return self.inter, self.hidden

    def extra_key(self, role: str) -> str | None:
        """The config key of the extra experts holding `role` (the family's `extra_experts`), None when it has none."""
        return self.guess.family.extra_experts.get(role) if self.guess.family else None

    def role_experts(self, num: int, found: dict[str, int]) -> tuple[tuple[str, int], ...]:
        """(role, count) of the roles held by more than `num` experts: `found` (detected), --base-config's counts."""
        merged = {**(self.role_counts or {}), **found}
        return tuple((r, n) for r, n in merged.items() if n != num)

    def check_experts(self, prefix: str, num: int, name: str) -> None:
        if self.base_experts is not None and num != self.base_experts:
            raise ConversionError(
                f"{self.where}: tensor {name!r} gives layer {prefix} {num} experts, "
                f"but --base-config says {self.base_experts}"
            )


def _natural(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _summary(
    ctx: _Context, prefix: str, pattern: str, num: int, role_rank: dict[str, int], role_dims: dict[str, tuple[int, int]],
    factors: list[LoraFactor], needs_order: bool, target_param: tuple[tuple[tuple[str, ...], str], ...] = (),
    role_experts: tuple[tuple[str, int], ...] = (),
) -> ExpertLoraGroup:
    for role, (out, inn) in role_dims.items():
        want_out, want_in = ctx.expected(role)
        if (want_out is not None and out != want_out) or (want_in is not None and inn != want_in):
            example = next(f for f in factors if role in f.roles)
            raise ConversionError(
                f"{ctx.where}: tensor {example.name!r}: the {role} projection of layer {prefix} is [out={out}, in={inn}], "
                f"but --base-config says [out={want_out}, in={want_in}]"
            )
    inputs = [r for r in ctx.roles if r in role_dims and ctx.is_output(r) is False]
    outputs = [r for r in ctx.roles if r in role_dims and ctx.is_output(r)]
    for first, r in zip(inputs, inputs[1:]):
        if role_dims[r] != role_dims[first]:
            raise ConversionError(
                f"{ctx.where}: layer {prefix}: {first} LoRA is for [out, in] = {list(role_dims[first])} but {r} LoRA "
                f"for {list(role_dims[r])}; expected the same shape"
            )
    for out_role in outputs:
        for r in inputs[:1]:
            if tuple(reversed(role_dims[r])) != role_dims[out_role]:
                raise ConversionError(
                    f"{ctx.where}: layer {prefix}: {out_role} LoRA is for [out, in] = {list(role_dims[out_role])}, "
                    f"expected {list(reversed(role_dims[r]))} (the transpose of {r})"
                )
    ctx.check_experts(prefix, num, factors[0].name)
    roles = tuple(r for r in ctx.roles if r in role_rank)
    return ExpertLoraGroup(
        prefix=prefix, pattern=pattern, num_experts=num, rank=max(role_rank.values()), roles=roles,
        dtypes=tuple(sorted({f.dtype for f in factors})), tensors=tuple(sorted(f.name for f in factors)),
        role_rank=tuple((r, role_rank[r]) for r in roles), role_dims=tuple((r, role_dims[r]) for r in roles),
        factors=tuple(factors), family=ctx.family_name, fused_order=ctx.order if needs_order else None,
        target_param=target_param, role_experts=role_experts,
    )


def _per_expert(ctx: _Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    by: dict[tuple[str, int, str], TensorInfo] = {}
    for name, info in items.items():
        m = _PER_EXPERT_RX.match(name)
        assert m
        role = ctx.roles_of_proj[m["proj"]]
        key = (role, int(m["e"]), m["f"])
        if key in by:
            raise ConversionError(
                f"{ctx.where}: tensors {by[key].name!r} and {name!r} are both the {role} lora_{m['f']} of expert "
                f"{m['e']} of {prefix}"
            )
        if len(info.shape) != 2:
            raise ConversionError(
                f"{ctx.where}: tensor {name!r} has shape {list(info.shape)}; expected 2-D ([r, in] for lora_A, [out, r] "
                "for lora_B)"
            )
        by[key] = info
    roles = sorted({k[0] for k in by}, key=ctx.roles.index)
    top = {role: max(k[1] for k in by if k[0] == role) + 1 for role in roles}
    plain = [top[r] for r in roles if not ctx.extra_key(r)]
    num = max(plain or top.values())
    counts = {r: max(top[r], num) if ctx.extra_key(r) else num for r in roles}
    if ctx.base_experts is not None:
        for role in roles:
            want = (ctx.role_counts or {}).get(role, ctx.base_experts)
            if top[role] > want:
                raise ConversionError(
                    f"{ctx.where}: layer {prefix} has LoRA for expert {top[role] - 1}, but --base-config says "
                    f"{want} experts" + (f" for role {role} (E + {ctx.extra_key(role)})" if want != ctx.base_experts else "")
                    + ctx.other_table(top)
                )
            counts[role] = want
        num = ctx.base_experts
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors = []
    for role in roles:
        for e in range(counts[role]):
            a, b = by.get((role, e, "A")), by.get((role, e, "B"))
            if a is None or b is None:
                other = by.get((role, e, "B" if a is None else "A")) or next(iter(by.values()))
                raise ConversionError(
                    f"{ctx.where}: layer {prefix}: the {role} lora_{'A' if a is None else 'B'} of expert {e} is missing "
                    f"(found e.g. {other.name!r}; expected all {counts[role]} experts)"
                )
            r, inn = a.shape
            out, rb = b.shape
            if rb != r:
                raise ConversionError(
                    f"{ctx.where}: tensor {b.name!r} has shape {list(b.shape)}; expected [out, {r}] to match "
                    f"{a.name!r} {list(a.shape)}"
                )
            if role not in role_rank:
                role_rank[role], role_dims[role] = r, (out, inn)
            elif (r, (out, inn)) != (role_rank[role], role_dims[role]):
                raise ConversionError(
                    f"{ctx.where}: tensor {a.name!r}: expert {e}'s {role} LoRA has rank {r} for [out, in] = [{out}, {inn}]"
                    f", but expert 0 has rank {role_rank[role]} for {list(role_dims[role])}; experts must agree"
                )
            factors.append(LoraFactor(a.name, (role,), "A", e, a.shape, a.dtype))
            factors.append(LoraFactor(b.name, (role,), "B", e, b.shape, b.dtype))
    return _summary(ctx, prefix, "per_expert", num, role_rank, role_dims, factors, needs_order=False,
                    role_experts=ctx.role_experts(num, counts))


def _peft(ctx: _Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    wrappers: dict[int, dict[str, TensorInfo]] = defaultdict(dict)
    for name, info in items.items():
        m = _PEFT_RX.match(name)
        assert m
        wrappers[m["nest"].count("base_layer.")][m["f"]] = info
    for depth, ab in wrappers.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))
            raise ConversionError(
                f"{ctx.where}: tensor {have.name!r} has no lora_{'B' if 'A' in ab else 'A'} partner in layer {prefix}"
            )
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise ConversionError(
                f"{ctx.where}: tensor {a.name!r} {list(a.shape)} and {b.name!r} {list(b.shape)}: peft folds E*r into "
                f"lora_A dim 0 and lora_B dim 1, which must be equal"
            )
    tensor_sets = list(dict.fromkeys(tuple(t[0] for t in lora_tensors(f)) for f in ctx.families))
    most = max(len(ts) for ts in tensor_sets)
    if len(wrappers) > most:
        raise ConversionError(
            f"{ctx.where}: layer {prefix} has {len(wrappers)} nested peft wrappers on its experts; expected at most "
            f"{most} (one per fused expert parameter of the family)"
        )
    params = fused_param_roles(ctx.guess.family)
    name_of = {roles: p for p, roles in params.items()}
    targeted = {
        params[t.rsplit(".", 1)[-1]]
        for t in (ctx.adapter_config.get("target_parameters") or [])
        if t.rsplit(".", 1)[-1] in params
    }
    options: list[tuple[dict[int, tuple[str, ...]], int, dict[int, int], dict[str, int]]] = []
    depths = sorted(wrappers)
    assignments: list[dict[int, tuple[str, ...]]] = []
    for ts in tensor_sets:
        for chosen in itertools.permutations(ts, len(depths)):
            assign = dict(zip(depths, chosen))
            if assign not in assignments:
                assignments.append(assign)
    reasons: list[str] = []
    oriented: list[tuple[str, dict[int, tuple[str, ...]], int, dict[int, int], dict[str, int]]] = []
    for assign in assignments:
        for orientation in (IN_OUT, OUT_IN):
            ok, why, num, ranks, counts = _peft_check(ctx, prefix, wrappers, assign, targeted, name_of, orientation)
            if ok:
                oriented.append((orientation, assign, num, ranks, counts))
            elif orientation == IN_OUT:
                reasons.append(why)
    described = "; ".join(f"{w['A'].name} {list(w['A'].shape)} / {list(w['B'].shape)}" for w in wrappers.values())
    known = sorted(set(name_of.values()))
    if not oriented:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: peft expert LoRA {described} fits none of the fused expert parameters "
            f"{known} ({'; '.join(dict.fromkeys(reasons))}), read with peft >= 0.19.1's shapes or older ones"
        )
    if len(oriented) > 1 and ctx.guess.family and len(depths) > 1:
        # peft wraps a module's parameters in their declaration order, the first innermost (most base_layer.)
        declared = [t[0] for t in lora_tensors(ctx.guess.family)]
        oriented = [o for o in oriented if _nested_in_order(o[1], declared)] or oriented
    distinct = []
    for o in oriented:
        if o[1] not in distinct:
            distinct.append(o[1])
    if len(distinct) > 1:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: cannot tell by shape which of {known} peft expert LoRA {described} is "
            "for; pass --base-config (the base model's config.json) so the hidden and intermediate sizes decide"
        )
    orientation = _pick_orientation(ctx, prefix, described, {o[0] for o in oriented})
    assign, num, ranks, counts = next(o[1:] for o in oriented if o[0] == orientation)
    orders = {}
    for depth, roles in assign.items():
        found = b_order(ctx.adapter_config, name_of.get(roles, "/".join(roles)), orientation)
        if found.order is None:
            raise ConversionError(
                f"{ctx.where}: layer {prefix}: the lora_B column order of {wrappers[depth]['B'].name!r} "
                f"{list(wrappers[depth]['B'].shape)} cannot be told from its shape ({found.why}); "
                + marker_fix(ctx.where + "/adapter_config.json")
            )
        orders[depth] = found
    if len({o.order for o in orders.values()}) > 1:
        raise ConversionError(f"{ctx.where}: layer {prefix}: adapter_config.json declares different lora_B orders for the "
                              "wrappers of one layer; expected one")
    order = next(iter(orders.values()))
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors: list[LoraFactor] = []
    for depth, roles in sorted(assign.items()):
        a, b = wrappers[depth]["A"], wrappers[depth]["B"]
        out_all, inn = (b.shape[0], a.shape[1]) if orientation == IN_OUT else (a.shape[1], b.shape[0])
        for role in roles:
            role_rank[role] = ranks[depth]
            role_dims[role] = (out_all // len(roles), inn)
        factors.append(LoraFactor(a.name, roles, "A", None, a.shape, a.dtype))
        factors.append(LoraFactor(b.name, roles, "B", None, b.shape, b.dtype))
    target_param = tuple((assign[d], name_of[assign[d]]) for d in sorted(assign, reverse=True))
    group = _summary(ctx, prefix, "peft_target_parameters", num, role_rank, role_dims, factors,
                     needs_order=any(len(r) > 1 for r in assign.values()), target_param=target_param,
                     role_experts=ctx.role_experts(num, counts))
    if (orientation, order.order) != (IN_OUT, RANK_MAJOR) and not ctx.packings:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: peft expert LoRA {described} is packed as {describe(orientation, str(order.order))}, "
            "which this command does not read; convert it first: python -m convert.split_adapter --src "
            f"{ctx.where} --dst OUT --target per-expert"
        )
    return dataclasses.replace(group, orientation=orientation, b_order=str(order.order),
                               producer=f"{describe(orientation, str(order.order))} ({order.why})")


def _pick_orientation(ctx: _Context, prefix: str, described: str, fits: set[str]) -> str:
    """The one orientation (IN_OUT/OUT_IN) of a peft layer: the only one its shapes fit, else `peft_version`'s.

    Raises ConversionError where the shapes fit both and the file does not say which peft saved it, and
    where the shapes contradict the `peft_version` the file names.
    """
    said = version_orientation(ctx.adapter_config)
    version = ctx.adapter_config.get("peft_version")
    if len(fits) == 1:
        (only,) = fits
        if said is not None and said != only:
            raise ConversionError(
                f"{ctx.where}: layer {prefix}: peft expert LoRA {described} has {describe(only, RANK_MAJOR).split(',')[0]}, "
                f"but adapter_config.json says peft {version} saved it, which writes the other orientation; expected "
                "the shapes of the peft that saved the file"
            )
        return only
    if said is not None:
        return said
    raise ConversionError(
        f"{ctx.where}: layer {prefix}: peft expert LoRA {described} fits both peft >= 0.19.1's shapes (lora_A [E*r, in], "
        "lora_B [out, E*r]) and older ones (lora_A [E*r, out], lora_B [in, E*r]): its in and out sizes are equal "
        "(e.g. 2 x intermediate == hidden), and adapter_config.json names no peft_version; the two readings give "
        "transposed deltas. Set \"peft_version\" in adapter_config.json to the peft release that saved it "
        "(or pass --base-config where the sizes differ)"
    )


def _nested_in_order(assign: dict[int, tuple[str, ...]], declared: list[tuple[str, ...]]) -> bool:
    """Whether the wrappers, innermost first, hold the family's fused tensors in their declared order."""
    idx = [declared.index(assign[d]) for d in sorted(assign, reverse=True)]
    return idx == sorted(idx)


def _peft_check(
    ctx: _Context, prefix: str, wrappers: dict[int, dict[str, TensorInfo]], assign: dict[int, tuple[str, ...]],
    targeted: set[tuple[str, ...]], name_of: dict[tuple[str, ...], str], orientation: str = IN_OUT,
) -> tuple[bool, str, int, dict[int, int], dict[str, int]]:
    """Whether `assign` (wrapper depth -> roles) fits the shapes, config and base dims read in `orientation`; with E,
    the ranks and each role's expert count (more than E for roles of the family's `extra_experts`)."""
    dims: dict[tuple[str, ...], tuple[int, int]] = {}
    nums: dict[int, int] = {}
    ranks: dict[int, int] = {}
    for depth, roles in assign.items():
        a, b = wrappers[depth]["A"], wrappers[depth]["B"]
        folded, inn = a.shape
        out = b.shape[0]
        if orientation == OUT_IN:
            inn, out = out, inn
        param = name_of.get(roles, "/".join(roles))
        if targeted and roles not in targeted:
            return False, f"target_parameters does not list {param}", 0, {}, {}
        if out % len(roles):
            return False, f"{b.name} has {out} rows, which do not split into {len(roles)} roles of {param}", 0, {}, {}
        per_out = out // len(roles)
        want_out, want_in = ctx.expected(roles[0])
        if (want_out is not None and per_out != want_out) or (want_in is not None and inn != want_in):
            return False, f"{param} needs [out, in] = [{want_out}, {want_in}] per role", 0, {}, {}
        dims[roles] = (per_out, inn)
        key = module_key(prefix, "experts", param)
        r = pattern_value(ctx.adapter_config.get("rank_pattern"), key, ctx.adapter_config.get("r"))
        if isinstance(r, int) and r > 0:
            if folded % r:
                return False, f"{a.name} dim 0 = {folded} is not a multiple of r = {r}", 0, {}, {}
            num = folded // r
        elif ctx.base_experts:
            num = (ctx.role_counts or {}).get(roles[0], ctx.base_experts)
            if folded % num:
                return False, f"{a.name} dim 0 = {folded} is not a multiple of E = {num}", 0, {}, {}
            r = folded // num
        else:
            raise ConversionError(
                f"{ctx.where}: adapter_config.json has no rank r, so the expert count folded into {a.name!r} "
                f"{list(a.shape)} is unknown; pass --base-config"
            )
        nums[depth] = num
        ranks[depth] = r
    plain = {nums[d] for d, roles in assign.items() if not ctx.extra_key(roles[0])}
    if len(plain) > 1:
        return False, (f"the wrappers imply different expert counts {sorted(set(nums.values()))}"
                       + ctx.other_table({r: nums[x] for x, rs in assign.items() for r in rs})), 0, {}, {}
    num = plain.pop() if plain else min(nums.values())
    if ctx.role_counts and ctx.base_experts:
        num = ctx.base_experts
    for d, roles in assign.items():
        want = (ctx.role_counts or {}).get(roles[0], num) if ctx.base_experts else num
        if ctx.extra_key(roles[0]) and not ctx.base_experts:
            want = max(want, nums[d])  # E + the extra experts, whatever their number
        if nums[d] != want:
            key = ctx.extra_key(roles[0])
            return False, (f"{name_of.get(roles, '/'.join(roles))} holds {nums[d]} experts, expected {want}"
                           + (f" (E + {key})" if key else " (E)")
                           + ctx.other_table({r: nums[x] for x, rs in assign.items() for r in rs})), 0, {}, {}
    sides: dict[bool, tuple[tuple[str, ...], tuple[int, int]]] = {}
    for roles, d in dims.items():
        output = ctx.is_output(roles[0])
        if output is not None:
            sides.setdefault(output, (roles, d))
            if d != sides[output][1]:
                return False, f"{name_of.get(roles)} and {name_of.get(sides[output][0])} differ in [out, in]", 0, {}, {}
    if True in sides and False in sides:
        (i_roles, (i_out, i_in)), (o_roles, (o_out, o_in)) = sides[False], sides[True]
        if (i_out, i_in) != (o_in, o_out):
            return False, (f"{name_of.get(i_roles)} [out, in] = [{i_out}, {i_in}] is not the transpose of "
                           f"{name_of.get(o_roles)}'s [{o_out}, {o_in}]"), 0, {}, {}
    return True, "", num, ranks, {role: nums[d] for d, roles in assign.items() for role in roles}


def _shared(ctx: _Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    by: dict[tuple[str, str], TensorInfo] = {}
    for name, info in items.items():
        m = _SHARED_RX.match(name)
        assert m
        role = ctx.roles_of_proj[m["proj"]]
        if (role, m["f"]) in by:
            raise ConversionError(f"{ctx.where}: tensors {by[(role, m['f'])].name!r} and {name!r} are both {role} lora_{m['f']}")
        by[(role, m["f"])] = info
    roles = sorted({r for r, _ in by}, key=ctx.roles.index)
    dim0 = {info.shape[0] for info in by.values()} - {1}
    if len(dim0) > 1:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: 3-D expert LoRA tensors have dim 0 in {sorted(dim0 | {1})}; expected 1 (shared) "
            "or the number of experts E"
        )
    num = dim0.pop() if dim0 else ctx.base_experts
    if num is None:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: every 3-D expert LoRA tensor has dim 0 = 1, so the number of experts is "
            "unknown; pass --base-config"
        )
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors = []
    for role in roles:
        a, b = by.get((role, "A")), by.get((role, "B"))
        if a is None or b is None:
            have = a or b
            raise ConversionError(
                f"{ctx.where}: tensor {have.name!r} has no lora_{'B' if b is None else 'A'} partner in layer {prefix}"  # type: ignore[union-attr]
            )
        _, r, inn = a.shape
        _, out, rb = b.shape
        if rb != r:
            raise ConversionError(
                f"{ctx.where}: tensor {b.name!r} has shape {list(b.shape)}; expected [E or 1, out, {r}] to match "
                f"{a.name!r} {list(a.shape)} ([E or 1, r, in])"
            )
        role_rank[role], role_dims[role] = r, (out, inn)
        factors.append(LoraFactor(a.name, (role,), "A", None, a.shape, a.dtype, shared=a.shape[0] == 1 and num != 1))
        factors.append(LoraFactor(b.name, (role,), "B", None, b.shape, b.dtype, shared=b.shape[0] == 1 and num != 1))
    return _summary(ctx, prefix, "shared_w123", num, role_rank, role_dims, factors, needs_order=False)


def _grouped(ctx: _Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    by: dict[tuple[str, str], TensorInfo] = {}
    for name, info in items.items():
        m = _GROUPED_RX.match(name)
        assert m
        if len(info.shape) != 3:
            raise ConversionError(
                f"{ctx.where}: tensor {name!r} has shape {list(info.shape)}; expected 3-D ([E, in, r] for A, [E, r, out] "
                "for B)"
            )
        by[(m["which"], m["f"])] = info
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors = []
    nums = set()
    inputs, outputs = ctx.sides()
    for which, roles in ((GROUPED_INPUTS, inputs), (GROUPED_OUTPUT, outputs[:1])):
        a, b = by.get((which, "A")), by.get((which, "B"))
        if a is None and b is None:
            continue
        if a is None or b is None:
            have = a or b
            raise ConversionError(
                f"{ctx.where}: tensor {have.name!r} has no lora_{which}_{'B' if b is None else 'A'} partner in {prefix}"  # type: ignore[union-attr]
            )
        e_a, inn, r = a.shape
        e_b, rb, out = b.shape
        if e_a != e_b or rb != r:
            raise ConversionError(
                f"{ctx.where}: tensor {b.name!r} has shape {list(b.shape)}; expected [{e_a}, {r}, out] to match "
                f"{a.name!r} {list(a.shape)} ([E, in, r])"
            )
        if out % len(roles):
            raise ConversionError(
                f"{ctx.where}: tensor {b.name!r} {list(b.shape)}: last dim {out} does not split into {len(roles)} "
                f"roles ({'/'.join(roles)})"
            )
        nums.add(e_a)
        for role in roles:
            role_rank[role], role_dims[role] = r, (out // len(roles), inn)
        factors.append(LoraFactor(a.name, roles, "A", None, a.shape, a.dtype))
        factors.append(LoraFactor(b.name, roles, "B", None, b.shape, b.dtype))
    if len(nums) != 1:
        raise ConversionError(f"{ctx.where}: layer {prefix}: grouped LoRA tensors disagree on the expert count {sorted(nums)}")
    return _summary(ctx, prefix, "grouped", nums.pop(), role_rank, role_dims, factors, needs_order=len(inputs) > 1 and inputs[0] in role_rank)
