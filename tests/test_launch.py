"""Launchers: `--nproc N` (ranks forked by the tool), torchrun and accelerate launch, with real processes.

Every multi-rank job here is a real gloo group: the forked ranks of --nproc, torchrun's or
accelerate's workers. Outputs are compared byte for byte across launchers; exit codes,
messages, signals and resumes are checked on the process the user started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, run_tool

RESUMED = "(resumed)"


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def _files(path: Path) -> dict[str, bytes]:
    """Every file of a conversion's output (not its hidden state), by name."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example checkpoint (`python -m convert.example`): Qwen3-MoE names and shapes, 5 shards, 8.8 MB."""
    root = tmp_path_factory.mktemp("launch")
    run_tool("convert.example", str(root / "src"))
    return root / "src"


@pytest.fixture(scope="module")
def one_rank(example, tmp_path_factory) -> Path:
    """The fuse of `example` by one plain process: the reference every launcher must reproduce."""
    dst = tmp_path_factory.mktemp("ref") / "fused"
    run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(dst))
    return dst


def _start(module: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", module, *args, "--no-progress"], cwd=REPO, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_pause(proc: subprocess.Popen[str], timeout: float = 120) -> int:
    """Read the job's stderr until a rank reports MOE_CONVERT_PAUSE_AFTER; returns that rank's pid."""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "paused (MOE_CONVERT_PAUSE_AFTER, pid " in line:
            return int(line.split("pid ")[1].rstrip(")\n"))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no rank paused; exit {proc.poll()}")


def test_nproc_output_is_byte_identical_to_torchrun_and_one_rank(example, one_rank, tmp_path):
    forked = run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(tmp_path / "nproc"), "--nproc", "2")
    run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(tmp_path / "torchrun"), nproc=2)
    assert "with 2 rank(s)" in forked.stdout
    assert forked.stderr == ""
    want = _files(one_rank)
    assert _files(tmp_path / "nproc") == want
    assert _files(tmp_path / "torchrun") == want
    # only the output record is left of the job's bookkeeping (no state, no journals)
    assert [p.name for p in (tmp_path / "nproc" / ".moe-convert").iterdir()] == ["output.json"]


def _held(stats: Path) -> list[dict[str, int]]:
    """Per rank of a job's --stats: the pieces it ran, and the pieces and output slots it was sent."""
    return [{"ran": r["pieces"], "held": r["held"]["pieces"], "slots": r["held"]["slots"]}
            for r in json.loads(stats.read_text())["ranks"]]


def _stats_of(src: Path, dst: Path, extra: list[str], nproc: int | None = None) -> Path:
    stats = dst.parent / f"{dst.name}.stats.json"
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(dst), "--stats", str(stats), *extra, nproc=nproc)
    return stats


def test_stats_account_each_ranks_streaming_time(example, tmp_path):
    """--stats `phase_seconds`: the workers' phases (a byte copy's `copy`, `writeback`) sum to at most --workers
    times the rank's data phase, the prefetch thread's `prefetch` and the calling thread's `wait` each to at most
    the data phase."""
    stats = _stats_of(example, tmp_path / "out", ["--nproc", "2", "--workers", "2"])
    for r in json.loads(stats.read_text())["ranks"]:
        ph, (a, b) = r["phase_seconds"], r["data_span"]
        assert {"copy", "writeback", "prefetch", "wait"} <= set(ph) and min(ph.values()) >= 0
        assert sum(v for k, v in ph.items() if k not in ("prefetch", "wait")) <= 2 * (b - a) + 0.01
        assert ph["prefetch"] <= b - a + 0.01 and ph["wait"] <= b - a + 0.01


@pytest.mark.parametrize("launcher", ["nproc", "torchrun"])
def test_each_rank_is_sent_only_its_own_pieces(example, one_rank, tmp_path, launcher):
    """Rank 0 plans and sends each rank its own part (launch.dist.Dist.scatter, in both groups): a rank
    holds the pieces it runs and the slots they write, not the whole plan; the output is the one-rank one."""
    (whole,) = _held(_stats_of(example, tmp_path / "one", []))  # one rank: the whole plan is its own
    assert whole["held"] == whole["ran"] > 3 and whole["slots"] > 3
    dst = tmp_path / launcher
    ranks = _held(_stats_of(example, dst, ["--nproc", "3"]) if launcher == "nproc"
                  else _stats_of(example, dst, [], nproc=3))
    assert len(ranks) == 3
    assert sum(r["ran"] for r in ranks) == whole["ran"]
    for r in ranks:
        assert r["held"] == r["ran"]  # a fresh job: every piece it was sent is one it runs
        assert 0 < r["held"] < whole["held"] and 0 < r["slots"] < whole["slots"]
    assert _files(dst) == _files(one_rank)


