"""Trainer checkpoints as sources: torch DCP and per-rank sharded safetensors, written by several real gloo
processes with sharded DTensors (tests/trainer_fixtures.py), converted to the per-expert checkpoint that
save_pretrained writes, byte for byte, and loaded back by from_pretrained with the trainer model's logits."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from helpers import load_dir, raw_bytes, run_tool
from model_fixtures import LAYERS, E, build_model, save_model
from test_trainer_names import TITAN_QWEN3_FROM_HF, _hf_logits_match, titan_from_hf, titan_to_hf
from trainer_fixtures import write_trainer_checkpoints

BUCKET = "trainer-ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, its save_pretrained directory, DCP of its state dict, per-rank safetensors of it, DCP of its state
    under torchtitan's names with torchtitan's expert_bias_E buffers, that state)."""
    root = tmp_path_factory.mktemp("trainer")
    model = build_model("qwen3_moe")
    save_model(model, root / "hf")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    titan = titan_from_hf(load_dir(root / "hf"), TITAN_QWEN3_FROM_HF, E)
    titan.update({f"layers.{i}.moe.expert_bias_E": torch.rand(E) for i in range(LAYERS)})
    outs = write_trainer_checkpoints({"dcp": ("dcp", state, root / "dcp"), "sharded": ("sharded", state, root / "sharded"),
                                      "titan": ("dcp", titan, root / "titan")})
    return model, root / "hf", outs["dcp"], outs["sharded"], outs["titan"], titan


def _same_bytes(out: Path, ref: Path) -> None:
    got, want = load_dir(out), load_dir(ref)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert raw_bytes(got[name]) == raw_bytes(t), name


@pytest.mark.parametrize("container", ["dcp", "sharded"])
def test_trainer_checkpoint_splits_to_what_save_pretrained_writes(trained, tmp_path, container):
    model, hf, dcp, sharded, _, _ = trained
    src = dcp if container == "dcp" else sharded
    dry = run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "x"), "--dry-run",
                   "--base-config", str(hf / "config.json"))
    assert ("torch-dcp" if container == "dcp" else "sharded-safetensors") in dry.stdout
    seen = run_tool("convert.inspect", str(src), "--base-config", str(hf / "config.json"))
    assert ("container: torch-dcp" if container == "dcp" else "container: sharded-safetensors") in seen.stdout
    assert "layout: transformers" in seen.stdout
    outs = []
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}"
        r = run_tool("convert.split_experts", "--src", str(src), "--dst", str(out), "--base-config",
                     str(hf / "config.json"), "--nproc", str(n))
        if container == "dcp":
            assert "training-state entries not converted (optimizer 2, train_state 1)" in r.stdout
        _same_bytes(out, hf)
        outs.append(out)
    for out in outs[1:]:
        for f in sorted(p.name for p in outs[0].glob("*.safetensors")):
            assert (out / f).read_bytes() == (outs[0] / f).read_bytes()
    assert json.loads((outs[0] / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    _hf_logits_match(model, outs[0])


def test_trainer_checkpoint_fuses_and_casts(trained, tmp_path):
    model, hf, dcp, _, _, _ = trained
    out = tmp_path / "fused"
    r = run_tool("convert.fuse_experts", "--src", str(dcp), "--dst", str(out), "--base-config",
                 str(hf / "config.json"), "--dtype", "bf16", "--nproc", "2", "--verify")
    assert "OK: " in r.stdout
    got = load_dir(out)
    for name, t in model.state_dict().items():
        assert torch.equal(got[name], t.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_dtype_only_pass_casts_a_checkpoint_already_in_the_target_layout(trained, tmp_path):
    _, hf, _, _, _, _ = trained
    out = tmp_path / "bf16"
    run_tool("convert.split_experts", "--src", str(hf), "--dst", str(out), "--dtype", "bf16")
    got, want = load_dir(out), load_dir(hf)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in want.items())
    again = run_tool("convert.split_experts", "--src", str(out), "--dst", str(tmp_path / "again"), "--dtype", "bf16",
                     check=False)
    assert again.returncode == 2 and "nothing to do" in again.stderr


def test_a_per_expert_trainer_checkpoint_is_consolidated_in_its_layout(trained, tmp_path):
    _, hf, _, _, _, _ = trained
    state = load_dir(hf)  # per-expert HF names, as torchtitan's to_hf gives them before consolidation
    src = write_trainer_checkpoints({"pe": ("sharded", state, tmp_path / "pe")}, world=2)["pe"]
    r = run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "out"), "--base-config",
                 str(hf / "config.json"))
    assert r.returncode == 0
    _same_bytes(tmp_path / "out", hf)


