"""Smoke test of bench.s3 on its tiny preset: the simulated endpoint, the tool and `aws s3 cp` really run."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import run_tool


@pytest.mark.bench  # run by .ci/run after the default run
def test_bench_s3_tiny_preset_end_to_end(tmp_path):
    if shutil.which("aws") is None:
        pytest.skip("the peer `aws s3 cp` is not installed (pip install -e .[bench])")
    out = tmp_path / "results"
    run_tool("bench.s3", "--preset", "tiny", "--out", str(out), "--workdir", str(tmp_path), timeout=300)
    results = json.loads((out / "s3.json").read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("moe-bench-s3-")] == [], "work dir not removed"
    rows = results["rows"]
    cases = results["settings"]["cases"]
    for case in cases:
        for n in results["settings"]["conns"]:
            tool = [r for r in rows if r["case"] == case and r["who"] == "tool" and r["conns"] == n]
            peer = [r for r in rows if r["case"] == case and r["who"] == "peer" and r["conns"] == n]
            assert tool and peer, (case, n)
            for r in tool + peer:
                assert r["nbytes"] > 0 and r["wall"] > 0 and r["gbps"] > 0, r
                assert r["sim"]["requests"] > 0 and r["sim"]["bytes_out"] > 0, r
                assert r["sim"]["retried"] == r["sim"]["slowdowns"], r  # every 503 was sent again
            assert all(r["ranks"] * r["workers"] == n for r in tool)
            assert peer[0]["sim"]["max_active_requests"] <= n, "the peer may not use more connections than N"
    assert sum(r["sim"]["slowdowns"] for r in rows) > 0, "the endpoint's request-rate limit never answered 503"
    # s3-s3: the tool reads and writes through the endpoint; the peer downloads, then uploads.
    s2s = [r for r in rows if r["case"] == "fuse:s3-s3"]
    assert all(r["sim"]["bytes_in"] >= r["nbytes"] and r["sim"]["bytes_out"] >= r["nbytes"] for r in s2s)
    assert all(len(r["legs"]) == 2 for r in s2s if r["who"] == "peer")
    summary = results["summary"]
    assert set(summary) == {f"{c} max 2 workers/rank" for c in cases}
    for lines in summary.values():
        assert lines[0]["conns"] == 1 and abs(lines[0]["scaling"] - 1.0) < 1e-9
        assert all({"scaling", "wall_scaling", "peer_gbps", "vs_peer", "vs_peer_data"} <= set(x) for x in lines)
    report = (out / "S3.md").read_text()
    for case in cases:
        assert f"## {case} max 2 workers/rank" in report
    assert "| 2 |" in report and "503 SlowDown above" in report


def test_s3trace_sums_up_ranged_gets_from_the_endpoint_log():
    from bench.s3trace import get_sizes, range_bytes

    assert range_bytes({"range": "bytes=10-19"}) == 10
    assert range_bytes({"range": None}) == range_bytes({}) == range_bytes({"range": "bytes=5-"}) == 0
    log = [{"range": "bytes=0-999999"}, {"range": "bytes=0-2999999"}, {"range": "bytes=0-4999999"}, {"method": "PUT"}]
    assert get_sizes({"log": log}) == "3 ranged GETs, mean 3.0 MB, median 3.0 MB"
    assert get_sizes({"log": log[3:]}) == "no ranged GETs"


def test_part_model_replays_the_planner_and_the_grouped_fill(tmp_path):
    """bench.part_model on the planner's real parts: the grouped fill with whole pieces per part makes fewer GETs
    and a shorter modelled data phase than parts filled one by one, cut every max part."""
    from bench.part_model import data_phase, rank_parts
    from bench.synthetic import checkpoint_specs, write_synthetic

    specs, config = checkpoint_specs("qwen3-30b-a3b", 1, experts=21, vocab=1000)
    write_synthetic(str(tmp_path / "ck"), specs, config, 200_000_000)
    results = {}
    for whole in (False, True):
        parts, copies, size = rank_parts(str(tmp_path / "ck"), 1, 4, whole)
        for a, b in zip(parts, parts[1:]):  # the parts tile each output file
            assert (a.end == b.start) if a.file == b.file else (b.start == 0)
        for grouped in (False, True):
            results[whole, grouped] = data_phase(parts, copies, (3 if grouped else 1) * size,
                                                 size if grouped else 1 << 62, 12 * size, 4, 0.5, 5e6)
    (before, gets_before), (after, gets_after) = results[False, False], results[True, True]
    assert gets_after < gets_before and after < before, results
