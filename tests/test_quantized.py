"""Quantized experts: FP8 block-scaled checkpoints fuse and split losslessly with their scales, and no
expert tensor the family does not know passes through a conversion (or a verify) unnoticed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import load_dir, raw_bytes, run_tool
from quant_fixtures import mxfp4_pack, mxfp4_values, write_fp8_experts, write_mxfp4_gpt_oss

E, H, I = 3, 256, 200  # I % 128 != 0: ragged scale grids; E not a power of two


def transformers_fused(src: dict[str, torch.Tensor], model_type: str, suffix: str) -> dict[str, torch.Tensor]:
    """What transformers holds after loading per-expert FP8 tensors `src`: its model type's converters, with
    the FP8 quantizer's `update_weight_conversions` (scale companions), applied by its own ops."""
    from transformers import AutoConfig, FineGrainedFP8Config
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=(128, 128)), pre_quantized=True)
    fused_names = ("gate_up_proj", "down_proj", f"gate_up_proj{suffix}", f"down_proj{suffix}")

    class Params:  # what the quantizer reads of the model: the FP8 experts' parameter names (by name only) and,
        # from transformers 5.25, `config.model_type` (a real config of the model type)
        config = AutoConfig.for_model(model_type)

        def named_parameters(self) -> list[tuple[str, None]]:
            return [(f"model.layers.1.mlp.experts.{n}", None) for n in fused_names]

    out: dict[str, torch.Tensor] = {}
    for conv in quantizer.update_weight_conversions(get_checkpoint_conversion_mapping(model_type), Params()):
        if not isinstance(conv, WeightConverter):
            continue
        sources, targets = conv._original_source_patterns, conv._original_target_patterns
        if not all(s.startswith("mlp.experts.*.") for s in sources):
            continue
        for layer in sorted({k.split(".mlp.")[0] for k in src if ".mlp.experts." in k}):
            data = {s: [src[f"{layer}.{s.replace('*', str(e))}"] for e in range(E)] for s in sources}
            if not all(f"{layer}.{s.replace('*', '0')}" in src for s in sources):
                continue
            for op in conv.operations:
                data = op.convert(data, source_patterns=sources, target_patterns=targets)
            (target, tensor), = data.items()
            out[f"{layer}.{target}"] = tensor
    return out


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_fp8_fuse_split_round_trip_is_byte_identical(tmp_path: Path, nproc: int) -> None:
    src = tmp_path / "src"
    tensors = write_fp8_experts(src, E=E, H=H, I=I, layers=3)
    fused, split = tmp_path / "fused", tmp_path / "split"
    n = [] if nproc == 1 else ["--nproc", str(nproc)]
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fused), "--verify", *n)
    out = load_dir(fused)
    p = "model.layers.1.mlp.experts"
    rows, cols = math.ceil(I / 128), math.ceil(H / 128)
    assert out[f"{p}.gate_up_proj"].dtype == torch.float8_e4m3fn and out[f"{p}.gate_up_proj"].shape == (E, 2 * I, H)
    assert out[f"{p}.gate_up_proj_scale_inv"].shape == (E, 2 * rows, cols)
    assert out[f"{p}.down_proj_scale_inv"].shape == (E, cols, rows)
    assert not [k for k in out if ".experts." in k and ".experts.gate_up" not in k and ".experts.down" not in k]
    expected = transformers_fused(tensors, "deepseek_v3", "_scale_inv")
    assert sorted(k for k in out if ".experts." in k) == sorted(expected)
    for k, t in expected.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape and raw_bytes(out[k]) == raw_bytes(t), k
    run_tool("convert.split_experts", "--src", str(fused), "--dst", str(split), "--verify", *n)
    back = load_dir(split)
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and raw_bytes(back[k]) == raw_bytes(t), k


@pytest.mark.parametrize("scale_dtype,suffix,model_type", [
    (torch.bfloat16, "weight_scale_inv", "qwen3_moe"),
    (torch.float8_e8m0fnu, "weight_scale_inv", "deepseek_v3"),
    (torch.float32, "weight_scale", "qwen3_moe"),
])
def test_fp8_scale_dtypes_and_names(tmp_path: Path, scale_dtype: torch.dtype, suffix: str, model_type: str) -> None:
    src, fused, split = tmp_path / "src", tmp_path / "fused", tmp_path / "split"
    tensors = write_fp8_experts(src, E=E, H=H, I=I, scale_dtype=scale_dtype, scale_suffix=suffix, model_type=model_type)
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fused), "--verify")
    out = load_dir(fused)
    fused_suffix = suffix.removeprefix("weight")
    scale = out[f"model.layers.1.mlp.experts.gate_up_proj{fused_suffix}"]
    assert scale.dtype == scale_dtype and scale.shape == (E, 2 * math.ceil(I / 128), math.ceil(H / 128))
    if suffix == "weight_scale_inv":
        expected = transformers_fused(tensors, model_type, fused_suffix)
        for k, t in expected.items():
            assert raw_bytes(out[k]) == raw_bytes(t), k
    run_tool("convert.split_experts", "--src", str(fused), "--dst", str(split))
    back = load_dir(split)
    assert sorted(back) == sorted(tensors)
    assert all(raw_bytes(back[k]) == raw_bytes(t) and back[k].dtype == t.dtype for k, t in tensors.items())


