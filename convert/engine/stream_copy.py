"""Byte copies from an object store into local files: a rank's source bytes in a few long streamed requests.

The rank's copy segments (source range -> destination position) are put in source order and cut
into `workers` (x STREAM_ROUNDS) spans of equal bytes (a segment may be cut anywhere: bytes
are only moved), so every connection carries the same load; a worker that runs out of spans takes
over half of what is left of the slowest one, so the last requests end together even where the
connections' speeds differ. Each span is read by one ranged GET per contiguous run
(Store.open_range) and written through one STREAM_CHUNK buffer per worker: memory does not
grow with the request size.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from convert.errors import ConversionError
from convert.io.memory import thread_scratch
from convert.io.storage import DEFAULT_STORAGE_SETTINGS, Store
from convert.plan.base import Piece

STREAM_CHUNK = 4 << 20  # bytes a worker holds: a streamed request's body passes through this buffer
STREAM_ROUNDS = 1  # a rank's source bytes are cut into about workers x this many spans ...
STREAM_MIN_BYTES = 1 << 20  # ... of at least this many bytes where there are enough
CUT_ALIGN = 64 << 10  # cuts between spans fall on multiples of this source offset where a segment allows
STREAM_SCRATCH = 0  # thread_scratch slot of the chunk (a thread streams or computes, never both at once)
STEAL_MIN_BYTES = 8 << 20  # a running span's unclaimed bytes are split with an idle worker from this many on


class Segment(NamedTuple):
    """`n` bytes from source file `file` at `start` to local file `dst_file` at `dst_pos`, for `tensor` of piece `piece`."""

    file: str
    start: int
    n: int
    dst_file: str
    dst_pos: int
    tensor: str
    piece: int


def even_spans(segments: Sequence[Segment], count: int, max_bytes: int = DEFAULT_STORAGE_SETTINGS.s3_stream_bytes,
               min_bytes: int = STREAM_MIN_BYTES, align: int = CUT_ALIGN) -> list[list[Segment]]:
    """`segments` in source order, cut into `count` spans of equal bytes, or a multiple of `count` where a span
    would hold over `max_bytes` (whole rounds: every worker takes as many), fewer where under `min_bytes`; a
    segment crossing a cut is split there (at a multiple of `align` of its source offset where it has one).
    Every byte is in exactly one span."""
    order = sorted(segments)
    total = sum(s.n for s in order)
    if not total:
        return []
    rounds = -(-total // max(1, count * max_bytes))
    spans_n = max(1, min(count * rounds, total // max(1, min_bytes)))
    spans: list[list[Segment]] = [[]]
    done = 0
    for seg in order:
        while seg.n:
            cut = total * len(spans) // spans_n  # where the current span ends, in bytes of the whole
            take = min(seg.n, cut - done)
            aligned = (seg.start + take) // align * align - seg.start
            if 0 < take < seg.n and aligned > 0:
                take = aligned
            if take > 0:
                spans[-1].append(seg._replace(n=take))
                seg = seg._replace(start=seg.start + take, n=seg.n - take, dst_pos=seg.dst_pos + take)
                done += take
            if seg.n and len(spans) < spans_n:
                spans.append([])
            elif seg.n:  # the last span takes the rest
                spans[-1].append(seg)
                done += seg.n
                break
    return [s for s in spans if s]


class _Span:
    """A worker's share: the bytes [0, limit) of `segments` (in order), of which `pos` are claimed so far.

    Another worker may take the second half of what is left (steal: `limit` moves down, never below `pos`).
    """

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.pos = 0
        self.limit = sum(s.n for s in segments)

    def steal(self, align: int) -> _Span | None:
        """The second half of the unclaimed bytes (cut at a multiple of `align`) as a span of its own; None
        where less than STEAL_MIN_BYTES is left. Call under the lock."""
        half = (self.limit - self.pos) // 2 // align * align
        if self.limit - self.pos < STEAL_MIN_BYTES or half <= 0:
            return None
        cut = self.limit - half
        rest, at = [], 0
        for seg in self.segments:
            lo, hi = max(at, cut), min(at + seg.n, self.limit)
            if lo < hi:
                skip = lo - at
                rest.append(seg._replace(start=seg.start + skip, dst_pos=seg.dst_pos + skip, n=hi - lo))
            at += seg.n
        self.limit = cut
        return _Span(rest)


def copy_segments(pieces: Sequence[Piece], segments: Sequence[Segment], workers: int, src: Store, dst: Store,
                  on_done: Callable[[int, int], None],
                  stream_bytes: int = DEFAULT_STORAGE_SETTINGS.s3_stream_bytes) -> None:
    """Stream `segments` (of `pieces`) with `workers` threads; `on_done(piece, bytes written)` in this thread
    once all of a piece's bytes are written, in the order pieces complete. A span holds at most `stream_bytes`
    (the source's StorageSettings.s3_stream_bytes) where there are more than `workers` spans' worth.

    The spans of even_spans are taken in turn; a worker that finds none left takes over the second half of
    the unclaimed bytes of the running span with the most (its owner stops there), so a slow connection
    does not hold the end up: the last requests end together however the connections' speeds differ.
    """
    left: dict[int, int] = {}
    for seg in segments:
        left[seg.piece] = left.get(seg.piece, 0) + seg.n
    for i, p in enumerate(pieces):  # nothing to copy (empty tensors): done already
        if not left.get(i):
            left.pop(i, None)
            on_done(i, p.write_bytes)
    pool = _SpanPool(even_spans(segments, max(1, workers) * STREAM_ROUNDS, stream_bytes), left)
    threads = [threading.Thread(target=pool.work, args=(src, dst), daemon=True) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    error = pool.drain(len(threads), lambda piece: on_done(piece, pieces[piece].write_bytes))
    for t in threads:
        t.join()
    if error is not None:
        raise error
    if left and any(left.values()):
        raise AssertionError(f"stream copy ended with {sum(left.values())} bytes not written")


class _SpanPool:
    """The spans of one copy_segments call, shared by its workers under one lock: those not started (`todo`),
    those running, and each piece's bytes still to write (`left`); a worker hands the calling thread each piece it
    finished, its error and its end through `events`."""

    def __init__(self, spans: list[list[Segment]], left: dict[int, int]) -> None:
        """A pool of `spans` (even_spans) to copy, `left` each piece's bytes to write (updated in place)."""
        self.todo = deque(_Span(s) for s in spans)
        self.running: list[_Span] = []
        self.left = left
        self.lock = threading.Lock()
        self.events: queue.Queue[int | BaseException | None] = queue.Queue()
        self.failed = threading.Event()

    def next_span(self) -> _Span | None:
        """The next span to copy: one not started, else the second half of the running one with the most left;
        None when there is none, or a worker failed."""
        with self.lock:
            if self.failed.is_set():
                return None
            span = self.todo.popleft() if self.todo else None
            if span is None and self.running:
                span = max(self.running, key=lambda s: s.limit - s.pos).steal(STREAM_CHUNK)
            if span is not None:
                self.running.append(span)
            return span

    def claim(self, span: _Span, n: int) -> int:
        """How many of the next `n` bytes of `span` its worker copies (fewer once another took the rest over, 0
        after a failure); they are claimed."""
        with self.lock:
            n = 0 if self.failed.is_set() else max(0, min(n, span.limit - span.pos))
            span.pos += n
            return n

    def wrote(self, piece: int, n: int) -> None:
        """Count `n` bytes of `piece` written; its index goes to `events` once all are."""
        with self.lock:
            self.left[piece] -= n
            if not self.left[piece]:
                self.events.put(piece)

    def work(self, src: Store, dst: Store) -> None:
        """One worker thread: copy spans from `src` to `dst` until none is left; an error goes to `events` (and
        stops the others), then None (this worker ended)."""
        try:
            while (span := self.next_span()) is not None:
                try:
                    copy_span(span, src, dst, self.claim, self.wrote)
                finally:
                    with self.lock:
                        self.running.remove(span)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises it
            self.failed.set()
            self.events.put(exc)
        finally:
            self.events.put(None)

    def drain(self, workers: int, done: Callable[[int], None]) -> BaseException | None:
        """Take `events` until all `workers` ended, calling `done(piece)` for each piece finished before any error;
        returns the first error (None: none)."""
        error: BaseException | None = None
        ended = 0
        while ended < workers:
            event = self.events.get()
            if event is None:
                ended += 1
            elif isinstance(event, BaseException):
                error = error or event
            elif error is None:
                done(event)
        return error


def copy_span(span: _Span, src: Store, dst: Store, claim: Callable[[_Span, int], int],
              wrote: Callable[[int, int], None]) -> None:
    """Copy a span's bytes in order, one streamed request per run of touching source bytes, a chunk at a time
    as `claim` hands them out (it hands out less, then nothing, once another worker took the rest over);
    `wrote(piece, n)` after each chunk is written. `dst` has positional writes (local files)."""
    files = dst.positional
    if files is None:
        raise ConversionError(f"{dst.url}: positional writes to this filesystem are not supported yet (local paths only)")
    runs: list[list[Segment]] = []
    for seg in span.segments:
        if runs and runs[-1][-1].file == seg.file and runs[-1][-1].start + runs[-1][-1].n == seg.start:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    for run in runs:
        with src.open_range(run[0].file, run[0].start, run[-1].start + run[-1].n) as stream:
            for seg in run:
                off = 0
                while off < seg.n:
                    n = claim(span, min(STREAM_CHUNK, seg.n - off))
                    if not n:
                        return
                    buf = thread_scratch(n, STREAM_SCRATCH)
                    try:
                        stream.readinto(buf)
                        files.pwrite(seg.dst_file, seg.dst_pos + off, buf)
                    except ConversionError as exc:
                        raise ConversionError(f"{exc} (while writing tensor {seg.tensor!r})") from exc
                    files.start_writeback(seg.dst_file, seg.dst_pos + off, seg.dst_pos + off + n)
                    wrote(seg.piece, n)
                    off += n
