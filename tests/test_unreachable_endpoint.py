"""An S3 endpoint that refuses connections or whose host does not resolve fails the job in seconds (not after minutes
of retries), with one line naming the endpoint; transient errors (5xx, throttling, timeouts, resets) are still
retried."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

from convert.example import example_tensors, write_checkpoint
from convert.io.storage import Storage, with_retries
from helpers import REPO
from s3_server import CREDENTIALS, free_port


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unreachable") / "src"
    tensors, cfg = example_tensors("qwen3_moe", layers=2, experts=4, hidden=64, inter=48, seed=3)
    write_checkpoint(tensors, cfg, str(root), 100_000)
    return root


def _closed_endpoint() -> str:
    """An endpoint on a loopback port nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


def _run(endpoint: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = dict(os.environ, **CREDENTIALS, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=endpoint)
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "convert.fuse_experts", *args, "--no-progress"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"still retrying after {exc.timeout} s") from None
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("side", ["dst", "src --nproc 2"])
def test_a_closed_endpoint_fails_the_job_at_once(source, tmp_path, side):
    """It took 114 s (botocore's 5 attempts with backoff, times the tool's 8) to fail the same way every time."""
    endpoint = _closed_endpoint()
    if side == "dst":
        url, args = "s3://moe-unreachable/out", ("--src", str(source), "--dst", "s3://moe-unreachable/out")
    else:
        url, args = "s3://moe-unreachable/src", ("--src", "s3://moe-unreachable/src", "--dst", str(tmp_path / "out"),
                                                "--nproc", "2")
    proc, seconds = _run(endpoint, *args)
    assert proc.returncode == 2, proc.stderr  # before anything was written
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"error: cannot reach the S3 endpoint {endpoint} for {url}: connection refused"], proc.stderr
    assert seconds < 20, f"{seconds:.1f} s to fail"
    assert not (tmp_path / "out").exists()


def test_the_client_sends_one_request_to_an_endpoint_that_refuses(tmp_path, monkeypatch):
    """botocore's own retries of the request are skipped too (convert.io.storage.fail_fast_when_unreachable)."""
    from convert.errors import EndpointUnreachable

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    endpoint = _closed_endpoint()
    st = Storage("s3://moe-unreachable/x", {"endpoint_url": endpoint})
    sent: list[str] = []
    st.fs.session.register("before-send.s3", lambda **kw: sent.append(kw["request"].url))
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachable) as info:
        st.exists()
    assert time.monotonic() - t0 < 10
    assert len(sent) == 1, sent
    assert str(info.value) == f"cannot reach the S3 endpoint {endpoint} for s3://moe-unreachable/x: connection refused"
    assert info.value.exit_code == 1  # a refusal (2) only where nothing was written yet: the job decides


def _unreachable(cause: BaseException) -> EndpointConnectionError:
    exc = EndpointConnectionError(endpoint_url="http://store.example:9000/bucket/key", error=cause)
    exc.__cause__ = cause
    return exc


CASES = [  # (error, calls made, text of the error raised)
    (_unreachable(ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 9000)")), 1,
     "cannot reach the S3 endpoint http://store.example:9000 for s3://b/k: connection refused"),
    (_unreachable(OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9000, 0, 0), "
                          "[Errno 111] Connect call failed ('127.0.0.1', 9000)")), 1,
     "cannot reach the S3 endpoint http://store.example:9000 for s3://b/k: connection refused"),
    (_unreachable(socket.gaierror(socket.EAI_NONAME, "Name or service not known")), 1,
     "cannot reach the S3 endpoint http://store.example:9000 for s3://b/k: unknown host (Name or service not known)"),
    # transient, still retried: a resolver that may answer next time, a timeout, a connection reset mid-transfer
    (_unreachable(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")), 3, "failed after 3"),
    (ReadTimeoutError(endpoint_url="http://store.example:9000/bucket/key"), 3, "failed after 3"),
    (ConnectionClosedError(endpoint_url="http://store.example:9000/bucket/key"), 3, "failed after 3"),
]


def test_unreachable_is_permanent_and_transient_errors_are_retried():
    from convert.errors import EndpointUnreachable, StorageError

    for error, calls, text in CASES:
        sent = []

        def fn(sent=sent, error=error):
            sent.append(1)
            raise error

        with pytest.raises(StorageError) as info:
            with_retries("read", "s3://b/k", fn, attempts=3)
        assert len(sent) == calls, (error, sent)
        assert text in str(info.value), str(info.value)
        assert isinstance(info.value, EndpointUnreachable) == (calls == 1), error
