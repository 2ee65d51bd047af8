"""A local S3 endpoint that behaves like the real one under load: latency, per-connection bandwidth, SlowDown.

    python -m bench.s3sim [--latency-ms 20,50] [--conn-mbps 80] [--slowdown-rps 0] [--max-seconds 3600]

starts moto's S3 server (objects in memory) on a free 127.0.0.1 port and, in front of it,
a proxy that
- holds back the first byte of every answer until 20-50 ms (uniform, `--latency-ms`) after
  the request was received, the upstream's own time included;
- paces every client connection to `--conn-mbps` MB/s in each direction (a token bucket
  per connection and direction, `--burst-kb` deep), so N connections move at most N times that;
- answers `503 SlowDown` when a prefix (bucket + first `--prefix-depth` key components) gets
  more than `--slowdown-rps` requests per second (a token bucket per prefix, one second
  deep; 0 = never), after reading the request body like S3 does;
- counts requests, bytes, 503s and retried 503s (a later request with the same method, path,
  query and Range as one that got a 503), served as JSON at `GET /__sim__/stats`
  (`POST /__sim__/reset` zeroes them).

It prints the proxy's URL and serves until killed, its parent process ends, it has been
idle `--idle-seconds` or alive `--max-seconds`. `S3Sim` does the same from Python (the
proxy in its own process, so its work does not share the caller's interpreter lock).

moto keeps each object in a spooled temporary file and reads the whole object for every
ranged GET; the backend here keeps objects as bytes in memory instead (a ranged GET copies
only its range), so that the simulator, not moto, sets the pace.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CHUNK = 256 << 10  # proxy read/write unit; also the smallest bucket depth
MAX_HEADER_LINES = 200
MAX_LINE = 65536
MAX_RETRY_MEMORY = 200_000  # 503'd request signatures remembered for the retried count


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- backend: moto with objects held as bytes ------------------------------------------------


class _Blob:
    """The file API moto's FakeKey uses on its value buffer, over one bytes object (no copies on read)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.data = b""
        self.pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.data) + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if self.pos == 0 and (n < 0 or n >= len(self.data)):
            self.pos = len(self.data)
            return self.data
        end = len(self.data) if n < 0 else min(len(self.data), self.pos + n)
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def write(self, b: Any) -> int:
        b = bytes(b)
        if self.pos == len(self.data) == 0:
            self.data = b
        else:
            self.data = self.data[: self.pos] + b + self.data[self.pos + len(b) :]
        self.pos += len(b)
        return len(b)

    def truncate(self, size: int | None = None) -> int:
        self.data = self.data[: self.pos if size is None else size]
        return len(self.data)

    def close(self) -> None:
        self.data = b""

    def flush(self) -> None:
        pass


def _fast_etag(key: Any) -> str:
    """A fresh random ETag (32 hex digits, quoted) for every value, instead of moto's MD5 of the bytes.

    Clients treat ETags as opaque (a multipart upload hands its parts' ETags back to be compared;
    the tool pins a source by its ETag), so a value that changes whenever the object is written
    serves them; hashing every byte would make the simulator, not the client, set the pace.
    """
    if key._etag is None:
        key._etag = uuid.uuid4().hex
    return f'"{key._etag}"'


def _lean_complete(self: Any, body: Any) -> tuple[bytes, str, Any]:
    """moto's FakeMultipart.complete with one copy of the object instead of four.

    moto assembles an upload by extending a bytearray, copying it to bytes, extending a second
    one for the checksum and copying that too: a complete of 256 MiB took longer than uploading
    it, and in one process (one interpreter lock) concurrent completes queue behind each other,
    which S3 does not do. Same checks, answers and checksums; the parts are joined once.
    """
    from moto.s3 import models
    from moto.s3.exceptions import EntityTooSmall, InvalidPart, MalformedXML

    builder = models.MultipartChecksumBuilder(self.metadata.get("x-amz-checksum-algorithm"),
                                       self.metadata.get("x-amz-checksum-type"))
    md5s, values, last = bytearray(), [], None
    for pn, etag in body:
        part = self.parts.get(pn)
        if part is None or part.etag.replace('"', "") != etag.replace('"', ""):
            raise InvalidPart()
        if last is not None and last.contentsize < models.S3_UPLOAD_PART_MIN_SIZE:
            raise EntityTooSmall()
        md5s.extend(bytes.fromhex(part.etag.replace('"', "")))
        values.append(part.value)
        last = part
    if not values:
        raise MalformedXML
    value = b"".join(values)
    if builder.checksum_type == "COMPOSITE":
        for v in values:
            builder.addPart(v)
    else:
        builder.complete_object, builder.part_count = value, len(values)  # type: ignore[assignment]
    return value, f"{hashlib.md5(bytes(md5s), usedforsecurity=False).hexdigest()}-{len(values)}", builder.build()


