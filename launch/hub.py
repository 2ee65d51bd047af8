"""The control group of `--nproc N` ranks without torch: a hub thread in rank 0, one socket per rank.

A job's ranks exchange only small control messages (the plan broadcast, barriers, the status
exchange, a job-wide progress counter), so the forked ranks of `--nproc` need no gloo group
and no torch import (seconds on a cold cache). Rank 0 serves the hub on the listening socket
the parent opened; every rank, rank 0 included, connects to it twice: one connection for
collectives (called from a rank's main thread, in the same order on every rank) and one for
counters (any thread, request and reply under a lock). Messages are length-prefixed pickles.

A collective completes when every rank has sent its part: the hub replies to every rank, rank
0 last (rank 0 may exit as soon as it has its reply); a gather to rank 0 replies None to the
others. A scatter is one-way: rank 0 sends each rank's part, pickled, through the hub, which
passes it on unopened to that rank's collective connection (held until the rank has said
hello), so neither the hub nor any rank ever holds the other ranks' parts. A rank that disconnects before the
job's end ends the group: the hub closes every connection, and a rank whose call finds the group
gone exits at once with code 1 and no message of its own: the --nproc supervisor, which saw the
first rank stop, says which one and settles the job's exit code.

The same hub serves the ranks of a torchrun job (launch.dist): rank 0 listens on every interface
and publishes its address through torchrun's store. A connection is let in only after it has
sent the job's random token (TOKEN_BYTES raw bytes, answered by one byte, ACK), so nothing that
was not handed the token reaches the pickles.
"""

from __future__ import annotations

import os
import pickle
import selectors
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, cast

_LEN = struct.Struct("!Q")
COLLECTIVE, COUNTER = 0, 1
TOKEN_BYTES = 16
ACK = b"K"


def new_token() -> bytes:
    """A fresh random token for one job's hub."""
    return os.urandom(TOKEN_BYTES)


class GroupError(ConnectionError):
    """The group is gone: another rank left without finishing, or the hub stopped."""


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def _send(sock: socket.socket, obj: Any) -> None:
    sock.sendall(_frame(obj))


def _send_raw(sock: socket.socket, payload: bytes) -> None:
    """Send an already pickled object as one message."""
    sock.sendall(_LEN.pack(len(payload)))
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise GroupError("another rank of this job stopped; see its message")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return pickle.loads(_recv_exact(sock, n))


