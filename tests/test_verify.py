"""convert.verify: passes on real conversions, and catches every kind of wrong output, naming tensor and expert."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import fuse_experts, split_experts
from convert.example import example_tensors, write_checkpoint
from convert.verify import run as verify
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
        return ckpts / "src", d, ["model-extra.safetensors: a weights file the index does not name"]
    if case == "no_index":
        d = _copy(ckpts, "fused", tmp)
        (d / INDEX).unlink()
        return ckpts / "src", d, [f"{INDEX}: missing"]
    return corrupt_files(case, ckpts, tmp)


def corrupt_files(case: str, ckpts: Path, tmp: Path) -> tuple[Path, Path, list[str]]:
    """corrupt()'s cases of a damaged index, header, config file or a leftover file."""
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
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, text = report(capsys, src, ckpts / "fused", tmp_path)
    assert code == 2 and "cannot verify" in text and "is not a known MoE family" in text


def test_verify_flag_catches_an_engine_fault(ckpts, capsys, tmp_path, monkeypatch):
    """Inject a one-byte fault into the engine's copies: --verify must fail the job and un-mark the output."""
    from convert.io.storage import LocalPositional

    real = LocalPositional.copy_range_from
    hit = []

    def faulty(self, src, src_rel, src_off, dst_rel, dst_off, n):
        real(self, src, src_rel, src_off, dst_rel, dst_off, n)
        if not hit and n > 64:
            hit.append(dst_rel)
            self.pwrite(dst_rel, dst_off + 33, bytes([self.store.read_range(dst_rel, dst_off + 33, dst_off + 34)[0] ^ 1]))

    monkeypatch.setattr(LocalPositional, "copy_range_from", faulty)
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
                "--verify", "--allow-unread-layout")  # gpt-oss: no consumer reads its per-expert layout
    assert code == 0 and (tmp_path / "s" / INDEX).exists()


# ----------------------------------------------------------------------------- adapters


def _relation_deltas(src: Path, dst: Path, base: Path | None) -> dict[tuple[int, str, int], torch.Tensor]:
    """Per-expert deltas of `dst` as the verifier computes them (to check its reading of each layout)."""
    from convert.io.storage import Storage
    from convert.verify.run import VerifyOptions, plan_verify

    rel = plan_verify(VerifyOptions(str(src), str(dst), base_config=str(base) if base else None))
    storage = Storage(str(dst))
    out = {}
    for check in rel.experts:
        layer = int(check.layer.split(".layers.")[1])
        for e in range(check.num_experts):
            for role, (delta, _) in check.dst.load(storage, e).items():
                out[(layer, role, e)] = delta
    return out


