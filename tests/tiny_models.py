"""Tiny random models of every MoE model type whose per-expert checkpoints transformers fuses at load.

The list comes from the installed transformers' own table (`conversion_mapping.py`): every entry
with a `WeightConverter` whose operations include `MergeModulelist`, kept when the model type has
a causal-LM class. Nothing here knows a model by name except `OVERRIDES`, the few settings that
cannot be derived from a config class's attributes, and `with_extra_expert_rows` (a shape an older release had).

Sizes: H (hidden) = 48, I (expert intermediate) = 40, 2I = 80, dense intermediate 56, shared expert
intermediate 36, E = 5 experts (not a power of two), top-k 2, vocab 100, 3 layers (the first dense
where the config can say so).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

H, I, DENSE_I, SHARED_I, E, TOP_K, VOCAB, LAYERS = 48, 40, 56, 36, 5, 2, 100, 3
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 12
MAX_PARAMS = 2_000_000  # a bigger model means a size key of the config was missed

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k")
EXPERT_SIZE_KEYS = ("moe_intermediate_size", "expert_ffn_hidden_size", "expert_intermediate_size")
SHARED_COUNT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
SHARED_SIZE_KEYS = ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size")
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers")

# Plain size settings applied wherever a config class has the attribute.
FIXED: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": H, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM, "max_position_embeddings": 128, "model_max_length": 128,
    "ffn_hidden_size": DENSE_I, "prefix_dense_intermediate_size": DENSE_I,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 12, "v_head_dim": 12,
    "o_lora_rank": 16, "o_groups": 2,
    # sparse-attention indexers
    "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2,
    # linear attention / delta-net
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 12, "linear_num_heads": 4,
    # mamba
    "mamba_d_state": 4, "mamba_dt_rank": 8, "mamba_expand": 2,
    "ssm_state_size": 8, "mamba_num_heads": 4, "mamba_head_dim": 24, "n_groups": 2, "chunk_size": 8,
    "num_nextn_predict_layers": 0, "zero_expert_num": 2,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "decoder_sparse_step": 1,
    "moe_layer_start_index": 1, "moe_layer_interval": 1,
    "router_jitter_noise": 0.0, "input_jitter_noise": 0.0,
    # token-selection indexers, hyper-connections and n-gram embeddings
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4, "indexer_compress_ratio": 2,
    "hc_lowrank": 8, "ngram_vocab_size_base": 200, "make_ngram_vocab_size_divisible_by": 8, "split_ngram_parts": 2,
    "heads_per_ngram": 2,
}
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")

# Only where the generic rules above cannot express a model's constraints (keys are model types).
OVERRIDES: dict[str, dict[str, Any]] = {
    # attention every 2nd layer from 1, experts every 2nd layer from 0: layers 0 and 2 MoE, layer 1 dense
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 0},
    # the config has no default per-layer list to derive one from
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    # (transformers 5.25) per-layer K/V sources must name a layer of the same attention type that keeps its own
    # K/V, the first indexed-attention layer must be an indexer, head_dim a multiple of 16 and at most
    # num_attention_heads / num_key_value_heads index heads; layer 2 reads layer 1's K/V
    "kolibri1_1": {"layer_types": ["sliding_attention", "indexed_attention", "indexed_attention"], "index_layers": [1],
                   "kv_source_layers": [0, 1, 1], "head_dim": 16, "index_num_heads": 2},
}


@dataclass
class Case:
    """One model type of the table: whether it is tested, and why not."""

    model_type: str
    skip: str | None = None


def table_model_types() -> list[str]:
    """Keys of transformers' checkpoint conversion table whose converters merge per-expert tensors."""
    from transformers.conversion_mapping import _build_checkpoint_conversion_mapping
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    table = _build_checkpoint_conversion_mapping()
    return sorted(
        key for key, transforms in table.items()
        if any(isinstance(t, WeightConverter) and any(isinstance(op, MergeModulelist) for op in t.operations)
               for t in transforms or ())
    )


# Model types the tool does not convert yet, each with the reason (listed in the summary as skipped).
KNOWN_GAPS: dict[str, str] = {}


