"""What each target (configs/targets: vLLM, SGLang, peft, the per-expert layout) does with an adapter as it is, and
the command that fixes it.

The verdict per target (`AsIs`) is one of:
- `load`: its loader takes the adapter and applies every delta as peft would;
- `refuse`: its loader raises (or, for a scaling key it ignores, convert.targets.check counts the changed delta
  as a refusal too: docs/SERVERS.md, "What is refused");
- `load_and_drop_deltas`: it loads without an error and never applies some modules' LoRA (`misnamed_dropped`:
  vLLM's leaf-only name check, e.g. peft's raw fused Mixtral adapter, bench/results/CONSUMERS.md (c));
- `load_wrong_deltas`: it loads and applies other deltas than the producer trained: a peft wrapper in another
  producer's packing (convert.formats.lora_producers) whose shapes fit peft 0.21's reading (expert-major lora_B,
  or an older orientation with in == out), read rank-major in peft 0.21's orientation by peft
  (`ParamWrapper.get_delta_weight`) and by vLLM's 3-D loader (`_stack_moe_lora_weights`).
The rules are data (configs/targets/*.json, applied by convert.targets.check to metadata only; tests/server_rules.py
emulates the servers' loaders from their sources). The fix is planned (convert.plan.adapter.plan_fix, metadata
only) and its output checked against the same rules: a command is offered only where the target would load that
output; otherwise `no_fix` says why (the conversion's refusal, or what the target would still refuse).
"""

from __future__ import annotations

from collections import Counter
from enum import Enum
from typing import Any

from convert.errors import ConversionError
from convert.formats.adapter_dir import ADAPTER_CONFIG, is_lora, lora_kind, lora_module
from convert.formats.adapter_layouts import ExpertLoraGroup
from convert.formats.adapter_source import ADAPTER_WEIGHTS, AdapterSource
from convert.formats.lora_producers import IN_OUT, ORIENTATIONS, RANK_MAJOR
from convert.formats.safetensors import TensorInfo
from convert.plan.adapter import plan_fix
from convert.targets.check import REFUSE, SERVER, WARN, check_adapter, dropped_modules
from convert.targets.rules import TARGETS, TargetRules, load_target

PEFT_LAYOUT = "peft"  # a target's expert_layout that takes peft wrappers as they are (configs/targets)


class AsIs(str, Enum):
    """What a target does with the adapter as it is."""

    LOAD = "load"
    REFUSE = "refuse"
    LOAD_AND_DROP = "load_and_drop_deltas"
    LOAD_WRONG = "load_wrong_deltas"


WORDS = {AsIs.LOAD: "loads", AsIs.REFUSE: "refused",
         AsIs.LOAD_WRONG: "loads, and applies other expert deltas than the adapter holds"}


def odd_packings(groups: list[ExpertLoraGroup]) -> list[ExpertLoraGroup]:
    """The peft wrapper layers packed otherwise than peft 0.21 reads them (older shapes, expert-major lora_B)."""
    return [g for g in groups if g.target_param and (g.orientation, g.b_order) != (IN_OUT, RANK_MAJOR)]


def _fits_peft(g: ExpertLoraGroup) -> bool:
    """Whether layer `g`'s stored wrappers have the shapes peft 0.21 reads (lora_A [E*r, in], lora_B [out, E*r])."""
    for roles, _ in g.target_param:
        out, inn = g.dims_of(roles[0])
        stored = ORIENTATIONS[g.orientation].stored_dims(out * len(roles), inn)
        if stored != ORIENTATIONS[IN_OUT].stored_dims(out * len(roles), inn):
            return False
    return True


