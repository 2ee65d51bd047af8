"""Issue 22, part 5: outputs no consumer reads are not produced silently.

- `split_experts` of a family whose file says no consumer reads its per-expert layout (`per_expert_readers`:
  gpt-oss, bf16 and MXFP4, and MXFP4 dequantized with --dtype) is refused (exit 2, one line, nothing written)
  unless the user asks for the layout (`--allow-unread-layout`, `allow_unread_layout: true` in a manifest); the
  family file decides, not the model's name.
- A batch's `defaults: max_shard_size` does not shard an adapter for a target that reads one file (vLLM, peft);
  a job's own `max_shard_size` for such a target refuses the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adapter_fixtures import base_config, make_per_expert_adapter
from convert.errors import ConversionError
from convert.example import example_tensors, write_checkpoint
from convert.families.registry import BUILTIN_DIR, registry
from helpers import REPO, load_dir, raw_bytes, run_tool
from quant_fixtures import write_mxfp4_gpt_oss

ALLOW = "--allow-unread-layout"


def _gpt_oss_fused(root: Path) -> tuple[Path, Path]:
    """A tiny per-expert gpt-oss checkpoint and its fuse (the native layout gpt-oss checkpoints hold)."""
    tensors, cfg = example_tensors("gpt_oss", 2, 4, 32, 24, seed=3)
    write_checkpoint(tensors, cfg, str(root / "pe-src"), 40_000)
    run_tool("convert.fuse_experts", "--src", str(root / "pe-src"), "--dst", str(root / "native"))
    return root / "pe-src", root / "native"


def _refused(proc, *words: str) -> str:
    """The one error line of a refused run (exit 2), checked to hold every word."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = load_dir(a), load_dir(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and raw_bytes(ta[k]) == raw_bytes(tb[k]), k


def test_gpt_oss_split_is_refused_and_writes_nothing_unless_asked(tmp_path):
    pe_src, native = _gpt_oss_fused(tmp_path)
    dst = tmp_path / "pe"
    for extra in ((), ("--dry-run",), ("--nproc", "2")):
        line = _refused(run_tool("convert.split_experts", "--src", str(native), "--dst", str(dst), *extra, check=False),
                        str(native), "per-expert layout of the gpt_oss family", str(BUILTIN_DIR / "gpt_oss.json"),
                        "only fused", "NaN", ALLOW, "allow_unread_layout: true")
        assert "dequantized" not in line
        assert not dst.exists(), f"a refused split ({extra}) must not create its destination"
    # asked for: today's output, i.e. the per-expert checkpoint the native one was fused from, byte for byte
    run_tool("convert.split_experts", "--src", str(native), "--dst", str(dst), ALLOW, "--nproc", "2")
    _same_checkpoint(dst, pe_src)
    assert json.loads((dst / "config.json").read_text()) == json.loads((pe_src / "config.json").read_text())
    # fusing gpt-oss (the layout its consumers read) is not affected
    run_tool("convert.fuse_experts", "--src", str(dst), "--dst", str(tmp_path / "again"))
    _same_checkpoint(tmp_path / "again", native)


def test_mxfp4_split_and_dequantizing_split_are_refused_unless_asked(tmp_path):
    src = tmp_path / "mxfp4"
    write_mxfp4_gpt_oss(src, E=3, H=64, I=64, layers=1)
    dst = tmp_path / "pe"
    _refused(run_tool("convert.split_experts", "--src", str(src), "--dst", str(dst), check=False),
             str(src), "per-expert layout of the gpt_oss_mxfp4 family", "gpt_oss_mxfp4.json", "weight_blocks", ALLOW)
    # --dtype dequantizes into the gpt_oss family's per-expert layout: read by no consumer either
    _refused(run_tool("convert.split_experts", "--src", str(src), "--dst", str(dst), "--dtype", "bf16", check=False),
             "per-expert layout of the gpt_oss family (the gpt_oss_mxfp4 experts dequantized with --dtype bf16)",
             str(BUILTIN_DIR / "gpt_oss.json"), ALLOW)
    assert not dst.exists()
    # the dequantizing fuse writes the native layout they read: not refused
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "bf16"), "--dtype", "bf16")
    # asked for: written as before (MXFP4 blocks/scales per expert; bf16 per expert)
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(dst), ALLOW)
    pe = load_dir(dst)
    assert {k.split(".experts.0.", 1)[1] for k in pe if ".experts.0." in k} == {
        f"{p}.{leaf}" for p in ("gate_proj", "up_proj", "down_proj") for leaf in ("weight_blocks", "weight_scales", "bias")}
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe16"), "--dtype", "bf16", ALLOW)
    pe16 = load_dir(tmp_path / "pe16")
    assert pe16["model.layers.0.mlp.experts.2.down_proj.weight"].shape == (64, 64)
    assert not [k for k in pe16 if k.endswith(("_blocks", "_scales"))]


