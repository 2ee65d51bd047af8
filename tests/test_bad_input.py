"""Bad input battery: every malformed source is refused with a message naming the file, the tensor and what was
expected, exit code 2, and no output that could be mistaken for a result (no index, no complete-looking shard)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import fuse_experts, split_experts
from convert.example import example_tensors, write_checkpoint
from convert.formats.safetensors import MAX_HEADER_BYTES
from convert.io.storage import Storage
from helpers import run_tool

INDEX = "model.safetensors.index.json"
E = 5
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


def call(main, *argv: str) -> int:
    """Run an entry point's main() in this process (world size 1); returns its exit code."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code or 0)


def make_src(path: Path) -> Path:
    """A per-expert qwen3_moe checkpoint (2 layers, E=5) in several shards with an index."""
    tensors, cfg = example_tensors("qwen3_moe", 2, E, 32, 24, seed=7)
    write_checkpoint(tensors, cfg, str(path), 20_000)
    return path


def shard_of(src: Path, tensor: str) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][tensor]


def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def edit_header(src: Path, tensor: str, edit) -> Path:
    """Apply edit(header) to the header of the shard holding `tensor`; returns that shard."""
    shard = shard_of(src, tensor)
    header, data = read_raw(shard)
    edit(header)
    write_raw(shard, header, data)
    return shard


def edit_tensors(src: Path, tensor: str, edit) -> Path:
    """Rewrite the shard holding `tensor` through edit(tensors) -> tensors (the index left as it was)."""
    shard = shard_of(src, tensor)
    save_file(edit(load_file(shard)), shard, metadata={"format": "pt"})
    return shard