def run_backend(port: int, max_seconds: float = 3600.0) -> None:
    """Serve moto's S3 on 127.0.0.1:`port` with in-memory object values, until the parent ends or max_seconds."""
    import types

    from moto.s3 import models
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    models.tempfile = types.SimpleNamespace(SpooledTemporaryFile=_Blob)  # type: ignore[attr-defined]
    models.FakeKey.etag = property(_fast_etag)  # type: ignore[assignment]
    models.FakeMultipart.complete = _lean_complete  # type: ignore[method-assign]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", port, app, threaded=True)
    parent, started = os.getppid(), time.monotonic()

    def watchdog() -> None:
        while os.getppid() == parent and time.monotonic() - started < max_seconds:
            time.sleep(1.0)
        server.shutdown()

    threading.Thread(target=watchdog, daemon=True).start()
    server.serve_forever()


# -- the proxy ---------------------------------------------------------------------------------


class Pacer:
    """A token bucket: `take(n)` returns once n more bytes fit under `rate` bytes/s (burst `depth`)."""

    def __init__(self, rate: float, depth: int) -> None:
        self.rate, self.depth = rate, depth
        self.next = time.monotonic()  # when the bucket is empty again: the time the taken bytes are paid for

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.next = max(self.next, now - self.depth / self.rate) + n / self.rate
        wait = self.next - now
        if wait > 0:
            time.sleep(wait)


@dataclass
class SimConfig:
    """How the proxy behaves (see the module docstring)."""

    latency_ms: tuple[float, float] = (20.0, 50.0)
    conn_mbps: float = 80.0  # per connection and direction, MB/s (1e6); 0 = unlimited
    burst_kb: int = 256
    slowdown_rps: float = 0.0  # per prefix; 0 = never 503
    prefix_depth: int = 1
    max_seconds: float = 3600.0
    idle_seconds: float = 600.0
    seed: int = 0


@dataclass
class SimStats:
    requests: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    slowdowns: int = 0
    retried: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0


