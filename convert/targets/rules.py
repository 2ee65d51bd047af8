"""Adapter targets (configs/targets/<name>.json): the layout, names and limits a consumer loads.

A target file says, for one consumer (vLLM, SGLang, peft, or a plain per-expert layout), how
the expert LoRA must be laid out and named, what its loader refuses, and which
adapter_config.json keys it honours; `families` overrides any of these for the base model's
family (e.g. the 3-D peft layout for a family the server serves fused). The rules cite the
consumer's source and version (docs/SERVERS.md). Pure data: this module reads files only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ConversionError
from convert.families.schema import parse

TARGETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "targets"
TARGETS = ("vllm", "sglang", "peft", "per-expert")
EXPERT_LAYOUTS = ("per_expert", "peft")
EXPERT_NAMES = ("checkpoint", "canonical", "w123")
OPTIONAL_RULES = ("modules_to_save", "target_modules_experts", "max_rank", "refuse_modules", "max_rank_flag", "needs_with",
                  "extra_experts", "misnamed_dropped")
NAMINGS = ("checkpoint", "model")
# The servers' own per-expert leaf names of each role (`expert_names` "canonical" and "w123"); "checkpoint"
# is the family's (configs/families). "projections" in target_modules_experts names the canonical leaves.
EXPERT_LEAVES: dict[str, dict[str, str]] = {
    "canonical": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "w123": {"gate": "w1", "up": "w3", "down": "w2"},
}
# The out features of the attention projections a `needs_with` zero partner may need, from the base model's
# config.json: <key> * head_dim (`head_dim`, else hidden_size // num_attention_heads); leaves of one key share
# their shape, so a partner present in the layer gives it first.
PARTNER_HEADS: dict[str, str] = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads",
                                 "v_proj": "num_key_value_heads"}


@dataclass(frozen=True)
class RulesSpec:
    """The rules of a target (every key optional in a `families` override).

    `expert_layout`: "per_expert" (`experts.{e}.<proj>.lora_A/B`) or "peft" (the 3-D
    target_parameters layout); `naming`: "checkpoint" (the family's per-expert checkpoint
    names: the family's renames undone, e.g. a router under its original module) or "model"
    (transformers' names, renames applied); `all_roles`: every expert of a layer must have a
    LoRA pair for every role (a missing one becomes a zero pair); `zero_rank`: the rank of
    such a zero pair: "layer" (the rank of the layer's other projections) or a number;
    `rank_pattern`/`alpha_pattern`: adapter_config keys the loader honours; `rslora_experts`:
    whether rsLoRA scaling applies to expert LoRA; `bias`: accepted `bias` values;
    `dora`: whether `use_dora` is accepted; `modules_to_save`: accepted module names (None:
    any); `sharded`: whether the loader reads a sharded adapter with an index;
    `target_modules_experts`: what target_modules must name for the experts: "experts" (the
    MoE module), "projections" (each per-expert projection leaf), or None (nothing needed);
    `max_rank`: the loader's default largest rank (None: no limit).

    Added with the rules read from the servers' source (docs/SERVERS.md):
    `expert_names`: the per-expert projection leaf names the loader maps to gate/up/down, in
    order of preference (a converter writes the first): "checkpoint" (the family's per-expert
    role leaves, e.g. Mixtral's w1/w3/w2), "canonical" (gate_proj/up_proj/down_proj), "w123"
    (w1/w3/w2 whatever the family); `uniform_expert_rank`: all experts of a layer must have the
    same rank for one projection (so a zero pair filling some experts of a projection takes
    that projection's rank; `zero_rank` applies where no expert of the layer has it);
    `fixed_rank`: every LoRA pair must have exactly adapter_config's `r` (the loader's buffers
    are sliced by `r`); `rslora`: whether `use_rslora` is honoured at all;
    `target_modules_list`: target_modules must be a list of names (or "all"/"all-linear"), not
    a regex string; `refuse_modules`: regex (searched in a tensor name) -> why the server drops
    or rejects LoRA on that module; `max_rank_flag`: the server flag that raises `max_rank`;
    `exact_module_names`: whether the loader finds modules by their full path (a module under
    the other naming is then not applied) rather than by layer index and leaf name;
    `needs_with`: leaf -> leaves a layer must also have LoRA on wherever it has LoRA on the
    first (SGLang stacks q/k/v and fails without v_proj); `target_modules_cover`: every
    non-expert LoRA module's leaf must be named in target_modules (or target_modules is
    "all"/"all-linear"): the loader finds a weight's buffer through them; `shared_outer`: the
    loader also takes the 3-D shared-outer layout (`experts.w1/w3` lora_A [1, r, H] shared,
    lora_B [E, I, r]; `experts.w2` lora_A [E, r, I], lora_B [1, H, r] shared);
    `extra_experts`: whether the loader takes LoRA for experts e >= E, held by the roles of a family's
    `extra_experts` (absent: true; a server whose expert count is the model's E says false);
    `misnamed_dropped`: with `exact_module_names`, a module under the other naming (e.g. Mixtral's experts and
    router under `mlp.` instead of `block_sparse_moe.`) passes the loader's name check, which looks at the leaf
    only, and is loaded and never applied (true), rather than refused (absent: false).
    "projections" in `target_modules_experts` means the canonical leaves gate_proj, up_proj
    and down_proj (or gate_up_proj), whatever the family calls them.
    """

    expert_layout: str | None = None
    naming: str | None = None
    all_roles: bool | None = None
    zero_rank: str | int | None = None
    rank_pattern: bool | None = None
    alpha_pattern: bool | None = None
    rslora_experts: bool | None = None
    bias: list[str] | None = None
    dora: bool | None = None
    modules_to_save: list[str] | None = None
    sharded: bool | None = None
    target_modules_experts: str | None = None
    max_rank: int | None = None
    expert_names: list[str] | None = None
    uniform_expert_rank: bool | None = None
    fixed_rank: bool | None = None
    rslora: bool | None = None
    target_modules_list: bool | None = None
    refuse_modules: dict[str, str] | None = None
    max_rank_flag: str | None = None
    exact_module_names: bool | None = None
    needs_with: dict[str, list[str]] | None = None
    target_modules_cover: bool | None = None
    shared_outer: bool | None = None
    extra_experts: bool | None = None
    misnamed_dropped: bool | None = None


@dataclass(frozen=True)
class TargetSpec:
    """A target file: its name, what it describes, the source it was read from, its rules, per-family overrides,
    and per-model-type overrides (applied after the family's: model types that share a family's tables may be
    served differently, e.g. a router the server wraps for one model and not for another)."""

    target: str
    description: str
    source: str
    rules: RulesSpec
    families: dict[str, RulesSpec] = field(default_factory=dict)
    model_types: dict[str, RulesSpec] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TargetRules:
    """The rules of one target for one family (every field resolved; see RulesSpec for their meaning)."""

    target: str
    family: str | None
    expert_layout: str
    naming: str
    all_roles: bool
    zero_rank: str | int
    rank_pattern: bool
    alpha_pattern: bool
    rslora_experts: bool
    bias: tuple[str, ...]
    dora: bool
    modules_to_save: tuple[str, ...] | None
    sharded: bool
    target_modules_experts: str | None
    max_rank: int | None
    source: str
    expert_names: tuple[str, ...] = ("checkpoint",)
    uniform_expert_rank: bool = False
    fixed_rank: bool = False
    rslora: bool = True
    target_modules_list: bool = False
    refuse_modules: tuple[tuple[str, str], ...] = ()
    max_rank_flag: str | None = None
    exact_module_names: bool = True
    needs_with: tuple[tuple[str, tuple[str, ...]], ...] = ()
    target_modules_cover: bool = False
    shared_outer: bool = False
    extra_experts: bool = True
    misnamed_dropped: bool = False

    def expert_leaf(self, role: str) -> str | None:
        """The per-expert leaf a converter writes for `role` (gate/up/down): expert_names[0]'s name, or None where
        that is "checkpoint" (the family's own leaf) or the convention has no name for the role."""
        return EXPERT_LEAVES.get(self.expert_names[0], {}).get(role)


@dataclass(frozen=True)
class Target:
    """A loaded target file."""

    spec: TargetSpec

    @property
    def name(self) -> str:
        """The target's name (vllm, sglang, peft, per-expert)."""
        return self.spec.target

    def reads_shards(self) -> bool | None:
        """Whether this target's loader reads a sharded adapter (`sharded`): True or False where its rules and every
        family and model-type override agree, None where it depends on the base model."""
        said = {self.spec.rules.sharded} | {o.sharded for o in [*self.spec.families.values(),
                                                                 *self.spec.model_types.values()] if o.sharded is not None}
        return said.pop() if len(said) == 1 else None

    def for_family(self, family: str | None, model_type: str | None = None) -> TargetRules:
        """The rules for adapters of a base model of family `family` (None: unknown family, the target's defaults)
        and, when known, config.json `model_type` (its override, if any, applies last)."""
        merged = {f.name: getattr(self.spec.rules, f.name) for f in dataclasses.fields(RulesSpec)}
        for override in (self.spec.families.get(family or ""), self.spec.model_types.get(model_type or "")):
            if override is not None:
                merged.update({k: v for k, v in dataclasses.asdict(override).items() if v is not None})
        missing = [k for k, v in merged.items() if v is None and k not in OPTIONAL_RULES]
        if missing:
            raise ConversionError(f"target {self.name!r}: rules {missing} are not given")
        mts = merged["modules_to_save"]
        return TargetRules(
            target=self.name, family=family, source=self.spec.source,
            **{**merged, "bias": tuple(merged["bias"]), "modules_to_save": None if mts is None else tuple(mts),
               "expert_names": tuple(merged["expert_names"]), "extra_experts": merged["extra_experts"] is not False,
               "misnamed_dropped": merged["misnamed_dropped"] is True,
               "refuse_modules": tuple((merged["refuse_modules"] or {}).items()),
               "needs_with": tuple((k, tuple(v)) for k, v in (merged["needs_with"] or {}).items())},
        )


def _check(spec: TargetSpec, where: str) -> None:
    """Cross-field rules of a target file (values of enumerated keys)."""
    scopes = [("rules", spec.rules), *((f"families.{k}", v) for k, v in spec.families.items()),
              *((f"model_types.{k}", v) for k, v in spec.model_types.items())]
    for scope, rules in scopes:
        if rules.expert_layout is not None and rules.expert_layout not in EXPERT_LAYOUTS:
            raise ConversionError(f"{where}: {scope}.expert_layout: {rules.expert_layout!r} is not one of {list(EXPERT_LAYOUTS)}")
        if rules.naming is not None and rules.naming not in NAMINGS:
            raise ConversionError(f"{where}: {scope}.naming: {rules.naming!r} is not one of {list(NAMINGS)}")
        zr = rules.zero_rank
        if zr is not None and zr != "layer" and not (isinstance(zr, int) and zr >= 1):
            raise ConversionError(f"{where}: {scope}.zero_rank: {zr!r} is not \"layer\" or a rank >= 1")
        names = rules.expert_names
        if names is not None and (not names or any(n not in EXPERT_NAMES for n in names)):
            raise ConversionError(f"{where}: {scope}.expert_names: {names!r} is not a non-empty list of {list(EXPERT_NAMES)}")
        for pattern in (rules.refuse_modules or {}):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConversionError(f"{where}: {scope}.refuse_modules: {pattern!r} is not a regular expression ({exc})") from exc
        tme = rules.target_modules_experts
        if tme is not None and tme not in ("experts", "projections"):
            raise ConversionError(f"{where}: {scope}.target_modules_experts: {tme!r} is not \"experts\" or \"projections\"")


@functools.cache
def load_target(name: str, directory: Path = TARGETS_DIR) -> Target:
    """The target `name` (one of TARGETS) read from `directory`; ConversionError naming the file on any error."""
    if name not in TARGETS:
        raise ConversionError(f"--target: {name!r} is not one of {', '.join(TARGETS)}")
    path = directory / f"{name}.json"
    try:
        obj: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read target file {path}: {exc}") from exc
    spec = parse(TargetSpec, obj, str(path))
    if spec.target != name:
        raise ConversionError(f"{path}: \"target\" is {spec.target!r}, expected {name!r} (the file's name)")
    _check(spec, str(path))
    return Target(spec)
