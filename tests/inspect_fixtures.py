"""Synthetic adapter directories and base checkpoints for the inspect tests, scaled down from the surveys.

Key names and shapes follow ../shared/FORMATS.md and the seed surveys exactly (same
prefixes, same factor orientation); only the sizes are small: H hidden, I expert
intermediate, E experts (not a power of two), R per-expert rank, all distinct.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from convert.example import example_tensors, write_checkpoint

H, I, E, R, Q, KV = 24, 20, 5, 4, 32, 8  # hidden, expert intermediate, experts, rank, q_proj out, k/v_proj out
PEFT = "base_model.model."
Tensors = dict[str, torch.Tensor]


def _rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape) * 0.02).to(dtype)


def layer(l: int) -> str:
    """The adapter key prefix of decoder layer `l`."""
    return f"{PEFT}model.layers.{l}"


def lora_config(r: int = R, **extra: Any) -> dict[str, Any]:
    """An adapter_config.json of a peft LoRA adapter."""
    cfg: dict[str, Any] = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_rslora": False,
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "bias": "none",
                           "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    cfg.update(extra)
    return cfg


def write_adapter(path: Path, tensors: Tensors | None, config: dict[str, Any] | None,
                  filename: str = "adapter_model.safetensors") -> Path:
    """Write adapter_config.json (if given) and `tensors` as `filename` (if given) under `path`."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / filename))
    return path


# ------------------------------------------------------------------ tensor sets
def attention(layers: range | list[int], r: int = R, attn: str = "self_attn", projs: str = "qkvo",
              dtype: torch.dtype = torch.float32) -> Tensors:
    """Attention LoRA: `<attn>.{q,k,v,o}_proj.lora_A` [r, in] / `lora_B` [out, r]."""
    dims = {"q": (Q, H), "k": (KV, H), "v": (KV, H), "o": (H, Q)}
    out = {}
    for l in layers:
        for p in projs:
            o, i = dims[p]
            out[f"{layer(l)}.{attn}.{p}_proj.lora_A.weight"] = _rand(r, i, dtype=dtype)
            out[f"{layer(l)}.{attn}.{p}_proj.lora_B.weight"] = _rand(o, r, dtype=dtype)
    return out


def router(layers: range | list[int], r: int = R, dtype: torch.dtype = torch.float32) -> Tensors:
    """Router LoRA `mlp.gate.lora_A` [r, H], `lora_B` [E, r] (qwen survey pattern B/C)."""
    out = {}
    for l in layers:
        out[f"{layer(l)}.mlp.gate.lora_A.weight"] = _rand(r, H, dtype=dtype)
        out[f"{layer(l)}.mlp.gate.lora_B.weight"] = _rand(E, r, dtype=dtype)
    return out


def saved_modules(layers: range | list[int], gpt_oss_router: bool = False, dtype: torch.dtype = torch.float32) -> Tensors:
    """modules_to_save full tensors: layernorms, embeddings, lm_head, or gpt-oss `mlp.router.weight/bias`."""
    out: Tensors = {}
    for l in layers:
        if gpt_oss_router:
            out[f"{layer(l)}.mlp.router.weight"] = _rand(E, H, dtype=dtype)
            out[f"{layer(l)}.mlp.router.bias"] = _rand(E, dtype=dtype)
        else:
            out[f"{layer(l)}.input_layernorm.weight"] = _rand(H, dtype=dtype)
            out[f"{layer(l)}.post_attention_layernorm.weight"] = _rand(H, dtype=dtype)
    if not gpt_oss_router:
        out[f"{PEFT}model.embed_tokens.weight"] = _rand(64, H, dtype=dtype)
        out[f"{PEFT}model.norm.weight"] = _rand(H, dtype=dtype)
        out[f"{PEFT}lm_head.weight"] = _rand(64, H, dtype=dtype)
    return out


