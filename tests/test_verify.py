"""convert.verify: passes on real conversions, and catches every kind of wrong output, naming tensor and expert."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import fuse_experts, split_experts, verify
from convert.example import example_tensors, write_checkpoint
from helpers import run_tool

INDEX = "model.safetensors.index.json"
E, LAYERS = 5, 2


def call(main, *argv: str) -> int:
    """Run an entry point's main() in this process (world size 1); returns its exit code."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code or 0)


def report(capsys, src: Path, dst: Path, tmp: Path, *extra: str) -> tuple[int, dict, str]:
    """Verify dst against src in-process; returns (exit code, JSON report, printed text)."""
    path = tmp / f"report-{dst.name}.json"
    path.unlink(missing_ok=True)
    code = call(verify.main, "--src", str(src), "--dst", str(dst), "--report", str(path), *extra)
    out = capsys.readouterr()
    return code, (json.loads(path.read_text()) if path.exists() else {}), out.out + out.err


def tensor_bytes(path: Path) -> int:
    """Bytes of every tensor data of a checkpoint directory (from the safetensors headers)."""
    total = 0
    for f in path.glob("*.safetensors"):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    return total


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """qwen3_moe bf16 (per-expert, several shards) -> fused -> split; gpt_oss fp32 -> fused bf16 (cast + interleave)."""
    root = tmp_path_factory.mktemp("verify")
    t, cfg = example_tensors("qwen3_moe", LAYERS, E, 32, 24, seed=1)
    write_checkpoint(t, cfg, str(root / "src"), 20_000)
    (root / "src" / "generation_config.json").write_text('{"do_sample": false}')
    g, gcfg = example_tensors("gpt_oss", LAYERS, E, 32, 24, seed=2, dtype=torch.float32)
    write_checkpoint(g, gcfg, str(root / "gsrc"), 40_000)
    with pytest.MonkeyPatch.context():
        assert call(fuse_experts.main, "--src", str(root / "src"), "--dst", str(root / "fused"), "--no-progress",
                    "--max-shard-size", "30KB") == 0
        assert call(split_experts.main, "--src", str(root / "fused"), "--dst", str(root / "split"), "--no-progress") == 0
        assert call(fuse_experts.main, "--src", str(root / "gsrc"), "--dst", str(root / "gfused"), "--no-progress",
                    "--dtype", "bf16") == 0
    return root


@pytest.mark.parametrize("src, dst, experts, others", [
    ("src", "fused", LAYERS * E, 16), ("fused", "split", LAYERS * E, 16), ("src", "split", LAYERS * E, 16),
    ("gsrc", "gfused", LAYERS * E, 16),
])
def test_verify_passes_and_reads_every_byte_once(ckpts, capsys, tmp_path, src, dst, experts, others):
    code, rep, text = report(capsys, ckpts / src, ckpts / dst, tmp_path)
    assert code == 0, text
    assert "OK:" in text and rep["ok"] and rep["mismatches"] == 0
    assert rep["experts_checked"] == experts and rep["tensors_checked"] == others
    # every tensor byte of both sides went through a comparison, once
    assert rep["bytes_compared"] == tensor_bytes(ckpts / src) + tensor_bytes(ckpts / dst)


def _copy(ckpts: Path, name: str, tmp: Path) -> Path:
    out = tmp / f"{name}-copy"
    shutil.copytree(ckpts / name, out)
    return out


def _locate(d: Path, tensor: str) -> tuple[Path, int, int]:
    """(shard, absolute start, end) of `tensor` in the checkpoint directory `d`."""
    index = json.loads((d / INDEX).read_text())
    shard = d / index["weight_map"][tensor]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    return shard, 8 + n + begin, 8 + n + end


def _flip(d: Path, tensor: str, byte: int, mask: int = 0x40) -> None:
    shard, start, _ = _locate(d, tensor)
    raw = bytearray(shard.read_bytes())
    raw[start + byte] ^= mask
    shard.write_bytes(bytes(raw))


def _edit_shard(d: Path, tensor: str, edit) -> None:
    """Rewrite the shard holding `tensor` through edit(tensors) -> tensors, updating the index's weight_map."""
    index = json.loads((d / INDEX).read_text())
    name = index["weight_map"][tensor]
    tensors = edit(load_file(d / name))
    save_file(tensors, d / name, metadata={"format": "pt"})
    wm = {k: v for k, v in index["weight_map"].items() if v != name}
    wm.update({k: name for k in tensors})
    index["weight_map"] = wm
    index["metadata"]["total_size"] = tensor_bytes(d)
    (d / INDEX).write_text(json.dumps(index))


GU1 = "model.layers.1.mlp.experts.gate_up_proj"


def _expert_byte(d: Path, tensor: str, expert: int, element: int) -> int:
    _, start, end = _locate(d, tensor)
    return expert * (end - start) // E + element * 2 + 1  # the high byte of a bf16 element


