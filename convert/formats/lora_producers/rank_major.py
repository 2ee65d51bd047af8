"""lora_B column order "rank_major": peft's own reading, `B.reshape(rows, r, E)[:, :, e]` (every peft from 0.17 to
0.21, `ParamWrapper.get_delta_weight`), and vLLM's 3-D loader's (`_stack_moe_lora_weights`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "rank_major"
WORDS = "rank-major lora_B"


def expert_columns(b: torch.Tensor, rank: int, experts: int) -> torch.Tensor:
    """Stored lora_B [rows, r*E] -> every expert's B_e, [E, rows, r] (a view)."""
    return b.view(b.shape[0], rank, experts).permute(2, 0, 1)
