"""Family tables v2 (configs/families/*.json): schema, extends, ops, renames, generator, detection.

Also the checkpoints the tables make convertible: a family added as a data file, shard-name
styles of real releases, experts fused on disk (Llama 4) and a checkpoint mixing fused layers
with per-expert MTP layers (Qwen3.5-MoE).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from convert.errors import ConversionError
from convert.example import example_tensors
from convert.families import detect_family, find_family, load_families
from convert.families.ops import Chunk, Concat, Deinterleave, Interleave, Op, Transpose
from convert.families.registry import BUILTIN_DIR, registry
from helpers import REPO, load_dir, raw_bytes, run_tool
from model_fixtures import E, H, I, logits

FAMILIES = load_families()


def _family_dir(tmp_path: Path, *files: dict) -> Path:
    d = tmp_path / "families"
    d.mkdir(parents=True, exist_ok=True)
    for obj in files:
        (d / f"{obj['family']}.json").write_text(json.dumps(obj, indent=2))
    return d


TOY = {  # the README's worked example "Adding a family"
    "family": "toy_moe",
    "description": "a toy MoE: experts under block.moe; w_in (gate), w_lin (up), w_out (down); block is moe_block on disk",
    "model_types": ["toy_moe"],
    "architectures": ["ToyMoeForCausalLM"],
    "num_experts_keys": ["n_experts"],
    "experts": {"container": "moe", "roles": {"gate": "w_in.weight", "up": "w_lin.weight", "down": "w_out.weight"}},
    "layouts": {
        "transformers": {
            "gate_up_proj": {"parts": ["gate", "up"], "ops": [{"op": "concat", "dim": 0}]},
            "down_proj": {"parts": ["down"]},
        },
    },
    "default_layout": "transformers",
    "renames": [{"from": r"\.moe_block\.", "to": ".block."}],
}


def test_the_readme_example_is_the_tested_family():
    text = (REPO / "README.md").read_text()
    block = text.split("### Adding a family", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(block) == TOY


# ---------------------------------------------------------------- schema and extends


@pytest.mark.parametrize("edit, expect", [
    (lambda f: f.update(model_type=f.pop("model_types")), ["unknown key 'model_type'", "did you mean 'model_types'"]),
    (lambda f: f["layouts"]["transformers"]["gate_up_proj"]["ops"][0].update(dimm=1), ["unknown key 'dimm'", "'dim'"]),
    (lambda f: f["experts"].update(roels={}), ["experts: unknown key 'roels'", "'roles'"]),
    (lambda f: f["layouts"]["transformers"]["down_proj"].update(parts="down"), ["down_proj.parts", "list of string"]),
    (lambda f: f.update(default_layout="stacked"), ["default_layout 'stacked' is not one of its layouts"]),
    (lambda f: f["layouts"]["transformers"]["down_proj"].update(parts=["gate"]), ["each of ['down', 'gate', 'up'] exactly once"]),
    (lambda f: f["layouts"]["transformers"]["gate_up_proj"].update(ops=[]), ["leave 2 tensors"]),
    (lambda f: f["layouts"]["transformers"]["gate_up_proj"].update(ops=[{"op": "concat", "dims": [0, 1]}]),
     ["op 'concat' takes no key 'dims'"]),
    (lambda f: f.update(family="other"), ["'family' is 'other'; it must be the file name ('toy_moe')"]),
    (lambda f: f.update(model_types=["mixtral"]), ["model type 'mixtral' is also claimed"]),
    (lambda f: f.update(extra_experts={"gatee": "n_zero"}), ["extra_experts 'gatee'", "must map a role"]),
    (lambda f: f.update(extra_experts={"gate": "n_zero"}),
     ["layouts.transformers.gate_up_proj: parts ['gate', 'up'] are held for different numbers of experts"]),
    (lambda f: f.update(extra_experts="n_zero"), ["extra_experts: expected an object of string"]),
])
def test_a_bad_family_file_is_refused_naming_the_file_and_key(tmp_path, edit, expect):
    obj = json.loads(json.dumps(TOY))
    edit(obj)
    d = tmp_path / "families"
    d.mkdir()
    (d / "toy_moe.json").write_text(json.dumps(obj))
    if "also claimed" in expect[0]:
        shutil.copy(BUILTIN_DIR / "mixtral.json", d / "mixtral.json")
    with pytest.raises(ConversionError) as exc:
        registry([d])
    text = str(exc.value)
    assert str(d / "toy_moe.json") in text, text
    for part in expect:
        assert part in text, text


def test_extends_inherits_all_but_identity_and_appends_renames(tmp_path):
    child = {"family": "mixtral_like", "extends": "mixtral", "model_types": ["mixtral_like"],
             "num_experts_keys": ["n_experts"], "extra_renames": [{"from": r"\.norm_f\.", "to": ".norm."}]}
    d = _family_dir(tmp_path, child)
    fams = registry([BUILTIN_DIR, d]).families
    fam, parent = fams["mixtral_like"], fams["mixtral"]
    assert fam.model_types == ("mixtral_like",) and fam.architectures == ()
    assert fam.num_experts_keys == ("n_experts",)
    assert fam.per_expert == parent.per_expert and fam.fused == parent.fused
    assert [r.source for r in fam.renames] == [r.source for r in parent.renames] + [r"\.norm_f\."]
    assert fam.to_model("model.layers.0.block_sparse_moe.norm_f.weight") == "model.layers.0.mlp.norm.weight"
    assert fam.to_disk("model.layers.0.mlp.norm.weight") == "model.layers.0.block_sparse_moe.norm_f.weight"


def test_extends_cycle_and_unknown_parent(tmp_path):
    d = _family_dir(tmp_path, {"family": "a", "extends": "b"}, {"family": "b", "extends": "a"})
    with pytest.raises(ConversionError, match="'extends' makes a cycle"):
        registry([d])
    d2 = _family_dir(tmp_path / "x", {"family": "c", "extends": "nope"})
    with pytest.raises(ConversionError, match=r"c\.json: extends unknown family 'nope'"):
        registry([d2])


# ---------------------------------------------------------------- ops


@st.composite
def joined(draw):
    """(op joining n tensors, the n tensors)."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    n = draw(st.integers(1, 4))
    dim = draw(st.integers(-ndim, ndim - 1))
    op = draw(st.sampled_from([Concat(dim), Interleave(dim)]))
    return op, [torch.randn(shape) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(case=joined())
def test_join_ops_inverse_and_shape_rule(case):
    op, parts = case
    out = op.apply(parts)
    assert [tuple(t.shape) for t in out] == op.shapes([tuple(p.shape) for p in parts])
    back = op.inverse(len(parts)).apply(out)
    assert op.inverse(len(parts)).shapes([tuple(out[0].shape)]) == [tuple(p.shape) for p in parts]
    assert len(back) == len(parts) and all(torch.equal(a, b) for a, b in zip(back, parts))


@settings(max_examples=60, deadline=None)
@given(ndim=st.integers(1, 3), n=st.integers(1, 4), data=st.data())
def test_cut_and_transpose_ops_inverse_and_shape_rule(ndim, n, data):
    shape = list(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    dim = data.draw(st.integers(-ndim, ndim - 1))
    shape[dim] *= n
    x = torch.randn(shape)
    ops: list[Op] = [Chunk(dim, n), Deinterleave(dim, n)]
    if ndim >= 2:
        ops.append(Transpose(tuple(data.draw(st.permutations(range(ndim)))[:2])))  # type: ignore[arg-type]
    for op in ops:
        out = op.apply([x])
        assert [tuple(t.shape) for t in out] == op.shapes([tuple(x.shape)])
        (back,) = op.inverse(1).apply(out)
        assert torch.equal(back, x)


def test_interleave_places_part_j_at_positions_j_mod_k():
    a, b = torch.tensor([[1, 2]]), torch.tensor([[10, 20]])
    (x,) = Interleave(-1).apply([a, b])
    assert x.tolist() == [[1, 10, 2, 20]]
    (y,) = Concat(-1).apply([a, b])
    assert y.tolist() == [[1, 2, 10, 20]]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_pipeline_round_trips_and_byte_copy_means_bytes(name):
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(1)
    for layout, tensors in fam.fused.items():
        for t in tensors:
            shape = (3,) if all(p.endswith("_bias") for p in t.parts) else (3, 5)
            parts = [torch.randn(shape, generator=g) for _ in t.parts]
            fused = t.pipeline.fuse(parts)
            assert tuple(fused.shape) == t.pipeline.slice_shape(shape)
            assert t.pipeline.part_shapes(tuple(fused.shape)) == [shape] * len(parts)
            assert all(torch.equal(a, b) for a, b in zip(t.pipeline.split(fused), parts)), (name, layout, t.template)
            if t.is_byte_copy:
                assert raw_bytes(fused) == b"".join(raw_bytes(p) for p in parts)


# ---------------------------------------------------------------- renames, generator, detection


def _keys_for(pattern: str) -> list[str]:
    lit = pattern.lstrip("^").replace("\\.", ".").replace("(\\d+)", "7").replace("(.+)", "x.y").replace(".*", "a")
    lit = lit.replace("(experts|gate|shared_experts)", "gate").replace("\\1", "gate").replace("\\", "")
    return [lit + "weight", f"model.layers.3.{lit.lstrip('.')}weight", f"model.layers.3{lit}weight", f"{lit}.bias"]


def test_renames_rename_exactly_as_transformers_loads_and_saves():
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    checked = 0
    for fam in FAMILIES.values():
        if not fam.renames:
            continue
        forward = [WeightRenaming(r.source, r.target) for r in fam.renames]
        backward = [WeightRenaming(r.source, r.target).reverse_transform() for r in reversed(fam.renames) if not r.one_way]
        keys = [k for r in fam.renames for p in (r.source, r.target) for k in _keys_for(p)]
        keys += [t.format(prefix="model.layers.2", e=4) for t in [*fam.per_expert.values(), *fam.expert_templates.values()]]
        for key in keys:
            assert fam.to_model(key) == apply_renamings(key, forward), (fam.name, key)
            assert fam.to_disk(key) == apply_renamings(key, backward), (fam.name, key)
            checked += 1
    assert checked > 500


def test_generated_family_files_match_the_installed_transformers(capsys):
    import transformers
    from transformers.conversion_mapping import _build_checkpoint_conversion_mapping
    from transformers.core_model_loading import MergeModulelist, WeightConverter
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from convert.families.generate import content, generate, render

    committed = {p.stem: p for p in BUILTIN_DIR.glob("*.json") if "generated_from" in json.loads(p.read_text())}
    versions = {json.loads(p.read_text())["generated_from"] for p in committed.values()}
    files, skipped = generate()
    installed = f"transformers {transformers.__version__}"
    if versions == {installed}:  # the release that generated them: the files are exactly a fresh generation
        assert set(files) == set(committed)
        for name, obj in files.items():
            assert render(obj) == committed[name].read_text(), f"{committed[name]} differs from a fresh generation"
    else:  # another release (e.g. the newest, .ci/newest-transformers): its table must give the same content
        fresh = {name: content(obj) for name, obj in files.items()}
        kept = {name: content(json.loads(path.read_text())) for name, path in committed.items()}
        differ = sorted(n for n in set(fresh) | set(kept) if fresh.get(n) != kept.get(n))
        assert not differ, (f"{installed}'s conversion table gives other family files than the committed ones "
                            f"(generated from {sorted(versions)}): {differ}; run `python -m convert.families.generate` "
                            "and review the diff")
        listed = [n for n, path in committed.items()
                  if transformers.__version__ not in json.loads(path.read_text())["transformers_versions"]]
        with capsys.disabled():
            print(f"\n{installed} gives the committed family tables (generated from {sorted(versions)}); "
                  f"`python -m convert.families.generate` would add it to transformers_versions of {len(listed)} files")

    # Coverage: every model type transformers merges per-expert tensors for and has a causal-LM class.
    table = _build_checkpoint_conversion_mapping()
    merged = sorted(k for k, ts in table.items() if k in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and any(
        isinstance(t, WeightConverter) and any(type(o) is MergeModulelist for o in t.operations) for t in ts))
    covered = {t for f in FAMILIES.values() for t in f.model_types}
    reasons = dict(skipped)
    missing = [t for t in merged if t not in covered]
    assert all(t in reasons for t in missing), [t for t in missing if t not in reasons]
    with capsys.disabled():
        print(f"\nfamily tables cover {len(merged) - len(missing)} of {len(merged)} causal-LM model types whose experts "
              f"transformers merges; skipped: {[(t, reasons[t]) for t in missing]}")


@pytest.mark.parametrize("config, family, how", [
    ({"model_type": "deepseek_v3"}, "qwen3_moe", "model_type 'deepseek_v3'"),
    ({"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}, "qwen3_moe", "architectures"),
    ({"model_type": "some_vlm", "text_config": {"model_type": "llama4_text"}}, "llama4", "text_config.model_type"),
    ({"model_type": "qwen3_5_moe", "text_config": {"model_type": "qwen3_5_moe_text"}}, "qwen3_5_moe", "model_type"),
    ({"peft_type": "LORA", "auto_mapping": {"base_model_class": "PhimoeForCausalLM"}}, "phimoe", "base_model_class"),
    ({"peft_type": "LORA", "auto_mapping": {"parent_library": "transformers.models.ernie4_5_moe.modeling_ernie4_5_moe"}},
     "ernie4_5_moe", "parent_library"),
])
def test_one_detection_from_config_or_adapter_config(config, family, how):
    fam, found_how = find_family(config)
    assert fam is not None and fam.name == family and how in found_how
    assert detect_family(config, "config.json").name == family


def test_detection_override_and_unknown():
    assert detect_family({"model_type": "llama"}, "x", override="mixtral").name == "mixtral"
    assert detect_family({}, "x", override="deepseek_v3").name == "qwen3_moe"  # a model type names its family
    with pytest.raises(ConversionError, match=r"x/config.json: model_type 'llama' is not a known MoE family.*--family"):
        detect_family({"model_type": "llama"}, "x/config.json")
    with pytest.raises(ConversionError, match="unknown family 'nope'"):
        detect_family({}, "x", override="nope")


def test_conversion_never_imports_transformers(tmp_path):
    """fuse, split, verify and inspect run with `transformers` (and peft) unimportable."""
    run_tool("convert.example", str(tmp_path / "src"), "--layers", "2", "--experts", "3", "--hidden", "16",
             "--intermediate", "8")
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import runpy, sys\n"
        "sys.modules['transformers'] = None  # any import of it raises ImportError\n"
        "sys.modules['peft'] = None\n"
        "mod, sys.argv = sys.argv[1], sys.argv[1:]\n"
        "runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    import subprocess

    for args in (["convert.fuse_experts", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "f"), "--no-progress"],
                 ["convert.split_experts", "--src", str(tmp_path / "f"), "--dst", str(tmp_path / "s"), "--no-progress"],
                 ["convert.verify", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "f")],
                 ["convert.inspect", str(tmp_path / "f"), "--json"]):
        proc = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=300)
        assert proc.returncode == 0, (args[0], proc.stderr[-2000:])


# ---------------------------------------------------------------- a family as a data file


def _toy_checkpoint(path: Path, layers: int = 2, experts: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(11, H, generator=g)}
    for layer in range(layers):
        p = f"model.layers.{layer}.moe_block"
        t[f"{p}.router.weight"] = torch.randn(experts, H, generator=g)
        for e in range(experts):
            t[f"{p}.moe.experts.{e}.w_in.weight"] = torch.randn(I, H, generator=g)
            t[f"{p}.moe.experts.{e}.w_lin.weight"] = torch.randn(I, H, generator=g)
            t[f"{p}.moe.experts.{e}.w_out.weight"] = torch.randn(H, I, generator=g)
    path.mkdir(parents=True)
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy_moe", "n_experts": experts}))
    return t


def test_a_family_added_as_a_data_file_converts(tmp_path, monkeypatch):
    fam_dir = _family_dir(tmp_path, TOY)
    src = tmp_path / "src"
    tensors = _toy_checkpoint(src)
    monkeypatch.setenv("MOE_CONVERT_CONFIGS", str(fam_dir))
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"), "--verify", "--nproc", "2")
    out = load_dir(tmp_path / "fused")
    for layer in range(2):
        p = f"model.layers.{layer}.block"  # renamed as the family says
        gate_up = out[f"{p}.moe.experts.gate_up_proj"]
        assert gate_up.shape == (3, 2 * I, H)
        for e in range(3):
            q = f"model.layers.{layer}.moe_block.moe.experts.{e}"
            assert torch.equal(gate_up[e], torch.cat([tensors[f"{q}.w_in.weight"], tensors[f"{q}.w_lin.weight"]]))
            assert torch.equal(out[f"{p}.moe.experts.down_proj"][e], tensors[f"{q}.w_out.weight"])
        assert f"{p}.router.weight" in out
    run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst", str(tmp_path / "back"), "--verify")
    back = load_dir(tmp_path / "back")
    assert set(back) == set(tensors) and all(raw_bytes(back[k]) == raw_bytes(tensors[k]) for k in tensors)
    monkeypatch.delenv("MOE_CONVERT_CONFIGS")
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "none"), check=False)
    assert proc.returncode != 0 and "model_type 'toy_moe' is not a known MoE family" in proc.stderr


