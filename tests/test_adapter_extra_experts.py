"""Expert LoRA of a family whose roles are held by different expert counts (`extra_experts`).

LongCat-Flash as transformers 5.23 defined it (configs/legacy/transformers-5.23.0/longcat_flash.json,
used through MOE_CONVERT_CONFIGS): its fused gate_up_proj held E + zero_expert_num experts, its
down_proj E. A real peft target_parameters adapter on a tiny longcat model of that shape (built by
transformers; from 5.25, whose LongcatFlashExperts holds E experts for every role, with gate_up_proj
allocated [E + zero_expert_num, 2I, H] as 5.23 allocated it; B random) must split to per-expert pairs
whose deltas are peft's own get_delta_weight for every expert and role (experts >= E only for
gate/up), with one rank and with two, and fuse back to the source factors byte for byte. Targets and
layouts that hold LoRA for E experts only refuse it. Without the 5.23 table, such an adapter is refused
naming that table; an adapter of the installed transformers' longcat model converts with the built-in one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from adapter_fixtures import peft_expert_deltas
from helpers import REPO, run_tool

FAMILY = "longcat_flash"
PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
LEGACY = REPO / "configs" / "legacy" / "transformers-5.23.0"  # the 5.23 definition of longcat_flash


@pytest.fixture(autouse=True)
def legacy_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tool of these tests reads longcat_flash as transformers 5.23 defined it (the README's way)."""
    monkeypatch.setenv("MOE_CONVERT_CONFIGS", str(LEGACY))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[tuple[int, str, int], torch.Tensor], Any]:
    """(adapter dir, base config.json, peft's per-expert deltas, the base model's config)."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import build, with_extra_expert_rows

    root = tmp_path_factory.mktemp("longcat_lora")
    model = with_extra_expert_rows(build(FAMILY))
    cfg = model.config
    torch.manual_seed(7)
    peft_model = get_peft_model(model, LoraConfig(
        r=2, lora_alpha=5, target_modules=[], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).eval()
    peft_model.save_pretrained(str(root / "adapter"))
    cfg.save_pretrained(str(root / "base"))
    deltas = peft_expert_deltas(peft_model, "qwen3_moe")  # gate_up = [gate; up] halves, as qwen3_moe's
    return root / "adapter", root / "base" / "config.json", deltas, cfg


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def _per_expert_deltas(path: Path) -> dict[tuple[int, str, int], torch.Tensor]:
    tensors = _tensors(path)
    config = json.loads((path / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for name, a in tensors.items():
        if ".experts." not in name or not name.endswith("lora_A.weight"):
            continue
        head = name.split(".layers.")[1]
        layer, rest = int(head.split(".")[0]), head.split(".experts.")[1]
        e, proj = int(rest.split(".")[0]), rest.split(".")[1]
        role = {v: k for k, v in PROJ.items()}[proj]
        b = tensors[name.replace("lora_A", "lora_B")]
        out[(layer, role, e)] = (b.double() @ a.double() * scale).float()
    return out


@pytest.mark.parametrize("nproc,base", [(None, True), (2, True), (None, False)])
def test_split_gives_peft_deltas_and_fuses_back_byte_identical(adapter: Any, tmp_path: Path, nproc: int | None,
                                                                base: bool) -> None:
    src, base_config, want, cfg = adapter
    E, extra = cfg.n_routed_experts, cfg.zero_expert_num
    assert extra > 0
    more = ["--base-config", str(base_config)] if base else []
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "pe"), "--target", "per-expert",
             *more, nproc=nproc)
    got = _per_expert_deltas(tmp_path / "pe")
    assert set(got) == set(want)
    layers = {k[0] for k in want}
    assert {k for k in got if k[2] >= E} == {(l, r, e) for l in layers for r in ("gate", "up") for e in range(E, E + extra)}
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")

    run_tool("convert.fuse_adapter", "--src", str(tmp_path / "pe"), "--dst", str(tmp_path / "fused"), "--layout", "peft",
             *more, nproc=nproc)
    a, b = _tensors(src), _tensors(tmp_path / "fused")
    assert set(a) == set(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    fused_cfg = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert sorted(fused_cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    run_tool("convert.verify", "--src", str(src), "--dst", str(tmp_path / "pe"), *more)


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_server_targets_refuse_experts_beyond_e(adapter: Any, tmp_path: Path, target: str) -> None:
    src, base_config, _, cfg = adapter
    dst = tmp_path / "out"
    proc = run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), "--target", target,
                    "--base-config", str(base_config), check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "layer base_model.model.model.layers.0.mlp" in err and f"--target {target}" in err
    assert f"{cfg.n_routed_experts + cfg.zero_expert_num} experts" in err and "zero_expert_num" in err
    assert not dst.exists()


def test_layouts_of_one_expert_count_refuse_it(adapter: Any, tmp_path: Path) -> None:
    src, base_config, _, _ = adapter
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "pe"), "--target", "per-expert")
    for layout in ("grouped", "shared_w123"):
        dst = tmp_path / layout
        proc = run_tool("convert.fuse_adapter", "--src", str(tmp_path / "pe"), "--dst", str(dst), "--layout", layout,
                        check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"the {layout} layout holds LoRA for the model's E experts only" in proc.stderr
        assert not dst.exists()


def test_per_expert_adapter_missing_an_extra_expert_is_refused(adapter: Any, tmp_path: Path) -> None:
    src, base_config, _, cfg = adapter
    run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "pe"), "--target", "per-expert")
    last = cfg.n_routed_experts + cfg.zero_expert_num - 1
    path = next((tmp_path / "pe").glob("*.safetensors"))
    from safetensors.torch import save_file
    tensors = {k: v for k, v in _tensors(tmp_path / "pe").items() if f".experts.{last}.up_proj." not in k}
    save_file(tensors, str(path), metadata={"format": "pt"})
    proc = run_tool("convert.fuse_adapter", "--src", str(tmp_path / "pe"), "--dst", str(tmp_path / "f"), "--layout",
                    "peft", "--base-config", str(base_config), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"up lora_A of expert {last} is missing" in proc.stderr and f"expected all {last + 1} experts" in proc.stderr


def test_without_the_5_23_table_it_is_refused_naming_that_table(adapter: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src, base_config, _, cfg = adapter
    monkeypatch.delenv("MOE_CONVERT_CONFIGS")
    dst = tmp_path / "pe"
    proc = run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), "--target", "per-expert",
                    "--base-config", str(base_config), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    total = cfg.n_routed_experts + cfg.zero_expert_num
    for part in ("layer base_model.model.model.layers.0.mlp", f"different expert counts [{cfg.n_routed_experts}, {total}]",
                 f"gate {total}, up {total}, down {cfg.n_routed_experts}", "family longcat_flash of configs/legacy/"
                 "transformers-5.23.0/longcat_flash.json (transformers 5.23.0)",
                 "add configs/legacy/transformers-5.23.0 to MOE_CONVERT_CONFIGS"):
        assert part in lines[0], lines[0]
    assert not dst.exists()


def test_an_adapter_of_the_installed_longcat_converts_with_the_built_in_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed transformers' own longcat model: every role held by E experts (5.25), the built-in table."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import build

    model = build(FAMILY)
    cfg = model.config
    if any(p.shape[0] != cfg.n_routed_experts for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")):
        pytest.skip("the installed transformers' longcat holds gate/up for E + zero_expert_num experts (5.23)")
    monkeypatch.delenv("MOE_CONVERT_CONFIGS")
    torch.manual_seed(8)
    peft_model = get_peft_model(model, LoraConfig(
        r=2, lora_alpha=5, target_modules=[], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    cfg.save_pretrained(str(tmp_path / "base"))
    want = peft_expert_deltas(peft_model, "qwen3_moe")
    run_tool("convert.split_adapter", "--src", str(tmp_path / "adapter"), "--dst", str(tmp_path / "pe"),
             "--target", "per-expert", "--base-config", str(tmp_path / "base" / "config.json"))
    got = _per_expert_deltas(tmp_path / "pe")
    assert set(got) == set(want) and max(k[2] for k in got) == cfg.n_routed_experts - 1
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
