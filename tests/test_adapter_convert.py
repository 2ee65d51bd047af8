"""split_adapter / fuse_adapter against real peft adapters on tiny transformers-5 models, with real torchrun jobs;
synthetic shared w1/w2/w3 and NeMo grouped adapters shaped like the surveys'; refusals; batch kinds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapter_fixtures import (
    base_config,
    make_grouped_adapter,
    make_peft_adapter,
    make_per_expert_adapter,
    make_shared_w123_adapter,
    peft_expert_deltas,
    per_expert_deltas,
    read_adapter,
    write_adapter,
)
from convert.targets.rules import load_target
from helpers import raw_bytes, run_tool
from model_fixtures import LAYERS, E, H, I, build_model, logits

R = 3  # the peft fixtures' per-expert rank
PER_EXPERT = "base_model.model.model.layers.{l}.mlp.experts.{e}.{p}.lora_{f}.weight"
PEFT_A = "base_model.model.model.layers.{l}.mlp.experts.{nest}lora_A.weight"
PEFT_B = "base_model.model.model.layers.{l}.mlp.experts.{nest}lora_B.weight"
PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
TARGET = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def peft_sources(tmp_path_factory) -> dict[str, tuple[object, Path, str]]:
    """Real peft target_parameters adapters: random qwen3_moe and gpt_oss, an identity (B = 0) qwen3_moe, a bf16 one."""
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for name, family, kw in (
        ("qwen3_moe", "qwen3_moe", {}),
        ("gpt_oss", "gpt_oss", {"seed": 1}),
        ("identity", "qwen3_moe", {"identity": True, "seed": 2}),
        ("bf16", "qwen3_moe", {"dtype": torch.bfloat16, "seed": 3}),
    ):
        model, path = make_peft_adapter(family, root / name, **kw)
        out[name] = (model, path, family)
    return out


def _assert_deltas(got: dict, want: dict, exact: bool = False) -> None:
    assert set(got) == set(want), f"experts/roles differ: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("case,nproc,ep", [("qwen3_moe", 2, 4), ("gpt_oss", 3, None), ("identity", 2, None)],
                         ids=["qwen3_moe-2ranks-ep4", "gpt_oss-3ranks", "identity-2ranks"])
def test_split_peft_adapter_matches_peft_delta(peft_sources, tmp_path, case, nproc, ep):
    model, src, family = peft_sources[case]
    dst = tmp_path / "split"
    # issue 14: vLLM loads gpt-oss adapters in the peft layout; the per-expert split is --target per-expert
    target = ["--target", "per-expert"] if family == "gpt_oss" else []
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), *(["--ep", str(ep)] if ep else []), *target,
             nproc=nproc)
    out, config = read_adapter(dst)
    src_tensors, src_config = read_adapter(src)
    expected = {PER_EXPERT.format(l=l, e=e, p=PROJ[role], f=f) for l in range(LAYERS) for e in range(E)
                for role in PROJ for f in "AB"}
    attention = {k for k in src_tensors if "self_attn" in k}
    assert set(out) == expected | attention
    for k in attention:
        assert raw_bytes(out[k]) == raw_bytes(src_tensors[k]), k
    for l in range(LAYERS):
        for e in range(E):
            assert out[PER_EXPERT.format(l=l, e=e, p="gate_proj", f="A")].shape == (R, H)
            assert out[PER_EXPERT.format(l=l, e=e, p="gate_proj", f="B")].shape == (I, R)
            assert out[PER_EXPERT.format(l=l, e=e, p="down_proj", f="A")].shape == (R, I)
            assert out[PER_EXPERT.format(l=l, e=e, p="down_proj", f="B")].shape == (H, R)
    got, want = per_expert_deltas(dst, family), peft_expert_deltas(model, family)
    _assert_deltas(got, want)
    if case == "identity":
        assert all(not t.any() for k, t in out.items() if "experts" in k and "lora_B" in k)
        assert any(t.any() for k, t in out.items() if "experts" in k and "lora_A" in k)
    assert "target_parameters" not in config
    # issue 14: target_modules names what the default target (vllm) needs for the experts
    wanted = load_target("per-expert" if target else "vllm").for_family(family).target_modules_experts
    assert {"q_proj", *(["experts"] if wanted == "experts" else ["gate_proj", "up_proj", "down_proj"] if target == []
                        or wanted else [])} \
        <= set(config["target_modules"])
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (src_config["r"], src_config["lora_alpha"], False)
    assert {k: v for k, v in config.items() if k not in ("target_modules", "target_parameters")} == \
        {k: v for k, v in src_config.items() if k not in ("target_modules", "target_parameters")}


def test_bf16_split_moves_bytes_exactly(peft_sources, tmp_path):
    _, src, family = peft_sources["bf16"]
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "out"), "--ep", "2")
    out, _ = read_adapter(tmp_path / "out")
    s, _ = read_adapter(src)
    for l in range(LAYERS):
        gu_a, gu_b = s[PEFT_A.format(l=l, nest="base_layer.")], s[PEFT_B.format(l=l, nest="base_layer.")]
        d_a, d_b = s[PEFT_A.format(l=l, nest="")], s[PEFT_B.format(l=l, nest="")]
        assert gu_a.dtype == torch.bfloat16
        for e in range(E):
            got = {role: (out[PER_EXPERT.format(l=l, e=e, p=PROJ[role], f="A")],
                          out[PER_EXPERT.format(l=l, e=e, p=PROJ[role], f="B")]) for role in PROJ}
            assert all(a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 for a, b in got.values())
            assert raw_bytes(got["gate"][0]) == raw_bytes(gu_a.view(E, R, H)[e])
            assert raw_bytes(got["up"][0]) == raw_bytes(gu_a.view(E, R, H)[e])
            assert raw_bytes(got["gate"][1]) == raw_bytes(gu_b.view(2 * I, R, E)[:I, :, e])
            assert raw_bytes(got["up"][1]) == raw_bytes(gu_b.view(2 * I, R, E)[I:, :, e])
            assert raw_bytes(got["down"][0]) == raw_bytes(d_a.view(E, R, I)[e])
            assert raw_bytes(got["down"][1]) == raw_bytes(d_b.view(H, R, E)[:, :, e])


def test_split_with_dtype_casts_each_expert_slice(peft_sources, tmp_path):
    """fp32 peft -> bf16 per-expert (the cast path of the slice pieces): each factor is the source slice cast."""
    _, src, _ = peft_sources["qwen3_moe"]
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "out"), "--dtype", "bf16",
             "--ep", "3")
    out, _ = read_adapter(tmp_path / "out")
    s, _ = read_adapter(src)
    for l in range(LAYERS):
        gu_a, gu_b = s[PEFT_A.format(l=l, nest="base_layer.")], s[PEFT_B.format(l=l, nest="base_layer.")]
        d_a, d_b = s[PEFT_A.format(l=l, nest="")], s[PEFT_B.format(l=l, nest="")]
        assert gu_a.dtype == torch.float32
        for e in range(E):
            want = {"gate": (gu_a.view(E, R, H)[e], gu_b.view(2 * I, R, E)[:I, :, e]),
                    "up": (gu_a.view(E, R, H)[e], gu_b.view(2 * I, R, E)[I:, :, e]),
                    "down": (d_a.view(E, R, I)[e], d_b.view(H, R, E)[:, :, e])}
            for role, (a, b) in want.items():
                for f, t in (("A", a), ("B", b)):
                    got = out[PER_EXPERT.format(l=l, e=e, p=PROJ[role], f=f)]
                    assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), (l, e, role, f)


@pytest.fixture(scope="module")
def split_qwen(peft_sources, tmp_path_factory) -> Path:
    """The qwen3_moe peft adapter split to per-expert (plain python)."""
    dst = tmp_path_factory.mktemp("split") / "qwen"
    run_tool("convert.split_adapter", "--src", str(peft_sources["qwen3_moe"][1]), "--dst", str(dst))
    return dst


def test_fuse_back_to_peft_loads_with_same_logits(peft_sources, split_qwen, tmp_path):
    from peft import PeftModel

    model, src, _ = peft_sources["qwen3_moe"]
    dst = tmp_path / "peft"
    run_tool("convert.fuse_adapter", "--src", str(split_qwen), "--dst", str(dst), "--layout", "peft", nproc=2)
    before, before_cfg = read_adapter(src)
    after, after_cfg = read_adapter(dst)
    assert set(after) == set(before)
    assert all(raw_bytes(after[k]) == raw_bytes(before[k]) for k in before), "fuse(split(x)) must give x's bytes"
    assert sorted(after_cfg["target_parameters"]) == sorted(before_cfg["target_parameters"])
    assert after_cfg["r"] == before_cfg["r"] == R
    loaded = PeftModel.from_pretrained(build_model("qwen3_moe", seed=0), str(dst)).eval()
    assert torch.equal(logits(loaded), logits(model))
    _assert_deltas(peft_expert_deltas(loaded, "qwen3_moe"), peft_expert_deltas(model, "qwen3_moe"), exact=True)


def test_gpt_oss_round_trip_keeps_interleaved_bytes(peft_sources, tmp_path):
    _, src, _ = peft_sources["gpt_oss"]
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "split"), "--target", "per-expert")
    run_tool("convert.fuse_adapter", "--src", str(tmp_path / "split"), "--dst", str(tmp_path / "peft"), "--layout", "peft")
    before, _ = read_adapter(src)
    after, _ = read_adapter(tmp_path / "peft")
    assert set(after) == set(before) and all(raw_bytes(after[k]) == raw_bytes(before[k]) for k in before)


def test_per_expert_with_separate_gate_up_A_fuses_to_peft_exactly(tmp_path):
    """Independent gate and up lora_A: peft's one gate_up A holds both (rank 2r, block-diagonal B); peft agrees."""
    from peft import PeftModel

    src, deltas = make_per_expert_adapter(tmp_path / "pe", "qwen3_moe", rank=4, alpha=8, seed=5)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(base_config("qwen3_moe")))
    dst = tmp_path / "peft"
    run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(dst), "--layout", "peft", "--base-config", str(cfg))
    out, config = read_adapter(dst)
    assert out[PEFT_A.format(l=0, nest="base_layer.")].shape == (E * 8, H)
    assert out[PEFT_B.format(l=0, nest="base_layer.")].shape == (2 * I, 8 * E)
    assert config["rank_pattern"] and config["alpha_pattern"], "the gate_up wrapper's rank and alpha differ from r"
    loaded = PeftModel.from_pretrained(build_model("qwen3_moe", seed=0), str(dst)).eval()
    _assert_deltas(peft_expert_deltas(loaded, "qwen3_moe"), deltas)