# A family whose gate and up are held by E + n_zero experts (router slots of identity experts) and down by E.
TOY_EXTRA = {**TOY, "family": "toy_extra", "model_types": ["toy_extra"], "architectures": [],
             "extra_experts": {"gate": "n_zero", "up": "n_zero"}}


def _toy_extra_checkpoint(path: Path, experts: int = 3, zero: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(11, H, generator=g)}
    for layer in range(2):
        p = f"model.layers.{layer}.moe_block.moe.experts"
        for e in range(experts + zero):
            t[f"{p}.{e}.w_in.weight"] = torch.randn(I, H, generator=g)
            t[f"{p}.{e}.w_lin.weight"] = torch.randn(I, H, generator=g)
            if e < experts:
                t[f"{p}.{e}.w_out.weight"] = torch.randn(H, I, generator=g)
    path.mkdir(parents=True)
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy_extra", "n_experts": experts, "n_zero": zero}))
    return t


def test_roles_held_by_more_experts_than_e_fuse_split_and_verify(tmp_path, monkeypatch):
    """`extra_experts`: gate/up of E + n_zero experts, down of E; each fused tensor has its own dim 0."""
    from convert.formats.checkpoint import open_checkpoint
    from convert.io.storage import Storage
    from convert.plan.base import plan_conversion
    from convert.verify.base import base_relation
    from convert.verify.tables import read_table

    fam_dir = _family_dir(tmp_path, TOY_EXTRA)
    fam = registry([BUILTIN_DIR, fam_dir]).families["toy_extra"]
    monkeypatch.setenv("MOE_CONVERT_CONFIGS", str(fam_dir))
    src, fused, back = tmp_path / "src", tmp_path / "fused", tmp_path / "back"
    tensors = _toy_extra_checkpoint(src)
    plan = plan_conversion(open_checkpoint(Storage(str(src))), fam, "transformers")
    assert plan.num_experts == 5 and {p.expert for p in plan.pieces} == {None, 0, 1, 2, 3, 4}  # EP covers them all
    assert "experts per role: E=3; gate 5 (E + n_zero), up 5 (E + n_zero)" in plan.notes
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fused), "--verify", "--ep", "2")
    out = load_dir(fused)
    for layer in range(2):
        p, q = f"model.layers.{layer}.block.moe.experts", f"model.layers.{layer}.moe_block.moe.experts"
        assert out[f"{p}.gate_up_proj"].shape == (5, 2 * I, H) and out[f"{p}.down_proj"].shape == (3, H, I)
        for e in range(5):
            assert torch.equal(out[f"{p}.gate_up_proj"][e], torch.cat([tensors[f"{q}.{e}.w_in.weight"],
                                                                      tensors[f"{q}.{e}.w_lin.weight"]]))
        for e in range(3):
            assert torch.equal(out[f"{p}.down_proj"][e], tensors[f"{q}.{e}.w_out.weight"])
    run_tool("convert.split_experts", "--src", str(fused), "--dst", str(back), "--verify")
    got = load_dir(back)
    assert set(got) == set(tensors) and all(raw_bytes(got[k]) == raw_bytes(tensors[k]) for k in tensors)

    # verify: a fused side holding gate/up for E experts only is not a conversion of the source
    config = json.loads((src / "config.json").read_text())
    src_table, _ = read_table(Storage(str(src)), "model.safetensors.index.json", require_index=False)
    dst_table, _ = read_table(Storage(str(fused)), "model.safetensors.index.json", require_index=True)
    name = "model.layers.0.block.moe.experts.gate_up_proj"
    experts, _, bad_src, found = base_relation(src_table, dst_table, fam, 3, config)
    assert not bad_src and not found and [c.num_experts for c in experts] == [5, 5]
    dst_table.tensors[name] = dataclasses.replace(dst_table.tensors[name], shape=(3, 2 * I, H))
    _, _, _, found = base_relation(src_table, dst_table, fam, 3, config)
    assert any(f"{name}' has shape [3, {2 * I}, {H}]; expected [E=5" in f for f in found), found

    # a per-expert checkpoint without an extra expert's gate is refused, naming the tensor and the count's key
    (src / "model.safetensors").unlink()
    save_file({k: v for k, v in tensors.items() if ".experts.4.w_in" not in k}, src / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"experts\.4\.w_in\.weight' not found \(expected 5 experts for role gate "
                                              r"\(E \+ n_zero\)\)"):
        plan_conversion(open_checkpoint(Storage(str(src))), fam, "transformers")


