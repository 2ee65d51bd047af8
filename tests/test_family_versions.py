"""Keeping up with transformers: the releases a family file matches, non-expert splits, a model type redefined.

- `transformers_versions`: each generated family file lists the transformers releases whose conversion table
  gives it; the schema checks the list, the generator keeps it for a file whose content did not change.
- `splits` (transformers' `Split`): a checkpoint tensor the model holds cut into several, e.g. sarvam_moe's
  `attention.query_key_value` held as `self_attn.q_proj/k_proj/v_proj` (GQA: unequal parts, sized from the
  config); checked against a transformers model with q/k/v biases, and refused where the config cannot size it.
- longcat_flash, which transformers 5.23 and 5.25 define differently (5.23's zero experts held gate/up rows):
  a checkpoint as 5.23 saved it converts with the 5.23 table (configs/legacy/transformers-5.23.0) and without
  it is refused in one line naming that table; the other way round, likewise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convert.errors import ConversionError
from convert.families.ops import Concat, Split, op_from_json
from convert.families.registry import registry
from helpers import REPO, load_dir, raw_bytes, run_tool

LEGACY = REPO / "configs" / "legacy" / "transformers-5.23.0"
TOY = {
    "family": "toy_moe", "model_types": ["toy_moe"], "num_experts_keys": ["n_experts"],
    "experts": {"container": "mlp", "roles": {"gate": "w1.weight", "up": "w3.weight", "down": "w2.weight"}},
    "layouts": {"transformers": {"gate_up_proj": {"parts": ["gate", "up"], "ops": [{"op": "concat", "dim": 0}]},
                                 "down_proj": {"parts": ["down"]}}},
    "default_layout": "transformers",
}
QKV = {"source": "query_key_value", "targets": ["q_proj", "k_proj", "v_proj"],
       "ops": [{"op": "split", "dim": 0, "sizes": ["num_attention_heads", "num_key_value_heads", "num_key_value_heads"]}]}


def _refusal(family: dict, tmp_path: Path) -> str:
    d = tmp_path / "families"
    d.mkdir(exist_ok=True)
    (d / "toy_moe.json").write_text(json.dumps(family))
    with pytest.raises(ConversionError) as exc:
        registry([d])
    assert str(d / "toy_moe.json") in str(exc.value)
    return str(exc.value)


# ---------------------------------------------------------------- the split op and the schema


def test_split_op_sizes_from_the_config_shape_rule_and_inverse():
    op = op_from_json(QKV["ops"][0], "x")
    assert isinstance(op, Split) and op.to_json() == QKV["ops"][0]
    bound = op.bind({"num_attention_heads": 4, "text_config": {"num_key_value_heads": 2}}, "config.json")
    x = torch.randn(16, 3)
    parts = bound.apply([x])
    assert [tuple(p.shape) for p in parts] == bound.shapes([(16, 3)]) == [(8, 3), (4, 3), (4, 3)]
    assert torch.equal(parts[1], x[8:12]) and op.inverse(1) == Concat(0)
    (back,) = op.inverse(1).apply(parts)
    assert torch.equal(back, x)
    with pytest.raises(ConversionError, match=r"config.json: has no 'num_key_value_heads'"):
        op.bind({"num_attention_heads": 4}, "config.json")
    with pytest.raises(ConversionError, match=r"size 18 along dim 0 is not a multiple of 8"):
        bound.shapes([(18, 3)])
    with pytest.raises(ConversionError, match="not yet bound"):
        op.shapes([(16, 3)])
    for sizes in (["num_attention_heads"], [0, 1], ["a b", 1], "num_attention_heads"):
        with pytest.raises(ConversionError, match="split 'sizes' must list two or more"):
            op_from_json({"op": "split", "sizes": sizes}, "x")


@pytest.mark.parametrize("edit, expect", [
    (lambda s: s.update(ops=[{"op": "concat", "dim": 0}]), "leave 1 tensors from 1 part(s); expected 3"),
    (lambda s: s.update(targets=["q_proj", "k_proj"]), "leave 3 tensors from 1 part(s); expected 2"),
    (lambda s: s.update(source="layers.*.qkv"), "without '*'"),
    (lambda s: s.update(sources=["x"]), "unknown key 'sources' (did you mean 'source'?)"),
    (lambda s: s["ops"][0].update(sizes=["num_attention_heads", 2, 2], dim=1), "ops must be one split on dim 0"),
])
def test_a_bad_split_is_refused_naming_the_file(tmp_path, edit, expect):
    split = json.loads(json.dumps(QKV))
    edit(split)
    assert expect in _refusal({**TOY, "splits": [split]}, tmp_path)


@pytest.mark.parametrize("keys, expect", [
    ({"generated_from": "transformers 5.25.0"}, "'generated_from' without 'transformers_versions'"),
    ({"transformers_versions": ["5.25.0", "5.23.0"]}, "distinct releases, oldest first"),
    ({"transformers_versions": ["5.23.0", "5.23.0"]}, "distinct releases, oldest first"),
    ({"transformers_versions": []}, "distinct releases, oldest first"),
    ({"transformers_versions": ["5.25"]}, "'5.25' is not a release like"),
    ({"transformers_versions": "5.25.0"}, "transformers_versions: expected a list of string"),
    ({"generated_from": "transformers 5.25.0", "transformers_versions": ["5.23.0"]}, "is not among transformers_versions"),
])
def test_transformers_versions_are_checked(tmp_path, keys, expect):
    assert expect in _refusal({**TOY, **keys}, tmp_path)


def test_transformers_versions_and_splits_are_read(tmp_path):
    d = tmp_path / "families"
    d.mkdir()
    obj = {**TOY, "generated_from": "transformers 5.25.0", "transformers_versions": ["5.9.1", "5.23.0", "5.25.0"],
           "splits": [QKV]}
    (d / "toy_moe.json").write_text(json.dumps(obj))
    fam = registry([d]).families["toy_moe"]
    assert fam.transformers_versions == ("5.9.1", "5.23.0", "5.25.0")
    (split,) = fam.merges
    assert split.target == "query_key_value" and split.sources == ("q_proj", "k_proj", "v_proj")
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 1}
    assert split.part_sizes(24, 3, cfg, "config.json") == [16, 4, 4]
    names = ["model.layers.0.self_attn.query_key_value.weight", "model.layers.0.self_attn.query_key_value.bias"]
    cuts = split.cuts(names, True, fam.to_model, fam.to_disk, cfg, "config.json")
    assert [(c.whole, c.parts, c.read_whole) for c in cuts][0] == (
        names[1], tuple(names[1].replace("query_key_value", p) for p in ("q_proj", "k_proj", "v_proj")), True)
    back = split.cuts([p for c in cuts for p in c.parts], False, fam.to_model, fam.to_disk, cfg, "config.json")
    assert sorted((c.whole, c.read_whole) for c in back) == sorted((n, False) for n in names)


def test_the_generator_keeps_the_releases_of_a_file_whose_content_is_unchanged(tmp_path):
    from convert.families.generate import _carry_versions, render

    def made(version: str, **extra: object) -> dict:
        return {**TOY, "description": f"made by {version}", "generated_from": f"transformers {version}",
                "transformers_versions": [version], **extra}

    old = {"same": made("5.23.0", transformers_versions=["5.9.0", "5.23.0"]), "changed": made("5.23.0"),
           "unlisted": {k: v for k, v in made("5.23.0").items() if k != "transformers_versions"}}
    for name, obj in old.items():
        (tmp_path / f"{name}.json").write_text(render({**obj, "family": name}))
    files = {"same": made("5.25.0"), "changed": made("5.25.0", dense_layer_keys=["x"]), "unlisted": made("5.25.0"),
             "new": made("5.25.0")}
    files = {name: {**obj, "family": name} for name, obj in files.items()}
    _carry_versions(files, tmp_path, "5.25.0")
    assert files["same"]["transformers_versions"] == ["5.9.0", "5.23.0", "5.25.0"]
    assert files["unlisted"]["transformers_versions"] == ["5.23.0", "5.25.0"]
    assert files["changed"]["transformers_versions"] == files["new"]["transformers_versions"] == ["5.25.0"]


def test_every_generated_file_lists_the_release_that_generated_it():
    from convert.families.registry import BUILTIN_DIR

    for path in [*BUILTIN_DIR.glob("*.json"), *LEGACY.glob("*.json")]:
        obj = json.loads(path.read_text())
        if "generated_from" in obj:
            assert obj["generated_from"].removeprefix("transformers ") in obj["transformers_versions"], path


# ---------------------------------------------------------------- a fused q/k/v, against transformers


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if got[k].dtype != want[k].dtype or raw_bytes(got[k]) != raw_bytes(want[k])]
    assert not bad, bad[:3]


@pytest.fixture(scope="module")
def sarvam(tmp_path_factory: pytest.TempPathFactory):
    """(per-expert checkpoint saved by transformers, the model's state_dict, its logits): a tiny sarvam_moe with
    q/k/v biases (GQA: 4 query heads, 2 key/value heads), so the fused query_key_value weight and bias are cut."""
    from transformers import AutoModelForCausalLM

    import tiny_models

    root = tmp_path_factory.mktemp("sarvam")
    config = tiny_models.tiny_config("sarvam_moe")
    config.attention_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert config.num_attention_heads != config.num_key_value_heads
    model.save_pretrained(root / "src", max_shard_size="64KB")
    tied = tiny_models.tied_keys(model)
    truth = {k: v for k, v in model.state_dict().items() if k not in tied}
    return root / "src", truth, tiny_models.logits(model)


def test_a_fused_qkv_with_biases_is_cut_as_transformers_loads_it_and_joined_back(sarvam, tmp_path):
    from transformers import AutoModelForCausalLM

    import tiny_models

    src, truth, logits = sarvam
    original = _tensors(src)
    qkv = sorted(k for k in original if ".attention.query_key_value." in k)
    assert {k.rsplit(".", 1)[1] for k in qkv} == {"weight", "bias"} and not any(".q_proj." in k for k in original)
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"), "--verify", "--nproc", "2")
    _same(load_dir(tmp_path / "fused"), truth)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", attn_implementation="eager").eval()
    for p in loaded.parameters():
        p.data = p.data.clone()
    assert torch.equal(tiny_models.logits(loaded), logits)
    run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst", str(tmp_path / "split"), "--verify")
    _same(_tensors(tmp_path / "split"), original)


def test_a_split_the_config_cannot_size_is_refused(sarvam, tmp_path):
    src, _, _ = sarvam
    no_kv = tmp_path / "no_kv"
    shutil.copytree(src, no_kv)
    config = json.loads((no_kv / "config.json").read_text())
    kv = config.pop("num_key_value_heads")
    (no_kv / "config.json").write_text(json.dumps(config))
    proc = run_tool("convert.fuse_experts", "--src", str(no_kv), "--dst", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "config.json: has no 'num_key_value_heads'" in proc.stderr and not (tmp_path / "out").exists()

    # a fused checkpoint whose config gives other shares than its q/k/v rows: refused on split, naming them
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"))
    config["num_key_value_heads"] = kv * 2
    (tmp_path / "fused" / "config.json").write_text(json.dumps(config))
    proc = run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "self_attn.q_proj." in proc.stderr and "cannot join into" in proc.stderr
    assert "attention.query_key_value." in proc.stderr and "not the parts' shares" in proc.stderr


# ---------------------------------------------------------------- longcat_flash: 5.23 and 5.25 tables


@pytest.fixture(scope="module")
def longcat(tmp_path_factory: pytest.TempPathFactory):
    """Per-expert checkpoints of one tiny longcat saved by transformers: as the installed release holds it, and
    as 5.23 held it (gate/up for E + zero_expert_num experts); each with the state_dict of its model."""
    import tiny_models

    root = tmp_path_factory.mktemp("longcat")
    out = {}
    for kind, extra in (("installed", False), ("5.23", True)):
        model = tiny_models.build("longcat_flash")
        if extra:
            tiny_models.with_extra_expert_rows(model)
        model.save_pretrained(root / kind, max_shard_size="64KB")
        tied = tiny_models.tied_keys(model)
        out[kind] = (root / kind, {k: v for k, v in model.state_dict().items() if k not in tied}, model.config)
    if any(".experts.5.gate_proj." in k for k in _tensors(out["installed"][0])):
        pytest.skip("the installed transformers holds longcat's gate/up for E + zero_expert_num experts (5.23)")
    return out


def _one_line_refusal(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_longcat_as_5_23_saved_it_converts_with_that_table_and_is_refused_without(longcat, tmp_path, monkeypatch):
    src, truth, cfg = longcat["5.23"]
    E, total = cfg.n_routed_experts, cfg.n_routed_experts + cfg.zero_expert_num
    assert any(f".experts.{total - 1}.up_proj." in k for k in _tensors(src))
    err = _one_line_refusal(run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "x"), check=False))
    for part in (f"experts.{E}.gate_proj.weight' is expert {E}, but config.json says there are {E} experts",
                 f"its experts per role (gate {total}, up {total}, down {E}) are what family longcat_flash of "
                 "configs/legacy/transformers-5.23.0/longcat_flash.json (transformers 5.23.0) holds, not qwen3_moe of "
                 "configs/families/qwen3_moe.json", "add configs/legacy/transformers-5.23.0 to MOE_CONVERT_CONFIGS"):
        assert part in err, err
    assert not (tmp_path / "x").exists()

    monkeypatch.setenv("MOE_CONVERT_CONFIGS", str(LEGACY))
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"), "--verify", "--nproc", "2")
    fused = load_dir(tmp_path / "fused")
    _same(fused, truth)
    assert fused["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == total
    run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst", str(tmp_path / "split"), "--verify")
    _same(_tensors(tmp_path / "split"), _tensors(src))

    monkeypatch.delenv("MOE_CONVERT_CONFIGS")  # a fused 5.23 checkpoint, without the 5.23 table: refused too
    err = _one_line_refusal(run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst",
                                     str(tmp_path / "y"), check=False))
    assert f"has shape [{total}, " in err and "add configs/legacy/transformers-5.23.0 to MOE_CONVERT_CONFIGS" in err, err


def test_longcat_as_the_installed_release_saves_it_is_refused_by_the_5_23_table(longcat, tmp_path, monkeypatch):
    src, truth, cfg = longcat["installed"]
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"), "--verify")
    _same(load_dir(tmp_path / "fused"), truth)
    monkeypatch.setenv("MOE_CONVERT_CONFIGS", str(LEGACY))
    err = _one_line_refusal(run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "x"), check=False))
    for part in (f"missing expert {cfg.n_routed_experts} of model.layers.", f"(expected {cfg.n_routed_experts + cfg.zero_expert_num} "
                 "experts for role gate (E + zero_expert_num))", "are what family qwen3_moe of configs/families/qwen3_moe.json",
                 "leave configs/legacy/transformers-5.23.0 out of MOE_CONVERT_CONFIGS"):
        assert part in err, err