def test_nproc_split_verify_and_batch(example, one_rank, tmp_path):
    """Every entry point takes --nproc: split back (3 ranks), verify it, and a batch manifest."""
    run_tool("convert.split_experts", "--src", str(one_rank), "--dst", str(tmp_path / "split"), "--nproc", "3")
    shards = {k: v for k, v in _files(tmp_path / "split").items() if k.endswith(".safetensors")}
    orig = _files(example)
    from helpers import load_dir, raw_bytes

    a, b = load_dir(example), load_dir(tmp_path / "split")
    assert a.keys() == b.keys() and all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in a)
    assert shards and orig["config.json"] == _files(tmp_path / "split")["config.json"]
    ok = run_tool("convert.verify", "--src", str(example), "--dst", str(one_rank), "--nproc", "2")
    assert "OK" in ok.stdout
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"jobs": [{"kind": "fuse_experts", "src": str(example), "dst": str(tmp_path / "b")}]}))
    batch = run_tool("launch.batch", str(manifest), "--nproc", "2")
    assert "done" in batch.stdout
    assert _files(tmp_path / "b") == _files(one_rank)


def test_nproc_keeps_the_refusal_exit_code(example, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    proc = run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--nproc", "2", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --dst {dst} exists and is not empty (notes.txt); choose an empty or new directory"]
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]


def test_nproc_verify_mismatch_exits_1(example, one_rank, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(one_rank, bad)
    shard = next(bad.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # a byte of the last tensor's data, not of the header
    shard.write_bytes(bytes(data))
    proc = run_tool("convert.verify", "--src", str(example), "--dst", str(bad), "--nproc", "2", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_nproc_below_one_is_refused_by_the_parser(example, tmp_path, value):
    proc = run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(tmp_path / "o"), "--nproc", value,
                    check=False)
    assert proc.returncode == 2
    assert f"argument --nproc: expected a whole number of processes >= 1, got '{value}'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_nproc_under_torchrun_is_refused(example, tmp_path):
    # torchrun's own parser (Python 3.11's argparse) rejects `--nproc` anywhere on its command line as an
    # ambiguous abbreviation of --nproc-per-node: hand the flags over in the environment instead.
    args = ["--src", str(example), "--dst", str(tmp_path / "o"), "--nproc", "2", "--no-progress"]
    proc = _torchrun_with_a_late_rank0(tmp_path, args)
    assert proc.returncode == 1  # torchrun's code for any failed rank (README: Launchers)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert lines == ["error: --nproc 2 starts its own ranks, but this process was started by torchrun; "
                     "drop --nproc, or run without the launcher"], proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "o").exists()


def _torchrun_with_a_late_rank0(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """fuse_experts' main(args) as 2 torchrun ranks, rank 0 starting 2 s after rank 1: torchrun stops the job
    when its first rank exits, so an error that only rank 0 reports must still come out."""
    script = tmp_path / "entry.py"
    script.write_text("import json, os, time\nfrom convert.fuse_experts import main\n"
                      "time.sleep(2.0 if os.environ['RANK'] == '0' else 0.0)\n"
                      "main(json.loads(os.environ['ARGS']))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    return subprocess.run(cmd, cwd=REPO, env=_env(ARGS=json.dumps(args)), capture_output=True, text=True,
                          timeout=300)


def test_a_usage_error_under_torchrun_is_one_usage_and_one_error(example, tmp_path):
    proc = _torchrun_with_a_late_rank0(tmp_path, ["--src", str(example), "--dst", str(tmp_path / "o"),
                                                  "--no-such-flag"])
    assert proc.returncode == 1
    errors = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert errors == ["convert.fuse_experts: error: unrecognized arguments: --no-such-flag"], proc.stderr
    assert sum(x.startswith("usage:") for x in proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_nproc_under_srun_is_refused(example, tmp_path):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    proc = subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(example), "--dst",
                           str(tmp_path / "o"), "--nproc", "2"], cwd=REPO, env=_env(**env), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --nproc 2 starts its own ranks, but this process was started by srun (SLURM_NTASKS=4); "
        "drop --nproc, or run without the launcher"]


