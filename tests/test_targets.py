"""Target rules (configs/targets, convert.targets) against independent emulations of the servers'
loading code (tests/server_rules.py: vLLM 0.33.0, SGLang 0.5.23): on hand-made adapters, one per
rule, and on real peft target_parameters adapters of tiny models. `check_adapter` must refuse
exactly what the emulated server refuses or loads wrongly (drops, scales differently)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from adapter_fixtures import (
    make_peft_adapter,
    make_per_expert_adapter,
    peft_expert_deltas,
    random_lora,
    read_adapter,
    write_adapter,
)
from convert.errors import ConversionError
from convert.targets.check import REFUSE, WARN, check_adapter, refusals
from convert.targets.rules import TARGETS, load_target
from model_fixtures import LAYERS, E, H, I
from server_rules import sglang_load, sglang_models, vllm_load, vllm_models

VLLM = vllm_models(LAYERS, E)
SGLANG = sglang_models(LAYERS, E)
KV = 12  # v_proj out of the tiny models (1 kv head x head_dim 12)


def headers(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """adapter_config.json, tensor name -> (shape, dtype) from the headers, and the file names."""
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                s = fh.get_slice(k)
                tensors[k] = (tuple(s.get_shape()), s.get_dtype())
    return json.loads((path / "adapter_config.json").read_text()), tensors, sorted(p.name for p in path.iterdir())


def findings(target: str, family: str | None, path: Path, experts: int | None = E) -> list[Any]:
    config, tensors, files = headers(path)
    return check_adapter(load_target(target).for_family(family), config, tensors, files, experts)


def emulate(target: str, family: str, path: Path, **kw: Any) -> tuple[Any, str | None]:
    """(what the emulated server applies, or None; the error it raises or the modules it drops, or None)."""
    try:
        loaded = (vllm_load(str(path), VLLM[family], **kw) if target == "vllm"
                  else sglang_load(str(path), SGLANG[family], **kw))
    except Exception as exc:  # noqa: BLE001 - the server's own exception, whatever its type
        return None, f"{type(exc).__name__}: {exc}"
    return loaded, (f"dropped {loaded.dropped}" if loaded.dropped else None)


def assert_agree(target: str, family: str, path: Path, **kw: Any) -> tuple[Any, str | None]:
    """check_adapter refuses iff the emulated server refuses or drops something."""
    loaded, problem = emulate(target, family, path, **kw)
    refused = refusals(findings(target, family, path))
    assert bool(refused) == bool(problem), f"check: {refused}; server: {problem}"
    return loaded, problem


def add_v_proj(path: Path, rank: int = 4, prefix: str = "self_attn") -> None:
    """Add v_proj LoRA to every layer (SGLang stacks q/k/v and needs v where q has LoRA)."""
    tensors, config = read_adapter(path)
    for layer in range(LAYERS):
        base = f"base_model.model.model.layers.{layer}.{prefix}.v_proj"
        tensors[f"{base}.lora_A.weight"] = random_lora((rank, H), 900 + layer)
        tensors[f"{base}.lora_B.weight"] = random_lora((KV, rank), 950 + layer)
    tm = config["target_modules"]
    config["target_modules"] = tm if isinstance(tm, str) else [*tm, "v_proj"]
    write_adapter(path, tensors, config)


def edit(path: Path, drop: str = "", config: dict[str, Any] | None = None,
         add: dict[str, torch.Tensor] | None = None) -> Path:
    """Rewrite an adapter: tensors whose name contains `drop` removed, `config` keys set, `add` tensors added."""
    tensors, cfg = read_adapter(path)
    tensors = {k: v for k, v in tensors.items() if not (drop and drop in k)}
    tensors.update(add or {})
    write_adapter(path, tensors, {**cfg, **(config or {})})
    return path


def assert_experts_equal(loaded: Any, deltas: dict[tuple[int, str, int], torch.Tensor]) -> None:
    assert set(deltas) == {(layer, role, e) for (layer, e), d in loaded.experts.items() for role in d}
    for (layer, role, e), want in deltas.items():
        torch.testing.assert_close(loaded.experts[(layer, e)][role], want.float(), rtol=1e-5, atol=1e-6)


# --- the rule files -----------------------------------------------------------------------------

def test_every_target_loads_for_every_family() -> None:
    from convert.families.registry import load_families

    for name in TARGETS:
        target = load_target(name)
        for family in [None, *load_families()]:
            rules = target.for_family(family)
            assert rules.target == name and rules.expert_layout in ("per_expert", "peft")
    assert load_target("vllm").for_family("gpt_oss").expert_layout == "peft"
    assert load_target("vllm").for_family("qwen3_moe").zero_rank == 1
    assert load_target("sglang").for_family("mixtral").expert_names == ("canonical", "w123")


@pytest.mark.parametrize("bad, message", [
    ({"expert_names": ["checkpointt"]}, "expert_names"),
    ({"zero_rank": 0}, "zero_rank"),
    ({"refuse_modules": {"(": "x"}}, "not a regular expression"),
    ({"max_rank": "16"}, "max_rank"),
    ({"no_such_rule": True}, "unknown key"),
])
def test_rule_files_are_strict(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    doc = json.loads((Path(__file__).parents[1] / "configs/targets/vllm.json").read_text())
    doc["rules"].update(bad)
    (tmp_path / "vllm.json").write_text(json.dumps(doc))
    with pytest.raises(ConversionError, match=message):
        load_target("vllm", tmp_path)


# --- vLLM: hand-made adapters, one rule each ------------------------------------------------------

def test_vllm_loads_per_expert_qwen3_with_exact_deltas(tmp_path: Path) -> None:
    path, deltas = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    loaded, problem = assert_agree("vllm", "qwen3_moe", path)
    assert problem is None
    assert_experts_equal(loaded, deltas)
    tensors, _ = read_adapter(path)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(loaded.linear["model.layers.0.self_attn.q_proj"],
                               tensors[f"{q}.lora_B.weight"] @ tensors[f"{q}.lora_A.weight"] * 2.0)


def test_vllm_mixtral_needs_block_sparse_moe_names(tmp_path: Path) -> None:
    path, deltas = make_per_expert_adapter(tmp_path / "ok", "mixtral")
    loaded, problem = assert_agree("vllm", "mixtral", path)
    assert problem is None
    assert_experts_equal(loaded, deltas)
    # the same adapter under transformers' container name (mlp.): vLLM accepts the names, applies nothing
    tensors, config = read_adapter(path)
    renamed = write_adapter(tmp_path / "mlp", {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()},
                            config)
    loaded, problem = assert_agree("vllm", "mixtral", renamed)
    assert problem and "mlp.experts.0.w1" in problem and not loaded.experts
    found = refusals(findings("vllm", "mixtral", renamed))
    assert any("block_sparse_moe" in m for m in found)


def test_vllm_mixtral_router_lora_under_mlp_gate_is_dropped(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "mixtral")
    router = {f"base_model.model.model.layers.0.{c}.gate.lora_{ab}.weight": random_lora(s, 7)
              for c in ("mlp",) for ab, s in (("A", (4, H)), ("B", (E, 4)))}
    edit(path, add=router)
    loaded, problem = assert_agree("vllm", "mixtral", path)
    assert problem == "dropped ['model.layers.0.mlp.gate']"
    fixed = edit(path, drop=".mlp.gate.", add={k.replace(".mlp.", ".block_sparse_moe."): v for k, v in router.items()})
    loaded, problem = assert_agree("vllm", "mixtral", fixed)
    assert problem is None and "model.layers.0.block_sparse_moe.gate" in loaded.linear


@pytest.mark.parametrize("drop, role", [(".down_proj.", "down"), (".gate_proj.", "gate"), (".up_proj.", "up")])
def test_vllm_pack_moe_needs_every_projection(tmp_path: Path, drop: str, role: str) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    edit(path, drop=drop)
    _, problem = assert_agree("vllm", "qwen3_moe", path)
    assert problem and problem.startswith("AssertionError")
    assert any(f"no {role} LoRA" in m for m in refusals(findings("vllm", "qwen3_moe", path)))


def test_vllm_zero_pair_of_rank_one_loads_with_exact_deltas(tmp_path: Path) -> None:
    """The zero-pair rule: a missing projection as an all-zero pair of rank 1 (vllm.json zero_rank) loads, delta 0."""
    path, deltas = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    zero = {}
    for layer in range(LAYERS):
        for e in range(E):
            base = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.down_proj"
            zero[f"{base}.lora_A.weight"], zero[f"{base}.lora_B.weight"] = torch.zeros(1, I), torch.zeros(H, 1)
            deltas[(layer, "down", e)] = torch.zeros(H, I)
    edit(path, drop=".down_proj.", add=zero)
    loaded, problem = assert_agree("vllm", "qwen3_moe", path)
    assert problem is None
    assert_experts_equal(loaded, deltas)


def test_vllm_one_rank_per_projection(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    base = "base_model.model.model.layers.0.mlp.experts.3.down_proj"
    edit(path, add={f"{base}.lora_A.weight": torch.zeros(1, I), f"{base}.lora_B.weight": torch.zeros(H, 1)})
    _, problem = assert_agree("vllm", "qwen3_moe", path)
    assert problem and "different LoRA ranks" in problem


def test_vllm_expert_index_beyond_e(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe", experts=E + 1)
    _, problem = assert_agree("vllm", "qwen3_moe", path)
    assert problem and "expected target modules" in problem and "experts.5.gate_proj" in problem


@pytest.mark.parametrize("config, message", [
    ({"bias": "all"}, "Adapter bias is not supported."),
    ({"use_dora": True}, "vLLM does not yet support DoRA."),
    ({"modules_to_save": ["lm_head"]}, "Unsupported modules_to_save: ['lm_head']"),
])
def test_vllm_config_refusals(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    edit(path, config=config)
    _, problem = assert_agree("vllm", "qwen3_moe", path)
    assert problem and message in problem


def test_vllm_rank_above_limit_is_a_warning_with_the_flag(tmp_path: Path) -> None:
    path, deltas = make_per_expert_adapter(tmp_path / "a", "qwen3_moe", rank=32, alpha=64)
    _, problem = emulate("vllm", "qwen3_moe", path)
    assert problem and "LoRA rank 32 is greater than max_lora_rank 16." in problem
    found = findings("vllm", "qwen3_moe", path)
    assert not refusals(found)
    assert [f.message for f in found if f.severity == WARN] == [
        "LoRA rank 32 is above vLLM 0.33's default limit 16 (raise it with --max-lora-rank 32 or more)"]
    loaded, problem = emulate("vllm", "qwen3_moe", path, max_lora_rank=32)
    assert problem is None
    assert_experts_equal(loaded, deltas)


def test_vllm_rank_and_alpha_pattern_honoured(tmp_path: Path) -> None:
    path, deltas = make_per_expert_adapter(tmp_path / "a", "qwen3_moe", alpha=8)
    edit(path, config={"alpha_pattern": {"down_proj": 2}})
    deltas = {k: (v / 4 if k[1] == "down" else v) for k, v in deltas.items()}  # scaling 2/4 instead of 8/4
    loaded, problem = assert_agree("vllm", "qwen3_moe", path)
    assert problem is None
    assert_experts_equal(loaded, deltas)


def test_vllm_sharded_adapter_refused(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    (path / "adapter_model.safetensors").rename(path / "adapter_model-00001-of-00001.safetensors")
    (path / "adapter_model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    _, problem = emulate("vllm", "qwen3_moe", path)
    assert problem and "doesn't contain tensors" in problem
    assert any("sharded adapter" in m for m in refusals(findings("vllm", "qwen3_moe", path)))


def test_vllm_gpt_oss_refuses_per_expert_keys(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "gpt_oss")
    _, problem = assert_agree("vllm", "gpt_oss", path)
    assert problem and "expected target modules" in problem and "experts.0.gate_proj" in problem


# --- real peft adapters (target_parameters) on tiny models ---------------------------------------

def test_vllm_loads_peft_gpt_oss_adapter_with_peft_deltas(tmp_path: Path) -> None:
    peft_model, path = make_peft_adapter("gpt_oss", tmp_path / "a")
    loaded, problem = assert_agree("vllm", "gpt_oss", path)
    assert problem is None
    assert_experts_equal(loaded, peft_expert_deltas(peft_model, "gpt_oss"))
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        want = q.get_delta_weight("default")
    torch.testing.assert_close(loaded.linear["model.layers.0.attn.q_proj"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, message", [
    ("qwen3_moe", "contains fused 3D MoE weights"),
    ("mixtral", "dropped ['model.layers.0.mlp.experts'"),  # vLLM's MoE is block_sparse_moe: never checked, never applied
])
def test_vllm_refuses_peft_3d_adapter_on_per_expert_models(tmp_path: Path, family: str, message: str) -> None:
    _, path = make_peft_adapter(family, tmp_path / "a")
    _, problem = assert_agree("vllm", family, path)
    assert problem and message in problem


def test_vllm_gpt_oss_down_only_3d_adapter_asserts(tmp_path: Path) -> None:
    _, path = make_peft_adapter("gpt_oss", tmp_path / "a")
    edit(path, drop=".experts.base_layer.")
    _, problem = assert_agree("vllm", "gpt_oss", path)
    assert problem and problem.startswith("AssertionError")


def test_deepseek_v3_peft_adapter(tmp_path: Path) -> None:
    """A real peft adapter on a tiny DeepSeek-V3 (MLA attention, shared experts): vLLM refuses its 3-D
    experts; its attention LoRA parses to vLLM's fused_qkv_a_proj sub-modules."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import LAYERS as TL
    from tiny_models import E as TE
    from tiny_models import build

    model = build("deepseek_v3")
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_a_proj", "kv_a_proj_with_mqa", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(tmp_path / "a"))
    vllm = vllm_models(TL, TE)["deepseek_v3"]
    with pytest.raises(ValueError, match="contains fused 3D MoE weights"):
        vllm_load(str(tmp_path / "a"), vllm)
    config, tensors, files = headers(tmp_path / "a")
    found = refusals(check_adapter(load_target("vllm").for_family("qwen3_moe"), config, tensors, files, TE))
    assert found and all("fused 3-D expert LoRA" in m for m in found)
    attn_only = edit(tmp_path / "a", drop=".experts.")
    loaded = vllm_load(str(attn_only), vllm)
    assert not loaded.dropped and "model.layers.1.self_attn.q_a_proj" in loaded.linear