class RateLimiter:
    """A token bucket per prefix (rate requests/s, one second deep)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.buckets: dict[str, tuple[float, float]] = {}  # prefix -> (tokens, at)
        self.lock = threading.Lock()

    def allow(self, prefix: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self.lock:
            tokens, at = self.buckets.get(prefix, (self.rate, now))
            tokens = min(self.rate, tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self.buckets[prefix] = (tokens - 1.0 if ok else tokens, now)
            return ok


class SharedCounters:
    """Open connections and requests in flight, and their maxima, shared by forked proxy processes."""

    NAMES = ("open", "active")

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.values = ctx.RawArray("q", 2 * len(self.NAMES))  # value, max for each name
        self.lock = ctx.Lock()

    def add(self, name: str, delta: int) -> None:
        i = 2 * self.NAMES.index(name)
        with self.lock:
            self.values[i] += delta
            self.values[i + 1] = max(self.values[i + 1], self.values[i])

    def reset_max(self) -> None:
        with self.lock:
            for i in range(0, len(self.values), 2):
                self.values[i + 1] = self.values[i]

    def maxima(self) -> dict[str, int]:
        with self.lock:
            return {"max_open_connections": int(self.values[1]), "max_active_requests": int(self.values[3])}


def listen(port: int = 0) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:`port` (0: a free port)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


class _ClientGone(Exception):
    pass


class Proxy:
    """The throttling proxy: one thread per client connection, one upstream connection each."""

    def __init__(self, upstream_port: int, config: SimConfig, port: int = 0, log: str | None = None,
                 sock: socket.socket | None = None, control: socket.socket | None = None,
                 shared: SharedCounters | None = None) -> None:
        self.upstream_port, self.cfg = upstream_port, config
        self.shared = shared or SharedCounters()
        self.control = control
        self.log = open(log, "a", buffering=1) if log else None  # one JSON line per request (diagnosis)
        self.stats = SimStats()
        self.lock = threading.Lock()
        self.limiter = RateLimiter(config.slowdown_rps)
        self.slowed: OrderedDict[str, None] = OrderedDict()
        self.open = 0
        self.last_activity = time.monotonic()
        self.started = time.monotonic()
        self.rng = random.Random(config.seed)
        self.sock = sock or listen(port)
        self.port = int(self.sock.getsockname()[1])
        self.stopping = False

    # -- bookkeeping
    def _count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _latency(self) -> float:
        lo, hi = self.cfg.latency_ms
        with self.lock:
            return self.rng.uniform(lo, hi) / 1000.0

    def _prefix(self, path: str) -> str:
        parts = path.split("?", 1)[0].lstrip("/").split("/")
        return "/".join(parts[: 1 + self.cfg.prefix_depth])

    # -- serving
    def serve_forever(self) -> None:
        """Accept connections until stop() (or the idle / lifetime limits, or the parent's end)."""
        threading.Thread(target=self._watchdog, daemon=True).start()
        if self.control is not None:
            threading.Thread(target=self._accept, args=(self.control,), daemon=True).start()
        self._accept(self.sock)

    def _accept(self, sock: socket.socket) -> None:
        sock.settimeout(0.5)
        while not self.stopping:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(120)
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _watchdog(self) -> None:
        parent = os.getppid()
        while not self.stopping:
            time.sleep(1.0)
            now = time.monotonic()
            with self.lock:
                idle = self.open == 0 and now - self.last_activity > self.cfg.idle_seconds
            if idle or now - self.started > self.cfg.max_seconds or os.getppid() != parent:
                self.stop()

    def stop(self) -> None:
        self.stopping = True
        for sock in (self.sock, self.control):
            try:
                if sock is not None:
                    sock.close()
            except OSError:
                pass

    def _serve_conn(self, conn: socket.socket) -> None:
        rate = self.cfg.conn_mbps * 1e6
        depth = max(CHUNK, self.cfg.burst_kb << 10)
        pace_in, pace_out = Pacer(rate, depth), Pacer(rate, depth)
        rfile = conn.makefile("rb", buffering=CHUNK)
        upstream: http.client.HTTPConnection | None = None
        with self.lock:
            self.open += 1
            self.stats.connections += 1
        self.shared.add("open", 1)
        try:
            while not self.stopping:
                keep, upstream = self._one_request(conn, rfile, pace_in, pace_out, upstream)
                if not keep:
                    break
        except (_ClientGone, OSError, ValueError, http.client.HTTPException):
            pass
        finally:
            with self.lock:
                self.open -= 1
                self.last_activity = time.monotonic()
            self.shared.add("open", -1)
            if upstream is not None:
                upstream.close()
            try:
                rfile.close()
                conn.close()
            except OSError:
                pass

    def _read_head(self, rfile: Any) -> tuple[str, str, str, list[tuple[str, str]]] | None:
        line = rfile.readline(MAX_LINE)
        if not line:
            return None
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3:
            raise _ClientGone()
        headers = []
        for _ in range(MAX_HEADER_LINES):
            h = rfile.readline(MAX_LINE)
            if not h:
                raise _ClientGone()
            if h in (b"\r\n", b"\n"):
                return parts[0], parts[1], parts[2], headers
            k, _, v = h.decode("latin-1").partition(":")
            headers.append((k.strip(), v.strip()))
        raise _ClientGone()

    def _body_chunks(self, rfile: Any, headers: dict[str, str], pace: Pacer) -> Any:
        """Yield the request body (de-chunked) in CHUNK pieces, paced."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            for _ in range(1 << 24):
                size = int(rfile.readline(MAX_LINE).strip().split(b";")[0], 16)
                if size == 0:
                    while rfile.readline(MAX_LINE) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._paced_read(rfile, size, pace)
                rfile.readline(MAX_LINE)
            return
        yield from self._paced_read(rfile, int(headers.get("content-length", "0") or 0), pace)

    def _paced_read(self, rfile: Any, size: int, pace: Pacer) -> Any:
        """Yield the next `size` bytes of `rfile` in CHUNK pieces, paced and counted."""
        left = size
        while left:
            data = rfile.read(min(CHUNK, left))
            if not data:
                raise _ClientGone()
            pace.take(len(data))
            self._count(bytes_in=len(data))
            left -= len(data)
            yield data

    def _send(self, conn: socket.socket, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
              pace: Pacer, head_only: bool = False) -> None:
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        conn.sendall(head.encode("latin-1"))
        if not head_only:
            for i in range(0, len(body), CHUNK):
                pace.take(min(CHUNK, len(body) - i))
                conn.sendall(body[i : i + CHUNK])
            self._count(bytes_out=len(body))

    def _control(self, conn: socket.socket, method: str, path: str, pace: Pacer) -> None:
        if method == "POST" and path.startswith("/__sim__/reset"):
            with self.lock:
                self.stats = SimStats()
                self.shared.reset_max()
                self.slowed.clear()
        with self.lock:
            body = json.dumps({**asdict(self.stats), **self.shared.maxima()}).encode()
        self._send(conn, 200, "OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                   body, Pacer(0, 0))

    def _one_request(self, conn: socket.socket, rfile: Any, pace_in: Pacer, pace_out: Pacer,
                     upstream: http.client.HTTPConnection | None) -> tuple[bool, http.client.HTTPConnection | None]:
        """Serve one request of a client connection; returns (keep the connection, the upstream connection)."""
        info: dict[str, Any] = {}
        try:
            return self._request(conn, rfile, pace_in, pace_out, upstream, info)
        finally:
            if info:
                self.shared.add("active", -1)
                with self.lock:
                    if self.log is not None:
                        info["m1"] = time.monotonic()  # CLOCK_MONOTONIC: machine-wide (bench.s3trace)
                        info["t1"] = info["m1"] - self.started
                        self.log.write(json.dumps(info) + "\n")

    def _request(self, conn: socket.socket, rfile: Any, pace_in: Pacer, pace_out: Pacer,
                 upstream: http.client.HTTPConnection | None, info: dict[str, Any]) -> tuple[bool, Any]:
        head = self._read_head(rfile)
        if head is None:
            return False, upstream
        method, target, _, header_list = head
        headers = {k.lower(): v for k, v in header_list}
        with self.lock:
            self.last_activity = time.monotonic()
        close = headers.get("connection", "").lower() == "close"
        if target.startswith("/__sim__/"):
            if headers.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            for _ in self._body_chunks(rfile, headers, pace_in):
                pass
            self._control(conn, method, target, pace_out)
            return not close, upstream
        signature = f"{method} {target} {headers.get('range', '')}"
        allowed = self.limiter.allow(self._prefix(target))
        self.shared.add("active", 1)
        with self.lock:
            now = time.monotonic()
            info.update(m0=now, t0=now - self.started, method=method, path=target, range=headers.get("range"),
                        status=503 if not allowed else 0, conn=id(conn))
            self.stats.requests += 1
            self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
            if signature in self.slowed:
                self.stats.retried += 1
                del self.slowed[signature]
        if headers.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._body_chunks(rfile, headers, pace_in)
        if not allowed:
            for _ in body:
                pass
            t_ready = time.monotonic() + self._latency()
            with self.lock:
                self.stats.slowdowns += 1
                self.slowed[signature] = None
                while len(self.slowed) > MAX_RETRY_MEMORY:
                    self.slowed.popitem(last=False)
            msg = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
                   b"<Message>Please reduce your request rate.</Message></Error>")
            time.sleep(max(0.0, t_ready - time.monotonic()))
            self._send(conn, 503, "Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(msg)))],
                       msg, pace_out)
            return not close, upstream
        # Forward: stream the body upstream as it arrives (de-chunked; Content-Length from the
        # decoded length where the client sent one, else buffered to measure it).
        fwd = [(k, v) for k, v in header_list if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                                                    "expect")]
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = b"".join(body)
            length, payload = len(data), [data] if data else []
        else:
            length, payload = int(headers.get("content-length", "0") or 0), body
        if upstream is None:
            upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=300)
        try:
            upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in fwd:
                upstream.putheader(k, v)
            upstream.putheader("Content-Length", str(length))
            upstream.endheaders()
            for chunk in payload:
                upstream.send(chunk)
            t_ready = time.monotonic() + self._latency()
            resp = upstream.getresponse()
        except (OSError, http.client.HTTPException):
            upstream.close()
            raise
        self._relay(conn, method, resp, length, t_ready, pace_out, info)
        if resp.will_close:
            upstream.close()
            upstream = None
        return not close, upstream

    def _relay(self, conn: socket.socket, method: str, resp: http.client.HTTPResponse, length: int, t_ready: float,
               pace_out: Pacer, info: dict[str, Any]) -> None:
        """Send the upstream's response `resp` to the client (after the simulated latency, up to `t_ready`)."""
        info["status"] = resp.status
        info["bytes_in"] = length
        info["bytes_out"] = int(resp.getheader("Content-Length") or 0) if method != "HEAD" else 0
        out_headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive")]
        length_hdr = resp.getheader("Content-Length")
        time.sleep(max(0.0, t_ready - time.monotonic()))
        if method == "HEAD":
            if length_hdr is not None:
                out_headers.append(("Content-Length", length_hdr))
            resp.read()
            self._send(conn, resp.status, resp.reason, out_headers, b"", pace_out, head_only=True)
        elif length_hdr is None:
            data = resp.read()
            out_headers.append(("Content-Length", str(len(data))))
            self._send(conn, resp.status, resp.reason, out_headers, data, pace_out)
        else:
            n = int(length_hdr)
            out_headers.append(("Content-Length", str(n)))
            head_bytes = (f"HTTP/1.1 {resp.status} {resp.reason}\r\n"
                          + "".join(f"{k}: {v}\r\n" for k, v in out_headers) + "\r\n").encode("latin-1")
            conn.sendall(head_bytes)
            left = n
            while left:
                data = resp.read(min(CHUNK, left))
                if not data:
                    raise _ClientGone()
                pace_out.take(len(data))
                conn.sendall(data)
                left -= len(data)
            self._count(bytes_out=n)


def _proxy_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench.s3sim", description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", default="20,50", help="first-byte latency range, ms: LO,HI")
    p.add_argument("--conn-mbps", type=float, default=80.0, help="per-connection cap, MB/s each way (0: none)")
    p.add_argument("--burst-kb", type=int, default=256)
    p.add_argument("--slowdown-rps", type=float, default=0.0, help="requests/s per prefix above which 503 (0: never)")
    p.add_argument("--prefix-depth", type=int, default=1, help="key components after the bucket that make a prefix")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    p.add_argument("--idle-seconds", type=float, default=600.0)
    p.add_argument("--port", type=int, default=0, help="the proxy's port (default: a free one)")
    p.add_argument("--procs", type=int, default=1, help="proxy processes sharing the port (each gets the rate / procs)")
    p.add_argument("--control-ports", default="", help="one port per process for its /__sim__/ counters")
    p.add_argument("--log", default=None, help="append one JSON line per request to this file")
    p.add_argument("--upstream-port", type=int, default=0, help="use this moto server instead of starting one")
    p.add_argument("--backend", type=int, default=0, help=argparse.SUPPRESS)  # internal: serve moto on this port
    a = p.parse_args(argv)
    if a.backend:
        run_backend(a.backend, a.max_seconds)
        return
    lo, _, hi = a.latency_ms.partition(",")
    cfg = SimConfig((float(lo), float(hi or lo)), a.conn_mbps, a.burst_kb, a.slowdown_rps, a.prefix_depth,
                    a.max_seconds, a.idle_seconds)
    backend = None
    upstream = a.upstream_port
    if not upstream:
        backend = Backend(a.max_seconds)
        upstream = backend.port
    procs = max(1, a.procs)
    cfg = replace(cfg, slowdown_rps=cfg.slowdown_rps / procs)
    controls = [int(x) for x in a.control_ports.split(",") if x] or [0] * procs
    if len(controls) != procs:
        p.error("--control-ports: one port per process")
    main_sock, shared = listen(a.port), SharedCounters()
    children = []
    for i in range(1, procs):
        pid = os.fork()
        if pid == 0:
            child = Proxy(upstream, replace(cfg, seed=i), log=a.log, sock=main_sock, control=listen(controls[i]),
                          shared=shared)
            signal.signal(signal.SIGTERM, lambda *_, child=child: child.stop())
            try:
                child.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    proxy = Proxy(upstream, cfg, log=a.log, sock=main_sock, control=listen(controls[0]) if procs > 1 or controls[0]
                  else None, shared=shared)
    signal.signal(signal.SIGTERM, lambda *_: proxy.stop())
    print(f"http://127.0.0.1:{proxy.port}", flush=True)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except OSError:
                pass
        if backend is not None:
            backend.stop()


