"""Orientation "out_in": peft < 0.19.1 (read in peft 0.19.0, `ParamWrapper._get_in_out_features` / `update_layer` /
`get_delta_weight`: in = the parameter's dim 1, out = dim 2, swapped only for `is_transposed`), NeMo AutoModel's
`legacy_paramwrapper_layout=True`, Megatron-Bridge's packed export: lora_A [E*r, out], lora_B [in, E*r]; the
expert's delta is (B_e @ A_e)^T, so its nn.Linear-form lora_A is B_e^T and its lora_B A_e^T.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "out_in"
WORDS = "peft < 0.19.1 shapes (lora_A [E*r, out], lora_B [in, E*r])"


def stored_dims(out: int, inn: int) -> tuple[int, int]:
    """(lora_A columns, lora_B rows) of a wrapper whose experts compute [out, in] (`out` over every role)."""
    return out, inn


def linear_dims(a_cols: int, b_rows: int) -> tuple[int, int]:
    """(out, in) of the experts' Linear from the stored lora_A columns and lora_B rows."""
    return a_cols, b_rows


def to_linear(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts' stored (A_e [n, r, out], B_e [n, in, r]) -> nn.Linear-form (lora_A [n, r, in], lora_B [n, out, r])."""
    return b.transpose(1, 2), a.transpose(1, 2)
