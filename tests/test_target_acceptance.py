"""Acceptance of issue 14: `split_adapter --target vllm|sglang` on real peft adapters of tiny models
(Qwen3-MoE, Mixtral, gpt-oss, DeepSeek-V3; built from configs, never downloaded), loaded through the
emulations of the servers' loading code (tests/server_rules.py). The server must load the output
without refusing or dropping anything, and the deltas it assembles (vLLM: w13 = gate then up, w2;
SGLang: gate_up, down) must equal peft's get_delta_weight for every expert, the router and the
attention LoRA, under the server's names; gate_up-only and down-only adapters load with exact deltas
(the missing projection as a zero pair).

NEEDS the i14-engine branch (the --target flag of split_adapter); on the rules branch alone every
test here is an expected failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter_fixtures import peft_expert_deltas
from helpers import run_tool
from server_rules import Loaded, sglang_load, sglang_models, vllm_load, vllm_models

ATTENTION = {"deepseek_v3": ["q_a_proj", "kv_a_proj_with_mqa", "o_proj"]}
ROUTER = {"gpt_oss": "mlp.router.weight"}  # others: mlp.gate.weight
NO_ROUTER = {("sglang", "gpt_oss"), ("sglang", "deepseek_v3")}  # SGLang cannot apply those routers' LoRA


def _model(family: str) -> tuple[torch.nn.Module, int, int]:
    """A tiny model of `family` and its (layers, experts)."""
    if family == "deepseek_v3":
        from tiny_models import LAYERS, E, build

        return build("deepseek_v3"), LAYERS, E
    from model_fixtures import LAYERS, E, build_model

    return build_model(family), LAYERS, E


def make_adapter(tmp_path: Path, family: str, *, parameters: list[str] | None = None, router: bool = True,
                 seed: int = 0) -> tuple[Any, Path, Path, int, int]:
    """A real peft adapter (random A and B) on experts (`parameters`), router and attention; with the base
    config.json beside it. Returns (peft model, adapter dir, config path, layers, experts)."""
    params = parameters if parameters is not None else ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    if router:
        params = [*params, ROUTER.get(family, "mlp.gate.weight")]
    return peft_adapter(tmp_path, family, ATTENTION.get(family, ["q_proj", "v_proj"]), params, seed + 7)


def peft_adapter(tmp_path: Path, family: str, modules: list[str], params: list[str], seed: int,
                 **extra: Any) -> tuple[Any, Path, Path, int, int]:
    """A real peft adapter (r=2, alpha 5, random A and B drawn after seeding `seed`) of a tiny `family` model on
    `modules` and `params`, saved to tmp_path/adapter with the base config.json beside it. Returns (peft model,
    adapter dir, config path, layers, experts)."""
    from peft import LoraConfig, get_peft_model

    model, layers, experts = _model(family)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=modules, target_parameters=params, init_lora_weights=False,
                     **extra)
    peft_model = get_peft_model(model, cfg).eval()
    path = tmp_path / "adapter"
    peft_model.save_pretrained(str(path))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(model.config.to_dict()))
    return peft_model, path, config, layers, experts


def convert(src: Path, config: Path, target: str, dst: Path) -> Path:
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), "--base-config", str(config),
             "--target", target)
    return dst


def load(target: str, family: str, path: Path, layers: int, experts: int) -> Loaded:
    if target == "vllm":
        return vllm_load(str(path), vllm_models(layers, experts)[family])
    return sglang_load(str(path), sglang_models(layers, experts)[family])


def peft_linear(peft_model: Any) -> dict[str, torch.Tensor]:
    """peft's own delta of every non-expert LoRA module: {transformers module name: delta}."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and getattr(module, "parameter_name", None) not in ("gate_up_proj", "down_proj"):
            with torch.no_grad():
                out[name] = module.get_delta_weight("default").float()
    return out


def server_name(target: str, family: str, name: str) -> str:
    """The server's name of a transformers module (vLLM: gpt-oss attention under .attn., Mixtral's MoE
    under .block_sparse_moe.; SGLang keeps the adapter's name)."""
    if target == "vllm" and family == "gpt_oss":
        name = name.replace(".self_attn.", ".attn.")
    if family == "mixtral":
        name = name.replace(".mlp.", ".block_sparse_moe.")
    return name.removesuffix(".weight") if name.endswith(".gate.weight") or name.endswith(".router.weight") else name