@pytest.mark.parametrize("family, parts, whole, config", [
    ("kimi_linear", [f"model.layers.0.self_attn.{x}_conv1d.weight" for x in "qkv"],
     "model.layers.0.self_attn.conv1d.weight", {"model_type": "kimi_linear", "num_experts": E}),
    ("qwen4_exp_text", [f"model.ngram_embedding.shard_{i}.weight" for i in range(4)], "model.ngram_embedding.weight",
     {"model_type": "qwen4_exp_text", "num_experts": E, "split_ngram_parts": 4}),
])
def test_merged_non_expert_tensors_join_and_cut(tmp_path, family, parts, whole, config):
    fam = FAMILIES[family]
    g = torch.Generator().manual_seed(5)
    tensors = {fam.to_disk(t.format(prefix="model.layers.0", e=e)): torch.randn(*((I, H) if "down" not in t else (H, I)),
                                                                               generator=g)
               for e in range(E) for t in fam.expert_templates.values()}
    tensors.update({p: torch.randn(6, 1, 3, generator=g) for p in parts})
    shard = {k: f"model-{1 + j % 2}-of-2.safetensors" for j, k in enumerate(sorted(tensors))}
    _write_sharded(tmp_path / "src", tensors, shard, config)
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "f"), "--verify")
    fused = load_dir(tmp_path / "f")
    assert torch.equal(fused[whole], torch.cat([tensors[p] for p in parts])) and not set(parts) & set(fused)
    run_tool("convert.split_experts", "--src", str(tmp_path / "f"), "--dst", str(tmp_path / "s"), "--verify")
    back = load_dir(tmp_path / "s")
    assert set(back) == set(tensors) and all(raw_bytes(back[k]) == raw_bytes(tensors[k]) for k in tensors)


