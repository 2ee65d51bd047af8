"""convert.merge_adapter: LoRA merged into the base, against peft's own merge_and_unload (float32).

Tiny random transformers models and real peft adapters (never downloaded): every merged tensor within one
ulp (plus float32's own rounding of the delta) of peft's, untouched tensors byte-identical, identical bytes
at 1, 2 and 3 ranks, from_pretrained of the result giving the merged model's logits; FP8 block-scaled bases
(ragged blocks) requantized or dequantized (--dtype), the survival report; MXFP4 gpt-oss bases requantized
(--verify catching a corrupted block byte) or written in bf16; peft wrappers in other producers' packings (older
peft shapes, expert-major lora_B) merged as peft merges the original; shared w1/w2/w3 and grouped adapters; DeepSeek-V3 with router LoRA; modules_to_save; resume
after a killed rank; S3 in and out; refusals exit 2 with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapter_fixtures import lora_config, make_per_expert_adapter, random_lora, write_adapter
from helpers import load_dir, raw_bytes, run_tool
from model_fixtures import build_model, logits, save_model

MOD = "convert.merge_adapter"
BUCKET = "merge-adapter"  # the s3env fixture's bucket


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


def test_run_bytes_and_read_ahead_change_how_a_merge_runs_not_its_bytes(tmp_path, monkeypatch):
    """MOE_CONVERT_MERGE_RUN_BYTES (here 1: one expert per piece) and MOE_CONVERT_READ_AHEAD (0: nothing asked
    ahead) reach the job: more pieces, the same merged bytes."""
    base, adapter, _, _ = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    _merge(base, adapter, tmp_path / "default", "--nproc", "2", "--stats", str(tmp_path / "default.json"))
    monkeypatch.setenv("MOE_CONVERT_MERGE_RUN_BYTES", "1")
    monkeypatch.setenv("MOE_CONVERT_READ_AHEAD", "0")
    _merge(base, adapter, tmp_path / "small", "--nproc", "2", "--stats", str(tmp_path / "small.json"))
    _same_files(tmp_path / "default", tmp_path / "small")
    pieces = [json.loads((tmp_path / f"{n}.json").read_text())["skipped"]["total"] for n in ("default", "small")]
    assert pieces[1] > pieces[0], pieces


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
    from convert.plan.dequant import fp8_dequantize
    from quant_fixtures import write_fp8_experts

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



# ----------------------------------------------------------------------------- other producers' packings (issue #24)


def _repack(tensors: dict[str, torch.Tensor], packing: str, E: int, r: int) -> dict[str, torch.Tensor]:
    """A peft 0.21 target_parameters adapter's expert wrappers (lora_A [E*r, in], lora_B [out, E*r] rank-major:
    A_e = A.reshape(E, r, in)[e], B_e = B.reshape(out, r, E)[:, :, e]) repacked as another producer writes the
    same per-expert deltas (tests/test_adapter_producers.py): "peft_0190" (peft < 0.19.1 shapes: lora_A rows B_e^T
    [E*r, out], lora_B [in, E*r] rank-major columns A_e^T), "megatron" (Megatron-Bridge `_mb_pack`: the older shapes,
    lora_B expert-major), "unsloth" (today's shapes, lora_B expert-major: B.reshape(out, E, r)[:, e, :] = B_e)."""
    from test_adapter_producers import _mb_pack

    out = dict(tensors)
    for ka in [k for k in tensors if ".experts." in k and k.endswith("lora_A.weight")]:
        kb = ka.replace("lora_A", "lora_B")
        a, b = tensors[ka], tensors[kb]
        a_e = a.reshape(E, r, a.shape[1])  # [E, r, in]
        b_e = b.reshape(b.shape[0], r, E).permute(2, 0, 1)  # [E, out, r]
        if packing == "peft_0190":
            out[ka] = b_e.transpose(1, 2).reshape(E * r, b.shape[0])
            out[kb] = a_e.permute(2, 1, 0).reshape(a.shape[1], r * E)  # [in, r, E] rank-major
        elif packing == "megatron":
            out[ka], out[kb] = _mb_pack(a_e, b_e)
        else:
            out[kb] = b_e.permute(1, 0, 2).reshape(b.shape[0], E * r)  # [out, E, r] expert-major
    return out


@pytest.mark.parametrize("packing", ["peft_0190", "megatron", "unsloth"])
def test_other_packings_merge_as_peft_merges_the_original(tmp_path, packing):
    """The same LoRA as a peft 0.21 adapter, repacked in an older peft's shapes, Megatron-Bridge's packed export or
    Unsloth's expert-major lora_B (each with what adapter_config.json says of it): the merge equals peft's
    merge_and_unload of the original, and --verify agrees."""
    from adapter_fixtures import read_adapter
    from model_fixtures import E

    base, adapter, ref, _ = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    tensors, cfg = read_adapter(adapter)
    cfg = {k: v for k, v in cfg.items() if k != "peft_version"}
    if packing == "peft_0190":
        cfg["peft_version"] = "0.19.0"
    elif packing == "megatron":
        cfg["lora_B_layout"] = "grouped_by_expert"  # no peft_version: the marker decides the lora_B order
    else:
        cfg["peft_version"] = "0.21.2"
        cfg["lora_B_layout"] = "grouped_by_expert"
    packed = write_adapter(tmp_path / packing, _repack(tensors, packing, E, 3), cfg)
    _merge(base, packed, tmp_path / "out", "--nproc", "2", "--verify")
    assert _compare(tmp_path / "out", base, ref) > 0
    # read as peft's own packing, the deltas would differ: the packing is what the merge honoured
    if packing != "peft_0190":
        write_adapter(tmp_path / "as-peft", _repack(tensors, packing, E, 3),
                      {k: v for k, v in cfg.items() if k != "lora_B_layout"} | {"peft_version": "0.21.2"})
        p = _merge(base, tmp_path / "as-peft", tmp_path / "wrong", check=False)
        if p.returncode == 0:  # today's shapes (unsloth) read rank-major: other deltas
            wrong, ours = load_dir(tmp_path / "wrong"), load_dir(tmp_path / "out")
            assert any(not torch.equal(wrong[k], ours[k]) for k in ours if ".experts." in k)
        else:  # the older shapes contradict peft_version 0.21.2 (megatron)
            assert p.returncode == 2 and "saved it" in p.stderr, p.stderr


def test_other_packing_without_peft_version_or_marker_is_refused(tmp_path):
    """Older peft shapes with neither peft_version nor a lora_B_layout marker: the lora_B order is not in the file
    (NeMo AutoModel rank-major, Megatron-Bridge expert-major): refused, exit 2, nothing written."""
    from adapter_fixtures import read_adapter
    from model_fixtures import E

    base, adapter, _, _ = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    tensors, cfg = read_adapter(adapter)
    cfg = {k: v for k, v in cfg.items() if k != "peft_version"}
    write_adapter(tmp_path / "ambiguous", _repack(tensors, "megatron", E, 3), cfg)
    p = _merge(base, tmp_path / "ambiguous", tmp_path / "out", check=False)
    assert p.returncode == 2 and "lora_B column order" in p.stderr and "grouped_by_expert" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- quantized bases


def _fp8_case(tmp_path: Path, scale: float = 1.0, E: int = 3, H: int = 256, I: int = 200):
    """A tiny FP8 DeepSeek-V3 base (ragged 128-blocks) and an adapter on experts' gate/down and o_proj: (base
    tensors, adapter tensors); the adapter's lora_B scaled by `scale`."""
    from quant_fixtures import write_fp8_experts

    written = write_fp8_experts(tmp_path / "base", E=E, H=H, I=I)
    tensors, r = {}, 4
    for e in range(E):
        for proj, (o, i) in (("gate_proj", (I, H)), ("down_proj", (H, I))):
            m = f"base_model.model.model.layers.1.mlp.experts.{e}.{proj}"
            tensors[f"{m}.lora_A.weight"] = random_lora((r, i), 10 * e + len(proj))
            tensors[f"{m}.lora_B.weight"] = random_lora((o, r), 10 * e + len(proj) + 1) * scale
    m = "base_model.model.model.layers.1.self_attn.o_proj"
    tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = random_lora((r, I), 5), random_lora((H, r), 6) * scale
    write_adapter(tmp_path / "adapter", tensors, lora_config(r, 8, target_modules=["gate_proj", "down_proj", "o_proj"]))
    return written, tensors


def test_fp8_merge_prints_survival_and_warns_where_the_delta_is_lost(tmp_path):
    """The merge itself (no --verify) reports how much of each requantized delta survived, and names the tensors
    whose delta is mostly below the FP8 step (a LoRA 1e-4 times smaller)."""
    _fp8_case(tmp_path, scale=1e-4)
    p = _merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "--nproc", "2")
    assert "fp8 requantized: 7 tensor(s); delta survived: min" in p.stdout, p.stdout
    assert "warning: in 7 requantized tensor(s) the delta is mostly below the quantization step" in p.stderr, p.stderr
    assert "model.layers.1.self_attn.o_proj.weight (" in p.stderr


