"""convert.engine.stream_copy: a rank's copy segments cut into spans of equal bytes, and shared out while they stream."""

from __future__ import annotations

import os
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from convert.engine import stream_copy
from convert.engine.stream_copy import Segment, copy_segments, even_spans
from convert.io.range_stream import RangeReader
from convert.io.storage import Storage
from convert.plan.base import Piece, Read, Write


@st.composite
def segment_lists(draw: st.DrawFn) -> list[Segment]:
    out, pos = [], {"a": 0, "b": 0}
    for i in range(draw(st.integers(1, 25))):
        f = draw(st.sampled_from("ab"))
        n = draw(st.integers(1, 3_000_000))
        out.append(Segment(f, pos[f], n, f"out-{f}", draw(st.integers(0, 1 << 40)), f"t{i}", i))
        pos[f] += n + draw(st.sampled_from([0, 0, 4096]))
    return out


@settings(max_examples=300, deadline=None)
@given(segment_lists(), st.integers(1, 40), st.sampled_from([1 << 20, 64 << 20]), st.sampled_from([1, 1 << 20]),
       st.sampled_from([1, 64 << 10]))
def test_every_byte_lands_in_exactly_one_span_and_spans_are_even(segs, count, max_bytes, min_bytes, align):
    spans = even_spans(segs, count, max_bytes, min_bytes, align)
    total = sum(s.n for s in segs)
    pieces: dict[int, list[Segment]] = {}
    for span in spans:
        assert span, "no empty span"
        assert [ (s.file, s.start) for s in span] == sorted((s.file, s.start) for s in span), "source order"
        for s in span:
            pieces.setdefault(s.piece, []).append(s)
    for seg in segs:  # the parts of a segment tile it exactly, source and destination moving together
        parts = sorted(pieces[seg.piece], key=lambda s: s.start)
        assert all(p.n > 0 and p.file == seg.file and p.dst_file == seg.dst_file for p in parts)
        assert [p.start - seg.start for p in parts] == [p.dst_pos - seg.dst_pos for p in parts]
        assert parts[0].start == seg.start and sum(p.n for p in parts) == seg.n
        assert all(a.start + a.n == b.start for a, b in zip(parts, parts[1:]))
    sizes = [sum(s.n for s in span) for span in spans]
    want = max(1, min(count * -(-total // (count * max_bytes)), total // min_bytes))  # whole rounds of `count`
    assert len(spans) <= want
    if align == 1:  # unaligned cuts: every span within a byte of its share
        assert len(spans) == want and max(sizes) - min(sizes) <= 1, sizes
    else:  # a cut moves back to an aligned offset inside its segment: by less than one alignment step
        assert max(sizes) <= total / want + align, sizes


def test_a_rank_of_equal_experts_is_cut_into_equal_requests():
    """35 experts of 9.4 MB over 8 spans: 41.3 MB each, where whole pieces would give 37.7 to 47.2 MB."""
    segs = [Segment("a", i * 9_437_184, 9_437_184, "out", i * 9_437_184, "t", i) for i in range(35)]
    assert [sum(s.n for s in span) for span in even_spans(segs, 8, align=1)] == [41_287_680] * 8


class _SlowSource:
    """A source whose reads below `slow_below` take `delay` seconds each (a slow connection), recording who read what."""

    def __init__(self, data: bytes, slow_below: int, delay: float) -> None:
        self.data, self.slow_below, self.delay = data, slow_below, delay
        self.reads: list[tuple[int, int]] = []  # (thread id, offset)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        self.reads.append((threading.get_ident(), start))
        if start < self.slow_below:
            time.sleep(self.delay)
        return self.data[start:end]

    def open_range(self, rel: str, start: int, end: int) -> RangeReader:
        return RangeReader(self, rel, start, end)  # one read_range per readinto, as from a store that streams none


def test_an_idle_worker_takes_over_half_of_a_slow_span_and_every_byte_lands_once(tmp_path, monkeypatch):
    """Two workers, four spans; reads of the first quarter are slow. The worker done with its own spans takes the
    unclaimed half of the slow one (its owner stops there): the slow quarter is read by both threads, every byte
    lands exactly once where it belongs, and each piece is reported done once, with its bytes."""
    monkeypatch.setattr(stream_copy, "STREAM_CHUNK", 64 << 10)
    monkeypatch.setattr(stream_copy, "STEAL_MIN_BYTES", 256 << 10)
    size = 8 << 20
    data = os.urandom(size)
    src = _SlowSource(data, size // 4, 0.02)
    dst = Storage(str(tmp_path))
    dst.positional.create_sized("out.bin", b"", size)
    # 8 pieces of 1 MiB, written in reverse order of the source (destination positions differ from source ones)
    pieces = [Piece((Read("in", i << 20, (i + 1) << 20, "U8"),), (Write(f"t{i}", 0, 1 << 20, "U8"),)) for i in range(8)]
    segs = [Segment("in", i << 20, 1 << 20, "out.bin", (7 - i) << 20, f"t{i}", i) for i in range(8)]
    done: list[tuple[int, int]] = []
    copy_segments(pieces, segs, 2, src, dst, lambda i, n: done.append((i, n)))
    dst.close()
    got = (tmp_path / "out.bin").read_bytes()
    assert got == b"".join(data[(7 - k) << 20 : (8 - k) << 20] for k in range(8))
    assert sorted(done) == [(i, 1 << 20) for i in range(8)]
    slow_readers = {t for t, off in src.reads if off < size // 4}
    assert len(slow_readers) == 2, "the slow span was not shared"
    offsets = sorted(off for _, off in src.reads)
    assert len(offsets) == len(set(offsets)), "a byte range was read twice"