# ---------------------------------------------------------------- checkpoints as released


def _write_sharded(path: Path, tensors: dict[str, torch.Tensor], shard_of: dict[str, str], config: dict) -> None:
    path.mkdir(parents=True)
    for shard in sorted(set(shard_of.values())):
        save_file({k: v.contiguous() for k, v in tensors.items() if shard_of[k] == shard}, path / shard,
                  metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": shard_of}))
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("style", [
    "model-{i}-of-{n}.safetensors",  # Kimi-K2: no padding
    "model-{i0:05d}-of-{n:05d}.safetensors",  # MiniMax-M2: zero-based
    "model.safetensors-{i:05d}-of-{n:05d}.safetensors",  # Qwen3.5
])
def test_shard_name_styles_and_a_companion_in_another_shard(tmp_path, style):
    tensors, cfg = example_tensors("qwen3_moe", 2, E, H, I, dtype=torch.float32)
    names = sorted(tensors)
    n = 3
    shard = {k: style.format(i=1 + j % n, i0=j % n, n=n) for j, k in enumerate(names)}
    # gate and up of one expert (fused into one gate_up_proj slice) in different shards
    shard["model.layers.1.mlp.experts.2.gate_proj.weight"] = style.format(i=1, i0=0, n=n)
    shard["model.layers.1.mlp.experts.2.up_proj.weight"] = style.format(i=n, i0=n - 1, n=n)
    src = tmp_path / "src"
    _write_sharded(src, tensors, shard, cfg)
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "f"), "--max-shard-size", "20KB", "--verify")
    fused = load_dir(tmp_path / "f")
    q = "model.layers.1.mlp.experts.2"
    assert torch.equal(fused["model.layers.1.mlp.experts.gate_up_proj"][2],
                       torch.cat([tensors[f"{q}.gate_proj.weight"], tensors[f"{q}.up_proj.weight"]]))
    run_tool("convert.split_experts", "--src", str(tmp_path / "f"), "--dst", str(tmp_path / "s"), "--verify")
    back = load_dir(tmp_path / "s")
    assert set(back) == set(tensors) and all(raw_bytes(back[k]) == raw_bytes(tensors[k]) for k in tensors)


