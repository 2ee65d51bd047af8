"""The verifier's own view of a checkpoint directory: every tensor, where it is stored, and what is wrong with the files.

Deliberately independent of the converter's reader (convert.formats.checkpoint / convert.formats.safetensors):
headers are parsed here from the raw bytes, and local shards are cross-checked with the
`safetensors` library itself, so a bug in the converter's header code cannot hide itself.
Only metadata is read here (8 bytes + the header of each shard).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from convert.errors import ConversionError
from convert.io.storage import Store, read_json

if TYPE_CHECKING:
    import torch

# The safetensors library refuses headers above 100 MB; so does the verifier, before reading one.
HEADER_LIMIT = 100_000_000

# safetensors dtype name -> (torch dtype's name, bytes per element); kept separate from the converter's table on
# purpose. Names, not torch dtypes: comparing bytes takes no torch (torch_dtype imports it where a value is computed).
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}
# numpy integers of each item size: a tensor's elements as bits (numpy has no bfloat16 or float8; bits need none).
BITS: dict[int, np.dtype[Any]] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_SIGNED: dict[int, np.dtype[Any]] = {1: np.dtype("i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}  # what torch.from_numpy takes
LEFTOVER = re.compile(r"(\.incomplete|\.tmp)$")


class Unreadable(Exception):
    """A file the verifier cannot interpret at all (message names the file)."""


@dataclass(frozen=True)
class Stored:
    """One tensor as stored: its file (relative to the directory root), dtype, shape and absolute byte range."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Table:
    """Every tensor of a checkpoint directory (as a loader would see it) and its top-level files."""

    where: str
    tensors: dict[str, Stored]
    files: list[str]
    dirs: list[str]
    shards: list[str]
    index_name: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def _without_lock(listed: tuple[list[str], list[str]]) -> tuple[list[str], list[str]]:
    """A listing of .moe-convert/ less the lock of a job running there (convert.engine.dest_lock)."""
    files, dirs = listed
    return [f for f in files if f != "lock.json"], dirs


def element_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return DTYPES[dtype][1]


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of safetensors `dtype` (imports torch)."""
    import torch

    return getattr(torch, DTYPES[dtype][0])


def to_tensor(buf: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """`buf` (exactly the bytes of `shape`) as a tensor of safetensors `dtype` (imports torch)."""
    import torch

    if not buf:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer: the verifier never writes through it
        return torch.frombuffer(buf, dtype=torch_dtype(dtype)).reshape(shape)


@dataclass(frozen=True)
class Raw:
    """A tensor's elements as their bits, without torch: `bits` is a numpy array of unsigned integers of the
    item size of safetensors `dtype` (any shape and strides, e.g. a transposed view); what two tensors of one
    dtype must agree on when bytes were moved."""

    bits: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    def tensor(self) -> torch.Tensor:
        """The same elements as a torch tensor of `dtype`, sharing the memory (imports torch)."""
        import torch

        signed = self.bits.view(_SIGNED[self.bits.itemsize])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer: the verifier never writes through it
            return torch.from_numpy(signed).view(torch_dtype(self.dtype))


def to_raw(buf: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> Raw:
    """`buf` (exactly the bytes of `shape`) as the bits of a tensor of safetensors `dtype` (no copy)."""
    return Raw(np.frombuffer(buf, dtype=BITS[element_size(dtype)]).reshape(shape), dtype)


def read_header(storage: Store, name: str) -> dict[str, Stored]:
    """Parse the header of the safetensors file `name`; raises Unreadable naming the file (and tensor)."""
    where = storage.display(name)
    size = storage.size(name)
    if size < 8:
        raise Unreadable(f"{where}: {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", storage.read_range(name, 0, 8))
    if n > HEADER_LIMIT or 8 + n > size:
        raise Unreadable(f"{where}: header length {n} does not fit (file has {size} bytes, limit {HEADER_LIMIT})")
    try:
        obj = json.loads(storage.read_range(name, 8, 8 + n))
    except ValueError as exc:
        raise Unreadable(f"{where}: header is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise Unreadable(f"{where}: header is not a JSON object")
    obj.pop("__metadata__", None)
    base, out = 8 + n, {}
    for tname, spec in obj.items():
        try:
            dtype, shape = spec["dtype"], tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Unreadable(f"{where}: tensor {tname!r}: malformed header entry") from exc
        if dtype not in DTYPES:
            raise Unreadable(f"{where}: tensor {tname!r}: unknown dtype {dtype!r}")
        want = math.prod(shape) * element_size(dtype)
        if begin < 0 or end - begin != want or base + end > size:
            raise Unreadable(
                f"{where}: tensor {tname!r}: data_offsets [{begin}, {end}] do not hold {dtype} {list(shape)} "
                f"({want} bytes) inside the {size}-byte file"
            )
        out[tname] = Stored(tname, name, dtype, shape, base + begin, base + end)
    spans = sorted((t.start, t.end, t.name) for t in out.values() if t.nbytes)
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise Unreadable(f"{where}: tensors {a!r} and {b!r} overlap")
    return out


def library_problems(storage: Store, name: str, parsed: dict[str, Stored]) -> list[str]:
    """Open a local shard with the safetensors library and compare its view with ours (empty list: they agree)."""
    files = storage.positional  # a store of local files: the library opens the path
    if files is None:
        return []
    from safetensors import safe_open

    where = storage.display(name)
    try:
        with safe_open(files.path(name), framework="numpy") as f:  # metadata only; "pt" would import torch
            keys = set(f.keys())
            got = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys}
    except Exception as exc:  # noqa: BLE001 - whatever the library objects to is the finding
        return [f"{where}: the safetensors library cannot open it: {exc}"]
    ours = {k: (t.dtype, t.shape) for k, t in parsed.items()}
    if got != ours:
        diff = sorted(set(got.items()) ^ set(ours.items()))
        return [f"{where}: the safetensors library reads a different header (first difference: {diff[0]})"]
    return []


def safe_name(name: Any) -> bool:
    """True for a relative shard name that stays inside its directory."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or ":" in name:
        return False
    return ".." not in posixpath.normpath(name).split("/")


