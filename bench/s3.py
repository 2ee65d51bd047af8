"""Object storage at scale, simulated: the tool against `aws s3 cp` through a realistic local S3 endpoint.

    python -m bench.s3 [--preset small|tiny|device] [--conns 1,2,4,8] [--cases fuse:s3-s3,...]
                       [--sweep ENV=v1,v2 ...] [--out bench/results] [--no-peer]

Writes a synthetic checkpoint of real shapes (bench.synthetic), starts bench.s3sim (moto
behind a proxy: 20-50 ms first-byte latency, a per-connection bandwidth cap, 503 SlowDown
above a request rate per prefix) and, for each case and each connection count N, runs
- the tool with ranks x workers = N (`python -m convert.X --nproc ranks --workers workers`);
- the peer on the same bytes: `aws s3 cp --recursive` with max_concurrent_requests = N
  (and multipart_chunksize = the tool's part size) from a temporary AWS_CONFIG_FILE.
Cases: `fuse:s3-s3` (per-expert on S3 -> fused on S3), `split:s3-s3` (fused -> per-expert),
`fuse:local-s3`, `fuse:s3-local`. The peer of s3-s3 is a download then an upload of the
same bytes through local disk (a server-side copy moves no bytes through the client, so
it is no peer for a conversion). Reported per case and N: GB/s (output bytes / seconds;
the tool's data phase from --stats and its wall time), the scaling ratio
thr(N) / (N x thr(1)), tool / peer, the 503s the endpoint returned and how many of those
requests came again (retried), and the most requests the endpoint saw in flight at once.

`--sweep MOE_CONVERT_MAX_PART=8388608,16777216` repeats the tool's runs under each value of
an environment variable (for tuning); the peer runs once per N. Results: S3.md and
s3.json in --out (nothing is written into the repository otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.run import pythonpath
from bench.s3sim import CREDENTIALS, S3Sim, SimConfig
from bench.synthetic import checkpoint_specs, write_synthetic

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
BUCKET = "bench"
CASES = ("fuse:s3-s3", "split:s3-s3", "fuse:local-s3", "fuse:s3-local")


@dataclass(frozen=True)
class Settings:
    """What one benchmark run covers."""

    preset: str = "qwen3-30b-a3b"
    experts: int | None = 32
    layers: int = 2
    vocab: int = 8000
    src_shard: int = 200_000_000
    max_shard: str = "200MB"
    conns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    workers: tuple[int, ...] = (4,)  # at most this many workers per rank (one layout per value), then more ranks
    cases: tuple[str, ...] = CASES
    peer: bool = True
    repeats: int = 1
    latency_ms: tuple[float, float] = (20.0, 50.0)
    conn_mbps: float = 80.0
    slowdown_rps: float = 0.0
    timeout: float = 900.0
    sim_procs: int = 0  # proxy processes; 0 = a quarter of the CPUs (at least 1)
    dilate: float = 1.0  # the endpoint K times slower (bandwidth / K, latency x K, request rate / K)
    weak_mb: float = 0.0  # > 0: weak scaling, a checkpoint of about N x weak_mb MB at N connections


SMALL = Settings()
LARGE = Settings(layers=4, workers=(4, 16))  # for a many-core machine: 1.5 GB, up to 16 workers per rank
TINY = Settings(preset="tiny", experts=None, layers=2, vocab=128, src_shard=100_000, max_shard="200KB",
                conns=(1, 2), workers=(2,), cases=("fuse:s3-s3", "fuse:s3-local"), conn_mbps=20.0,
                latency_ms=(5.0, 10.0), slowdown_rps=5.0, timeout=120.0)
PRESETS = {"small": SMALL, "large": LARGE, "tiny": TINY}


@dataclass
class Row:
    """One measured run."""

    case: str
    who: str  # "tool" or "peer"
    conns: int
    ranks: int
    workers: int
    nbytes: int
    env: dict[str, str] = field(default_factory=dict)
    wall: float = 0.0
    data: float = 0.0  # the tool's data phase (slowest rank); the peer: its wall time
    sim: dict[str, Any] = field(default_factory=dict)  # the endpoint's counters over the run
    legs: list[float] = field(default_factory=list)  # the peer's s3-s3: download, upload
    part: int = 0  # largest multipart part (the tool) / multipart_chunksize (the peer)
    workers_cap: int = 0  # the tool: the layout's most workers per rank
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the command (client) and the simulator
    peak_rss: int = 0  # the tool: largest peak RSS of a rank (bytes)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.data / GB if self.data else 0.0

    @property
    def wall_gbps(self) -> float:
        return self.nbytes / self.wall / GB if self.wall else 0.0


def layout(n: int, max_workers: int) -> tuple[int, int]:
    """(ranks, workers) with ranks x workers = n: one rank up to `max_workers` workers, then more ranks."""
    workers = max(1, min(n, max_workers))
    while n % workers:
        workers -= 1
    return n // workers, workers


class Runner:
    """Runs the cases of one Settings against one simulator."""

    def __init__(self, s: Settings, sim: S3Sim, work: Path, log: Any) -> None:
        self.s, self.sim, self.work, self.log = s, sim, work, log
        self.env = dict(os.environ, **CREDENTIALS, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1",
                        AWS_ENDPOINT_URL=sim.url, AWS_EC2_METADATA_DISABLED="true")
        import boto3
        from botocore.config import Config

        # Setup and clean-up go straight to moto (not through the proxy): they are not measured.
        self.admin = boto3.client("s3", endpoint_url=sim.backend.url, region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing",
                                  config=Config(max_pool_connections=16))
        self.admin.create_bucket(Bucket=BUCKET)
        self.rows: list[Row] = []
        self.cpu = {"client": 0.0, "sim": 0.0}

    # -- objects
    def upload_dir(self, local: Path, prefix: str) -> None:
        for f in sorted(local.iterdir()):
            if f.is_file():
                self.admin.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.name}", Body=f.read_bytes())

    def clear(self, prefix: str) -> None:
        """Delete every object and unfinished upload below `prefix`."""
        pages = self.admin.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            self.admin.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        for u in self.admin.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix + "/").get("Uploads", []):
            self.admin.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])

    def object_bytes(self, prefix: str, suffix: str = ".safetensors") -> int:
        pages = self.admin.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
        return sum(o["Size"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(suffix))

    # -- running
    def _run(self, cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
        """Run `cmd`; returns (wall seconds, output). Adds the CPU it and the simulator used to self.cpu."""
        usage0, sim0 = resource.getrusage(resource.RUSAGE_CHILDREN), self.sim.cpu_seconds()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=REPO,
                              timeout=self.s.timeout)
        seconds = time.perf_counter() - t0
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu["client"] += usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
        self.cpu["sim"] += self.sim.cpu_seconds() - sim0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return seconds, proc.stdout + proc.stderr

    def tool(self, case: str, src: str, dst: str, nbytes: int, n: int, max_workers: int, env: dict[str, str]) -> Row:
        op, _ = case.split(":")
        ranks, workers = layout(n, max_workers)
        stats = self.work / "stats.json"
        args = ["--src", src, "--dst", dst, "--workers", str(workers), "--max-shard-size", self.s.max_shard,
                "--stats", str(stats), "--no-progress"]
        module = f"convert.{op}_experts"
        cmd = [sys.executable, "-m", module, "--nproc", str(ranks), *args]
        self.sim.reset()
        self.cpu = {"client": 0.0, "sim": 0.0}
        wall, _ = self._run(cmd, env)
        sim = self.sim.stats()
        ranks_stats = json.loads(stats.read_text())["ranks"]
        return Row(case, "tool", n, ranks, workers, nbytes, dict(env), wall, max(r["seconds"] for r in ranks_stats),
                   sim, part=part_size(nbytes, ranks, workers, env) if dst.startswith("s3://") else 0,
                   workers_cap=max_workers, cpu=dict(self.cpu),
                   peak_rss=max(r["peak_rss_bytes"] for r in ranks_stats))

    def aws(self, args: list[str], n: int, chunk: int) -> float:
        cfg = self.work / "aws-config"
        cfg.write_text("[default]\nregion = us-east-1\ns3 =\n"
                       f"    max_concurrent_requests = {n}\n    multipart_chunksize = {chunk}\n"
                       f"    multipart_threshold = {chunk}\n    max_queue_size = 10000\n")
        cmd = ["aws", "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", self.sim.url, *args]
        seconds, _ = self._run(cmd, {"AWS_CONFIG_FILE": str(cfg), "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
        return seconds

    def peer(self, case: str, src: str, dst: str, nbytes: int, n: int, chunk: int) -> Row:
        self.sim.reset()
        self.cpu = {"client": 0.0, "sim": 0.0}
        legs: list[float] = []
        if src.startswith("s3://") and dst.startswith("s3://"):
            stage = self.work / "peer-stage"
            legs.append(self.aws([src, str(stage)], n, chunk))
            legs.append(self.aws([str(stage), dst], n, chunk))
            shutil.rmtree(stage)
        else:
            legs.append(self.aws([src, dst], n, chunk))
            if not dst.startswith("s3://"):  # durable, as the tool's shards are (it fsyncs them) and cp -r + sync
                legs.append(fsync_tree(Path(dst)))
        sim = self.sim.stats()
        return Row(case, "peer", n, 1, n, nbytes, {}, sum(legs), sum(legs), sim, legs, chunk, cpu=dict(self.cpu))


def fsync_tree(root: Path) -> float:
    """fsync every file below `root`; returns the seconds it took."""
    t0 = time.perf_counter()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - t0


def part_size(nbytes: int, ranks: int, workers: int, env: dict[str, str]) -> int:
    """The tool's largest multipart part for this job and layout under `env` (the peer's chunk size is set to it)."""
    from sharding.parts import choose_max_part

    fixed = env.get("MOE_CONVERT_MAX_PART", os.environ.get("MOE_CONVERT_MAX_PART"))
    if fixed:
        return int(fixed)
    threads = min(workers, int(env.get("MOE_CONVERT_UPLOAD_THREADS", os.environ.get("MOE_CONVERT_UPLOAD_THREADS", 64))))
    return choose_max_part(nbytes, ranks, threads)


@dataclass
class Sources:
    """One synthetic checkpoint on local disk and, as needed, on the simulated S3."""

    local: Path  # per-expert
    fused: Path  # its fusion (the source of split)
    nbytes: int  # tensor bytes
    experts: int
    uploaded: set[str] = field(default_factory=set)

    def shard_bytes(self, op: str) -> int:
        """Bytes of the output shards of `op` (fuse: the fused shards, split: the per-expert ones)."""
        return sum(f.stat().st_size for f in (self.fused if op == "fuse" else self.local).glob("*.safetensors"))


def experts_for(s: Settings, n: int) -> int | None:
    """E per layer: the preset's (strong scaling), or enough that the checkpoint is about N x `s.weak_mb` MB."""
    if not s.weak_mb:
        return s.experts
    specs, _ = checkpoint_specs(s.preset, s.layers, experts=1, vocab=s.vocab)
    one = sum(x.nbytes for x in specs)  # everything with one expert per layer
    specs2, _ = checkpoint_specs(s.preset, s.layers, experts=2, vocab=s.vocab)
    per_expert = sum(x.nbytes for x in specs2) - one  # one more expert in every layer
    return max(2, 1 + -(-(int(n * s.weak_mb * 1e6) - one) // per_expert))


def make_sources(s: Settings, work: Path, experts: int | None, log: Any) -> Sources:
    """Write the synthetic checkpoint (and its fusion) for `experts` experts per layer into `work`."""
    for d in ("src", "fused"):
        shutil.rmtree(work / d, ignore_errors=True)
    specs, config = checkpoint_specs(s.preset, s.layers, experts=experts, vocab=s.vocab)
    total = write_synthetic(str(work / "src"), specs, config, s.src_shard, data="random")
    subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(work / "src"), "--dst",
                    str(work / "fused"), "--max-shard-size", s.max_shard, "--no-progress"], check=True, cwd=REPO,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=pythonpath()))
    log(f"synthetic {s.preset} L{s.layers} E{experts or 'preset'}: {total / GB:.3f} GB")
    return Sources(work / "src", work / "fused", total, experts or 0)


