"""Smoke test of the benchmark harness on the tiny preset: real runs, real OS counters, a complete report."""

from __future__ import annotations

import importlib.util
import json

from helpers import run_tool


def test_bench_tiny_preset_end_to_end(tmp_path):
    out = tmp_path / "results"
    run_tool("bench.run", "--preset", "tiny", "--out", str(out), "--no-drop-caches", "--workdir", str(tmp_path),
             timeout=120)
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("moe-bench-")] == [], "work dir not removed"

    for name in ("cp -r per-expert L1", "fuse L1 ws1", "fuse L2 ws1", "fuse L1 ws2 ep3", "naive fuse L1",
                 "naive fuse L2", "startup+plan ws1 (--dry-run)"):
        assert rows[name]["samples"] and all(s > 0 for s in rows[name]["samples"]), name
    multi = rows["fuse L1 ws2 ep3"]
    assert [r["rank"] for r in multi["ranks"]] == [0, 1]
    assert sum(r["read_bytes"] for r in multi["ranks"]) == rows["fuse L1 ws1"]["ranks"][0]["read_bytes"]
    for row in (rows["fuse L1 ws1"], rows["fuse L2 ws1"], multi):
        for r in row["ranks"]:
            # The OS saw each rank read exactly its share of the plan (plus the read of /proc/self/io itself).
            assert 0 <= r["os_io"]["rchar"] - r["read_bytes"] < 4096, (row["name"], r)
            assert r["peak_rss_bytes"] > 0
    assert max(rows["naive fuse L2"]["peak_rss"]) > 0
    assert rows["fuse L1 ws1"]["nbytes"] == rows["cp -r per-expert L1"]["nbytes"]
    assert all("identical" in v for k, v in results["checks"].items() if "vs" in k), results["checks"]
    assert "tiny-gpt-oss L1: the tool's split of its fuse vs the source" in results["checks"]
    for name in ("tiny-gpt-oss fuse L1 ws1", "tiny-gpt-oss split L1 ws1", "tiny-gpt-oss naive fuse L1"):
        assert rows[name]["samples"] and rows[name]["stream" if "naive" not in name else "samples"], name

    report = (out / "RESULTS.md").read_text()
    for heading in ("## Targets", "## Base weights: throughput", "## Growth when the layer count doubles",
                    "## Per rank: bytes read and written", "## Adapters", "## A second family: tiny-gpt-oss"):
        assert heading in report
    assert "| fuse L1 ws2 ep3 | 1 |" in report
    if importlib.util.find_spec("matplotlib"):
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_bench_tiny_preset_end_to_end(tmp_path):
    """bench.verify on the tiny preset: conversion and verify timed from their own --stats / --report, every case
    verified correct, the report and its merge of two runs written."""
    out = tmp_path / "results"
    run_tool("bench.verify", "--preset", "tiny", "--out", str(out), "--no-drop-caches", "--workdir", str(tmp_path),
             timeout=300)
    results = json.loads((out / "verify.json").read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("moe-verify-bench-")] == [], "work dir not removed"
    kinds = {c["kind"] for c in results["cases"]}
    assert kinds == {"copy", "cast", "transpose"}
    for c in results["cases"]:
        assert c["ok"] and c["nbytes"] > 0, c["name"]
        assert len(c["convert_data"]) == len(c["verify_data"]) == 1 and c["verify_data"][0] > 0, c["name"]
        assert c["verify_rss"][0] > 0 and c["verify_threads"] >= 1
    report = (out / "VERIFY.md").read_text()
    assert "## Targets" in report and "| fuse --dtype fp16 (cast from bf16) | 1 |" in report
    run_tool("bench.verify", "--merge", str(out / "verify.json"), str(out / "verify.json"), "--out", str(tmp_path / "m"))
    merged = json.loads((tmp_path / "m" / "verify.json").read_text())
    assert all(len(c["verify_data"]) == 2 for c in merged["cases"])
