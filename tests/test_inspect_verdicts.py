"""convert.inspect's per-target verdict (issue #25): what vLLM, SGLang and peft do with an adapter as it is (`as_is`:
load / refuse / load_and_drop_deltas / load_wrong_deltas) and the command that fixes it.

Each claim is checked against the consumer itself where it is installed (peft 0.21: PeftModel.from_pretrained) and
against the servers' loaders as tests/server_rules.py emulates them from their sources (vLLM 0.33, SGLang 0.5.23);
each fix is run as inspect prints it, and its output loads with the deltas the producer meant.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

import inspect_fixtures as fx
from adapter_fixtures import (
    base_config,
    make_peft_adapter,
    make_per_expert_adapter,
    make_shared_w123_adapter,
    peft_expert_deltas,
    per_expert_deltas,
    write_adapter,
)
from convert.inspect.report import inspect_path, render_text
from convert.inspect.targets import AsIs
from helpers import run_tool
from model_fixtures import LAYERS, E, build_model
from server_rules import sglang_load, sglang_models, vllm_load, vllm_models

VLLM = vllm_models(LAYERS, E)
SGLANG = sglang_models(LAYERS, E)


def inspected(path: Path, base: Path | None = None) -> dict[str, Any]:
    report = inspect_path(str(path), base_config=str(base) if base else None)
    assert render_text(report)
    return json.loads(json.dumps(report.as_json()))


def config_file(tmp_path: Path, family: str) -> Path:
    path = tmp_path / f"{family}-config.json"
    path.write_text(json.dumps(base_config(family)))
    return path


def run_fix(fix: str, tmp_path: Path, name: str) -> Path:
    """Run the command(s) inspect printed, OUT (and PER_EXPERT) replaced by directories under `tmp_path`."""
    dirs = {"OUT": str(tmp_path / name), "PER_EXPERT": str(tmp_path / f"{name}-per-expert")}
    for command in fix.split(" && "):
        argv = [dirs.get(a, a) for a in shlex.split(command)]
        assert argv[:2] == ["python", "-m"], command
        run_tool(argv[2], *argv[3:])
    return tmp_path / name


def assert_experts(loaded: Any, deltas: dict[tuple[int, str, int], torch.Tensor]) -> None:
    assert {(layer, role, e) for (layer, e), d in loaded.experts.items() for role in d} == set(deltas)
    for (layer, role, e), want in deltas.items():
        torch.testing.assert_close(loaded.experts[(layer, e)][role], want.float(), rtol=1e-5, atol=1e-6)


def peft_deltas(path: Path) -> dict[tuple[int, str, int], torch.Tensor]:
    """Every expert's delta as peft 0.21 itself computes it after loading `path` (PeftModel.from_pretrained)."""
    from peft import PeftModel

    return peft_expert_deltas(PeftModel.from_pretrained(build_model("qwen3_moe"), str(path)).eval(), "qwen3_moe")


def test_the_enum_is_the_json_value(tmp_path):
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    out = inspected(path, config_file(tmp_path, "qwen3_moe"))
    assert {v["as_is"] for v in out["servers"].values()} <= {a.value for a in AsIs}
    assert set(out["servers"]) == {"vllm", "sglang", "peft", "per-expert"}


def test_peft_fused_mixtral_adapter_vllm_loads_and_drops_then_the_fix_loads(tmp_path):
    """peft's raw fused Mixtral adapter: vLLM takes it without an error and applies no expert delta
    (configs/targets/vllm.json `misnamed_dropped`; the emulation drops the mlp.experts modules); the printed fix
    gives vLLM every expert's delta as peft computes it."""
    peft_model, path = make_peft_adapter("mixtral", tmp_path / "a")
    cfg = config_file(tmp_path, "mixtral")
    out = inspected(path, cfg)
    vllm = out["servers"]["vllm"]
    assert vllm["as_is"] == AsIs.LOAD_AND_DROP.value and vllm["loads"] and vllm["refusals"] == []
    assert vllm["verdict"] == "loads, and drops every expert delta"
    as_is = vllm_load(str(path), VLLM["mixtral"])
    assert not as_is.experts and any(".mlp.experts" in m for m in as_is.dropped)
    assert out["servers"]["peft"]["as_is"] == AsIs.LOAD.value and "fix" not in out["servers"]["peft"]
    assert out["servers"]["sglang"]["as_is"] == AsIs.REFUSE.value
    assert vllm["fix"] == f"python -m convert.split_adapter --target vllm --src {path} --dst OUT --base-config {cfg}"
    fixed = run_fix(vllm["fix"], tmp_path, "vllm")
    assert inspected(fixed, cfg)["servers"]["vllm"]["as_is"] == AsIs.LOAD.value
    loaded = vllm_load(str(fixed), VLLM["mixtral"])
    assert loaded.dropped == []
    assert_experts(loaded, peft_expert_deltas(peft_model, "mixtral"))
    text = render_text(inspect_path(str(path), base_config=str(cfg)))
    assert "    vllm: loads, and drops every expert delta  [load_and_drop_deltas]" in text
    assert "      fix: python -m convert.split_adapter --target vllm" in text


