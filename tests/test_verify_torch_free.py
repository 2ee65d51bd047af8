"""Verifying a conversion that only moved bytes imports no torch (seconds of start-up on a real machine).

convert.verify, its --nproc ranks and a conversion's own --verify run in a subprocess whose import
system refuses torch and records every attempt: a byte-copy fuse, split, transposing and interleaving
family (gpt-oss), FP8 experts with their scales and MXFP4 blocks are verified without it, with the
results a run that has torch loaded gives. A cast output (which needs torch) shows the guard works.
The numpy unfusing of every family's fused layouts is checked against torch's.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convert import fuse_experts, split_experts
from convert.example import example_tensors, write_checkpoint
from convert.families import load_families
from convert.verify.base import _part_shape, _part_shapes, _unfuse
from helpers import REPO
from quant_fixtures import write_fp8_experts, write_mxfp4_gpt_oss

# `python -c GUARD module args...`: runs `python -m module args...` with torch refused: each attempt to import it
# is appended to $TORCH_TRIED (forked ranks inherit the guard) and fails.
GUARD = """
import os, runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            with open(os.environ["TORCH_TRIED"], "a") as fh:
                fh.write(f"pid {os.getpid()} imported {name}\\n")
            raise ImportError(f"{name} may not be imported here")
        return None

sys.meta_path.insert(0, NoTorch())
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
# The same with torch imported first (what the verifier did before): the reference results.
WITH_TORCH = "import torch, runpy, sys; module, sys.argv = sys.argv[1], sys.argv[1:]; " \
             "runpy.run_module(module, run_name='__main__', alter_sys=True)"


def call(main, *argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code or 0)