def _same_deltas(got: dict, want: dict) -> None:
    assert set(got) == set(want) and want
    for k in want:
        assert torch.allclose(got[k], want[k].double(), rtol=1e-5, atol=1e-7), k


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Synthetic adapters in every layout FORMATS.md lists (E=5), each split (and the per-expert one fused) in-process."""
    from adapter_fixtures import (
        base_config,
        make_grouped_adapter,
        make_per_expert_adapter,
        make_shared_w123_adapter,
        per_expert_deltas,
    )
    from convert import fuse_adapter, split_adapter

    root = tmp_path_factory.mktemp("adapters")
    (root / "base.json").write_text(json.dumps(base_config()))
    (root / "base_oss.json").write_text(json.dumps(base_config("gpt_oss")))
    (root / "base_mixtral.json").write_text(json.dumps(base_config("mixtral")))
    made = {
        "shared": (make_shared_w123_adapter(root / "shared", experts=E, rank=4, attn_prefix="attn"), "base.json"),
        "grouped": (make_grouped_adapter(root / "grouped", experts=E, rank=3), "base.json"),
        "grouped_interleaved": (make_grouped_adapter(root / "grouped_interleaved", experts=E, rank=3,
                                                     order="interleave"), "base_oss.json"),
        "per_expert": (make_per_expert_adapter(root / "per_expert", "qwen3_moe", share_gate_up_a=True,
                                               alpha_pattern={"down_proj": 5}), "base.json"),
        "per_expert_patterns": (make_per_expert_adapter(root / "per_expert_patterns", "mixtral", seed=5, alpha_pattern={
            "layers.1.block_sparse_moe.experts.2.w2": 3, "w2": 5}), "base_mixtral.json"),
    }
    # with alpha_pattern the fixture's own deltas are off: take peft's pattern semantics instead
    for name, family in (("per_expert", "qwen3_moe"), ("per_expert_patterns", "mixtral")):
        made[name] = ((made[name][0][0], per_expert_deltas(root / name, family)), made[name][1])
    out = {}
    for name, ((path, deltas), base) in made.items():
        # --target per-expert (issue 14): the default target vllm writes the peft layout for gpt-oss
        assert call(split_adapter.main, "--src", str(path), "--dst", str(root / f"{name}-split"), "--no-progress",
                    "--base-config", str(root / base), "--target", "per-expert") == 0
        out[name] = (path, root / f"{name}-split", root / base, deltas)
    assert call(fuse_adapter.main, "--src", str(root / "per_expert"), "--dst", str(root / "pe-peft"), "--layout",
                "peft", "--no-progress", "--base-config", str(root / "base.json")) == 0
    out["per_expert->peft"] = (root / "per_expert", root / "pe-peft", root / "base.json", made["per_expert"][0][1])
    return out


ADAPTER_CASES = ["shared", "grouped", "grouped_interleaved", "per_expert", "per_expert_patterns", "per_expert->peft"]


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_verify_passes_and_reads_layouts_as_formats_md_says(adapters, capsys, tmp_path, case):
    src, dst, base, deltas = adapters[case]
    code, rep, text = report(capsys, src, dst, tmp_path, "--base-config", str(base))
    assert code == 0, text
    assert rep["experts_checked"] == 2 * E and rep["tensors_checked"] == 8 and "per-expert deltas" in text
    # the verifier's own reading of both sides gives the deltas the fixture built the adapter from
    _same_deltas(_relation_deltas(src, dst, base), deltas)
    _same_deltas(_relation_deltas(src, src, base), deltas)


def _edit_adapter(d: Path, edit) -> None:
    from adapter_fixtures import read_adapter, write_adapter

    tensors, cfg = read_adapter(d)
    tensors, cfg = edit(tensors, cfg)
    write_adapter(d, tensors, cfg)


def _copy_dir(src: Path, tmp: Path) -> Path:
    out = tmp / (src.name + "-copy")
    shutil.copytree(src, out)
    return out


GU_B = "base_model.model.model.layers.1.mlp.experts.4.up_proj.lora_B.weight"


@pytest.mark.parametrize("case", ["expert_factor", "peft_expert_minor_column", "alpha", "rank_config",
                                  "attention_scaling", "missing_layer", "config_field", "rslora"])
def test_adapter_verify_catches_wrong_output(adapters, capsys, tmp_path, case):
    src, good, base, _ = adapters["shared" if case == "missing_layer" else "per_expert"]
    if case == "peft_expert_minor_column":
        src, good, base, _ = adapters["per_expert->peft"]
    dst = _copy_dir(good, tmp_path)
    if case == "expert_factor":
        _edit_adapter(dst, lambda t, c: ({**t, GU_B: t[GU_B] * 1.01}, c))
        expect = [GU_B, "expert 4", "up", "not allclose"]
    elif case == "peft_expert_minor_column":
        key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"  # gate_up wrapper, [2I, r*E]

        def swap(t, c):  # swap experts 1 and 3 within one rank column block of the expert-minor B
            b = t[key].clone()
            b[:, [1, 3]] = b[:, [3, 1]]
            return {**t, key: b}, c
        _edit_adapter(dst, swap)
        expect = [key, "expert 1", "expert 3"]
    elif case == "alpha":
        _edit_adapter(dst, lambda t, c: (t, {**c, "lora_alpha": c["lora_alpha"] * 2}))
        expect = ["expert 0", "not allclose", "q_proj (r, scaling)"]
    elif case == "rank_config":
        _edit_adapter(dst, lambda t, c: (t, {**c, "r": 8, "lora_alpha": 16}))  # same scaling, wrong rank
        expect = ["has rank 4, but adapter_config.json gives", "r=8"]
    elif case == "attention_scaling":
        _edit_adapter(dst, lambda t, c: (t, {**c, "alpha_pattern": {**c["alpha_pattern"], "q_proj": 1}}))
        expect = ["module model.layers.0.self_attn.q_proj (r, scaling)"]
    elif case == "missing_layer":
        _edit_adapter(dst, lambda t, c: ({k: v for k, v in t.items() if ".layers.1.mlp.experts" not in k}, c))
        expect = ["the expert LoRA of model.layers.1", "is missing"]
    elif case == "config_field":
        _edit_adapter(dst, lambda t, c: (t, {**c, "task_type": "SEQ_CLS"}))
        expect = ["task_type is 'SEQ_CLS', the source has 'CAUSAL_LM'"]
    else:
        _edit_adapter(dst, lambda t, c: (t, {**c, "use_rslora": True}))
        # use_rslora may be rewritten (a target without rsLoRA gets false and rescaled B): the deltas catch it
        expect = ["not allclose"]
    code, _, text = report(capsys, src, dst, tmp_path, "--base-config", str(base))
    assert code == 1, text
    for s in expect:
        assert s in text, f"{s!r} not in:\n{text}"


def test_adapter_verify_of_real_peft_gpt_oss_split_under_torchrun(tmp_path):
    """A real peft target_parameters adapter on gpt-oss (interleaved gate/up), split at 2 ranks with --verify;
    the verifier's reading of the peft source equals peft's own get_delta_weight."""
    from adapter_fixtures import base_config, make_peft_adapter, peft_expert_deltas

    model, src = make_peft_adapter("gpt_oss", tmp_path / "peft", seed=3)
    (tmp_path / "base.json").write_text(json.dumps(base_config("gpt_oss")))
    _same_deltas(_relation_deltas(src, src, tmp_path / "base.json"), peft_expert_deltas(model, "gpt_oss"))
    proc = run_tool("convert.split_adapter", "--src", str(src), "--dst", str(tmp_path / "split"), "--verify",
                    "--base-config", str(tmp_path / "base.json"), "--ep", "3", "--target", "per-expert", nproc=2,
                    timeout=120)
    assert "OK:" in proc.stdout and "peft_target_parameters -> per_expert" in proc.stdout


def test_verify_memory_stays_flat_as_the_checkpoint_grows(tmp_path):
    """Peak RSS of the verifier does not grow with the checkpoint: one expert slice (or chunk) at a time.

    Synthetic fused Qwen3-30B-A3B-shaped layers (sparse zero files, written instantly), verified
    against themselves: every expert is read as a slice of the fused [E, 2I, H] / [E, H, I] tensors.
    """
    from bench.synthetic import Spec, checkpoint_specs, write_synthetic

    peaks, sizes = {}, {}
    for layers in (1, 4):
        specs, cfg = checkpoint_specs("qwen3-30b-a3b", layers, experts=8, vocab=64)
        specs = [s for s in specs if ".experts." not in s.name]
        for layer in range(layers):
            p = f"model.layers.{layer}.mlp.experts"
            specs += [Spec(f"{p}.gate_up_proj", "BF16", (8, 2 * 768, 2048)), Spec(f"{p}.down_proj", "BF16", (8, 2048, 768))]
        d = tmp_path / f"fused{layers}"
        sizes[layers] = write_synthetic(str(d), specs, cfg, 100_000_000, data="zeros")
        run_tool("convert.verify", "--src", str(d), "--dst", str(d), "--report", str(tmp_path / f"r{layers}.json"))
        rep = json.loads((tmp_path / f"r{layers}.json").read_text())
        assert rep["ok"] and rep["bytes_compared"] == 2 * sizes[layers] and rep["experts_checked"] == 8 * layers
        peaks[layers] = rep["ranks"][0]["peak_rss_bytes"]
    grown = peaks[4] - peaks[1]
    print(f"verify peak RSS: {peaks[1] / 1e6:.0f} MB for {2 * sizes[1] / 1e6:.0f} MB compared, "
          f"{peaks[4] / 1e6:.0f} MB for {2 * sizes[4] / 1e6:.0f} MB")
    assert grown < 32e6, f"peak RSS grew by {grown / 1e6:.0f} MB when the checkpoint grew by {(sizes[4] - sizes[1]) / 1e6:.0f} MB"


def test_verify_reads_s3_through_ranged_gets(ckpts, capsys, tmp_path, monkeypatch):
    """fuse local -> S3 with --verify (moto's real S3 endpoint), then a one-byte corruption of the S3 object is caught."""
    from s3_server import CREDENTIALS, MotoServer

    server = MotoServer()
    try:
        for k, v in CREDENTIALS.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.url}, key="testing", secret="testing")
        fs.mkdir("verify-test")
        dst = "s3://verify-test/fused"
        assert call(fuse_experts.main, "--src", str(ckpts / "gsrc"), "--dst", dst, "--no-progress", "--verify") == 0
        assert "OK:" in capsys.readouterr().out
        (shard,) = [p for p in fs.ls(dst, detail=False) if p.endswith(".safetensors")]
        local = tmp_path / "shard.safetensors"
        local.write_bytes(fs.cat_file(shard))
        gu = "model.layers.1.mlp.experts.gate_up_proj"
        raw = bytearray(local.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        begin, end = json.loads(raw[8 : 8 + n])[gu]["data_offsets"]
        raw[8 + n + begin + 2 * (end - begin) // E + 1] ^= 0x40  # expert 2, first element
        fs.pipe_file(shard, bytes(raw))
        code = call(verify.main, "--src", str(ckpts / "gsrc"), "--dst", dst)
        text = capsys.readouterr().out
        assert code == 1 and f"MISMATCH {gu} expert 2: gate" in text, text
    finally:
        server.stop()


# ----------------------------------------------------------------------------- fast paths (memcmp, cast blocks, threads)


def _element_byte(d: Path, tensor: str, index: tuple[int, ...], itemsize: int = 2) -> int:
    """Byte offset (within `tensor`'s data) of the high byte of the element at `index` of its stored shape."""
    shard, start, _ = _locate(d, tensor)
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    shape = json.loads(raw[8 : 8 + n])[tensor]["shape"]
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat * itemsize + itemsize - 1


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory):
    """Larger experts (qwen3 E=6, H=256, I=384: 576 KB each) fused bf16, fused fp16 (a cast), and gpt-oss bf16
    fused (transposed, gate/up interleaved) with the dtype kept: byte copies, casts and strided byte copies."""
    root = tmp_path_factory.mktemp("long")
    t, cfg = example_tensors("qwen3_moe", 1, 6, 256, 384, seed=4)
    write_checkpoint(t, cfg, str(root / "src"), 10**9)
    g, gcfg = example_tensors("gpt_oss", 1, 4, 128, 96, seed=5)
    write_checkpoint(g, gcfg, str(root / "gsrc"), 10**9)
    for src, dst, extra in (("src", "fused", ()), ("src", "fp16", ("--dtype", "fp16")), ("gsrc", "gfused", ())):
        assert call(fuse_experts.main, "--src", str(root / src), "--dst", str(root / dst), "--no-progress", *extra) == 0
    return root


LONG_GU = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("workers", ["1", "3"])
@pytest.mark.parametrize("case", ["fused_expert", "per_expert_side", "pass_chunk", "transposed", "two_experts"])
def test_fast_compare_finds_one_flipped_bit_in_a_long_run(long_runs, capsys, tmp_path, monkeypatch, case, workers):
    """One bit flipped in the middle of a long byte-copy run (one memcmp of a whole expert role, a middle chunk of a
    pass-through tensor, a strided block of a transposed expert) is found, with tensor, expert, role and element."""
    from convert.verify import checks as verify_checks

    monkeypatch.setattr(verify_checks, "CHUNK_BYTES", 16 << 10)  # embed [256, 256] bf16: 8 chunks
    monkeypatch.setattr(verify_checks, "BLOCK_BYTES", 8 << 10)  # a transposed [96, 128] role: several blocks
    if case == "per_expert_side":  # the source is the per-expert side: verify fused -> per-expert copy of src
        src, d = long_runs / "fused", _copy(long_runs, "src", tmp_path)
        key = "model.layers.0.mlp.experts.4.down_proj.weight"
        _flip(d, key, _element_byte(d, key, (131, 200)), 0x01)
        expect = [f"{key} expert 4: down (source {LONG_GU.replace('gate_up', 'down')}): bytes differ "
                  "(first at [131, 200])"]
    elif case == "transposed":
        src, d = long_runs / "gsrc", _copy(long_runs, "gfused", tmp_path)
        # gate_up_proj [E, H, 2I]: element [h, 2i + 1] of expert 2 is up[i, h]
        _flip(d, LONG_GU, _element_byte(d, LONG_GU, (2, 70, 2 * 45 + 1)), 0x01)
        expect = [f"{LONG_GU} expert 2: up (source model.layers.0.mlp.experts.2.up_proj.weight): bytes differ "
                  "(first at [45, 70])"]
    else:
        src, d = long_runs / "src", _copy(long_runs, "fused", tmp_path)
        if case == "pass_chunk":
            _flip(d, "model.embed_tokens.weight", _element_byte(d, "model.embed_tokens.weight", (161, 99)), 0x01)
            expect = ["model.embed_tokens.weight: bytes differ (first at [161, 99])"]
        else:  # gate_up_proj [E, 2I, H]: row I + r of expert e is up[r]
            _flip(d, LONG_GU, _element_byte(d, LONG_GU, (3, 384 + 190, 128)), 0x01)
            expect = [f"{LONG_GU} expert 3: up (source model.layers.0.mlp.experts.3.up_proj.weight): bytes differ "
                      "(first at [190, 128])"]
            if case == "two_experts":  # and one in expert 1: reported first, in expert order, whatever the threads
                _flip(d, LONG_GU, _element_byte(d, LONG_GU, (1, 5, 7)), 0x01)
                expect.insert(0, f"{LONG_GU} expert 1: gate (source model.layers.0.mlp.experts.1.gate_proj.weight): "
                                 "bytes differ (first at [5, 7])")
    code, rep, text = report(capsys, src, d, tmp_path, "--workers", workers)
    assert code == 1, text
    assert rep["mismatches"] == len(expect), text
    lines = [line for line in text.splitlines() if "MISMATCH" in line]
    for line, want in zip(lines, expect):
        assert want in line and "max abs diff" in line, f"{want!r} not in {line!r}"


@pytest.mark.parametrize("case", ["scaled", "one_ulp", "overflow", "exact"])
def test_cast_output_checked_at_the_narrower_precision(long_runs, capsys, tmp_path, case):
    """bf16 -> fp16: an output cast as torch casts passes at once; one element scaled by 1.05 is found (tensor,
    expert, role, element); one element a ulp off (another rounding) still passes, as allclose at bf16 precision
    says; a value beyond fp16's range that became inf is found, though inf is what the cast gives."""
    src = long_runs / "src"
    if case == "overflow":
        src = _copy(long_runs, "src", tmp_path)
        key = "model.layers.0.mlp.experts.5.gate_proj.weight"
        _edit_shard(src, key, lambda t: {**t, key: t[key].index_put_((torch.tensor([17]), torch.tensor([3])),
                                                                      torch.tensor(1e5, dtype=torch.bfloat16))})
        d = tmp_path / "ovf16"
        assert call(fuse_experts.main, "--src", str(src), "--dst", str(d), "--no-progress", "--dtype", "fp16") == 0
        expect = [f"{LONG_GU} expert 5: gate", "not allclose", "bfloat16 -> float16", "first at [17, 3]", "inf"]
    else:
        d = _copy(long_runs, "fp16", tmp_path)
        if case != "exact":
            def edit(t):
                x = t[LONG_GU].clone()
                v = x[4, 384 + 100, 33]
                one_ulp = torch.nextafter(v, torch.tensor(1.0, dtype=v.dtype))
                x[4, 384 + 100, 33] = v * 1.05 if case == "scaled" else one_ulp
                return {**t, LONG_GU: x}
            _edit_shard(d, LONG_GU, edit)
        expect = [f"{LONG_GU} expert 4: up", "not allclose", "bfloat16 -> float16", "first at [100, 33]"]
    code, rep, text = report(capsys, src, d, tmp_path)
    if case in ("one_ulp", "exact"):
        assert code == 0 and rep["ok"], text
        return
    assert code == 1 and rep["mismatches"] == 1, text
    for s in expect:
        assert s in text, f"{s!r} not in:\n{text}"


def test_compare_fast_paths_agree_with_elementwise_comparison():
    """compare() on contiguous, transposed and interleaved views, same dtype and cast, with and without one differing
    element anywhere: a difference is always found at the right index, equal data always passes."""
    from convert.verify import checks as verify_checks
    from convert.verify.checks import compare

    g = torch.Generator().manual_seed(0)
    base = (torch.randn(48, 80, generator=g) * 0.02).to(torch.float32)
    old = verify_checks.BLOCK_BYTES
    verify_checks.BLOCK_BYTES = 1024  # many blocks
    try:
        for dst_dtype in (torch.float32, torch.bfloat16, torch.float16):
            want = base.to(dst_dtype)
            layouts = {
                "contiguous": lambda x: x,
                "transposed": lambda x: x.T.contiguous().T,  # same values, column-major storage
                "interleaved": lambda x: torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., 0::2],
            }
            for name, lay in layouts.items():
                b = lay(want)
                assert torch.equal(b, want) and (name == "contiguous") == b.is_contiguous()
                what, _ = compare(base, b)
                assert what is None, (name, dst_dtype, what)
                for r, c in ((0, 0), (23, 41), (47, 79)):
                    bad = want.clone()
                    bad[r, c] = -bad[r, c] * 2 - 1  # far off, at any precision
                    what, _ = compare(base, lay(bad))
                    assert what and f"first at [{r}, {c}]" in what, (name, dst_dtype, r, c, what)
    finally:
        verify_checks.BLOCK_BYTES = old