class Hub:
    """The server side, run by a daemon thread of rank 0 over the parent's listening socket."""

    def __init__(self, listener: socket.socket, world_size: int, token: bytes) -> None:
        self.listener, self.world, self.token = listener, world_size, token
        self.strangers: dict[socket.socket, bytearray] = {}  # connections that have not sent the token yet
        self.sel = selectors.DefaultSelector()
        self.coll: dict[int, socket.socket] = {}  # rank -> its collective connection
        self.parts: dict[int, dict[int, Any]] = {}  # collective sequence number -> rank -> part
        self.counters: dict[str, int] = {}
        self.bufs: dict[socket.socket, bytearray] = {}
        self.held: dict[int, list[bytes]] = {}  # scatter parts of ranks not connected yet

    def start(self) -> None:
        """Serve in a daemon thread."""
        threading.Thread(target=self.serve, name="moe-convert-hub", daemon=True).start()

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.fileobj is self.listener:
                        conn, _ = self.listener.accept()
                        conn.setblocking(True)
                        self.strangers[conn] = bytearray()
                        self.sel.register(conn, selectors.EVENT_READ)
                    elif key.fileobj in self.strangers:
                        self._introduce(key.fileobj)
                    else:
                        self._readable(cast(socket.socket, key.fileobj))  # the selector holds sockets only
        except GroupError:
            self._shut()

    def _introduce(self, conn: socket.socket) -> None:
        """Read a new connection's token: a match makes it a rank's connection, anything else is dropped."""
        buf = self.strangers[conn]
        try:
            chunk = conn.recv(TOKEN_BYTES - len(buf))
        except OSError:
            chunk = b""
        buf += chunk
        if chunk and len(buf) < TOKEN_BYTES:
            return
        del self.strangers[conn]
        if not chunk or bytes(buf) != self.token:
            self.sel.unregister(conn)
            conn.close()
            return
        conn.sendall(ACK)
        self.bufs[conn] = bytearray()

    def _readable(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            raise GroupError("a rank disconnected")
        buf = self.bufs[conn]
        buf += chunk
        while len(buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(buf)
            if len(buf) < _LEN.size + n:
                break
            msg = pickle.loads(bytes(buf[_LEN.size : _LEN.size + n]))
            del buf[: _LEN.size + n]
            self._handle(conn, msg)

    def _handle(self, conn: socket.socket, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "hello":
            _, rank, channel = msg
            if channel == COLLECTIVE:
                self.coll[rank] = conn
                for payload in self.held.pop(rank, []):
                    _send_raw(conn, payload)
        elif kind == "scatter":
            _, rank, payload = msg
            if rank in self.coll:
                _send_raw(self.coll[rank], payload)
            else:
                self.held.setdefault(rank, []).append(payload)
        elif kind == "add":
            _, key, amount = msg
            self.counters[key] = self.counters.get(key, 0) + amount
            _send(conn, self.counters[key])
        elif kind in ("gather", "gather0"):
            _, seq, rank, part = msg
            parts = self.parts.setdefault(seq, {})
            parts[rank] = part
            if len(parts) == self.world:
                del self.parts[seq]
                frame = _frame([parts[r] for r in range(self.world)])  # pickled once (a plan can be large)
                none = _frame(None)
                for r in sorted(self.coll, reverse=True):  # rank 0 last: it may exit right after its reply
                    self.coll[r].sendall(frame if r == 0 or kind == "gather" else none)

    def _shut(self) -> None:
        for conn in [*self.bufs, *self.strangers]:
            try:
                conn.close()
            except OSError:
                pass
        self.listener.close()


class HubClient:
    """One rank's two connections to the hub."""

    def __init__(self, hosts: list[str], port: int, token: bytes, rank: int, world_size: int,
                 timeout_s: float) -> None:
        self.rank, self.world, self.seq = rank, world_size, 0
        self.lock = threading.Lock()
        self.coll = self._connect(hosts, port, token, COLLECTIVE, timeout_s)
        self.counter = self._connect(hosts, port, token, COUNTER, timeout_s)

    def _connect(self, hosts: list[str], port: int, token: bytes, channel: int, timeout_s: float) -> socket.socket:
        """A connection to the hub at the first of `hosts` that lets this rank in (holds the job's token)."""
        problems = []
        for host in hosts:
            try:
                sock = socket.create_connection((host, port), timeout=min(timeout_s, 10.0))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(token)
                if _recv_exact(sock, len(ACK)) != ACK:
                    raise GroupError("not this job's hub")
            except (OSError, GroupError) as exc:
                problems.append(f"{host}:{port}: {exc}")
                continue
            sock.settimeout(timeout_s)
            _send(sock, ("hello", self.rank, channel))
            return sock
        raise GroupError("cannot reach rank 0's hub at " + "; ".join(problems))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (the same call order on every rank)."""
        return self._collect("gather", obj)

    def gather_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
        return self._collect("gather0", obj)

    def _collect(self, kind: str, obj: Any) -> Any:
        """Send this rank's part of the next collective of `kind` to the hub; returns the hub's reply."""
        self.seq += 1
        try:
            _send(self.coll, (kind, self.seq, self.rank, obj))
            return _recv(self.coll)
        except OSError:
            _group_lost()

    def scatter(self, part: Callable[[int], Any] | None) -> Any:
        """Rank r's part on rank r: rank 0 passes `part` and sends `part(r)` to each other rank, one
        at a time (so it never holds every part at once); the others pass None and receive theirs."""
        self.seq += 1
        try:
            if self.rank != 0:
                return _recv(self.coll)
            assert part is not None, "rank 0 of a scatter gives every rank's part"
            for r in range(1, self.world):
                payload = pickle.dumps(part(r), protocol=pickle.HIGHEST_PROTOCOL)
                _send(self.coll, ("scatter", r, payload))
                del payload
            return part(0)
        except OSError:
            _group_lost()

    def add(self, key: str, amount: int) -> int:
        """Add `amount` to the job-wide counter `key`; returns its new value."""
        with self.lock:
            try:
                _send(self.counter, ("add", key, amount))
                return int(_recv(self.counter))
            except OSError:
                _group_lost()


def _group_lost() -> NoReturn:
    """End this rank quietly (code 1): another rank stopped first, and the supervisor reports that one."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(1)


def join(port: int, listen_fd: int | None, token: bytes, rank: int, world_size: int, timeout_s: float) -> HubClient:
    """Join the group of a forked rank: rank 0 (holding the listening socket `listen_fd`) starts the hub first.

    Returns this rank's client. The listening socket was bound before the fork, so a rank's
    connection waits in its backlog until rank 0's hub accepts it.
    """
    if listen_fd is not None:
        Hub(socket.socket(fileno=listen_fd), world_size, token).start()
    return HubClient(["127.0.0.1"], port, token, rank, world_size, timeout_s)


def serve_everywhere(world_size: int, token: bytes) -> int:
    """Start a hub listening on every interface of this host (rank 0 under torchrun); returns its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(max(128, world_size * 2))
    Hub(listener, world_size, token).start()
    return int(listener.getsockname()[1])
