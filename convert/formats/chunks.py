"""Tensors stored in several chunks (trainer checkpoints: FSDP / TP / EP shards), as byte ranges.

A trainer saves each rank's slice of a tensor as one chunk: a box of the tensor (its `offsets` and `sizes`
along every dim) whose elements are stored row-major, back to back, from byte `start` of a file. The planner
sees such a tensor as one contiguous tensor in a virtual file (`virtual_file(name)`); `ChunkedTensor.ranges`
turns any byte range of it into the ranges of the stored files that hold those bytes, in order. A box that
spans the whole tensor along every dim after its first partial one gives one range per box row above that dim
(one range per chunk for dim-0 shards, the usual FSDP / EP case).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from convert.errors import ConversionError
from convert.io.storage import fetch

VIRTUAL_PREFIX = "<chunks>/"


def virtual_file(tensor: str) -> str:
    """The name under which the planner reads the chunked tensor `tensor` as one contiguous file."""
    return VIRTUAL_PREFIX + tensor


def is_virtual(rel: str) -> bool:
    """Whether `rel` names a chunked tensor (virtual_file) rather than a stored file."""
    return rel.startswith(VIRTUAL_PREFIX)


@dataclass(frozen=True)
class Chunk:
    """One stored box of a tensor: elements [offsets, offsets + sizes) row-major from byte `start` of `file`.

    `raw` is False where the bytes are not one plain range (a torch.save record that is not a contiguous
    little-endian copy of the box): such a chunk is read whole through `load` (convert.formats.dcp) instead.
    """

    file: str
    start: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    raw: bool = True
    record: tuple[int, int] | None = None  # (start, length) of the whole stored record, for chunks read whole

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class Run:
    """Elements [at, at + n) of the tensor are elements [pos, pos + n) of `chunk`'s box, in row-major order."""

    at: int
    n: int
    chunk: int
    pos: int


