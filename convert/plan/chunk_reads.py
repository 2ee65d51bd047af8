"""Plans over chunked tensors (convert.formats.chunks) turned into reads of the stored files.

The planner reads a tensor saved in chunks as one contiguous virtual file. Once a plan is made, each read of
a copy or cast piece is replaced by the stored ranges that hold its bytes (the elementwise pieces concatenate
their reads), so that every fast path (kernel copies, streamed S3 reads, parts filled from runs) sees only
stored files. A regroup piece takes one read per unit: its read is replaced where one stored range holds it
(an expert inside one EP or FSDP shard), else left virtual for Checkpoint.storage (a ChunkedView) to gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from convert.formats.chunks import ChunkedTensor, is_virtual
from convert.plan.base import Piece, Read


def stored_reads(read: Read, tensor: ChunkedTensor) -> list[Read] | None:
    """The reads of stored files that hold the bytes of `read` (of `tensor`'s virtual file), in order; None
    where a chunk it touches is read whole (not raw)."""
    ranges = tensor.file_ranges(read.start, read.end)
    return None if ranges is None else [Read(f, a, b, read.dtype) for f, a, b in ranges]


def localize(pieces: Sequence[Piece], chunked: dict[str, ChunkedTensor]) -> tuple[list[Piece], dict[str, ChunkedTensor]]:
    """`pieces` with their reads of `chunked` virtual files replaced by reads of stored files where possible.

    Returns the new pieces and the chunked tensors (virtual file -> tensor) that some piece still reads
    virtually (the ranks that run those pieces need them: ChunkedView)."""
    if not chunked:
        return list(pieces), {}
    out: list[Piece] = []
    still: dict[str, ChunkedTensor] = {}
    for p in pieces:
        if not any(is_virtual(r.file) for r in p.reads):
            out.append(p)
            continue
        reads: list[Read] = []
        for r in p.reads:
            if not is_virtual(r.file):
                reads.append(r)
                continue
            stored = stored_reads(r, chunked[r.file])
            if stored is not None and (p.regroup is None or len(stored) == 1):
                reads += stored
            else:
                reads.append(r)
                still[r.file] = chunked[r.file]
        out.append(replace(p, reads=tuple(reads)))
    return out, still
