"""split_adapter --target sglang follows the rules SGLang 0.5.23 loads by (configs/targets/sglang.json), judged by
the SGLang emulation (tests/server_rules.py) on real peft adapters of tiny models:

- needs_with: q_proj LoRA without v_proj gets an exact zero v_proj pair (shape from the base config);
  refused, naming the layer, where the base config cannot tell the shape;
- fixed_rank: a module of rank below r (rank_pattern) is padded with zeros to r, deltas unchanged; a rank
  above r is refused;
- refuse_modules: gpt-oss router LoRA is refused with the reason and the tensor named (exit 2, nothing written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from adapter_fixtures import peft_expert_deltas
from helpers import run_tool
from server_rules import sglang_load, sglang_models
from test_target_acceptance import ROUTER, assert_loaded_exactly, peft_adapter, peft_linear

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _adapter(tmp_path: Path, family: str, modules: list[str], params: list[str], **extra: Any) -> tuple[Any, Path, Path, int, int]:
    """A real peft adapter (random factors) of a tiny `family` model with its config.json; (peft model, dir,
    config, layers, experts)."""
    return peft_adapter(tmp_path, family, modules, params, 3, **extra)


def _split(src: Path, config: Path, dst: Path, check: bool = True) -> Any:
    return run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), "--base-config", str(config),
                    "--target", "sglang", check=check)


def _refused(src: Path, config: Path, dst: Path) -> str:
    """Split for SGLang expecting a refusal: exit 2 and no adapter file written; returns stderr."""
    proc = _split(src, config, dst, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not (dst / "adapter_model.safetensors").exists()
    return proc.stderr


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_q_proj_without_v_proj_gets_an_exact_zero_v_pair(tmp_path: Path) -> None:
    peft_model, src, config, layers, experts = _adapter(tmp_path, "qwen3_moe", ["q_proj"], EXPERTS)
    out = tmp_path / "out"
    _split(src, config, out)
    shapes = _shapes(out)
    cfg = json.loads(config.read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    v_b = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    assert shapes[v_b] == (cfg["num_key_value_heads"] * head_dim, 2)
    assert shapes[v_b.replace("lora_B", "lora_A")] == (2, cfg["hidden_size"])
    loaded = sglang_load(str(out), sglang_models(layers, experts)["qwen3_moe"])
    want_linear = peft_linear(peft_model)
    for name in list(want_linear):
        want_linear[name.replace("q_proj", "v_proj")] = torch.zeros(cfg["num_key_value_heads"] * head_dim, cfg["hidden_size"])
    want = {k: v.float() for k, v in peft_expert_deltas(peft_model, "qwen3_moe").items()}
    assert_loaded_exactly(loaded, want, want_linear, "sglang", "qwen3_moe")
    assert "v_proj" in json.loads((out / "adapter_config.json").read_text())["target_modules"]


def test_q_proj_without_v_proj_and_no_head_counts_is_refused_naming_the_layer(tmp_path: Path) -> None:
    _, src, config, _, _ = _adapter(tmp_path, "qwen3_moe", ["q_proj"], EXPERTS)
    cfg = json.loads(config.read_text())
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        cfg.pop(key, None)
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    err = _refused(src, config, out)
    assert "layers.0.self_attn" in err and "v_proj" in err


def test_a_rank_below_r_is_padded_to_r_with_exact_deltas(tmp_path: Path) -> None:
    peft_model, src, config, layers, experts = _adapter(tmp_path, "qwen3_moe", ["q_proj", "v_proj"], EXPERTS,
                                                        rank_pattern={"q_proj": 1, "down_proj": 1},
                                                        alpha_pattern={"q_proj": 3, "down_proj": 7})
    layer0 = "base_model.model.model.layers.0"
    assert _shapes(src)[f"{layer0}.self_attn.q_proj.lora_A.weight"][0] == 1
    assert _shapes(src)[f"{layer0}.mlp.experts.lora_A.weight"][0] == experts  # down: rank 1 per expert
    out = tmp_path / "out"
    _split(src, config, out)
    shapes = _shapes(out)
    for module in ("self_attn.q_proj", "mlp.experts.3.down_proj"):
        assert shapes[f"{layer0}.{module}.lora_A.weight"][0] == 2
        assert shapes[f"{layer0}.{module}.lora_B.weight"][1] == 2
    assert not json.loads((out / "adapter_config.json").read_text()).get("rank_pattern")
    loaded = sglang_load(str(out), sglang_models(layers, experts)["qwen3_moe"])
    want = {k: v.float() for k, v in peft_expert_deltas(peft_model, "qwen3_moe").items()}
    assert_loaded_exactly(loaded, want, peft_linear(peft_model), "sglang", "qwen3_moe")


def test_a_rank_above_r_is_refused(tmp_path: Path) -> None:
    _, src, config, _, _ = _adapter(tmp_path, "qwen3_moe", ["q_proj", "v_proj"], EXPERTS, rank_pattern={"v_proj": 4})
    out = tmp_path / "out"
    err = _refused(src, config, out)
    assert "v_proj.lora_A.weight" in err and "rank 4" in err


def test_gpt_oss_router_lora_is_refused_for_sglang(tmp_path: Path) -> None:
    _, src, config, _, _ = _adapter(tmp_path, "gpt_oss", ["q_proj", "v_proj"], [*EXPERTS, ROUTER["gpt_oss"]])
    out = tmp_path / "out"
    err = _refused(src, config, out)
    assert "mlp.router" in err and "should_apply_lora" in err


def test_deepseek_router_lora_is_refused_for_sglang_by_its_model_type(tmp_path: Path) -> None:
    """DeepSeek-V3 shares the qwen3_moe family's tables, but SGLang's DeepSeek router (MoEGate) takes no LoRA: a
    model-type override of the target refuses it (the emulation, given that router LoRA, refuses too), and
    inspect says so; Qwen3-MoE's router LoRA still converts for SGLang."""
    _, src, config, layers, experts = _adapter(tmp_path, "deepseek_v3", ["q_a_proj", "kv_a_proj_with_mqa", "o_proj"],
                                               [*EXPERTS, "mlp.gate.weight"])
    out = tmp_path / "out"
    err = _refused(src, config, out)
    assert "mlp.gate" in err and "MoEGate" in err
    report = run_tool("convert.inspect", str(src), "--base-config", str(config), "--json")
    assert json.loads(report.stdout)["servers"]["sglang"]["loads"] is False
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    _, src2, config2, _, _ = _adapter(qwen, "qwen3_moe", ["q_proj", "v_proj"], [*EXPERTS, "mlp.gate.weight"])
    assert _split(src2, config2, qwen / "out").returncode == 0