def edit_index(src: Path, edit) -> None:
    index = json.loads((src / INDEX).read_text())
    edit(index)
    (src / INDEX).write_text(json.dumps(index))


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def break_source(case: str, src: Path, tmp: Path) -> list[str]:
    """Damage `src` as `case` says; returns what the error message must contain (file, tensor, expectation)."""
    if case == "truncated_shard":
        shard = shard_of(src, EXPERT)
        header, _ = read_raw(shard)
        os.truncate(shard, shard.stat().st_size - 10)
        return [str(shard), repr(last_tensor(header)), "truncated file?"]
    if case == "header_length_beyond_file":
        shard = shard_of(src, EXPERT)
        raw = bytearray(shard.read_bytes())
        raw[:8] = struct.pack("<Q", len(raw) + 100)
        shard.write_bytes(bytes(raw))
        return [str(shard), f"header length {len(raw) + 100} runs past the end of the {len(raw)}-byte file"]
    if case == "header_json_invalid":
        shard = shard_of(src, EXPERT)
        raw = bytearray(shard.read_bytes())
        raw[8] = ord("[")
        shard.write_bytes(bytes(raw))
        return [str(shard), "safetensors header is not valid JSON"]
    if case == "offsets_overlap":
        other = {}

        def overlap(h: dict) -> None:
            names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
            a = next(k for k in names if k != EXPERT and h[k]["data_offsets"][1] - h[k]["data_offsets"][0]
                     == h[EXPERT]["data_offsets"][1] - h[EXPERT]["data_offsets"][0])
            other["name"] = a
            h[EXPERT]["data_offsets"] = list(h[a]["data_offsets"])

        shard = edit_header(src, EXPERT, overlap)
        return [str(shard), repr(EXPERT), repr(other["name"]), "overlap in the file"]
    if case == "offsets_outside_file":
        shard = shard_of(src, EXPERT)
        size = len(read_raw(shard)[1])
        n = 24 * 32 * 2
        edit_header(src, EXPERT, lambda h: h[EXPERT].update(data_offsets=[size - n // 2, size + n // 2]))
        return [str(shard), repr(EXPERT), "but the file has only"]
    if case == "offsets_disagree_with_shape":
        shard = edit_header(src, EXPERT, lambda h: h[EXPERT].update(shape=[24, 31]))
        return [str(shard), repr(EXPERT), "but BF16 [24, 31] needs 1488"]
    if case == "dtype_unknown":
        shard = edit_header(src, EXPERT, lambda h: h[EXPERT].update(dtype="F12"))
        return [str(shard), repr(EXPERT), "unknown dtype 'F12' (expected one of ['BF16'"]
    if case == "index_missing_shard":
        edit_index(src, lambda i: i["weight_map"].update({EXPERT: "model-00009-of-00009.safetensors"}))
        return [str(src / INDEX), "names shard 'model-00009-of-00009.safetensors', which does not exist"]
    if case in ("index_dotdot", "index_absolute"):
        evil = tmp / "evil.safetensors"
        save_file({EXPERT: torch.zeros(24, 32, dtype=torch.bfloat16)}, evil)
        path = "../evil.safetensors" if case == "index_dotdot" else str(evil)
        edit_index(src, lambda i: i["weight_map"].update({EXPERT: path}))
        return [str(src / INDEX), f"refusing shard path {path!r} for tensor {EXPERT!r}", "inside the checkpoint directory"]
    if case == "index_not_a_name":
        edit_index(src, lambda i: i["weight_map"].update({EXPERT: 7}))
        return [str(src / INDEX), f"refusing shard path 7 for tensor {EXPERT!r}"]
    if case == "index_without_weight_map":
        (src / INDEX).write_text(json.dumps({"metadata": {}}))
        return [str(src / INDEX), "has no weight_map object"]
    if case == "index_names_wrong_shard":
        shards = sorted(p.name for p in src.glob("model-*.safetensors"))
        wrong = next(s for s in shards if s != shard_of(src, EXPERT).name)
        edit_index(src, lambda i: i["weight_map"].update({EXPERT: wrong}))
        return [str(src / INDEX), repr(EXPERT), f"to {wrong} but it is in"]
    if case in ("tensor_listed_twice", "tensor_listed_twice_no_index"):
        home = shard_of(src, EXPERT)
        other = next(p for p in sorted(src.glob("model-*.safetensors")) if p != home)
        save_file({**load_file(other), EXPERT: load_file(home)[EXPERT]}, other, metadata={"format": "pt"})
        if case.endswith("no_index"):
            (src / INDEX).unlink()
        first, second = sorted([home.name, other.name])
        return [str(src / second), repr(EXPERT), f"also in {first}", "listed twice"]
    if case == "missing_expert":
        edit_tensors(src, EXPERT, lambda t: {k: v for k, v in t.items() if k != EXPERT})
        edit_index(src, lambda i: i["weight_map"].pop(EXPERT))
        return [str(src), repr(EXPERT), "missing expert 3 of model.layers.1", "expected 5 experts"]
    if case == "experts_different_shapes":
        shard = edit_tensors(src, EXPERT, lambda t: {**t, EXPERT: torch.zeros(25, 32, dtype=torch.bfloat16)})
        return [str(shard), repr(EXPERT), "BF16 [25, 32]", "expert 0 of model.layers.1 has BF16 [24, 32]"]
    return break_config(case, src)


def break_config(case: str, src: Path) -> list[str]:
    """break_source's cases of a damaged config.json."""
    if case == "config_without_num_experts":
        cfg = json.loads((src / "config.json").read_text())
        del cfg["num_experts"]
        (src / "config.json").write_text(json.dumps(cfg))
        return [str(src / "config.json"), "has none of ['num_experts', 'n_routed_experts', 'num_local_experts']"]
    if case == "config_not_an_object":
        (src / "config.json").write_text("[1, 2]")
        return [str(src / "config.json"), "expected a JSON object, got list"]
    raise ValueError(case)


CASES = [
    "truncated_shard", "header_length_beyond_file", "header_json_invalid", "offsets_overlap", "offsets_outside_file",
    "offsets_disagree_with_shape", "dtype_unknown", "index_missing_shard", "index_dotdot", "index_absolute",
    "index_not_a_name", "index_without_weight_map", "index_names_wrong_shard", "tensor_listed_twice",
    "tensor_listed_twice_no_index", "missing_expert", "experts_different_shapes", "config_without_num_experts",
    "config_not_an_object",
]


def assert_nothing_complete(dst: Path) -> None:
    """No index and no shard under its final name: nothing a user could mistake for a result."""
    if dst.exists():
        assert not (dst / INDEX).exists()
        assert not list(dst.glob("*.safetensors")), sorted(p.name for p in dst.iterdir())


@pytest.mark.parametrize("case", CASES)
def test_bad_source_is_refused_before_writing(case, tmp_path, capsys):
    src = make_src(tmp_path / "src")
    expect = break_source(case, src, tmp_path)
    dst = tmp_path / "out"
    code = call(fuse_experts.main, "--src", str(src), "--dst", str(dst), "--no-progress")
    err = capsys.readouterr().err
    assert code == 2, err
    for s in expect:
        assert s in err, f"{s!r} not in {err!r}"
    assert not dst.exists(), "a refused job must not create its destination"


def test_fused_source_with_wrong_expert_count_is_refused(tmp_path, capsys):
    src = make_src(tmp_path / "src")
    assert call(fuse_experts.main, "--src", str(src), "--dst", str(tmp_path / "fused"), "--no-progress") == 0
    fused = tmp_path / "fused"
    gu = "model.layers.0.mlp.experts.gate_up_proj"
    shard = edit_tensors(fused, gu, lambda t: {**t, gu: t[gu][:4].contiguous()})
    code = call(split_experts.main, "--src", str(fused), "--dst", str(tmp_path / "out"), "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and str(shard) in err and repr(gu) in err and "expected dim 0 = 5 experts" in err, err
    assert not (tmp_path / "out").exists()


def test_oversized_header_is_never_read(tmp_path, capsys, monkeypatch):
    """A header length above MAX_HEADER_BYTES is refused from its 8-byte prefix: no large read ever happens."""
    src = make_src(tmp_path / "src")
    shard = shard_of(src, EXPERT)
    length = MAX_HEADER_BYTES + 1
    with open(shard, "r+b") as f:  # a sparse file big enough that the length alone is the problem
        f.write(struct.pack("<Q", length))
        f.truncate(length + 1024)
    reads: list[int] = []
    real = Storage.read_range

    def spy(self, rel, start, end):
        reads.append(end - start)
        return real(self, rel, start, end)

    monkeypatch.setattr(Storage, "read_range", spy)
    code = call(fuse_experts.main, "--src", str(src), "--dst", str(tmp_path / "out"), "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and str(shard) in err and f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit" in err
    assert max(reads) < 1 << 20, f"read {max(reads)} bytes at once"
    assert not (tmp_path / "out").exists()


def test_source_truncated_after_planning_leaves_no_complete_output(tmp_path, capsys, monkeypatch):
    """A shard that shrinks between planning and copying: exit 1, message names file and tensor, no index."""
    import convert.engine.job as job

    src = make_src(tmp_path / "src")
    shard = shard_of(src, EXPERT)
    real = job.plan_job

    def plan_then_truncate(opts, dist):
        setup = real(opts, dist)
        os.truncate(shard, len(read_raw(shard)[0]) + 8)  # keep the header, lose the data
        return setup

    monkeypatch.setattr(job, "plan_job", plan_then_truncate)
    dst = tmp_path / "out"
    code = call(fuse_experts.main, "--src", str(src), "--dst", str(dst), "--no-progress")
    err = capsys.readouterr().err
    assert code == 1, err
    assert str(shard) in err and re.search(r"while writing tensor '[^']+'", err), err
    assert f"{dst} is incomplete" in err
    assert_nothing_complete(dst)


@pytest.mark.parametrize("case", ["dtype_unknown", "index_dotdot"])
def test_all_ranks_exit_nonzero_under_torchrun(case, tmp_path):
    src = make_src(tmp_path / "src")
    expect = break_source(case, src, tmp_path)
    dst = tmp_path / "out"
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(dst), nproc=2, check=False, timeout=90)
    assert proc.returncode != 0
    for s in expect:
        assert s in proc.stderr
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert codes and "0" not in codes and "2" in codes, codes
    assert_nothing_complete(dst)
    assert not dst.exists()


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every path under `root` (except below `skip`) with its type, size, mtime and content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        st = p.lstat()
        content = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if content is not None else 0, st.st_mtime_ns, content)
    return out


def test_conversions_write_only_below_dst_and_never_touch_src(tmp_path, capsys):
    """fuse, split and verify leave everything outside their --dst as it was, --src included (bytes and mtimes)."""
    src = make_src(tmp_path / "src")
    (tmp_path / "neighbour.txt").write_text("not yours")
    steps = [
        (fuse_experts.main, src, tmp_path / "fused"),
        (split_experts.main, tmp_path / "fused", tmp_path / "back"),
    ]
    for main, a, b in steps:
        before = snapshot(tmp_path)
        assert call(main, "--src", str(a), "--dst", str(b), "--no-progress", "--verify") == 0
        assert snapshot(tmp_path, skip=b) == before, f"{main.__module__} wrote outside {b}"
        assert (b / INDEX).is_file()
    from convert.verify import run as verify

    before = snapshot(tmp_path)
    assert call(verify.main, "--src", str(src), "--dst", str(tmp_path / "back")) == 0
    assert snapshot(tmp_path) == before, "verify must not write anything"
    capsys.readouterr()


@pytest.mark.parametrize("shard_path", ["../evil.safetensors", "../src-evil/model.safetensors", "ABSOLUTE"])
def test_index_naming_a_file_outside_src_reads_and_writes_nothing(tmp_path, capsys, shard_path):
    src = make_src(tmp_path / "src")
    evil = tmp_path / "evil.safetensors"
    save_file({EXPERT: torch.zeros(24, 32, dtype=torch.bfloat16)}, evil)
    (tmp_path / "src-evil").mkdir()
    save_file({EXPERT: torch.zeros(24, 32, dtype=torch.bfloat16)}, tmp_path / "src-evil" / "model.safetensors")
    path = str(evil) if shard_path == "ABSOLUTE" else shard_path
    edit_index(src, lambda i: i["weight_map"].update({EXPERT: path}))
    before = snapshot(tmp_path)
    for main in (fuse_experts.main, split_experts.main):
        code = call(main, "--src", str(src), "--dst", str(tmp_path / "out"), "--no-progress")
        assert code == 2 and f"refusing shard path {path!r}" in capsys.readouterr().err
    from convert.verify import run as verify

    code = call(verify.main, "--src", str(src), "--dst", str(tmp_path / "src-evil"))
    assert code == 2 and f"{path!r}" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- adapters


def _adapter_config() -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}


@pytest.mark.parametrize("case, expect", [
    ("config_only", ["holds only adapter_config.json", "nothing to convert"]),
    ("bin_only", ["no safetensors file, only adapter_model.bin", "save them as safetensors first"]),
    ("zero_tensors", ["adapter_model.safetensors holds 0 tensors", "nothing to convert"]),
    ("zero_bytes", ["adapter_model.safetensors: 0 bytes is too short to be a safetensors file"]),
    ("empty_dir", ["no weight files (empty directory)"]),
])
@pytest.mark.parametrize("tool", ["split_adapter", "fuse_adapter"])
def test_adapter_without_usable_safetensors_is_refused(tmp_path, capsys, case, expect, tool):
    import importlib

    src = tmp_path / "adapter"
    src.mkdir()
    if case != "empty_dir":
        (src / "adapter_config.json").write_text(json.dumps(_adapter_config()))
    if case == "bin_only":
        torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, src / "adapter_model.bin")
    elif case == "zero_tensors":
        save_file({}, src / "adapter_model.safetensors")
    elif case == "zero_bytes":
        (src / "adapter_model.safetensors").write_bytes(b"")
    dst = tmp_path / "out"
    extra = ["--layout", "peft"] if tool == "fuse_adapter" else []
    code = call(importlib.import_module(f"convert.{tool}").main, "--src", str(src), "--dst", str(dst), "--no-progress",
                *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(src) in err
    for s in expect:
        assert s in err, f"{s!r} not in {err!r}"
    assert not dst.exists()


def test_adapter_conversions_write_only_below_dst_and_never_touch_src(tmp_path, capsys):
    """split_adapter, fuse_adapter (both with --verify) and verify leave everything outside their --dst as it was."""
    from adapter_fixtures import base_config, make_per_expert_adapter, make_shared_w123_adapter
    from convert import fuse_adapter, split_adapter
    from convert.verify import run as verify

    shared, _ = make_shared_w123_adapter(tmp_path / "shared", experts=E, rank=4)
    per_expert, _ = make_per_expert_adapter(tmp_path / "pe", "qwen3_moe", experts=E, share_gate_up_a=True)
    (tmp_path / "base.json").write_text(json.dumps(base_config(experts=E)))
    base = ["--base-config", str(tmp_path / "base.json")]
    steps = [
        (split_adapter.main, shared, tmp_path / "split", []),
        (fuse_adapter.main, per_expert, tmp_path / "peft", ["--layout", "peft"]),
    ]
    for main, a, b, extra in steps:
        before = snapshot(tmp_path)
        code = call(main, "--src", str(a), "--dst", str(b), "--no-progress", "--verify", *base, *extra)
        assert code == 0, capsys.readouterr()
        assert snapshot(tmp_path, skip=b) == before, f"{main.__module__} wrote outside {b}"
        assert (b / "adapter_config.json").is_file()
    before = snapshot(tmp_path)
    assert call(verify.main, "--src", str(shared), "--dst", str(tmp_path / "split"), *base) == 0
    assert snapshot(tmp_path) == before, "verify must not write anything"
    capsys.readouterr()
