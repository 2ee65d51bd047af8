"""Orientation "in_out": peft >= 0.19.1 (huggingface/peft#3165) swaps in/out for every non-transposed 3-D parameter
(peft/tuners/lora/layer.py, `ParamWrapper.update_layer`): lora_A [E*r, in], lora_B [out, E*r], delta_e = B_e @ A_e.

What peft 0.21, vLLM's 3-D loader and every converter output of this tool read and write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "in_out"
WORDS = "peft >= 0.19.1 shapes"


def stored_dims(out: int, inn: int) -> tuple[int, int]:
    """(lora_A columns, lora_B rows) of a wrapper whose experts compute [out, in] (`out` over every role)."""
    return inn, out


def linear_dims(a_cols: int, b_rows: int) -> tuple[int, int]:
    """(out, in) of the experts' Linear from the stored lora_A columns and lora_B rows."""
    return b_rows, a_cols


def to_linear(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts' stored (A_e [n, r, a_cols], B_e [n, b_rows, r]) -> nn.Linear-form (lora_A [n, r, in], lora_B [n, out, r])."""
    return a, b