def test_base_relations_stream_and_adapter_relations_do_not(ckpts, adapters):
    """Base-weight expert checks read into reused buffers and run on parallel threads (`streaming`); adapter checks
    (derived deltas, a cache of shared factors) do not."""
    from convert.verify.run import VerifyOptions, plan_verify

    base = plan_verify(VerifyOptions(str(ckpts / "src"), str(ckpts / "fused")))
    assert base.experts and all(c.streaming for c in base.experts)
    src, dst, cfg, _ = adapters["shared"]
    rel = plan_verify(VerifyOptions(str(src), str(dst), base_config=str(cfg)))
    assert rel.experts and not any(c.streaming for c in rel.experts)


def test_verify_threads_and_memory_are_bounded(tmp_path, monkeypatch):
    """Threads per rank are --workers, fewer where a memory budget (MOE_CONVERT_VERIFY_MEMORY) would be exceeded;
    peak RSS grows by at most one expert pair (plus scratch blocks) per extra thread, not with the data."""
    from bench.synthetic import Spec, checkpoint_specs, write_synthetic
    from convert.verify.checks import BLOCK_BYTES
    from convert.verify.run import worker_threads

    specs, cfg = checkpoint_specs("qwen3-30b-a3b", 2, experts=8, vocab=64)
    specs = [s for s in specs if ".experts." not in s.name]
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        specs += [Spec(f"{p}.gate_up_proj", "BF16", (8, 2 * 768, 2048)), Spec(f"{p}.down_proj", "BF16", (8, 2048, 768))]
    d = tmp_path / "fused"
    size = write_synthetic(str(d), specs, cfg, 100_000_000, data="zeros")
    item = 2 * 3 * 768 * 2048 * 2  # one expert, both sides
    assert worker_threads(4, item) == 4 and worker_threads(4, item, budget=3 * item) == 2
    assert worker_threads(4, item, budget=1) == 1
    runs = {}
    # a thread holds one group of an expert's roles (gate+up: 2/3 of `item`) plus scratch: `item` fits one, not two
    for name, workers, budget in (("one", "1", None), ("four", "4", None), ("budget", "4", str(item))):
        if budget:
            monkeypatch.setenv("MOE_CONVERT_VERIFY_MEMORY", budget)
        run_tool("convert.verify", "--src", str(d), "--dst", str(d), "--workers", workers,
                 "--report", str(tmp_path / f"{name}.json"))
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert runs[name]["ok"] and runs[name]["bytes_compared"] == 2 * size
    assert [runs[n]["ranks"][0]["threads"] for n in ("one", "four", "budget")] == [1, 4, 1]
    grown = runs["four"]["ranks"][0]["peak_rss_bytes"] - runs["one"]["ranks"][0]["peak_rss_bytes"]
    bound = 3 * (item + 4 * BLOCK_BYTES) + (32 << 20)
    print(f"verify peak RSS: 1 thread {runs['one']['ranks'][0]['peak_rss_bytes'] / 1e6:.0f} MB, 4 threads "
          f"{runs['four']['ranks'][0]['peak_rss_bytes'] / 1e6:.0f} MB (bound on the growth {bound / 1e6:.0f} MB)")
    assert grown <= bound, f"4 threads took {grown / 1e6:.0f} MB more than 1 (bound {bound / 1e6:.0f} MB)"