def test_unknown_expert_companion_is_refused_naming_it(tmp_path: Path) -> None:
    """A per-expert tensor next to the weights that no rule describes is refused (exit 2), never copied through."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_fp8_experts(src, E=E, H=H, I=I, scale_suffix="weight_qscale")
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(dst), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "model.layers.1.mlp.experts.0.down_proj.weight_qscale" in proc.stderr or "weight_qscale" in proc.stderr
    assert not (dst / "model.safetensors.index.json").exists()


def test_fused_stray_scale_is_refused_on_split(tmp_path: Path) -> None:
    """A fused layer with an expert tensor the family does not know (`experts.gate_up_proj_blocks`) is refused."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    p = "model.layers.1.mlp.experts"
    tensors = {f"{p}.gate_up_proj": torch.zeros(E, 8, 4), f"{p}.down_proj": torch.zeros(E, 4, 4),
               f"{p}.gate_up_proj_blocks": torch.zeros(E, 8, 1, 16, dtype=torch.uint8)}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": E}))
    proc = run_tool("convert.split_experts", "--src", str(src), "--dst", str(dst), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{p}.gate_up_proj_blocks" in proc.stderr


def test_verify_catches_per_expert_scales_copied_next_to_fused_weights(tmp_path: Path) -> None:
    """The silent hole of issue 13: fused weights with the per-expert scales passed through unchanged."""
    src, good, bad = tmp_path / "src", tmp_path / "good", tmp_path / "bad"
    tensors = write_fp8_experts(src, E=E, H=H, I=I)
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(good))
    shutil.copytree(good, bad)
    out = load_dir(good)
    wrong = {k: v for k, v in out.items() if not k.endswith("_scale_inv")}
    wrong.update({k: v for k, v in tensors.items() if k.endswith("weight_scale_inv")})
    for f in bad.glob("*.safetensors"):
        f.unlink()
    save_file(wrong, str(bad / "model.safetensors"), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in wrong.values())
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: "model.safetensors" for k in wrong}}))
    proc = run_tool("convert.verify", "--src", str(src), "--dst", str(bad), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "weight_scale_inv" in proc.stdout + proc.stderr
    assert run_tool("convert.verify", "--src", str(src), "--dst", str(good)).returncode == 0


def test_companions_follow_concat_and_transpose_not_interleave() -> None:
    """Scale grids go through the weight's ops only where those keep 128x128 blocks whole."""
    import dataclasses

    from convert.errors import ConversionError
    from convert.families import load_families
    from convert.families.family import DEFAULT_COMPANIONS

    fams = load_families()
    qwen = fams["qwen3_moe"].with_companions(["_scale_inv"])
    assert qwen.role_leaves["gate_scale_inv"] == "gate_proj.weight_scale_inv" and not qwen.companions_dropped
    twin = {t.leaf: t.parts for t in qwen.fused["transformers"]}
    assert twin["gate_up_proj_scale_inv"] == ("gate_scale_inv", "up_scale_inv")
    assert {t.leaf for t in qwen.fused["stacked"]} >= {"gate_proj_scale_inv", "up_proj_scale_inv", "down_proj_scale_inv"}
    assert fams["qwen3_moe"].companions_in(["model.layers.1.mlp.experts.gate_up_proj_scale_inv"]) == ["_scale_inv"]
    gpt = dataclasses.replace(fams["gpt_oss"], companions=dict(DEFAULT_COMPANIONS))  # native interleaves gate/up
    with pytest.raises(ConversionError, match="interleave"):
        gpt.with_companions(["_scale_inv"])


def test_mxfp4_packer_agrees_with_transformers_unpacking() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    values = mxfp4_values((3, 40, 96), seed=5)
    blocks, scales = mxfp4_pack(values)
    assert blocks.shape == (3, 40, 3, 16) and scales.shape == (3, 40, 3) and blocks.dtype == scales.dtype == torch.uint8
    unpacked = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out], as gpt-oss runs it
    assert torch.equal(unpacked, values.transpose(1, 2))
    assert torch.equal(torch.signbit(unpacked), torch.signbit(values.transpose(1, 2)))  # -0 kept as -0


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_mxfp4_gpt_oss_split_and_fuse_back_byte_identical(tmp_path: Path, nproc: int) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src, split, fused = tmp_path / "src", tmp_path / "split", tmp_path / "fused"
    tensors, values = write_mxfp4_gpt_oss(src, E=E, H=64, I=96, layers=2)
    n = [] if nproc == 1 else ["--nproc", str(nproc)]
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(split), "--verify", "--allow-unread-layout", *n)
    pe = load_dir(split)
    p = "model.layers.1.mlp.experts"
    assert pe[f"{p}.0.gate_proj.weight_blocks"].shape == (96, 2, 16) and pe[f"{p}.0.down_proj.weight_scales"].shape == (64, 3)
    assert not [k for k in pe if ".experts." in k and not k.startswith(("model.layers.0.mlp.experts.", f"{p}."))]
    for e in range(E):  # expert e's gate rows are the even rows of the fused tensors (gate/up interleaved)
        for role, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
            blocks, scales = pe[f"{p}.{e}.{role}_proj.weight_blocks"], pe[f"{p}.{e}.{role}_proj.weight_scales"]
            assert torch.equal(pe[f"{p}.{e}.{role}_proj.bias"], tensors[f"{p}.gate_up_proj_bias"][e, rows])
            # what the per-expert tensors hold is the weight of nn.Linear(H, I) ([out, in]) as transformers dequantizes it
            w = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].T
            assert torch.equal(w, values[f"{p}.gate_up_proj"][e, rows])
        w = convert_moe_packed_tensors(pe[f"{p}.{e}.down_proj.weight_blocks"][None],
                                       pe[f"{p}.{e}.down_proj.weight_scales"][None], dtype=torch.float32)[0].T
        assert torch.equal(w, values[f"{p}.down_proj"][e])
    run_tool("convert.fuse_experts", "--src", str(split), "--dst", str(fused), "--verify", *n)
    back = load_dir(fused)
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and raw_bytes(back[k]) == raw_bytes(t), k
    assert json.loads((fused / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"


def transformers_dequantized(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' dequantization of one FP8 weight: its loader's `Fp8Dequantize` where the 128x128 grid divides
    the weight, else (that op infers the block from the grid, wrong for ragged edges) its 128x128
    `_dequantize_fp8_weight` in float32, cast."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    if w.shape[-2] % 128 == 0 and w.shape[-1] % 128 == 0:
        quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=(128, 128)), pre_quantized=True)
        return Fp8Dequantize(quantizer)._dequantize_one(w, s, dtype)
    return _dequantize_fp8_weight(w, s, [128, 128], torch.float32).to(dtype)


@pytest.mark.parametrize("inter,dtype,nproc", [(200, "bf16", 1), (128, "fp16", 2), (200, "fp32", 3)])
def test_fp8_dequantize_while_fusing_and_splitting(tmp_path: Path, inter: int, dtype: str, nproc: int) -> None:
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    src, fused, fused_q, split = tmp_path / "src", tmp_path / "fused", tmp_path / "fq", tmp_path / "split"
    tensors = write_fp8_experts(src, E=E, H=H, I=inter)
    n = [] if nproc == 1 else ["--nproc", str(nproc)]
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fused), "--dtype", dtype, *n)
    out = load_dir(fused)
    expected = {}
    for k, t in tensors.items():
        if k.endswith("weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            expected[k] = transformers_dequantized(t, tensors[f"{k}_scale_inv"], tdtype)
        else:
            expected[k] = t.to(tdtype)
    p = "model.layers.1.mlp.experts"
    for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        want = torch.stack([torch.cat([expected.pop(f"{p}.{e}.{r}.weight") for r in parts]) for e in range(E)])
        expected[f"{p}.{name}"] = want
    assert sorted(out) == sorted(expected)
    for k, t in expected.items():
        assert out[k].dtype == tdtype and raw_bytes(out[k]) == raw_bytes(t), k
    cfg = json.loads((fused / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    # from a fused FP8 checkpoint to per-expert, dequantized: the same values
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fused_q))
    run_tool("convert.split_experts", "--src", str(fused_q), "--dst", str(split), "--dtype", dtype, *n)
    back = load_dir(split)
    assert not [k for k in back if "scale" in k]
    for e in range(E):
        gate_up = out[f"{p}.gate_up_proj"][e]
        assert raw_bytes(back[f"{p}.{e}.gate_proj.weight"]) == raw_bytes(gate_up[:inter])
        assert raw_bytes(back[f"{p}.{e}.up_proj.weight"]) == raw_bytes(gate_up[inter:])
        assert raw_bytes(back[f"{p}.{e}.down_proj.weight"]) == raw_bytes(out[f"{p}.down_proj"][e])
    assert raw_bytes(back["model.layers.1.self_attn.o_proj.weight"]) == raw_bytes(out["model.layers.1.self_attn.o_proj.weight"])


@pytest.mark.parametrize("dtype,nproc", [("bf16", 1), ("fp32", 2), ("fp16", 2)])
def test_mxfp4_dequantize_while_converting(tmp_path: Path, dtype: str, nproc: int) -> None:
    """--dtype on gpt-oss MXFP4: native output == transformers' convert_moe_packed_tensors of the same blocks/scales
    bit for bit ([E, H, 2I], gate/up interleaved), per-expert output its rows, biases cast; quantization_config gone."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    src, native, split = tmp_path / "src", tmp_path / "native", tmp_path / "split"
    tensors, _ = write_mxfp4_gpt_oss(src, E=E, H=64, I=96, layers=2)
    n = [] if nproc == 1 else ["--nproc", str(nproc)]
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(native), "--layout", "native", "--dtype", dtype, *n)
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(split), "--dtype", dtype, "--allow-unread-layout",
             *n)
    out, pe = load_dir(native), load_dir(split)
    expected = {}
    for k, t in tensors.items():
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            expected[base] = convert_moe_packed_tensors(t, tensors[f"{base}_scales"], dtype=tdtype)
        elif not k.endswith("_scales"):
            expected[k] = t.to(tdtype)
    assert sorted(out) == sorted(expected)
    for k, t in expected.items():
        assert out[k].dtype == tdtype and out[k].shape == t.shape and raw_bytes(out[k]) == raw_bytes(t), k
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        assert out[f"{p}.gate_up_proj"].shape == (E, 64, 2 * 96)
        for e in range(E):
            gu, gub = expected[f"{p}.gate_up_proj"][e], expected[f"{p}.gate_up_proj_bias"][e]
            for j, role in enumerate(("gate", "up")):
                assert raw_bytes(pe[f"{p}.{e}.{role}_proj.weight"]) == raw_bytes(gu[:, j::2].T.contiguous())
                assert raw_bytes(pe[f"{p}.{e}.{role}_proj.bias"]) == raw_bytes(gub[j::2].contiguous())
            assert raw_bytes(pe[f"{p}.{e}.down_proj.weight"]) == raw_bytes(expected[f"{p}.down_proj"][e].T.contiguous())
    assert not [k for k in pe if k.endswith(("_blocks", "_scales"))]
    for d in (native, split):
        cfg = json.loads((d / "config.json").read_text())
        assert "quantization_config" not in cfg
        assert cfg["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]


def test_inspect_reports_the_quantization(tmp_path: Path) -> None:
    from convert.inspect.report import inspect_path, render_text

    fp8 = tmp_path / "fp8"
    write_fp8_experts(fp8, E=E, H=H, I=I, scale_dtype=torch.bfloat16)
    out = inspect_path(str(fp8)).as_json()
    assert out["outcome"] == "converted" and out["layout"] == "per_expert"
    assert out["quantization"] == {"method": "fp8", "block_size": [128, 128], "scale_dtypes": ["BF16"],
                                   "scales": ["scale_inv"], "dequantize": True}
    assert "fuse_experts --layout transformers" in out["conversions"]
    assert any("dequantize" in c for c in out["conversions"])
    assert "quantization: fp8, blocks 128x128, scales BF16" in render_text(inspect_path(str(fp8)))
    mx = tmp_path / "mxfp4"
    write_mxfp4_gpt_oss(mx, E=E)
    out = inspect_path(str(mx)).as_json()
    assert (out["family"], out["layout"], out["conversions"]) == ("gpt_oss_mxfp4", "native", [
        "split_experts --allow-unread-layout -> per-expert (no consumer reads it)",
        "--dtype bf16|fp16|fp32 (dequantize while converting)"])
    assert out["quantization"]["method"] == "mxfp4" and out["quantization"]["dequantize"] is True


def test_dequantized_output_loads_to_the_logits_of_the_quantized_source(tmp_path: Path) -> None:
    """from_pretrained of `fuse_experts --dtype fp32` output == from_pretrained of the FP8 source (which transformers
    dequantizes on CPU): same parameters bit for bit, and the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from quant_fixtures import fp8_quantize
    from tiny_models import build, logits

    build("deepseek_v3").save_pretrained(tmp_path / "model", max_shard_size="100KB")
    (tmp_path / "fp8").mkdir()
    index = json.loads((tmp_path / "model/model.safetensors.index.json").read_text())
    weight_map = {}
    for f in sorted(set(index["weight_map"].values())):
        out = {}
        for k, t in load_file(tmp_path / "model" / f).items():
            if (".experts." in k and k.endswith(".weight")) or k.endswith("self_attn.o_proj.weight"):
                out[k], out[f"{k}_scale_inv"] = fp8_quantize(t.float())
            else:
                out[k] = t
        save_file(out, str(tmp_path / "fp8" / f), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, f))
    (tmp_path / "fp8/model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((tmp_path / "model/config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (tmp_path / "fp8/config.json").write_text(json.dumps(cfg))
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "fp8"), "--dst", str(tmp_path / "out"), "--dtype", "fp32",
             nproc=2)
    src = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((tmp_path / "out/config.json").read_text())
    sa, sb = src.state_dict(), out.state_dict()
    assert sorted(sa) == sorted(sb) and all(raw_bytes(sa[k]) == raw_bytes(sb[k]) for k in sa)
    with torch.no_grad():  # parameters mmapped from a file can sit at addresses that change float rounding
        for model in (src, out):
            for p in model.parameters():
                p.data = p.data.clone()
    assert torch.equal(logits(src), logits(out))


