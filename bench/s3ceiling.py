"""How many GB/s bench.s3sim itself carries: a trivial client (raw HTTP, no signing, no SDK) against it.

    python -m bench.s3ceiling [--conns 16,64] [--procs 1,4] [--conn-mbps 80,0] [--seconds 5] [--ops GET,PUT]

For each (proxy processes, per-connection cap, connection count, GET or PUT) it starts the
simulator (no latency: what is measured is bandwidth), then `conns` connections spread over
client processes (8 connections each) that GET 16 MiB ranges of one 64 MiB object (or PUT
16 MiB objects) back to back for `--seconds`, and prints the aggregate GB/s next to the
connections' cap (conns x conn-mbps). Where the simulator delivers well below that cap, a
benchmark at that many connections measures the simulator, not the client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import threading
import time
from typing import Any

from bench.s3sim import S3Sim, SimConfig

BUCKET = "ceiling"
PIECE = 16 << 20
OBJECT = 64 << 20
# moto answers an anonymous GET 403; it does not check signatures, so any well-formed one will do.
AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20200101/us-east-1/s3/aws4_request, "
                         "SignedHeaders=host, Signature=0"}


def _client(port: int, op: str, conns: int, seconds: float, offset: int, out: Any) -> None:
    """One client process: `conns` threads, each on its own connection, GET or PUT until `seconds` pass."""
    done = [0] * conns
    deadline = time.monotonic() + seconds
    body = os.urandom(PIECE) if op == "PUT" else b""

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        buf = bytearray(1 << 20)
        k = 0
        while time.monotonic() < deadline:
            if op == "GET":
                start = (k % (OBJECT // PIECE)) * PIECE
                conn.request("GET", f"/{BUCKET}/big", headers={"Range": f"bytes={start}-{start + PIECE - 1}", **AUTH})
                resp = conn.getresponse()
                if resp.status != 206:
                    raise RuntimeError(f"GET answered {resp.status}")
                while True:
                    n = resp.readinto(buf)
                    if not n:
                        break
                    done[i] += n
            else:
                conn.request("PUT", f"/{BUCKET}/put-{offset + i}-{k % 2}", body=body,
                             headers={"Content-Length": str(len(body)), **AUTH})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"PUT answered {resp.status}")
                done[i] += len(body)
            k += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(done))


def measure(sim: S3Sim, op: str, conns: int, seconds: float, direct: bool = False) -> float:
    """Aggregate GB/s of `conns` connections doing `op` against `sim` (its backend with `direct`) for `seconds`."""
    port = sim.backend.port if direct else int(sim.url.rsplit(":", 1)[1])
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    per = 8
    procs = [ctx.Process(target=_client, args=(port, op, min(per, conns - i), seconds, i, q))
             for i in range(0, conns, per)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    return total / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> None:
    """Parse flags, measure every combination, print one JSON line each."""
    p = argparse.ArgumentParser(prog="bench.s3ceiling", description=__doc__.splitlines()[0])
    p.add_argument("--conns", default="16,64")
    p.add_argument("--procs", default="1,4")
    p.add_argument("--conn-mbps", default="80,0")
    p.add_argument("--ops", default="GET,PUT")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--direct", action="store_true", help="to the moto backend itself, past the proxy")
    a = p.parse_args(argv)
    for procs in [1] if a.direct else [int(x) for x in a.procs.split(",")]:
        for mbps in (float(x) for x in a.conn_mbps.split(",")):
            with S3Sim(SimConfig(latency_ms=(0.0, 0.0), conn_mbps=mbps), procs=procs) as sim:
                c = http.client.HTTPConnection("127.0.0.1", sim.backend.port)
                c.request("PUT", f"/{BUCKET}", headers=AUTH)
                c.getresponse().read()
                c.request("PUT", f"/{BUCKET}/big", body=os.urandom(OBJECT), headers=AUTH)
                if c.getresponse().status != 200:
                    raise RuntimeError("could not put the test object")
                for op in a.ops.split(","):
                    for conns in (int(x) for x in a.conns.split(",")):
                        cpu0 = sim.cpu_seconds()
                        gbps = measure(sim, op, conns, a.seconds, a.direct)
                        print(json.dumps({"op": op, "proxy_procs": 0 if a.direct else procs, "conn_mbps": mbps, "conns": conns,
                                          "gbps": round(gbps, 3),
                                          "cap_gbps": round(conns * mbps / 1000, 3) if mbps else None,
                                          "sim_cpu_per_s": round((sim.cpu_seconds() - cpu0) / a.seconds, 2),
                                          "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