def test_already_per_expert_passes_through_unchanged(split_qwen, tmp_path):
    run_tool("convert.split_adapter", "--src", str(split_qwen), "--dst", str(tmp_path / "again"))
    before, before_cfg = read_adapter(split_qwen)
    after, after_cfg = read_adapter(tmp_path / "again")
    assert set(after) == set(before) and all(raw_bytes(after[k]) == raw_bytes(before[k]) for k in before)
    assert after_cfg == before_cfg


@pytest.mark.parametrize("attn_prefix,rank,experts", [("self_attn", 16, 12), ("attn", 32, 7)],
                         ids=["qwen-pattern-A-r16", "gpt-oss-attn-prefix-r32"])
def test_shared_w123_splits_exactly(tmp_path, attn_prefix, rank, experts):
    src, deltas = make_shared_w123_adapter(tmp_path / "src", experts=experts, rank=rank, attn_prefix=attn_prefix)
    refused = run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "no"), check=False)
    assert refused.returncode == 2 and "--base-config" in refused.stderr
    assert not (tmp_path / "no" / "adapter_config.json").exists()
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(base_config("qwen3_moe", experts=experts)))
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "out"), "--base-config", str(cfg), "--ep", "3")
    out, config = read_adapter(tmp_path / "out")
    s, _ = read_adapter(src)
    for l in range(LAYERS):
        w = f"base_model.model.model.layers.{l}.mlp.experts"
        for e in range(experts):
            assert torch.equal(out[PER_EXPERT.format(l=l, e=e, p="gate_proj", f="A")], s[f"{w}.w1.lora_A.weight"][0])
            assert torch.equal(out[PER_EXPERT.format(l=l, e=e, p="up_proj", f="B")], s[f"{w}.w3.lora_B.weight"][e])
            assert torch.equal(out[PER_EXPERT.format(l=l, e=e, p="down_proj", f="A")], s[f"{w}.w2.lora_A.weight"][e])
            assert torch.equal(out[PER_EXPERT.format(l=l, e=e, p="down_proj", f="B")], s[f"{w}.w2.lora_B.weight"][0])
    attention = {k for k in s if f".{attn_prefix}." in k}
    assert attention and all(torch.equal(out[k], s[k]) for k in attention)
    assert set(out) - attention == {PER_EXPERT.format(l=l, e=e, p=p, f=f) for l in range(LAYERS)
                                    for e in range(experts) for p in PROJ.values() for f in "AB"}
    _assert_deltas(per_expert_deltas(tmp_path / "out", "qwen3_moe"), deltas, exact=True)
    assert config["r"] == rank and config["target_modules"] == "all-linear"


