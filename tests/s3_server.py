"""A real S3 endpoint on 127.0.0.1 for tests: moto's server, plus a proxy that injects transient errors."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server as a child process on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, **CREDENTIALS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class FlakyProxy:
    """Forwards to `upstream`, answering every `every`-th request with a 503 SlowDown (at most `budget` times).

    `deny(method, path)` (path with its query), when true, answers 403 AccessDenied instead (`every=0`: no 503s).
    `cut(method, path, range)`, when true, sends the answer's headers and half its body, then drops the connection
    (a body broken off mid-stream; counted in `cut_bodies`).
    `drop_headers` are removed from every request (e.g. If-Match: a store that ignores the condition); a request
    with one of `not_implemented` is answered 501 NotImplemented (S3's answer to a header it does not take).
    """

    def __init__(self, upstream_port: int, every: int = 4, budget: int = 40,
                 deny: Callable[[str, str], bool] | None = None,
                 cut: Callable[[str, str, str | None], bool] | None = None,
                 drop_headers: tuple[str, ...] = (), not_implemented: tuple[str, ...] = ()) -> None:
        self.injected = 0
        self.denied = 0
        self.seen = 0
        self.cut_bodies = 0
        self.ranges: list[str | None] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _error(self, status: int, code: str, message: str) -> None:
                """Answer with S3's error document."""
                msg = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)

            def _handle(self) -> None:
                body = self._body()
                refuse = deny is not None and deny(self.command, self.path)
                unknown = any(h in self.headers for h in not_implemented)
                broken = cut is not None and cut(self.command, self.path, self.headers.get("Range"))
                with lock:
                    outer.seen += 1
                    outer.ranges.append(self.headers.get("Range"))
                    outer.cut_bodies += broken
                    fail = not refuse and every > 0 and outer.seen % every == 0 and outer.injected < budget
                    if fail:
                        outer.injected += 1
                    outer.denied += refuse
                if refuse:
                    return self._error(403, "AccessDenied", "Access Denied")
                if unknown:
                    return self._error(501, "NotImplemented",
                                       "A header you provided implies functionality that is not implemented")
                if fail:
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                dropped = {"transfer-encoding", *(h.lower() for h in drop_headers)}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # a HEAD's answer has no body but the object's length
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if broken:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
