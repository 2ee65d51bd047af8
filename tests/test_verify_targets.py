"""convert.verify on split_adapter --target outputs (issue 14): the deltas of every expert and every other LoRA
module are paired through the family's renames, zero pairs must be exactly zero where the source has no LoRA,
and a lora_B rescaled for a target's scaling must be exactly the float32-then-rounded product; real errors
(a wrong expert, a non-zero "zero pair", a wrongly scaled B, a missing or misnamed router) are caught.

Target-rule findings ("target ...": what the server would refuse) are checked elsewhere (tests/test_targets.py);
here only the conversion's correctness counts, so they are left out where a test looks at the comparison.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter_fixtures import read_adapter, write_adapter
from convert.families import load_families
from convert.verify.run import VerifyOptions, check_share, plan_verify
from helpers import run_tool
from test_adapter_targets import _families, _in_process, _peft_adapter, _rules, _synthetic_peft

PEFT = "base_model.model."


def _verify(src: Path, dst: Path, base: Path) -> tuple[list[str], int]:
    """(conversion problems and mismatches, expert slices checked) of verifying dst against src in this process;
    findings of the target's loading rules left out."""
    opts = VerifyOptions(str(src), str(dst), base_config=str(base))
    relation = plan_verify(opts)
    tally = check_share(relation, opts, 0, 1)
    found = [p for p in relation.problems if not p.startswith("target ")] + [str(m) for m in tally.mismatches]
    return found, tally.experts_checked