def test_verify_of_a_dequantizing_cast_is_refused_before_writing(tmp_path):
    """--verify cannot check dequantized values: the combination is refused up front (exit 2), on every rank."""
    src = tmp_path / "fp8"
    write_fp8_experts(src)
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "out"), "--dtype", "bf16",
                    "--verify", "--nproc", "2", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "is fp8-quantized and the verifier does not check dequantized values" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_mxfp4_dequantized_native_output_loads_to_the_reference_logits(tmp_path: Path) -> None:
    """A tiny GptOss whose expert weights are MXFP4-representable: its MXFP4 checkpoint dequantized with
    `fuse_experts --layout native --dtype fp32` loads in transformers to the reference model's parameters bit for
    bit and the same logits."""
    from transformers import AutoModelForCausalLM

    from quant_fixtures import save_tiny_mxfp4_gpt_oss
    from tiny_models import logits

    src, out = tmp_path / "src", tmp_path / "out"
    model, _ = save_tiny_mxfp4_gpt_oss(src)
    params = dict(model.named_parameters())
    want = logits(model)
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), "--layout", "native", "--dtype", "fp32")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded_params = dict(loaded.named_parameters())
    for k, p in params.items():
        assert torch.equal(loaded_params[k], p), k
    assert torch.equal(logits(loaded), want)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("rows,cols", [(256, 384), (200, 300), (129, 127), (3, 5)])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_dequantize_matches_torch_conversion_bit_for_bit(fp8: torch.dtype, rows: int, cols: int,
                                                             out: torch.dtype) -> None:
    """fp8_dequantize (convert.plan.ndarrays' integer decode) gives torch's own float32 conversion of every code,
    NaN codes included, times the 128x128 block's scale, rounded once, then cast once."""
    from convert.plan.dequant import fp8_dequantize

    g = torch.Generator().manual_seed(rows * cols)
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[: codes.numel()]
    w = codes.view(fp8)
    scale = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) + 0.5
    full = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    want = (w.float() * full).to(out)
    got = fp8_dequantize(w, scale, (128, 128), out)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[out]
    assert got.dtype == out and torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("rows,cols", [(256, 384), (129, 127), (3, 5)])
def test_fp8_dequantize_of_finite_codes_matches_torch_bit_for_bit(fp8: torch.dtype, rows: int, cols: int) -> None:
    """fp8_dequantize of finite codes (ragged blocks): torch's conversion times the block's scale, rounded once,
    in float32 and bf16."""
    from convert.plan.dequant import fp8_dequantize

    g = torch.Generator().manual_seed(rows + cols)
    w = (torch.randn(rows, cols, generator=g) * 50).to(fp8)
    scale = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) + 0.5
    full = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    for out, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        got, want = fp8_dequantize(w, scale, (128, 128), out), (w.float() * full).to(out)
        assert torch.equal(got.view(bits), want.view(bits)), out
