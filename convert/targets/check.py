"""Would a server load this adapter? The rules of a target (convert.targets.rules) applied to metadata.

`check_adapter(rules, config, tensors, files)` takes the target's rules for the base model's
family, the adapter's adapter_config.json, its tensors as name -> (shape, dtype) (headers only)
and the names of the files in its directory, and returns the findings: `refuse` for what the
server rejects, or loads into a different model than peft would (a LoRA it drops, a scaling it
ignores), `warn` for what a server flag fixes (a rank above the default limit). Model-agnostic:
the family's names come from configs/families, the server's behaviour from configs/targets;
docs/SERVERS.md cites the server source of each rule.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families.family import Family
from convert.families.registry import family_by_name
from convert.targets.rules import TargetRules

REFUSE = "refuse"
WARN = "warn"
SAFETENSORS = "adapter_model.safetensors"
INDEX = "adapter_model.safetensors.index.json"
ROLES = ("gate", "up", "down")
CANONICAL = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
W123 = {"w1": "gate", "w3": "up", "w2": "down"}
PEFT_PREFIX = "base_model.model."
SERVER = {"vllm": "vLLM 0.33", "sglang": "SGLang 0.5.23", "peft": "peft 0.21", "per-expert": "the per-expert layout"}

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBED = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")
_PER_EXPERT = re.compile(r"^(?P<moe>.+)\.experts\.(?P<e>\d+)\.(?P<leaf>[^.]+)$")
_PEFT_3D = re.compile(r"^(?P<moe>.+)\.experts(?P<base>\.base_layer)?$")
_SHARED = re.compile(r"^(?P<moe>.+)\.experts\.(?P<leaf>w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)$")
_GROUPED = re.compile(r"\.lora_(gate_and_up|down)_[AB]$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Finding:
    """One reason: `severity` ("refuse" or "warn") and a one-line message naming the tensor/key."""

    severity: str
    message: str
    kind: str = ""  # findings of one kind on many tensors are reported once, with a count
    drop: bool = False  # a refusal because the server loads the LoRA and never applies it (rules.misnamed_dropped)


def _family(rules: TargetRules) -> Family | None:
    if rules.family is None:
        return None
    try:
        return family_by_name(rules.family)
    except ConversionError:
        return None


def expert_leaves(rules: TargetRules, family: Family | None) -> dict[str, str]:
    """The per-expert projection leaves the target's loader accepts -> role (gate/up/down)."""
    out: dict[str, str] = {}
    for kind in rules.expert_names:
        own = {leaf.removesuffix(".weight"): role for role, leaf in (family.role_leaves if family else {}).items()
               if role in ROLES}
        if kind == "checkpoint" and own:
            out.update(own)
        elif kind in ("canonical", "checkpoint"):  # a family without plain gate/up/down weights: canonical names
            out.update(CANONICAL)
        elif kind == "w123":
            out.update(W123)
    return out


def _any_leaf_role(leaf: str, family: Family | None) -> str | None:
    """The role of a per-expert leaf under any naming (to tell a misnamed projection from a foreign module)."""
    known = {**CANONICAL, **W123}
    if family is not None:
        known.update({v.removesuffix(".weight"): r for r, v in family.role_leaves.items() if r in ROLES})
    return known.get(leaf)


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _misnamed(rules: TargetRules, family: Family | None, module: str) -> str | None:
    """The name the target wants for `module` where it differs (family renames, per the target's naming)."""
    if family is None or not family.renames:
        return None
    bare = _strip(module)
    if not rules.exact_module_names:
        return None
    want = family.to_disk(bare) if rules.naming == "checkpoint" else family.to_model(bare)
    return None if want == bare else want


