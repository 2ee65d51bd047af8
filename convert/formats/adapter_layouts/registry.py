"""The expert-LoRA layouts in detection order, and detection itself: each tensor goes to the first layout that claims
it, then each layer's tensors to that layout's `detect`.

A layout is a module of this package exposing `NAME` (the pattern a group carries), `EXAMPLE` (its keys, for the
message naming a tensor no layout claims), `claim(name, info, roles_of_proj)` (the layer prefix of a tensor of this
layout, else None) and `detect(ctx, prefix, items)` (the layer's ExpertLoraGroup, or a ConversionError naming the
tensor). convert.plan.adapter_layouts lists each one's split / fuse planning and compute steps. A new layout is a
new module listed in LAYOUTS (and its plan module there), not new branches in shared code.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from convert.errors import ConversionError
from convert.formats.adapter_layouts import grouped, peft_target_parameters, per_expert, shared_w123
from convert.formats.adapter_layouts.context import Context, natural
from convert.formats.adapter_layouts.group import ExpertLoraGroup
from convert.formats.adapter_layouts.tables import base_dims, guess_family, proj_roles
from convert.formats.safetensors import TensorInfo

# Detection order: a tensor belongs to the first layout that claims it.
LAYOUTS = (per_expert, peft_target_parameters, shared_w123, grouped)
BY_NAME = {m.NAME: m for m in LAYOUTS}
PATTERNS = tuple(BY_NAME)
_EXPERT_LORA_RX = re.compile(r"\.experts\..*lora_")


def _examples() -> str:
    shown = [m.EXAMPLE for m in LAYOUTS if m.EXAMPLE]
    return ", ".join(shown[:-1]) + ", or " + shown[-1] if len(shown) > 1 else "".join(shown)


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
        for layout in LAYOUTS:
            prefix = layout.claim(name, info, roles_of_proj)
            if prefix is not None:
                found[layout.NAME][prefix][name] = info
                break
        else:
            if _EXPERT_LORA_RX.search(name):
                raise ConversionError(
                    f"{where}: tensor {name!r} ({info.dtype} {list(info.shape)}) looks like expert LoRA but matches none "
                    f"of the known layouts ({', '.join(PATTERNS)}); expected e.g. {_examples()}"
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
    ctx = Context(where, adapter_config, guess, hidden, inter, base_e, roles_of_proj, counts, base_config, packings)
    groups = [BY_NAME[prefixes[p]].detect(ctx, p, found[prefixes[p]][p]) for p in sorted(prefixes, key=natural)]
    return groups, passthrough