def _edit(dst: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> None:
    """Change the output's tensors / adapter_config.json in place (other files, the output record, kept)."""
    tensors, config = read_adapter(dst)
    edit(tensors, config)
    write_adapter(dst, tensors, config)


def _base(src: Path) -> Path:
    return src.parent / f"{src.name}-config.json"


@pytest.mark.parametrize("family_name", _families())
def test_every_target_output_of_every_family_verifies(tmp_path, family_name):
    """Synthetic peft adapters (every fused expert parameter, attention and router LoRA) split for every target:
    the verifier pairs every key through the family's renames and checks every expert of every layer."""
    family = load_families()[family_name]
    src = tmp_path / "src"
    _, base = _synthetic_peft(family, src)
    experts = 3 * 2  # the fixture's experts x layers
    for target in ("vllm", "sglang", "peft", "per-expert"):
        dst = tmp_path / target
        _in_process("split", src, dst, target, base)
        found, checked = _verify(src, dst, base)
        assert not found, (target, found)
        assert checked >= experts, (target, checked)


def _mixtral_vllm(tmp_path: Path) -> tuple[Path, Path, Path]:
    family = load_families()["mixtral"]
    src, dst = tmp_path / "src", tmp_path / "vllm"
    _, base = _synthetic_peft(family, src, experts=4)
    _in_process("split", src, dst, "vllm", base)
    assert not _verify(src, dst, base)[0]
    return src, dst, base


def test_wrong_expert_missing_router_and_router_under_the_wrong_name_are_caught(tmp_path):
    src, good, base = _mixtral_vllm(tmp_path)
    tensors, _ = read_adapter(good)
    w1 = PEFT + "model.layers.0.block_sparse_moe.experts.{e}.w1.lora_B.weight"
    router = PEFT + "model.layers.1.block_sparse_moe.gate.lora_{f}.weight"
    assert w1.format(e=1) in tensors and router.format(f="A") in tensors  # vLLM's names for Mixtral

    def swap(t, c):  # experts 1 and 2 of one projection exchanged
        t[w1.format(e=1)], t[w1.format(e=2)] = t[w1.format(e=2)], t[w1.format(e=1)]

    def drop_router(t, c):
        for f in "AB":
            del t[router.format(f=f)]

    def model_named_router(t, c):  # the transformers name vLLM accepts and never applies (issue 14)
        for f in "AB":
            t[router.format(f=f).replace("block_sparse_moe", "mlp")] = t.pop(router.format(f=f))

    cases = {"swap": (swap, ["expert 1", "expert 2", "w1"]),
             "drop": (drop_router, [router.format(f="A").replace(".block_sparse_moe.gate", ".mlp.gate"),
                                    "is not in the destination"]),
             "rename": (model_named_router, ["not the checkpoint naming", "mlp.gate"])}
    for case, (edit, expect) in cases.items():
        dst = tmp_path / case
        _in_process("split", src, dst, "vllm", base)
        _edit(dst, edit)
        found, _ = _verify(src, dst, base)
        text = "\n".join(found)
        assert found, case
        for s in expect:
            assert s in text, (case, s, text)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_zero_pairs_pass_only_when_exactly_zero(tmp_path, model_type):
    """A gate_up-only real peft adapter: the targets that need every projection add zero down pairs (per expert, or
    a zero peft wrapper for gpt-oss on vLLM); they verify, and one non-zero element in either factor does not."""
    src = tmp_path / "src"
    _peft_adapter(model_type, src, seed=5, params=("gate_up_proj",), router=False)
    base = _base(src)
    family = next(f for f in load_families().values() if model_type in f.model_types)
    exercised = 0
    for target in ("vllm", "sglang"):
        if not _rules(target, family.name).all_roles:
            continue
        dst = tmp_path / target
        _in_process("split", src, dst, target, base)
        assert not _verify(src, dst, base)[0], target
        out, _ = read_adapter(dst)
        zero = sorted(k for k in out if ".experts" in k and ".lora_" in k and not out[k].any())
        assert zero, (target, sorted(out))
        exercised += 1
        for factor in "AB":
            name = next(k for k in zero if f"lora_{factor}" in k)
            bad = tmp_path / f"{target}-{factor}"
            _in_process("split", src, bad, target, base)

            def poke(t, c, name=name):
                t[name] = t[name].clone()
                t[name].view(-1)[-1] = 1e-3

            _edit(bad, poke)
            found, _ = _verify(src, bad, base)
            assert any("exact zero pair" in f for f in found), (target, factor, found)
    assert exercised


def _bf16(src: Path) -> None:
    tensors, config = read_adapter(src)
    write_adapter(src, {k: v.to(torch.bfloat16) for k, v in tensors.items()}, config)


def test_rescaled_lora_b_passes_only_as_the_exact_float32_rounded_product(tmp_path):
    """SGLang does not read alpha_pattern: split for it, every lora_B is B * s/s' (float32, rounded
    once to bf16). That output verifies; the unrescaled B, a B scaled by another factor, or one ulp off in one
    element of one expert do not; nor does a rescaled attention B that is off."""
    src = tmp_path / "src"
    _peft_adapter("qwen3_moe", src, seed=6, alpha_pattern={"gate_up_proj": 5, "o_proj": 4})
    _bf16(src)
    base = _base(src)
    rules = _rules("sglang", "qwen3_moe")
    assert not rules.alpha_pattern
    dst = tmp_path / "sglang"
    _in_process("split", src, dst, "sglang", base)
    found, _ = _verify(src, dst, base)
    assert not found, found
    out, config = read_adapter(dst)
    assert not config["alpha_pattern"]
    per_expert = tmp_path / "per-expert"  # the same adapter for a target that honours everything: no rescaling
    _in_process("split", src, per_expert, "per-expert", base)
    plain, _ = read_adapter(per_expert)
    expert_b = next(k for k in sorted(out) if ".experts.1.gate_proj.lora_B" in k and k in plain)
    attention_b = next(k for k in sorted(out) if "o_proj.lora_B" in k)
    assert not torch.equal(out[expert_b], plain[expert_b])  # rescaled

    def unrescaled(t, c):
        t[expert_b] = plain[expert_b]

    def other_factor(t, c):
        t[expert_b] = (plain[expert_b].float() * 1.01).to(torch.bfloat16)

    def one_ulp(t, c):
        b = t[expert_b].clone()
        bits = b.view(torch.int16).view(-1)
        i = int(b.view(-1).abs().argmax())
        bits[i] ^= 1
        t[expert_b] = b

    def attention(t, c):
        t[attention_b] = (t[attention_b].float() * 1.01).to(torch.bfloat16)

    for case, edit, expect in (("unrescaled", unrescaled, "expert 1"), ("factor", other_factor, "expert 1"),
                               ("ulp", one_ulp, "expert 1"), ("attention", attention, "(r, scaling)")):
        bad = tmp_path / case
        _in_process("split", src, bad, "sglang", base)
        _edit(bad, edit)
        found, _ = _verify(src, bad, base)
        assert any(expect in f for f in found), (case, found)


def test_zero_padded_rank_is_exact_and_a_non_zero_pad_is_caught(tmp_path):
    """A module's rank padded with zero rows of A and zero columns of B (as a fixed-rank target asks), its
    rank_pattern / alpha_pattern keeping the scaling: the same delta. A non-zero pad changes it."""
    family = load_families()["qwen3_moe"]
    src = tmp_path / "src"
    _, base = _synthetic_peft(family, src, alpha=6)
    module = PEFT + "model.layers.0.mlp.experts.{e}.down_proj"

    def pad(value: float):  # every expert of the layer padded by one (experts of a layer share a rank); expert 2 by value
        def edit(t, c):
            for e in range(3):
                m = module.format(e=e)
                a, b = t[m + ".lora_A.weight"], t[m + ".lora_B.weight"]
                v = value if e == 2 else 0.0
                extra_a = torch.zeros((1, a.shape[1]), dtype=a.dtype)
                extra_a[0, 0] = v
                t[m + ".lora_A.weight"] = torch.cat([a, extra_a])
                t[m + ".lora_B.weight"] = torch.cat([b, torch.full((b.shape[0], 1), v, dtype=b.dtype)], dim=1)
                r = a.shape[0]
                key = m[len(PEFT):]
                c["rank_pattern"] = {**(c.get("rank_pattern") or {}), key: r + 1}
                c["alpha_pattern"] = {**(c.get("alpha_pattern") or {}), key: c["lora_alpha"] * (r + 1) / r}
        return edit

    for value, ok in ((0.0, True), (0.5, False)):
        dst = tmp_path / f"pad-{value}"
        _in_process("split", src, dst, "per-expert", base)
        _edit(dst, pad(value))
        found, _ = _verify(src, dst, base)
        assert (not found) == ok, (value, found)
        if not ok:
            assert any("expert 2" in f and "down" in f for f in found), found


def test_split_adapter_verify_flag_on_a_renamed_family(tmp_path):
    """`split_adapter --verify` of nemotron_h (every key under `backbone.` for vLLM) verifies its own output."""
    family = load_families()["nemotron_h"]
    src, dst = tmp_path / "src", tmp_path / "vllm"
    _, base = _synthetic_peft(family, src)
    result = run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), "--base-config", str(base),
                      "--target", "vllm", "--verify")
    out, _ = read_adapter(dst)
    assert all(k.startswith(PEFT + "backbone.") for k in out)
    assert "OK:" in result.stdout, result.stdout + result.stderr
    record = json.loads((dst / ".moe-convert" / "output.json").read_text())
    assert record.get("target") == "vllm"