def _module_scale(config: dict[str, Any], module: str, rank: int | None, honour: dict[str, bool]) -> float | None:
    """The scaling of `module` as peft computes it (honour all keys) or as a target does (honour: which keys it reads)."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        return None
    name = _strip(module)
    if name.endswith(".experts.base_layer"):
        name = name.removesuffix(".base_layer") + ".gate_up_proj"
    elif name.endswith(".experts"):
        name += ".down_proj"

    def lookup(patterns: Any, default: Any) -> Any:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    if honour.get("rank_pattern", True):
        r = lookup(config.get("rank_pattern"), r)
    if honour.get("alpha_pattern", True):
        alpha = lookup(config.get("alpha_pattern"), alpha)
    rs = bool(config.get("use_rslora")) and honour.get("rslora", True)
    return alpha / math.sqrt(r) if rs else alpha / r


def check_adapter(
    rules: TargetRules, config: dict[str, Any], tensors: dict[str, tuple[Shape, str]], files: list[str],
    num_experts: int | None = None,
) -> list[Finding]:
    """The findings of target `rules` on an adapter: its adapter_config.json dict `config`, its tensors
    (name -> (shape, dtype), from the headers) and the file names of its directory. `num_experts`: E of
    the base model where known (else the adapter's largest expert index + 1, or a 3-D factor's fold)."""
    server = SERVER.get(rules.target, rules.target)
    family = _family(rules)
    out: list[Finding] = []
    out += _config_findings(rules, config, server)
    out += _file_findings(rules, files, server)
    lora, found = _tensor_findings(rules, tensors, server)
    out += found
    out += _module_findings(rules, family, lora, server)
    out += _partner_findings(rules, lora, server)
    out += _cover_findings(rules, config, lora, server)
    out += _expert_findings(rules, config, lora, family, num_experts, server)
    out += _rank_findings(rules, config, lora, num_experts, server)
    return _collapse(out)


def _tensor_findings(rules: TargetRules, tensors: dict[str, tuple[Shape, str]],
                     server: str) -> tuple[dict[str, dict[str, Shape]], list[Finding]]:
    """(LoRA module -> {"A": shape, "B": shape} of the adapter's `tensors`, the refusals of its other tensors:
    DoRA magnitudes, NeMo grouped factors, LoRA biases and full tensors the target does not load)."""
    lora: dict[str, dict[str, Shape]] = defaultdict(dict)  # module -> {"A": shape, "B": shape}
    out: list[Finding] = []
    for name, (shape, _dtype) in sorted(tensors.items()):
        m = _LORA.match(name) or _EMBED.match(name)
        if m:
            lora[m["module"]][m["ab"]] = tuple(shape)
            continue
        refusal = _tensor_refusal(rules, name, server)
        if refusal is not None:
            out.append(Finding(REFUSE, *refusal))
    return lora, out


def _tensor_refusal(rules: TargetRules, name: str, server: str) -> tuple[str, str] | None:
    """(message, kind) of the refusal of tensor `name`, not a LoRA factor, by the target; None: it loads it."""
    if "lora_magnitude_vector" in name:
        if not rules.dora:
            return f"{name}: a DoRA magnitude vector; {server} does not load DoRA adapters", "dora"
        return None
    if _GROUPED.search(name):
        return (f"{name}: NeMo grouped expert LoRA; {server} loads {_layout_text(rules)}: convert it first "
                f"(split_adapter --target {rules.target})", "grouped")
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if name.endswith(".bias") and ".lora_" in name:
        return f"{name}: a LoRA bias (lora_bias); {server} loads lora_A/lora_B weights only", "lora_bias"
    if rules.modules_to_save is not None and leaf not in rules.modules_to_save:
        return (f"{name}: a full tensor (modules_to_save or not LoRA); {server} loads only LoRA pairs"
                + (f" and full modules {list(rules.modules_to_save)}" if rules.modules_to_save else ""), "full")
    return None


def _module_findings(rules: TargetRules, family: Family | None, lora: dict[str, dict[str, Shape]],
                     server: str) -> list[Finding]:
    """The refusals of each LoRA module of `lora`: modules the target refuses, and names it would not apply."""
    out: list[Finding] = []
    for module in sorted(lora):
        for rx, why in rules.refuse_modules:
            if re.search(rx, module + "."):
                out.append(Finding(REFUSE, f"{module}: {why}", f"refuse:{rx}"))
        want = _misnamed(rules, family, module)
        if want is not None:
            out.append(Finding(REFUSE, f"{module}: {server} names this module {want} (family "
                               f"{family.name if family else '?'}, {rules.naming} names); under this name its LoRA "
                               + ("loads and is never applied" if rules.misnamed_dropped else "would not be applied"),
                               "name", drop=rules.misnamed_dropped))
    return out


def _partner_findings(rules: TargetRules, lora: dict[str, dict[str, Shape]], server: str) -> list[Finding]:
    """The refusals of LoRA on a module without LoRA on the partners the target stacks it with (`needs_with`)."""
    by_parent: dict[str, set[str]] = defaultdict(set)  # parent module -> its leaves with LoRA
    for module in lora:
        parent, _, leaf = module.rpartition(".")
        by_parent[parent].add(leaf)
    out: list[Finding] = []
    for parent, leaves in sorted(by_parent.items()):
        for leaf, partners in rules.needs_with:
            miss = [p for p in partners if leaf in leaves and p not in leaves]
            if miss:
                out.append(Finding(REFUSE, f"{parent}.{leaf}: LoRA without LoRA on {miss} of the same layer; {server} "
                                           f"stacks them and fails to load", "with"))
    return out


def _cover_findings(rules: TargetRules, config: dict[str, Any], lora: dict[str, dict[str, Shape]],
                    server: str) -> list[Finding]:
    """Where the target finds LoRA buffers through target_modules: the refusals of modules (outside the experts)
    whose leaf it does not list."""
    tm = config.get("target_modules")
    if not (rules.target_modules_cover and isinstance(tm, list)):
        return []
    named = {str(t).rsplit(".", 1)[-1] for t in tm}
    out: list[Finding] = []
    for module in sorted(lora):
        leaf = module.rsplit(".", 1)[-1]
        if ".experts." not in module + "." and leaf not in named:
            out.append(Finding(REFUSE, f"{module}: its leaf {leaf!r} is not in target_modules {sorted(named)}; "
                                       f"{server} finds a LoRA weight's buffer through target_modules", "cover"))
    return out


def _collapse(findings: list[Finding]) -> list[Finding]:
    """Findings of one kind reported once: the first, with how many more there are."""
    out: list[Finding] = []
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for f in findings:
        if not f.kind:
            out.append(f)
        elif f.kind not in first:
            first[f.kind] = len(out)
            counts[f.kind] = 0
            out.append(f)
        else:
            counts[f.kind] += 1
    for kind, i in first.items():
        if counts[kind]:
            f = out[i]
            out[i] = Finding(f.severity, f"{f.message} (and {counts[kind]} more like it)", f.kind, f.drop)
    return out


def dropped_modules(rules: TargetRules, tensors: dict[str, tuple[Shape, str]] | list[str]) -> list[str]:
    """The LoRA modules the target loads and never applies (`rules.misnamed_dropped`: modules under the other
    naming, which its loader's leaf-only name check lets through), sorted; [] for a target that refuses them."""
    if not rules.misnamed_dropped:
        return []
    family = _family(rules)
    modules = {m["module"] for m in map(_LORA.match, tensors) if m}
    return sorted(m for m in modules if _misnamed(rules, family, m) is not None)


def _layout_text(rules: TargetRules) -> str:
    return ("the peft target_parameters layout (experts.base_layer = gate_up, experts = down)"
            if rules.expert_layout == "peft" else "one LoRA pair per expert and projection")


def _config_findings(rules: TargetRules, config: dict[str, Any], server: str) -> list[Finding]:
    out: list[Finding] = []
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        out.append(Finding(REFUSE, f"adapter_config.json: missing {missing}; {server} requires r, lora_alpha and target_modules"))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        out.append(Finding(REFUSE, f"adapter_config.json: peft_type {peft_type!r}; {server} loads LoRA adapters only"))
    bias = config.get("bias", "none")
    if bias not in rules.bias:
        out.append(Finding(REFUSE, f"adapter_config.json: bias {bias!r}; {server} accepts bias {list(rules.bias)}"))
    if config.get("use_dora") and not rules.dora:
        out.append(Finding(REFUSE, f"adapter_config.json: use_dora is true; {server} does not load DoRA adapters"))
    mts = config.get("modules_to_save") or []
    if rules.modules_to_save is not None and any(m not in rules.modules_to_save for m in mts):
        bad = [m for m in mts if m not in rules.modules_to_save]
        allowed = list(rules.modules_to_save) or "none"
        out.append(Finding(REFUSE, f"adapter_config.json: modules_to_save {bad}; {server} accepts {allowed}"))
    tm = config.get("target_modules")
    if rules.target_modules_list and isinstance(tm, str) and tm not in ("all", "all-linear"):
        out.append(Finding(REFUSE, f"adapter_config.json: target_modules is the pattern {tm!r}; {server} needs a list "
                                   "of module names (or \"all\"/\"all-linear\")"))
    return out


def _file_findings(rules: TargetRules, files: list[str], server: str) -> list[Finding]:
    out: list[Finding] = []
    weights = [f for f in files if f.endswith(".safetensors")]
    if INDEX in files or (weights and SAFETENSORS not in weights):
        if not rules.sharded:
            out.append(Finding(REFUSE, f"{INDEX if INDEX in files else weights[0]}: a sharded adapter; {server} reads only "
                                       f"{SAFETENSORS} (write one file: drop --max-shard-size)"))
    elif rules.sharded and len(weights) > 1:
        out.append(Finding(WARN, f"{', '.join(sorted(weights))}: {server} loads every .safetensors file of the directory"))
    return out


def _expert_findings(rules: TargetRules, config: dict[str, Any], lora: dict[str, dict[str, Shape]],
                     family: Family | None, num_experts: int | None, server: str) -> list[Finding]:
    out: list[Finding] = []
    leaves = expert_leaves(rules, family)
    per: dict[str, dict[int, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))  # moe -> e -> role -> rank
    fused: dict[str, dict[str, Shape]] = defaultdict(dict)  # moe -> {"gate_up"|"down": A shape}
    for module, ab in lora.items():
        if rules.misnamed_dropped and _misnamed(rules, family, module) is not None:
            continue  # loaded and never applied (a "name" finding): the server's layout checks never see it
        pe, p3, sh = _PER_EXPERT.match(module), _PEFT_3D.match(module), _SHARED.match(module)
        if pe and pe["leaf"].isidentifier():
            role = leaves.get(pe["leaf"])
            if rules.expert_layout != "per_expert":
                out.append(Finding(REFUSE, f"{module}: per-expert expert LoRA; {server} loads {_layout_text(rules)} for "
                                           f"family {rules.family}",
                                   "layout"))
                continue
            if role is None:
                want = sorted(k for k in leaves)
                kind = "projection" if _any_leaf_role(pe["leaf"], family) else "module"
                out.append(Finding(REFUSE, f"{module}: expert {kind} {pe['leaf']!r}; {server} expects {want}", "leaf"))
                continue
            a = ab.get("A")
            per[pe["moe"]][int(pe["e"])][role] = a[0] if a else 0
        elif sh and len(ab.get("A", ())) == 3:
            role = {**CANONICAL, **W123}.get(sh["leaf"])
            shared = ab.get("B", (0,))[0] == 1 if role == "down" else ab["A"][0] == 1
            if not (rules.shared_outer and role is not None and shared):
                why = ("its shared factor is not of expert dim 1" if rules.shared_outer and role is not None
                       else f"{server} loads {_layout_text(rules)}")
                out.append(Finding(REFUSE, f"{module}: 3-D shared expert LoRA (experts.w1/w2/w3); {why}: convert it "
                                           f"first (split_adapter --target {rules.target})", "shared"))
        elif p3:
            if rules.expert_layout != "peft":
                out.append(Finding(REFUSE, f"{module}: fused 3-D expert LoRA (peft target_parameters); {server} loads "
                                           f"{_layout_text(rules)} for family {rules.family}", "layout3d"))
                continue
            fused[p3["moe"]]["gate_up" if p3["base"] else "down"] = ab.get("A", ())
    if per:
        out += _per_expert_roles(rules, per, num_experts, server, family)
        out += _target_modules_experts(rules, config, server)
    if fused and rules.all_roles:
        for moe, parts in sorted(fused.items()):
            for part in ("gate_up", "down"):
                if part not in parts:
                    out.append(Finding(REFUSE, f"{moe}.experts: no {part} LoRA in this layer; {server} needs both "
                                               "experts.base_layer (gate_up) and experts (down) of a layer"))
    return out


def _per_expert_roles(rules: TargetRules, per: dict[str, dict[int, dict[str, int]]], num_experts: int | None,
                      server: str, family: Family | None) -> list[Finding]:
    out: list[Finding] = []
    roles = [r for r in ROLES if family is None or r in family.role_leaves or not set(ROLES) & set(family.role_leaves)]
    for moe, experts in sorted(per.items()):
        n = num_experts if num_experts is not None else max(experts) + 1
        extra = set(family.extra_experts) if family is not None and rules.extra_experts else set()
        beyond = sorted(e for e in experts if e >= n and set(experts[e]) - extra)  # roles held by E + extra experts
        if beyond:
            out.append(Finding(REFUSE, f"{moe}.experts.{beyond[0]}: expert index {beyond[0]} but the model has E={n}"))
        if rules.all_roles:
            for e in range(n):
                miss = [r for r in roles if r not in experts.get(e, {})]
                if miss:
                    out.append(Finding(REFUSE, f"{moe}.experts.{e}: no {'/'.join(miss)} LoRA; {server} needs every "
                                               f"expert of a layer to have {'/'.join(roles)} LoRA (a zero pair "
                                               "stands in for a missing one)"))
                    break
        if rules.uniform_expert_rank:
            for role in ROLES:
                ranks = {r[role] for r in experts.values() if role in r}
                if len(ranks) > 1:
                    out.append(Finding(REFUSE, f"{moe}.experts: the experts' {role} LoRA have ranks {sorted(ranks)}; "
                                               f"{server} needs one rank per projection of a layer"))
    return out


def _target_modules_experts(rules: TargetRules, config: dict[str, Any], server: str) -> list[Finding]:
    tm = config.get("target_modules")
    if rules.target_modules_experts is None or isinstance(tm, str):
        return []
    names = {str(t).rsplit(".", 1)[-1] for t in (tm or [])}
    if rules.target_modules_experts == "experts":
        need = [] if "experts" in names else ["experts"]
    else:
        need = [] if names & {"gate_proj", "up_proj", "gate_up_proj"} else ["gate_proj", "up_proj"]
        need += [] if "down_proj" in names else ["down_proj"]
    if not need:
        return []
    return [Finding(REFUSE, f"adapter_config.json: target_modules {sorted(names)} lacks {need}; {server} wires expert "
                            "LoRA only for the modules target_modules names")]


def _rank_findings(rules: TargetRules, config: dict[str, Any], lora: dict[str, dict[str, Shape]],
                   num_experts: int | None, server: str) -> list[Finding]:
    out: list[Finding] = []
    r = config.get("r")
    ranks: dict[str, int] = {}
    for module, ab in lora.items():
        a = ab.get("A")
        if not a:
            continue
        rank = a[0] if len(a) == 2 else a[-2]
        if _PEFT_3D.match(module) and len(a) == 2 and num_experts:
            rank = a[0] // num_experts
        ranks[module] = rank
    if isinstance(r, int) and rules.fixed_rank:
        off = sorted(m for m, k in ranks.items() if k != r)
        if off:
            out.append(Finding(REFUSE, f"{off[0]}: LoRA rank {ranks[off[0]]} (and {len(off) - 1} more) but r = {r}; "
                                       f"{server} cuts every LoRA tensor by r"))
    declared = [v for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int)]
    top = max([*ranks.values(), *([r] if isinstance(r, int) else []), *declared], default=0)
    if rules.max_rank is not None and top > rules.max_rank:
        flag = f" (raise it with {rules.max_rank_flag} {top} or more)" if rules.max_rank_flag else ""
        out.append(Finding(WARN, f"LoRA rank {top} is above {server}'s default limit {rules.max_rank}{flag}"))
    honour = {"rank_pattern": rules.rank_pattern, "alpha_pattern": rules.alpha_pattern, "rslora": rules.rslora}
    for module in sorted(ranks):
        expert = ".experts." in module + "." and rules.rslora and not rules.rslora_experts
        peft_scale = _module_scale(config, module, ranks[module], {})
        target_scale = _module_scale(config, module, ranks[module], {**honour, "rslora": honour["rslora"] and not expert})
        if peft_scale is not None and target_scale is not None and not math.isclose(peft_scale, target_scale, rel_tol=1e-6):
            keys = [k for k in ("rank_pattern", "alpha_pattern", "use_rslora") if config.get(k)]
            out.append(Finding(REFUSE, f"{module}: scaling {peft_scale:g} in peft but {target_scale:g} in {server}, which "
                                       f"ignores {keys}; rescale lora_B (split_adapter --target {rules.target} does)"))
            break
    return out


def refusals(findings: list[Finding]) -> list[str]:
    """The messages of the findings that make the server refuse (or silently change) the adapter."""
    return [f.message for f in findings if f.severity == REFUSE]