@pytest.mark.parametrize("family,order", [("qwen3_moe", "concat"), ("gpt_oss", "interleave")])
def test_grouped_splits_exactly_and_fuses_back(tmp_path, family, order):
    src, deltas = make_grouped_adapter(tmp_path / "src", experts=10, rank=16, order=order)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(base_config(family, experts=10)))
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "out"), "--base-config", str(cfg),
             "--target", "per-expert")
    got = per_expert_deltas(tmp_path / "out", family)
    _assert_deltas(got, deltas)
    run_tool("convert.fuse_adapter", "--src", str(tmp_path / "out"), "--dst", str(tmp_path / "back"),
             "--layout", "grouped", "--base-config", str(cfg))
    before, _ = read_adapter(src)
    after, _ = read_adapter(tmp_path / "back")
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_per_expert_to_shared_w123_only_where_exact(tmp_path):
    from convert.errors import ConversionError
    from convert.formats.adapter_source import open_adapter
    from convert.plan.adapter import plan_fuse

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(base_config("qwen3_moe")))
    exact, deltas = make_per_expert_adapter(tmp_path / "exact", "qwen3_moe", shared_factors=True, seed=9)
    run_tool("convert.fuse_adapter", "--src", str(exact), "--dst", str(tmp_path / "w123"), "--layout", "shared_w123",
             "--base-config", str(cfg))
    out, _ = read_adapter(tmp_path / "w123")
    assert out["base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight"].shape == (1, 4, H)
    assert out["base_model.model.model.layers.0.mlp.experts.w2.lora_B.weight"].shape == (1, H, 4)
    run_tool("convert.split_adapter", "--src", str(tmp_path / "w123"), "--dst", str(tmp_path / "back"), "--base-config", str(cfg))
    _assert_deltas(per_expert_deltas(tmp_path / "back", "qwen3_moe"), deltas, exact=True)

    inexact, _ = make_per_expert_adapter(tmp_path / "inexact", "qwen3_moe", seed=9)
    with pytest.raises(ConversionError, match=r"w1/w2/w3 layout keeps one gate lora_A .* not exact"):
        plan_fuse(open_adapter(str(inexact), str(cfg), None), "shared_w123", None)


