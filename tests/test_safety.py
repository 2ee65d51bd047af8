"""Nothing the user owns is lost, and a source that changes under a job is noticed.

- ownership: --overwrite removes only what moe-convert wrote (its output record / job state);
  a real checkpoint or a user's file in --dst is refused, byte for byte untouched;
- source pins: a source file rewritten between a crash and the re-run, or during the job
  before the commit, fails naming the file, and no index is written;
- unique temp names per writer; the time-based resume journal and what a resume skipped.
Local and S3 (moto's server on 127.0.0.1), single process and torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import convert.io.storage as storage_mod
from convert.engine.job import JobOptions, run_job
from convert.engine.output_record import is_complete_output
from convert.example import example_tensors, write_checkpoint
from convert.io.storage import Storage
from helpers import REPO, load_dir, run_tool
from launch.dist import Dist

INDEX = "model.safetensors.index.json"
BUCKET = "moe-safety"


def _checkpoint(path: Path, seed: int, experts: int = 6, hidden: int = 128, inter: int = 96, shard: int = 150_000) -> Path:
    tensors, cfg = example_tensors("qwen3_moe", layers=2, experts=experts, hidden=hidden, inter=inter, seed=seed)
    write_checkpoint(tensors, cfg, str(path), shard)
    return path


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file below `root` (hidden ones too): bytes, mtime_ns and inode."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_mtime_ns, st.st_ino)
        else:
            out[str(p.relative_to(root)) + "/"] = (b"", 0, 0)
    return out


def _rewrite_same_size(shard: Path) -> None:
    """Change the last bytes of a shard (tensor data) in place: same size and inode, new bytes, later mtime."""
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size - 64)
        old = f.read(64)
        f.seek(size - 64)
        f.write(bytes(b ^ 0x5A for b in old))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert shard.stat().st_size == size


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


# -- ownership -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_dst_holding_a_source_checkpoint_is_left_untouched(tmp_path, overwrite):
    src = _checkpoint(tmp_path / "src", 1)
    real = _checkpoint(tmp_path / "real", 2)
    (real / "README.md").write_text("my model")
    before = _snapshot(real)
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(real),
                    *(["--overwrite"] if overwrite else []), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"--dst {real}" in lines[0] and INDEX in lines[0] and "not a moe-convert output" in lines[0], lines[0]
    assert _snapshot(real) == before, "a refused job must not touch the destination"


def test_overwrite_of_a_real_checkpoint_is_refused_under_torchrun(tmp_path):
    src = _checkpoint(tmp_path / "src", 1)
    real = _checkpoint(tmp_path / "real", 2)
    before = _snapshot(real)
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(real), "--overwrite", nproc=2, check=False)
    # torchrun folds a child's exit code 2 into 1 unless the launcher passes it through (issue 11, i11-errors)
    assert proc.returncode != 0
    assert "not a moe-convert output" in proc.stderr and str(real) in proc.stderr, proc.stderr
    assert _snapshot(real) == before


def test_overwrite_replaces_an_earlier_output_completely(tmp_path):
    src = _checkpoint(tmp_path / "src", 3)
    out = tmp_path / "out"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), "--max-shard-size", "100KB")
    many = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(many) > 2 and is_complete_output(Storage(str(out)), INDEX)
    refused = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), check=False)
    assert refused.returncode == 2 and "already holds a complete conversion" in refused.stderr
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), "--overwrite")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    load_dir(out)  # no stray shard of the earlier output
    record = json.loads((out / ".moe-convert" / "output.json").read_text())
    assert [f["name"] for f in record["files"]] == ["model-00001-of-00001.safetensors", "config.json", INDEX]
    assert all((out / f["name"]).stat().st_size == f["size"] for f in record["files"])
    assert record["tool"] == "moe-convert" and record["marker"] == INDEX and record["fingerprint"]
    assert sorted(p.name for p in (out / ".moe-convert").iterdir()) == ["output.json"], "no state after the commit"
    verify = run_tool("convert.verify", "--src", str(src), "--dst", str(out), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr  # the record is not a leftover


@pytest.mark.parametrize("intruder", ["user_file", "edited_output_file"])
def test_overwrite_refuses_an_output_holding_something_else(tmp_path, intruder):
    src = _checkpoint(tmp_path / "src", 4)
    out = tmp_path / "out"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out))
    if intruder == "user_file":
        (out / "notes.txt").write_text("my notes")
        expect = "notes.txt"
    else:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "my_key": "my value"}))
        expect = "config.json was changed after moe-convert wrote it"
    before = _snapshot(out)
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), "--overwrite", check=False)
    assert proc.returncode == 2
    assert expect in proc.stderr and f"--dst {out}" in proc.stderr, proc.stderr
    assert _snapshot(out) == before


def test_batch_does_not_skip_a_checkpoint_it_did_not_write(tmp_path):
    src = _checkpoint(tmp_path / "src", 5)
    real = _checkpoint(tmp_path / "real", 6)
    done = tmp_path / "done"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(done))
    before = _snapshot(real)
    manifest = {"jobs": [
        {"name": "onto-real", "kind": "fuse_experts", "src": str(src), "dst": str(real)},
        {"name": "finished", "kind": "fuse_experts", "src": str(src), "dst": str(done)},
    ]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    report = tmp_path / "report.json"
    proc = run_tool("launch.batch", str(tmp_path / "m.yaml"), "--report", str(report), check=False)
    assert proc.returncode == 1
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]}
    assert rows["onto-real"]["status"] == "failed" and "not a moe-convert output" in rows["onto-real"]["error"]
    assert rows["finished"]["status"].startswith("skipped")
    assert _snapshot(real) == before


# -- source pins -----------------------------------------------------------------------------------


def test_source_rewritten_between_crash_and_rerun_is_refused(tmp_path):
    src = _checkpoint(tmp_path / "src", 7, experts=8, hidden=256, inter=192, shard=1_500_000)
    out = tmp_path / "out"
    env = _env(MOE_CONVERT_CRASH_AFTER="1:1000000", MOE_CONVERT_JOURNAL_SECONDS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "convert.fuse_experts", "--src", str(src), "--dst", str(out), "--no-progress"]
    crashed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0 and not (out / INDEX).exists()
    shard = sorted(src.glob("*.safetensors"))[1]
    _rewrite_same_size(shard)
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), "--nproc", "2", check=False)
    assert proc.returncode != 0  # 2 in one process (test below); several ranks may fold it into 1
    assert f"source file {shard} changed since the interrupted run" in proc.stderr, proc.stderr
    assert "--overwrite" in proc.stderr
    assert not (out / INDEX).exists() and (out / ".moe-convert" / "state.json").exists()
    one = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), check=False)
    assert one.returncode == 2 and str(shard) in one.stderr
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), "--overwrite", "--nproc", "2")
    fresh = tmp_path / "fresh"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fresh))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == \
        {p.name: p.read_bytes() for p in fresh.iterdir() if p.is_file()}


def test_source_changed_before_the_commit_is_not_committed(tmp_path):
    src = _checkpoint(tmp_path / "src", 8)
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    proc = subprocess.Popen(
        [sys.executable, "-m", "convert.fuse_experts", "--src", str(src), "--dst", str(out), "--no-progress"],
        env=_env(MOE_CONVERT_PAUSE_BEFORE_COMMIT=str(gate)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not Path(str(gate) + ".waiting").exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert not (out / INDEX).exists()
        shard = sorted(src.glob("*.safetensors"))[0]
        _rewrite_same_size(shard)
        gate.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert f"error: source file {shard} changed during the conversion" in err and "was not committed" in err, err
    assert not (out / INDEX).exists() and not list(out.glob("*.safetensors")), "nothing may look complete"
    assert (out / ".moe-convert" / "state.json").exists() and list(out.glob("*.incomplete"))
    again = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), check=False)
    assert again.returncode == 2 and str(shard) in again.stderr
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out), "--overwrite")
    load_dir(out)
    assert not list(out.glob("*.incomplete"))


def test_adapter_destinations_and_sources(tmp_path):
    """Adapters: a real adapter as --dst is refused even with --overwrite; a source changed before the commit is not committed."""
    from adapter_fixtures import base_config, make_per_expert_adapter

    src, _ = make_per_expert_adapter(tmp_path / "src", "qwen3_moe", seed=1)
    other, _ = make_per_expert_adapter(tmp_path / "other", "qwen3_moe", seed=2)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(base_config("qwen3_moe")))
    flags = ["--layout", "peft", "--base-config", str(cfg)]
    before = _snapshot(other)
    proc = run_tool("convert.fuse_adapter", "--src", str(src), "--dst", str(other), *flags, "--overwrite", check=False)
    assert proc.returncode == 2 and "adapter_config.json but is not a moe-convert output" in proc.stderr, proc.stderr
    assert _snapshot(other) == before

    out, gate = tmp_path / "out", tmp_path / "gate"
    proc = subprocess.Popen(
        [sys.executable, "-m", "convert.fuse_adapter", "--src", str(src), "--dst", str(out), *flags, "--no-progress"],
        env=_env(MOE_CONVERT_PAUSE_BEFORE_COMMIT=str(gate)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not Path(str(gate) + ".waiting").exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        weights = src / "adapter_model.safetensors"
        _rewrite_same_size(weights)
        gate.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and f"source file {weights} changed during the conversion" in err, err
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()


# -- temp names, journal, skipped work ------------------------------------------------------------


def test_two_writers_use_different_temp_names(tmp_path, monkeypatch):
    st = Storage(str(tmp_path))
    seen: list[str] = []
    real_replace = os.replace

    def spy(a, b):
        seen.append(str(a))
        real_replace(a, b)

    monkeypatch.setattr(storage_mod.os, "replace", spy)
    st.write_bytes("state.json", b"one")
    st.write_bytes("state.json", b"two")
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(Path(s).parent == tmp_path and Path(s).name.startswith("state.json.") for s in seen)
    assert str(os.getpid()) in Path(seen[0]).name
    monkeypatch.setattr(storage_mod.os, "replace", real_replace)

    errors: list[BaseException] = []

    def writer(payload: bytes) -> None:
        try:
            for _ in range(100):
                st.write_bytes("shared.json", payload)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in (b"a" * 1000, b"b" * 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (tmp_path / "shared.json").read_bytes() in (b"a" * 1000, b"b" * 1000)

    def fail(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "replace", fail)
    with pytest.raises(OSError):
        st.write_bytes("state.json", b"three")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.json", "state.json"], "temp file left behind"
    assert (tmp_path / "state.json").read_bytes() == b"two"


def test_crash_early_resumes_from_the_time_based_journal(tmp_path):
    src = _checkpoint(tmp_path / "src", 9, experts=8, hidden=256, inter=192, shard=2_000_000)
    out = tmp_path / "out"
    # journal after every piece by time (seconds=0); the byte rule alone (256 MB) would journal nothing here
    env = _env(MOE_CONVERT_JOURNAL_SECONDS="0", MOE_CONVERT_CRASH_AFTER="0:3000000")
    crashed = subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(src), "--dst", str(out),
                              "--no-progress", "--workers", "1"], env=env, cwd=REPO, capture_output=True, text=True)
    assert crashed.returncode == 137 and not (out / INDEX).exists()
    journals = list((out / ".moe-convert").glob("done-*"))
    assert journals and any(j.read_text().split() for j in journals)
    report: dict = {}
    stats = tmp_path / "stats.json"
    opts = JobOptions(src=str(src), dst=str(out), layout=None, show_progress=False, stats_path=str(stats))
    assert run_job(opts, Dist(0, 1), report) == 0
    data = json.loads(stats.read_text())
    skipped = data["skipped"]
    assert data["resumed"] and report["resumed"]
    assert 0 < report["skipped_bytes"] == data["skipped_bytes"] == skipped["skipped_bytes"] < skipped["total_bytes"]
    assert skipped["skipped_bytes"] + data["ranks"][0]["written_bytes"] == skipped["total_bytes"]
    assert 0 < skipped["skipped"] < skipped["total"] and skipped["unit"] == "pieces"
    fresh = tmp_path / "fresh"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fresh))
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == (fresh / "model-00001-of-00001.safetensors").read_bytes()

    # the message a user sees
    out2 = tmp_path / "out2"
    subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(src), "--dst", str(out2), "--no-progress",
                    "--workers", "1"], env=env, cwd=REPO, capture_output=True, text=True)
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(out2))
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("resuming: "))
    assert " already written, " in line and " pieces skipped" in line and "(resumed)" in proc.stdout, proc.stdout


# -- S3 --------------------------------------------------------------------------------------------


def _objects(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def test_s3_ownership(s3env, tmp_path):
    fs = s3env
    src = _checkpoint(tmp_path / "src", 10)
    real = _checkpoint(tmp_path / "real", 11)
    fs.put(str(real), f"{BUCKET}/real", recursive=True)
    before = _objects(fs, f"{BUCKET}/real")
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", f"s3://{BUCKET}/real", "--overwrite", check=False)
    assert proc.returncode == 2 and "not a moe-convert output" in proc.stderr, proc.stderr
    assert _objects(fs, f"{BUCKET}/real") == before

    dst = f"s3://{BUCKET}/out"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", dst, "--max-shard-size", "100KB")
    assert is_complete_output(Storage(dst), INDEX)
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", dst, "--overwrite")  # replaces its own output
    shards = [p for p in fs.ls(f"{BUCKET}/out", detail=False) if p.endswith(".safetensors")]
    assert [Path(p).name for p in shards] == ["model-00001-of-00001.safetensors"]
    fs.invalidate_cache()
    assert [Path(p).name for p in fs.find(f"{BUCKET}/out/.moe-convert")] == ["output.json"], "no state after the commit"
    fs.pipe_file(f"{BUCKET}/out/notes.txt", b"mine")
    before = _objects(fs, f"{BUCKET}/out")
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", dst, "--overwrite", check=False)
    assert proc.returncode == 2 and "notes.txt" in proc.stderr, proc.stderr
    assert _objects(fs, f"{BUCKET}/out") == before


def test_s3_source_rewritten_after_a_crash_is_refused_then_resume_skips(s3env, tmp_path):
    fs = s3env
    # > 5 MiB per shard, so an upload has several parts and a resume has some to skip
    src = _checkpoint(tmp_path / "src", 12, experts=6, hidden=512, inter=384, shard=12_000_000)
    fs.put(str(src), f"{BUCKET}/pin-src", recursive=True)
    s3src, dst = f"s3://{BUCKET}/pin-src", f"s3://{BUCKET}/pin-out"
    env_crash = {"MOE_CONVERT_CRASH_AFTER": "1:3000000"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "convert.fuse_experts",
           "--src", s3src, "--dst", dst, "--no-progress"]
    crashed = subprocess.run(cmd, env=_env(**env_crash), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0 and not fs.exists(f"{BUCKET}/pin-out/{INDEX}")

    # same size, new bytes: a new ETag
    name = sorted(p for p in fs.ls(f"{BUCKET}/pin-src", detail=False) if p.endswith(".safetensors"))[0]
    data = bytearray(fs.cat_file(name))
    data[-64:] = bytes(b ^ 0x5A for b in data[-64:])
    fs.pipe_file(name, bytes(data))
    proc = run_tool("convert.fuse_experts", "--src", s3src, "--dst", dst, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"source file s3://{name} changed since the interrupted run" in proc.stderr and "ETag" in proc.stderr, proc.stderr
    assert not fs.exists(f"{BUCKET}/pin-out/{INDEX}")

    # put the old bytes back: the pin is the ETag (a content hash), so the object is the one pinned again
    data[-64:] = bytes(b ^ 0x5A for b in data[-64:])
    fs.pipe_file(name, bytes(data))
    stats = tmp_path / "stats.json"
    proc = run_tool("convert.fuse_experts", "--src", s3src, "--dst", dst, "--stats", str(stats), nproc=2)
    assert "(resumed)" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("resuming: "))
    assert " parts skipped" in line, line
    data = json.loads(stats.read_text())
    assert data["skipped_bytes"] > 0 and data["skipped"]["unit"] == "parts"
    fresh = tmp_path / "fresh"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(fresh))
    fs.invalidate_cache()
    assert fs.cat_file(f"{BUCKET}/pin-out/model-00001-of-00001.safetensors") == \
        (fresh / "model-00001-of-00001.safetensors").read_bytes()
    assert not fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads")