def cases() -> list[Case]:
    """Every table entry, with a skip reason for those that have no causal-LM model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for key in table_model_types():
        if key not in CONFIG_MAPPING_NAMES:
            out.append(Case(key, "a class name, not a model type (no config class)"))
        elif key not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            out.append(Case(key, "no causal-LM class (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)"))
        elif key in KNOWN_GAPS:
            out.append(Case(key, KNOWN_GAPS[key]))
        else:
            out.append(Case(key))
    return out


def _layer_list(default: list[Any], layers: int) -> list[Any]:
    """A per-layer list of `layers` entries: dense first where the list names MoE layers, then cycling
    through the distinct values of `default` (so every attention / block type of the model is built)."""
    values = list(dict.fromkeys(default))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [HEADS] * layers  # per-layer head counts
    if "dense" in values:
        rest = [v for v in values if v != "dense"] or ["dense"]
        return ["dense"] + list(itertools.islice(itertools.cycle(rest), layers - 1))
    if "sparse" in values:
        return ["dense"] + ["sparse"] * (layers - 1)
    return list(itertools.islice(itertools.cycle(values), layers))


def tiny_kwargs(model_type: str) -> dict[str, Any]:
    """Config keyword arguments that make `model_type` tiny (derived from the config class's defaults)."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    kw: dict[str, Any] = {k: v for k, v in FIXED.items() if k in defaults and not (k == "q_lora_rank" and defaults[k] is None)}
    expert_size_key = next((k for k in EXPERT_SIZE_KEYS if k in defaults), "intermediate_size")
    kw[expert_size_key] = I
    if "intermediate_size" in defaults and expert_size_key != "intermediate_size":
        kw["intermediate_size"] = DENSE_I
    kw.update({k: E for k in EXPERT_COUNT_KEYS if k in defaults})
    kw.update({k: TOP_K for k in TOP_K_KEYS if k in defaults})
    kw.update({k: 1 for k in SHARED_COUNT_KEYS if k in defaults})
    kw.update({k: SHARED_I for k in SHARED_SIZE_KEYS if k in defaults})
    kw.update({k: i for i, k in enumerate(TOKEN_ID_KEYS) if defaults.get(k) is not None})
    layer_key = next((k for k in LAYER_COUNT_KEYS if defaults.get(k) is not None), None)
    old_layers = defaults[layer_key] if layer_key else None
    if layer_key:
        kw[layer_key] = LAYERS
    if "kv_lora_rank" in defaults:  # MLA: rope part of the head, one kv head per query head
        kw["head_dim"] = kw["qk_rope_head_dim"]
        kw["num_key_value_heads"] = HEADS
        if "qk_head_dim" in defaults:
            kw["qk_head_dim"] = kw["qk_rope_head_dim"] + kw["qk_nope_head_dim"]
    if "mlp_only_layers" in defaults:
        kw["mlp_only_layers"] = [0]
    if "moe_layer_end_index" in defaults:
        kw["moe_layer_end_index"] = LAYERS - 1
    for key, value in defaults.items():
        if isinstance(value, list) and old_layers and len(value) == old_layers and key not in kw:
            kw[key] = _layer_list(value, LAYERS)
    kw.update(OVERRIDES.get(model_type, {}))
    return kw


def tiny_config(model_type: str) -> Any:
    """A tiny config of `model_type` (fp32, eager attention)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **tiny_kwargs(model_type))
    config._attn_implementation = "eager"
    return config


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of `model_type` in eval mode, every float weight distinct.

    Parameters and persistent float buffers are perturbed after init (constant inits such as norms at 1
    or zero biases would hide a swapped or misplaced tensor).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"{size} parameters (> {MAX_PARAMS}): a size setting of this config is not covered")
    persistent = set(model.state_dict())
    with torch.no_grad():
        seen: set[int] = set()
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            if name in persistent and t.is_floating_point() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                t.add_(torch.randn_like(t) * 0.02)
    return model.eval()


def tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that are tied to another key (same storage) and not saved by save_pretrained."""
    sd = model.state_dict()
    declared = set(getattr(model, "all_tied_weights_keys", None) or {})
    owner: dict[tuple[int, tuple[int, ...]], str] = {}
    tied = set()
    for key, t in sd.items():
        ident = (t.data_ptr(), tuple(t.shape))
        if ident in owner and t.numel():
            tied.add(key if key in declared or owner[ident] not in declared else owner[ident])
        else:
            owner[ident] = key
    return tied


def logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits of a fixed token batch."""
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 33, 60, 4, 21]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_extra_expert_rows(model: torch.nn.Module, key: str = "zero_expert_num") -> torch.nn.Module:
    """`model` with each experts module's `gate_up_proj` holding E + config[key] experts (E = the rows it has),
    the extra rows random: how transformers 5.23's LongcatFlashExperts allocated it (identity "zero" experts with
    gate/up rows the model never uses; 5.25 allocates E). Unchanged where it already holds them."""
    cfg = model.config
    extra = getattr(cfg, key)
    experts = cfg.n_routed_experts if hasattr(cfg, "n_routed_experts") else cfg.num_experts
    g = torch.Generator().manual_seed(3)
    for name, module in model.named_modules():
        param = getattr(module, "gate_up_proj", None)
        if name.endswith(".experts") and isinstance(param, torch.nn.Parameter) and param.shape[0] == experts:
            rows = torch.randn(extra, *param.shape[1:], generator=g, dtype=param.dtype) * 0.02
            module.gate_up_proj = torch.nn.Parameter(torch.cat([param.data, rows]))
    return model