def test_refusals_name_the_tensor_and_ask_for_the_base_config(peft_sources, tmp_path):
    from convert.errors import ConversionError
    from convert.formats.adapter_layouts import detect_expert_lora
    from convert.formats.adapter_source import open_adapter
    from convert.plan.adapter import plan_split

    # One peft wrapper whose shapes fit gate_up_proj and down_proj alike: only the base config's sizes decide.
    lone = tmp_path / "lone"
    key = "base_model.model.model.layers.0.mlp.experts"
    write_adapter(lone, {f"{key}.lora_A.weight": torch.zeros(E * R, 20), f"{key}.lora_B.weight": torch.zeros(20, R * E)},
                  {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_parameters": ["mlp.experts.gate_up_proj",
                   "mlp.experts.down_proj"], "auto_mapping": {"base_model_class": "Qwen3MoeForCausalLM"},
                   "peft_version": "0.21.2"})  # 2I == H: only the saving peft tells its orientation
    with pytest.raises(ConversionError, match=r"cannot tell by shape .*lora_A.weight.*--base-config"):
        plan_split(open_adapter(str(lone), None, None), None, 2)
    infos = open_adapter(str(lone), None, None).infos
    groups, _ = detect_expert_lora(infos, json.loads((lone / "adapter_config.json").read_text()),
                                   base_config("qwen3_moe", hidden=20, inter=10), "lone")
    assert groups[0].roles == ("gate", "up") and groups[0].num_experts == E

    # The family decides the gate/up order and names: without any hint, refuse and ask for --base-config.
    nameless = tmp_path / "nameless"
    shutil.copytree(peft_sources["gpt_oss"][1], nameless)
    cfg = json.loads((nameless / "adapter_config.json").read_text())
    cfg.pop("auto_mapping")
    cfg["base_model_name_or_path"] = None
    (nameless / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="family.*--base-config"):
        plan_split(open_adapter(str(nameless), None, None), None, 2)
    proc = run_tool("convert.split_adapter", "--src", str(nameless), "--dst", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and not (tmp_path / "out" / "adapter_config.json").exists()

    # B's folded dim disagrees with A's: named with both shapes.
    bad = tmp_path / "bad"
    write_adapter(bad, {f"{key}.lora_A.weight": torch.zeros(E * R, H), f"{key}.lora_B.weight": torch.zeros(2 * I, R * E + 1)},
                  {"peft_type": "LORA", "r": R, "lora_alpha": 8})
    with pytest.raises(ConversionError, match=r"lora_B.weight.*\[40, 16\].*must be equal"):
        plan_split(open_adapter(str(bad), None, None), None, 1)


def test_batch_manifest_runs_adapter_kinds(peft_sources, tmp_path):
    manifest = tmp_path / "jobs.yaml"
    src = peft_sources["gpt_oss"][1]
    jobs = [
        {"name": "split", "kind": "split_adapter", "src": str(src), "dst": str(tmp_path / "split"), "target": "per-expert"},
        {"name": "fuse", "kind": "fuse_adapter", "src": str(tmp_path / "split"), "dst": str(tmp_path / "peft"), "layout": "peft"},
        {"name": "nolayout", "kind": "fuse_adapter", "src": str(tmp_path / "split"), "dst": str(tmp_path / "x")},
    ]
    # fuse_adapter requires --layout: the manifest is refused before any job runs
    manifest.write_text(json.dumps({"jobs": jobs}))
    proc = run_tool("launch.batch", str(manifest), "--report", str(tmp_path / "report.json"), check=False)
    assert proc.returncode == 2 and "job 'nolayout': missing required key(s) for kind fuse_adapter: layout" in proc.stderr
    assert not (tmp_path / "split").exists() and not (tmp_path / "report.json").exists()
    manifest.write_text(json.dumps({"jobs": jobs[:2]}))
    proc = run_tool("launch.batch", str(manifest), "--report", str(tmp_path / "report.json"), check=False)
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())["jobs"]}
    assert rows["split"]["status"] == "done" and rows["fuse"]["status"] == "done", proc.stdout + proc.stderr
    before, _ = read_adapter(src)
    after, _ = read_adapter(tmp_path / "peft")
    assert set(after) == set(before) and all(raw_bytes(after[k]) == raw_bytes(before[k]) for k in before)


