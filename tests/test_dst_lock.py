"""One job per destination (convert.engine.dest_lock), on local disk and on S3 (moto's server on 127.0.0.1).

Real processes: a first job is held at a test gate (MOE_CONVERT_PAUSE_BEFORE_COMMIT: its data written, its lock
held; MOE_CONVERT_PAUSE_BEFORE_LOCK: its plan's look at the destination done, no lock yet) while a second one runs
on the same --dst. Exactly one of them exits 0, the other is refused (exit 2) with one line naming the first
(host, pid, since when), and the destination holds the winner's complete conversion. A lock a dead job left is taken
over with a line saying so; a job whose lock was taken over does not commit.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from convert.example import example_tensors, write_checkpoint
from helpers import REPO, run_tool

INDEX = "model.safetensors.index.json"
LOCK = ".moe-convert/lock.json"
BUCKET = "moe-lock"
SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two different small checkpoints."""
    root = tmp_path_factory.mktemp("lock-src")
    out = []
    for seed in (1, 2):
        tensors, cfg = example_tensors("qwen3_moe", layers=2, experts=4, hidden=64, inter=48, seed=seed)
        write_checkpoint(tensors, cfg, str(root / f"src{seed}"), 100_000)
        out.append(root / f"src{seed}")
    return out[0], out[1]


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory) -> dict[Path, dict[str, bytes]]:
    """Each source's fused files (a conversion of it alone)."""
    root = tmp_path_factory.mktemp("lock-ref")
    refs = {}
    for i, src in enumerate(sources):
        run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(root / f"ref{i}"))
        refs[src] = _local_files(root / f"ref{i}")
    return refs