def test_an_expert_is_compared_in_groups_of_roles_no_stored_tensor_splits(ckpts, adapters):
    """A thread holds one group of an expert's roles of both sides at a time (the roles of one fused tensor and
    the per-expert tensors they come from), not the whole expert: more threads fit the memory budget. The groups
    cover every role once and every byte of the expert; adapter checks (not streaming) stay whole."""
    from convert.verify.checks import role_groups
    from convert.verify.run import VerifyOptions, plan_verify

    for src, dst in (("src", "fused"), ("fused", "split"), ("gsrc", "gfused")):
        rel = plan_verify(VerifyOptions(str(ckpts / src), str(ckpts / dst)))
        for check in rel.experts:
            groups = role_groups(check)
            roles = [r for g in groups for r in g]
            assert sorted(roles) == sorted(set(roles)) and len(groups) >= 2, (src, dst, groups)
            for e in range(check.num_experts):
                sizes = [check.item_bytes(e, g) for g in groups]
                assert sum(sizes) == check.item_bytes(e) and max(sizes) < check.item_bytes(e)
    # qwen3_moe fused: gate and up share gate_up_proj, down is alone
    rel = plan_verify(VerifyOptions(str(ckpts / "src"), str(ckpts / "fused")))
    assert role_groups(rel.experts[0]) == [("down",), ("gate", "up")]
    s, d, cfg, _ = adapters["shared"]
    rel = plan_verify(VerifyOptions(str(s), str(d), base_config=str(cfg)))
    assert all(role_groups(c) == [None] for c in rel.experts)


