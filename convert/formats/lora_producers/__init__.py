"""How a producer packed a peft `target_parameters` (ParamWrapper) expert LoRA: one module per packing variant.

A fused expert wrapper's saved tensors have two properties its shapes do not always reveal (FORMATS.md, "LoRA
adapters", 5.); each value is a module of its own, holding its words, its shapes and its compute (expert e's
nn.Linear-form lora_A [r, in] / lora_B [out, r] from the stored factors):

- orientation: `peft_current` ("in_out", peft >= 0.19.1: lora_A [E*r, in], lora_B [out, E*r]) and `peft_legacy`
  ("out_in", peft < 0.19.1, NeMo AutoModel `legacy_paramwrapper_layout=True`, Megatron-Bridge's packed export:
  lora_A [E*r, out], lora_B [in, E*r], delta_e = (B_e @ A_e)^T);
- lora_B column order: `rank_major` (peft's `B.view(out, r, E)[:, :, e]`) and `expert_major`
  (`B.view(out, E, r)[:, e, :]`: Unsloth before unsloth-zoo 2026.9.6, Megatron-Bridge's packed export).

`evidence` decides which ones a file holds from adapter_config.json (`peft_version`, Unsloth's `lora_B_layout`
marker), or says why it cannot. A new producer's packing is a new module listed in ORIENTATIONS or ORDERS.
This package names no model: only config keys and the producers' own marker values.
"""

from __future__ import annotations

from convert.formats.lora_producers import expert_major, peft_current, peft_legacy, rank_major
from convert.formats.lora_producers.evidence import (
    FLIP_VERSION,
    MARKER_DETAIL_KEY,
    MARKER_KEY,
    MARKER_VALUES,
    BOrder,
    b_order,
    declared_b_order,
    describe,
    marker_fix,
    peft_version,
    stamp_current,
    unsloth_unmarked,
    version_orientation,
)

IN_OUT, OUT_IN = peft_current.NAME, peft_legacy.NAME
RANK_MAJOR, EXPERT_MAJOR = rank_major.NAME, expert_major.NAME
ORIENTATIONS = {m.NAME: m for m in (peft_current, peft_legacy)}  # tried in this order where shapes decide
ORDERS = {m.NAME: m for m in (rank_major, expert_major)}

__all__ = [
    "IN_OUT", "OUT_IN", "RANK_MAJOR", "EXPERT_MAJOR", "ORIENTATIONS", "ORDERS", "FLIP_VERSION", "MARKER_KEY",
    "MARKER_DETAIL_KEY", "MARKER_VALUES", "BOrder", "b_order", "declared_b_order", "describe", "marker_fix",
    "peft_version", "stamp_current", "unsloth_unmarked", "version_orientation",
]
