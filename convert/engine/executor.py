"""Run one rank's pieces: read source byte ranges, copy/cast or regroup, write at final offsets.

Byte copies between local files stream through one 1 MiB buffer per worker (or
`copy_file_range`, see PositionalWrites.copy_range_from), and from an object store into local files
through one chunk per worker (convert.engine.stream_copy), never holding a piece in memory;
everything else holds at most `workers` pieces (one expert each, or a bounded chunk)
at a time; a stepped piece (convert.plan.base.SteppedCompute: a merge's run of experts) reads,
computes and writes a step at a time (LazyReads). Source ranges are prefetched exactly, a bounded
window ahead, by a thread of its own (Prefetcher).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, overload

from convert.engine.stream_copy import Segment, copy_segments
from convert.errors import ConversionError
from convert.formats.safetensors import DTYPE_SIZES, TensorSlot
from convert.io.memory import pin_mmap_threshold, thread_scratch
from convert.io.storage import Fetched, PositionalWrites, Store, fetch
from convert.plan.base import Piece, Read, SteppedCompute, Write, is_stepped
from convert.plan.transforms import cast_bytes, torch_dtypes

REMOTE_READ_MEMORY = 512 << 20  # source bytes one rank holds at once from an object store, over all its workers


class PhaseClock:
    """Seconds spent in each phase of the pieces (read, compute, write, copy, and `writeback`: starting the disk
    on what a piece wrote), summed over a rank's worker threads, the Prefetcher thread's `prefetch` (asking the
    source ahead) and the calling thread's `wait` (for the oldest piece in flight): where a rank's streaming
    time goes, for --stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, since: float) -> float:
        """Count the time from `since` (time.perf_counter) to now under `phase`; returns now."""
        now = time.perf_counter()
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now

    def take(self) -> dict[str, float]:
        """The seconds counted so far, rounded, and a fresh count."""
        with self._lock:
            out, self.seconds = {k: round(v, 3) for k, v in sorted(self.seconds.items())}, {}
        return out


PHASES = PhaseClock()


def _segments(reads: Sequence[Read], writes: Sequence[Write]) -> Iterator[tuple[Read, int, Write, int, int]]:
    """Pair the concatenated reads with the concatenated writes (same dtype on both sides).

    Yields (read, offset in read, write, offset in write, length).
    """
    ri = wi = 0
    roff = woff = 0
    while ri < len(reads) and wi < len(writes):
        r, w = reads[ri], writes[wi]
        n = min(r.end - r.start - roff, w.end - w.start - woff)
        yield r, roff, w, woff, n
        roff += n
        woff += n
        if roff == r.end - r.start:
            ri, roff = ri + 1, 0
        if woff == w.end - w.start:
            wi, woff = wi + 1, 0