def test_pass_through_chunks_hold_no_more_than_the_largest_expert_item():
    """A pass-through tensor's chunks (both sides) stay within the largest expert item, down to 1 MiB a side, so
    the threads the memory budget allows are set by the experts (Qwen3-30B-A3B: 16, not 11, in 256 MiB)."""
    from convert.verify.checks import CHUNK_BYTES, MIN_CHUNK_BYTES, PassCheck, chunk_bytes, pass_chunks
    from convert.verify.run import worker_threads
    from convert.verify.tables import Stored

    n = 32000 * 2048  # a Qwen-sized embedding, bf16 on both sides
    check = PassCheck(Stored("e", "a", "BF16", (32000, 2048), 0, 2 * n), Stored("e", "b", "BF16", (32000, 2048), 0, 2 * n))
    group = 2 * 2 * 768 * 2048 * 2  # gate+up of one expert, both sides
    for cap, most in ((None, 2 * CHUNK_BYTES), (group, group), (1000, 2 * MIN_CHUNK_BYTES)):
        chunks = pass_chunks(check, cap)
        assert chunks[0][0] == 0 and chunks[-1][1] == n and all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
        assert max(chunk_bytes(check, a, b) for a, b in chunks) == most
    budget = 256 << 20
    assert worker_threads(16, max(group, 2 * CHUNK_BYTES), budget) == 12 and worker_threads(16, group, budget) == 16
