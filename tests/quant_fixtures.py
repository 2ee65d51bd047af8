"""Tiny quantized checkpoints written the way the released ones are: FP8 block-scaled experts.

FP8 (DeepSeek-V3 / Qwen3 FP8 releases): every quantized `X.weight` is float8_e4m3fn with a sibling
`X.weight_scale_inv` [ceil(out/128), ceil(in/128)] (F32, BF16 or E8M0) and config.json carries
`quantization_config = {quant_method: fp8, weight_block_size: [128, 128]}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BLOCK = 128
FP8_MAX = 448.0


def fp8_quantize(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize `w` [out, in] in 128x128 blocks (edge blocks ragged): (fp8 weight, scale_inv grid).

    `scale_inv[i, j]` is the block's amax / 448, so `fp8 * scale_inv` (in fp32) is the dequantized value.
    """
    out, inp = w.shape
    rows, cols = math.ceil(out / BLOCK), math.ceil(inp / BLOCK)
    scale = torch.empty(rows, cols, dtype=torch.float32)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s = blk.abs().amax().clamp(min=1e-4) / FP8_MAX
            s = s.to(scale_dtype).float()  # the scale as it is stored
            scale[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (blk / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(scale_dtype)


def deepseek_v3_config(E: int = 3, H: int = 256, I: int = 200, layers: int = 2, scale_fmt: str | None = None) -> dict[str, Any]:
    """A tiny DeepSeek-V3 config.json with an FP8 quantization_config (layer 0 dense, the rest MoE)."""
    q: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"}
    if scale_fmt:
        q["scale_fmt"] = scale_fmt
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": H,
        "intermediate_size": 2 * I, "moe_intermediate_size": I, "num_hidden_layers": layers, "num_attention_heads": 2,
        "num_key_value_heads": 2, "n_routed_experts": E, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 32,
        "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "vocab_size": 64, "torch_dtype": "bfloat16",
        "quantization_config": q,
    }


def write_fp8_experts(path: Path, E: int = 3, H: int = 256, I: int = 200, layers: int = 2, seed: int = 0,
                      scale_dtype: torch.dtype = torch.float32, scale_suffix: str = "weight_scale_inv",
                      model_type: str = "deepseek_v3") -> dict[str, torch.Tensor]:
    """A per-expert FP8 checkpoint of expert layers 1..layers-1 (plus norms and a router) in `path`.

    Weights sit in one shard and their scales in another (as in the releases, a weight and its scale
    may be in different files). Returns every tensor written.
    """
    g = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for layer in range(1, layers):
        p = f"model.layers.{layer}.mlp"
        weights[f"{p}.gate.weight"] = torch.randn(E, H, generator=g).to(torch.bfloat16)
        weights[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        for e in range(E):
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                q, s = fp8_quantize(torch.randn(*shape, generator=g) * 0.05, scale_dtype)
                weights[f"{p}.experts.{e}.{proj}.weight"] = q
                scales[f"{p}.experts.{e}.{proj}.{scale_suffix}"] = s
    weights["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    # a quantized non-expert weight (attention output projection), its scale in the other shard
    q, s = fp8_quantize(torch.randn(H, I, generator=g) * 0.05, scale_dtype)
    weights["model.layers.1.self_attn.o_proj.weight"], scales[f"model.layers.1.self_attn.o_proj.{scale_suffix}"] = q, s
    path.mkdir(parents=True, exist_ok=True)
    files = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": scales}
    for f, ts in files.items():
        save_file(ts, str(path / f), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for ts in files.values() for t in ts.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, ts in files.items() for k in ts}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = deepseek_v3_config(E, H, I, layers)
    if model_type != "deepseek_v3":
        cfg.update(model_type=model_type, architectures=["Qwen3MoeForCausalLM"], num_experts=E,
                   decoder_sparse_step=1, mlp_only_layers=[0])
    (path / "config.json").write_text(json.dumps(cfg))
    return {**weights, **scales}


# MXFP4 (gpt-oss releases; transformers integrations/mxfp4.py): 32 values share one E8M0 scale byte (bias 127);
# each value is a 4-bit index into FP4_VALUES, two a byte, low nibble the even element.
FP4_VALUES = [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4_values(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random float32 values [..., G*32] representable in MXFP4: FP4 values times 2**(s - 127) per 32-group."""
    g = torch.Generator().manual_seed(seed)
    *lead, n = shape
    idx = torch.randint(0, 16, (*lead, n), generator=g)
    exp = torch.randint(120, 131, (*lead, n // 32), generator=g)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    return lut[idx] * torch.exp2(exp.repeat_interleave(32, dim=-1).float() - 127)


def mxfp4_pack(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack float32 values [..., G*32] (each group an FP4 value times a power of two) -> (blocks U8 [..., G, 16],
    scales U8 [..., G]). Raises if a value is not representable."""
    *lead, n = values.shape
    groups = values.reshape(*lead, n // 32, 32)
    amax = groups.abs().amax(dim=-1)
    # The scale makes the group's largest magnitude one of the FP4 values: 2**(floor(log2(amax)) - 2) works
    # for amax in {4, 6} * 2**k; any exponent that leaves every value in the LUT is a valid packing.
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2, torch.zeros_like(amax))
    scaled = groups / torch.exp2(exp).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    match = (scaled.unsqueeze(-1) == lut) & (torch.signbit(scaled).unsqueeze(-1) == torch.signbit(lut))
    if not bool(match.any(dim=-1).all()):
        raise ValueError("a value is not an FP4 value times its group's power of two")
    idx = match.to(torch.uint8).argmax(dim=-1).to(torch.uint8)  # [..., G, 32]
    blocks = idx[..., 0::2] | (idx[..., 1::2] << 4)
    scales = (exp + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def write_mxfp4_gpt_oss(path: Path, E: int = 3, H: int = 64, I: int = 64, layers: int = 2, seed: int = 0
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A gpt-oss checkpoint as released (fused MXFP4 experts, BF16 biases) in two shards (blocks in one,
    scales and biases in the other). Returns (every tensor written, the float32 values packed per tensor)."""
    first: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed + 1)
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp"
        for name, (rows, cols) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
            v = mxfp4_values((E, rows, cols), seed=seed + 10 * layer + len(name))
            blocks, scales = mxfp4_pack(v)
            first[f"{p}.experts.{name}_blocks"], second[f"{p}.experts.{name}_scales"] = blocks, scales
            second[f"{p}.experts.{name}_bias"] = torch.randn(E, rows, generator=g).to(torch.bfloat16)
            values[f"{p}.experts.{name}"] = v
        first[f"{p}.router.weight"] = torch.randn(E, H, generator=g).to(torch.bfloat16)
        first[f"{p}.router.bias"] = torch.randn(E, generator=g).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for f, ts in files.items():
        save_file(ts, str(path / f), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for ts in files.values() for t in ts.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: f for f, ts in files.items() for k in ts}}))
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": layers, "num_local_experts": E, "num_experts_per_tok": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 64, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                   "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (path / "config.json").write_text(json.dumps(cfg))
    return {**first, **second}, values


def save_tiny_mxfp4_gpt_oss(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A tiny random GptOss (float32; hidden and intermediate 64: MXFP4 packs 32 values a block) whose expert
    weights are MXFP4-representable, saved to `path` as released: MXFP4 blocks/scales for the experts, config
    quant_method mxfp4. Returns (the model, whose expert weights are exactly the packed values; every tensor
    saved)."""
    from transformers import AutoModelForCausalLM

    from tiny_models import tied_keys, tiny_config

    config = tiny_config("gpt_oss")
    config.hidden_size = config.intermediate_size = 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    experts = ("experts.gate_up_proj", "experts.down_proj")
    packed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for i, (k, p) in enumerate(sorted(model.named_parameters())):
            if k.endswith(experts):
                v = mxfp4_values((p.shape[0], p.shape[2], p.shape[1]), seed=i) * 2.0**-8  # [E, out, in]
                p.copy_(v.transpose(1, 2))  # gpt-oss runs [E, in, out]
                packed[f"{k}_blocks"], packed[f"{k}_scales"] = mxfp4_pack(v)
    tied = tied_keys(model)
    state = {k: t.detach().clone().contiguous() for k, t in model.state_dict().items()
             if k not in tied and not k.endswith(experts)}
    path.mkdir(parents=True, exist_ok=True)
    save_file({**state, **packed}, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (path / "config.json").write_text(json.dumps(cfg))
    return model, {**state, **packed}
