"""Where the wall time of one S3 job goes: every request the simulated endpoint saw, by phase and kind.

    python -m bench.s3trace [--cases fuse:s3-s3,fuse:s3-local] [--layouts 1x1,1x4,4x4] [--layers 2] [--experts 8]
                            [--vocab 8000] [--latency-ms 20,50] [--conn-mbps 80] [--repeats 1] [--json FILE]

Writes a synthetic checkpoint (bench.synthetic), puts it on bench.s3sim (its per-request log
on), runs the tool once (or --repeats times) and splits the run at the stamps the tool's --stats
and the endpoint's log give (both CLOCK_MONOTONIC, which is machine-wide):
start-up (launch to the first request), plan (to rank 0's prepare), prepare (clean-up, upload
starts, state: to the first rank's data phase), data (to the last rank's end), commit (to the
last request), exit (to the process's end). Per phase: its seconds, its requests by kind, and
the requests' summed time (sum >> seconds: they overlapped; sum ~ seconds: a sequential chain).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import pythonpath
from bench.s3 import BUCKET, REPO
from bench.s3sim import CREDENTIALS, S3Sim, SimConfig
from bench.synthetic import checkpoint_specs, write_synthetic

PHASES = ("start-up", "plan", "prepare", "data", "commit", "exit")


def kind(entry: dict[str, Any]) -> str:
    """A request's kind from its method, query and Range: LIST, HEAD, GET-range, GET, PUT-part, PUT, ..."""
    method, path = entry["method"], entry["path"]
    query = path.split("?", 1)[1] if "?" in path else ""
    if method == "GET":
        if "uploadId=" in query:
            return "LIST-parts"
        if "uploads" in query.split("&"):
            return "LIST-uploads"
        if "list-type" in query or "prefix=" in query or path.rstrip("/").count("/") <= 1:
            return "LIST"
        return "GET-range" if entry.get("range") else "GET"
    if method == "PUT":
        return "PUT-part" if "partNumber=" in query else "PUT"
    if method == "POST":
        if "delete" in query.split("&"):
            return "DELETE-batch"
        return "MPU-complete" if "uploadId=" in query else "MPU-create"
    if method == "DELETE":
        return "MPU-abort" if "uploadId=" in query else "DELETE"
    return method


def phases(log: list[dict[str, Any]], stats: dict[str, Any], launched: float, ended: float) -> dict[str, dict[str, Any]]:
    """Per phase: seconds, requests by kind and their summed seconds."""
    reqs = [dict(e, t0=e["m0"], t1=e.get("m1", e["m0"])) for e in log]
    first = min((e["t0"] for e in reqs), default=launched)
    last = max((e["t1"] for e in reqs), default=ended)
    spans = [r["data_span"] for r in stats["ranks"]]
    bounds = [launched, first, stats["prepare_at"], min(s[0] for s in spans), max(s[1] for s in spans), last, ended]
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(PHASES):
        lo, hi = bounds[i], bounds[i + 1]
        mine = [e for e in reqs if lo <= e["t0"] < hi or (i == len(PHASES) - 1 and e["t0"] >= hi)]
        kinds: dict[str, int] = {}
        for e in mine:
            kinds[kind(e)] = kinds.get(kind(e), 0) + 1
        out[name] = {"seconds": max(0.0, hi - lo), "requests": len(mine), "kinds": dict(sorted(kinds.items())),
                     "request_seconds": sum(e["t1"] - e["t0"] for e in mine)}
    return out


def trace_once(sim: S3Sim, a: argparse.Namespace, case: str, nproc: int, workers: int, src: str,
               dst: str, work: Path, log_path: Path) -> dict[str, Any]:
    """Run the tool once against `sim`; returns its phases, wall time and data-phase seconds."""
    log_path.write_text("")
    sim.reset()
    stats_file = work / "stats.json"
    op = case.split(":")[0]
    cmd = [sys.executable, "-m", f"convert.{op}_experts", "--nproc", str(nproc), "--src", src, "--dst", dst,
           "--workers", str(workers), "--max-shard-size", a.max_shard, "--stats", str(stats_file), "--no-progress"]
    env = dict(os.environ, **CREDENTIALS, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=sim.url,
               AWS_EC2_METADATA_DISABLED="true")
    launched = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    ended = time.monotonic()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    time.sleep(0.2)
    log = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    stats = json.loads(stats_file.read_text())
    return {"case": case, "layout": f"{nproc}x{workers}", "wall": ended - launched, "data": max(r["seconds"] for r in stats["ranks"]),
            "phases": phases(log, stats, launched, ended), "requests": len(log),
            "log": [dict(e, t0=e["m0"] - launched, t1=e.get("m1", e["m0"]) - launched, kind=kind(e)) for e in log]}