def test_fp8_base_merged_into_bf16(tmp_path):
    """--dtype bf16 on an FP8 base: every FP8 weight dequantized with its scales (merged ones in float32 first),
    the scale grids and quantization_config dropped, the rest cast; --verify agrees."""
    from convert.plan.dequant import fp8_dequantize

    written, tensors = _fp8_case(tmp_path)
    p = _merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "--nproc", "2", "--dtype", "bf16", "--verify")
    assert "verify merge: OK" in p.stdout and "requantized" not in p.stdout.split("verify merge")[0]
    out = load_dir(tmp_path / "out")
    assert set(out) == {k for k in written if not k.endswith("_scale_inv")}
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert not any(k.endswith("_scale_inv") for k in index["weight_map"])  # the scales' shard is not written
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    for k in ["model.layers.1.self_attn.o_proj.weight", *(f"model.layers.1.mlp.experts.{e}.{p}.weight"
                                                          for e in range(3) for p in ("gate_proj", "down_proj"))]:
        w = fp8_dequantize(written[k], written[k + "_scale_inv"])
        a, b = tensors[f"base_model.model.{k[:-7]}.lora_A.weight"], tensors[f"base_model.model.{k[:-7]}.lora_B.weight"]
        _close(out[k], (torch.matmul(b, a) * 2.0 + w).to(torch.bfloat16), k)
    for e in range(3):  # no LoRA: dequantized exactly as fuse_experts --dtype does
        k = f"model.layers.1.mlp.experts.{e}.up_proj.weight"
        assert torch.equal(out[k], fp8_dequantize(written[k], written[k + "_scale_inv"], dtype=torch.bfloat16))
    assert torch.equal(out["model.norm.weight"], written["model.norm.weight"])


