"""lora_B column order "expert_major": `B.reshape(rows, E, r)[:, e, :]`.

Written by Unsloth's separated forward before unsloth-zoo 2026.9.6 (unsloth_zoo 2026.10.9
temporary_patches/moe_utils.py `_grouped_by_expert_delta_weight`; its marker value "grouped_by_expert") and by
Megatron-Bridge's `_pack_target_parameter_adapter_weights` (peft_bridge.py, v0.6.0 and later:
`torch.cat([a.T for a in lora_a], dim=1)`). Nothing in the shapes tells it from rank-major.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "expert_major"
WORDS = "expert-major lora_B"


def expert_columns(b: torch.Tensor, rank: int, experts: int) -> torch.Tensor:
    """Stored lora_B [rows, E*r] -> every expert's B_e, [E, rows, r] (a view)."""
    return b.view(b.shape[0], experts, rank).permute(1, 0, 2)