def test_sglang_output_of_an_rslora_adapter_keeps_every_served_delta(tmp_path):
    src = tmp_path / "src"
    _peft_adapter("qwen3_moe", src, seed=6, use_rslora=True)
    dst = tmp_path / "sglang"
    _in_process("split", src, dst, "sglang", _base(src))
    found, _ = _verify(src, dst, _base(src))
    assert not found, found


def test_expert_leaves_are_matched_by_role_whatever_their_spelling(tmp_path):
    """SGLang's canonical gate_proj/up_proj/down_proj for Mixtral's w1/w3/w2 (a target's `expert_names`): the
    verifier pairs expert leaves by role, and a gate/up swap under those names is caught."""
    src, dst, base = _mixtral_vllm(tmp_path)
    spellings = ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."))

    def canonical(t, c):
        for k in list(t):
            for old, new in spellings:
                if ".experts." in k and old in k:
                    t[k.replace(old, new)] = t.pop(k)

    _edit(dst, canonical)
    found, checked = _verify(src, dst, base)
    assert not found and checked >= 8, found

    def swap(t, c):
        k = next(k for k in sorted(t) if ".experts.3.gate_proj.lora_B" in k)
        other = k.replace(".gate_proj.", ".up_proj.")
        t[k], t[other] = t[other], t[k]

    _edit(dst, swap)
    found, _ = _verify(src, dst, base)
    assert any("expert 3" in f and "gate" in f for f in found) and any("expert 3" in f and "up" in f for f in found), found
