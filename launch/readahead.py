"""Read a job's input files into the page cache while the process is still starting up.

A job that computes with torch spends seconds importing it (3.6-4.7 s for a CUDA build on a 16-core machine)
before its first byte is read; the disk sits idle meanwhile. `ReadAhead` keeps it busy: a few threads read the
files, a chunk at a time in order, into a scratch buffer each (read(2) releases the GIL; the kernel keeps what
it read in the page cache), and stop within a chunk of being told to. The job then finds those bytes in memory.
posix_fadvise(WILLNEED) would copy nothing, but Linux reads at most the device's readahead window per call
(read_ahead_kb: often 128 KiB), so it cannot keep a disk busy from a thread that holds the GIL now and then.
The callers name only files the job reads whole, so nothing is read that the job would not read itself (but
for a resumed job, which skips what it wrote before: a few seconds' reading at most).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType

CHUNK = 8 << 20
THREADS = 4  # reads in flight: enough for a disk's sequential speed, few enough to leave the import its core
MEMORY_SHARE = 4  # read ahead at most 1/MEMORY_SHARE of the memory available when it starts


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unreadable)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def chunks(sizes: Sequence[int], share: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, int, int]]:
    """(file index, offset, length) of every CHUNK of files of `sizes`, in order; `share` (i, n) keeps the
    chunks whose running number is i modulo n (one of n processes reading the same files ahead)."""
    index, count = share
    number = 0
    for f, size in enumerate(sizes):
        for off in range(0, size, CHUNK):
            if number % count == index:
                yield f, off, min(CHUNK, size - off)
            number += 1


class ReadAhead:
    """Read `paths` ahead into the page cache from THREADS threads, up to `budget` bytes (default: a quarter of
    the memory available), `share` (i, n) of their chunks; a context manager that starts on entry and stops
    (joining its threads) on exit. Files that cannot be opened or read are skipped: the job reports them.
    """

    def __init__(self, paths: Sequence[str], budget: int | None = None, share: tuple[int, int] = (0, 1),
                 threads: int = THREADS) -> None:
        self.paths = list(paths)
        self.budget = mem_available() // MEMORY_SHARE if budget is None else budget
        self.share = share
        self.requested = 0  # bytes of the chunks taken so far
        self._threads = threads
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._fds: list[int] = []
        self._todo: Iterator[tuple[int, int, int]] = iter(())

    def start(self) -> ReadAhead:
        """Start reading ahead (at once, in daemon threads); returns self."""
        if not self.paths or self.budget <= 0:
            return self
        sizes = []
        for path in self.paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            self._fds.append(fd)
            sizes.append(os.fstat(fd).st_size)
        self._todo = chunks(sizes, self.share)
        self._workers = [threading.Thread(target=self._run, name=f"readahead-{i}", daemon=True)
                         for i in range(self._threads)]
        for worker in self._workers:
            worker.start()
        return self

    def wait(self) -> int:
        """Wait until every chunk within the budget has been read (or the threads stopped); returns the bytes
        of the chunks taken."""
        for worker in self._workers:
            worker.join()
        self._workers = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        return self.requested

    def stop(self) -> int:
        """Stop (each thread within one chunk) and wait for the threads; returns the bytes of the chunks taken."""
        self._stop.set()
        return self.wait()

    def __enter__(self) -> ReadAhead:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _next(self) -> tuple[int, int, int] | None:
        with self._lock:
            if self._stop.is_set() or self.requested >= self.budget:
                return None
            chunk = next(self._todo, None)
            if chunk is not None:
                self.requested += chunk[2]
            return chunk

    def _run(self) -> None:
        buf = memoryview(bytearray(CHUNK))
        while (chunk := self._next()) is not None:
            f, off, length = chunk
            try:
                os.preadv(self._fds[f], [buf[:length]], off)
            except OSError:
                pass  # only ever a head start: the job reads (and reports on) its files itself
