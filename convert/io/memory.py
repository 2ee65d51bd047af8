"""Keep large transient buffers out of the heap so a rank's RSS stays at what it holds now.

glibc raises its mmap threshold after large frees, after which multi-MB piece buffers
come from per-thread heap arenas that are never given back: RSS grows with the job.
Pinning the threshold keeps every buffer >= 1 MiB in its own mapping, freed at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading

M_MMAP_THRESHOLD = -3
_scratch = threading.local()


@functools.cache
def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve allocations of at least `nbytes` by mmap; returns False where not glibc.

    Done once per process; glibc is opened by its soname first (find_library runs `ldconfig -p`).
    """
    for find in (lambda: "libc.so.6", lambda: ctypes.util.find_library("c")):
        name = find()
        try:
            return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, nbytes)) if name else False
        except (OSError, AttributeError):
            continue
    return False


def thread_scratch(nbytes: int, slot: int) -> memoryview:
    """A writable buffer of `nbytes` owned by the calling thread, handed out again by its next call for `slot`.

    For a piece's working memory: a fresh multi-MB buffer is a new mapping whose every page
    faults in zeroed (about 1 ms per 4 MB), paid twice per piece by read-then-compute steps;
    a reused one keeps its pages. The contents are valid until this thread asks for `slot`
    again. Each slot grows to the largest request of its thread and is freed with the thread.
    """
    bufs: dict[int, bytearray] = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or len(buf) < nbytes:
        bufs[slot] = buf = bytearray(nbytes)
    return memoryview(buf)[:nbytes]


class ByteBudget:
    """At most `limit` bytes held at once among threads: acquire(n) waits until n more fit (or nothing is
    held: a single request larger than the limit goes alone), release(n) gives them back; after close(),
    acquire no longer waits (a failed job's holders may never release)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.closed = limit, 0, False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> bool:
        """Wait until `n` more bytes fit, then count them held; False (nothing counted) once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed or self.used == 0 or self.used + n <= self.limit)
            if self.closed:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        """Count `n` bytes no longer held."""
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def close(self) -> None:
        """Stop every wait, now and later."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