class Executor:
    """Writes pieces into output files laid out by `slots` (tensor name -> (file name, slot))."""

    def __init__(
        self,
        src: Store,
        dst: Store,
        slots: dict[str, tuple[str, TensorSlot]],
        workers: int = 4,
    ) -> None:
        """`dst` is a store with positional writes (local files: LocalSink)."""
        if dst.positional is None:
            raise ConversionError(f"{dst.url}: positional writes to this filesystem are not supported yet "
                                  "(local paths only)")
        self.src, self.dst, self.slots, self.workers = src, dst, slots, workers
        self.files: PositionalWrites = dst.positional
        pin_mmap_threshold()

    def _dst_pos(self, w: Write) -> tuple[str, int]:
        file, slot = self.slots[w.tensor]
        return file, slot.start + w.start

    def run_piece(self, piece: Piece, fetched: Fetched | None = None) -> int:
        """Execute one piece (its source bytes from `fetched` where given); returns bytes written.

        A source that fails to read is named with the tensor.
        """
        try:
            return self._run_piece(piece, fetched)
        except ConversionError as exc:
            names = sorted({w.tensor for w in piece.writes})
            raise ConversionError(f"{exc} (while writing tensor {names[0]!r}"
                                  + (f" and {len(names) - 1} more)" if len(names) > 1 else ")")) from exc

    def _write_back(self, writes: Sequence[Write]) -> None:
        """Start the disk on what `writes` put in the page cache (PositionalWrites.start_writeback)."""
        t = time.perf_counter()
        for file, start, end in self._written_runs(writes):
            self.files.start_writeback(file, start, end)
        PHASES.add("writeback", t)

    def _written_runs(self, writes: Sequence[Write]) -> list[tuple[str, int, int]]:
        """The (file, start, end) byte runs of `writes`, adjacent ones merged."""
        spans = sorted((*self._dst_pos(w), w.end - w.start) for w in writes)
        runs: list[tuple[str, int, int]] = []
        for file, pos, n in spans:
            if runs and runs[-1][0] == file and runs[-1][2] == pos:
                runs[-1] = (file, runs[-1][1], pos + n)
            else:
                runs.append((file, pos, pos + n))
        return runs

    def _run_piece(self, piece: Piece, fetched: Fetched | None = None) -> int:
        """Write a piece's bytes and start the disk on them (a stepped piece: on each step's)."""
        t = time.perf_counter()
        if is_stepped(piece.regroup):
            return self._run_steps(piece, piece.regroup, fetched)
        if is_byte_copy(piece) and self.files.can_copy_from(self.src):
            for r, roff, w, woff, n in _segments(piece.reads, piece.writes):
                file, pos = self._dst_pos(w)
                self.files.copy_range_from(self.src, r.file, r.start + roff, file, pos + woff, n)
            PHASES.add("copy", t)
        else:
            self._write(piece.writes, piece_outputs(fetched or self.src, piece))
        self._write_back(piece.writes)
        return piece.write_bytes

    def _run_steps(self, piece: Piece, compute: SteppedCompute, fetched: Fetched | None) -> int:
        """Run a stepped piece: each step's source bytes read as it needs them (LazyReads), its outputs written
        and the disk started on them before the next step reads, so that a piece of many experts reads and
        writes by turns (a whole run read before any write kept the disk's reads and writes apart)."""
        bufs = LazyReads(fetched or self.src, piece.reads)
        done = 0
        t = time.perf_counter()
        for outs in compute.steps(bufs):
            PHASES.add("compute", t + bufs.take_read_seconds())
            writes = piece.writes[done : done + len(outs)]
            if len(writes) != len(outs):
                raise AssertionError(f"piece for {piece.writes[0].tensor}: a step gave {len(outs)} outputs, "
                                     f"{len(writes)} writes left")
            self._write(writes, outs)
            self._write_back(writes)
            done += len(outs)
            t = time.perf_counter()
        if done != len(piece.writes):
            raise AssertionError(f"piece for {piece.writes[0].tensor}: {done} outputs, {len(piece.writes)} writes")
        return piece.write_bytes

    def _write(self, writes: Sequence[Write], outs: Sequence[bytes | memoryview]) -> None:
        """Write each output at its write's place in the destination."""
        t = time.perf_counter()
        # One pwrite per tensor even where tensors are adjacent: one pwritev per 18 MB run of
        # adapter tensors made split_adapter's data phase 2-3x slower (Linux 6.18, ext4, new file).
        for w, buf in zip(writes, outs):
            if len(buf) != w.end - w.start:
                raise AssertionError(f"piece for {w.tensor}: produced {len(buf)} bytes, expected {w.end - w.start}")
            file, pos = self._dst_pos(w)
            self.files.pwrite(file, pos, buf)
        PHASES.add("write", t)

    def run(self, pieces: Sequence[Piece], on_done: Callable[[int, int], None]) -> None:
        """Execute `pieces` with up to `workers` in flight.

        Calls `on_done(position in pieces, bytes written)` in the calling thread after each,
        in order. From an object store, runs of consecutive pieces are fetched together
        (group_pieces), so adjacent source bytes come in few large requests.
        """
        if self.src.remote:
            if all(is_byte_copy(p) for p in pieces):
                self._run_streamed(pieces, on_done)
            else:
                self._run_fetched(pieces, on_done)
            return
        with Prefetcher(self.src, pieces, self.src.settings.read_ahead) as ahead:
            self._run_local(pieces, on_done, ahead)

    def _run_local(self, pieces: Sequence[Piece], on_done: Callable[[int, int], None], ahead: Prefetcher) -> None:
        """run() for a local source: `workers` threads, the source read `ahead`."""
        if self.workers <= 1:
            for i, p in enumerate(pieces):
                ahead.reached(i)
                on_done(i, self.run_piece(p))
            return
        def finish(k: int, fut: Future[int]) -> None:
            t = time.perf_counter()
            n = fut.result()
            PHASES.add("wait", t)
            on_done(k, n)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            # Bounded submission: at most 2 * workers pieces queued, so memory stays bounded.
            pending: list[tuple[int, Future[int]]] = []
            for i, p in enumerate(pieces):
                ahead.reached(i)
                pending.append((i, pool.submit(self.run_piece, p)))
                if len(pending) >= 2 * self.workers:
                    finish(*pending.pop(0))
            for k, fut in pending:
                finish(k, fut)

    def _run_streamed(self, pieces: Sequence[Piece], on_done: Callable[[int, int], None]) -> None:
        """run() for byte copies from an object store into local files (convert.engine.stream_copy): `on_done`
        is called as pieces complete, not in order."""
        segments = []
        for i, p in enumerate(pieces):
            for r, roff, w, woff, n in _segments(p.reads, p.writes):
                file, pos = self._dst_pos(w)
                segments.append(Segment(r.file, r.start + roff, n, file, pos + woff, w.tensor, i))
        copy_segments(pieces, segments, self.workers, self.src, self.dst, on_done, self.src.settings.s3_stream_bytes)

    def _run_fetched(self, pieces: Sequence[Piece], on_done: Callable[[int, int], None]) -> None:
        """run() for a remote source: groups of pieces, each group's reads fetched first.

        `workers` threads fetch (one request each at a time) while others write what was
        fetched, so a connection never waits for the local writes; at most 2 x workers groups
        are held at once, each at most REMOTE_READ_MEMORY / (2 x workers) bytes of reads.
        """
        workers = max(1, self.workers)
        groups = group_pieces(pieces, min(self.src.settings.s3_get_bytes, REMOTE_READ_MEMORY // (2 * workers)))

        def fetch_group(idx: list[int]) -> Fetched:
            return fetch(self.src, [(r.file, r.start, r.end) for i in idx for r in pieces[i].reads])

        def write(idx: list[int], fetched: Future[Fetched]) -> list[int]:
            got = fetched.result()
            return [self.run_piece(pieces[i], got) for i in idx]

        with ThreadPoolExecutor(max_workers=workers) as fetchers, ThreadPoolExecutor(max_workers=workers) as writers:
            pending: list[tuple[list[int], Future[list[int]]]] = []
            for idx in groups:
                pending.append((idx, writers.submit(write, idx, fetchers.submit(fetch_group, idx))))
                if len(pending) >= 2 * workers:
                    done_idx, fut = pending.pop(0)
                    for k, n in zip(done_idx, fut.result()):
                        on_done(k, n)
            for done_idx, fut in pending:
                for k, n in zip(done_idx, fut.result()):
                    on_done(k, n)


def is_byte_copy(piece: Piece) -> bool:
    """True when `piece` only moves bytes: no regrouping, and the same dtype read as written."""
    return piece.regroup is None and all(r.dtype == w.dtype for r in piece.reads for w in piece.writes)


def group_pieces(pieces: Sequence[Piece], max_bytes: int) -> list[list[int]]:
    """Indices of `pieces` in runs of consecutive pieces reading at most `max_bytes` together (at least one each)."""
    groups: list[list[int]] = []
    size = 0
    for i, p in enumerate(pieces):
        if groups and size + p.read_bytes <= max_bytes:
            groups[-1].append(i)
            size += p.read_bytes
        else:
            groups.append([i])
            size = p.read_bytes
    return groups


class Prefetcher:
    """Keeps the source reading up to `window` bytes ahead of the pieces being executed.

    Only the ranges the pieces will read are requested (no speculative readahead: see
    Store.prefetch), merged per file where they touch, and refilled in half-window
    steps so that many small pieces still make few, large requests. This costs page
    cache, not process memory. The requests are made by a thread of its own, in order:
    asking Linux to read ahead blocks while the disk's queue is full (0.9 s of a 6.2 s
    merge on 2 cores), and the caller meanwhile hands out and collects pieces. A request
    that fails is dropped (it is advice: the piece's own read reports the error).
    """

    def __init__(self, src: Store, pieces: Sequence[Piece], window: int) -> None:
        self.src, self.pieces, self.window = src, pieces, window
        self.cum = [0]
        for p in pieces:
            self.cum.append(self.cum[-1] + p.read_bytes)
        self.next = 0  # pieces [0, next) have been requested
        self._requests: queue.SimpleQueue[tuple[str, int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, et: type[BaseException] | None, *rest: object) -> None:
        self.close(drop=et is not None)

    def reached(self, i: int) -> None:
        """Piece i is about to run: top the window up when less than half of it is left (with no window, nothing
        is asked)."""
        if self.src.remote or self.window <= 0 or self.next >= len(self.pieces):
            return
        if self.next > i and self.cum[self.next] - self.cum[i] >= self.window // 2:
            return
        end = max(self.next, i + 1)
        while end < len(self.pieces) and self.cum[end] - self.cum[i] < self.window:
            end += 1
        ranges: dict[str, list[list[int]]] = {}
        for p in self.pieces[self.next : end]:
            for r in p.reads:
                ranges.setdefault(r.file, []).append([r.start, r.end])
        for file, spans in ranges.items():
            spans.sort()
            merged = [spans[0]]
            for a, b in spans[1:]:
                if a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            for a, b in merged:
                self._request(file, a, b)
        self.next = end

    def _request(self, file: str, start: int, end: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()
        self._requests.put((file, start, end))

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            if self._closing:  # the pieces failed: what is left is not needed
                continue
            t = time.perf_counter()
            try:
                self.src.prefetch(*request)
            except (ConversionError, OSError):
                pass
            PHASES.add("prefetch", t)

    def close(self, drop: bool = False) -> None:
        """Make the requests left (drop them where `drop`: the pieces failed) and join the thread."""
        if self._thread is not None:
            self._closing = drop
            self._requests.put(None)
            self._thread.join()
            self._thread = None


def uses_torch(piece: Piece) -> bool:
    """Whether `piece` computes with torch: a compute that says so (`uses_torch`, True where it says nothing) or
    a cast numpy does not do (convert.plan.ndarrays.casts)."""
    from convert.plan import ndarrays as nd

    if piece.regroup is not None:
        return bool(getattr(piece.regroup, "uses_torch", True))
    return not all(nd.casts(r.dtype, w.dtype) for r in piece.reads for w in piece.writes)


def warm_up(pieces: Sequence[Piece]) -> None:
    """Import torch now if any of `pieces` computes with it (uses_torch), so the import is not paid mid-stream,
    and give each of its ops one thread, as numpy's BLAS gets (convert.plan.ndarrays.single_threaded_blas):
    the pieces run on the executor's worker threads, one per core or fewer, and a library's own pool on top of
    them oversubscribes the cores (a merge of bf16 experts on 2 cores: 1.05 GB/s per worker with one thread
    each, 0.14 GB/s with two)."""
    if all(is_byte_copy(p) for p in pieces):
        return
    from convert.plan import ndarrays as nd

    nd.single_threaded_blas()
    if any(uses_torch(p) for p in pieces):
        torch_dtypes()
        import torch

        torch.set_num_threads(1)


READ_SCRATCH = 0  # thread_scratch slot of a compute step's source bytes; its outputs use slots from 1 on


class ReadSource(Protocol):
    """What a piece's source bytes are read from: a Store, or a Fetched (ranges of one already in memory)."""

    def read_range(self, rel: str, start: int, end: int) -> bytes | memoryview: ...

    def read_into(self, rel: str, start: int, out: memoryview) -> None: ...


class LazyReads(Sequence[memoryview]):
    """A piece's reads, each read on first use into its place in this thread's read scratch (valid until the
    thread's next piece), for a stepped compute (convert.plan.base.SteppedCompute)."""

    def __init__(self, src: ReadSource, reads: Sequence[Read]) -> None:
        self.src, self.reads = src, reads
        self.starts = [0]
        for r in reads:
            self.starts.append(self.starts[-1] + r.end - r.start)
        self.buf = thread_scratch(self.starts[-1], READ_SCRATCH)
        self.views: list[memoryview | None] = [None] * len(reads)
        self.read_seconds = 0.0

    def take_read_seconds(self) -> float:
        """Seconds spent reading since the last call."""
        seconds, self.read_seconds = self.read_seconds, 0.0
        return seconds

    def __len__(self) -> int:
        return len(self.reads)

    @overload
    def __getitem__(self, i: int) -> memoryview: ...

    @overload
    def __getitem__(self, i: slice) -> list[memoryview]: ...

    def __getitem__(self, i: int | slice) -> memoryview | list[memoryview]:
        if isinstance(i, slice):
            return [self._get(k) for k in range(*i.indices(len(self.reads)))]
        return self._get(range(len(self.reads))[i])

    def _get(self, i: int) -> memoryview:
        view = self.views[i]
        if view is None:
            t = time.perf_counter()
            r = self.reads[i]
            view = self.buf[self.starts[i] : self.starts[i + 1]]
            self.src.read_into(r.file, r.start, view)
            self.views[i] = view
            self.read_seconds += PHASES.add("read", t) - t
        return view


def read_scratch(src: ReadSource, reads: Sequence[Read]) -> list[memoryview]:
    """The bytes of `reads`, back to back in this thread's read scratch (valid until its next call)."""
    buf = thread_scratch(sum(r.end - r.start for r in reads), READ_SCRATCH)
    out, pos = [], 0
    for r in reads:
        view = buf[pos : pos + r.end - r.start]
        src.read_into(r.file, r.start, view)
        out.append(view)
        pos += r.end - r.start
    return out


def piece_outputs(src: ReadSource, piece: Piece) -> list[bytes | memoryview]:
    """Read a piece's source bytes and return the bytes of each of its writes, in order.

    The buffers may live in the calling thread's scratch (convert.io.memory.thread_scratch):
    consume them before this thread computes its next piece.
    """
    t = time.perf_counter()
    if piece.regroup is not None:
        bufs = read_scratch(src, piece.reads)
        t = PHASES.add("read", t)
        computed: list[bytes | memoryview] = list(piece.regroup.outputs(bufs))
        PHASES.add("compute", t)
        return computed
    # A byte copy or an elementwise cast: concatenate the (cast) reads, then slice into the writes.
    dst_dtype = piece.writes[0].dtype
    raw = [src.read_range(r.file, r.start, r.end) for r in piece.reads]
    t = PHASES.add("read", t)
    parts = [cast_bytes(b, r.dtype, dst_dtype) for b, r in zip(raw, piece.reads)]
    PHASES.add("compute", t)
    data = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
    outs: list[bytes | memoryview] = []
    pos = 0
    for w in piece.writes:
        outs.append(data[pos : pos + w.end - w.start])
        pos += w.end - w.start
    return outs


def piece_memory(piece: Piece) -> int:
    """Bytes a piece holds in memory at its peak (0 for kernel-side copies is not assumed here)."""
    if piece.regroup is None:
        widen = max((DTYPE_SIZES[w.dtype] / DTYPE_SIZES[r.dtype] for r in piece.reads for w in piece.writes), default=1)
        return int(piece.read_bytes * (1 + widen))
    return piece.read_bytes + 2 * piece.write_bytes
