"""Expert-LoRA packings other producers write (issue #25): read exactly to per-expert, or refused where undecidable.

Every expected delta below is the producer's own formula, transcribed from its source (file and version cited
at each): the tool's split output (per-expert B_e @ A_e * scaling) must equal it, and convert.verify's
independent reader must agree (`--verify`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapter_fixtures import base_config, per_expert_deltas, random_lora, scaling, write_adapter
from helpers import run_tool
from model_fixtures import E, H, I

R, ALPHA = 3, 6
LAYER = "base_model.model.model.layers.0.mlp.experts"
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _config(**extra: object) -> dict:
    return {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "use_rslora": False, "rank_pattern": {},
            "alpha_pattern": {}, "target_modules": [], "target_parameters": TARGETS,
            "auto_mapping": {"base_model_class": "Qwen3MoeForCausalLM"}, **extra}


def _split(src: Path, dst: Path, check: bool = True, *extra: str):
    return run_tool("convert.split_adapter", "--src", str(src), "--dst", str(dst), "--target", "per-expert",
                    "--verify", *extra, check=check)


def _expected(delta_gate_up: torch.Tensor, delta_down: torch.Tensor) -> dict:
    """{(0, role, e): Linear-orientation delta} from fused [E, 2I, H] and [E, H, I] deltas (gate/up halves)."""
    s = scaling(_config())
    out = {}
    for e in range(E):
        out[(0, "gate", e)] = delta_gate_up[e, :I] * s
        out[(0, "up", e)] = delta_gate_up[e, I:] * s
        out[(0, "down", e)] = delta_down[e] * s
    return out


def _assert_deltas(dst: Path, want: dict) -> None:
    got = per_expert_deltas(dst, "qwen3_moe")
    assert set(want) <= set(got)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta.float(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- peft < 0.19.1 shapes


def _peft_0190_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """peft 0.19.0 src/peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight, non-transposed 3-D parameter
    (`_did_swap_in_out_features` False): the delta in the parameter's own [E, dim1, dim2] orientation."""
    weight_A = a.reshape(E, -1, a.shape[-1])
    weight_B = b.reshape(b.shape[0], -1, E)
    return torch.einsum("o r e, e r i -> e i o", weight_B, weight_A)


def _legacy_wrappers(seed: int) -> dict[str, torch.Tensor]:
    """peft 0.19.0's shapes for qwen3_moe's gate_up_proj [E, 2I, H] and down_proj [E, H, I]: in_features = dim 1,
    out_features = dim 2 (`_get_in_out_features`), no swap: lora_A [E*r, dim1], lora_B [dim2, E*r]."""
    return {f"{LAYER}.base_layer.lora_A.weight": random_lora((E * R, 2 * I), seed),
            f"{LAYER}.base_layer.lora_B.weight": random_lora((H, E * R), seed + 1),
            f"{LAYER}.lora_A.weight": random_lora((E * R, H), seed + 2),
            f"{LAYER}.lora_B.weight": random_lora((I, E * R), seed + 3)}


def test_peft_0190_shapes_split_exactly(tmp_path):
    t = _legacy_wrappers(10)
    src = write_adapter(tmp_path / "src", t, _config(peft_version="0.19.0"))
    _split(src, tmp_path / "out")
    want = _expected(_peft_0190_delta(t[f"{LAYER}.base_layer.lora_A.weight"], t[f"{LAYER}.base_layer.lora_B.weight"]),
                     _peft_0190_delta(t[f"{LAYER}.lora_A.weight"], t[f"{LAYER}.lora_B.weight"]))
    _assert_deltas(tmp_path / "out", want)
    # and on to peft 0.21's layout: fuse the per-expert output, read it with peft 0.21.2 itself
    run_tool("convert.fuse_adapter", "--src", str(tmp_path / "out"), "--dst", str(tmp_path / "peft"), "--layout", "peft",
             "--target", "peft")
    got = _peft_021_deltas(tmp_path / "peft")
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta.float(), rtol=1e-5, atol=1e-6)


def _peft_021_deltas(path: Path) -> dict:
    """Deltas of a peft-layout adapter read the way peft 0.21.2 does (ParamWrapper.get_delta_weight, swapped
    orientation: einsum("o r e, e r i -> e o i")), as nn.Linear deltas per role."""
    from safetensors.torch import load_file

    t = load_file(str(path / "adapter_model.safetensors"))
    s = scaling(json.loads((path / "adapter_config.json").read_text()))
    out = {}
    for nest, roles in (("base_layer.", ("gate", "up")), ("", ("down",))):
        a, b = t[f"{LAYER}.{nest}lora_A.weight"], t[f"{LAYER}.{nest}lora_B.weight"]
        d = torch.einsum("o r e, e r i -> e o i", b.reshape(b.shape[0], -1, E), a.reshape(E, -1, a.shape[-1])) * s
        for e in range(E):
            for j, role in enumerate(roles):
                n = d.shape[1] // len(roles)
                out[(0, role, e)] = d[e, j * n : (j + 1) * n]
    return out