def range_bytes(entry: dict[str, Any]) -> int:
    """Bytes a ranged GET asked for (its `Range: bytes=a-b` header), 0 for any other request."""
    spec = (entry.get("range") or "").partition("=")[2]
    lo, _, hi = spec.partition("-")
    return int(hi) - int(lo) + 1 if lo.isdigit() and hi.isdigit() else 0


def get_sizes(result: dict[str, Any]) -> str:
    """The ranged GETs of a traced run: how many, and their mean and median size in MB."""
    sizes = sorted(n for e in result["log"] if (n := range_bytes(e)))
    if not sizes:
        return "no ranged GETs"
    return (f"{len(sizes)} ranged GETs, mean {sum(sizes) / len(sizes) / 1e6:.1f} MB, "
            f"median {sizes[len(sizes) // 2] / 1e6:.1f} MB")


def table(result: dict[str, Any]) -> str:
    """The phases of one traced run as a Markdown table."""
    lines = [f"{result['case']} {result['layout']}: wall {result['wall']:.2f} s, data phase {result['data']:.2f} s, "
             f"{result['requests']} requests; {get_sizes(result)}", "",
             "| phase | s | requests | request-s | kinds |", "|---|---|---|---|---|"]
    for name, p in result["phases"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in p["kinds"].items())
        lines.append(f"| {name} | {p['seconds']:.2f} | {p['requests']} | {p['request_seconds']:.2f} | {kinds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, trace the runs, print one table per run."""
    p = argparse.ArgumentParser(prog="bench.s3trace", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="fuse:s3-s3,fuse:s3-local", help="of fuse:s3-s3, fuse:s3-local")
    p.add_argument("--layouts", default="1x1,1x4,4x4", help="ranks x workers, e.g. 1x1,1x4,4x4,16x4")
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--src-shard", type=int, default=200_000_000)
    p.add_argument("--max-shard", default="200MB")
    p.add_argument("--latency-ms", default="20,50")
    p.add_argument("--conn-mbps", type=float, default=80.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--sim-procs", type=int, default=0, help="proxy processes (0: a quarter of the CPUs)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    lo, _, hi = a.latency_ms.partition(",")
    import boto3

    with tempfile.TemporaryDirectory(prefix="moe-s3trace-") as tmp:
        work = Path(tmp)
        specs, config = checkpoint_specs(a.preset, a.layers, experts=a.experts, vocab=a.vocab)
        write_synthetic(str(work / "src"), specs, config, a.src_shard, data="random")
        local = work / "src"
        log_path = work / "sim.log"
        cfg = SimConfig(latency_ms=(float(lo), float(hi or lo)), conn_mbps=a.conn_mbps)
        with S3Sim(cfg, log=str(log_path), procs=a.sim_procs or max(1, (os.cpu_count() or 1) // 4)) as sim:
            setup = boto3.client("s3", endpoint_url=sim.backend.url, region_name="us-east-1",
                                 aws_access_key_id="testing", aws_secret_access_key="testing")
            setup.create_bucket(Bucket=BUCKET)
            for f in sorted(local.iterdir()):
                setup.put_object(Bucket=BUCKET, Key=f"src/{f.name}", Body=f.read_bytes())
            results = []
            for case in a.cases.split(","):
                for layout in a.layouts.split(","):
                    nproc, workers = (int(x) for x in layout.split("x"))
                    for _ in range(a.repeats):
                        dst = f"s3://{BUCKET}/out" if case.endswith("s3-s3") else str(work / "out")
                        res = trace_once(sim, a, case, nproc, workers, f"s3://{BUCKET}/src", dst, work,
                                         log_path)
                        results.append(res)
                        print(table(res) + "\n", flush=True)
                        if dst.startswith("s3://"):
                            pages = setup.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="out/")
                            keys = [{"Key": o["Key"]} for page in pages for o in page.get("Contents", [])]
                            if keys:
                                setup.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
                        else:
                            subprocess.run(["rm", "-rf", dst], check=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
