"""Peak RSS per rank stays flat when the checkpoint doubles (2 real ranks, multi-GB synthetic checkpoints)."""

from __future__ import annotations

import json

import pytest

from bench.synthetic import checkpoint_specs, write_synthetic
from helpers import run_tool


def _peak_rss(tmp_path, layers: int, extra: list[str]) -> tuple[int, list[int]]:
    src, dst = tmp_path / f"src{layers}", tmp_path / f"dst{layers}"
    specs, config = checkpoint_specs("qwen3-30b-a3b", layers, vocab=32000)  # real E, H, I of Qwen3-30B-A3B
    total = write_synthetic(str(src), specs, config, 2_000_000_000)  # sparse: no disk cost to create
    stats = tmp_path / f"stats{layers}.json"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(dst), "--stats", str(stats), *extra, nproc=2)
    ranks = json.loads(stats.read_text())["ranks"]
    for p in sorted(dst.glob("*.safetensors")):  # free the disk; the rest is small
        p.unlink()
    assert sum(r["written_bytes"] for r in ranks) >= total
    return total, [r["peak_rss_bytes"] for r in ranks]


def _check_flat(tmp_path, small: int, extra: list[str]) -> None:
    size1, rss1 = _peak_rss(tmp_path, small, extra)
    size2, rss2 = _peak_rss(tmp_path, 2 * small, extra)
    print(f"\n{extra or 'byte copy'}: {size1 / 1e9:.2f} GB -> peak RSS/rank {[r >> 20 for r in rss1]} MiB; "
          f"{size2 / 1e9:.2f} GB -> {[r >> 20 for r in rss2]} MiB")
    assert size2 > 1.7 * size1
    assert max(rss2) <= max(rss1) * 1.10 + (16 << 20), "peak RSS grew with the checkpoint"
    assert max(rss2) < 700 << 20, "peak RSS per rank above the 700 MiB bound"


# The default run keeps the byte copy (1.2 -> 2.4 GB); the cast is as heavy (> 1 GB written) and runs with -m slow.
@pytest.mark.parametrize("extra", [[], pytest.param(["--dtype", "fp16"], marks=pytest.mark.slow)], ids=["byte-copy", "cast"])
def test_peak_rss_flat_when_checkpoint_doubles(tmp_path, extra):
    _check_flat(tmp_path, 1, extra)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--dtype", "fp16"]], ids=["byte-copy", "cast"])
def test_peak_rss_flat_large(tmp_path, extra):
    _check_flat(tmp_path, 2, extra)
