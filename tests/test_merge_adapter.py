"""convert.merge_adapter: LoRA merged into the base, against peft's own merge_and_unload (float32).

Tiny random transformers models and real peft adapters (never downloaded): every merged tensor within one
ulp (plus float32's own rounding of the delta) of peft's, untouched tensors byte-identical, identical bytes
at 1, 2 and 3 ranks, from_pretrained of the result giving the merged model's logits; FP8 block-scaled bases
(ragged blocks) requantized; refusals exit 2 with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapter_fixtures import make_per_expert_adapter, per_expert_deltas, random_lora, write_adapter, lora_config
from helpers import load_dir, raw_bytes, run_tool
from model_fixtures import build_model, logits, save_model

MOD = "convert.merge_adapter"


def _merge(base: Path, adapter: Path, dst: Path, *extra: str, check: bool = True):
    return run_tool(MOD, "--base", str(base), "--adapter", str(adapter), "--dst", str(dst), *extra, check=check)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(x.dtype).eps * x.abs().clamp(min=torch.finfo(x.dtype).tiny) * 2


def _close(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Equal to peft's up to a few float64 ulps of the larger magnitude: the merge computes in peft's order
    (product, scaled, added, in float32), so a float32 result matches bit for bit and a rounded one within one
    ulp of its dtype (see the bf16 cases)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    diff = (ours.double() - ref.double()).abs()
    tol = _ulp(torch.maximum(ours.abs(), ref.abs()).double()) * 4
    assert bool((diff <= tol).all()), f"{name}: max diff {float(diff.max())}"


def _peft_case(tmp_path: Path, family: str, **lora):
    """(base dir, adapter dir, peft's merged state dict saved by save_pretrained, the merged model)."""
    from peft import LoraConfig, get_peft_model

    base = save_model(build_model(family, seed=0), tmp_path / "base")
    model = build_model(family, seed=0)
    torch.manual_seed(7)
    cfg = LoraConfig(r=3, lora_alpha=7, init_lora_weights=False, **lora)
    pm = get_peft_model(model, cfg).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    merged = pm.merge_and_unload()
    save_model(merged, tmp_path / "peft-merged")
    return base, tmp_path / "adapter", load_dir(tmp_path / "peft-merged"), merged


def _compare(out: Path, base: Path, ref: dict[str, torch.Tensor]) -> int:
    ours, orig = load_dir(out), load_dir(base)
    assert set(ours) == set(orig) == set(ref)
    changed = 0
    for k, t in ours.items():
        if torch.equal(orig[k], ref[k]):
            assert raw_bytes(t) == raw_bytes(orig[k]), f"{k}: untouched tensor not byte-identical"
        else:
            _close(t, ref[k], k)
            changed += 1
    return changed


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_qwen3_moe_peft_target_parameters_matches_peft_at_1_2_3_ranks(tmp_path):
    base, adapter, ref, merged = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj", "o_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    _merge(base, adapter, tmp_path / "out1", "--verify")
    assert _compare(tmp_path / "out1", base, ref) > 0
    # the base's own shard names and tensor placement
    assert json.loads((tmp_path / "out1/model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for n in (2, 3):
        _merge(base, adapter, tmp_path / f"out{n}", "--nproc", str(n))
        _same_files(tmp_path / "out1", tmp_path / f"out{n}")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out1")).eval()
    assert torch.allclose(logits(loaded), logits(merged), atol=1e-5, rtol=1e-5)


def test_mixtral_router_and_attention_lora(tmp_path):
    base, adapter, ref, merged = _peft_case(tmp_path, "mixtral", target_modules=["q_proj", "v_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                               "mlp.gate.weight"])
    _merge(base, adapter, tmp_path / "out", "--nproc", "2", "--verify")
    assert _compare(tmp_path / "out", base, ref) > 0
    router = "model.layers.0.block_sparse_moe.gate.weight"  # the checkpoint's name of the router
    assert not torch.equal(load_dir(base)[router], ref[router])  # the router LoRA was merged
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.allclose(logits(loaded), logits(merged), atol=1e-5, rtol=1e-5)


def test_gpt_oss_native_fused_base(tmp_path):
    base, adapter, ref, merged = _peft_case(tmp_path, "gpt_oss", target_modules=["q_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    _merge(base, adapter, tmp_path / "out", "--verify")
    assert _compare(tmp_path / "out", base, ref) > 0


def test_fused_base_and_bf16_cast(tmp_path):
    """A transformers-fused base (fuse_experts of the per-expert one): the merge writes the fused layout."""
    base, adapter, ref, _ = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    run_tool("convert.fuse_experts", "--src", str(base), "--dst", str(tmp_path / "fused"))
    _merge(tmp_path / "fused", adapter, tmp_path / "out", "--nproc", "2", "--verify")
    ours, fused = load_dir(tmp_path / "out"), load_dir(tmp_path / "fused")
    gu = "model.layers.1.mlp.experts.gate_up_proj"
    want = torch.cat([ref["model.layers.1.mlp.experts.3.gate_proj.weight"], ref["model.layers.1.mlp.experts.3.up_proj.weight"]])
    _close(ours[gu][3], want, gu)
    assert raw_bytes(ours["model.embed_tokens.weight"]) == raw_bytes(fused["model.embed_tokens.weight"])
    _merge(base, adapter, tmp_path / "bf16", "--dtype", "bf16", "--verify")
    out = load_dir(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    k = "model.layers.0.mlp.experts.2.down_proj.weight"
    assert torch.equal(out[k], ref[k].to(torch.bfloat16)) or float((out[k].float() - ref[k]).abs().max()) <= 2 ** -8 * float(ref[k].abs().max())


def test_per_expert_adapter_on_mixtral_checkpoint_names(tmp_path):
    base = save_model(build_model("mixtral", seed=0), tmp_path / "base")
    adapter, deltas = make_per_expert_adapter(tmp_path / "adapter", "mixtral", rank=2, alpha=4)
    _merge(base, adapter, tmp_path / "out", "--nproc", "3", "--verify")
    ours, orig = load_dir(tmp_path / "out"), load_dir(base)
    names = {"gate": "w1", "up": "w3", "down": "w2"}  # the checkpoint's names (block_sparse_moe, w1/w3/w2)
    for (layer, role, e), d in deltas.items():
        key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{names[role]}.weight"
        _close(ours[key], orig[key].float() + d, key)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[q], orig[q])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert raw_bytes(ours[k]) == raw_bytes(orig[k])


def test_refusals_exit_2_and_write_nothing(tmp_path):
    base = save_model(build_model("qwen3_moe", seed=0), tmp_path / "base")
    adapter, _ = make_per_expert_adapter(tmp_path / "adapter", "qwen3_moe", rank=2)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora/adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (tmp_path / "dora/adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    p = _merge(base, tmp_path / "dora", tmp_path / "out", check=False)
    assert p.returncode == 2 and "use_dora" in p.stderr and not (tmp_path / "out").exists()
    # a shape mismatch: q_proj LoRA for a wider projection than the base's
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = random_lora((99, 2), 1)
    write_adapter(tmp_path / "bad", tensors, cfg)
    p = _merge(base, tmp_path / "bad", tmp_path / "out", check=False)
    assert p.returncode == 2 and "q_proj" in p.stderr and not (tmp_path / "out").exists(), p.stderr
    # a module the base does not have
    tensors = {k: v for k, v in tensors.items() if "q_proj" not in k}
    tensors["base_model.model.model.layers.0.self_attn.nope_proj.lora_A.weight"] = random_lora((2, 24), 2)
    tensors["base_model.model.model.layers.0.self_attn.nope_proj.lora_B.weight"] = random_lora((24, 2), 3)
    write_adapter(tmp_path / "bad2", tensors, cfg)
    p = _merge(base, tmp_path / "bad2", tmp_path / "out", check=False)
    assert p.returncode == 2 and "nope_proj" in p.stderr and not (tmp_path / "out").exists(), p.stderr


def test_fp8_deepseek_v3_ragged_blocks_requantized(tmp_path):
    from quant_fixtures import write_fp8_experts
    from convert.plan.dequant import fp8_dequantize

    E, H, I = 3, 256, 200  # I = 200: ragged 128-blocks
    written = write_fp8_experts(tmp_path / "base", E=E, H=H, I=I)
    tensors, r = {}, 4
    for e in range(E):
        for proj, (o, i) in (("gate_proj", (I, H)), ("down_proj", (H, I))):
            m = f"base_model.model.model.layers.1.mlp.experts.{e}.{proj}"
            tensors[f"{m}.lora_A.weight"] = random_lora((r, i), 10 * e + len(proj))
            tensors[f"{m}.lora_B.weight"] = random_lora((o, r), 10 * e + len(proj) + 1)
    m = "base_model.model.model.layers.1.self_attn.o_proj"
    tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = random_lora((r, I), 5), random_lora((H, r), 6)
    write_adapter(tmp_path / "adapter", tensors, lora_config(r, 8, target_modules=["gate_proj", "down_proj", "o_proj"]))
    p = _merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "--nproc", "2", "--verify")
    assert "delta survived" in p.stdout
    out = load_dir(tmp_path / "out")
    assert set(out) == set(written)
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    for e in range(E):
        k = f"model.layers.1.mlp.experts.{e}.gate_proj.weight"
        assert out[k].dtype == torch.float8_e4m3fn and out[k + "_scale_inv"].shape == (2, 2)
        w = fp8_dequantize(written[k], written[k + "_scale_inv"])
        a = tensors[f"base_model.model.{k[:-7]}.lora_A.weight"]
        b = tensors[f"base_model.model.{k[:-7]}.lora_B.weight"]
        want = w + b @ a * 2.0
        got = fp8_dequantize(out[k], out[k + "_scale_inv"])
        assert float((got - want).abs().max()) <= float(want.abs().max()) / 8  # within FP8's step
        up = f"model.layers.1.mlp.experts.{e}.up_proj.weight"  # no LoRA: bytes unchanged
        assert raw_bytes(out[up]) == raw_bytes(written[up])
        assert raw_bytes(out[up + "_scale_inv"]) == raw_bytes(written[up + "_scale_inv"])