def _mxfp4_gpt_oss(tmp_path: Path, target_parameters: list[str]):
    """A tiny GptOss whose expert weights are MXFP4-representable, saved as released (MXFP4 blocks/scales, config
    quant_method mxfp4), and a peft adapter on it: (base dir, adapter dir, the base's tensors, peft's merged
    parameters, peft's merged model)."""
    from peft import LoraConfig, get_peft_model

    from quant_fixtures import save_tiny_mxfp4_gpt_oss

    base = tmp_path / "base"
    model, saved = save_tiny_mxfp4_gpt_oss(base)
    torch.manual_seed(7)
    pm = get_peft_model(model, LoraConfig(r=3, lora_alpha=7, init_lora_weights=False, target_modules=["q_proj"],
                                          target_parameters=target_parameters)).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    merged = pm.merge_and_unload()
    return base, tmp_path / "adapter", saved, {k: p.detach().clone() for k, p in merged.named_parameters()}, merged


def test_mxfp4_requantize_round_trip_and_rounding():
    """mxfp4_quantize inverts mxfp4_dequantize on MXFP4 values (the original bytes back), rounds to the nearest
    FP4 value (ties to the even code) and stays within half an FP4 step of every value."""
    import numpy as np

    from convert.plan.dequant import mxfp4_dequantize
    from convert.plan.merge_quant import mxfp4_half_step, mxfp4_quantize
    from quant_fixtures import mxfp4_pack, mxfp4_values

    blocks, scales = (t.numpy() for t in mxfp4_pack(mxfp4_values((3, 40, 96), seed=5)))
    again = mxfp4_quantize(mxfp4_dequantize(blocks, scales))
    assert np.array_equal(again[0], blocks) and np.array_equal(again[1], scales)
    x = (torch.randn(5, 7, 128) * 0.03).numpy()
    q, s = mxfp4_quantize(x)
    assert bool((np.abs(mxfp4_dequantize(q, s).astype(np.float64) - x) <= mxfp4_half_step(x, s)).all())
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1] + [0.0] * 23 + [6.0], dtype=np.float32)
    assert mxfp4_dequantize(*mxfp4_quantize(ties)).tolist()[:8] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0]
    assert np.signbit(mxfp4_dequantize(*mxfp4_quantize(ties))[7])  # -0.1 rounds to -0