def test_the_family_file_decides_not_the_model_name(tmp_path, monkeypatch):
    """A family file replacing a built-in one (MOE_CONVERT_CONFIGS) turns the refusal on for qwen3_moe and off for
    gpt-oss: the engine names no model."""
    qwen = tmp_path / "qwen"
    tensors, cfg = example_tensors("qwen3_moe", 1, 3, 32, 16, seed=1)
    write_checkpoint(tensors, cfg, str(qwen / "src"), 1 << 20)
    run_tool("convert.fuse_experts", "--src", str(qwen / "src"), "--dst", str(qwen / "fused"))
    _, native = _gpt_oss_fused(tmp_path)
    families = tmp_path / "families"
    families.mkdir()
    q = json.loads((BUILTIN_DIR / "qwen3_moe.json").read_text())
    q["per_expert_readers"] = {"readers": [], "note": "our server reads qwen3 experts fused only"}
    (families / "qwen3_moe.json").write_text(json.dumps(q))
    g = json.loads((BUILTIN_DIR / "gpt_oss.json").read_text())
    g["per_expert_readers"] = {"readers": ["our-server"]}
    (families / "gpt_oss.json").write_text(json.dumps(g))
    monkeypatch.setenv("MOE_CONVERT_CONFIGS", str(families))
    _refused(run_tool("convert.split_experts", "--src", str(qwen / "fused"), "--dst", str(qwen / "pe"), check=False),
             "per-expert layout of the qwen3_moe family", str(families / "qwen3_moe.json"),
             "our server reads qwen3 experts fused only", ALLOW)
    assert not (qwen / "pe").exists()
    run_tool("convert.split_experts", "--src", str(native), "--dst", str(tmp_path / "gpt-pe"))
    _same_checkpoint(tmp_path / "gpt-pe", tmp_path / "pe-src")


TOY = {"family": "toy_moe", "model_types": ["toy_moe"], "num_experts_keys": ["n_experts"],
       "experts": {"container": "mlp", "roles": {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}},
       "layouts": {"transformers": {"gate_up_proj": {"parts": ["gate", "up"], "ops": [{"op": "concat", "dim": 0}]},
                                    "down_proj": {"parts": ["down"]}}},
       "default_layout": "transformers"}


@pytest.mark.parametrize("readers, expect", [
    ({"readers": []}, ["per_expert_readers: readers is []", "give a 'note'"]),
    ({"readers": [], "notes": "x"}, ["per_expert_readers: unknown key 'notes'", "did you mean 'note'"]),
    ({"readers": "vllm"}, ["per_expert_readers.readers: expected a list of string"]),
    ({"readers": ["vllm", "vllm"]}, ["expected distinct consumer names"]),
    ({"readers": ["vLLM 0.32"]}, ["expected distinct consumer names"]),
    ({"note": "nobody"}, ["per_expert_readers: missing required key 'readers'"]),
    ([], ["per_expert_readers: expected an object"]),
])
def test_per_expert_readers_is_checked_strictly(tmp_path, readers, expect):
    d = tmp_path / "families"
    d.mkdir()
    (d / "toy_moe.json").write_text(json.dumps({**TOY, "per_expert_readers": readers}))
    with pytest.raises(ConversionError) as exc:
        registry([d])
    text = str(exc.value)
    assert str(d / "toy_moe.json") in text, text
    for part in expect:
        assert part in text, text


def test_per_expert_readers_is_inherited_and_read():
    fams = registry([BUILTIN_DIR]).families
    assert fams["gpt_oss"].per_expert_readers == () and "only fused" in fams["gpt_oss"].per_expert_note
    assert fams["gpt_oss_mxfp4"].per_expert_readers == () and fams["gpt_oss_mxfp4"].per_expert_note
    assert fams["qwen3_moe"].per_expert_readers is None and fams["mixtral"].per_expert_readers is None


# ------------------------------------------------------------------------------------------------ batches
def _batch(manifest: Path, tmp_path: Path, **kw):
    report = tmp_path / f"{manifest.stem}-report.json"
    proc = run_tool("launch.batch", str(manifest), "--report", str(report), check=False, **kw)
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]} if report.exists() else {}
    return proc, rows