def test_older_shapes_contradicting_peft_version_are_refused(tmp_path):
    src = write_adapter(tmp_path / "src", _legacy_wrappers(20), _config(peft_version="0.21.2"))
    proc = _split(src, tmp_path / "out", False)
    assert proc.returncode != 0 and "peft 0.21.2 saved it" in proc.stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_orientation_undecidable_when_2i_equals_h_is_refused(tmp_path):
    # gate_up only, 2I == H: [E*r, H] / [H, E*r] is both orientations; without peft_version: refuse, never guess
    t = {f"{LAYER}.lora_A.weight": random_lora((E * R, H), 1), f"{LAYER}.lora_B.weight": random_lora((H, E * R), 2)}
    cfg = _config(target_parameters=["mlp.experts.gate_up_proj"])
    src = write_adapter(tmp_path / "src", t, cfg)
    bc = tmp_path / "config.json"
    bc.write_text(json.dumps(base_config("qwen3_moe", hidden=H, inter=H // 2)))
    proc = _split(src, tmp_path / "out", False, "--base-config", str(bc))
    assert proc.returncode != 0 and "fits both peft >= 0.19.1's shapes" in proc.stderr and "peft_version" in proc.stderr
    # the file saying which peft saved it settles it
    write_adapter(tmp_path / "src2", t, {**cfg, "peft_version": "0.19.0"})
    _split(tmp_path / "src2", tmp_path / "out2", True, "--base-config", str(bc))
    d = _peft_0190_delta(t[f"{LAYER}.lora_A.weight"], t[f"{LAYER}.lora_B.weight"]) * scaling(cfg)
    got = per_expert_deltas(tmp_path / "out2", "qwen3_moe")
    torch.testing.assert_close(got[(0, "gate", 2)], d[2, : H // 2], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Megatron-Bridge packed export


def _mb_pack(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron-Bridge src/megatron/bridge/models/conversion/peft_bridge.py `_pack_target_parameter_adapter_weights`
    (identical at tag v0.6.0 and at main 067f987d, 2026-08-22; not in the 0.3.1 wheel on PyPI): lora_a [E, r, in]
    and lora_b [E, out, r] are the stacked per-expert factors (`stream_adapter_weights_megatron_to_hf`, packed_expert)."""
    packed_lora_a = torch.cat([chunk.transpose(0, 1).contiguous() for chunk in lora_b], dim=0)
    packed_lora_b = torch.cat([chunk.transpose(0, 1).contiguous() for chunk in lora_a], dim=1)
    return packed_lora_a, packed_lora_b


def _mb_adapter(tmp_path: Path, marker: str | None) -> tuple[Path, dict]:
    per = {}
    t = {}
    for nest, (out, inn) in (("base_layer.", (2 * I, H)), ("", (H, I))):
        la, lb = random_lora((E, R, inn), len(nest) + 30), random_lora((E, out, R), len(nest) + 40)
        t[f"{LAYER}.{nest}lora_A.weight"], t[f"{LAYER}.{nest}lora_B.weight"] = _mb_pack(la, lb)
        per[nest] = torch.stack([lb[e] @ la[e] for e in range(E)])  # what the Megatron adapter computes per expert
    # build_adapter_config_dict: no peft_version, auto_mapping None
    cfg = {"peft_type": "LORA", "auto_mapping": None, "base_model_name_or_path": "", "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "lora_alpha": ALPHA,
           "lora_dropout": 0.0, "modules_to_save": None, "r": R, "rank_pattern": {}, "alpha_pattern": {},
           "target_modules": [], "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
           "target_parameters": ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]}
    if marker:
        cfg["lora_B_layout"] = marker
    src = write_adapter(tmp_path / f"mb-{marker}", t, cfg)
    return src, _expected(per["base_layer."], per[""])


def test_megatron_bridge_packed_export(tmp_path):
    bc = tmp_path / "config.json"
    bc.write_text(json.dumps(base_config("qwen3_moe")))
    src, want = _mb_adapter(tmp_path, None)
    proc = _split(src, tmp_path / "refused", False, "--base-config", str(bc))
    assert proc.returncode != 0 and "lora_B column order" in proc.stderr and "grouped_by_expert" in proc.stderr
    src, want = _mb_adapter(tmp_path, "grouped_by_expert")
    _split(src, tmp_path / "out", True, "--base-config", str(bc))
    _assert_deltas(tmp_path / "out", want)
    # read with peft's formula the deltas would be wrong: the marker is what makes them right
    from safetensors.torch import load_file

    t = load_file(str(src / "adapter_model.safetensors"))
    wrong = _peft_0190_delta(t[f"{LAYER}.lora_A.weight"], t[f"{LAYER}.lora_B.weight"])
    assert not torch.allclose(wrong[1] * scaling(_config()), want[(0, "down", 1)])


# ----------------------------------------------------------------------------- Unsloth expert-major lora_B


def _unsloth_adapter(tmp_path: Path, config: dict, seed: int) -> tuple[Path, dict]:
    """peft >= 0.19.1 shapes with lora_B expert-major, as Unsloth's separated forward trained it before
    unsloth-zoo 2026.9.6; expected deltas from unsloth_zoo 2026.10.9 temporary_patches/moe_utils.py
    `_grouped_by_expert_delta_weight` (swapped orientation: einsum("o e r, e r i -> e o i"))."""
    t, want = {}, {}
    for nest, (out, inn) in (("base_layer.", (2 * I, H)), ("", (H, I))):
        a, b = random_lora((E * R, inn), seed), random_lora((out, E * R), seed + 1)
        t[f"{LAYER}.{nest}lora_A.weight"], t[f"{LAYER}.{nest}lora_B.weight"] = a, b
        weight_A = a.reshape(E, -1, a.shape[-1])
        weight_B = b.reshape(b.shape[0], E, -1)
        want[nest] = torch.einsum("o e r, e r i -> e o i", weight_B, weight_A)
        seed += 2
    return write_adapter(tmp_path / f"u{seed}", t, config), _expected(want["base_layer."], want[""])


def test_unsloth_marker_and_unmarked_refusal(tmp_path):
    marked = _config(peft_version="0.21.2", lora_B_layout="grouped_by_expert",
                     auto_mapping={"base_model_class": "Qwen3MoeForCausalLM", "unsloth_fixed": True})
    src, want = _unsloth_adapter(tmp_path, marked, 50)
    _split(src, tmp_path / "out")
    _assert_deltas(tmp_path / "out", want)
    # per-parameter detail (unsloth_fused_expert_lora.parameters) is read too
    detail = {k: v for k, v in marked.items() if k != "lora_B_layout"}
    detail["unsloth_fused_expert_lora"] = {"lora_A_layout": "grouped_by_expert", "parameters": {
        "gate_up_proj": {"lora_B_layout": "grouped_by_expert", "num_experts": E},
        "down_proj": {"lora_B_layout": "grouped_by_expert", "num_experts": E}}}
    src, want = _unsloth_adapter(tmp_path, detail, 60)
    _split(src, tmp_path / "out2")
    _assert_deltas(tmp_path / "out2", want)
    # an Unsloth save without the marker: the order is not in the file: refused, naming the marker to add
    unmarked = {k: v for k, v in marked.items() if k != "lora_B_layout"}
    src, _ = _unsloth_adapter(tmp_path, unmarked, 70)
    proc = _split(src, tmp_path / "refused", False)
    assert proc.returncode != 0 and "unsloth_fixed" in proc.stderr and '"lora_B_layout"' in proc.stderr


def test_a_reader_without_packings_refuses_other_packings(tmp_path):
    """A caller of detect_expert_lora that does not ask for other packings (packings=False, the default) gets a
    refusal naming the converting command; with packings=True the group says which packing it is."""
    from convert.errors import ConversionError
    from convert.formats.adapter_layouts import detect_expert_lora
    from convert.formats.adapter_source import open_adapter

    src = write_adapter(tmp_path / "src", _legacy_wrappers(80), _config(peft_version="0.19.0"))
    s = open_adapter(str(src), None, None)
    with pytest.raises(ConversionError, match="convert.split_adapter .*--target per-expert"):
        detect_expert_lora(s.infos, s.config, s.base_config, s.display())
    groups, _ = detect_expert_lora(s.infos, s.config, s.base_config, s.display(), packings=True)
    assert (groups[0].orientation, groups[0].b_order) == ("out_in", "rank_major")


# ----------------------------------------------------------------------------- Tinker 3-D experts.w1/w2/w3


@pytest.mark.parametrize("shared", ["A", "B"])
def test_tinker_w123_broadcast_either_side(tmp_path, shared):
    """tinker-cookbook 0.6.1 tinker_cookbook/weights/_merge.py `expand_expert_lora_tensors`: lora_A (E_a, r, in),
    lora_B (E_b, out, r), a side with 1 expert is expanded to the other's count; delta_e = B[e] @ A[e]."""
    t, want = {}, {}
    for i, (w, role, out, inn) in enumerate((("w1", "gate", I, H), ("w3", "up", I, H), ("w2", "down", H, I))):
        a = random_lora((1 if shared == "A" else E, R, inn), 90 + i)
        b = random_lora((1 if shared == "B" else E, out, R), 95 + i)
        t[f"{LAYER}.{w}.lora_A.weight"], t[f"{LAYER}.{w}.lora_B.weight"] = a, b
        a_x, b_x = (a.expand(E, -1, -1), b) if a.shape[0] == 1 else (a, b.expand(E, -1, -1))
        for e in range(E):
            want[(0, role, e)] = b_x[e] @ a_x[e] * scaling(_config())
    cfg = _config(target_modules=["w1", "w2", "w3"])
    cfg.pop("target_parameters")
    src = write_adapter(tmp_path / "src", t, cfg)
    _split(src, tmp_path / "out")
    _assert_deltas(tmp_path / "out", want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_outer_expands_exactly_and_collapses_back_byte_for_byte(tmp_path, dtype):
    """Shared-outer expert LoRA (Tinker, Megatron-Bridge, SkyRL; SGLang's --enable-moe-shared-loras layout): per MoE
    layer, w1/w3 (gate/up) lora_A [1, r, in] and w2 (down) lora_B [1, out, r] shared by every expert, w1/w3 lora_B
    [E, out, r] and w2 lora_A [E, r, in] per expert, under Tinker's expert-agnostic names (tinker-cookbook 0.6.1
    weights/_merge.py: `expert_key_remaps` w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj). Expected deltas:
    `expand_expert_lora_tensors` (the [1, ...] side expanded to E), then B[e] @ A[e]. split -> per-expert is exact;
    fuse_adapter --layout shared_w123 writes the source back byte for byte; a collapse whose shared factors differ
    between experts is refused (exit 2, one line)."""
    from adapter_fixtures import read_adapter
    from helpers import raw_bytes

    t, want = {}, {}
    for i, (w, role, out, inn) in enumerate((("w1", "gate", I, H), ("w3", "up", I, H), ("w2", "down", H, I))):
        outer_a = role != "down"  # gate/up share lora_A (their input side), down shares lora_B (its output side)
        a = random_lora((1 if outer_a else E, R, inn), 70 + i).to(dtype)
        b = random_lora((E if outer_a else 1, out, R), 75 + i).to(dtype)
        t[f"{LAYER}.{w}.lora_A.weight"], t[f"{LAYER}.{w}.lora_B.weight"] = a, b
        # tinker-cookbook 0.6.1 expand_expert_lora_tensors
        a_x = a.expand(b.shape[0], -1, -1) if a.shape[0] == 1 else a
        b_x = b.expand(a.shape[0], -1, -1) if b.shape[0] == 1 else b
        for e in range(E):
            want[(0, role, e)] = b_x[e].float() @ a_x[e].float() * scaling(_config())
    cfg = _config(target_modules=["w1", "w2", "w3"])
    cfg.pop("target_parameters")
    src = write_adapter(tmp_path / "src", t, cfg)
    bc = tmp_path / "config.json"
    bc.write_text(json.dumps(base_config("qwen3_moe")))
    _split(src, tmp_path / "per", True, "--base-config", str(bc))
    got = per_expert_deltas(tmp_path / "per", "qwen3_moe")
    for key, delta in want.items():
        assert torch.equal(got[key], delta), key  # the same factors, the same float32 product: bit-exact
    per, _ = read_adapter(tmp_path / "per")
    assert all(v.dtype == dtype for v in per.values())

    run_tool("convert.fuse_adapter", "--src", str(tmp_path / "per"), "--dst", str(tmp_path / "back"),
             "--layout", "shared_w123", "--base-config", str(bc))
    back, _ = read_adapter(tmp_path / "back")
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype and raw_bytes(back[k]) == raw_bytes(v), k

    # one expert's gate lora_A no longer equal to the others': the shared [1, r, in] factor cannot hold it
    name = "base_model.model.model.layers.0.mlp.experts.1.gate_proj.lora_A.weight"
    per[name] = per[name].clone()
    per[name][0, 0] += 1
    _, per_cfg = read_adapter(tmp_path / "per")
    bad = write_adapter(tmp_path / "bad", per, per_cfg)
    proc = run_tool("convert.fuse_adapter", "--src", str(bad), "--dst", str(tmp_path / "no"), "--layout", "shared_w123",
                    "--base-config", str(bc), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not exact" in lines[0] and "experts.1.gate_proj.lora_A" in lines[0], proc.stderr
    assert not (tmp_path / "no" / "adapter_model.safetensors").exists()


def test_inspect_names_the_packing_and_the_fix(tmp_path):
    src, _ = _mb_adapter(tmp_path, "grouped_by_expert")
    bc = tmp_path / "config.json"
    bc.write_text(json.dumps(base_config("qwen3_moe")))
    proc = run_tool("convert.inspect", str(src), "--base-config", str(bc), "--json", check=False)
    report = json.loads(proc.stdout)
    text = json.dumps(report)
    assert "peft < 0.19.1 shapes" in text and "expert-major lora_B" in text
    assert "convert.split_adapter --src" in text and "--target per-expert" in text
    # without the marker, inspect refuses with the reason and the marker to add
    src, _ = _mb_adapter(tmp_path, None)
    proc = run_tool("convert.inspect", str(src), "--base-config", str(bc), "--json", check=False)
    assert "lora_B column order" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- one module per layout and packing


def test_every_layout_and_packing_is_a_module_of_its_own():
    """Detection (convert.formats.adapter_layouts) and planning (convert.plan.adapter_layouts) list the same layouts;
    each packing value of a peft wrapper is a module of convert.formats.lora_producers."""
    from convert.formats.adapter_layouts import LAYOUTS, PATTERNS
    from convert.formats.lora_producers import ORDERS, ORIENTATIONS
    from convert.plan.adapter_layouts import FUSE, FUSED_LAYOUTS, SPLIT

    assert [m.NAME for m in LAYOUTS] == list(PATTERNS) == ["per_expert", "peft_target_parameters", "shared_w123", "grouped"]
    assert all(m.__name__.rsplit(".", 1)[-1] == m.NAME for m in LAYOUTS)
    assert set(SPLIT) == set(PATTERNS) and FUSED_LAYOUTS == ("peft", "grouped", "shared_w123") == tuple(FUSE)
    assert list(ORIENTATIONS) == ["in_out", "out_in"] and list(ORDERS) == ["rank_major", "expert_major"]
    a, b = torch.arange(E * R * 4.0).reshape(E, R, 4), torch.arange(E * 6 * R * 1.0).reshape(6, E * R)
    for order in ORDERS.values():  # B_e of expert 2, as each producer's formula reads it
        want = b.reshape(6, R, E)[:, :, 2] if order.NAME == "rank_major" else b.reshape(6, E, R)[:, 2, :]
        assert torch.equal(order.expert_columns(b, R, E)[2], want)
    la, lb = ORIENTATIONS["out_in"].to_linear(a, b.reshape(6, R, E).permute(2, 0, 1))
    assert torch.equal(lb[1] @ la[1], (b.reshape(6, R, E)[:, :, 1] @ a[1]).T)


def test_fusing_another_packing_writes_a_config_that_names_peft_021s(tmp_path):
    """split -> per-expert -> fuse --layout peft of a Megatron-Bridge export (marker grouped_by_expert, old shapes) and
    of a peft 0.19.0 save: the output's adapter_config.json says rank_major / no peft_version, so every reader
    (this tool included) reads the output as the packing it is."""
    from convert.formats.adapter_layouts import detect_expert_lora
    from convert.formats.adapter_source import open_adapter

    bc = tmp_path / "config.json"
    bc.write_text(json.dumps(base_config("qwen3_moe")))
    src, want = _mb_adapter(tmp_path, "grouped_by_expert")
    legacy = write_adapter(tmp_path / "legacy", _legacy_wrappers(5), _config(peft_version="0.19.0"))
    for i, path in enumerate((src, legacy)):
        _split(path, tmp_path / f"per{i}", True, "--base-config", str(bc))
        run_tool("convert.fuse_adapter", "--src", str(tmp_path / f"per{i}"), "--dst", str(tmp_path / f"peft{i}"),
                 "--layout", "peft", "--base-config", str(bc))
        cfg = json.loads((tmp_path / f"peft{i}" / "adapter_config.json").read_text())
        assert cfg.get("lora_B_layout") in (None, "rank_major") and "peft_version" not in cfg
        s = open_adapter(str(tmp_path / f"peft{i}"), str(bc), None)
        groups, _ = detect_expert_lora(s.infos, s.config, s.base_config, s.display())  # no packings needed
        assert {(g.orientation, g.b_order) for g in groups} == {("in_out", "rank_major")}
    got = _peft_021_deltas(tmp_path / "peft0")
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta.float(), rtol=1e-5, atol=1e-6)
