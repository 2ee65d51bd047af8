"""Base-weight fuse/split against real transformers models, with real multi-process torchrun jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import load_dir, raw_bytes, run_tool
from model_fixtures import E, H, I, build_model, logits, save_model

PER_EXPERT_NAMES = {
    "qwen3_moe": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    "mixtral": ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight",
                "block_sparse_moe.experts.{e}.w2.weight"),
}


@pytest.fixture(scope="module", params=[("qwen3_moe", 2), ("mixtral", 3)], ids=["qwen3_moe-2ranks", "mixtral-3ranks"])
def fused_case(request, tmp_path_factory):
    """A saved per-expert model and its fuse with torchrun at 2 or 3 ranks."""
    family, nproc = request.param
    root = tmp_path_factory.mktemp(family)
    model = build_model(family)
    src = save_model(model, root / "src")
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(root / "fused"), "--max-shard-size", "25KB", nproc=nproc)
    return family, nproc, model, src, root


def test_fused_tensors_equal_state_dict_bit_for_bit(fused_case):
    family, _, model, _, root = fused_case
    out = load_dir(root / "fused")
    sd = model.state_dict()
    for layer in range(2):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            assert out[key].shape == sd[key].shape
            assert raw_bytes(out[key]) == raw_bytes(sd[key]), key
    assert out["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)
    assert len(list((root / "fused").glob("model-*.safetensors"))) > 1, "expected several output shards"


def test_fused_key_set_is_the_models_state_dict(fused_case):
    """Every tensor is named as transformers holds it (Mixtral: `block_sparse_moe.*` -> `mlp.*`, the router too)."""
    _, _, model, _, root = fused_case
    out, sd = load_dir(root / "fused"), model.state_dict()
    assert set(out) == set(sd)
    assert all(raw_bytes(out[k]) == raw_bytes(sd[k]) for k in sd)


def test_fused_output_loads_with_same_logits(fused_case):
    from transformers import AutoModelForCausalLM

    _, _, model, _, root = fused_case
    loaded = AutoModelForCausalLM.from_pretrained(root / "fused").eval()
    # Fused tensors load as views of the memory-mapped file at offsets that are not 64-byte aligned, and
    # the CPU kernels then accumulate in another order (last-bit differences). Fresh copies compare the weights.
    for p in loaded.parameters():
        p.data = p.data.clone()
    assert torch.equal(logits(loaded), logits(model))


def test_split_of_fuse_is_byte_identical(fused_case):
    family, nproc, _, src, root = fused_case
    run_tool("convert.split_experts", "--src", str(root / "fused"), "--dst", str(root / "split"), nproc=nproc)
    before, after = load_dir(src), load_dir(root / "split")
    assert set(before) == set(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and raw_bytes(before[k]) == raw_bytes(after[k]), k
    assert (root / "split" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (root / "split" / "generation_config.json").is_file()


def test_stacked_layout_round_trip(tmp_path):
    model = build_model("qwen3_moe", seed=3)
    src = save_model(model, tmp_path / "src")
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "st"), "--layout", "stacked",
             "--ep", "4", "--nproc", "2")
    out = load_dir(tmp_path / "st")
    sd = model.state_dict()
    gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(out["model.layers.1.mlp.experts.gate_proj"], gate_up[:, :I])
    assert torch.equal(out["model.layers.1.mlp.experts.up_proj"], gate_up[:, I:])
    assert torch.equal(out["model.layers.1.mlp.experts.down_proj"], sd["model.layers.1.mlp.experts.down_proj"])
    run_tool("convert.split_experts", "--src", str(tmp_path / "st"), "--dst", str(tmp_path / "back"))
    before, after = load_dir(src), load_dir(tmp_path / "back")
    assert set(before) == set(after) and all(raw_bytes(before[k]) == raw_bytes(after[k]) for k in before)


def test_gpt_oss_native_split_and_fuse(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model("gpt_oss", seed=1)
    src = save_model(model, tmp_path / "native")
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe"), "--nproc", "3",
             "--allow-unread-layout")
    pe = load_dir(tmp_path / "pe")
    sd = model.state_dict()
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        gu, gub = sd[f"{p}.gate_up_proj"], sd[f"{p}.gate_up_proj_bias"]
        for e in range(E):
            # gpt-oss forward: x @ gate_up_proj[e] (+bias), gate = [..., ::2], up = [..., 1::2]
            assert torch.equal(pe[f"{p}.{e}.gate_proj.weight"], gu[e][:, ::2].T)
            assert torch.equal(pe[f"{p}.{e}.up_proj.weight"], gu[e][:, 1::2].T)
            assert torch.equal(pe[f"{p}.{e}.gate_proj.bias"], gub[e][::2])
            assert torch.equal(pe[f"{p}.{e}.up_proj.bias"], gub[e][1::2])
            assert torch.equal(pe[f"{p}.{e}.down_proj.weight"], sd[f"{p}.down_proj"][e].T)
            assert torch.equal(pe[f"{p}.{e}.down_proj.bias"], sd[f"{p}.down_proj_bias"][e])
            assert pe[f"{p}.{e}.gate_proj.weight"].shape == (I, H)
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "pe"), "--dst", str(tmp_path / "back"), "--nproc", "2")
    back, orig = load_dir(tmp_path / "back"), load_dir(src)
    assert set(back) == set(orig)
    for k in orig:
        assert raw_bytes(back[k]) == raw_bytes(orig[k]), k
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(logits(loaded), logits(model))


def test_dtype_cast_and_uneven_ep_plan(tmp_path):
    model = build_model("qwen3_moe", seed=2).to(torch.bfloat16)
    src = save_model(model, tmp_path / "src")
    plan = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "x"), "--ep", "3", "--dry-run")
    assert "ep does not divide E=5" in plan.stdout and "model-00001-of-" in plan.stdout
    assert not (tmp_path / "x").exists(), "--dry-run must write nothing"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "f32"), "--dtype", "fp32", "--ep", "3",
             "--nproc", "2")
    out = load_dir(tmp_path / "f32")
    sd = model.state_dict()
    for k in ("model.layers.0.mlp.experts.gate_up_proj", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight"):
        assert out[k].dtype == torch.float32 and torch.equal(out[k], sd[k].float()), k


def _per_expert_src(tmp_path: Path) -> Path:
    return save_model(build_model("qwen3_moe", seed=4), tmp_path / "src", shard="1MB")


def _rewrite(path: Path, edit) -> None:
    """Rewrite the single shard of `path` through `edit(tensors) -> tensors`, keeping the index honest."""
    from safetensors.torch import load_file, save_file

    (shard,) = path.glob("*.safetensors")
    tensors = edit(load_file(shard))
    save_file(tensors, shard, metadata={"format": "pt"})
    assert not (path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_expert", "missing expert 3 of model.layers.1"),
        ("shape_mismatch", "experts must agree"),
        ("unknown_family", "is not a known MoE family"),
        ("already_fused", "already in the 'transformers' layout"),
        ("dst_not_empty", "exists and is not empty"),
        ("dst_inside_src", "inside it"),
        ("no_num_experts", "has none of"),
    ],
)
def test_refusals_write_nothing(tmp_path, case, expect):
    src = _per_expert_src(tmp_path)
    dst = tmp_path / "out"
    if case == "missing_expert":
        _rewrite(src, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.experts.3.up_proj" not in k})
    elif case == "shape_mismatch":
        _rewrite(src, lambda t: {**t, "model.layers.0.mlp.experts.2.down_proj.weight": torch.zeros(H, I + 1)})
    elif case in ("unknown_family", "no_num_experts"):
        cfg = json.loads((src / "config.json").read_text())
        if case == "unknown_family":
            cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
        else:
            for key in ("num_experts", "num_local_experts", "n_routed_experts"):
                cfg.pop(key, None)
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "already_fused":
        run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"))
        src = tmp_path / "fused"
    elif case == "dst_not_empty":
        dst.mkdir()
        (dst / "keep.txt").write_text("user data")
    elif case == "dst_inside_src":
        dst = src / "sub"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(dst), check=False)
    assert proc.returncode != 0
    assert expect in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "a refused job must not write anything"