def test_a_trainer_checkpoint_without_config_asks_for_base_config(trained, tmp_path):
    _, _, dcp, _, _, _ = trained
    r = run_tool("convert.split_experts", "--src", str(dcp), "--dst", str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and "--base-config" in r.stderr and not (tmp_path / "o").exists()


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _refused(src: Path, hf: Path, out: Path, *needles: str) -> str:
    r = run_tool("convert.split_experts", "--src", str(src), "--dst", str(out), "--base-config",
                 str(hf / "config.json"), check=False)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for n in needles:
        assert n in line, line
    assert not (out / "model.safetensors.index.json").exists()
    return line


def test_bad_dcp_input_is_refused_in_one_line(trained, tmp_path):
    _, hf, dcp, _, _, _ = trained
    truncated = _copy(dcp, tmp_path / "truncated")
    victim = truncated / "__1_0.distcp"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    _refused(truncated, hf, tmp_path / "o1", "__1_0.distcp", "truncated", "tensor ")

    missing = _copy(dcp, tmp_path / "missing")
    (missing / "__2_0.distcp").unlink()
    _refused(missing, hf, tmp_path / "o2", ".metadata", "__2_0.distcp", "does not exist", "tensor ")

    overlap = _copy(dcp, tmp_path / "overlap")
    meta = pickle.loads((overlap / ".metadata").read_bytes())  # the test's own file: torch's classes
    name = next(k for k, v in meta.state_dict_metadata.items() if k.startswith("model.") and
                hasattr(v, "chunks") and len(v.chunks) > 1 and len(v.size) == 3)
    chunks = meta.state_dict_metadata[name].chunks
    first = chunks[1]
    moved = type(first)(offsets=torch.Size([first.offsets[0] - 1, *first.offsets[1:]]), sizes=first.sizes)
    key = next(k for k in meta.storage_data if k.fqn == name and tuple(k.offset) == tuple(first.offsets))
    meta.storage_data[type(key)(key.fqn, moved.offsets, key.index)] = meta.storage_data.pop(key)
    chunks[1] = moved
    (overlap / ".metadata").write_bytes(pickle.dumps(meta))
    _refused(overlap, hf, tmp_path / "o3", name.split(".", 1)[1], "overlaps")

    garbage = _copy(dcp, tmp_path / "garbage")
    (garbage / ".metadata").write_bytes(b"\x80\x04cos\nsystem\n.")
    _refused(garbage, hf, tmp_path / "o4", ".metadata", "os.system")


def test_bad_sharded_safetensors_is_refused_in_one_line(trained, tmp_path):
    _, hf, _, sharded, _, _ = trained
    bad = _copy(sharded, tmp_path / "bad")
    victim = sorted(bad.glob("*.safetensors"))[0]
    raw = victim.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
    tensor = next(iter(info))
    info[tensor]["saved_offsets"] = [o + 1 for o in info[tensor]["saved_offsets"]]
    header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    victim.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    _refused(bad, hf, tmp_path / "o", tensor)


def test_dcp_on_s3_converts_as_on_local_disk(s3env, trained, tmp_path):
    fs = s3env
    _, hf, dcp, _, _, _ = trained
    fs.put(str(dcp), f"{BUCKET}/dcp", recursive=True)
    assert fs.exists(f"{BUCKET}/dcp/.metadata")
    run_tool("convert.split_experts", "--src", f"s3://{BUCKET}/dcp", "--dst", str(tmp_path / "s2l"),
             "--base-config", str(hf / "config.json"), "--nproc", "2")
    _same_bytes(tmp_path / "s2l", hf)
    run_tool("convert.split_experts", "--src", f"s3://{BUCKET}/dcp", "--dst", f"s3://{BUCKET}/s2s",
             "--base-config", str(hf / "config.json"), "--nproc", "2")
    fs.get(f"{BUCKET}/s2s", str(tmp_path / "s2s"), recursive=True)
    _same_bytes(tmp_path / "s2s", hf)


def test_a_torchtitan_dcp_checkpoint_converts_to_what_torchtitan_to_hf_gives(trained, tmp_path):
    model, hf, _, _, titan_dcp, titan = trained
    out = tmp_path / "pe"
    r = run_tool("convert.split_experts", "--src", str(titan_dcp), "--dst", str(out), "--base-config",
                 str(hf / "config.json"), "--nproc", "2", "--dtype", "bf16")
    assert "training-state entries not converted" in r.stdout and "expert_bias_E" in r.stdout
    want = {k: v.to(torch.bfloat16) for k, v in titan_to_hf(titan, TITAN_QWEN3_FROM_HF, E).items()}
    got = load_dir(out)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert raw_bytes(got[name]) == raw_bytes(t), name
    fused = tmp_path / "fused"
    run_tool("convert.fuse_experts", "--src", str(titan_dcp), "--dst", str(fused), "--base-config",
             str(hf / "config.json"), "--verify")
    _hf_logits_match(model, fused)


def test_a_dcp_conversion_resumes_after_a_rank_is_killed(trained, tmp_path, monkeypatch):
    _, hf, dcp, _, _, _ = trained
    out = tmp_path / "out"
    args = ("convert.split_experts", "--src", str(dcp), "--dst", str(out), "--base-config", str(hf / "config.json"),
            "--nproc", "2", "--max-shard-size", "20KB")
    monkeypatch.setenv("MOE_CONVERT_JOURNAL_BYTES", "4000")
    monkeypatch.setenv("MOE_CONVERT_CRASH_AFTER", "1:12000")
    crashed = run_tool(*args, check=False)
    assert crashed.returncode != 0 and not (out / "model.safetensors.index.json").exists()
    monkeypatch.delenv("MOE_CONVERT_CRASH_AFTER")
    stats = tmp_path / "stats.json"
    run_tool(*args, "--stats", str(stats))
    report = json.loads(stats.read_text())
    assert report["resumed"] is True
    _same_bytes(out, hf)


def test_nemo_keeps_the_config_in_hf_metadata(trained, tmp_path):
    _, hf, _, sharded, _, _ = trained
    src = _copy(sharded, tmp_path / "model")
    (src / ".hf_metadata").mkdir()
    (src / ".hf_metadata" / "config.json").write_bytes((hf / "config.json").read_bytes())
    r = run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "out"), "--verify")
    assert "OK: " in r.stdout
    _same_bytes(tmp_path / "out", hf)
    assert (tmp_path / "out" / "config.json").read_bytes() == (hf / "config.json").read_bytes()