def test_a_crashed_rank_fails_the_job_and_the_rerun_resumes(example, one_rank, tmp_path):
    dst = tmp_path / "out"
    args = ("--src", str(example), "--dst", str(dst), "--nproc", "2")
    crash = {"MOE_CONVERT_CRASH_AFTER": "1:2000000", "MOE_CONVERT_JOURNAL_BYTES": "500000"}
    proc = subprocess.run([sys.executable, "-m", "convert.fuse_experts", *args, "--no-progress"], cwd=REPO,
                          env=_env(**crash), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: rank 1 died (exit code 137); re-run the same command to resume"]
    assert not (dst / "model.safetensors.index.json").exists()
    stats = tmp_path / "stats.json"
    again = run_tool("convert.fuse_experts", *args, "--stats", str(stats))
    assert RESUMED in again.stdout
    report = json.loads(stats.read_text())
    assert report["resumed"] and report["world_size"] == 2
    total = sum(len(v) for k, v in _files(one_rank).items() if k.endswith(".safetensors"))
    assert sum(r["written_bytes"] for r in report["ranks"]) < total, "the re-run must skip journaled work"
    assert _files(dst) == _files(one_rank)


def test_a_rank_killed_by_a_signal_fails_the_job_in_one_line(example, one_rank, tmp_path):
    dst = tmp_path / "out"
    proc = _start("convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--nproc", "2",
                  MOE_CONVERT_PAUSE_AFTER="1:1000000")
    paused = _wait_for_pause(proc)
    workers = psutil.Process(proc.pid).children()
    os.kill(paused, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["error: rank 1 died (signal SIGKILL); re-run the same command to resume"]
    assert len(workers) == 2 and not any(w.is_running() for w in workers)
    again = run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--nproc", "2")
    assert RESUMED in again.stdout
    assert _files(dst) == _files(one_rank)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_to_the_parent_stops_every_rank(example, one_rank, tmp_path, sig, code):
    dst = tmp_path / "out"
    proc = _start("convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--nproc", "2",
                  MOE_CONVERT_PAUSE_AFTER="1:1000000")
    _wait_for_pause(proc)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode == code
    gone, alive = psutil.wait_procs(workers, timeout=10)  # SIGKILL: the ranks die with their parent (PDEATHSIG)
    assert not alive, f"orphaned ranks: {alive}"
    assert not (dst / "model.safetensors.index.json").exists()
    again = run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--nproc", "2")
    assert RESUMED in again.stdout
    assert _files(dst) == _files(one_rank)


def test_the_parent_imports_torch_once_and_forks_without_threads(example):
    # reading the input ahead meanwhile (launch.readahead) leaves no thread behind either
    files = sorted(str(p) for p in example.glob("*.safetensors"))
    code = ("import convert.fuse_experts, convert.split_experts, convert.fuse_adapter, convert.split_adapter, "
            "convert.verify, launch.batch, launch.local as l, sys; "
            f"l._prepare_parent(True, {files!r}); assert 'torch' in sys.modules; print(l.native_threads())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_a_byte_copy_job_of_several_ranks_never_imports_torch(example, tmp_path):
    # torch made unimportable: the --nproc ranks' group (launch.hub) and a byte-copy fuse need none of it
    dst = tmp_path / "fused"
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = ['fuse_experts', '--src', {str(example)!r}, '--dst', {str(dst)!r}, '--nproc', '3']; "
            "runpy.run_module('convert.fuse_experts', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "with 3 rank(s)" in proc.stdout
    check = run_tool("convert.verify", "--src", str(example), "--dst", str(dst))
    assert "OK:" in check.stdout


def test_torchrun_failure_box_shows_the_tools_message(example, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    proc = run_tool("convert.fuse_experts", "--src", str(example), "--dst", str(dst), nproc=2, check=False)
    assert proc.returncode == 1  # torchrun's own code for any failed rank (README: Launchers)
    root_cause = proc.stderr.split("Root Cause")[1]
    assert "exitcode  : 2" in root_cause
    # the first rank torchrun saw fail: rank 0 (the message) or another rank (which points at rank 0's message)
    assert (f"traceback : error: --dst {dst} exists and is not empty" in root_cause
            or "rank 0's messages say why" in root_cause), root_cause
    assert f"error: --dst {dst} exists and is not empty" in proc.stderr
    assert "<N/A>" not in proc.stderr


def test_accelerate_launch_runs_ranks_on_cpu(example, one_rank, tmp_path):
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "convert.fuse_experts", "--src", str(example), "--dst", str(tmp_path / "acc"), "--no-progress"]
    env = _env(HF_HOME=str(tmp_path / "hf"))  # no user accelerate config
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "with 2 rank(s)" in proc.stdout
    assert _files(tmp_path / "acc") == _files(one_rank)


def test_the_hub_scatters_each_rank_its_own_part_and_gathers_to_rank_0_only():
    """launch.hub: rank 0 builds and sends one part per rank (held by the hub for a rank that has not joined
    yet); each rank receives only its own; gather_main gives every part to rank 0 and None to the others."""
    import socket
    import threading

    from launch import hub

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    token = hub.new_token()
    hub.Hub(listener, 3, token).start()
    rank0 = hub.HubClient(["127.0.0.1"], port, token, 0, 3, 30)
    built: list[int] = []
    assert rank0.scatter(lambda r: built.append(r) or {"rank": r, "data": bytes([r]) * 1000}) == \
        {"rank": 0, "data": b"\0" * 1000}
    assert built == [1, 2, 0]  # one part at a time, rank 0's own last (never sent)
    got: dict[int, object] = {}

    def late(rank: int) -> None:  # joins only after rank 0 sent its part
        client = hub.HubClient(["127.0.0.1"], port, token, rank, 3, 30)
        got[rank] = client.scatter(None)
        got[rank + 10] = client.gather_main(f"from {rank}")

    threads = [threading.Thread(target=late, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    assert rank0.gather_main("from 0") == ["from 0", "from 1", "from 2"]
    for t in threads:
        t.join(30)
    assert got == {1: {"rank": 1, "data": b"\1" * 1000}, 2: {"rank": 2, "data": b"\2" * 1000}, 11: None, 12: None}


def test_the_hub_lets_in_only_a_connection_that_sends_the_jobs_token():
    """A connection without the token (a port scan, another job's rank) is dropped unread, the group goes on;
    a client given several addresses skips one where no hub of its job answers."""
    import socket

    from launch import hub

    token = hub.new_token()
    port = hub.serve_everywhere(2, token)
    stranger = socket.create_connection(("127.0.0.1", port), timeout=10)
    stranger.sendall(b"x" * hub.TOKEN_BYTES)
    assert stranger.recv(1) == b""  # closed without an answer
    with pytest.raises(hub.GroupError, match="cannot reach rank 0's hub"):
        hub.HubClient(["127.0.0.1"], port, hub.new_token(), 1, 2, 10)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()
    clients = [hub.HubClient(["127.0.0.1"], port, token, 0, 2, 30)]
    with pytest.raises(hub.GroupError, match=f"127.0.0.1:{dead}"):
        hub.HubClient(["127.0.0.1"], dead, token, 1, 2, 10)
    clients.append(hub.HubClient(["127.0.0.2", "127.0.0.1"], port, token, 1, 2, 30))  # no hub on .2's port
    import threading

    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(clients[1].gather("b")))
    t.start()
    assert clients[0].gather("a") == ["a", "b"]
    t.join(30)
    assert got == [["a", "b"]]


def test_the_store_client_speaks_torchs_tcpstore():
    """launch.store against torch's own TCPStore server: a value set by either side is read by the other,
    and get waits for a key another client sets later."""
    import threading

    from torch.distributed import TCPStore

    from launch.store import StoreClient

    server = TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    server.set("from/torch", b"t" * 70000)
    ours, other = StoreClient("127.0.0.1", server.port, 30), StoreClient("127.0.0.1", server.port, 30)
    assert ours.get("from/torch") == b"t" * 70000
    ours.set("from/us", b"u")
    assert server.get("from/us") == b"u"
    timer = threading.Timer(0.5, lambda: ours.set("later", b"v"))
    timer.start()
    assert other.get("later") == b"v"
    timer.join()


def _torch_blocked(module: str, *args: str) -> list[str]:
    """A torchrun worker command (for --no-python) running `module` with torch made unimportable."""
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = [{module!r}, *{list(args)!r}]; runpy.run_module({module!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


def test_torchrun_ranks_of_two_agents_move_bytes_without_torch(example, one_rank, tmp_path):
    """Two torchrun agents (two "nodes" on this host, c10d rendezvous), one rank each, torch unimportable in
    the ranks: they find each other through torchrun's store and the hub, and the output is byte-identical."""
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    dst = tmp_path / "fused"
    worker = _torch_blocked("convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--no-progress")
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                                "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "two-agents",
                                "--rdzv-endpoint", f"127.0.0.1:{port}", "--no-python", *worker],
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [o[1][-3000:] for o in outs]
    assert "with 2 rank(s)" in outs[0][0] + outs[1][0]
    assert _files(dst) == _files(one_rank)


def test_torchrun_ranks_fall_back_to_gloo_where_the_store_is_not_shared(example, one_rank, tmp_path):
    """MOE_CONVERT_GROUP=gloo (and launchers without torchrun's shared store) join a gloo group as before."""
    dst = tmp_path / "gloo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           *_torch_blocked("convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--no-progress")]
    blocked = subprocess.run(cmd, cwd=REPO, env=_env(MOE_CONVERT_GROUP="gloo"), capture_output=True, text=True,
                             timeout=300)
    assert blocked.returncode != 0  # gloo needs torch: the blocked import proves this path is taken
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "convert.fuse_experts", "--src", str(example), "--dst", str(dst), "--overwrite",
                          "--no-progress"], cwd=REPO, env=_env(MOE_CONVERT_GROUP="gloo"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(dst) == _files(one_rank)
