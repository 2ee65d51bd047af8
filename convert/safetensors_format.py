"""The safetensors file format: header reading (ranged reads only) and header building.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`),
then the tensor data. Offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from convert.errors import ConversionError
from convert.storage import Storage

# dtype name -> bytes per element (as the safetensors spec names them)
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

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

    Raises ConversionError naming the file (and tensor) on any inconsistency: bad JSON,
    unknown dtype, offsets that disagree with the shape, overlap, or data outside the file.
    """
    where = where or path
    data_start = 8 + len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{where}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ConversionError(f"{where}: safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConversionError(f"{where}: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    data_len = file_size - data_start
    for name, spec in obj.items():
        try:
            dtype = spec["dtype"]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{where}: tensor {name!r} has a malformed header entry: {spec!r}") from exc
        if dtype not in DTYPE_SIZES:
            raise ConversionError(
                f"{where}: tensor {name!r} has unknown dtype {dtype!r} (expected one of {sorted(DTYPE_SIZES)})"
            )
        if any(d < 0 for d in shape):
            raise ConversionError(f"{where}: tensor {name!r} has a negative dimension in shape {list(shape)}")
        expected = numel(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected or begin < 0:
            raise ConversionError(
                f"{where}: tensor {name!r} data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                f"but {dtype} {list(shape)} needs {expected}"
            )
        if end > data_len:
            raise ConversionError(
                f"{where}: tensor {name!r} ends at byte {data_start + end} but the file has only {file_size} bytes "
                "(truncated file?)"
            )
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.start < prev.end and cur.nbytes and prev.nbytes:
            raise ConversionError(f"{where}: tensors {prev.name!r} and {cur.name!r} overlap in the file")
    return FileHeader(path, file_size, data_start, tensors, {str(k): str(v) for k, v in metadata.items()})


def read_header(storage: Storage, path: str) -> FileHeader:
    """Read and validate the header of the safetensors file `path` with two ranged reads."""
    where = storage.display(path)
    size = storage.size(path)
    if size < 8:
        raise ConversionError(f"{where}: {size} bytes is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", storage.read_range(path, 0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise ConversionError(
            f"{where}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)"
        )
    if 8 + header_len > size:
        raise ConversionError(
            f"{where}: header length {header_len} runs past the end of the {size}-byte file (truncated file?)"
        )
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