def test_mxfp4_gpt_oss_base_merged_and_requantized(tmp_path):
    """gpt-oss as released: the gate_up LoRA merged into the MXFP4 blocks, requantized with fresh E8M0 scales
    (within half an FP4 step of peft's merged weight), down_proj's blocks/scales and every other untouched tensor
    byte-identical, the attention LoRA merged; the survival report printed."""
    from convert.plan.dequant import mxfp4_dequantize
    from convert.plan.merge_quant import mxfp4_half_step

    base, adapter, orig, ref, _ = _mxfp4_gpt_oss(tmp_path, ["mlp.experts.gate_up_proj"])
    p = _merge(base, adapter, tmp_path / "out", "--nproc", "2", "--verify")
    assert "mxfp4 requantized:" in p.stdout and "verify merge: OK" in p.stdout, p.stdout
    out = load_dir(tmp_path / "out")
    assert set(out) == set(orig)
    for layer in range(2):
        k = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        want = ref[k].transpose(1, 2)  # [E, out, in]
        got = torch.from_numpy(mxfp4_dequantize(out[k + "_blocks"].numpy(), out[k + "_scales"].numpy()))
        got = got.reshape(want.shape)
        tol = torch.from_numpy(mxfp4_half_step(want.reshape(*want.shape[:2], -1).numpy(), out[k + "_scales"].numpy()))
        tol = tol.reshape(want.shape)
        assert bool(((got.double() - want.double()).abs() <= tol + 1e-6 * want.abs().double()).all()), k
        assert not torch.equal(out[k + "_blocks"], orig[k + "_blocks"])
        d = f"model.layers.{layer}.mlp.experts.down_proj"
        for sfx in ("_blocks", "_scales"):
            assert raw_bytes(out[d + sfx]) == raw_bytes(orig[d + sfx])
    for k in orig:
        if "experts.gate_up_proj_" not in k and "q_proj.weight" not in k:
            assert raw_bytes(out[k]) == raw_bytes(orig[k]), k
    q = "model.layers.0.self_attn.q_proj.weight"
    _close(out[q], ref[q], q)