def _wait_port(port: int, proc: subprocess.Popen[Any], what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {seconds:.0f} s")


class Backend:
    """The in-memory moto S3 server as a child process on a free loopback port."""

    def __init__(self, max_seconds: float = 3600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, **CREDENTIALS)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.s3sim", "--backend", str(self.port),
                                      "--max-seconds", str(max_seconds)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        _wait_port(self.port, self.proc, "moto backend")

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class S3Sim:
    """The simulator (backend + proxy, two child processes) for the duration of a `with` block.

    `url` is the endpoint to give clients; `stats()` / `reset()` read and zero the proxy's counters.
    """

    def __init__(self, config: SimConfig | None = None, log: str | None = None, procs: int = 1) -> None:
        self.config = config or SimConfig()
        self.log = log
        self.procs = max(1, procs)

    def __enter__(self) -> S3Sim:
        c = self.config
        self.backend = Backend(c.max_seconds)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "bench.s3sim", "--port", str(self.port), "--upstream-port", str(self.backend.port),
               "--latency-ms", f"{c.latency_ms[0]},{c.latency_ms[1]}", "--conn-mbps", str(c.conn_mbps),
               "--burst-kb", str(c.burst_kb), "--slowdown-rps", str(c.slowdown_rps),
               "--prefix-depth", str(c.prefix_depth), "--max-seconds", str(c.max_seconds),
               "--idle-seconds", str(c.idle_seconds), "--procs", str(self.procs)] + (["--log", self.log] if self.log else [])
        self.controls = [free_port() for _ in range(self.procs)] if self.procs > 1 else []
        if self.controls:
            cmd += ["--control-ports", ",".join(map(str, self.controls))]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            _wait_port(self.port, self.proc, "s3sim proxy")
        except BaseException:
            self.backend.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)
        self.backend.stop()

    def _call(self, method: str, what: str) -> dict[str, Any]:
        """Ask every proxy process; counts are summed, maxima (shared between the processes) taken once."""
        urls = [f"http://127.0.0.1:{p}" for p in self.controls] or [self.url]
        total: dict[str, Any] = {}
        for url in urls:
            req = urllib.request.Request(f"{url}/__sim__/{what}", method=method, data=b"" if method == "POST" else None)
            with urllib.request.urlopen(req, timeout=30) as resp:
                got = json.loads(resp.read())
            for k, v in got.items():
                if k.startswith("max_"):
                    total[k] = max(total.get(k, 0), v)
                elif isinstance(v, dict):
                    for m, n in v.items():
                        total.setdefault(k, {})[m] = total.get(k, {}).get(m, 0) + n
                else:
                    total[k] = total.get(k, 0) + v
        return total

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the simulator's processes: moto, the proxy and its forks."""
        pids = {self.backend.proc.pid, self.proc.pid}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        if int(fh.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            pids.add(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        total = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                pass
        return total

    def stats(self) -> dict[str, Any]:
        """The proxy's counters (SimStats as a dict)."""
        return self._call("GET", "stats")

    def reset(self) -> dict[str, Any]:
        """Zero the counters; returns them as they were zeroed."""
        return self._call("POST", "reset")


if __name__ == "__main__":
    _proxy_main(sys.argv[1:])