def read_table(
    storage: Store, index_name: str, require_index: bool, single_name: str | None = None,
    strict: bool | None = None,
) -> tuple[Table, list[str]]:
    """Read every shard header of the directory `storage` and check the files against the index.

    With an index, its weight_map decides which shards and tensors count (as loaders do); without
    one, `single_name` (if present) or every top-level `*.safetensors` does. `strict` (default:
    `require_index`) holds a conversion's output to its promises: every tensor indexed, right
    total_size, no stray shard, nothing left over from an unfinished run. Returns the table and
    the problems found (also missing/unsafe shards, tensors listed twice, shards the safetensors
    library reads differently). Raises Unreadable when the directory itself is missing.
    """
    strict = require_index if strict is None else strict
    where = storage.display()
    if not storage.isdir():
        raise Unreadable(f"{where}: not a directory")
    files, dirs = storage.list_dir()
    index, problems = _read_index(storage, index_name, files, require_index)
    weight_map: dict[str, str] | None = index["weight_map"] if index is not None else None
    if weight_map is not None:
        shards, found_shards = _indexed_shards(storage, index_name, weight_map)
        problems += found_shards
    elif single_name is not None and single_name in files:
        shards = [single_name]
    else:
        shards = [f for f in files if f.endswith(".safetensors")]
    found, unreadable, found_headers = _read_shards(storage, shards)
    problems += found_headers
    tensors, found_tensors = _pick_tensors(storage, index_name, found, weight_map, strict)
    problems += found_tensors
    if weight_map is not None:
        problems += _unstored(storage, weight_map, found, shards, unreadable)
        total = (index or {}).get("metadata", {}).get("total_size") if isinstance(index, dict) else None
        actual = sum(t.nbytes for t in tensors.values())
        if total != actual and strict:
            problems.append(f"{storage.display(index_name)}: metadata.total_size is {total}, the tensors hold {actual} bytes")
    if strict:
        problems += _stray_files(storage, files, dirs, shards, weight_map is not None, single_name)
    table = Table(where, tensors, files, dirs, shards, index_name if index is not None else None,
                  (index or {}).get("metadata", {}) if isinstance(index, dict) else {})
    return table, problems


def _read_index(storage: Store, index_name: str, files: list[str],
                require_index: bool) -> tuple[dict[str, Any] | None, list[str]]:
    """(the index `index_name` among `files` when it is a JSON object with a weight_map object, else None;
    the problems found: unreadable, no weight_map, or missing where `require_index`)."""
    problems: list[str] = []
    index: dict[str, Any] | None = None
    if index_name in files:
        try:
            index = read_json(storage, index_name)  # size-bounded, UTF-8
        except ConversionError as exc:
            problems.append(str(exc))
        if index is not None and not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
            problems.append(f"{storage.display(index_name)}: has no weight_map object")
            index = None
    elif require_index:
        problems.append(f"{storage.display(index_name)}: missing (an output without its index is incomplete)")
    return index, problems