def test_per_expert_adapter_loads_in_vllm(tmp_path):
    path, deltas = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    out = inspected(path, config_file(tmp_path, "qwen3_moe"))
    vllm = out["servers"]["vllm"]
    assert vllm["as_is"] == AsIs.LOAD.value and "fix" not in vllm and "no_fix" not in vllm
    loaded = vllm_load(str(path), VLLM["qwen3_moe"])
    assert loaded.dropped == []
    assert_experts(loaded, deltas)
    assert "    vllm: loads  [load]" in render_text(inspect_path(str(path)))


def test_per_expert_adapter_sglang_refuses_and_the_fix_loads(tmp_path):
    """SGLang stacks q/k/v and needs v_proj next to q_proj (configs/targets/sglang.json `needs_with`): refused as is;
    the fix adds an exact zero pair and the emulated SGLang applies every expert delta."""
    path, deltas = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    cfg = config_file(tmp_path, "qwen3_moe")
    sglang = inspected(path, cfg)["servers"]["sglang"]
    assert sglang["as_is"] == AsIs.REFUSE.value and not sglang["loads"]
    with pytest.raises(Exception):  # noqa: B017 - the server's own exception, whatever its type
        sglang_load(str(path), SGLANG["qwen3_moe"])
    fixed = run_fix(sglang["fix"], tmp_path, "sglang")
    assert inspected(fixed, cfg)["servers"]["sglang"]["as_is"] == AsIs.LOAD.value
    assert_experts(sglang_load(str(fixed), SGLANG["qwen3_moe"]), deltas)


def test_pre_0191_shapes_are_refused_by_peft_021_and_the_two_step_fix_loads(tmp_path):
    """peft 0.19.0's shapes (lora_A [E*r, out], lora_B [in, E*r]): peft 0.21 refuses them (a size mismatch in
    load_state_dict, checked with peft itself); vLLM (per-expert for qwen3_moe) refuses the fused wrappers. The
    fix for peft splits to per-expert and fuses back in peft 0.21's packing: peft then computes the deltas
    peft 0.19.0 did."""
    from test_adapter_producers import LAYER, _config, _expected, _legacy_wrappers, _peft_0190_delta

    t = _legacy_wrappers(10)
    path = write_adapter(tmp_path / "src", t, _config(peft_version="0.19.0"))
    out = inspected(path)
    assert "peft < 0.19.1 shapes" in " ".join(out["producers"])
    peft = out["servers"]["peft"]
    assert peft["as_is"] == AsIs.REFUSE.value and "size mismatch" in peft["refusals"][-1]
    from peft import PeftModel

    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(build_model("qwen3_moe"), str(path))
    assert peft["fix"] == (f"python -m convert.split_adapter --target per-expert --src {path} --dst PER_EXPERT && "
                           "python -m convert.fuse_adapter --layout peft --target peft --src PER_EXPERT --dst OUT")
    vllm = out["servers"]["vllm"]
    assert vllm["as_is"] == AsIs.REFUSE.value
    with pytest.raises(ValueError, match="fused 3D MoE weights"):
        vllm_load(str(path), VLLM["qwen3_moe"])

    fixed = run_fix(peft["fix"], tmp_path, "peft")
    assert inspected(fixed)["servers"]["peft"]["as_is"] == AsIs.LOAD.value
    want = _expected(_peft_0190_delta(t[f"{LAYER}.base_layer.lora_A.weight"], t[f"{LAYER}.base_layer.lora_B.weight"]),
                     _peft_0190_delta(t[f"{LAYER}.lora_A.weight"], t[f"{LAYER}.lora_B.weight"]))
    got = peft_deltas(fixed)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta.float(), rtol=1e-5, atol=1e-6)