def target_verdicts(
    family: str | None, config: dict[str, Any], tensors: dict[str, TensorInfo], files: list[str],
    num_experts: int | None, model_type: str | None = None, where: str | None = None,
    groups: list[ExpertLoraGroup] | None = None, src: AdapterSource | None = None, base_config_flag: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Per target (configs/targets): {"as_is" (AsIs), "loads", "refusals", "warnings", "source"} of this adapter as
    is, for a base model of `family` and (when known) config.json `model_type`; where it does not load as peft would,
    "fix" (the command(s), checked as the module docstring says) or "no_fix" (why none). A target that drops deltas
    also gets "drops" (the findings) and "verdict" ("loads, and drops every expert and router delta").

    `groups`: the adapter's expert-LoRA layers (their packing); `src`: the adapter opened for conversion (None: no
    fix is planned); `where`: the adapter as the user wrote it; `base_config_flag`: the --base-config inspect got.
    """
    shapes = {n: (t.shape, t.dtype) for n, t in tensors.items()}
    odd = odd_packings(groups or [])
    out: dict[str, dict[str, Any]] = {}
    for name in TARGETS:
        rules = load_target(name).for_family(family, model_type)
        found = check_adapter(rules, config, shapes, files, num_experts)
        refusals = [f.message for f in found if f.severity == REFUSE and not f.drop]
        warnings = [f.message for f in found if f.severity == WARN]
        drops = [f.message for f in found if f.severity == REFUSE and f.drop]
        wrong, server = False, SERVER.get(name, name)
        if odd and not refusals and rules.expert_layout == PEFT_LAYOUT:  # takes the wrappers as they are
            unfit = [g for g in odd if not _fits_peft(g)]
            if unfit:
                refusals.append(
                    f"{unfit[0].prefix}.experts: peft expert LoRA packed as {unfit[0].producer}; {server} reads lora_A "
                    "[E*r, in] and lora_B [out, E*r] (peft >= 0.19.1's shapes), which these are not: it cannot load them "
                    "(peft 0.21: a size mismatch in load_state_dict)")
            else:
                wrong = True
                warnings.append(
                    f"expert LoRA packed as {odd[0].producer}: its shapes are peft 0.21's, so {server} loads it and reads "
                    + ("every expert's delta from the wrong columns" if odd[0].b_order != RANK_MAJOR
                       else "every expert's delta transposed"))
        as_is = (AsIs.REFUSE if refusals else AsIs.LOAD_AND_DROP if drops else AsIs.LOAD_WRONG if wrong else AsIs.LOAD)
        entry: dict[str, Any] = {"as_is": as_is.value, "loads": as_is is not AsIs.REFUSE, "refusals": refusals,
                                 "warnings": warnings, "source": rules.source}
        if as_is is AsIs.LOAD_AND_DROP:  # loads without an error, and never applies these modules' LoRA
            entry.update(drops=drops, verdict=_drop_verdict(dropped_modules(rules, shapes), shapes))
        if as_is is not AsIs.LOAD:
            entry.update(_fix(src, name, rules, num_experts, where or "SRC", base_config_flag))
        out[name] = entry
    return out


def words(entry: dict[str, Any]) -> str:
    """A target's verdict in words, as the text report prints it."""
    return entry.get("verdict") or WORDS[AsIs(entry["as_is"])]


def _fix(src: AdapterSource | None, target: str, rules: TargetRules, num_experts: int | None, where: str,
         base_config_flag: str | None) -> dict[str, Any]:
    """{"fix": command(s)} where planning the conversion for `target` succeeds and `rules` find nothing in its output
    that the target would refuse or drop, else {"no_fix": why}."""
    if src is None:
        return {"no_fix": "not planned for a single file: inspect the adapter directory"}
    try:
        steps, plan = plan_fix(src, target)
    except ConversionError as exc:
        return {"no_fix": f"the conversion refuses: {exc}"}
    written = {t.name: (t.shape, t.dtype) for t in plan.targets}
    left = [f.message for f in check_adapter(rules, plan.config, written, [ADAPTER_WEIGHTS, ADAPTER_CONFIG], num_experts)
            if f.severity == REFUSE]
    commands = []
    for i, (tool, flags) in enumerate(steps):
        dst = "OUT" if i == len(steps) - 1 else "PER_EXPERT"
        line = f"python -m convert.{tool} {' '.join(flags)} --src {where if i == 0 else 'PER_EXPERT'} --dst {dst}"
        commands.append(line + (f" --base-config {base_config_flag}" if base_config_flag else ""))
    if left:
        return {"no_fix": f"{' && '.join(commands)} would still leave: {left[0]}"}
    return {"fix": " && ".join(commands)}


def _drop_verdict(dropped: list[str], tensors: dict[str, Any]) -> str:
    """"loads, and drops every expert and router delta" (or "some", or the kinds it drops), from the LoRA modules
    the target loads and never applies."""
    def kind(module: str) -> str:
        return "expert" if ".experts" in module + "." else lora_kind(module + ".lora_A.weight").removesuffix("_lora")

    everything = {kind(lora_module(n)) for n in tensors if is_lora(n)}
    held = Counter(kind(lora_module(n)) for n in tensors if is_lora(n) and n.endswith(".lora_A.weight"))
    lost = Counter(kind(m) for m in dropped)
    found = [("every " if lost[k] == held[k] else "some ") + k for k in ("expert", "router", "attention", "other")
             if lost[k] and k in everything]
    if len(found) == 2 and found[0].split()[0] == found[1].split()[0]:
        found = [f"{found[0]} and {found[1].split()[1]}"]
    return "loads, and drops " + ", ".join(found) + " delta"


def packing_fix(where: str) -> str:
    """The command that reads any packing exactly: split to per-expert (then fuse for peft 0.21 where wanted)."""
    return f"python -m convert.split_adapter --src {where} --dst OUT --target per-expert"


__all__ = ["AsIs", "target_verdicts", "odd_packings", "words", "packing_fix"]