def run(s: Settings, work: Path, sweeps: list[tuple[str, list[str]]], log: Any,
        out: Path | None = None) -> dict[str, Any]:
    """Run every case of `s`; returns the results (settings, rows, environment).

    Strong scaling (default): one checkpoint for every N. With `s.weak_mb`, each N gets a checkpoint
    of about N x weak_mb MB (more experts per layer, same shapes), so every connection moves the
    same bytes. With `s.dilate` K, the endpoint runs K times slower (bandwidth / K, latency and
    request rate x K / K), which keeps every ratio of transfer time to latency while leaving the
    client K times more CPU per transferred byte. With `out`, the report so far is written there
    after every run (a cut-off run keeps its rows).
    """
    envs = [{}] if not sweeps else [{k: v} for k, values in sweeps for v in values]
    machine = environment()
    rows: list[Row] = []
    sizes: dict[int, int] = {}

    def checkpoint() -> None:
        if out is not None:
            report({"settings": asdict(s), "sweeps": sweeps, "bytes": max(sizes.values(), default=0), "sizes": sizes,
                    "rows": [_row_dict(x) for x in rows], "environment": {**machine, "load_avg": os.getloadavg()}},
                   out)

    k = s.dilate
    cfg = SimConfig(latency_ms=(s.latency_ms[0] * k, s.latency_ms[1] * k), conn_mbps=s.conn_mbps / k,
                    slowdown_rps=s.slowdown_rps / k)
    with S3Sim(cfg, procs=s.sim_procs or max(1, (os.cpu_count() or 1) // 4)) as sim:
        r = Runner(s, sim, work, log)
        sources: Sources | None = None
        for n in s.conns:
            experts = experts_for(s, n)
            if sources is None or (s.weak_mb and sources.experts != experts):
                if sources is not None:
                    for prefix in sources.uploaded:
                        r.clear(prefix)
                sources = make_sources(s, work, experts, log)
            sizes[n] = sources.nbytes
            for _rep in range(s.repeats):
                for case in s.cases:
                    run_case(s, r, sources, case, n, envs, rows, log)
                    checkpoint()
    return {"settings": asdict(s), "sweeps": sweeps, "bytes": max(sizes.values(), default=0), "sizes": sizes,
            "rows": [_row_dict(x) for x in rows], "environment": {**machine, "load_avg": os.getloadavg()}}


def run_case(s: Settings, r: Runner, src_data: Sources, case: str, n: int, envs: list[dict[str, str]],
             rows: list[Row], log: Any) -> None:
    """The tool (each layout and sweep value) and the peer on one case at N = `n` connections; appends to rows."""
    op, where = case.split(":")
    src_kind, dst_kind = where.split("-")
    local = src_data.local if op == "fuse" else src_data.fused
    prefix = "src" if op == "fuse" else "fused"
    if src_kind == "s3" and prefix not in src_data.uploaded:
        for other in src_data.uploaded:  # moto holds every object in memory: one source at a time
            r.clear(other)
        src_data.uploaded.clear()
        r.upload_dir(local, prefix)
        src_data.uploaded.add(prefix)
    src = f"s3://{BUCKET}/{prefix}" if src_kind == "s3" else str(local)
    nbytes = src_data.shard_bytes(op)
    done: dict[tuple[int, int, str], Row] = {}
    for cap in s.workers:
        ranks, workers = layout(n, cap)
        for env in envs:
            same = done.get((ranks, workers, _env_text(env)))
            if same is not None:  # this layout ran already under a smaller cap
                rows.append(replace(same, workers_cap=cap))
                continue
            dst = f"s3://{BUCKET}/out" if dst_kind == "s3" else str(r.work / "out")
            row = r.tool(case, src, dst, nbytes, n, cap, env)
            done[(ranks, workers, _env_text(env))] = row
            if dst_kind == "s3":
                got = r.object_bytes("out")
                r.clear("out")
            else:
                got = sum(f.stat().st_size for f in (r.work / "out").glob("*.safetensors"))
                shutil.rmtree(r.work / "out")
            if got != nbytes:
                raise RuntimeError(f"{case} N={n}: wrote {got} bytes of shards, expected {nbytes}")
            rows.append(row)
            log(f"  {case} tool N={n} ({row.ranks}x{row.workers}) {_env_text(env)}: {row.gbps:.3f} GB/s data, "
                f"{row.wall_gbps:.3f} GB/s wall ({row.wall:.1f} s); 503s {row.sim['slowdowns']}, retried "
                f"{row.sim['retried']}, in flight <= {row.sim['max_active_requests']}; cpu {row.cpu}")
    if s.peer:
        chunk = part_size(nbytes, *layout(n, s.workers[0]), {})
        peer_dst = f"s3://{BUCKET}/peer" if dst_kind == "s3" else str(r.work / "peer")
        row = r.peer(case, src, peer_dst, nbytes, n, chunk)
        r.clear("peer")
        shutil.rmtree(r.work / "peer", ignore_errors=True)
        rows.append(row)
        log(f"  {case} peer N={n}: {row.gbps:.3f} GB/s ({row.wall:.1f} s"
            + (f" = {row.legs[0]:.1f} + {row.legs[1]:.1f} " + ("up" if dst_kind == "s3" else "fsync")
               if len(row.legs) > 1 else "")
            + f"); 503s {row.sim['slowdowns']}, retried {row.sim['retried']}, "
            f"in flight <= {row.sim['max_active_requests']}; cpu {row.cpu}")


def _env_text(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items())


def _row_dict(r: Row) -> dict[str, Any]:
    return {**asdict(r), "gbps": r.gbps, "wall_gbps": r.wall_gbps}


def environment() -> dict[str, Any]:
    """Where the numbers were taken."""
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip() or "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    import botocore
    import s3fs

    return {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
            "platform": platform.platform(), "s3fs": s3fs.__version__, "botocore": botocore.__version__,
            "aws": version(["aws", "--version"]) or "?"}


# -- the report ----------------------------------------------------------------------------------


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, list[dict[str, Any]]]]:
    out: dict[tuple[str, str, str], dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        key = _env_text(r["env"]) + (f" max {r['workers_cap']} workers/rank" if r["who"] == "tool" else "")
        out.setdefault((r["case"], r["who"], key.strip()), {}).setdefault(r["conns"], []).append(r)
    return out


def _best(samples: list[dict[str, Any]], key: str) -> float:
    return max(x[key] for x in samples)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per case and configuration: throughput, scaling ratio and tool / peer at each N (best of the repeats)."""
    groups = _groups(results["rows"])
    summary: dict[str, Any] = {}
    for (case, who, env), by_n in groups.items():
        if who != "tool":
            continue
        peer = groups.get((case, "peer", ""), {})
        one = by_n.get(1)
        one_peer = peer.get(1)
        lines = []
        for n in sorted(by_n):
            t = by_n[n]
            line: dict[str, Any] = {
                "conns": n, "ranks": t[0]["ranks"], "workers": t[0]["workers"],
                "gbps": _best(t, "gbps"), "wall_gbps": _best(t, "wall_gbps"),
                "slowdowns": max(x["sim"]["slowdowns"] for x in t), "retried": max(x["sim"]["retried"] for x in t),
                "in_flight": max(x["sim"]["max_active_requests"] for x in t),
                "nbytes": t[0]["nbytes"], "part": t[0].get("part", 0),
                "peak_rss": max(x.get("peak_rss", 0) for x in t),
                "requests": max(x["sim"]["requests"] for x in t),
            }
            if one:
                line["scaling"] = line["gbps"] / (n * _best(one, "gbps"))
                line["wall_scaling"] = line["wall_gbps"] / (n * _best(one, "wall_gbps"))
            if n in peer:
                p = peer[n]
                line["peer_gbps"] = _best(p, "gbps")
                line["vs_peer"] = line["wall_gbps"] / line["peer_gbps"]
                line["vs_peer_data"] = line["gbps"] / line["peer_gbps"]
                if all(len(x["legs"]) == 2 for x in p) and not case.endswith("s3-s3"):  # S3 -> local: aws, fsync
                    line["vs_peer_unsynced"] = line["wall_gbps"] / max(x["nbytes"] / x["legs"][0] / 1e9 for x in p)
                line["peer_slowdowns"] = max(x["sim"]["slowdowns"] for x in p)
                line["peer_in_flight"] = max(x["sim"]["max_active_requests"] for x in p)
                if one_peer:
                    line["peer_scaling"] = line["peer_gbps"] / (n * _best(one_peer, "gbps"))
            lines.append(line)
        summary[f"{case} {env}".strip()] = lines
    return summary


def report(results: dict[str, Any], out: Path) -> None:
    """Write s3.json and S3.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results["summary"] = summarize(results)
    (out / "s3.json").write_text(json.dumps(results, indent=1))
    s = results["settings"]
    k = s.get("dilate", 1.0)
    env = results["environment"]
    size = (f"weak scaling: a checkpoint of about N x {s['weak_mb']:g} MB at N connections (more experts per "
            f"layer, same shapes)" if s.get("weak_mb") else
            f"{results['bytes'] / GB:.3f} GB checkpoint, the same at every N")
    endpoint = (f"{s['latency_ms'][0] * k:g}-{s['latency_ms'][1] * k:g} ms first-byte latency, "
                f"{s['conn_mbps'] / k:g} MB/s per connection each way, "
                + (f"503 SlowDown above {s['slowdown_rps'] / k:g} requests/s per prefix" if s["slowdown_rps"]
                   else "no request-rate limit"))
    lines = [
        "# Object storage at scale, simulated (bench.s3)", "",
        f"Synthetic `{s['preset']}` checkpoint ({s['layers']} layers, real expert shapes, vocab {s['vocab']}), "
        f"{size}; output shards of at most {s['max_shard']}. Endpoint: bench.s3sim, {endpoint}"
        + (f" (time-dilated x{k:g}: {s['latency_ms'][0]:g}-{s['latency_ms'][1]:g} ms and {s['conn_mbps']:g} MB/s "
           f"slowed {k:g} times, which keeps every ratio of transfer time to latency and gives the client {k:g} "
           "times more CPU per byte; GB/s below are as measured)" if k != 1 else "")
        + f". Machine: {env['cpus']} CPUs, load average {env['load_avg'][0]:.1f} at the end.", "",
        "GB/s = output shard bytes / seconds. `data`: the tool's data phase (slowest rank, from --stats); `wall`: "
        "the whole command (start-up, plan and commit included). The peer (`aws s3 cp --recursive`, "
        "max_concurrent_requests = N, multipart_chunksize = the tool's part size; s3-s3: download, then upload; "
        "to local disk: then every file fsynced, as the tool fsyncs its shards) is timed wall; `vs peer unsynced`: "
        "against the peer's aws command alone. scaling = GB/s at N / (N x GB/s at 1). vs peer: tool / peer, wall / wall and data / wall. "
        "503s: SlowDown answers (retried: the same request seen again after one). in flight: the most requests "
        "the endpoint had open at once (tool / peer; the tool's count includes its plan phase, which reads shard "
        "headers in parallel). part: the tool's largest multipart part. RSS/rank: the tool's largest rank.", "",
    ]
    for name, rows in results["summary"].items():
        lines += [f"## {name}", "",
                  "| N | MB | ranks x workers | part MiB | data GB/s | scaling | wall GB/s | wall scaling | peer GB/s "
                  "| peer scaling | vs peer wall / data | vs peer unsynced | 503s (retried) | in flight | RSS/rank MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in rows:
            def f(key: str, fmt: str = "{:.3f}", x: dict[str, Any] = x) -> str:  # x: this row
                return fmt.format(x[key]) if key in x else "-"
            lines.append(f"| {x['conns']} | {x['nbytes'] / 1e6:.0f} | {x['ranks']} x {x['workers']} "
                         f"| {x['part'] / (1 << 20):.0f} | {f('gbps')} | {f('scaling', '{:.2f}')} "
                         f"| {f('wall_gbps')} | {f('wall_scaling', '{:.2f}')} | {f('peer_gbps')} "
                         f"| {f('peer_scaling', '{:.2f}')} | {f('vs_peer', '{:.2f}')} / {f('vs_peer_data', '{:.2f}')} "
                         f"| {f('vs_peer_unsynced', '{:.2f}')} "
                         f"| {x['slowdowns']} ({x['retried']}) | {x['in_flight']} / {x.get('peer_in_flight', '-')} "
                         f"| {x['peak_rss'] / 1e6:.0f} |")
        lines.append("")
    (out / "S3.md").write_text("\n".join(lines) + "\n")


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """`NAME=v1,v2` -> (NAME, [v1, v2])."""
    name, _, values = text.partition("=")
    if not name or not values:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: expected NAME=v1,v2,...")
    return name, values.split(",")


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the benchmark, write the report."""
    p = argparse.ArgumentParser(prog="bench.s3", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--conns", default=None, help="connection counts, e.g. 1,2,4,8")
    p.add_argument("--workers", default=None, help="most workers per rank, e.g. 4 or 4,16 (one layout each)")
    p.add_argument("--cases", default=None, help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--conn-mbps", type=float, default=None)
    p.add_argument("--latency-ms", default=None, help="LO,HI")
    p.add_argument("--slowdown-rps", type=float, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dilate", type=float, default=None, help="run the endpoint K times slower (see run())")
    p.add_argument("--weak-mb", type=float, default=None, help="weak scaling: about N x this many MB at N")
    p.add_argument("--sim-procs", type=int, default=None, help="the endpoint's proxy processes (default: CPUs / 4)")
    p.add_argument("--sweep", type=parse_sweep, action="append", default=[], help="ENV=v1,v2 (tool runs only)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: the system's)")
    a = p.parse_args(argv)
    s = PRESETS[a.preset]
    if a.conns:
        s = replace(s, conns=tuple(int(x) for x in a.conns.split(",")))
    if a.cases:
        bad = [c for c in a.cases.split(",") if c not in CASES]
        if bad:
            p.error(f"--cases: unknown {bad}; choose from {', '.join(CASES)}")
        s = replace(s, cases=tuple(a.cases.split(",")))
    if a.workers:
        s = replace(s, workers=tuple(int(x) for x in a.workers.split(",")))
    for name in ("layers", "vocab", "conn_mbps", "slowdown_rps", "repeats", "dilate", "weak_mb", "sim_procs"):
        if getattr(a, name) is not None:
            s = replace(s, **{name: getattr(a, name)})
    if a.latency_ms:
        lo, _, hi = a.latency_ms.partition(",")
        s = replace(s, latency_ms=(float(lo), float(hi or lo)))
    if a.no_peer:
        s = replace(s, peer=False)
    if s.peer and shutil.which("aws") is None:
        p.error("the peer needs the aws command (pip install awscli), or pass --no-peer")

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="moe-bench-s3-", dir=a.workdir) as tmp:
        results = run(s, Path(tmp), a.sweep, log, Path(a.out))
    report(results, Path(a.out))
    log(f"wrote {Path(a.out) / 'S3.md'} and s3.json")


if __name__ == "__main__":
    main()
