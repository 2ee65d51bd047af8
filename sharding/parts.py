"""Cut each output file into multipart-upload parts, and give each part to one rank.

Object stores assemble a file from parts of at least `min_part` bytes (except the
last). Each part is produced whole by one rank: cuts are placed where the owning
rank changes (so an EP slice of a fused tensor stays one rank's part) once a part
is at least `min_part`, and a part never exceeds `max_part`: a part that must end before
then ends where a piece starts, so that it holds whole pieces (whole experts of a fused
tensor: its source bytes are a few long runs, not tails of tensors). A part goes to the rank
that owns most of its bytes; pieces that straddle a cut are run by both owners,
each keeping its own bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

MIN_PART = 5 << 20  # S3's minimum size of every part but the last
MAX_PART = 64 << 20
# Sizing parts to the job (choose_max_part); measured with bench.s3, see bench/results/S3.md.
PART_FLOOR = 16 << 20  # 8 MiB parts moved 10-15% fewer bytes per connection than 16-64 MiB ones
PARTS_PER_THREAD = 4  # so the last round of uploads leaves few connections idle
# Part bytes one rank holds at once: 3 parts per upload thread (convert.engine.sinks.HELD_PARTS); 384 MiB gave
# 622-642 MB peak RSS per rank at 16 threads (bench.s3, S3 -> S3), this keeps it under 600 MB.
PART_MEMORY = 320 << 20


# Read-only members (properties), so that frozen dataclasses (convert.plan.base.Piece, Write) match too.
class WriteLike(Protocol):
    @property
    def tensor(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


class PieceLike(Protocol):
    @property
    def writes(self) -> Sequence[WriteLike]: ...


class SlotLike(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


class FileLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def header(self) -> bytes: ...
    @property
    def size(self) -> int: ...
    @property
    def slots(self) -> Mapping[str, SlotLike]: ...


def choose_max_part(
    total_bytes: int,
    ranks: int,
    threads: int,
    cap: int = MAX_PART,
    floor: int = PART_FLOOR,
    per_thread: int = PARTS_PER_THREAD,
    memory: int = PART_MEMORY,
) -> int:
    """The largest part size for a job of `total_bytes` uploaded by `ranks` x `threads` connections.

    As large as `cap`, but small enough that every thread gets `per_thread` parts (down to
    `floor`) and that one rank's threads hold at most `memory` bytes (down to S3's MIN_PART).
    """
    by_count = max(floor, total_bytes // max(1, ranks * threads * per_thread))
    by_memory = memory // max(1, 3 * threads)
    return max(MIN_PART, min(cap, by_count, by_memory))


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of output file `file`, uploaded as part `number` by rank `owner`."""

    file: str
    number: int
    start: int
    end: int
    owner: int
    pieces: tuple[int, ...]  # indices of the plan pieces that write into this part


def plan_parts(
    files: Sequence[FileLike],
    pieces: Sequence[PieceLike],
    assignment: Sequence[Sequence[int]],
    min_part: int = MIN_PART,
    max_part: int = MAX_PART,
) -> list[Part]:
    """Every part of every file, in file order then part order."""
    owner_of_piece = {i: r for r, idx in enumerate(assignment) for i in idx}
    where = {name: f for f in files for name in f.slots}
    # (file, absolute start, end, rank, piece) of every write
    runs: dict[str, list[tuple[int, int, int, int]]] = {f.name: [] for f in files}
    for i, p in enumerate(pieces):
        for w in p.writes:
            f = where[w.tensor]
            base = f.slots[w.tensor].start
            runs[f.name].append((base + w.start, base + w.end, owner_of_piece[i], i))
    parts: list[Part] = []
    for f in files:
        spans = sorted(runs[f.name])
        spans.insert(0, (0, len(f.header), 0, -1))  # the header: rank 0
        cuts = _cuts(spans, f.size, min_part, max_part)
        for n, (start, end) in enumerate(zip(cuts, cuts[1:]), start=1):
            inside = [s for s in spans if s[0] < end and s[1] > start]
            weight: dict[int, int] = {}
            for s in inside:
                weight[s[2]] = weight.get(s[2], 0) + min(end, s[1]) - max(start, s[0])
            owner = min(weight, key=lambda r: (-weight[r], r)) if weight else 0
            parts.append(Part(f.name, n, start, end, owner, tuple(sorted({s[3] for s in inside if s[3] >= 0}))))
    return parts


def _cuts(spans: list[tuple[int, int, int, int]], size: int, min_part: int, max_part: int) -> list[int]:
    """Part boundaries: at rank changes once a part has min_part bytes; never more than max_part apart, and where
    a part must end, at the last piece's start that leaves it min_part bytes (within a piece only where none does)."""
    cuts = [0]
    prev_rank = spans[0][2]
    edge = 0  # the last piece start at least min_part past the last cut: where a part may end
    for start, _, rank, _ in spans[1:]:
        while start - cuts[-1] > max_part:
            cuts.append(edge if edge > cuts[-1] else cuts[-1] + max_part)
        if start - cuts[-1] >= min_part and size - start >= min_part:
            if rank != prev_rank:
                cuts.append(start)
            else:
                edge = start
        prev_rank = rank
    while size - cuts[-1] > max_part:
        cuts.append(edge if edge > cuts[-1] else cuts[-1] + max_part)
    cuts.append(size)
    return cuts