def assert_loaded_exactly(loaded: Loaded, want_experts: dict[tuple[int, str, int], torch.Tensor],
                          want_linear: dict[str, torch.Tensor], target: str, family: str) -> None:
    assert not loaded.dropped, loaded.dropped
    for (layer, role, e), want in want_experts.items():
        torch.testing.assert_close(loaded.experts[(layer, e)][role], want, rtol=1e-5, atol=1e-6)
    assert {(layer, role, e) for (layer, e), d in loaded.experts.items() for role in d} == set(want_experts)
    for name, want in want_linear.items():
        got = {k.removesuffix(".weight"): v for k, v in loaded.linear.items()}
        key = server_name(target, family, name)
        assert key in got, f"{key} not applied; applied: {sorted(got)}"
        torch.testing.assert_close(got[key], want.reshape(got[key].shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_split_adapter_target_loads_with_peft_deltas(tmp_path: Path, target: str, family: str) -> None:
    peft_model, src, config, layers, experts = make_adapter(tmp_path, family, router=(target, family) not in NO_ROUTER)
    out = convert(src, config, target, tmp_path / "out")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_model.safetensors.index.json").exists()
    loaded = load(target, family, out, layers, experts)
    want = {k: v.float() for k, v in peft_expert_deltas(peft_model, "gpt_oss" if family == "gpt_oss" else "qwen3_moe").items()}
    assert_loaded_exactly(loaded, want, peft_linear(peft_model), target, family)
    check = run_tool("convert.verify", "--target", target, "--dst", str(out), "--base-config", str(config), check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("only", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
def test_gate_up_only_and_down_only_load_under_vllm_with_exact_deltas(tmp_path: Path, family: str, only: str) -> None:
    peft_model, src, config, layers, experts = make_adapter(tmp_path, family, parameters=[only], router=False)
    out = convert(src, config, "vllm", tmp_path / "out")
    loaded = load("vllm", family, out, layers, experts)
    want = {k: v.float() for k, v in peft_expert_deltas(peft_model, family).items()}
    missing = ("down",) if only.endswith("gate_up_proj") else ("gate", "up")
    for (layer, _role, e), d in list(want.items()):
        for m in missing:  # the zero pair: delta exactly 0, [I, H] for gate/up, [H, I] for down
            want[(layer, m, e)] = torch.zeros(d.shape[1], d.shape[0])
    assert_loaded_exactly(loaded, want, peft_linear(peft_model), "vllm", family)


@pytest.mark.slow
def test_a_7gb_adapter_is_written_as_one_file(tmp_path: Path) -> None:
    """Issue 14: a 7 GB synthetic per-expert adapter is written as one adapter_model.safetensors by default."""
    from adapter_fixtures import lora_config, write_adapter

    experts, rank, hidden, inter, layers = 128, 64, 2048, 768, 48  # ~ Qwen3-30B-A3B, rank 64, fp32: ~7.2 GB
    tensors: dict[str, torch.Tensor] = {}
    zero_a, zero_b = torch.zeros(experts * rank, hidden), torch.zeros(2 * inter, experts * rank)
    zero_da, zero_db = torch.zeros(experts * rank, inter), torch.zeros(hidden, experts * rank)
    for layer in range(layers):
        base = f"base_model.model.model.layers.{layer}.mlp.experts"
        tensors.update({f"{base}.base_layer.lora_A.weight": zero_a, f"{base}.base_layer.lora_B.weight": zero_b,
                        f"{base}.lora_A.weight": zero_da, f"{base}.lora_B.weight": zero_db})
    src = write_adapter(tmp_path / "src", tensors, lora_config(rank, 2 * rank, target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": hidden, "num_hidden_layers": layers,
                                  "moe_intermediate_size": inter, "num_experts": experts}))
    out = convert(src, config, "vllm", tmp_path / "out")
    files = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert files == ["adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").stat().st_size > 7e9