def _local_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def _start(src: Path, dst: str, *flags: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "convert.fuse_experts", "--src", str(src), "--dst", dst, *flags,
                             "--no-progress"], env=_env(**env), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(gate: Path, *procs: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until the job(s) wait at `gate` (its .waiting file exists); fail where one ended first."""
    deadline = time.monotonic() + timeout
    while not Path(f"{gate}.waiting").exists():
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            out, err = ended[0].communicate()
            raise AssertionError(f"the job ended (exit {ended[0].returncode}) before waiting at {gate}:\n{out}{err}")
        assert time.monotonic() < deadline, f"no job waited at {gate}"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _in_use_line(dst: str, pid: int) -> str:
    """The refusal's expected line, as a regular expression."""
    return (rf"error: {re.escape(dst)} is in use by another moe-convert job \(host {re.escape(socket.gethostname())}, "
            rf"pid {pid}, running since {SINCE}\): wait for it to end, or choose another --dst")


def _assert_refused(proc: subprocess.CompletedProcess[str] | tuple[int, str], dst: str, pid: int) -> None:
    code, err = (proc.returncode, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and re.match(_in_use_line(dst, pid), lines[0]), err


def _dst(where: str, tmp_path: Path, name: str) -> str:
    return str(tmp_path / name) if where == "local" else f"s3://{BUCKET}/{name}-{tmp_path.name}"


def _output(where: str, dst: str, fs) -> dict[str, bytes]:
    """The destination's files (not its .moe-convert/ bookkeeping)."""
    if where == "local":
        return _local_files(Path(dst))
    fs.invalidate_cache()
    return {Path(p).name: fs.cat_file(p) for p in fs.ls(dst.removeprefix("s3://"), detail=False)
            if not p.endswith("/.moe-convert")}


def _state_dir(where: str, dst: str, fs) -> list[str]:
    if where == "local":
        return sorted(p.name for p in (Path(dst) / ".moe-convert").iterdir())
    fs.invalidate_cache()
    return sorted(Path(p).name for p in fs.find(dst.removeprefix("s3://") + "/.moe-convert"))


@pytest.fixture(params=["local", "s3"])
def where(request) -> str:
    if request.param == "s3":
        request.getfixturevalue("s3env")
    return request.param


@pytest.fixture
def fs(where, request):
    return request.getfixturevalue("s3env") if where == "s3" else None


# -- a second job while the first runs -------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["other source", "--overwrite", "--overwrite, other source"])
def test_a_second_job_on_a_running_jobs_destination_is_refused(where, fs, sources, references, tmp_path, second):
    """The second job (another source; or --overwrite, which once replaced the first job's output while it ran, and
    both exited 0) is refused with one line naming the first, and touches nothing; the first ends with its own
    complete conversion. A --dry-run takes no lock."""
    first, other = sources
    dst = _dst(where, tmp_path, "out")
    gate = tmp_path / "gate"
    job = _start(first, dst, MOE_CONVERT_PAUSE_BEFORE_COMMIT=str(gate))
    try:
        _wait_for(gate, job)
        src = other if "other source" in second else first
        flags = ["--overwrite"] if "--overwrite" in second else []
        before = _output(where, dst, fs)
        refused = run_tool("convert.fuse_experts", "--src", str(src), "--dst", dst, *flags, check=False)
        _assert_refused(refused, dst, job.pid)
        assert _output(where, dst, fs) == before, "a refused job must not touch the destination"
        dry = run_tool("convert.fuse_experts", "--src", str(src), "--dst", dst, *flags, "--dry-run", check=False)
        assert dry.returncode == 0 and "plan:" in dry.stdout, dry.stderr
        if second == "other source":  # a batch's job is refused alike, and the batch goes on
            manifest = tmp_path / "m.yaml"
            manifest.write_text(yaml.safe_dump({"jobs": [{"name": "onto-running", "kind": "fuse_experts",
                                                          "src": str(src), "dst": dst}]}))
            report = tmp_path / "report.json"
            batch = run_tool("launch.batch", str(manifest), "--report", str(report), check=False)
            row = json.loads(report.read_text())["jobs"][0]
            assert batch.returncode == 1 and row["status"] == "failed", batch.stdout + batch.stderr
            assert re.match(_in_use_line(dst, job.pid).removeprefix("error: "), row["error"]), row
        gate.touch()
        out, err = _finish(job)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    assert _output(where, dst, fs) == references[first], "the destination holds the first job's conversion"
    assert _state_dir(where, dst, fs) == ["output.json"], "the lock is removed when the job ends"


def test_two_jobs_started_together_one_wins(where, fs, sources, references, tmp_path):
    """Both jobs looked at the (empty) destination before either took the lock (MOE_CONVERT_PAUSE_BEFORE_LOCK holds
    both there): once let go, exactly one takes it; the other is refused naming it, and the destination holds the
    winner's conversion (it once ended with one job's shards and the other's index, both exiting 0)."""
    dst = _dst(where, tmp_path, "race")
    jobs = {}
    for i, src in enumerate(sources):
        jobs[i] = _start(src, dst, MOE_CONVERT_PAUSE_BEFORE_LOCK=str(tmp_path / f"lock{i}"),
                         MOE_CONVERT_PAUSE_BEFORE_COMMIT=str(tmp_path / f"commit{i}"))
    try:
        for i, job in jobs.items():
            _wait_for(tmp_path / f"lock{i}", job)
        for i in jobs:
            (tmp_path / f"lock{i}").touch()
        deadline = time.monotonic() + 120
        while True:  # the loser ends; the winner waits before its commit, lock held
            ended = [i for i, j in jobs.items() if j.poll() is not None]
            waiting = [i for i in jobs if Path(f"{tmp_path / f'commit{i}'}.waiting").exists()]
            if ended and waiting:
                break
            assert len(waiting) < 2, "both jobs went on to write the destination"
            assert time.monotonic() < deadline, "neither job ended"
            time.sleep(0.05)
        loser, winner = ended[0], waiting[0]
        assert loser != winner
        _, err = _finish(jobs[loser])
        _assert_refused((jobs[loser].returncode, err), dst, jobs[winner].pid)
        (tmp_path / f"commit{winner}").touch()
        _, err = _finish(jobs[winner])
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
    assert jobs[winner].returncode == 0, err
    assert _output(where, dst, fs) == references[sources[winner]]


# -- stale locks -------------------------------------------------------------------------------------------------


def test_a_crashed_jobs_lock_is_taken_over_and_the_rerun_resumes(where, fs, sources, references, tmp_path):
    src = sources[0]
    dst = _dst(where, tmp_path, "crash")
    crashed = subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(src), "--dst", dst,
                              "--no-progress", "--workers", "1"], env=_env(MOE_CONVERT_CRASH_AFTER="0:100000",
                                                                          MOE_CONVERT_JOURNAL_SECONDS="0"),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 137, crashed.stderr
    assert "lock.json" in _state_dir(where, dst, fs), "a crashed job leaves its lock"
    left = json.loads(Path(dst, LOCK).read_text() if where == "local" else fs.cat_file(f"{dst[5:]}/{LOCK}"))
    again = run_tool("convert.fuse_experts", "--src", str(src), "--dst", dst)
    assert again.stderr.splitlines() == [
        f"warning: {dst}: taking over the lock of a moe-convert job that is no longer running (host "
        f"{socket.gethostname()}, pid {left['pid']}, running since {left['since']})"], again.stderr
    assert "(resumed)" in again.stdout
    assert _output(where, dst, fs) == references[src]
    assert _state_dir(where, dst, fs) == ["output.json"]


@pytest.mark.parametrize("dst_holds", ["nothing else", "an earlier output (--overwrite)"])
def test_a_lock_naming_a_dead_process_is_taken_over(where, fs, sources, references, tmp_path, dst_holds):
    """A lock naming a process that has exited (this host) is stale: a destination holding only it is empty, and
    --overwrite does not count it as a file of the user's."""
    src = sources[0]
    dst = _dst(where, tmp_path, "stale")
    flags = []
    if dst_holds != "nothing else":
        run_tool("convert.fuse_experts", "--src", str(sources[1]), "--dst", dst)
        flags = ["--overwrite"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"tool": "moe-convert", "host": socket.gethostname(), "pid": dead.pid, "start_time": "1",
              "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
              "pid_namespace": os.readlink("/proc/self/ns/pid"), "token": "an-old-token",
              "since": "2026-01-02T03:04:05Z"}
    if where == "local":
        Path(dst, ".moe-convert").mkdir(parents=True, exist_ok=True)
        Path(dst, LOCK).write_text(json.dumps(holder))
    else:
        fs.pipe_file(f"{dst[5:]}/{LOCK}", json.dumps(holder).encode())
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", dst, *flags)
    assert proc.stderr.splitlines() == [
        f"warning: {dst}: taking over the lock of a moe-convert job that is no longer running (host "
        f"{socket.gethostname()}, pid {dead.pid}, running since 2026-01-02T03:04:05Z)"], proc.stderr
    assert _output(where, dst, fs) == references[src]
    assert _state_dir(where, dst, fs) == ["output.json"]


def test_s3_a_lock_from_another_host_is_stale_once_its_heartbeat_is_old(s3env, sources, references, tmp_path):
    """A lock of another host's job is live while it is refreshed (by the store's clock), stale once its last
    refresh is older than MOE_CONVERT_LOCK_STALE_SECONDS; a running job refreshes its own (the heartbeat)."""
    fs = s3env
    dst = f"s3://{BUCKET}/elsewhere-{tmp_path.name}"
    other = {"tool": "moe-convert", "host": "another-host", "pid": 4242, "token": "theirs",
             "since": "2026-01-02T03:04:05Z"}
    fs.pipe_file(f"{dst[5:]}/{LOCK}", json.dumps(other).encode())
    stale = {"MOE_CONVERT_LOCK_STALE_SECONDS": "3"}
    refused = subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(sources[0]), "--dst", dst,
                              "--no-progress"], env=_env(**stale), cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"error: {dst} is in use by another moe-convert job (host another-host, pid 4242, "
                                     "running since 2026-01-02T03:04:05Z)"), refused.stderr
    assert "taken over 3 s after its last heartbeat" in refused.stderr
    written = fs.info(f"{dst[5:]}/{LOCK}")["LastModified"]
    while (datetime_now() - written).total_seconds() < 4.5:
        time.sleep(0.2)
    proc = subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(sources[0]), "--dst", dst,
                           "--no-progress"], env=_env(**stale), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rf"warning: {re.escape(dst)}: taking over the lock of a moe-convert job that has not refreshed "
                        r"it for \d+ s \(host another-host, pid 4242, running since 2026-01-02T03:04:05Z\)\n",
                        proc.stderr), proc.stderr
    assert _output("s3", dst, fs) == references[sources[0]]

    # a job that runs refreshes its lock: its LastModified moves on while it waits at the gate
    gate = tmp_path / "gate"
    job = _start(sources[1], dst, "--overwrite", MOE_CONVERT_PAUSE_BEFORE_COMMIT=str(gate),
                 MOE_CONVERT_LOCK_HEARTBEAT_SECONDS="0.3")
    try:
        _wait_for(gate, job)
        fs.invalidate_cache()
        first = fs.info(f"{dst[5:]}/{LOCK}")["LastModified"]
        deadline = time.monotonic() + 30
        while fs.info(f"{dst[5:]}/{LOCK}", refresh=True)["LastModified"] == first:
            assert time.monotonic() < deadline, "the lock was not refreshed"
            time.sleep(0.3)
        gate.touch()
        _, err = _finish(job)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    assert _output("s3", dst, fs) == references[sources[1]]


