"""The safetensors file format: header reading (ranged reads only) and header building.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`),
then the tensor data, packed back to back (offsets are relative to the end of the header)
with nothing after the last tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from convert.errors import ConversionError
from convert.formats.safetensors_json import U64_MAX, header_entries
from convert.io.storage import Store

# dtype name -> bytes per element (as the safetensors spec names them)
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# The dtypes the safetensors format allows, with their size in bits (the library's `Dtype::bitsize`);
# the ones missing from DTYPE_SIZES are valid files this tool refuses to convert.
FORMAT_DTYPE_BITS: dict[str, int] = {
    **{name: 8 * size for name, size in DTYPE_SIZES.items()},
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "C64": 64,
}

# Same limit the safetensors library enforces: a larger header is refused before it is read.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; `start`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass
class FileHeader:
    """The parsed header of one safetensors file."""

    path: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def numel(shape: tuple[int, ...] | list[int]) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    return math.prod(shape)


def parse_header(path: str, raw: bytes, file_size: int, where: str | None = None) -> FileHeader:
    """Validate and parse the JSON header `raw` of the file `path` of `file_size` bytes.

    `where` names the file in messages (default `path`), e.g. with its directory or URL.
    Accepts exactly the headers the safetensors library (0.8) accepts (see
    `convert.formats.safetensors_json`), then refuses dtypes this tool cannot convert. Returns the
    FileHeader; raises ConversionError naming the file (and tensor) on any problem.
    """
    where = where or path
    data_start = 8 + len(raw)
    entries, metadata = header_entries(raw, where, FORMAT_DTYPE_BITS)
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        expected = checked_nbytes(dtype, shape, name, where)
        if end < begin or end - begin != expected:
            raise ConversionError(
                f"{where}: tensor {name!r} data_offsets [{begin}, {end}] hold {max(end - begin, 0)} bytes, "
                f"but {dtype} {list(shape)} needs {expected}"
            )
        if end > data_len:
            raise ConversionError(
                f"{where}: tensor {name!r} ends at byte {data_start + end} but the file has only {file_size} bytes "
                "(truncated file?)"
            )
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    check_packing(list(tensors.values()), data_start, file_size, where)
    for t in tensors.values():
        if t.dtype not in DTYPE_SIZES:
            raise ConversionError(
                f"{where}: tensor {t.name!r} has dtype {t.dtype}, valid in safetensors but not converted by this tool "
                f"(supported: {sorted(DTYPE_SIZES)})"
            )
    return FileHeader(path, file_size, data_start, tensors, metadata)


def checked_nbytes(dtype: str, shape: tuple[int, ...], name: str, where: str) -> int:
    """Bytes of a `dtype` tensor of `shape`, refused where the library refuses it (u64 overflow, partial bytes)."""
    n = 1
    for d in shape:  # the library multiplies left to right in u64 and refuses any overflow on the way
        n *= d
        if n > U64_MAX:
            raise ConversionError(f"{where}: tensor {name!r} shape {list(shape)} has more than 2**64 elements")
    bits = n * FORMAT_DTYPE_BITS[dtype]
    if bits > U64_MAX:
        raise ConversionError(f"{where}: tensor {name!r} {dtype} {list(shape)} has more than 2**64 bits")
    if bits % 8:
        raise ConversionError(f"{where}: tensor {name!r} {dtype} {list(shape)} does not fill a whole number of bytes")
    return bits // 8


def check_packing(tensors: list[TensorInfo], data_start: int, file_size: int, where: str) -> None:
    """Refuse tensors that overlap, leave gaps, or do not end exactly at the end of the file.

    The safetensors format packs tensor data back to back from the end of the header, in
    data_offsets order, and the last tensor ends the file.
    """
    ordered = sorted(tensors, key=lambda t: (t.start, t.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.start < prev.end:
            raise ConversionError(
                f"{where}: tensors {prev.name!r} and {cur.name!r} overlap in the file (data_offsets "
                f"[{prev.start - data_start}, {prev.end - data_start}] and [{cur.start - data_start}, "
                f"{cur.end - data_start}])"
            )
    pos = data_start
    for t in ordered:
        if t.start != pos:
            after = "the header" if pos == data_start else "the previous tensor's data"
            raise ConversionError(
                f"{where}: tensor {t.name!r} starts at data offset {t.start - data_start}, leaving "
                f"{t.start - pos} unused bytes after {after} (the safetensors format packs tensors back to back "
                "from offset 0)"
            )
        pos = t.end
    if pos != file_size:
        last = f"the last tensor {ordered[-1].name!r}" if ordered else "the header (no tensors)"
        raise ConversionError(
            f"{where}: {file_size - pos} bytes follow {last} at the end of the {file_size}-byte file "
            "(the safetensors format ends the file with the last tensor's data)"
        )


HEADER_PREFIX = 512 << 10  # from an object store, one read of this much holds nearly every shard's whole header


def read_header(storage: Store, path: str) -> FileHeader:
    """Read and validate the header of the safetensors file `path`: its length, then the header, in two
    ranged reads; from an object store, one read of the file's first HEADER_PREFIX bytes (a request's
    latency costs more than the extra bytes) and a second only for a longer header."""
    where = storage.display(path)
    size = storage.size(path)
    if size < 8:
        raise ConversionError(f"{where}: {size} bytes is too short to be a safetensors file")
    first = storage.read_range(path, 0, 8 if not storage.remote else min(size, HEADER_PREFIX))
    (header_len,) = struct.unpack("<Q", bytes(first[:8]))
    if header_len > MAX_HEADER_BYTES:
        raise ConversionError(
            f"{where}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)"
        )
    if 8 + header_len > size:
        raise ConversionError(
            f"{where}: header length {header_len} runs past the end of the {size}-byte file (truncated file?)"
        )
    if len(first) >= 8 + header_len:
        raw = bytes(first[8 : 8 + header_len])
    else:
        raw = storage.read_range(path, 8, 8 + header_len)
    return parse_header(path, raw, size, where)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a file being written: dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, TensorSlot], int]:
    """Lay out tensors `(name, dtype, shape)` in the given order in one safetensors file.

    Returns (the header bytes including the 8-byte length prefix, padded to 8 bytes;
    each tensor's absolute slot in the file; the total file size).
    """
    body: dict[str, Any] = {}
    if metadata:
        body["__metadata__"] = dict(metadata)
    offset = 0
    rel: dict[str, tuple[int, int]] = {}
    for name, dtype, shape in entries:
        n = numel(shape) * DTYPE_SIZES[dtype]
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        rel[name] = (offset, offset + n)
        offset += n
    raw = json.dumps(body, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    header = struct.pack("<Q", len(raw)) + raw
    base = len(header)
    slots = {
        name: TensorSlot(name, dtype, tuple(shape), base + rel[name][0], base + rel[name][1])
        for name, dtype, shape in entries
    }
    return header, slots, base + offset
