"""Shared builders of LoRA adapters for tests (never downloaded): real peft adapters on tiny
transformers-5 MoE models, and synthetic adapters in every expert-LoRA layout of FORMATS.md.

Each builder writes an adapter directory (`adapter_model.safetensors` + `adapter_config.json`)
and returns what a test needs to check a conversion: the per-expert deltas the adapter means,
as {(layer, role, expert): delta [out, in]} with the scaling applied.

Layouts (per expert e, role in gate/up/down, nn.Linear orientation [out, in]):
- peft target_parameters: `make_peft_adapter` (real peft, rank folded with the experts).
- shared w1/w2/w3 (3-D, partially shared): `make_shared_w123_adapter`.
- NeMo grouped: `make_grouped_adapter`.
- per-expert: `make_per_expert_adapter`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_fixtures import LAYERS, E, H, I, build_model

ROLES = ("gate", "up", "down")
ATTN = 24  # q_proj out / o_proj in of the tiny models (2 heads x head_dim 12)
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PER_EXPERT_PROJ = {  # per-expert module names of each family (as configs/families/*.json name them)
    "qwen3_moe": ("mlp.experts.{e}", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "gpt_oss": ("mlp.experts.{e}", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "mixtral": ("block_sparse_moe.experts.{e}", {"gate": "w1", "up": "w3", "down": "w2"}),
}
Deltas = dict[tuple[int, str, int], torch.Tensor]


def scaling(config: dict[str, Any], r: int | None = None, alpha: float | None = None) -> float:
    """peft's scaling for rank `r` and `alpha` (defaults: the config's global r and lora_alpha)."""
    r = r if r is not None else config["r"]
    alpha = alpha if alpha is not None else config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Save `tensors` as adapter_model.safetensors and `config` as adapter_config.json in `path`."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter_config) of an adapter directory with a single adapter_model.safetensors."""
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads((path / "adapter_config.json").read_text())


def peft_config(r: int = 3, alpha: int = 7, identity: bool = False, **extra: Any) -> Any:
    """A LoraConfig on both fused expert parameters and q_proj (B = 0 when `identity`)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"], target_parameters=TARGET_PARAMETERS,
                      init_lora_weights=identity, **extra)


def make_peft_adapter(
    family: str, path: Path, *, seed: int = 0, identity: bool = False, dtype: torch.dtype | None = None, **lora: Any
) -> tuple[Any, Path]:
    """A real peft target_parameters adapter on the tiny `family` model, saved to `path`.

    Returns (the PeftModel, path). `identity`: peft's default init (B = 0); `dtype`: cast the
    saved adapter tensors (e.g. torch.bfloat16) after saving; extra `lora` kwargs go to LoraConfig.
    """
    from peft import get_peft_model

    model = build_model(family, seed=seed)
    torch.manual_seed(seed + 100)
    peft_model = get_peft_model(model, peft_config(identity=identity, **lora)).eval()
    peft_model.save_pretrained(str(path))
    if dtype is not None:
        tensors, config = read_adapter(path)
        write_adapter(path, {k: v.to(dtype) for k, v in tensors.items()}, config)
    return peft_model, path


def peft_expert_deltas(peft_model: Any, family: str) -> Deltas:
    """Every expert's delta as peft itself computes it (`ParamWrapper.get_delta_weight`), sliced per role.

    gate_up is [gate; up] halves for qwen3_moe/mixtral ([E, 2I, H]); gpt_oss stores it transposed
    ([E, H, 2I]) with gate and up interleaved on the last dim.
    """
    out: Deltas = {}
    for name, module in peft_model.named_modules():
        param = getattr(module, "parameter_name", None)
        if param not in ("gate_up_proj", "down_proj"):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        with torch.no_grad():
            delta = module.get_delta_weight("default").float()
        if family == "gpt_oss":
            delta = delta.transpose(1, 2)
        if param == "down_proj":
            parts = {"down": delta}
        elif family == "gpt_oss":
            parts = {"gate": delta[:, 0::2], "up": delta[:, 1::2]}
        else:
            half = delta.shape[1] // 2
            parts = {"gate": delta[:, :half], "up": delta[:, half:]}
        for role, d in parts.items():
            for e in range(d.shape[0]):
                out[(layer, role, e)] = d[e]
    return out


def per_expert_deltas(path: Path, family: str, config: dict[str, Any] | None = None) -> Deltas:
    """Deltas B_e @ A_e * scaling of a per-expert adapter directory (the family's per-expert names)."""
    tensors, cfg = read_adapter(path)
    config = config or cfg
    container, proj = PER_EXPERT_PROJ[family]
    out: Deltas = {}
    for layer in range(LAYERS):
        for e in range(64):
            base = f"base_model.model.model.layers.{layer}.{container.format(e=e)}"
            for role in ROLES:
                a = tensors.get(f"{base}.{proj[role]}.lora_A.weight")
                b = tensors.get(f"{base}.{proj[role]}.lora_B.weight")
                if a is None or b is None:
                    continue
                module = f"model.layers.{layer}.{container.format(e=e)}.{proj[role]}"
                out[(layer, role, e)] = b.float() @ a.float() * module_scaling(config, module)
    return out


def module_scaling(config: dict[str, Any], module: str) -> float:
    """The scaling peft gives `module` (name without base_model.model.), rank_pattern/alpha_pattern included."""
    from peft.utils.other import get_pattern_key

    r = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}).keys(), module), config["r"])
    alpha = config.get("alpha_pattern", {}).get(get_pattern_key(config.get("alpha_pattern", {}).keys(), module),
                                                config["lora_alpha"])
    return scaling(config, r, alpha)