def test_mxfp4_merge_verified_and_a_corrupted_byte_caught(tmp_path, capsys):
    """--verify of an MXFP4 merge: the base's blocks dequantized, the output's decoded independently, every merged
    value within half an FP4 step of base + delta (a correct merge passes, at 2 ranks); one output byte flipped in a
    merged block: a mismatch, exit 1, the index renamed *.unverified."""
    import argparse

    from convert.verify.merge import verify_merge_after
    from launch.dist import Dist

    base, adapter, orig, _, _ = _mxfp4_gpt_oss(tmp_path, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    p = _merge(base, adapter, tmp_path / "out", "--nproc", "2", "--verify")
    assert "verify merge: OK" in p.stdout and "mxfp4: 45 requantized tensor(s)" in p.stdout, p.stdout
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    k = "model.layers.1.mlp.experts.down_proj_blocks"
    shard = out / index["weight_map"][k]
    with safe_open(str(shard), "pt") as f:
        assert k in f.keys()
    header = json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")])
    at = 8 + int.from_bytes(shard.read_bytes()[:8], "little") + header[k]["data_offsets"][0] + 3 * 16 * 2 + 5
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x77  # both nibbles of one byte of expert 0's blocks
    shard.write_bytes(bytes(data))
    args = argparse.Namespace(src=str(base), adapter=str(adapter), dst=str(out), storage_options={}, family=None)
    assert verify_merge_after(args, Dist(0, 1)) == 1
    err = capsys.readouterr().err
    assert "mismatch:" in err and "down_proj_blocks" in err and "half an FP4 step" in err, err
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors.index.json.unverified").exists()


def test_mxfp4_gpt_oss_base_merged_into_bf16(tmp_path):
    """--dtype bf16 on an MXFP4 base: every expert layer written in gpt-oss's native bf16 layout (merged in float32
    where the adapter has LoRA, dequantized elsewhere), quantization_config dropped, loadable by transformers."""
    base, adapter, orig, ref, merged = _mxfp4_gpt_oss(tmp_path, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    p = _merge(base, adapter, tmp_path / "out", "--dtype", "bf16", "--verify")
    assert "verify merge: OK" in p.stdout, p.stdout + p.stderr
    out = load_dir(tmp_path / "out")
    assert not any(k.endswith(("_blocks", "_scales")) for k in out)
    assert "quantization_config" not in json.loads((tmp_path / "out/config.json").read_text())
    for k, want in ref.items():
        if k in out and not torch.equal(out[k], want.to(torch.bfloat16)):
            _close(out[k], want.to(torch.bfloat16), k)
    assert {k for k in ref if k.endswith(("experts.gate_up_proj", "experts.down_proj"))} <= set(out)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert torch.allclose(logits(loaded), logits(merged), atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- adapter layouts, models, resume, S3


def _close_f32(ours: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to float32's rounding of a delta computed in another order (a few float32 ulps)."""
    assert ours.shape == want.shape, name
    diff = (ours.double() - want.double()).abs()
    tol = 8 * torch.finfo(torch.float32).eps * (want.double().abs() + float(want.abs().max()) * 1e-3)
    assert bool((diff <= tol).all()), f"{name}: max diff {float(diff.max())}"


@pytest.mark.parametrize("layout", ["shared_w123", "grouped"])
def test_shared_w123_and_grouped_adapters(tmp_path, layout):
    """The partially shared w1/w2/w3 layout and NeMo's grouped (x @ A @ B, [gate | up] columns) merge each
    expert's exact delta into a per-expert qwen3_moe base."""
    from adapter_fixtures import make_grouped_adapter, make_shared_w123_adapter
    from model_fixtures import E

    base = save_model(build_model("qwen3_moe", seed=0), tmp_path / "base")
    make = make_shared_w123_adapter if layout == "shared_w123" else make_grouped_adapter
    adapter, deltas = make(tmp_path / "adapter", experts=E, rank=3)
    _merge(base, adapter, tmp_path / "out", "--nproc", "2", "--verify")
    ours, orig = load_dir(tmp_path / "out"), load_dir(base)
    for (layer, role, e), d in deltas.items():
        key = f"model.layers.{layer}.mlp.experts.{e}.{role}_proj.weight"
        _close_f32(ours[key], orig[key].float() + d, key)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[q], orig[q])


def _deepseek_v3(dtype: torch.dtype):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                           n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                           topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                           v_head_dim=8)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.05)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_v3_with_router_lora_matches_peft(tmp_path, dtype):
    """A tiny transformers DeepSeek-V3 (fused experts, a TopkRouter `mlp.gate.weight`, shared experts): expert,
    router and attention LoRA merged as peft's merge_and_unload merges them (float32: within its rounding;
    bf16: within one bf16 ulp, peft rounding the delta first)."""
    from peft import LoraConfig, get_peft_model

    base = save_model(_deepseek_v3(dtype), tmp_path / "base")
    model = _deepseek_v3(dtype)
    torch.manual_seed(7)
    pm = get_peft_model(model, LoraConfig(r=3, lora_alpha=7, init_lora_weights=False, target_modules=["o_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                             "mlp.gate.weight"])).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    save_model(pm.merge_and_unload(), tmp_path / "peft-merged")
    ref, orig = load_dir(tmp_path / "peft-merged"), load_dir(base)
    _merge(base, tmp_path / "adapter", tmp_path / "out", "--nproc", "2", "--verify")
    ours = load_dir(tmp_path / "out")
    assert set(ours) == set(orig) == set(ref)
    router = "model.layers.1.mlp.gate.weight"
    assert not torch.equal(orig[router], ref[router])
    changed = 0
    for k, t in ours.items():
        if torch.equal(orig[k], ref[k]):
            assert raw_bytes(t) == raw_bytes(orig[k]), k
            continue
        changed += 1
        if dtype == torch.float32:
            _close_f32(t, ref[k], k)
        else:  # peft: round(W + round(delta)); ours: round(W + delta): apart by the ulps of the delta and the sum
            delta = (ref[k].double() - orig[k].double()).abs()
            diff = (t.double() - ref[k].double()).abs()
            big = torch.maximum(torch.maximum(t.abs(), ref[k].abs()).double(), delta)
            assert bool((diff <= _ulp(big.to(torch.bfloat16)).double() * 2).all()), k
    assert changed >= 4  # experts' gate_up_proj / down_proj, the router, o_proj


def test_merge_resumes_after_a_rank_is_killed(tmp_path, monkeypatch):
    """A rank killed mid-merge leaves no index; the same command resumes and gives the bytes of an
    uninterrupted merge."""
    base, adapter, _, _ = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    _merge(base, adapter, tmp_path / "clean")
    out = tmp_path / "out"
    monkeypatch.setenv("MOE_CONVERT_JOURNAL_BYTES", "4000")
    monkeypatch.setenv("MOE_CONVERT_CRASH_AFTER", "1:12000")
    crashed = _merge(base, adapter, out, "--nproc", "2", check=False)
    assert crashed.returncode != 0 and not (out / "model.safetensors.index.json").exists()
    monkeypatch.delenv("MOE_CONVERT_CRASH_AFTER")
    stats = tmp_path / "stats.json"
    _merge(base, adapter, out, "--nproc", "2", "--stats", str(stats))
    assert json.loads(stats.read_text())["resumed"] is True
    _same_files(tmp_path / "clean", out)


def test_merge_reads_and_writes_s3(s3env, tmp_path):
    """Base and adapter on S3 (moto), the merged checkpoint written to S3 and to a local directory (the pieces
    computed from fetched bytes, an expert at a time): the bytes of a local merge."""
    fs = s3env
    base, adapter, _, _ = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    _merge(base, adapter, tmp_path / "local")
    fs.put(str(base), f"{BUCKET}/base", recursive=True)
    fs.put(str(adapter), f"{BUCKET}/adapter", recursive=True)
    run_tool(MOD, "--base", f"s3://{BUCKET}/base", "--adapter", f"s3://{BUCKET}/adapter", "--dst",
             f"s3://{BUCKET}/out", "--nproc", "2", "--verify")
    fs.get(f"{BUCKET}/out", str(tmp_path / "s3out"), recursive=True)
    _same_files(tmp_path / "local", tmp_path / "s3out")
    run_tool(MOD, "--base", f"s3://{BUCKET}/base", "--adapter", f"s3://{BUCKET}/adapter", "--dst",
             str(tmp_path / "from-s3"), "--nproc", "2")
    _same_files(tmp_path / "local", tmp_path / "from-s3")
    assert (tmp_path / "s3out/model.safetensors.index.json").read_bytes() == \
        (tmp_path / "local/model.safetensors.index.json").read_bytes()


def test_modules_to_save_replace_the_base_tensors(tmp_path):
    """peft's modules_to_save (lm_head, the final norm): the adapter's trained copy replaces the base tensor, as
    merge_and_unload does; the LoRA beside it is merged."""
    base, adapter, ref, merged = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                            modules_to_save=["lm_head", "model.norm"])
    _merge(base, adapter, tmp_path / "out", "--nproc", "2", "--verify")
    assert _compare(tmp_path / "out", base, ref) > 0
    ours = load_dir(tmp_path / "out")
    for k in ("lm_head.weight", "model.norm.weight"):
        assert torch.equal(ours[k], ref[k]), k
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.allclose(logits(loaded), logits(merged), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,cols,sname,tile", [(256, 384, "F32", 0), (200, 300, "F32", 0), (130, 128, "F8_E8M0", 0),
                                                  (5, 7, "F32", 0), (200, 300, "F32", 128),
                                                  (256, 384, "F8_E8M0", 300), (130, 640, "BF16", 256),
                                                  (5, 7, "F32", 128), (136, 2500, "F32", None)])
def test_merge_fp8_block_rows_equal_the_whole_tensor_formula(rows, cols, sname, tile):
    """merge_fp8 (a block row, or a tile of `tile` columns of one, at a time, in scratch; a tile width that is
    not a multiple of the block's is rounded down to one; None: merge_quant.TILE_COLS) gives the bytes of the
    whole-tensor formula of FORMATS.md: W dequantized (fp8 * scale), + s * B @ A, fresh scale amax / 448 per 128x128 block (zero padding of ragged
    edge blocks, a power of two for E8M0, 1 for an all-zero block), each value / scale clamped to +-448; and its
    survival sums match float64 sums over the whole tensor."""
    from convert.plan.dequant import fp8_dequantize
    from convert.plan.merge_quant import merge_fp8

    g = torch.Generator().manual_seed(rows * cols)
    bm = bn = 128
    gr, gc = -(-rows // bm), -(-cols // bn)
    sdtype = {"F32": torch.float32, "F8_E8M0": torch.float8_e8m0fnu, "BF16": torch.bfloat16}[sname]
    e8m0 = sname == "F8_E8M0"
    w = (torch.randn(rows, cols, generator=g) * 30).to(torch.float8_e4m3fn)
    w[: min(rows, bm), : min(cols, bn)] = 0  # an all-zero block, kept zero by a zero delta there below
    scale = (torch.rand(gr, gc, generator=g) + 0.5).to(sdtype)
    a, b = torch.randn(4, cols, generator=g), torch.randn(rows, 4, generator=g)
    b[: min(rows, bm)] = 0
    q, grid = torch.empty_like(w), torch.empty_like(scale)
    def held(t: torch.Tensor):  # as convert.plan.ndarrays holds the scale dtype
        return t.numpy() if sname == "F32" else t.view(torch.uint8 if e8m0 else torch.int16).numpy()

    dd, gd, err, want2 = merge_fp8(w.view(torch.uint8).numpy(), "F8_E4M3", held(scale), sname, a.numpy(), b.numpy(),
                                   0.5, (bm, bn), q.view(torch.uint8).numpy(), held(grid), tile)

    base = fp8_dequantize(w, scale, (bm, bn))
    delta = torch.from_numpy(b.numpy() @ a.numpy()).mul_(0.5)  # the product as the merge's library rounds it
    merged = delta + base
    padded = torch.zeros(gr * bm, gc * bn)
    padded[:rows, :cols] = merged
    blocks = padded.view(gr, bm, gc, bn)
    amax = blocks.abs().amax(dim=(1, 3))
    fresh = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    if e8m0:
        fresh = torch.exp2(torch.ceil(torch.log2(fresh)))
    stored = fresh.to(sdtype)
    want_q = (blocks / stored.float()[:, None, :, None]).clamp(-448, 448).view(gr * bm, gc * bn)[:rows, :cols]
    assert torch.equal(grid.view(torch.uint8), stored.view(torch.uint8))
    assert torch.equal(q.view(torch.uint8), want_q.to(torch.float8_e4m3fn).view(torch.uint8))
    got = fp8_dequantize(q, grid, (bm, bn)).double()
    d64, g64 = delta.double(), got - base.double()
    for value, want in ((dd, (d64 * d64).sum()), (gd, (g64 * d64).sum()), (err, ((g64 - d64) ** 2).sum()),
                        (want2, (merged.double() ** 2).sum())):
        assert value == pytest.approx(float(want), rel=1e-4, abs=1e-9)


def _without_torch(tmp_path: Path, *args: str) -> None:
    """Run the merge with `args` where `import torch` fails (a stand-in package first on the path)."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    poison = tmp_path / "no-torch" / "torch"
    poison.mkdir(parents=True, exist_ok=True)
    (poison / "__init__.py").write_text("raise ImportError('the merge imported torch')\n")
    env = dict(os.environ, PYTHONPATH=f"{poison.parent}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", MOD, *args, "--no-progress"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr


def test_merge_computes_without_torch(tmp_path):
    """bf16 experts and attention (peft target_parameters), an FP8 base and an MXFP4 gpt-oss base, requantized or
    written as bf16: the merge never imports torch (its start-up is numpy's, 0.07 s, not torch's 1-6 s), and gives at 2 ranks the bytes
    of a 1-rank merge where torch is importable."""
    base, adapter, _, _ = _peft_case(tmp_path, "qwen3_moe", target_modules=["q_proj"],
                                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    fp8, mx = tmp_path / "fp8", tmp_path / "mx"
    _fp8_case(fp8)
    mx.mkdir()
    mx_base, mx_adapter, _, _, _ = _mxfp4_gpt_oss(mx, ["mlp.experts.gate_up_proj"])
    cases = [(base, adapter, ()), (fp8 / "base", fp8 / "adapter", ()),
             (fp8 / "base", fp8 / "adapter", ("--dtype", "bf16")), (mx_base, mx_adapter, ()),
             (mx_base, mx_adapter, ("--dtype", "bf16"))]
    for i, (b, a, extra) in enumerate(cases):
        _without_torch(tmp_path, "--base", str(b), "--adapter", str(a), "--dst", str(tmp_path / f"bare{i}"), "--nproc",
                       "2", *extra)
        _merge(b, a, tmp_path / f"with{i}", *extra)
        _same_files(tmp_path / f"with{i}", tmp_path / f"bare{i}")


@pytest.mark.parametrize("w_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
def test_merge_into_rounds_once_as_torch_does(w_dtype, out_dtype, monkeypatch):
    """merge_into (row tiles, numpy): `w + s * (b @ a)` in float32 in peft's order, rounded once to the output
    dtype, bit for bit what torch gives for the same product (a ragged last tile of rows included)."""
    import numpy as np

    from convert.plan import merge_quant as merge_mod
    from convert.plan import ndarrays as nd

    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 96, generator=g).to(torch_dtype[w_dtype])
    a, b = torch.randn(8, 96, generator=g) * 0.1, torch.randn(300, 8, generator=g) * 0.1
    held = w.numpy() if w_dtype != "BF16" else w.view(torch.int16).numpy().view(np.uint16)
    out = nd.empty((300, 96), out_dtype)
    monkeypatch.setattr(merge_mod, "MERGE_TILE", 96 * 64)  # 64-row tiles: 4 full and a ragged one
    merge_mod.merge_into(held, w_dtype, a.numpy(), b.numpy(), 0.7, out, out_dtype)
    want = (torch.from_numpy(b.numpy() @ a.numpy()) * 0.7 + w.float()).to(torch_dtype[out_dtype])
    bits = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32}[out_dtype]
    assert np.array_equal(out.view(want.view(bits).numpy().dtype), want.view(bits).numpy())
