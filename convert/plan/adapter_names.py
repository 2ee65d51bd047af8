"""Names of adapter tensors under a target's naming: the family's renames applied to every key.

peft names a LoRA tensor `base_model.model.<module>.lora_A.weight`; `<module>` is a module path
of the base model, in one of two namings (convert.families.names): "model" (transformers' names,
renames applied, e.g. Mixtral's `mlp.gate`) or "checkpoint" (the per-expert checkpoint's names,
renames undone, `block_sparse_moe.gate`). A rename rule is written for tensor names, so a module
is renamed as its `<module>.weight` would be (a rule that renames the tensor `<module>.weight` into
something not ending in `.weight`, e.g. `mlp.gate.weight` -> `mlp.gate_weight`, is not a module rename). Keys are first brought to model naming (from the
source's naming), then to the target's; `base_model.model.` stays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from convert.families import Family, template_regex
from convert.formats.adapter_dir import lora_module
from convert.formats.adapter_layouts import PEFT_PREFIX, ExpertLoraGroup

MODEL, CHECKPOINT = "model", "checkpoint"
_WEIGHT = ".weight"
_PER_EXPERT = re.compile(r"\.experts\.\d+\.([^.]+)$")


def _split_prefix(name: str) -> tuple[str, str]:
    return (PEFT_PREFIX, name[len(PEFT_PREFIX):]) if name.startswith(PEFT_PREFIX) else ("", name)


@dataclass(frozen=True)
class KeyNames:
    """Renames keys of one adapter from its naming (`source`) to a target's naming (`target`).

    `family` None (unknown base model) renames nothing. `leaves`: (leaf, new leaf) of per-expert projection
    modules (`...experts.{e}.<leaf>`) the target names otherwise than the family (its `expert_names`).
    """

    family: Family | None
    source: str
    target: str
    leaves: tuple[tuple[str, str], ...] = ()

    def _module_to(self, module: str, to_model: bool) -> str:
        assert self.family is not None
        head, body = _split_prefix(module)
        renamed = (self.family.to_model if to_model else self.family.to_disk)(body + _WEIGHT)
        if not renamed.endswith(_WEIGHT):  # a rule of the weight tensor's own name (`gate_weight`), not of the module
            return module
        return head + renamed[: -len(_WEIGHT)]

    def canonical_module(self, module: str) -> str:
        """A module path of the source (with or without `base_model.model.`) in model naming."""
        if self.family is None or self.source == MODEL:
            return module
        return self._module_to(module, True)

    def out_module(self, module: str) -> str:
        """A module path in model naming -> the target's naming."""
        if self.family is None:
            return module
        out = module if self.target == MODEL else self._module_to(module, False)
        m = _PER_EXPERT.search(out) if self.leaves else None
        if m:
            new = dict(self.leaves).get(m[1])
            if new is not None:
                out = out[: m.start(1)] + new
        return out

    def module(self, module: str) -> str:
        """A module path of the source -> the target's naming."""
        return self.out_module(self.canonical_module(module))

    def key(self, name: str) -> str:
        """A tensor name of the source -> the target's naming (a LoRA factor's module renamed, else the whole name)."""
        if self.family is None:
            return name
        module = lora_module(name)
        if module != name:
            return self.module(module) + name[len(module):]
        head, body = _split_prefix(name)
        if self.source == CHECKPOINT:
            body = self.family.to_model(body)
        if self.target == CHECKPOINT:
            body = self.family.to_disk(body)
        return head + body


def source_naming(family: Family | None, groups: list[ExpertLoraGroup], names: list[str]) -> str:
    """The naming of a source adapter: "checkpoint" or "model".

    Fused expert-LoRA layouts (peft target_parameters, grouped, shared w1/w2/w3) are trained on
    transformers' modules: model naming. Per-expert keys say it when the family's per-expert
    templates differ between the namings (Mixtral's `block_sparse_moe.experts.{e}.w1`); where they
    agree, a key that a rename would change (nemotron_h's `backbone.`) marks checkpoint naming.
    """
    if family is None:
        return MODEL
    if any(g.pattern != "per_expert" for g in groups):
        return MODEL
    expert_names = [f.name for g in groups for f in g.factors]
    model_rx = [template_regex(_strip(t)) for t in family.expert_templates.values()]
    disk_rx = [template_regex(_strip(t)) for t in family.per_expert.values()]
    if expert_names and model_rx != disk_rx:
        module = lora_module(_split_prefix(expert_names[0])[1])
        if any(rx.match(module) for rx in disk_rx) and not any(rx.match(module) for rx in model_rx):
            return CHECKPOINT
        return MODEL
    for name in names:
        body = _split_prefix(lora_module(name))[1] + _WEIGHT
        if family.to_model(body) != body:
            return CHECKPOINT
    return MODEL


def _strip(template: str) -> str:
    return template[: -len(_WEIGHT)] if template.endswith(_WEIGHT) else template


def expert_prefix(family: Family, names: KeyNames, group_prefix: str) -> str | None:
    """The family template `{prefix}` (model naming, `base_model.model.` kept) of a group whose path before
    `.experts` is `group_prefix` (source naming); None when it fits none of the family's expert modules."""
    canonical = names.canonical_module(group_prefix + ".experts")
    m = template_regex(family.experts_path).match(canonical)
    return m["prefix"] if m else None


__all__ = ["CHECKPOINT", "MODEL", "KeyNames", "expert_prefix", "source_naming"]
