"""Byte copies from an object store into local files: a rank's source bytes in a few long streamed requests.

The rank's copy segments (source range -> destination position) are put in source order and cut
into about `workers` x STREAM_ROUNDS spans of equal bytes (a segment may be cut anywhere: bytes
are only moved), so every connection carries the same load and the last requests end together.
Each span is read by one ranged GET per contiguous run (convert.io.range_stream) and written
through one STREAM_CHUNK buffer per worker: memory does not grow with the request size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import NamedTuple

from convert.errors import ConversionError
from convert.io.memory import thread_scratch
from convert.io.range_stream import RangeReader
from convert.io.storage import S3_STREAM_BYTES, Storage
from convert.plan.base import Piece

STREAM_CHUNK = 4 << 20  # bytes a worker holds: a streamed request's body passes through this buffer
STREAM_ROUNDS = 2  # a rank's source bytes are cut into about workers x this many spans ...
STREAM_MIN_BYTES = 1 << 20  # ... of at least this many bytes where there are enough
CUT_ALIGN = 64 << 10  # cuts between spans fall on multiples of this source offset where a segment allows
STREAM_SCRATCH = 0  # thread_scratch slot of the chunk (a thread streams or computes, never both at once)


class Segment(NamedTuple):
    """`n` bytes from source file `file` at `start` to local file `dst_file` at `dst_pos`, for `tensor` of piece `piece`."""

    file: str
    start: int
    n: int
    dst_file: str
    dst_pos: int
    tensor: str
    piece: int


def even_spans(segments: Sequence[Segment], count: int, max_bytes: int = S3_STREAM_BYTES,
               min_bytes: int = STREAM_MIN_BYTES, align: int = CUT_ALIGN) -> list[list[Segment]]:
    """`segments` in source order, cut into about `count` spans of equal bytes (more where a span would
    hold over `max_bytes`, fewer where under `min_bytes`); a segment crossing a cut is split there (at a
    multiple of `align` of its source offset where it has one). Every byte is in exactly one span."""
    order = sorted(segments)
    total = sum(s.n for s in order)
    if not total:
        return []
    spans_n = max(1, min(count, total // max(1, min_bytes)), -(-total // max(1, max_bytes)))
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


def copy_segments(pieces: Sequence[Piece], segments: Sequence[Segment], workers: int, src: Storage, dst: Storage,
                  on_done: Callable[[int, int], None]) -> None:
    """Stream `segments` (of `pieces`) with `workers` threads; `on_done(piece, bytes written)` in this thread
    once all of a piece's bytes are written, in the order pieces complete."""
    spans = even_spans(segments, max(1, workers) * STREAM_ROUNDS)
    left: dict[int, int] = {}
    for span in spans:
        for seg in span:
            left[seg.piece] = left.get(seg.piece, 0) + 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        running = {pool.submit(copy_span, span, src, dst): span for span in spans}
        for fut in as_completed(running):
            fut.result()
            for seg in running[fut]:
                left[seg.piece] -= 1
                if not left[seg.piece]:
                    on_done(seg.piece, pieces[seg.piece].write_bytes)


def copy_span(span: Sequence[Segment], src: Storage, dst: Storage) -> None:
    """Copy one span: one streamed request per run of touching source bytes, then start the writeback."""
    runs: list[list[Segment]] = []
    for seg in span:
        if runs and runs[-1][-1].file == seg.file and runs[-1][-1].start + runs[-1][-1].n == seg.start:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    for run in runs:
        with RangeReader(src, run[0].file, run[0].start, run[-1].start + run[-1].n) as stream:
            for seg in run:
                try:
                    for off in range(0, seg.n, STREAM_CHUNK):
                        buf = thread_scratch(min(STREAM_CHUNK, seg.n - off), STREAM_SCRATCH)
                        stream.readinto(buf)
                        dst.pwrite(seg.dst_file, seg.dst_pos + off, buf)
                except ConversionError as exc:
                    raise ConversionError(f"{exc} (while writing tensor {seg.tensor!r})") from exc
    for seg in span:
        dst.start_writeback(seg.dst_file, seg.dst_pos, seg.dst_pos + seg.n)