def test_expert_major_lora_b_loads_with_wrong_deltas_in_peft(tmp_path):
    """Unsloth's expert-major lora_B (marker grouped_by_expert) in peft 0.21's shapes: peft loads it without a word and
    reads every expert's B from the wrong columns (checked with peft itself); the fix gives peft the trained deltas."""
    from test_adapter_producers import _config, _unsloth_adapter

    marked = _config(peft_version="0.21.2", lora_B_layout="grouped_by_expert",
                     auto_mapping={"base_model_class": "Qwen3MoeForCausalLM", "unsloth_fixed": True})
    path, want = _unsloth_adapter(tmp_path, marked, 50)
    out = inspected(path)
    assert any("expert-major lora_B" in p for p in out["producers"])
    peft = out["servers"]["peft"]
    assert peft["as_is"] == AsIs.LOAD_WRONG.value and peft["loads"]
    as_is = peft_deltas(path)  # loads: no error
    assert not torch.allclose(as_is[(0, "down", 1)], want[(0, "down", 1)].float())
    fixed = run_fix(peft["fix"], tmp_path, "peft")
    after = inspected(fixed)  # the output says peft 0.21's packing (marker rank_major): read as peft reads it
    assert after["servers"]["peft"]["as_is"] == AsIs.LOAD.value and "expert_lora_packing" not in after["cases"]
    got = peft_deltas(fixed)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta.float(), rtol=1e-5, atol=1e-6)


def test_per_expert_gpt_oss_vllm_wants_the_peft_layout_and_the_fix_loads(tmp_path):
    """vLLM serves gpt-oss in the peft 3-D layout (configs/targets/vllm.json families.gpt_oss): a per-expert adapter is
    refused as is; the fix (fuse into peft's wrappers, gate/up lora_A stacked where they differ) loads with every
    expert's delta in the emulated vLLM."""
    path, deltas = make_per_expert_adapter(tmp_path / "a", "gpt_oss")
    cfg = config_file(tmp_path, "gpt_oss")
    vllm = inspected(path, cfg)["servers"]["vllm"]
    assert vllm["as_is"] == AsIs.REFUSE.value
    with pytest.raises(ValueError, match="expected target modules"):
        vllm_load(str(path), VLLM["gpt_oss"])
    assert vllm["fix"].startswith("python -m convert.split_adapter --target vllm ")
    fixed = run_fix(vllm["fix"], tmp_path, "vllm")
    assert inspected(fixed, cfg)["servers"]["vllm"]["as_is"] == AsIs.LOAD.value
    assert_experts(vllm_load(str(fixed), VLLM["gpt_oss"]), deltas)


def test_shared_outer_named_sglang_loads_vllm_refuses_and_its_fix_loads(tmp_path):
    """Shared-outer expert LoRA (Tinker, Megatron-Bridge, SkyRL): SGLang loads it natively (`shared_outer`), vLLM
    (default flags) refuses the stacked experts.w1/w2/w3; the vLLM fix applies every expert's delta."""
    path, deltas = make_shared_w123_adapter(tmp_path / "a", experts=E, rank=4)
    cfg = config_file(tmp_path, "qwen3_moe")
    out = inspected(path, cfg)
    assert out["producers"] and out["producers"][0].startswith("shared-outer")
    assert all(g["producer"].startswith("shared-outer") for g in out["groups"])
    vllm = out["servers"]["vllm"]
    assert vllm["as_is"] == AsIs.REFUSE.value
    with pytest.raises(ValueError):
        vllm_load(str(path), VLLM["qwen3_moe"])
    fixed = run_fix(vllm["fix"], tmp_path, "vllm")
    assert inspected(fixed, cfg)["servers"]["vllm"]["as_is"] == AsIs.LOAD.value
    assert_experts(vllm_load(str(fixed), VLLM["qwen3_moe"]), deltas)
    assert per_expert_deltas(fixed, "qwen3_moe").keys() == deltas.keys()


def test_tinker_broadcast_and_grouped_are_named(tmp_path):
    """Tinker's 3-D w1/w2/w3 with every lora_A of 1 expert (broadcast), and NeMo's grouped layout: named; no server
    loads grouped tensors (configs/targets: neither layout is an expert_layout)."""
    tensors = {}
    for l in range(2):
        for proj, (inn, out) in (("w1", (fx.H, fx.I)), ("w3", (fx.H, fx.I)), ("w2", (fx.I, fx.H))):
            tensors[f"{fx.layer(l)}.mlp.experts.{proj}.lora_A.weight"] = torch.randn(1, fx.R, inn)
            tensors[f"{fx.layer(l)}.mlp.experts.{proj}.lora_B.weight"] = torch.randn(fx.E, out, fx.R)
    path = fx.write_adapter(tmp_path / "tinker", tensors, fx.lora_config(base_model_name_or_path="Qwen/Qwen3-30B-A3B"))
    assert inspected(path)["producers"] == ["3-D w1/w2/w3 with a factor of 1 expert broadcast to every expert (Tinker)"]
    grouped = fx.write_adapter(tmp_path / "g", fx.grouped(range(2)), fx.lora_config())
    out = inspected(grouped)
    assert out["producers"] == ["NeMo AutoModel GroupedExpertsLoRA (x @ A @ B)"]
    for name in ("vllm", "sglang", "peft"):
        assert out["servers"][name]["as_is"] == AsIs.REFUSE.value, name