def test_mixtral_per_expert_w123_source_gets_canonical_leaves_for_sglang(tmp_path: Path) -> None:
    """expert_names: a per-expert Mixtral adapter under its checkpoint leaves (w1/w3/w2, as --target vllm writes it)
    is written with SGLang's canonical leaves gate_proj/up_proj/down_proj, and target_modules names them."""
    peft_model, src, config, layers, experts = _adapter(tmp_path, "mixtral", ["q_proj", "v_proj"],
                                                        [*EXPERTS, "mlp.gate.weight"])
    mid = tmp_path / "vllm"
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(mid), "--base-config", str(config), "--target", "vllm")
    assert "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight" in _shapes(mid)
    out = tmp_path / "out"
    _split(mid, config, out)
    leaves = {k.split(".experts.")[1].split(".")[1] for k in _shapes(out) if ".experts." in k}
    assert leaves == {"gate_proj", "up_proj", "down_proj"}
    tm = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(tm, list) and {"gate_proj", "up_proj", "down_proj", "gate", "q_proj", "v_proj"} <= set(tm)
    assert not {"w1", "w2", "w3"} & set(tm)
    loaded = sglang_load(str(out), sglang_models(layers, experts)["mixtral"])
    want = {k: v.float() for k, v in peft_expert_deltas(peft_model, "qwen3_moe").items()}
    assert_loaded_exactly(loaded, want, peft_linear(peft_model), "sglang", "mixtral")