def datetime_now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


# -- a lock taken over while the job ran ------------------------------------------------------------------------


def test_a_job_whose_lock_was_taken_over_does_not_commit(where, fs, sources, tmp_path):
    """Before it writes the completion marker the job checks that the lock is still its own: where another job
    took it over (here: the lock replaced by another's), it fails (exit 1) and commits nothing."""
    dst = _dst(where, tmp_path, "lost")
    gate = tmp_path / "gate"
    job = _start(sources[0], dst, MOE_CONVERT_PAUSE_BEFORE_COMMIT=str(gate))
    try:
        _wait_for(gate, job)
        theirs = json.dumps({"tool": "moe-convert", "host": "another-host", "pid": 7, "token": "theirs",
                             "since": "2026-01-02T03:04:05Z"})
        if where == "local":
            Path(dst, LOCK).unlink(missing_ok=True)
            Path(dst, LOCK).write_text(theirs)
        else:
            fs.pipe_file(f"{dst[5:]}/{LOCK}", theirs.encode())
        gate.touch()
        _, err = _finish(job)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "the output was not committed" in lines[0], err
    out = _output(where, dst, fs)
    assert INDEX not in out and not [n for n in out if n.endswith(".safetensors")], "nothing may be committed"
    assert "lock.json" in _state_dir(where, dst, fs), "the other job's lock is left to it"
