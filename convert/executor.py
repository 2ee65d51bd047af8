"""Run one rank's pieces: read source byte ranges, copy/cast or regroup, write at final offsets.

Byte copies between local files are done by the kernel (`copy_file_range`), never
entering this process's memory; everything else holds at most `workers` pieces
(one expert each, or a bounded chunk) at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from convert.errors import ConversionError
from convert.memory import pin_mmap_threshold
from convert.planner import Piece, Read, Write
from convert.safetensors_format import DTYPE_SIZES, TensorSlot
from convert.storage import Storage
from convert.transforms import cast_bytes, regroup


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
        src: Storage,
        dst: Storage,
        slots: dict[str, tuple[str, TensorSlot]],
        workers: int = 4,
    ) -> None:
        self.src, self.dst, self.slots, self.workers = src, dst, slots, workers
        pin_mmap_threshold()

    def _dst_pos(self, w: Write) -> tuple[str, int]:
        file, slot = self.slots[w.tensor]
        return file, slot.start + w.start

    def run_piece(self, piece: Piece) -> int:
        """Execute one piece; returns bytes written. A source that fails to read is named with the tensor."""
        try:
            return self._run_piece(piece)
        except ConversionError as exc:
            names = sorted({w.tensor for w in piece.writes})
            raise ConversionError(f"{exc} (while writing tensor {names[0]!r}"
                                  + (f" and {len(names) - 1} more)" if len(names) > 1 else ")")) from exc

    def _run_piece(self, piece: Piece) -> int:
        same_dtype = all(r.dtype == w.dtype for r in piece.reads for w in piece.writes)
        if piece.regroup is None and same_dtype:
            if self.src.is_local and self.dst.is_local:
                for r, roff, w, woff, n in _segments(piece.reads, piece.writes):
                    file, pos = self._dst_pos(w)
                    self.dst.copy_range_from(self.src, r.file, r.start + roff, file, pos + woff, n)
                return piece.write_bytes
        outs = piece_outputs(self.src, piece)
        for w, buf in zip(piece.writes, outs):
            if len(buf) != w.end - w.start:
                raise AssertionError(f"piece for {w.tensor}: produced {len(buf)} bytes, expected {w.end - w.start}")
            file, pos = self._dst_pos(w)
            self.dst.pwrite(file, pos, buf)
        return piece.write_bytes

    def prefetch(self, piece: Piece) -> None:
        """Ask the source to start reading `piece`'s ranges (they are read soon, in whatever order)."""
        for r in piece.reads:
            self.src.prefetch(r.file, r.start, r.end)

    def run(self, pieces: Sequence[Piece], on_done: Callable[[int], None]) -> None:
        """Execute `pieces` with up to `workers` in flight; calls `on_done(bytes)` after each."""
        if self.workers <= 1:
            for i, p in enumerate(pieces):
                if i == 0:
                    self.prefetch(p)
                if i + 1 < len(pieces):
                    self.prefetch(pieces[i + 1])
                on_done(self.run_piece(p))
            return
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            # Bounded submission: at most 2 * workers pieces queued, so memory stays bounded.
            pending = []
            it = iter(pieces)
            for p in it:
                self.prefetch(p)
                pending.append(pool.submit(self.run_piece, p))
                if len(pending) >= 2 * self.workers:
                    on_done(pending.pop(0).result())
            for f in pending:
                on_done(f.result())


def piece_outputs(src: Storage, piece: Piece) -> list[bytes | memoryview]:
    """Read a piece's source bytes and return the bytes of each of its writes, in order."""
    if piece.regroup is not None:
        bufs = [src.read_range(r.file, r.start, r.end) for r in piece.reads]
        g = piece.regroup
        if hasattr(g, "outputs"):  # a compute step that builds its own writes (adapter pieces)
            return list(g.outputs(bufs))
        return list(regroup(g.src, bufs, g.dst, dict(g.role_shape)))
    # A byte copy or an elementwise cast: concatenate the (cast) reads, then slice into the writes.
    dst_dtype = piece.writes[0].dtype
    parts = [cast_bytes(src.read_range(r.file, r.start, r.end), r.dtype, dst_dtype) for r in piece.reads]
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