def test_rank_and_alpha_patterns_keep_every_scaling(tmp_path):
    """rank_pattern/alpha_pattern (and rslora) on the fused parameters become per-expert patterns and back."""
    from peft import PeftModel

    model, src = make_peft_adapter("qwen3_moe", tmp_path / "src", seed=6, use_rslora=True,
                                   rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 5})
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "split"))
    out, config = read_adapter(tmp_path / "split")
    assert out[PER_EXPERT.format(l=1, e=4, p="down_proj", f="A")].shape == (2, I)
    assert config["use_rslora"] and config["rank_pattern"] and config["alpha_pattern"]
    want = peft_expert_deltas(model, "qwen3_moe")
    _assert_deltas(per_expert_deltas(tmp_path / "split", "qwen3_moe"), want)
    run_tool("convert.fuse_adapter", "--src", str(tmp_path / "split"), "--dst", str(tmp_path / "peft"), "--layout", "peft")
    loaded = PeftModel.from_pretrained(build_model("qwen3_moe", seed=6), str(tmp_path / "peft")).eval()
    _assert_deltas(peft_expert_deltas(loaded, "qwen3_moe"), want, exact=True)
    assert torch.equal(logits(loaded), logits(model))


def _infos(shapes: dict[str, tuple[int, ...]]) -> dict:
    from convert.formats.safetensors import TensorInfo

    out, pos = {}, 0
    for name, shape in shapes.items():
        n = 4 * int(torch.tensor(shape).prod())
        out[name] = TensorInfo(name, "F32", shape, pos, pos + n)
        pos += n
    return out


def test_peft_wrappers_are_told_apart_by_shape_not_name():
    """gpt-oss-20b has H == I: B's rows (2I vs H) still decide; swapped nesting names do not fool it."""
    from convert.formats.adapter_layouts import detect_expert_lora

    h = i = 12
    e, r = 4, 2
    key = "base_model.model.model.layers.0.mlp.experts"
    cfg = {"r": r, "lora_alpha": 4, "target_parameters": TARGET, "base_model_name_or_path": "openai/gpt-oss-20b"}
    swapped = _infos({f"{key}.lora_A.weight": (e * r, h), f"{key}.lora_B.weight": (2 * i, r * e),  # gate_up, outer
                      f"{key}.base_layer.lora_A.weight": (e * r, i), f"{key}.base_layer.lora_B.weight": (h, r * e)})
    groups, rest = detect_expert_lora(swapped, cfg, None, "swapped")
    g = groups[0]
    assert not rest and g.pattern == "peft_target_parameters" and g.num_experts == e and g.family == "gpt_oss"
    assert g.factor(("gate", "up"), "B").name == f"{key}.lora_B.weight"
    assert g.factor(("down",), "A").name == f"{key}.base_layer.lora_A.weight"
    assert g.fused_order == "interleave" and g.dims_of("gate") == (i, h)
    lone = {k: v for k, v in swapped.items() if "base_layer" not in k}
    groups, _ = detect_expert_lora(lone, cfg, base_config("gpt_oss", hidden=h, inter=i, experts=e), "lone")
    assert groups[0].roles == ("gate", "up")


def test_overwrite_removes_the_earlier_outputs_shards(tmp_path):
    src, _ = make_per_expert_adapter(tmp_path / "src", "qwen3_moe")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(base_config("qwen3_moe")))
    out = tmp_path / "out"
    run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(out), "--layout", "peft", "--base-config", str(cfg),
             "--max-shard-size", "4KB")
    assert len(list(out.glob("adapter_model-*.safetensors"))) > 1 and (out / "adapter_model.safetensors.index.json").exists()
    # issue 11: --overwrite replaces only a moe-convert output; a user's file beside it is refused and kept
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused = run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(out), "--layout", "peft",
                       "--base-config", str(cfg), "--overwrite", check=False)
    assert refused.returncode == 2 and "notes.txt" in refused.stderr, refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "notes.txt").unlink()
    run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(out), "--layout", "peft", "--base-config", str(cfg),
             "--overwrite")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not any(n.startswith("adapter_model-") or n.endswith(".index.json") for n in names), names


