"""S3 in and out through a real S3 endpoint (moto's server on 127.0.0.1), resume after a crash, transient errors.

Conversions run as two ranks (the tools' `--nproc 2`; torchrun for S3 -> S3 and the S3 resume) and must give the
bytes of a one-process conversion to local disk.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from convert.example import example_tensors, write_checkpoint
from helpers import run_tool
from s3_server import CREDENTIALS, FlakyProxy

BUCKET = "moe-test"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A ~17 MB per-expert checkpoint: big enough for several >= 5 MiB multipart parts."""
    root = tmp_path_factory.mktemp("s3src") / "src"
    tensors, cfg = example_tensors("qwen3_moe", layers=2, experts=6, hidden=512, inter=384, seed=7)
    write_checkpoint(tensors, cfg, str(root), 12_000_000)
    return root


@pytest.fixture(scope="module")
def local_reference(source, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ref")
    run_tool("convert.fuse_experts", "--src", str(source), "--dst", str(root / "fused"))
    run_tool("convert.split_experts", "--src", str(root / "fused"), "--dst", str(root / "split"))
    return root / "fused", root / "split"


def _files_of(fs, url: str) -> dict[str, bytes]:
    return {Path(p).name: fs.cat_file(p) for p in fs.ls(url, detail=False) if not p.endswith("/.moe-convert")}


def _local_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def test_s3_conversions_match_local_disk(s3env, source, local_reference, tmp_path):
    fs = s3env
    ref_fused, ref_split = local_reference
    fs.put(str(source), f"{BUCKET}/src", recursive=True)
    run_tool("convert.fuse_experts", "--src", str(source), "--dst", f"s3://{BUCKET}/l2s", "--nproc", "2")
    run_tool("convert.fuse_experts", "--src", f"s3://{BUCKET}/src", "--dst", f"s3://{BUCKET}/s2s", nproc=2)
    run_tool("convert.split_experts", "--src", f"s3://{BUCKET}/s2s", "--dst", str(tmp_path / "s2l"), "--nproc", "2")
    want = _local_files(ref_fused)
    assert max(len(v) for k, v in want.items() if k.endswith(".safetensors")) > 10 << 20, "needs multi-part shards"
    assert _files_of(fs, f"{BUCKET}/l2s") == want
    assert _files_of(fs, f"{BUCKET}/s2s") == want
    assert _local_files(tmp_path / "s2l") == _local_files(ref_split)
    assert not fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads"), "no upload may be left behind"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_after_a_rank_is_killed(s3env, source, local_reference, tmp_path, monkeypatch, where):
    fs = s3env
    dst = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/resume"
    monkeypatch.setenv("MOE_CONVERT_JOURNAL_BYTES", "1000000")
    monkeypatch.setenv("MOE_CONVERT_CRASH_AFTER", "1:3000000")
    # two ranks: under torchrun for S3, the tool's own --nproc ranks for local disk
    torchrun, ranks = ({"nproc": 2}, []) if where == "s3" else ({}, ["--nproc", "2"])
    crashed = run_tool("convert.fuse_experts", "--src", str(source), "--dst", dst, *ranks, **torchrun, check=False)
    assert crashed.returncode != 0
    if where == "local":
        assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
        assert list((tmp_path / "out").glob("*.incomplete")), "partial shards must keep their .incomplete name"
    else:
        assert not fs.exists(f"{BUCKET}/resume/model.safetensors.index.json")
        assert not fs.exists(f"{BUCKET}/resume/model-00001-of-00001.safetensors"), "no shard before the commit"
    monkeypatch.delenv("MOE_CONVERT_CRASH_AFTER")
    stats = tmp_path / "stats.json"
    run_tool("convert.fuse_experts", "--src", str(source), "--dst", dst, "--stats", str(stats), *ranks, **torchrun)
    report = json.loads(stats.read_text())
    total = sum(len(v) for k, v in _local_files(local_reference[0]).items() if k.endswith(".safetensors"))
    assert report["resumed"] is True
    assert sum(r["written_bytes"] for r in report["ranks"]) < total, "the re-run must not redo finished work"
    got = _local_files(tmp_path / "out") if where == "local" else _files_of(fs, f"{BUCKET}/resume")
    assert got == _local_files(local_reference[0])
    if where == "s3":
        assert not fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads")


def test_transient_s3_errors_are_retried(s3, s3env, source, local_reference, monkeypatch):
    fs = s3env
    fs.put(str(source), f"{BUCKET}/flaky-src", recursive=True)
    proxy = FlakyProxy(s3.port, every=3, budget=30)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        run_tool("convert.fuse_experts", "--src", f"s3://{BUCKET}/flaky-src", "--dst", f"s3://{BUCKET}/flaky",
                 "--nproc", "2")
    finally:
        proxy.stop()
    assert proxy.injected > 5, f"only {proxy.injected} errors were injected"
    assert _files_of(fs, f"{BUCKET}/flaky") == _local_files(local_reference[0])


@pytest.fixture(scope="module")
def adapter_source(tmp_path_factory) -> Path:
    """A real peft target_parameters adapter (gpt-oss: interleaved gate/up) on a tiny model."""
    from adapter_fixtures import make_peft_adapter

    _, path = make_peft_adapter("gpt_oss", tmp_path_factory.mktemp("s3adapter") / "adapter", seed=4)
    return path


def test_split_adapter_on_s3_matches_local_disk(s3env, adapter_source, tmp_path):
    fs = s3env
    run_tool("convert.split_adapter", "--src", str(adapter_source), "--dst", str(tmp_path / "ref"))
    fs.put(str(adapter_source), f"{BUCKET}/adapter-src", recursive=True)
    two = ["--nproc", "2"]
    run_tool("convert.split_adapter", "--src", f"s3://{BUCKET}/adapter-src", "--dst", f"s3://{BUCKET}/adapter-s2s", *two)
    run_tool("convert.split_adapter", "--src", str(adapter_source), "--dst", f"s3://{BUCKET}/adapter-l2s", *two)
    run_tool("convert.split_adapter", "--src", f"s3://{BUCKET}/adapter-src", "--dst", str(tmp_path / "s2l"), *two)
    want = _local_files(tmp_path / "ref")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(want)
    assert _files_of(fs, f"{BUCKET}/adapter-s2s") == want
    assert _files_of(fs, f"{BUCKET}/adapter-l2s") == want
    assert _local_files(tmp_path / "s2l") == want
    assert not fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads")


def test_pieces_writing_into_several_shards_land_in_each(s3env, source, tmp_path):
    """Small shards: one expert's piece writes into two output files (gate_up in one, down in another).

    Each multipart part must take only its own file's bytes (it once also took the other file's
    bytes at the same offsets, and read every such piece once per part).
    """
    fs = s3env
    shard = ["--max-shard-size", "7MB"]
    run_tool("convert.fuse_experts", "--src", str(source), "--dst", str(tmp_path / "fused"), *shard, "--nproc", "2")
    run_tool("convert.fuse_experts", "--src", str(source), "--dst", f"s3://{BUCKET}/multi-fused", *shard, "--nproc", "2")
    want = _local_files(tmp_path / "fused")
    assert sum(k.endswith(".safetensors") for k in want) >= 3, "needs several output shards"
    assert _files_of(fs, f"{BUCKET}/multi-fused") == want
    run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst", str(tmp_path / "split"), *shard)
    run_tool("convert.split_experts", "--src", f"s3://{BUCKET}/multi-fused", "--dst", f"s3://{BUCKET}/multi-split",
             *shard)
    assert _files_of(fs, f"{BUCKET}/multi-split") == _local_files(tmp_path / "split")


def test_overwrite_into_a_fresh_s3_prefix(s3env, source, local_reference):
    run_tool("convert.fuse_experts", "--src", str(source), "--dst", f"s3://{BUCKET}/fresh", "--overwrite")
    assert _files_of(s3env, f"{BUCKET}/fresh") == _local_files(local_reference[0])


def test_conversions_through_a_slow_throttling_endpoint(source, local_reference, tmp_path, monkeypatch):
    """bench.s3sim: 20-50 ms to the first byte, 40 MB/s per connection, 503 SlowDown above 4 requests/s per prefix
    (low enough that the ~70 requests of the two conversions meet it even on a loaded machine).

    S3 -> S3 (multipart parts) and S3 -> local (grouped ranged reads) give the bytes of the local
    conversions, and every 503 answered was retried.
    """
    import boto3

    from bench.s3sim import S3Sim, SimConfig

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with S3Sim(SimConfig(latency_ms=(20, 50), conn_mbps=40, slowdown_rps=4)) as sim:
        admin = boto3.client("s3", endpoint_url=sim.backend.url, region_name="us-east-1")  # setup bypasses the proxy
        admin.create_bucket(Bucket="slow")
        for f in source.iterdir():
            admin.put_object(Bucket="slow", Key=f"src/{f.name}", Body=f.read_bytes())
        monkeypatch.setenv("AWS_ENDPOINT_URL", sim.url)
        sim.reset()
        run_tool("convert.fuse_experts", "--src", "s3://slow/src", "--dst", "s3://slow/fused", "--nproc", "2")
        run_tool("convert.split_experts", "--src", "s3://slow/fused", "--dst", str(tmp_path / "split"), "--nproc", "2",
                 timeout=600)
        stats = sim.stats()
        listed = admin.list_objects_v2(Bucket="slow", Prefix="fused/")["Contents"]
        fused = {o["Key"].split("/")[-1]: admin.get_object(Bucket="slow", Key=o["Key"])["Body"].read()
                 for o in listed if "/.moe-convert/" not in o["Key"]}
    assert fused == _local_files(local_reference[0])
    assert _local_files(tmp_path / "split") == _local_files(local_reference[1])
    assert stats["slowdowns"] > 0, stats
    assert stats["retried"] == stats["slowdowns"], f"a request answered 503 was not sent again: {stats}"


def test_a_missing_destination_bucket_is_refused_and_not_created(s3env, source):
    """No bucket is created on the user's behalf (nor a HEAD of it spent): a destination in a bucket that does not
    exist is refused before any byte moves (exit 2), naming the object it could not write."""
    proc = run_tool("convert.fuse_experts", "--src", str(source), "--dst", "s3://moe-no-such-bucket/out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "s3://moe-no-such-bucket/out/" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not s3env.exists("moe-no-such-bucket")


def _fuse_through_proxy(s3, monkeypatch, cut, src: str, dst: str, *flags: str, check: bool = True,
                        drop_headers: tuple[str, ...] = ()) -> tuple[Any, FlakyProxy]:
    """Fuse `src` into `dst` through a FlakyProxy calling `cut` on each request (and dropping `drop_headers`);
    returns the tool's process and the proxy (stopped)."""
    proxy = FlakyProxy(s3.port, every=0, cut=cut, drop_headers=drop_headers)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return run_tool("convert.fuse_experts", "--src", src, "--dst", dst, *flags, check=check), proxy
    finally:
        proxy.stop()


def _convert_cutting_bodies(s3, monkeypatch, src: str, dst: str, *flags: str) -> tuple[int, FlakyProxy]:
    """Fuse `src` into `dst` through a proxy that breaks off every third data GET's body mid-stream; returns the
    data GETs (not a shard header's read) the proxy saw, and the proxy."""
    data_gets = [0]

    def cut(method: str, path: str, rng: str | None) -> bool:
        if method != "GET" or not rng or rng.startswith("bytes=0-"):  # not a shard header's read
            return False
        data_gets[0] += 1
        return data_gets[0] % 3 == 1
    _, proxy = _fuse_through_proxy(s3, monkeypatch, cut, src, dst, *flags)
    return data_gets[0], proxy


def test_s3_to_local_streams_few_long_requests_and_resumes_broken_bodies(s3, s3env, source, local_reference,
                                                                          tmp_path, monkeypatch):
    """S3 -> local byte copies (convert.engine.stream_copy): each worker streams a span of equal bytes, one ranged
    GET per source file a span touches, and a body broken off mid-stream is asked again from where it broke;
    the output is the local conversion's, byte for byte."""
    s3env.put(str(source), f"{BUCKET}/stream-src", recursive=True)
    data_gets, proxy = _convert_cutting_bodies(s3, monkeypatch, f"s3://{BUCKET}/stream-src", str(tmp_path / "fused"),
                                               "--workers", "2")
    assert _local_files(tmp_path / "fused") == _local_files(local_reference[0])
    assert proxy.cut_bodies >= 2
    shards = len([p for p in source.iterdir() if p.suffix == ".safetensors"])
    # a span per worker, + 1 where a span crosses into the next shard, + 1 per broken body, + a few taken over
    assert data_gets <= 2 + (shards - 1) + proxy.cut_bodies + 4, (data_gets, proxy.ranges)


def test_s3_to_s3_reads_touching_source_bytes_by_one_request_and_resumes_broken_bodies(s3, s3env, source,
                                                                                        local_reference, monkeypatch):
    """S3 -> S3 (convert.engine.part_fill): parts whose source bytes touch are filled together, one streamed ranged
    GET per run of touching source bytes (not one per tensor and part), and a body broken off mid-stream is asked
    again from where it broke; the output is the local conversion's, byte for byte."""
    s3env.put(str(source), f"{BUCKET}/group-src", recursive=True)
    monkeypatch.setenv("MOE_CONVERT_MAX_PART", str(5 << 20))  # parts of S3's least size: several per source shard
    data_gets, proxy = _convert_cutting_bodies(s3, monkeypatch, f"s3://{BUCKET}/group-src",
                                               f"s3://{BUCKET}/group-out", "--workers", "3")
    assert _files_of(s3env, f"{BUCKET}/group-out") == _local_files(local_reference[0])
    assert proxy.cut_bodies >= 1
    shards = [p.stat().st_size for p in source.iterdir() if p.suffix == ".safetensors"]
    # a run per part's size of source bytes, + 2 per source shard (its end; a group's), + 1 per broken body;
    # read part by part, it was one request per expert tensor and part (14 here)
    assert data_gets - proxy.cut_bodies <= sum(shards) // (5 << 20) + 2 * len(shards), (data_gets, proxy.ranges)


@pytest.mark.parametrize("dst_kind", ["local", "s3", "local-unconditional", "local-store-ignores-if-match"])
def test_a_source_rewritten_during_the_conversion_fails_the_read_that_meets_it(s3, s3env, source, tmp_path,
                                                                              monkeypatch, dst_kind):
    """Every read of an S3 source is conditional on the ETag its plan pinned (If-Match): a shard rewritten after the
    plan (same size, new bytes) fails the first read of it, naming the file, and nothing is committed (no check
    of the source after the data is needed: no byte of another version was used). Where the reads are
    unconditional (turned off, or a store that ignores the condition: SourcePinning.probe_conditions finds it), the
    listing of the source after the data finds the change."""
    if dst_kind == "local-unconditional":  # a store that refuses If-Match: the listing after the data finds it
        monkeypatch.setenv("MOE_CONVERT_S3_CONDITIONAL_READS", "0")
    drop = ("If-Match",) if dst_kind == "local-store-ignores-if-match" else ()
    s3env.put(str(source), f"{BUCKET}/moving-src-{dst_kind}", recursive=True)
    shard = sorted(p for p in s3env.ls(f"{BUCKET}/moving-src-{dst_kind}", detail=False) if p.endswith(".safetensors"))[0]
    rewritten: list[str] = []
    once = threading.Lock()  # two reads of the shard at once must not both rewrite it (twice is the original)

    def rewrite(method: str, path: str, rng: str | None) -> bool:
        if method != "GET" or not rng or rng.startswith("bytes=0-") or shard not in path:
            return False
        with once:
            if not rewritten:
                data = bytearray(s3env.cat_file(shard))
                data[-64:] = bytes(b ^ 0x5A for b in data[-64:])
                s3env.pipe_file(shard, bytes(data))  # to the endpoint itself, before this request goes on to it
                rewritten.append(path)
        return False
    dst = f"s3://{BUCKET}/moving-out" if dst_kind == "s3" else str(tmp_path / "out")
    proc, _ = _fuse_through_proxy(s3, monkeypatch, rewrite, f"s3://{BUCKET}/moving-src-{dst_kind}", dst, check=False,
                                  drop_headers=drop)
    assert rewritten, "no data read of the shard was seen"
    assert proc.returncode == 1, proc.stderr
    # the read itself failed (If-Match), not a check of the source after the data; unconditional: that check
    how = "(its ETag is no longer" if dst_kind in ("local", "s3") else "(ETag differ"
    assert f"source file s3://{shard} changed during the conversion {how}" in proc.stderr, proc.stderr
    done = s3env.exists(f"{BUCKET}/moving-out/model.safetensors.index.json") if dst_kind == "s3" else \
        (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not done, "nothing may look complete"


def test_a_small_file_rewritten_before_its_server_side_copy_is_not_committed(s3, s3env, source, monkeypatch):
    """S3 -> S3 copies the source's other files by CopyObject on condition of their pinned ETag; where the store does
    not apply the condition (moto does not), the check of their pins after the data finds the change."""
    s3env.put(str(source), f"{BUCKET}/copy-src", recursive=True)
    rewritten: list[str] = []

    def rewrite(method: str, path: str, rng: str | None) -> bool:
        if method == "PUT" and path.split("?")[0].endswith("/copy-out/config.json") and not rewritten:
            s3env.pipe_file(f"{BUCKET}/copy-src/config.json", s3env.cat_file(f"{BUCKET}/copy-src/config.json") + b" ")
            rewritten.append(path)
        return False
    proc, _ = _fuse_through_proxy(s3, monkeypatch, rewrite, f"s3://{BUCKET}/copy-src", f"s3://{BUCKET}/copy-out",
                                  check=False)
    assert rewritten, "no copy of config.json was seen"
    assert proc.returncode == 1, proc.stderr
    assert f"source file s3://{BUCKET}/copy-src/config.json changed during the conversion" in proc.stderr, proc.stderr
    assert not s3env.exists(f"{BUCKET}/copy-out/model.safetensors.index.json")


def test_s3_to_s3_checks_its_server_side_copies_while_the_shards_stream(s3, s3env, source, local_reference,
                                                                        monkeypatch):
    """The source's other files, copied server-side (a store may not hold such a copy to its condition), are checked
    against their pins as soon as they are copied, beside the shards' data, not on the commit's path. The proxy
    holds every part upload until it has seen the source looked at again after a copy (no longer, once one gave
    up)."""
    s3env.put(str(source), f"{BUCKET}/early-src", recursive=True)
    copied, checked = threading.Event(), threading.Event()
    held: list[bool] = []
    log: list[str] = []

    def hold(method: str, path: str, rng: str | None) -> bool:
        log.append(f"{time.monotonic():.2f} {method} {path} {rng or ''}")
        key = path.split("?")[0]
        if method == "PUT" and "partNumber=" not in path and key.endswith("/early-out/config.json"):
            copied.set()
        elif copied.is_set() and ("early-src" in path) and (method == "HEAD" or "list-type=2" in path):
            checked.set()
        elif method == "PUT" and "partNumber=" in path:  # parts upload several at once: each is held
            held.append(checked.wait(timeout=0 if False in held else 60))
        return False
    proc, _ = _fuse_through_proxy(s3, monkeypatch, hold, f"s3://{BUCKET}/early-src", f"s3://{BUCKET}/early-out")
    assert held and all(held), "a part waited 60 s for the check of the copies:\n" + "\n".join(log)
    assert _files_of(s3env, f"{BUCKET}/early-out") == _local_files(local_reference[0])


def test_a_store_that_does_not_take_if_match_fails_at_once_naming_the_way_out(s3, s3env, source, local_reference,
                                                                             tmp_path, monkeypatch):
    """A store that answers a conditional read 501 NotImplemented (S3's answer to a header it does not take) fails the
    job at its first read, without retrying: one line naming the file and MOE_CONVERT_S3_CONDITIONAL_READS=0, with
    which the same job converts."""
    s3env.put(str(source), f"{BUCKET}/noif-src", recursive=True)
    proxy = FlakyProxy(s3.port, every=0, not_implemented=("If-Match",))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        args = ("--src", f"s3://{BUCKET}/noif-src", "--dst", str(tmp_path / "out"))
        proc = run_tool("convert.fuse_experts", *args, check=False, timeout=120)
        refused = proxy.seen
        monkeypatch.setenv("MOE_CONVERT_S3_CONDITIONAL_READS", "0")
        run_tool("convert.fuse_experts", *args, timeout=120)
    finally:
        proxy.stop()
    assert proc.returncode == 2, proc.stderr  # refused before writing: the plan's first read met it
    assert [x for x in proc.stderr.splitlines() if x.strip()] == [
        f"error: cannot read s3://{BUCKET}/noif-src/model.safetensors.index.json: A header you provided implies "
        "functionality that is not implemented (HTTP 501 NotImplemented); this store does not take If-Match, on which "
        "every read of a source is made: set MOE_CONVERT_S3_CONDITIONAL_READS=0"], proc.stderr
    assert refused <= 8, f"{refused} requests: a store's 501 to a condition is not retried"
    assert _local_files(tmp_path / "out") == _local_files(local_reference[0])