def per_expert(layers: range | list[int], r: int = R, dtype: torch.dtype = torch.float32, mlp: str = "mlp",
               projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> Tensors:
    """Per-expert LoRA (vLLM's layout): `experts.{e}.gate_proj.lora_A` [r, H], `lora_B` [I, r], ... down [r, I]/[H, r]."""
    gate, up, down = projs
    out = {}
    for l in layers:
        for e in range(E):
            p = f"{layer(l)}.{mlp}.experts.{e}"
            for proj in (gate, up):
                out[f"{p}.{proj}.lora_A.weight"] = _rand(r, H, dtype=dtype)
                out[f"{p}.{proj}.lora_B.weight"] = _rand(I, r, dtype=dtype)
            out[f"{p}.{down}.lora_A.weight"] = _rand(r, I, dtype=dtype)
            out[f"{p}.{down}.lora_B.weight"] = _rand(H, r, dtype=dtype)
    return out


def peft_target_parameters(layers: range | list[int], r: int = R, dtype: torch.dtype = torch.float32) -> Tensors:
    """peft ParamWrapper on gate_up_proj (`experts.base_layer.lora_A` [E*r, H], `lora_B` [2I, r*E]) and
    down_proj (`experts.lora_A` [E*r, I], `lora_B` [H, r*E]): the gpt-oss survey's pattern C."""
    out = {}
    for l in layers:
        p = f"{layer(l)}.mlp.experts"
        out[f"{p}.base_layer.lora_A.weight"] = _rand(E * r, H, dtype=dtype)
        out[f"{p}.base_layer.lora_B.weight"] = _rand(2 * I, r * E, dtype=dtype)
        out[f"{p}.lora_A.weight"] = _rand(E * r, I, dtype=dtype)
        out[f"{p}.lora_B.weight"] = _rand(H, r * E, dtype=dtype)
    return out


def shared_w123(layers: range | list[int], r: int = R, dtype: torch.dtype = torch.float32) -> Tensors:
    """The 3-D partially shared pattern ("Pattern A"): w1/w3 A [1, r, H] shared, B [E, I, r]; w2 A [E, r, I], B [1, H, r]."""
    out = {}
    for l in layers:
        p = f"{layer(l)}.mlp.experts"
        for w in ("w1", "w3"):
            out[f"{p}.{w}.lora_A.weight"] = _rand(1, r, H, dtype=dtype)
            out[f"{p}.{w}.lora_B.weight"] = _rand(E, I, r, dtype=dtype)
        out[f"{p}.w2.lora_A.weight"] = _rand(E, r, I, dtype=dtype)
        out[f"{p}.w2.lora_B.weight"] = _rand(1, H, r, dtype=dtype)
    return out


def grouped(layers: range | list[int], r: int = R, dtype: torch.dtype = torch.float32) -> Tensors:
    """NeMo GroupedExpertsLoRA: `lora_gate_and_up_A` [E, H, r], `_B` [E, r, 2I], `lora_down_A` [E, I, r], `_B` [E, r, H]."""
    out = {}
    for l in layers:
        p = f"{layer(l)}.mlp.experts"
        out[f"{p}.lora_gate_and_up_A"] = _rand(E, H, r, dtype=dtype)
        out[f"{p}.lora_gate_and_up_B"] = _rand(E, r, 2 * I, dtype=dtype)
        out[f"{p}.lora_down_A"] = _rand(E, I, r, dtype=dtype)
        out[f"{p}.lora_down_B"] = _rand(E, r, H, dtype=dtype)
    return out


def full_weights(layers: range | list[int], dtype: torch.dtype = torch.bfloat16) -> Tensors:
    """Model weights saved under an adapter name (gpt-oss survey pattern E): no lora_A/lora_B at all."""
    out = {}
    for l in layers:
        p = f"model.layers.{l}"
        out[f"{p}.self_attn.q_proj.weight"] = _rand(Q, H, dtype=dtype)
        out[f"{p}.self_attn.q_proj.bias"] = _rand(Q, dtype=dtype)
        out[f"{p}.mlp.experts.gate_up_proj_bias"] = _rand(E, 2 * I, dtype=dtype)
        out[f"{p}.mlp.router.weight"] = _rand(E, H, dtype=dtype)
        out[f"{p}.mlp.router.bias"] = _rand(E, dtype=dtype)
        out[f"{p}.input_layernorm.weight"] = _rand(H, dtype=dtype)
    return out


# ------------------------------------------------------------------ base checkpoints
def base_config(family: str = "qwen3_moe", layers: int = 2, model_type: str | None = None) -> dict[str, Any]:
    """The config.json of a small model of `family` (H, I, E as above)."""
    _, cfg = example_tensors(family, 1, E, H, I)
    cfg["num_hidden_layers"] = layers
    if model_type:
        cfg["model_type"] = model_type
    return cfg


def write_base(path: Path, family: str = "qwen3_moe", layout: str = "per_expert", layers: int = 2,
               extra: Tensors | None = None, config: dict[str, Any] | None = None) -> Path:
    """A small random base checkpoint of `family` in `layout` (per_expert, transformers, stacked, native)."""
    tensors, cfg = example_tensors(family, layers, E, H, I)
    if layout != "per_expert":
        tensors = _fuse(tensors, family, layout, layers)
    tensors.update(extra or {})
    write_checkpoint(tensors, config or cfg, str(path), 40_000)
    return path


def _fuse(tensors: Tensors, family: str, layout: str, layers: int) -> Tensors:
    from convert.families import load_families

    fam = load_families()[family]
    out = dict(tensors)
    for l in range(layers):
        p = f"model.layers.{l}"
        role = {role: [out.pop(tpl.format(prefix=p, e=e)) for e in range(E)] for role, tpl in fam.per_expert.items()}
        for t in fam.fused[layout]:
            per = []
            for e in range(E):
                parts = [role[r][e].T if t.transpose else role[r][e] for r in t.parts]
                if t.op == "interleave":
                    per.append(torch.stack(parts, dim=-1).flatten(-2))
                else:
                    per.append(torch.cat(parts, dim=0))
            out[t.template.format(prefix=p)] = torch.stack(per)
    return out