def corrupt(case: str, ckpts: Path, tmp: Path) -> tuple[Path, Path, list[str]]:
    """Make a wrong destination; returns (src, dst, strings the report must contain)."""
    if case == "expert_byte":
        d = _copy(ckpts, "fused", tmp)
        _flip(d, GU1, _expert_byte(d, GU1, 3, 5))
        return ckpts / "src", d, [GU1, "expert 3", "gate", "bytes differ (first at [0, 5])", "max abs diff"]
    if case == "expert_byte_per_expert_side":
        d = _copy(ckpts, "split", tmp)
        _flip(d, "model.layers.0.mlp.experts.4.down_proj.weight", 11)
        return ckpts / "fused", d, ["model.layers.0.mlp.experts.4.down_proj.weight expert 4", "down"]
    if case == "interleaved_up":
        d = _copy(ckpts, "gfused", tmp)
        gu = "model.layers.0.mlp.experts.gate_up_proj"
        _flip(d, gu, _expert_byte(d, gu, 2, 3))  # element 3 of a row: odd, so an `up` value
        return ckpts / "gsrc", d, [gu, "expert 2", "up (source model.layers.0.mlp.experts.2.up_proj.weight)",
                                   "float32 -> bfloat16", "first at [1, 0]"]
    if case == "small_cast_error":
        d = _copy(ckpts, "gfused", tmp)
        key = "model.layers.1.mlp.experts.down_proj_bias"
        _edit_shard(d, key, lambda t: {**t, key: t[key].index_put_((torch.tensor([4]), torch.tensor([0])),
                                                                   t[key][4, 0] * 1.05 + 0.01)})
        return ckpts / "gsrc", d, [key, "expert 4", "down_bias", "not allclose"]
    if case == "non_expert":
        d = _copy(ckpts, "fused", tmp)
        _flip(d, "model.embed_tokens.weight", 101)
        return ckpts / "src", d, ["model.embed_tokens.weight: bytes differ (first at [1, 18])"]
    if case == "missing_tensor":
        d = _copy(ckpts, "fused", tmp)
        _edit_shard(d, "model.norm.weight", lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
        return ckpts / "src", d, ["'model.norm.weight' of the source is not in the destination"]
    if case == "extra_tensor":
        d = _copy(ckpts, "fused", tmp)
        _edit_shard(d, "model.norm.weight", lambda t: {**t, "model.extra.weight": torch.zeros(3)})
        return ckpts / "src", d, ["'model.extra.weight' is not in the source"]
    if case == "missing_expert":
        d = _copy(ckpts, "split", tmp)
        key = "model.layers.1.mlp.experts.4.up_proj.weight"
        _edit_shard(d, key, lambda t: {k: v for k, v in t.items() if k != key})
        return ckpts / "fused", d, [f"{key!r} (expert 4 of model.layers.1) is missing"]
    if case == "wrong_shape":
        d = _copy(ckpts, "fused", tmp)
        _edit_shard(d, GU1, lambda t: {**t, GU1: t[GU1][:, :-2].contiguous()})
        return ckpts / "src", d, [GU1, "per-expert shape [23, 32]"]
    if case == "not_indexed":
        d = _copy(ckpts, "fused", tmp)
        index = json.loads((d / INDEX).read_text())
        del index["weight_map"]["model.norm.weight"]
        (d / INDEX).write_text(json.dumps(index))
        return ckpts / "src", d, ["'model.norm.weight' is not in the index"]
    if case == "total_size":
        d = _copy(ckpts, "fused", tmp)
        index = json.loads((d / INDEX).read_text())
        index["metadata"]["total_size"] += 2
        (d / INDEX).write_text(json.dumps(index))
        return ckpts / "src", d, ["metadata.total_size"]
    if case == "missing_shard":
        d = _copy(ckpts, "fused", tmp)
        shard = sorted(d.glob("model-*.safetensors"))[-1]
        shard.unlink()
        return ckpts / "src", d, [f"names shard {shard.name!r}, which does not exist"]
    if case == "stored_twice":  # in two shards the index names
        d = _copy(ckpts, "fused", tmp)
        home = _locate(d, "model.norm.weight")[0]
        other = next(p for p in sorted(d.glob("model-*.safetensors")) if p != home)
        save_file({**load_file(other), "model.norm.weight": load_file(home)["model.norm.weight"]}, other)
        return ckpts / "src", d, ["'model.norm.weight' is stored twice", other.name, home.name]
    if case == "stray_shard":
        d = _copy(ckpts, "fused", tmp)
        save_file({"model.norm.weight": torch.zeros(3)}, d / "model-extra.safetensors")
        return ckpts / "src", d, ["model-extra.safetensors: a shard the index does not name"]
    if case == "no_index":
        d = _copy(ckpts, "fused", tmp)
        (d / INDEX).unlink()
        return ckpts / "src", d, [f"{INDEX}: missing"]
    if case == "escaping_shard_path":
        d = _copy(ckpts, "fused", tmp)
        index = json.loads((d / INDEX).read_text())
        index["weight_map"]["model.norm.weight"] = "../fused/model-00001-of-00003.safetensors"
        (d / INDEX).write_text(json.dumps(index))
        return ckpts / "src", d, ["'../fused/model-00001-of-00003.safetensors' is absolute or leaves the directory"]
    if case == "bad_header":
        d = _copy(ckpts, "fused", tmp)
        shard = sorted(d.glob("model-*.safetensors"))[0]
        raw = bytearray(shard.read_bytes())
        raw[9] = ord("#")
        shard.write_bytes(bytes(raw))
        return ckpts / "src", d, [shard.name, "not valid JSON"]
    if case == "config_changed":
        d = _copy(ckpts, "fused", tmp)
        (d / "generation_config.json").write_text('{"do_sample": true}')
        return ckpts / "src", d, ["generation_config.json: differs"]
    if case == "leftover":
        d = _copy(ckpts, "fused", tmp)
        (d / "model-00001-of-00003.safetensors.incomplete").write_bytes(b"x")
        return ckpts / "src", d, ["left over from an unfinished conversion"]
    raise ValueError(case)


CASES = ["expert_byte", "expert_byte_per_expert_side", "interleaved_up", "small_cast_error", "non_expert",
         "missing_tensor", "extra_tensor", "missing_expert", "wrong_shape", "not_indexed", "total_size",
         "missing_shard", "stored_twice", "stray_shard", "no_index", "escaping_shard_path", "bad_header", "config_changed", "leftover"]


@pytest.mark.parametrize("case", CASES)
def test_verify_catches_wrong_output(ckpts, capsys, tmp_path, case):
    src, dst, expect = corrupt(case, ckpts, tmp_path)
    code, rep, text = report(capsys, src, dst, tmp_path)
    assert code == 1, text
    assert "FAILED" in text and rep["mismatches"] >= 1
    for s in expect:
        assert s in text, f"{s!r} not in:\n{text}"


def test_cannot_verify_an_invalid_source(ckpts, capsys, tmp_path):
    src = _copy(ckpts, "src", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, text = report(capsys, src, ckpts / "fused", tmp_path)
    assert code == 2 and "cannot verify" in text and "is not a known MoE family" in text


def test_verify_flag_catches_an_engine_fault(ckpts, capsys, tmp_path, monkeypatch):
    """Inject a one-byte fault into the engine's copies: --verify must fail the job and un-mark the output."""
    from convert.storage import Storage

    real = Storage.copy_range_from
    hit = []

    def faulty(self, src, src_rel, src_off, dst_rel, dst_off, n):
        real(self, src, src_rel, src_off, dst_rel, dst_off, n)
        if not hit and n > 64:
            hit.append(dst_rel)
            self.pwrite(dst_rel, dst_off + 33, bytes([self.read_range(dst_rel, dst_off + 33, dst_off + 34)[0] ^ 1]))

    monkeypatch.setattr(Storage, "copy_range_from", faulty)
    out = tmp_path / "out"
    code = call(fuse_experts.main, "--src", str(ckpts / "src"), "--dst", str(out), "--no-progress", "--verify")
    text = capsys.readouterr()
    assert hit and code == 1, text
    assert "MISMATCH" in text.out and "not a correct conversion" in text.err
    assert not (out / INDEX).exists() and (out / (INDEX + ".unverified")).exists()


def test_verify_with_torchrun_ranks_split_the_experts(ckpts, tmp_path):
    d = _copy(ckpts, "fused", tmp_path)
    _flip(d, GU1, _expert_byte(d, GU1, 4, 2))  # expert 4: rank 1's slice (rank 0 has experts 0-2, rank 1 has 3-4)
    rep_path = tmp_path / "rep.json"
    proc = run_tool("convert.verify", "--src", str(ckpts / "src"), "--dst", str(d), "--report", str(rep_path),
                    nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert f"MISMATCH {GU1} expert 4: gate" in proc.stdout, proc.stdout + proc.stderr
    rep = json.loads(rep_path.read_text())
    assert [r["experts_checked"] for r in rep["ranks"]] == [3 * LAYERS, 2 * LAYERS]
    assert sum(r["tensors_checked"] for r in rep["ranks"]) == 16 and all(r["tensors_checked"] for r in rep["ranks"])


def test_fuse_and_split_with_verify_under_torchrun(ckpts, tmp_path):
    proc = run_tool("convert.fuse_experts", "--src", str(ckpts / "gsrc"), "--dst", str(tmp_path / "f"), "--verify",
                    "--ep", "3", nproc=2, timeout=120)
    assert "OK:" in proc.stdout and "on 2 rank(s)" in proc.stdout
    code = call(split_experts.main, "--src", str(tmp_path / "f"), "--dst", str(tmp_path / "s"), "--no-progress",
                "--verify")
    assert code == 0 and (tmp_path / "s" / INDEX).exists()