def test_batch_split_of_gpt_oss_fails_unless_the_job_asks(tmp_path):
    pe_src, native = _gpt_oss_fused(tmp_path)
    jobs = [{"name": "plain", "kind": "split_experts", "src": str(native), "dst": str(tmp_path / "plain")},
            {"name": "asked", "kind": "split_experts", "src": str(native), "dst": str(tmp_path / "asked"),
             "allow_unread_layout": True}]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"jobs": jobs}))
    proc, rows = _batch(tmp_path / "m.yaml", tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert rows["plain"]["status"] == "failed" and "no consumer reads the per-expert layout of the gpt_oss family" \
        in rows["plain"]["error"] and ALLOW in rows["plain"]["error"]
    assert not (tmp_path / "plain").exists()
    assert rows["asked"]["status"] == "done"
    _same_checkpoint(tmp_path / "asked", pe_src)


@pytest.fixture()
def adapter(tmp_path):
    """A per-expert qwen3_moe adapter (several KB) and its base config."""
    src, _ = make_per_expert_adapter(tmp_path / "adapter", "qwen3_moe")
    (tmp_path / "base.json").write_text(json.dumps(base_config("qwen3_moe")))
    assert (src / "adapter_model.safetensors").stat().st_size > 4 * 4096  # several shards at max_shard_size 4KB
    return src, tmp_path / "base.json"


def test_batch_defaults_shard_size_does_not_shard_an_adapter_for_a_one_file_target(tmp_path, adapter):
    src, base = adapter
    doc = {"defaults": {"max_shard_size": "4KB"},  # as configs/batch-example.yaml: a default meant for base weights
           "jobs": [{"name": "for-vllm", "kind": "split_adapter", "src": str(src), "dst": str(tmp_path / "vllm"),
                     "base_config": str(base)},
                    {"name": "for-peft", "kind": "fuse_adapter", "layout": "peft", "src": str(src),
                     "dst": str(tmp_path / "peft"), "base_config": str(base)},
                    {"name": "for-me", "kind": "split_adapter", "target": "per-expert", "src": str(src),
                     "dst": str(tmp_path / "mine"), "base_config": str(base)}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    proc, rows = _batch(tmp_path / "m.yaml", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, out, target in (("for-vllm", "vllm", "vllm"), ("for-peft", "peft", "peft")):
        assert rows[name]["status"] == "done", rows[name]
        files = sorted(p.name for p in (tmp_path / out).iterdir() if p.is_file())
        assert [f for f in files if f.startswith("adapter_model")] == ["adapter_model.safetensors"], files
        note = f"defaults' max_shard_size not applied: the target {target} reads one adapter_model.safetensors"
        assert any(note in n for n in rows[name]["notes"]), rows[name]
        assert note in proc.stdout
    assert "warning" not in proc.stderr
    # a target that reads shards (per-expert: for tools of one's own) takes the default
    assert rows["for-me"]["status"] == "done" and rows["for-me"]["notes"] == []
    assert (tmp_path / "mine" / "adapter_model.safetensors.index.json").exists()
    assert len(list((tmp_path / "mine").glob("adapter_model-*.safetensors"))) > 1


def test_an_adapter_jobs_own_shard_size_for_a_one_file_target_refuses_the_manifest(tmp_path, adapter):
    from launch.manifest import load_manifest

    src, base = adapter
    _, native = _gpt_oss_fused(tmp_path)
    jobs = [{"name": "first", "kind": "split_experts", "src": str(native), "dst": str(tmp_path / "first"),
             "allow_unread_layout": True},
            {"name": "sharded-for-vllm", "kind": "split_adapter", "src": str(src), "dst": str(tmp_path / "vllm"),
             "base_config": str(base), "max-shard-size": "4KB"}]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"jobs": jobs}))
    proc, rows = _batch(manifest, tmp_path)
    line = _refused(proc, f"{manifest}: job 'sharded-for-vllm': max-shard-size: the target vllm reads one "
                          "adapter_model.safetensors, not a sharded adapter", "target: sglang or per-expert")
    assert "leave max-shard-size out" in line and not rows
    assert not (tmp_path / "first").exists() and not (tmp_path / "vllm").exists(), "nothing runs"
    # the same key for a target that reads a sharded adapter (SGLang reads every *.safetensors) is accepted
    jobs[1]["target"] = "sglang"
    manifest.write_text(yaml.safe_dump({"jobs": jobs}))
    parsed = {j["name"]: j for j in load_manifest(str(manifest))}
    assert parsed["sharded-for-vllm"]["max_shard_size"] == 4000 and parsed["sharded-for-vllm"]["notes"] == []
    # fuse_adapter's default target, peft, reads one file too
    jobs[1].update(kind="fuse_adapter", layout="peft", target=None)
    manifest.write_text(yaml.safe_dump({"jobs": jobs}))
    with pytest.raises(ConversionError, match="max-shard-size: the target peft reads one adapter_model.safetensors"):
        load_manifest(str(manifest))


def test_example_manifest_shards_no_adapter():
    """configs/batch-example.yaml: its defaults' max_shard_size shards the base weights, not its adapters (all for
    vLLM or peft), and each adapter job says so."""
    from launch.manifest import load_manifest

    for job in load_manifest(str(REPO / "configs" / "batch-example.yaml")):
        if job["kind"].endswith("_adapter"):
            assert job["max_shard_size"] is None and job["notes"], job["name"]
        else:
            assert job["max_shard_size"] == 5_000_000_000 and job["notes"] == []