def run(code: str, module: str, *args: str, tried: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCH_TRIED=str(tried or os.devnull))
    return subprocess.run([sys.executable, "-c", code, module, *args, "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def torch_free(module: str, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`python -m module args` with torch refused; asserts it never tried to import it."""
    tried = tmp / "torch-tried.txt"
    tried.unlink(missing_ok=True)
    proc = run(GUARD, module, *args, tried=tried)
    assert not tried.exists(), f"{module} imported torch:\n{tried.read_text()}\n{proc.stdout}\n{proc.stderr}"
    return proc


def stable(report: dict[str, Any]) -> dict[str, Any]:
    """A verify report without what varies from run to run (times, memory)."""
    out = {k: v for k, v in report.items() if k != "seconds"}
    out["ranks"] = [{k: v for k, v in r.items() if k not in ("seconds", "peak_rss_bytes")} for r in report["ranks"]]
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """qwen3_moe bf16 per-expert (several shards) -> fused -> split; gpt_oss (transpose + interleave) -> fused,
    and -> fused bf16 (a cast); FP8 deepseek_v3 experts; MXFP4 gpt-oss as released."""
    root = tmp_path_factory.mktemp("torch_free")
    t, cfg = example_tensors("qwen3_moe", 2, 5, 32, 24, seed=1)
    write_checkpoint(t, cfg, str(root / "src"), 20_000)
    g, gcfg = example_tensors("gpt_oss", 2, 4, 32, 24, seed=2, dtype=torch.float32)
    write_checkpoint(g, gcfg, str(root / "gsrc"), 40_000)
    write_fp8_experts(root / "fp8", E=3, H=256, I=200, layers=2)
    write_mxfp4_gpt_oss(root / "mxfp4", E=3, H=64, I=96, layers=2)
    for main, src, dst, extra in (
        (fuse_experts.main, "src", "fused", ("--max-shard-size", "30KB")), (split_experts.main, "fused", "split", ()),
        (fuse_experts.main, "gsrc", "gfused", ()), (fuse_experts.main, "gsrc", "gcast", ("--dtype", "bf16")),
        (fuse_experts.main, "fp8", "fp8fused", ()), (split_experts.main, "mxfp4", "mxfp4split", ("--allow-unread-layout",)),
    ):
        assert call(main, "--src", str(root / src), "--dst", str(root / dst), "--no-progress", *extra) == 0
    return root


@pytest.mark.parametrize("src, dst", [("src", "fused"), ("fused", "split"), ("src", "split"), ("gsrc", "gfused"),
                                      ("fp8", "fp8fused"), ("mxfp4", "mxfp4split")])
@pytest.mark.parametrize("nproc", [1, 2])
def test_verify_of_moved_bytes_imports_no_torch(ckpts, tmp_path, src, dst, nproc):
    args = ["--src", str(ckpts / src), "--dst", str(ckpts / dst), "--nproc", str(nproc)]
    proc = torch_free("convert.verify", *args, "--report", str(tmp_path / "free.json"), tmp=tmp_path)
    assert proc.returncode == 0 and "OK:" in proc.stdout, proc.stdout + proc.stderr
    free = json.loads((tmp_path / "free.json").read_text())
    assert free["ok"] and free["bytes_compared"] > 0 and free["world_size"] == nproc
    if nproc > 1:
        return
    ref = run(WITH_TORCH, "convert.verify", *args, "--report", str(tmp_path / "ref.json"))
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert stable(free) == stable(json.loads((tmp_path / "ref.json").read_text()))


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_conversions_own_verify_of_moved_bytes_imports_no_torch(ckpts, tmp_path, nproc):
    for module, src in (("convert.fuse_experts", "src"), ("convert.split_experts", "fused")):  # no transposes
        dst = tmp_path / f"{src}-out"
        proc = torch_free(module, "--src", str(ckpts / src), "--dst", str(dst), "--verify", "--nproc", str(nproc),
                          tmp=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (dst / "model.safetensors.index.json").exists()


def test_the_guard_sees_a_cast_import_torch(ckpts, tmp_path):
    """A cast output is checked with torch (lazily imported): under the guard that fails and is recorded, so the
    torch-free results above are not the guard's blind spot; with torch it passes."""
    tried = tmp_path / "tried.txt"
    args = ["--src", str(ckpts / "gsrc"), "--dst", str(ckpts / "gcast")]
    proc = run(GUARD, "convert.verify", *args, tried=tried)
    assert proc.returncode == 2 and tried.exists() and "imported torch" in tried.read_text(), proc.stderr
    ok = run(WITH_TORCH, "convert.verify", *args)
    assert ok.returncode == 0 and "OK:" in ok.stdout, ok.stdout + ok.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_flipped_byte_of_a_byte_copy_is_reported_as_before(ckpts, tmp_path, nproc):
    """A difference in moved bytes is described (first element, max abs diff: torch, imported then) exactly as
    by a run that had torch loaded from the start; exit 1."""
    d = tmp_path / "fused"
    shutil.copytree(ckpts / "gfused", d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.gate_up_proj"
    shard = d / index["weight_map"][name]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    H, I = 32, 24  # float32 [E, H, 2I], gate/up interleaved: element [2, 5, 2 * 7 + 1] is expert 2's up[7, 5]
    raw[8 + n + begin + 4 * (2 * H * 2 * I + 5 * 2 * I + 2 * 7 + 1) + 3] ^= 0x40
    shard.write_bytes(bytes(raw))
    args = ["--src", str(ckpts / "gsrc"), "--dst", str(d), "--nproc", str(nproc)]
    lazy = run("import runpy, sys; module, sys.argv = sys.argv[1], sys.argv[1:]; "
               "runpy.run_module(module, run_name='__main__', alter_sys=True)", "convert.verify", *args,
               "--report", str(tmp_path / "lazy.json"))
    ref = run(WITH_TORCH, "convert.verify", *args, "--report", str(tmp_path / "ref.json"))
    assert lazy.returncode == ref.returncode == 1, lazy.stdout + lazy.stderr
    lines = [line for line in lazy.stdout.splitlines() if "MISMATCH" in line]
    assert lines == [line for line in ref.stdout.splitlines() if "MISMATCH" in line]
    assert len(lines) == 1 and f"{name} expert 2: up" in lines[0] and "bytes differ (first at [7, 5])" in lines[0], lines
    assert "max abs diff" in lines[0]
    rep = json.loads((tmp_path / "lazy.json").read_text())
    assert stable(rep) == stable(json.loads((tmp_path / "ref.json").read_text())) and rep["mismatches"] == 1


def _torch_unfuse(sl: torch.Tensor, ops: list[dict[str, Any]], n_parts: int) -> list[torch.Tensor]:
    """The verifier's unfusing as it was written with torch (the reference)."""
    counts = [n_parts]
    for op in ops:
        counts.append(1 if op["op"] in ("concat", "interleave") else
                      op.get("parts", 2) if op["op"] in ("chunk", "deinterleave") else counts[-1])
    tensors = [sl]
    for op, n_in in zip(reversed(ops), reversed(counts[:-1])):
        kind = op["op"]
        if kind == "transpose":
            tensors = [t.transpose(*op.get("dims", [0, 1])) for t in tensors]
        elif kind in ("concat", "interleave"):
            (t,) = tensors
            dim = op.get("dim", 0 if kind == "concat" else -1) % t.dim()
            size = t.shape[dim] // n_in
            if kind == "concat":
                tensors = [t.narrow(dim, j * size, size) for j in range(n_in)]
            else:
                index = [slice(None)] * t.dim()
                tensors = []
                for j in range(n_in):
                    index[dim] = slice(j, None, n_in)
                    tensors.append(t[tuple(index)])
        else:
            dim = op.get("dim", 0 if kind == "chunk" else -1) % tensors[0].dim()
            if kind == "chunk":
                tensors = [torch.cat(tensors, dim=dim)]
            else:
                tensors = [torch.stack(tensors, dim=dim + 1).flatten(dim, dim + 1)]
    return tensors


def _all_ops() -> list[tuple[list[dict[str, Any]], int]]:
    """Every fused tensor's op list of every family (configs/families), and the ops no family uses yet."""
    found = {json.dumps(t.pipeline.to_json()): (t.pipeline.to_json(), len(t.parts))
             for f in load_families().values() for ts in f.fused.values() for t in ts}
    extra = [([{"op": "concat", "dim": 0}, {"op": "chunk", "dim": 1, "parts": 3}], 2),
             ([{"op": "interleave", "dim": 1}, {"op": "deinterleave", "dim": 0, "parts": 2}], 3),
             ([{"op": "transpose", "dims": [1, 0]}, {"op": "concat", "dim": 1}, {"op": "transpose", "dims": [-1, 0]}], 3),
             ([{"op": "chunk", "dim": -1, "parts": 2}], 1), ([{"op": "deinterleave", "dim": 0, "parts": 3}], 1)]
    return [v for _, v in sorted(found.items())] + extra


@pytest.mark.parametrize("ops, n_parts", _all_ops(), ids=lambda x: json.dumps(x) if isinstance(x, list) else str(x))
def test_numpy_unfusing_gives_what_torch_gave(ops, n_parts):
    """Every layout's parts, unfused with numpy from an expert's bits, are torch's parts element for element; the
    shapes computed from shapes alone are those parts' shapes, and None exactly where torch (meta) failed."""
    for shape in itertools.product((1, 2, 3, 6, 7), repeat=2):
        try:
            want = [tuple(p.shape) for p in _torch_unfuse(torch.empty(shape, device="meta"), ops, n_parts)]
        except (IndexError, RuntimeError, ZeroDivisionError, ValueError):
            want = None
        assert _part_shape(shape, ops, n_parts) == (want[0] if want else None), (shape, ops)
        if want is None:
            continue
        assert _part_shapes(shape, ops, n_parts) == want, (shape, ops)
        bits = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
        got = _unfuse(bits, ops, n_parts)
        ref = _torch_unfuse(torch.from_numpy(bits.view(np.int16)), ops, n_parts)
        assert [g.tolist() for g in got] == [r.view(torch.uint16).tolist() for r in ref], (shape, ops)


@pytest.mark.parametrize("dtype", ["u1", "<u2", "<u4", "<u8"])
def test_bit_comparison_of_strided_views_finds_every_difference(monkeypatch, dtype):
    """The torch-free equality check on contiguous, transposed (gathered in column tiles), interleaved and
    interleaved-transposed views, in many blocks: equal bits pass, one element changed anywhere is found."""
    from convert.verify import checks

    monkeypatch.setattr(checks, "BLOCK_BYTES", 2048)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 250, size=(70, 150)).astype(dtype)
    layouts = {
        "contiguous": lambda x: x,
        "transposed": lambda x: np.ascontiguousarray(x.T).T,
        "interleaved": lambda x: np.stack([x, x + 1], -1).reshape(70, 300)[:, 0::2],
        "interleaved, transposed": lambda x: np.stack([x.T, x.T + 1], -1).reshape(150, 140)[:, 0::2].T,
    }
    for name, lay in layouts.items():
        b = lay(base)
        assert np.array_equal(b, base) and b.flags.c_contiguous == (name == "contiguous")
        assert checks._equal_raw(base, b) and checks._equal_raw(b, base), name
        for r, c in ((0, 0), (69, 149), (33, 64), (34, 63), (1, 128), *rng.integers(0, (70, 150), size=(5, 2))):
            bad = base.copy()
            bad[r, c] ^= 1
            assert not checks._equal_raw(base, lay(bad)) and not checks._equal_raw(lay(bad), base), (name, r, c)