def test_llama4_experts_fused_on_disk_split_and_fuse_back(tmp_path):
    from transformers import AutoModelForCausalLM, Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=64, hidden_size=H, intermediate_size=I, intermediate_size_mlp=36,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                           num_local_experts=E, num_experts_per_tok=1, interleave_moe_layer_step=2,
                           no_rope_layers=[1, 1], attention_chunk_size=8)
    model = Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():  # the init leaves some expert weights at 0: make them random
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "native", max_shard_size="30KB")
    run_tool("convert.split_experts", "--src", str(tmp_path / "native"), "--dst", str(tmp_path / "pe"), "--verify",
             "--nproc", "2")
    pe, sd = load_dir(tmp_path / "pe"), model.state_dict()
    moe = [k.split(".feed_forward")[0] for k in sd if k.endswith("feed_forward.experts.gate_up_proj")]
    assert moe == ["model.layers.1"]  # layer 0 is dense (interleave_moe_layer_step=2)
    p = "model.layers.1.feed_forward.experts"
    for e in range(E):  # forward: gate_up = x @ gate_up_proj[e]; gate, up = chunk(2, -1)
        assert torch.equal(pe[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.gate_up_proj"][e][:, :I].T)
        assert torch.equal(pe[f"{p}.{e}.up_proj.weight"], sd[f"{p}.gate_up_proj"][e][:, I:].T)
        assert torch.equal(pe[f"{p}.{e}.down_proj.weight"], sd[f"{p}.down_proj"][e].T)
        assert pe[f"{p}.{e}.gate_proj.weight"].shape == (I, H)
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "pe"), "--dst", str(tmp_path / "back"), "--verify",
             "--nproc", "2")
    back, orig = load_dir(tmp_path / "back"), load_dir(tmp_path / "native")
    assert set(back) == set(orig) and all(raw_bytes(back[k]) == raw_bytes(orig[k]) for k in orig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(logits(loaded), logits(model))


def _qwen35_mixed(path: Path) -> dict[str, torch.Tensor]:
    """A Qwen3.5-MoE-style checkpoint: main layers fused ([E, 2I, H] / [E, H, I]), the MTP layer per-expert."""
    g = torch.Generator().manual_seed(3)
    t: dict[str, torch.Tensor] = {"model.language_model.embed_tokens.weight": torch.randn(9, H, generator=g),
                                  "model.visual.blocks.0.attn.qkv.weight": torch.randn(6, 4, generator=g),
                                  "mtp.fc.weight": torch.randn(H, 2 * H, generator=g)}
    for layer in range(2):
        p = f"model.language_model.layers.{layer}.mlp"
        t[f"{p}.gate.weight"] = torch.randn(E, H, generator=g)
        t[f"{p}.experts.gate_up_proj"] = torch.randn(E, 2 * I, H, generator=g).to(torch.bfloat16)
        t[f"{p}.experts.down_proj"] = torch.randn(E, H, I, generator=g).to(torch.bfloat16)
    for e in range(E):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            t[f"mtp.layers.0.mlp.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=g).to(torch.bfloat16)
    names = sorted(t)
    shard = {k: f"model.safetensors-{1 + j % 2:05d}-of-00002.safetensors" for j, k in enumerate(names)}
    _write_sharded(path, t, shard, {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                                    "text_config": {"model_type": "qwen3_5_moe_text", "num_experts": E}})
    return t


def test_mixed_fused_layers_and_per_expert_mtp_split_and_fuse(tmp_path):
    mixed = _qwen35_mixed(tmp_path / "mixed")
    run_tool("convert.split_experts", "--src", str(tmp_path / "mixed"), "--dst", str(tmp_path / "pe"), "--verify",
             "--nproc", "2")
    pe = load_dir(tmp_path / "pe")
    for layer in range(2):
        p = f"model.language_model.layers.{layer}.mlp.experts"
        for e in range(E):
            assert torch.equal(pe[f"{p}.{e}.gate_proj.weight"], mixed[f"{p}.gate_up_proj"][e][:I])
            assert torch.equal(pe[f"{p}.{e}.up_proj.weight"], mixed[f"{p}.gate_up_proj"][e][I:])
            assert torch.equal(pe[f"{p}.{e}.down_proj.weight"], mixed[f"{p}.down_proj"][e])
    for k in mixed:
        if k.startswith("mtp.") or not k.endswith(("gate_up_proj", "down_proj")):
            assert raw_bytes(pe[k]) == raw_bytes(mixed[k]), k  # per-expert MTP layer and other tensors unchanged
    plan = run_tool("convert.fuse_experts", "--src", str(tmp_path / "mixed"), "--dst", str(tmp_path / "f1"), "--dry-run")
    assert "model.language_model.layers.0: already transformers, copied unchanged" in plan.stdout, plan.stdout
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "mixed"), "--dst", str(tmp_path / "f1"), "--verify")
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "pe"), "--dst", str(tmp_path / "f2"), "--verify")
    f1, f2 = load_dir(tmp_path / "f1"), load_dir(tmp_path / "f2")
    assert set(f1) == set(f2) and all(raw_bytes(f1[k]) == raw_bytes(f2[k]) for k in f1)
    for k in mixed:  # fuse touched only the MTP layer
        if not k.startswith("mtp.layers.0.mlp.experts."):
            assert raw_bytes(f1[k]) == raw_bytes(mixed[k]), k
    assert f1["mtp.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)
    run_tool("convert.split_experts", "--src", str(tmp_path / "f1"), "--dst", str(tmp_path / "pe2"))
    pe2 = load_dir(tmp_path / "pe2")
    assert set(pe2) == set(pe) and all(raw_bytes(pe2[k]) == raw_bytes(pe[k]) for k in pe)
