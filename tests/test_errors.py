"""Failures a user can cause end in one line naming the file/object and operation, the documented exit code,
no traceback (unless --debug), and on Ctrl-C the line "interrupted: <dst> is incomplete; re-run the same
command to resume", after which re-running does resume, to the same bytes. Alone and under torchrun."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from convert import fuse_experts
from convert.errors import CredentialsError, StorageError, describe
from convert.example import example_tensors, write_checkpoint
from convert.io.storage import Storage, with_retries
from helpers import REPO, run_tool
from s3_server import FlakyProxy

INDEX = "model.safetensors.index.json"
BUCKET = "errors-test"
RESUME_LINE = "is incomplete; re-run the same command to resume"


def call(main, *argv: str) -> int:
    """Run an entry point's main() in this process (world size 1); returns its exit code."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code or 0)


def make_src(path: Path, experts: int = 4, hidden: int = 64) -> Path:
    """A small per-expert qwen3_moe checkpoint in several shards with an index."""
    tensors, cfg = example_tensors("qwen3_moe", 2, experts, hidden, hidden // 2, seed=3)
    write_checkpoint(tensors, cfg, str(path), 40_000)
    return path


def files_of(path: Path) -> dict[str, bytes]:
    """Every file below `path` (relative name -> bytes), less the tool's own `.moe-convert/` bookkeeping."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".moe-convert" not in p.relative_to(path).parts}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted"))]


def assert_clean(stderr: str) -> None:
    """No Python traceback from our code (torchrun's own report aside; a virtual environment inside the checkout
    is not our code)."""
    ours = [f'File "{REPO}/{part}/' for part in ("convert", "launch", "sharding", "bench", "tests")]
    assert not any(o in stderr for o in ours), stderr
    assert "Traceback" not in stderr or "torch/distributed" in stderr, stderr


def assert_once(stderr: str, text: str) -> None:
    """`text` is in exactly one line of stderr that the tool printed (torchrun's failure report, whose
    indented lines quote the tool's message from the error file, aside)."""
    hits = [line for line in stderr.splitlines() if text in line and not line.startswith((" ", "\t"))]
    assert len(hits) == 1, f"{text!r} in {len(hits)} lines:\n{stderr}"


def tool(module: str, *args: str, nproc: int | None = None, env: dict[str, str] | None = None,
         preexec=None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """run_tool with extra environment and a preexec_fn."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module]
    else:
        cmd = [sys.executable, "-m", module]
    full = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=full, timeout=timeout, cwd=REPO,
                          preexec_fn=preexec)


# -- destinations that cannot be written ----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["proc", "under_a_file"])
def test_destination_that_cannot_be_created(case, tmp_path, capsys):
    src = make_src(tmp_path / "src")
    (tmp_path / "plainfile").write_text("mine")
    dst = "/proc/forbidden" if case == "proc" else str(tmp_path / "plainfile" / "sub")
    before = files_of(tmp_path)
    code = call(fuse_experts.main, "--src", str(src), "--dst", dst, "--no-progress")
    err = capsys.readouterr().err
    reason = "No such file or directory (ENOENT)" if case == "proc" else "Not a directory (ENOTDIR)"
    assert code == 2, err
    assert error_lines(err) == [f"error: cannot create directory {dst}: {reason}"], err
    assert "Traceback" not in err
    assert files_of(tmp_path) == before, "the source and the file in the way must be untouched"


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    src = make_src(tmp_path / "src")
    code = call(fuse_experts.main, "--src", str(src), "--dst", "/proc/forbidden", "--no-progress", "--debug")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot create directory /proc/forbidden: No such file or directory (ENOENT)\n")
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err and "storage.py" in err


def test_destination_errors_under_torchrun_print_one_line(tmp_path):
    src = make_src(tmp_path / "src")
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", "/proc/forbidden", nproc=2, check=False,
                    timeout=120)
    assert proc.returncode != 0
    assert_once(proc.stderr, "error: cannot create directory /proc/forbidden: No such file or directory (ENOENT)")
    assert_clean(proc.stderr)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert codes and set(codes) == {"2"}, codes


def test_internal_errors_name_themselves_and_exit_1(tmp_path, capsys, monkeypatch):
    """A bug (here an injected KeyError) is 'internal error: ...', exit 1, never a refusal; --debug adds the traceback."""
    import convert.engine.job as job

    src = make_src(tmp_path / "src")

    def broken_plan(opts, dist):
        raise KeyError("boom")

    monkeypatch.setattr(job, "plan_job", broken_plan)
    code = call(fuse_experts.main, "--src", str(src), "--dst", str(tmp_path / "a"), "--no-progress")
    err = capsys.readouterr().err
    assert code == 1
    assert err == "error: internal error: KeyError: 'boom' (re-run with --debug for the traceback)\n"

    def broken_execute(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(job, "execute", broken_execute)
    code = call(fuse_experts.main, "--src", str(src), "--dst", str(tmp_path / "b"), "--no-progress")
    err = capsys.readouterr().err
    assert code == 1
    assert err == "error: internal error: ZeroDivisionError: division by zero (re-run with --debug for the traceback)\n"
    code = call(fuse_experts.main, "--src", str(src), "--dst", str(tmp_path / "b"), "--no-progress", "--debug")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback (most recent call last)" in err and "broken_execute" in err


def test_example_and_batch_report_one_line(tmp_path):
    (tmp_path / "plainfile").write_text("mine")
    proc = tool("convert.example", str(tmp_path / "plainfile" / "sub"))
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [f"error: {tmp_path / 'plainfile' / 'sub'}: Not a directory (ENOTDIR)"]
    assert_clean(proc.stderr)
    src = make_src(tmp_path / "src")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"jobs": [
        {"name": "bad", "kind": "fuse_experts", "src": str(src), "dst": "/proc/forbidden"},
        {"name": "good", "kind": "fuse_experts", "src": str(src), "dst": str(tmp_path / "out")},
    ]}))
    proc = tool("launch.batch", str(manifest))
    assert proc.returncode == 1
    assert "reason: cannot create directory /proc/forbidden: No such file or directory (ENOENT)" in proc.stdout
    assert (tmp_path / "out" / INDEX).is_file(), "the batch goes on past a failed job"
    assert_clean(proc.stderr)


# -- closed stdout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["convert.inspect", "convert.fuse_experts"])
def test_closed_stdout_exits_quietly(module, tmp_path):
    """`python -m convert.inspect DIR | head -1`: the reader went away; no BrokenPipeError, exit 141 (as SIGPIPE)."""
    src = make_src(tmp_path / "src")
    args = [str(src)] if module == "convert.inspect" else ["--src", str(src), "--dst", str(tmp_path / "o"), "--dry-run"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


# -- local I/O errors: EACCES (as root: without CAP_DAC_OVERRIDE), ENOSPC and EROFS (a tmpfs of our own) ------

def _drop_dac_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that root obeys file modes like anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_unprivileged():
    """A preexec_fn under which mode 000 files are unreadable (None when we are not root anyway)."""
    if os.geteuid() != 0:
        return None
    try:
        probe = subprocess.run(["true"], preexec_fn=_drop_dac_override, capture_output=True, check=False)
    except subprocess.SubprocessError:
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
    return _drop_dac_override


def test_unreadable_source_shard_is_refused(tmp_path):
    preexec = _as_unprivileged()
    src = make_src(tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.chmod(0)
    dst = tmp_path / "out"
    proc = tool("convert.fuse_experts", "--src", str(src), "--dst", str(dst), "--no-progress", preexec=preexec)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [f"error: cannot read {shard}: Permission denied (EACCES)"], proc.stderr
    assert_clean(proc.stderr)
    assert not dst.exists()


def test_destination_without_write_permission_is_refused(tmp_path):
    preexec = _as_unprivileged()
    src = make_src(tmp_path / "src")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    proc = tool("convert.fuse_experts", "--src", str(src), "--dst", str(parent / "out"), "--no-progress",
                preexec=preexec)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [f"error: cannot create directory {parent / 'out'}: Permission denied (EACCES)"]
    assert_clean(proc.stderr)
    assert list(parent.iterdir()) == []


def _in_private_tmpfs(mount: Path, size: str, script: str) -> list[str]:
    """argv running `script` in a private mount namespace where `mount` is a fresh tmpfs of `size`."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a private tmpfs")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {mount}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs -o size={size} tmpfs {mount} && {script}"]


def test_full_disk_names_the_file(tmp_path):
    src = make_src(tmp_path / "src", experts=8, hidden=128)  # ~1.6 MB: more than the tmpfs holds
    mount = tmp_path / "small"
    mount.mkdir()
    dst = mount / "out"
    listing = tmp_path / "listing.txt"
    argv = _in_private_tmpfs(mount, "512k", f"{sys.executable} -m convert.fuse_experts --src {src} --dst {dst} "
                             f"--no-progress; rc=$?; ls -a {dst} > {listing}; exit $rc")
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                          timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert re.search(rf"^error: rank 0: cannot write {re.escape(str(dst))}/model-\d+-of-\d+\.safetensors\.incomplete: "
                     r"No space left on device \(ENOSPC\)$", proc.stderr, re.M), proc.stderr
    assert f"{dst} is incomplete" in proc.stderr and "Re-run the same command to resume" in proc.stderr
    assert_clean(proc.stderr)
    left = listing.read_text().split()
    assert INDEX not in left and not [n for n in left if n.endswith(".safetensors")], left


def test_read_only_destination_is_refused(tmp_path):
    src = make_src(tmp_path / "src")
    mount = tmp_path / "ro"
    mount.mkdir()
    argv = _in_private_tmpfs(mount, "1m", f"mount -o remount,ro {mount} && exec {sys.executable} -m "
                             f"convert.fuse_experts --src {src} --dst {mount} --no-progress")
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                          timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [f"error: cannot create directory {mount}/.moe-convert: "
                                        "Read-only file system (EROFS)"], proc.stderr
    assert_clean(proc.stderr)


# -- object stores: no credentials, 403 ------------------------------------------------------------------------

def test_missing_credentials_are_permanent():
    """NoCredentialsError is asked once, not retried as if transient; a 403 likewise; a 503 is retried."""
    from botocore.exceptions import ClientError, NoCredentialsError

    calls = []

    def fail(exc):
        def fn():
            calls.append(1)
            raise exc
        return fn

    with pytest.raises(CredentialsError) as info:
        with_retries("read", "s3://b/k", fail(NoCredentialsError()), attempts=5)
    assert len(calls) == 1
    assert str(info.value).startswith("no credentials for s3://b/k: set AWS_ACCESS_KEY_ID")
    calls.clear()
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                          "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
    as_s3fs_raises_it = PermissionError("Access Denied")
    as_s3fs_raises_it.__cause__ = denied
    with pytest.raises(StorageError) as info:
        with_retries("write", "s3://b/k", fail(as_s3fs_raises_it), attempts=5)
    assert len(calls) == 1 and str(info.value) == "cannot write s3://b/k: Access Denied (HTTP 403 AccessDenied)"
    calls.clear()
    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
                        "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    with pytest.raises(StorageError) as info:
        with_retries("read", "s3://b/k", fail(slow), attempts=3)
    assert len(calls) == 3 and "failed after 3 attempts: Reduce your request rate (HTTP 503 SlowDown)" in str(info.value)


def test_local_errors_are_not_retried(tmp_path):
    """A local I/O error is asked once and named with its operation and path."""
    st = Storage(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError) as info:
        st.read_bytes("f/g")
    assert str(info.value) == f"cannot read {tmp_path / 'f' / 'g'}: Not a directory (ENOTDIR)"
    assert describe(info.value) == str(info.value)


@pytest.fixture
def no_credentials(s3, monkeypatch, tmp_path):
    """An environment with an S3 endpoint but no credentials anywhere (env, files, instance metadata)."""
    for k in list(os.environ):
        if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL":
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.parametrize("nproc", [None, 2])
def test_no_credentials_is_one_line_and_a_refusal(no_credentials, tmp_path, nproc):
    src = make_src(tmp_path / "src")
    url = f"s3://{BUCKET}/out"
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", url, nproc=nproc, check=False, timeout=120)
    assert proc.returncode == (2 if nproc is None else 1), proc.stderr
    line = f"error: no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    assert_once(proc.stderr, line)
    assert "failed after" not in proc.stderr, "a missing credential is not a transient error"
    assert_clean(proc.stderr)
    if nproc is None:
        assert error_lines(proc.stderr)[0].startswith(line) and len(error_lines(proc.stderr)) == 1
    else:
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
        assert codes and set(codes) == {"2"}, codes


def test_no_credentials_other_entry_points(no_credentials, tmp_path):
    src = make_src(tmp_path / "src")
    url = f"s3://{BUCKET}/src"
    expect = f"no credentials for {url}: set AWS_ACCESS_KEY_ID"
    for module, args, code in [
        ("convert.inspect", [url], 2),
        ("convert.verify", ["--src", url, "--dst", str(src)], 2),
        ("convert.split_experts", ["--src", url, "--dst", str(tmp_path / "o")], 2),
        ("convert.split_adapter", ["--src", url, "--dst", str(tmp_path / "o")], 2),
    ]:
        proc = run_tool(module, *args, check=False, timeout=120)
        assert proc.returncode == code, (module, proc.stderr)
        assert_once(proc.stderr, expect)
        assert len(error_lines(proc.stderr)) == 1, (module, proc.stderr)
        assert_clean(proc.stderr)
    assert not (tmp_path / "o").exists()


def _denying(s3, deny):
    proxy = FlakyProxy(s3.port, every=0, deny=deny)
    return proxy


@pytest.mark.parametrize("nproc", [None, 2])
def test_access_denied_on_upload_part_names_the_object(s3, s3env, tmp_path, monkeypatch, nproc):
    src = make_src(tmp_path / "src")
    ref = tmp_path / "ref"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(ref))
    url = f"s3://{BUCKET}/denied-part-{nproc}"
    proxy = _denying(s3, lambda method, path: method == "PUT" and "uploadId=" in path)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", url, nproc=nproc, check=False, timeout=120)
    finally:
        proxy.stop()
    assert proc.returncode != 0 and proxy.denied >= 1
    if nproc is None:
        assert proc.returncode == 1
    found = re.findall(rf"^error: rank (\d): cannot upload part \d+ of {re.escape(url)}/model-\d+-of-\d+\.safetensors: "
                       r"Access Denied \(HTTP 403 AccessDenied\)$", proc.stderr, re.M)
    assert found and len(found) == len(set(found)), proc.stderr  # each failed rank's error once
    assert_once(proc.stderr, f"{url} is incomplete")
    assert_clean(proc.stderr)
    fs = s3env
    assert not fs.exists(f"{BUCKET}/denied-part-{nproc}/{INDEX}")
    # Access granted again: the same command resumes and ends with the same bytes as a local conversion.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    again = run_tool("convert.fuse_experts", "--src", str(src), "--dst", url, nproc=nproc)
    assert "(resumed)" in again.stdout
    got = {Path(p).name: fs.cat_file(p) for p in fs.ls(f"{BUCKET}/denied-part-{nproc}", detail=False)
           if not p.endswith("/.moe-convert")}
    assert got == files_of(ref)


def test_access_denied_on_put_object_names_the_object(s3, s3env, tmp_path, monkeypatch):
    src = make_src(tmp_path / "src")
    url = f"s3://{BUCKET}/denied-put"
    proxy = _denying(s3, lambda method, path: method == "PUT" and "uploadId=" not in path)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", url, check=False, timeout=120)
    finally:
        proxy.stop()
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [  # the job's first PUT: the destination's lock (convert.engine.dest_lock)
        f"error: cannot write {url}/.moe-convert/lock.json: Access Denied (HTTP 403 AccessDenied)"], proc.stderr
    assert_clean(proc.stderr)
    assert not s3env.exists(f"{BUCKET}/denied-put/{INDEX}")


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------------------

def _start_paused(args: list[str], pause: str, nproc: int | None) -> subprocess.Popen[str]:
    """Start a conversion in its own process group that pauses (MOE_CONVERT_PAUSE_AFTER) mid-stream."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:
        cmd = [sys.executable]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MOE_CONVERT_PAUSE_AFTER=pause,
               MOE_CONVERT_JOURNAL_BYTES="1")
    return subprocess.Popen([*cmd, "-m", "convert.fuse_experts", *args, "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True)


def _interrupt_when_paused(proc: subprocess.Popen[str], sig: int) -> tuple[str, str]:
    """Read stderr until the job says it paused, send `sig` to its process group (as a terminal's Ctrl-C
    does), and return (stdout, stderr)."""
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "paused (MOE_CONVERT_PAUSE_AFTER" in line:
                break
        else:
            raise AssertionError("the job ended without pausing:\n" + "".join(seen))
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out, "".join(seen) + err


@pytest.mark.parametrize("nproc,sig", [(None, signal.SIGINT), (None, signal.SIGTERM), (2, signal.SIGINT)])
def test_interrupt_prints_one_line_and_the_rerun_resumes(tmp_path, nproc, sig):
    src = make_src(tmp_path / "src", experts=8, hidden=128)
    ref = tmp_path / "ref"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(ref))
    dst = tmp_path / "out"
    proc = _start_paused(["--src", str(src), "--dst", str(dst)], "1:200000" if nproc else "0:200000", nproc)
    out, err = _interrupt_when_paused(proc, sig)
    line = f"interrupted: {dst} {RESUME_LINE}"
    assert_once(err, line)
    assert_clean(err)
    assert "KeyboardInterrupt" not in err or "torch/distributed" in err, err
    if nproc is None:
        assert proc.returncode == 128 + sig and error_lines(err) == [line], err
    else:
        assert proc.returncode != 0
    assert not (dst / INDEX).exists()
    stats = tmp_path / "stats.json"
    again = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(dst), "--stats", str(stats), nproc=nproc)
    assert "(resumed)" in again.stdout
    report = json.loads(stats.read_text())
    total = sum(len(v) for k, v in files_of(ref).items() if k.endswith(".safetensors"))
    assert 0 < sum(r["written_bytes"] for r in report["ranks"]) < total, "the re-run must skip finished work"
    assert files_of(dst) == files_of(ref)