# --- SGLang ---------------------------------------------------------------------------------------

def test_sglang_loads_per_expert_with_exact_deltas(tmp_path: Path) -> None:
    for family in ("qwen3_moe", "mixtral", "gpt_oss"):
        path, deltas = make_per_expert_adapter(tmp_path / family, family)
        _, problem = assert_agree("sglang", family, path)
        assert problem and problem.startswith("KeyError")  # q_proj LoRA without v_proj
        add_v_proj(path)
        if family == "mixtral":  # target_modules w1/w3/w2 are not normalized: no buffer for the renamed keys
            _, problem = assert_agree("sglang", family, path)
            assert problem and "Cannot find target module name" in problem
            edit(path, config={"target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
        loaded, problem = assert_agree("sglang", family, path)
        assert problem is None
        assert_experts_equal(loaded, deltas)


def test_sglang_ignores_rslora_so_the_check_refuses(tmp_path: Path) -> None:
    path, deltas = make_per_expert_adapter(tmp_path / "a", "qwen3_moe", use_rslora=True)
    add_v_proj(path)
    loaded, _ = emulate("sglang", "qwen3_moe", path)
    got = loaded.experts[(0, 0)]["gate"]
    assert not torch.allclose(got, deltas[(0, "gate", 0)] * 2)  # peft: alpha / sqrt(r) = 4, SGLang: alpha / r = 2
    assert any("ignores ['use_rslora']" in m for m in refusals(findings("sglang", "qwen3_moe", path)))


def test_sglang_fixed_rank_and_target_modules(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    add_v_proj(path, rank=2)
    _, problem = assert_agree("sglang", "qwen3_moe", path)
    assert problem and "Sizes of tensors must match" in problem  # q and v stacked with different ranks
    path, _ = make_per_expert_adapter(tmp_path / "r", "qwen3_moe")
    add_v_proj(path)
    low = {}
    for e in range(E):
        base = f"base_model.model.model.layers.0.mlp.experts.{e}.down_proj"
        low[f"{base}.lora_A.weight"], low[f"{base}.lora_B.weight"] = random_lora((2, I), e), random_lora((H, 2), e)
    edit(path, add=low)
    _, problem = assert_agree("sglang", "qwen3_moe", path)
    assert problem and "does not match weight shape" in problem
    assert any("but r = 4" in m for m in refusals(findings("sglang", "qwen3_moe", path)))
    path, _ = make_per_expert_adapter(tmp_path / "b", "qwen3_moe")
    add_v_proj(path)
    edit(path, config={"target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]})
    _, problem = assert_agree("sglang", "qwen3_moe", path)
    assert problem  # down_proj LoRA has no target: refused when its buffer is looked up
    edit(path, config={"target_modules": ".*(q_proj|v_proj)"})
    _, problem = assert_agree("sglang", "qwen3_moe", path)
    assert problem and "does not recognize target_modules" in problem


def test_sglang_gpt_oss_router_lora_dropped(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "gpt_oss")
    add_v_proj(path)
    edit(path, add={f"base_model.model.model.layers.0.mlp.router.lora_{ab}.weight": random_lora(s, 3)
                    for ab, s in (("A", (4, H)), ("B", (E, 4)))},
         config={"target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router"]})
    _, problem = assert_agree("sglang", "gpt_oss", path)
    assert problem and "mlp.router" in problem


def test_findings_are_reported_once_per_kind(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "gpt_oss")
    found = findings("vllm", "gpt_oss", path)
    assert len(found) == 1 and found[0].severity == REFUSE and "more like it" in found[0].message


# --- inspect and verify ---------------------------------------------------------------------------

def _base_config(tmp_path: Path, family: str) -> Path:
    from adapter_fixtures import base_config

    path = tmp_path / f"{family}-config.json"
    path.write_text(json.dumps(base_config(family)))
    return path


def test_inspect_says_per_target_whether_it_loads(tmp_path: Path) -> None:
    from helpers import run_tool

    path, _ = make_per_expert_adapter(tmp_path / "a", "mixtral")
    out = json.loads(run_tool("convert.inspect", str(path), "--json", "--base-config",
                              str(_base_config(tmp_path, "mixtral"))).stdout)
    servers = out["servers"]
    assert set(servers) == set(TARGETS)
    assert servers["vllm"]["loads"] and servers["per-expert"]["loads"]
    assert not servers["sglang"]["loads"] and any("v_proj" in m for m in servers["sglang"]["refusals"])
    assert not servers["peft"]["loads"]
    text = run_tool("convert.inspect", str(path), "--base-config", str(_base_config(tmp_path, "mixtral"))).stdout
    assert "    vllm: loads" in text and "    sglang: refused" in text


def test_verify_target_rules_only_exit_codes(tmp_path: Path) -> None:
    from helpers import run_tool

    cfg = str(_base_config(tmp_path, "mixtral"))
    path, _ = make_per_expert_adapter(tmp_path / "a", "mixtral")
    ok = run_tool("convert.verify", "--target", "vllm", "--dst", str(path), "--base-config", cfg, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "OK:" in ok.stdout and "target vllm" in ok.stdout
    bad = run_tool("convert.verify", "--target", "sglang", "--dst", str(path), "--base-config", cfg, check=False)
    assert bad.returncode == 1 and "v_proj" in bad.stdout and "target rule(s) broken" in bad.stderr
    gone = run_tool("convert.verify", "--target", "vllm", "--dst", str(tmp_path / "nope"), check=False)
    assert gone.returncode == 2
    none = run_tool("convert.verify", "--dst", str(path), check=False)
    assert none.returncode == 2 and "--src is required" in none.stderr


def test_verify_uses_the_target_the_output_record_names(tmp_path: Path) -> None:
    from convert.engine.output_record import record_bytes
    from helpers import run_tool

    cfg = str(_base_config(tmp_path, "mixtral"))
    path, _ = make_per_expert_adapter(tmp_path / "a", "mixtral")
    files = [(p.name, p.stat().st_size) for p in sorted(path.iterdir())]
    record = json.loads(record_bytes(files, "f" * 16, "adapter_config.json"))
    (path / ".moe-convert").mkdir()
    (path / ".moe-convert" / "output.json").write_text(json.dumps({**record, "target": "sglang"}))
    proc = run_tool("convert.verify", "--src", str(path), "--dst", str(path), "--base-config", cfg, check=False)
    assert proc.returncode == 1 and "target sglang" in proc.stdout
    proc = run_tool("convert.verify", "--src", str(path), "--dst", str(path), "--base-config", cfg,
                    "--target", "vllm", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sglang_needs_target_modules_to_name_every_lora_module(tmp_path: Path) -> None:
    path, _ = make_per_expert_adapter(tmp_path / "a", "qwen3_moe")
    add_v_proj(path)
    edit(path, add={f"base_model.model.model.layers.0.mlp.gate.lora_{ab}.weight": random_lora(s, 5)
                    for ab, s in (("A", (4, H)), ("B", (E, 4)))},
         config={"target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    _, problem = assert_agree("sglang", "qwen3_moe", path)
    assert problem and "Cannot find target module name" in problem
    edit(path, config={"target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate"]})
    loaded, problem = assert_agree("sglang", "qwen3_moe", path)
    assert problem is None and "model.layers.0.mlp.gate" in loaded.linear


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_sglang_refuses_raw_peft_3d_adapters(tmp_path: Path, family: str) -> None:
    _, path = make_peft_adapter(family, tmp_path / "a")
    _, problem = assert_agree("sglang", family, path)
    assert problem
    assert any("fused 3-D expert LoRA" in m for m in refusals(findings("sglang", family, path)))


def test_non_gated_family_needs_only_its_roles() -> None:
    """nemotron_h experts have up and down only (vLLM pads pack_moe's triplets for non-gated MoE)."""
    rules = load_target("vllm").for_family("nemotron_h")
    tensors = {}
    for e in range(E):
        for leaf, (a, b) in {"up_proj": ((4, H), (I, 4)), "down_proj": ((4, I), (H, 4))}.items():
            base = f"base_model.model.backbone.layers.1.mixer.experts.{e}.{leaf}"
            tensors[f"{base}.lora_A.weight"], tensors[f"{base}.lora_B.weight"] = (a, "F32"), (b, "F32")
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["up_proj", "down_proj"]}
    assert refusals(check_adapter(rules, config, tensors, ["adapter_model.safetensors"], E)) == []
    del tensors["base_model.model.backbone.layers.1.mixer.experts.2.down_proj.lora_A.weight"]
    del tensors["base_model.model.backbone.layers.1.mixer.experts.2.down_proj.lora_B.weight"]
    assert any("no down LoRA" in m for m in refusals(check_adapter(rules, config, tensors, ["adapter_model.safetensors"], E)))


def test_synthetic_shared_w123_and_grouped_adapters(tmp_path: Path) -> None:
    """vLLM (default flags) refuses both; SGLang takes the shared-outer layout natively (rule shared_outer)."""
    from adapter_fixtures import make_grouped_adapter, make_shared_w123_adapter

    shared, _ = make_shared_w123_adapter(tmp_path / "s", experts=E, rank=4)
    grouped, _ = make_grouped_adapter(tmp_path / "g", experts=E, rank=4)
    for path, message in ((shared, "expected target modules"), (grouped, "unsupported LoRA weight")):
        _, problem = assert_agree("vllm", "qwen3_moe", path)
        assert problem and message in problem
    add_v_proj(shared)
    edit(shared, config={"target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    assert refusals(findings("sglang", "qwen3_moe", shared)) == []
    assert any("NeMo grouped" in m for m in refusals(findings("sglang", "qwen3_moe", grouped)))