def _indexed_shards(storage: Store, index_name: str, weight_map: dict[str, str]) -> tuple[list[str], list[str]]:
    """(the shards `weight_map` names that are safe and exist, normalised; the problems with the others)."""
    shards: list[str] = []
    problems: list[str] = []
    for fname in sorted(set(weight_map.values()), key=str):
        if not safe_name(fname):
            problems.append(f"{storage.display(index_name)}: shard path {fname!r} is absolute or leaves the directory")
        elif not storage.exists(fname):
            problems.append(f"{storage.display(index_name)}: names shard {fname!r}, which does not exist")
        else:
            shards.append(posixpath.normpath(fname))
    return shards, problems


def _read_shards(storage: Store, shards: list[str]) -> tuple[dict[str, list[Stored]], set[str], list[str]]:
    """(tensor name -> every shard's entry for it; the shards whose header is unreadable; the problems found,
    the safetensors library's disagreements included)."""
    found: dict[str, list[Stored]] = {}
    unreadable: set[str] = set()
    problems: list[str] = []
    for shard in shards:
        try:
            parsed = read_header(storage, shard)
        except Unreadable as exc:
            problems.append(str(exc))
            unreadable.add(shard)
            continue
        problems += library_problems(storage, shard, parsed)
        for t in parsed.values():
            found.setdefault(t.name, []).append(t)
    return found, unreadable, problems


def _pick_tensors(storage: Store, index_name: str, found: dict[str, list[Stored]],
                  weight_map: dict[str, str] | None, strict: bool) -> tuple[dict[str, Stored], list[str]]:
    """(tensor name -> the entry a loader reads: the shard `weight_map` maps it to, else the first; the problems:
    tensors stored twice, unindexed (where `strict`) or not where the index says)."""
    tensors: dict[str, Stored] = {}
    problems: list[str] = []
    for tname, where_all in sorted(found.items()):
        if len(where_all) > 1:
            problems.append(f"{storage.display()}: tensor {tname!r} is stored twice, in "
                            f"{sorted(t.file for t in where_all)}")
        if weight_map is None:
            tensors[tname] = where_all[0]
            continue
        indexed = weight_map.get(tname)
        if indexed is None:
            if strict:  # a source may hold unindexed tensors: loaders (and the converter) ignore them
                problems.append(f"{storage.display(where_all[0].file)}: tensor {tname!r} is not in the index")
            continue
        match = [t for t in where_all if t.file == posixpath.normpath(str(indexed))]
        if not match:
            problems.append(
                f"{storage.display(index_name)}: maps {tname!r} to {indexed}, but it is in {where_all[0].file}"
            )
            continue
        tensors[tname] = match[0]
    return tensors, problems


def _unstored(storage: Store, weight_map: dict[str, str], found: dict[str, list[Stored]], shards: list[str],
              unreadable: set[str]) -> list[str]:
    """The problems of tensors `weight_map` maps to a readable shard of `shards` that does not hold them."""
    problems: list[str] = []
    for tname, fname in sorted(weight_map.items()):
        norm = posixpath.normpath(fname) if safe_name(fname) else None
        if tname not in found and norm in shards and norm not in unreadable:
            problems.append(f"{storage.display(str(fname))}: tensor {tname!r} is in the index but not in the file")
    return problems


def _stray_files(storage: Store, files: list[str], dirs: list[str], shards: list[str], indexed: bool,
                 single_name: str | None) -> list[str]:
    """The problems of a strict read: a weights file outside `shards` (the first), and every file or directory
    left over from an unfinished conversion."""
    problems: list[str] = []
    strays = sorted(f for f in files if f.endswith(".safetensors") and f not in shards)
    if strays:
        problems.append(f"{storage.display(strays[0])}: a weights file "
                        + ("the index does not name" if indexed else f"beside {single_name}"))
    for f in files + dirs:
        # .moe-convert/ of a finished job holds only its output record (output.json), and a job's lock
        # (lock.json) while one runs there (a conversion's --verify runs under its lock)
        if LEFTOVER.search(f) or f == ".moe-convert" and _without_lock(storage.list_dir(f)) != (["output.json"], []):
            problems.append(f"{storage.display(f)}: left over from an unfinished conversion")
    return problems