@dataclass(frozen=True)
class ChunkedTensor:
    """A tensor of `shape` and safetensors `dtype` stored as `chunks`; `itemsize` bytes per element."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    chunks: tuple[Chunk, ...]

    @cached_property
    def runs(self) -> list[Run]:
        """The contiguous runs of every chunk, in tensor order (checked by `check_tiling`)."""
        out: list[Run] = []
        for k, c in enumerate(self.chunks):
            out += chunk_runs(self.shape, c, k)
        out.sort(key=lambda r: r.at)
        return out

    def check_tiling(self, where: Callable[[Chunk], str]) -> None:
        """Raise ConversionError (naming the chunk's file via `where` and this tensor) unless the chunks lie
        inside the tensor and cover every element exactly once."""
        for c in self.chunks:
            if len(c.offsets) != len(self.shape) or len(c.sizes) != len(self.shape) or any(
                    o < 0 or s < 0 or o + s > d for o, s, d in zip(c.offsets, c.sizes, self.shape)):
                raise ConversionError(
                    f"{where(c)}: chunk of tensor {self.name!r} at offsets {list(c.offsets)} sizes {list(c.sizes)} "
                    f"lies outside its shape {list(self.shape)}")
        pos = 0
        for r in self.runs:
            if r.at != pos:
                c = self.chunks[r.chunk]
                what = "overlaps another chunk" if r.at < pos else f"leaves elements {pos}..{r.at - 1} unsaved"
                raise ConversionError(
                    f"{where(c)}: chunk of tensor {self.name!r} at offsets {list(c.offsets)} sizes {list(c.sizes)} "
                    f"{what} (expected chunks that cover the tensor {list(self.shape)} exactly once)")
            pos += r.n
        if pos != math.prod(self.shape):
            raise ConversionError(
                f"{where(self.chunks[-1]) if self.chunks else self.name}: tensor {self.name!r} {list(self.shape)} has "
                f"{pos} of its {math.prod(self.shape)} elements saved (a chunk is missing)")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(chunk index, byte offset in the chunk's box, length) of each stored range holding bytes [start, end)
        of the tensor, in order. `start` and `end` are multiples of the itemsize."""
        k = self.itemsize
        if start % k or end % k:
            raise ValueError(f"byte range [{start}, {end}) of {self.name!r} is not on element boundaries")
        lo, hi = start // k, end // k
        runs = self.runs
        i = max(0, bisect.bisect_right(runs, lo, key=lambda r: r.at) - 1)
        out = []
        while i < len(runs) and runs[i].at < hi:
            r = runs[i]
            a, b = max(lo, r.at), min(hi, r.at + r.n)
            if a < b:
                out.append((r.chunk, (r.pos + a - r.at) * k, (b - a) * k))
            i += 1
        return out

    def file_ranges(self, start: int, end: int) -> list[tuple[str, int, int]] | None:
        """(file, start, end) of the stored bytes [start, end) of the tensor, merged where adjacent; None when a
        chunk they touch is not raw (read it whole instead)."""
        out: list[tuple[str, int, int]] = []
        for k, off, n in self.ranges(start, end):
            c = self.chunks[k]
            if not c.raw:
                return None
            if out and out[-1][0] == c.file and out[-1][2] == c.start + off:
                out[-1] = (c.file, out[-1][1], c.start + off + n)
            else:
                out.append((c.file, c.start + off, c.start + off + n))
        return out


def chunk_runs(shape: tuple[int, ...], chunk: Chunk, index: int) -> list[Run]:
    """The runs of `chunk` (the `index`th of its tensor): one per box row above its first dim that is split,
    so that each run is contiguous both in the tensor and in the chunk."""
    nd = len(shape)
    if nd == 0:
        return [Run(0, 1, index, 0)]
    if chunk.numel == 0:
        return []
    j = nd - 1  # the first dim from which on the box spans the tensor along every later dim
    while j > 0 and chunk.sizes[j] == shape[j]:
        j -= 1
    inner = math.prod(shape[j + 1:])
    n = chunk.sizes[j] * inner
    strides = [math.prod(shape[i + 1:]) for i in range(nd)]
    out = []
    for p, outer in enumerate(_box_rows(chunk.sizes[:j])):
        at = sum((chunk.offsets[i] + outer[i]) * strides[i] for i in range(j)) + chunk.offsets[j] * inner
        out.append(Run(at, n, index, p * n))
    return out


def _box_rows(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every index of a box of `sizes`, in row-major order ([()] for no dims)."""
    rows: list[tuple[int, ...]] = [()]
    for s in sizes:
        rows = [r + (i,) for r in rows for i in range(s)]
    return rows


class ChunkedView:
    """A source store that also reads chunked tensors' virtual files (virtual_file) as contiguous bytes.

    Reads of stored files go to the storage; a virtual read is split into the stored ranges that hold it,
    or, for a chunk that is not raw, served from the chunk read whole by `load(chunk) -> bytes`. Every other
    attribute is the storage's own.
    """

    def __init__(self, storage: Any, tensors: dict[str, ChunkedTensor],
                 load: Callable[[Any, Chunk, ChunkedTensor], bytes] | None = None) -> None:
        self.storage = storage
        self.tensors = tensors  # virtual file name -> tensor
        self._load = load
        self._loaded: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it; a virtual file is named by its tensor."""
        if is_virtual(rel):
            return f"{self.storage.display()} (tensor {rel[len(VIRTUAL_PREFIX):]!r})"
        return str(self.storage.display(rel))

    def _chunk_bytes(self, t: ChunkedTensor, k: int) -> bytes:
        """The elements of chunk k of `t` read whole (the last two such chunks are kept: a piece's neighbours
        usually read the same one)."""
        key = (t.name, k)
        with self._lock:
            held = self._loaded.get(key)
        if held is not None:
            return held
        if self._load is None:
            raise ConversionError(f"{self.display(t.chunks[k].file)}: tensor {t.name!r}: chunk is not one byte range")
        data = self._load(self.storage, t.chunks[k], t)
        with self._lock:
            while len(self._loaded) >= 2:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[key] = data
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the stored or virtual file `rel`."""
        if not is_virtual(rel):
            return bytes(self.storage.read_range(rel, start, end))
        t = self.tensors[rel]
        parts = []
        for k, off, n in t.ranges(start, end):
            c = t.chunks[k]
            if c.raw:
                parts.append(self.storage.read_range(c.file, c.start + off, c.start + off + n))
            else:
                parts.append(self._chunk_bytes(t, k)[off : off + n])
        return b"".join(parts)

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on."""
        if not is_virtual(rel):
            self.storage.read_into(rel, start, out)
            return
        t, pos = self.tensors[rel], 0
        for k, off, n in t.ranges(start, start + out.nbytes):
            c = t.chunks[k]
            if c.raw:
                self.storage.read_into(c.file, c.start + off, out[pos : pos + n])
            else:
                out[pos : pos + n] = self._chunk_bytes(t, k)[off : off + n]
            pos += n

    def fetch(self, ranges: Sequence[tuple[str, int, int]], max_get: int | None = None) -> Any:
        """convert.io.storage.fetch for stored files (by the storage); virtual ranges are read now through
        read_range."""
        stored = [r for r in ranges if not is_virtual(r[0])]
        out = fetch(self.storage, stored, max_get)
        out.storage = self  # a read no fetched range covers comes back here (virtual files included)
        for rel, start, end in ranges:
            if is_virtual(rel):
                out.add(rel, start, self.read_range(rel, start, end))
        return out

    def open_range(self, rel: str, start: int, end: int) -> Any:
        """Store.open_range; a virtual file's range is read a readinto at a time through read_range."""
        if not is_virtual(rel):
            return self.storage.open_range(rel, start, end)
        from convert.io.range_stream import RangeReader

        return RangeReader(self, rel, start, end)

    def prefetch(self, rel: str, start: int, end: int) -> None:
        """Store.prefetch of the stored ranges that hold [start, end) of `rel`."""
        if not is_virtual(rel):
            self.storage.prefetch(rel, start, end)
            return
        for file, a, b in self.tensors[rel].file_ranges(start, end) or []:
            self.storage.prefetch(file, a, b)

    def stored_files(self, names: Sequence[str]) -> list[str]:
        """`names` with each virtual file replaced by the stored files its chunks lie in (sorted, once each)."""
        out = {n for n in names if not is_virtual(n)}
        for n in names:
            if is_virtual(n):
                out |= {c.file for c in self.tensors[n].chunks}
        return sorted(out)
