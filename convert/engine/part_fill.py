"""Filling multipart-upload parts from the source: a few parts at once, by long streamed requests.

One output part (a projection of a few experts, fused) takes its bytes from a few source ranges of a
few MB each, and an object store charges a first-byte latency per request: read part by part, those
requests are latency-bound. Parts whose source bytes touch (in a per-expert source, the projections of
one expert lie side by side) are grouped, up to a byte budget, and a group's buffers are filled by one
streamed ranged GET per run of touching source bytes (cut at a part's size: runs are what the workers
share out), straight into the parts' buffers (Store.open_range): requests are as long as the
source allows, and no body is held twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from convert.engine.executor import _segments, is_byte_copy, piece_outputs
from convert.io.storage import Store
from convert.plan.base import Piece
from sharding.parts import Part


class Copy(NamedTuple):
    """`n` bytes of source file `file` from `start`, to offset `at` of part `part` (its index in a rank's list)."""

    file: str
    start: int
    n: int
    part: int
    at: int


def part_copies(parts: Sequence[Part], pieces: Mapping[int, Piece] | Sequence[Piece],
                slot_of: Mapping[str, tuple[str, Any]]) -> tuple[list[Copy], list[list[int]]]:
    """The byte copies that fill `parts` (source ranges, each cut to the part it lands in), and per part the
    plan pieces it computes instead (casts, layout changes: not byte copies).

    `slot_of` maps an output tensor to (output file, its slot in that file).
    """
    copies: list[Copy] = []
    computed: list[list[int]] = []
    for k, part in enumerate(parts):
        computed.append([])
        for i in part.pieces:
            piece = pieces[i]
            if not is_byte_copy(piece):
                computed[-1].append(i)
                continue
            for r, roff, w, woff, n in _segments(piece.reads, piece.writes):
                file, slot = slot_of[w.tensor]
                if file != part.file:  # a piece may also write into other files
                    continue
                lo = slot.start + w.start + woff
                a, b = max(lo, part.start), min(lo + n, part.end)
                if a < b:
                    copies.append(Copy(r.file, r.start + roff + a - lo, b - a, k, a - part.start))
    return copies, computed


def group_parts(sizes: Sequence[int], copies: Iterable[Copy], max_bytes: int) -> list[list[int]]:
    """Parts (by index) grouped so that source bytes which touch are read together: walking the copies in
    source order, the groups of two touching copies are joined while the joined parts hold at most
    `max_bytes`. Groups in the order of their first part, each in part order; every part is in one."""
    parent = list(range(len(sizes)))
    held = list(sizes)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: Copy | None = None
    for c in sorted(copies):
        if prev is not None and prev.file == c.file and prev.start + prev.n >= c.start:
            a, b = root(prev.part), root(c.part)
            if a != b and held[a] + held[b] <= max_bytes:
                a, b = min(a, b), max(a, b)
                parent[b] = a
                held[a] += held[b]
        if prev is None or prev.file != c.file or c.start + c.n > prev.start + prev.n:
            prev = c
    groups: dict[int, list[int]] = {}
    for k in range(len(sizes)):
        groups.setdefault(root(k), []).append(k)
    return sorted(groups.values())


def read_runs(copies: Iterable[Copy], max_bytes: int) -> list[list[Copy]]:
    """`copies` in source order, cut into runs of touching bytes of at most `max_bytes` (a copy may be cut
    anywhere: bytes are only moved): one request each. A copy that overlaps the bytes before it starts a run
    of its own (its bytes are read again)."""
    runs: list[list[Copy]] = []
    held = 0
    for c in sorted(copies):
        while c.n:
            last = runs[-1][-1] if runs else None
            if last is None or last.file != c.file or last.start + last.n != c.start or held >= max_bytes:
                runs.append([])
                held = 0
            take = min(c.n, max_bytes - held)
            runs[-1].append(c._replace(n=take))
            held += take
            c = c._replace(start=c.start + take, n=c.n - take, at=c.at + take)
    return runs


def new_buffers(parts: Sequence[Part], group: Sequence[int], headers: Mapping[str, bytes]) -> dict[int, bytearray]:
    """Part index -> a buffer of its size, holding the part's share of its file's header (`headers`: file -> bytes)."""
    bufs = {k: bytearray(parts[k].end - parts[k].start) for k in group}
    for k in group:
        part, header = parts[k], headers.get(parts[k].file, b"")
        if part.start < len(header):
            chunk = header[part.start : min(part.end, len(header))]
            bufs[k][: len(chunk)] = chunk
    return bufs


def fill_computed(src: Store, parts: Sequence[Part], bufs: Mapping[int, bytearray], todo: Iterable[int],
                  pieces: Mapping[int, Piece] | Sequence[Piece], slot_of: Mapping[str, tuple[str, Any]]) -> None:
    """Compute the plan pieces `todo` (casts, layout changes) from `src`, each once, into every buffer of `bufs`
    (part index -> bytes) that they land in."""
    for i in sorted(set(todo)):
        piece = pieces[i]
        for w, data in zip(piece.writes, piece_outputs(src, piece)):
            file, slot = slot_of[w.tensor]
            lo, hi = slot.start + w.start, slot.start + w.end
            for k, buf in bufs.items():
                part = parts[k]
                a, b = max(lo, part.start), min(hi, part.end)
                if file == part.file and a < b:
                    memoryview(buf)[a - part.start : b - part.start] = memoryview(data)[a - lo : b - lo]


def read_run(src: Store, run: Sequence[Copy], bufs: Mapping[int, bytearray]) -> None:
    """Read the touching source bytes of `run` (read_runs) by one streamed request, each copy straight into its
    part's buffer (`bufs`: part index -> bytes); a local source is read in place."""
    if not src.remote:
        for c in run:
            src.read_into(c.file, c.start, memoryview(bufs[c.part])[c.at : c.at + c.n])
        return
    with src.open_range(run[0].file, run[0].start, run[-1].start + run[-1].n) as stream:
        for c in run:
            stream.readinto(memoryview(bufs[c.part])[c.at : c.at + c.n])
