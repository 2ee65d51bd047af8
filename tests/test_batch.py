"""Batch runner: several jobs, one broken, one already finished; and one job run as two torchrun "nodes"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from convert.example import example_tensors, write_checkpoint
from helpers import REPO, load_dir, raw_bytes, run_tool
from s3_server import free_port


def _make_source(path, seed: int) -> None:
    tensors, cfg = example_tensors("qwen3_moe", layers=2, experts=5, hidden=64, inter=40, seed=seed)
    write_checkpoint(tensors, cfg, str(path), 60_000)


def test_batch_continues_past_a_broken_job(tmp_path):
    _make_source(tmp_path / "a", 1)
    _make_source(tmp_path / "b", 2)
    manifest = {
        "defaults": {"max_shard_size": "100KB"},
        "jobs": [
            {"name": "fuse-a", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "a-fused")},
            {"name": "broken", "kind": "fuse_experts", "src": str(tmp_path / "missing"), "dst": str(tmp_path / "x")},
            {"name": "split-a", "kind": "split_experts", "src": str(tmp_path / "a-fused"), "dst": str(tmp_path / "a-back")},
            {"name": "stacked-b", "kind": "fuse_experts", "layout": "stacked", "src": str(tmp_path / "b"),
             "dst": str(tmp_path / "b-stacked")},
        ],
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    report = tmp_path / "report.json"
    proc = run_tool("launch.batch", str(tmp_path / "m.yaml"), "--report", str(report), nproc=2, check=False)
    assert proc.returncode == 1, proc.stderr
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]}
    assert rows["fuse-a"]["status"] == "done" and rows["split-a"]["status"] == "done"
    assert rows["stacked-b"]["status"] == "done" and rows["stacked-b"]["bytes"] > 0
    assert rows["broken"]["status"] == "failed" and "missing" in rows["broken"]["error"]
    assert "broken" in proc.stdout and "reason:" in proc.stdout
    before, after = load_dir(tmp_path / "a"), load_dir(tmp_path / "a-back")
    assert set(before) == set(after) and all(raw_bytes(before[k]) == raw_bytes(after[k]) for k in before)

    # a second run skips what is finished and fails the broken job again
    proc = run_tool("launch.batch", str(tmp_path / "m.yaml"), "--report", str(report), check=False)
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]}
    assert rows["fuse-a"]["status"].startswith("skipped") and rows["stacked-b"]["status"].startswith("skipped")
    assert rows["broken"]["status"] == "failed"


def test_two_torchrun_nodes_on_one_host(tmp_path):
    _make_source(tmp_path / "src", 3)
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "single"), nproc=2)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mn-test",
           "-m", "convert.fuse_experts", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "multi"),
           "--no-progress"]
    nodes = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs
    # files only: .moe-convert/ holds the output record (compared below: same plan, same record)
    single = {p.name: p.read_bytes() for p in (tmp_path / "single").iterdir() if p.is_file()}
    multi = {p.name: p.read_bytes() for p in (tmp_path / "multi").iterdir() if p.is_file()}
    assert single == multi
    record = Path(".moe-convert") / "output.json"
    assert (tmp_path / "single" / record).read_bytes() == (tmp_path / "multi" / record).read_bytes()
