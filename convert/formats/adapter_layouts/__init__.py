"""Expert-LoRA layouts of adapter files, detected from safetensors metadata alone (no tensor data): one module per
layout (see FORMATS.md, "LoRA adapters"), for the experts of one MoE layer whose module path is `P.experts`
(E experts, per-expert rank r, nn.Linear orientation [out, in]):

- `per_expert`: `P.experts.{e}.<proj>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
- `peft_target_parameters`: peft `ParamWrapper` on the fused 3-D parameters, E folded into the rank:
  `P.experts.(base_layer.)*lora_A.weight` [E*r, in] (expert-major), `lora_B.weight` [out, r*E] (expert-minor);
  other producers' packings (peft < 0.19.1 shapes, expert-major lora_B) are convert.formats.lora_producers' modules.
- `shared_w123`: 3-D `P.experts.<proj>.lora_A.weight` [1|E, r, in], `.lora_B.weight` [E|1, out, r]; a dim 0 of 1
  is shared by every expert (shared-outer: Tinker, Megatron-Bridge, SkyRL; Tinker's E=1 broadcast).
- `grouped`: NeMo `P.experts.lora_gate_and_up_A` [E, H, r], `_B` [E, r, 2I], `lora_down_A` [E, I, r], `_B` [E, r, H].

`registry` lists them in detection order and detects; `group` holds what detection finds, `tables` the family
tables it reads, `context` the checks every layout shares. Projection names, which roles a fused factor holds and
their order inside it come from the family tables in configs/, so this package names no model. The split / fuse
planning and compute of each layout are its module in convert.plan (convert.plan.adapter_layouts lists them).
"""

from __future__ import annotations

from convert.formats.adapter_layouts.group import PEFT_PREFIX, ExpertLoraGroup, LoraFactor, module_key, pattern_value
from convert.formats.adapter_layouts.grouped import GROUPED_INPUTS, GROUPED_OUTPUT
from convert.formats.adapter_layouts.registry import LAYOUTS, PATTERNS, detect_expert_lora
from convert.formats.adapter_layouts.tables import (
    FamilyGuess,
    base_dims,
    family_by_name,
    fused_order,
    fused_param_roles,
    guess_family,
    lora_roles,
    lora_tensors,
    output_role,
    proj_roles,
    role_order,
)
from convert.formats.lora_producers import IN_OUT, OUT_IN, RANK_MAJOR

__all__ = [
    "PEFT_PREFIX", "ExpertLoraGroup", "LoraFactor", "module_key", "pattern_value", "GROUPED_INPUTS", "GROUPED_OUTPUT",
    "LAYOUTS", "PATTERNS", "detect_expert_lora", "FamilyGuess", "base_dims", "family_by_name", "fused_order",
    "fused_param_roles", "guess_family", "lora_roles", "lora_tensors", "output_role", "proj_roles", "role_order",
    "IN_OUT", "OUT_IN", "RANK_MAJOR",
]