def test_family_architectures_match_transformers_causal_lm_classes():
    """configs/families/*.json `architectures` (peft's auto_mapping.base_model_class -> family) agree with transformers' table."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal_lm

    from convert.families import load_families

    for fam in load_families().values():
        # a class shared with another family's model type (Qwen3_5MoeForCausalLM: qwen3_5_moe, qwen3_5_moe_text)
        # names neither family on its own
        want = {causal_lm[t] for t in fam.model_types if t in causal_lm
                and {u for u, c in causal_lm.items() if c == causal_lm[t]} <= set(fam.model_types)}
        assert want <= set(fam.architectures), f"{fam.name}: {sorted(want - set(fam.architectures))}"
        for cls in fam.architectures:  # other classes of the model (AXK1Model, ...) may be listed too
            types = {t for t, c in causal_lm.items() if c == cls}
            assert not types or types & set(fam.model_types), f"{fam.name}: {cls} is the class of {sorted(types)}"


def test_adapter_family_from_base_model_class_needs_no_transformers(peft_sources, tmp_path):
    """Only auto_mapping.base_model_class names the family (a remote-code parent_library): the split works in a
    process where `import transformers` (and peft) fails, exactly as in the test environment."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    src = tmp_path / "custom"
    shutil.copytree(peft_sources["gpt_oss"][1], src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["auto_mapping"] = {"base_model_class": "GptOssForCausalLM", "parent_library": "transformers_modules.x.modeling_x"}
    cfg["base_model_name_or_path"] = None
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    poisoned = ("import sys, runpy; sys.modules['transformers'] = sys.modules['peft'] = None; "
                "runpy.run_module('convert.split_adapter', run_name='__main__', alter_sys=True)")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", poisoned, "--src", str(src), "--dst", str(tmp_path / "split"),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_tool("convert.split_adapter", "--src", str(peft_sources["gpt_oss"][1]), "--dst", str(tmp_path / "reference"))
    got, _ = read_adapter(tmp_path / "split")
    want, _ = read_adapter(tmp_path / "reference")
    assert set(got) == set(want) and all(raw_bytes(got[k]) == raw_bytes(want[k]) for k in want)


def _pattern_warnings(caught: list) -> dict[str, list[str]]:
    """peft's "rank_pattern/alpha_pattern keys did not match any targeted module" warnings: attribute -> keys named."""
    import ast
    import re

    out: dict[str, list[str]] = {}
    for w in caught:
        m = re.match(r"The following (\w+) keys did not match any targeted module and were ignored: (\[.*\])\.$",
                     str(w.message))
        if m:
            out[m[1]] = ast.literal_eval(m[2])
    return out


def test_peft_pattern_warning_on_fused_adapter_is_peft_checking_target_modules_only(tmp_path):
    """Different gate/up lora_A fused for peft: the gate_up wrapper's rank/alpha live in rank_pattern/alpha_pattern,
    keys peft matches against the target_parameters (peft's own `get_pattern_key`) and applies, so every expert's
    delta comes back; peft 0.21 still warns they "were ignored" because that check only looks at target_modules,
    and it warns the same on an adapter peft itself creates with such a pattern. The tool says so in a note."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.other import get_pattern_key

    src, deltas = make_per_expert_adapter(tmp_path / "pe", "qwen3_moe", rank=4, alpha=8, seed=5)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(base_config("qwen3_moe")))
    dst = tmp_path / "peft"
    plan = run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(dst), "--layout", "peft",
                    "--base-config", str(cfg), "--dry-run")
    run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(dst), "--layout", "peft", "--base-config", str(cfg))
    _, config = read_adapter(dst)
    keys = sorted(config["rank_pattern"])
    assert keys and "did not match any targeted module" in plan.stdout and repr(keys) in plan.stdout, plan.stdout

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(build_model("qwen3_moe", seed=0), str(dst)).eval()
    tuner = loaded.base_model
    for attr, warned in _pattern_warnings(caught).items():
        for key in warned:  # a false alarm: the key matches a targeted parameter, and no targeted module
            assert any(get_pattern_key([key], p) == key for p in tuner.targeted_parameter_names), (attr, key)
            assert not any(get_pattern_key([key], m) == key for m in tuner.targeted_module_names), (attr, key)
    wrappers = {name: m for name, m in loaded.named_modules() if getattr(m, "parameter_name", None) == "gate_up_proj"}
    assert wrappers
    for m in wrappers.values():  # applied, not ignored: the wrapper has the pattern's rank and alpha / rank scaling
        assert m.r["default"] == config["rank_pattern"][keys[0]] == 8
        assert m.scaling["default"] == config["alpha_pattern"][keys[0]] / 8
    _assert_deltas(peft_expert_deltas(loaded, "qwen3_moe"), deltas)

    with warnings.catch_warnings(record=True) as native:
        warnings.simplefilter("always")
        model = get_peft_model(build_model("qwen3_moe", seed=0), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=TARGET, rank_pattern={"gate_up_proj": 6}))
    assert _pattern_warnings(native).get("rank_pattern") in (None, ["gate_up_proj"])
    assert {m.r["default"] for m in model.modules() if getattr(m, "parameter_name", None) == "gate_up_proj"} == {6}


def test_pattern_key_order_survives_into_adapter_config(tmp_path):
    """peft takes the first matching rank_pattern/alpha_pattern key: a key of the tool's own placed before a user's
    broader regex (`.*_proj`) must stay first in the written adapter_config.json (it was sorted away before)."""
    from peft import PeftModel

    src, deltas = make_per_expert_adapter(tmp_path / "pe", "qwen3_moe", rank=4, alpha=8, seed=5,
                                          rank_pattern={".*_proj": 4})
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 8  # every module has rank 4 through the pattern
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    base = tmp_path / "config.json"
    base.write_text(json.dumps(base_config("qwen3_moe")))
    dst = tmp_path / "peft"
    run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(dst), "--layout", "peft", "--base-config", str(base))
    _, config = read_adapter(dst)
    assert list(config["rank_pattern"]) == ["experts\\.gate_up_proj", ".*_proj"], config["rank_pattern"]
    loaded = PeftModel.from_pretrained(build_model("qwen3_moe", seed=0), str(dst)).eval()
    _assert_deltas(peft_expert_deltas(loaded, "qwen3_moe"), deltas)


# ----------------------------------------------------------------------------- other families

# Families whose expert names differ from qwen3_moe's: up/down only (nemotron_h, `mixer` container),
# w1/w3/w2 under `feed_forward` (lfm2_moe), gate/up/down under `feed_forward` (jamba), and a family
# file generated from transformers' table on top of qwen3_moe (ernie4_5_moe, `moe_num_experts`).
OTHER_FAMILIES = [("nemotron_h", 2), ("lfm2_moe", None), ("jamba", 2), ("ernie4_5_moe", None)]


def _family_of_model_type(model_type: str):
    from convert.families import load_families

    return next(f for f in load_families().values() if model_type in f.model_types)


def _peft_on_fused_experts(model_type: str, path: Path, seed: int, only: str | None = None) -> tuple[object, list[str]]:
    """A real peft adapter whose target_parameters are every fused 3-D expert parameter of the tiny model
    (those ending in `only` when given)."""
    from peft import LoraConfig, get_peft_model

    import tiny_models

    model = tiny_models.build(model_type, seed=seed)
    fused = [n for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3]
    targets = sorted({n.split(".layers.", 1)[1].split(".", 1)[1] for n in fused})  # e.g. mixer.experts.up_proj
    targets = [t for t in targets if only is None or t.endswith(only)]
    assert targets, f"{model_type}: the tiny model has no fused expert parameter"
    torch.manual_seed(seed + 100)
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=7, target_parameters=targets,
                                                  init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(path))
    return peft_model, targets


def _disk(family, name: str) -> str:
    """`name` (peft's `base_model.model.` + a module or tensor in model naming) in checkpoint naming: issue 14, the
    family's renames apply to adapter keys too (nemotron_h's `backbone.`)."""
    head = "base_model.model."
    body = name[len(head):] if name.startswith(head) else name
    lora = body.find(".lora_")
    module, rest = (body[:lora], body[lora:]) if lora >= 0 else (body, "")
    disk = family.to_disk(module + ".weight")
    return head + (disk[: -len(".weight")] if disk.endswith(".weight") else module) + rest


def _role_deltas_from_peft(peft_model: object, family) -> dict[str, torch.Tensor]:
    """Per-expert module name (as a per-expert adapter names it) -> delta, from peft's own get_delta_weight.

    Each fused parameter's [E, ...] delta is cut into its roles as the family file says the fused
    tensor holds them (parts, transposed or not, halves or interleaved).
    """
    layout = {t.leaf: t for t in family.fused[family.default_fused]}
    out: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():  # type: ignore[attr-defined]
        param = getattr(module, "parameter_name", None)
        if param is None:
            continue
        t = layout[param]
        with torch.no_grad():
            delta = module.get_delta_weight("default").float()
        if t.transpose:
            delta = delta.transpose(1, 2)
        k = len(t.parts)
        pieces = ([delta[:, j::k] for j in range(k)] if t.op == "interleave" else list(delta.chunk(k, dim=1)))
        path = name.replace(".base_layer", "")
        prefix = path[: path.index("." + family.container + ".experts" if family.container else ".experts")]
        for role, piece in zip(t.parts, pieces):
            for e in range(piece.shape[0]):
                module_name = _disk(family, family.expert_templates[role][: -len(".weight")].format(prefix=prefix, e=e))
                assert module_name not in out, module_name
                out[module_name] = piece[e]
    return out


@pytest.mark.parametrize("model_type,nproc", OTHER_FAMILIES, ids=[m for m, _ in OTHER_FAMILIES])
def test_other_family_peft_adapter_splits_per_expert_and_fuses_back(tmp_path, model_type, nproc):
    """split_adapter cuts a real peft target_parameters adapter of each family into its per-expert names with
    peft's own per-expert deltas; fuse_adapter --layout peft gives back the original bytes."""
    family = _family_of_model_type(model_type)
    src, dst, back = tmp_path / "peft", tmp_path / "split", tmp_path / "back"
    peft_model, targets = _peft_on_fused_experts(model_type, src, seed=7)
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), nproc=nproc)
    out, config = read_adapter(dst)
    src_tensors, src_config = read_adapter(src)
    want = _role_deltas_from_peft(peft_model, family)
    experts = {k for k in out if ".experts." in k}
    assert experts == {f"{m}.lora_{f}.weight" for m in want for f in "AB"}
    others = set(out) - experts
    assert others == {_disk(family, k) for k in src_tensors if ".experts." not in k}
    for k in src_tensors:
        if ".experts." not in k:
            assert raw_bytes(out[_disk(family, k)]) == raw_bytes(src_tensors[k]), k
    scale = 7 / R
    for m, delta in want.items():
        a, b = out[f"{m}.lora_A.weight"], out[f"{m}.lora_B.weight"]
        assert a.shape[0] == R and b.shape[1] == R, m
        torch.testing.assert_close(b.float() @ a.float() * scale, delta, rtol=1e-5, atol=1e-7,
                                   msg=lambda s, m=m: f"{m}: {s}")
    assert "target_parameters" not in config
    leaves = {family.per_expert[r].rsplit(".", 2)[-2] for r in family.roles}
    if load_target("vllm").for_family(family.name).target_modules_experts == "experts":  # issue 14: the default target
        leaves = {"experts"}
    assert leaves <= set(config["target_modules"]), config["target_modules"]

    # issue 14: the split names every key under the family's checkpoint names (nemotron_h: `backbone.`); the
    # verifier pairs the keys through the family's renames, both ways
    assert "OK:" in run_tool("convert.verify", "--src", str(src), "--dst", str(dst)).stdout

    run_tool("convert.fuse_adapter", "--src", str(dst), "--dst", str(back), "--layout", "peft")
    assert "OK:" in run_tool("convert.verify", "--src", str(dst), "--dst", str(back)).stdout
    fused, back_config = read_adapter(back)
    assert set(fused) == set(src_tensors)
    for k, t in src_tensors.items():
        assert fused[k].dtype == t.dtype and raw_bytes(fused[k]) == raw_bytes(t), k
    assert sorted(back_config["target_parameters"]) == targets
    assert (back_config["r"], back_config["lora_alpha"]) == (src_config["r"], src_config["lora_alpha"])


def test_lone_peft_wrapper_of_an_up_down_family_is_told_apart_by_target_parameters(tmp_path):
    """nemotron_h's up_proj and down_proj are each other's transpose: with one wrapper and no --base-config only
    target_parameters says which it is; the split names that role's experts only, with peft's deltas."""
    family = _family_of_model_type("nemotron_h")
    src, dst = tmp_path / "peft", tmp_path / "split"
    peft_model, targets = _peft_on_fused_experts("nemotron_h", src, seed=11, only=".down_proj")
    # --target per-expert: a server target would add zero up_proj pairs (issue 14; tests/test_adapter_targets.py)
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), "--target", "per-expert")
    out, _ = read_adapter(dst)
    want = _role_deltas_from_peft(peft_model, family)
    assert want and all(m.endswith(".down_proj") for m in want)
    assert {k for k in out if ".experts." in k} == {f"{m}.lora_{f}.weight" for m in want for f in "AB"}
    for m, delta in want.items():
        got = out[f"{m}.lora_B.weight"].float() @ out[f"{m}.lora_A.weight"].float() * (7 / R)
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-7, msg=lambda s, m=m: f"{m}: {s}")
