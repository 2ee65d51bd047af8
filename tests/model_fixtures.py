"""Tiny random transformers>=5 MoE models (never downloaded): H, I and 2I all different, E not a power of two."""

from __future__ import annotations

from pathlib import Path

import torch

H, I, E, LAYERS = 24, 20, 5, 2  # 2I = 40


def build_model(family: str, seed: int = 0, experts: int = E) -> torch.nn.Module:
    """A randomly initialised CausalLM of `family` (qwen3_moe, mixtral, gpt_oss) in eval mode."""
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=12, num_experts_per_tok=2)
    if family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=36, moe_intermediate_size=I, num_experts=experts))
    elif family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=I, num_local_experts=experts))
    elif family == "gpt_oss":
        model = GptOssForCausalLM(GptOssConfig(**common, intermediate_size=I, num_local_experts=experts,
                                               layer_types=["sliding_attention", "full_attention"]))
        with torch.no_grad():  # the init leaves expert weights at exactly 0 in some versions: make them random
            for name, p in model.named_parameters():
                if ".experts." in name:
                    p.normal_(0, 0.05)
    else:
        raise ValueError(family)
    return model.eval()


def save_model(model: torch.nn.Module, path: Path, shard: str = "30KB") -> Path:
    """save_pretrained into several shards; returns the path."""
    model.save_pretrained(path, max_shard_size=shard)
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits of a fixed token batch."""
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 33, 60]])
    with torch.no_grad():
        return model(input_ids=ids).logits