def random_lora(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reproducible random factor."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.1).to(dtype)


def base_config(family: str = "qwen3_moe", hidden: int = H, inter: int = I, experts: int = E,
                layers: int = LAYERS) -> dict[str, Any]:
    """A config.json for `family` with the given sizes (enough for --base-config), attention as attention_lora's
    (2 heads of 12; the size of a zero v_proj pair a target that stacks q/k/v adds)."""
    cfg: dict[str, Any] = {"model_type": family, "hidden_size": hidden, "num_hidden_layers": layers,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": ATTN // 2}
    if family == "qwen3_moe":
        cfg.update(moe_intermediate_size=inter, num_experts=experts)
    else:
        cfg.update(intermediate_size=inter, num_local_experts=experts)
    return cfg


def lora_config(r: int, alpha: float, **extra: Any) -> dict[str, Any]:
    """A minimal peft-style adapter_config.json."""
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False, "rank_pattern": {},
            "alpha_pattern": {}, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **extra}


def attention_lora(layer: int, r: int, seed: int, prefix: str = "self_attn") -> dict[str, torch.Tensor]:
    """q/o attention LoRA of one layer (under `prefix`: self_attn, or attn as some gpt-oss adapters)."""
    base = f"base_model.model.model.layers.{layer}.{prefix}"
    return {
        f"{base}.q_proj.lora_A.weight": random_lora((r, H), seed),
        f"{base}.q_proj.lora_B.weight": random_lora((ATTN, r), seed + 1),
        f"{base}.o_proj.lora_A.weight": random_lora((r, ATTN), seed + 2),
        f"{base}.o_proj.lora_B.weight": random_lora((H, r), seed + 3),
    }


def make_shared_w123_adapter(
    path: Path, *, experts: int, rank: int, alpha: float = 32, hidden: int = H, inter: int = I,
    attn_prefix: str = "self_attn", layers: int = LAYERS, seed: int = 0,
) -> tuple[Path, Deltas]:
    """The 3-D partially shared layout (survey "Pattern A"): w1/w3 lora_A [1, r, H] shared, lora_B [E, I, r];
    w2 lora_A [E, r, I], lora_B [1, H, r] shared; plus attention LoRA under `attn_prefix`."""
    tensors: dict[str, torch.Tensor] = {}
    deltas: Deltas = {}
    s = alpha / rank
    for layer in range(layers):
        base = f"base_model.model.model.layers.{layer}.mlp.experts"
        k = seed + 1000 * layer
        for role, proj, a_shape, b_shape in (
            ("gate", "w1", (1, rank, hidden), (experts, inter, rank)),
            ("up", "w3", (1, rank, hidden), (experts, inter, rank)),
            ("down", "w2", (experts, rank, inter), (1, hidden, rank)),
        ):
            a, b = random_lora(a_shape, k + 1), random_lora(b_shape, k + 2)
            k += 10
            tensors[f"{base}.{proj}.lora_A.weight"], tensors[f"{base}.{proj}.lora_B.weight"] = a, b
            for e in range(experts):
                deltas[(layer, role, e)] = b[e if b.shape[0] > 1 else 0] @ a[e if a.shape[0] > 1 else 0] * s
        tensors.update(attention_lora(layer, rank, seed + 50 * layer, attn_prefix))
    write_adapter(path, tensors, lora_config(rank, alpha, base_model_name_or_path="Qwen/Qwen3-30B-A3B"))
    return path, deltas


def make_grouped_adapter(
    path: Path, *, experts: int, rank: int, alpha: float = 64, hidden: int = H, inter: int = I,
    order: str = "concat", layers: int = LAYERS, seed: int = 0,
) -> tuple[Path, Deltas]:
    """NeMo GroupedExpertsLoRA tensors (x @ A @ B): lora_gate_and_up_A [E, H, r], _B [E, r, 2I] with
    [gate | up] columns ("concat") or interleaved, lora_down_A [E, I, r], lora_down_B [E, r, H]."""
    tensors: dict[str, torch.Tensor] = {}
    deltas: Deltas = {}
    s = alpha / rank
    for layer in range(layers):
        base = f"base_model.model.model.layers.{layer}.mlp.experts"
        k = seed + 1000 * layer
        gu_a, gu_b = random_lora((experts, hidden, rank), k + 1), random_lora((experts, rank, 2 * inter), k + 2)
        d_a, d_b = random_lora((experts, inter, rank), k + 3), random_lora((experts, rank, hidden), k + 4)
        tensors.update({f"{base}.lora_gate_and_up_A": gu_a, f"{base}.lora_gate_and_up_B": gu_b,
                        f"{base}.lora_down_A": d_a, f"{base}.lora_down_B": d_b})
        for e in range(experts):
            full = (gu_a[e] @ gu_b[e]).T * s  # [2I, H]
            gate, up = (full[:inter], full[inter:]) if order == "concat" else (full[0::2], full[1::2])
            deltas[(layer, "gate", e)], deltas[(layer, "up", e)] = gate, up
            deltas[(layer, "down", e)] = (d_a[e] @ d_b[e]).T * s
        tensors.update(attention_lora(layer, rank, seed + 50 * layer))
    write_adapter(path, tensors, lora_config(rank, alpha, base_model_name_or_path="Qwen/Qwen3-30B-A3B"))
    return path, deltas


def make_per_expert_adapter(
    path: Path, family: str, *, experts: int = E, rank: int = 4, alpha: float = 8, share_gate_up_a: bool = False,
    shared_factors: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0, **config: Any,
) -> tuple[Path, Deltas]:
    """A per-expert adapter with the family's names (gate/up/down of every expert) and q_proj LoRA.

    `share_gate_up_a`: gate and up of an expert get the same lora_A (as after splitting a peft
    adapter); `shared_factors`: gate/up lora_A and down lora_B identical across experts (exactly
    representable in the shared w1/w2/w3 layout).
    """
    container, proj = PER_EXPERT_PROJ[family]
    tensors: dict[str, torch.Tensor] = {}
    deltas: Deltas = {}
    s = alpha / rank
    for layer in range(LAYERS):
        for e in range(experts):
            base = f"base_model.model.model.layers.{layer}.{container.format(e=e)}"
            k = seed + 1000 * layer + 10 * (0 if shared_factors else e)
            kb = seed + 1000 * layer + 10 * e
            a_gate = random_lora((rank, H), k + 1, dtype)
            a_up = a_gate.clone() if share_gate_up_a else random_lora((rank, H), k + 2, dtype)
            pairs = {
                "gate": (a_gate, random_lora((I, rank), kb + 3, dtype)),
                "up": (a_up, random_lora((I, rank), kb + 4, dtype)),
                "down": (random_lora((rank, I), kb + 5, dtype), random_lora((H, rank), k + 6, dtype)),
            }
            for role, (a, b) in pairs.items():
                tensors[f"{base}.{proj[role]}.lora_A.weight"] = a
                tensors[f"{base}.{proj[role]}.lora_B.weight"] = b
                deltas[(layer, role, e)] = b.float() @ a.float() * s
        tensors.update(attention_lora(layer, rank, seed + 50 * layer))
    write_adapter(path, tensors, lora_config(rank, alpha, target_modules=["q_proj", "o_proj", *proj.values()], **config))
    return path, deltas
