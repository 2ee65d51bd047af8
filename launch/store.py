"""A torch-free client of torch's TCPStore: the few calls a rank needs to find rank 0's hub under torchrun.

torchrun's agent serves a TCPStore (its rendezvous store, shared with the workers: MASTER_ADDR and
MASTER_PORT name it and TORCHELASTIC_USE_AGENT_STORE=True says so). Importing torch to talk to it
costs each rank seconds on a cold cache, so this speaks the store's wire protocol directly
(torch/csrc/distributed/c10d/TCPStoreBackend.hpp): a one-byte query type, then its arguments;
strings and byte values as a little-endian uint64 length and the bytes. A connection opens with
VALIDATE and the magic number; SET stores a value; WAIT blocks until keys exist (answered by one
byte, STOP_WAITING = 0); GET returns a value. torch's client puts "/" before every key, and so does
this one, so that both name a key alike.
"""

from __future__ import annotations

import socket
import struct
import time

VALIDATION_MAGIC = 0x3C85F7CE
VALIDATE, SET, GET, WAIT = 0, 1, 3, 6
STOP_WAITING = 0
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class StoreError(ConnectionError):
    """The store could not be reached or answered outside its protocol."""


def _string(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


def _key(key: str) -> bytes:
    return _string(b"/" + key.encode())


class StoreClient:
    """One connection to a TCPStore at `host:port`, retried until `timeout_s` (the agent may start late)."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=max(1.0, deadline - time.monotonic()))
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise StoreError(f"cannot reach torchrun's store at {host}:{port}: {exc}") from exc
                time.sleep(0.1)
        self.sock.settimeout(timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(bytes([VALIDATE]) + _U32.pack(VALIDATION_MAGIC))

    def local_address(self) -> str:
        """This host's address on the connection to the store (an address the store's network reaches)."""
        return str(self.sock.getsockname()[0])

    def set(self, key: str, value: bytes) -> None:
        """Store `value` under `key`."""
        self.sock.sendall(bytes([SET]) + _key(key) + _string(value))

    def get(self, key: str) -> bytes:
        """The value of `key`, waiting until some rank has set it (up to the connection's timeout)."""
        self.sock.sendall(bytes([WAIT]) + _U64.pack(1) + _key(key))
        if self._recv(1)[0] != STOP_WAITING:
            raise StoreError(f"torchrun's store stopped waiting for {key!r}")
        self.sock.sendall(bytes([GET]) + _key(key))
        (n,) = _U64.unpack(self._recv(_U64.size))
        return self._recv(n)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as exc:
                raise StoreError(f"torchrun's store: {exc}") from exc
            if not chunk:
                raise StoreError("torchrun's store closed the connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()
