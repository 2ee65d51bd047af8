"""torch.distributed.checkpoint (DCP) directories: `.metadata` plus `__<rank>_<n>.distcp` files.

`.metadata` is a pickle of torch's `Metadata`: for every state-dict entry its size, dtype and chunks (a box
of offsets and sizes each, one per saving rank's slice), and for every chunk the file, offset and length of
its record. FileSystemWriter stores each tensor chunk as a whole torch.save archive (a zip whose entries are
stored, not compressed) at that offset: the chunk's elements are the archive's `data/<key>` entry. Both
pickles are read here with an unpickler that builds only the few classes these files hold (torch is not
imported, and a checkpoint cannot run code). A record whose storage is not exactly the chunk, contiguous and
little-endian is read whole with torch.load instead; records stored through transforms (compression) are
refused.
"""

from __future__ import annotations

import bisect
import io
import math
import pickle
import struct
import zipfile
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError, StorageError
from convert.formats.chunks import Chunk, ChunkedTensor
from convert.formats.safetensors import DTYPE_SIZES

METADATA = ".metadata"
SUFFIX = ".distcp"
# torch dtype name -> safetensors dtype name
TORCH_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
}
# torch.save's legacy storage class names -> safetensors dtype
STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
# State-dict groups that are not model weights (torchtitan, NeMo, Lightning, accelerate names).
TRAINING_STATE = ("optimizer", "optim", "lr_scheduler", "lr_schedulers", "scheduler", "dataloader", "train_state",
                  "rng", "rng_state", "extra_state", "trainer", "step", "epoch", "loops", "callbacks")
HEAD_BYTES = 4 << 10  # read at once from each end of a record: its zip directory and data.pkl fit in them


class _Record:
    """An object of one of the allowed classes, with the state its pickle gave."""

    kind = "record"

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


def _record_class(name: str) -> type:
    return type(name, (_Record,), {"kind": name})


_DCP_CLASSES = {
    name: _record_class(name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_StorageInfo", "_StoragePrefix")
}


def _reconstructor(cls: type[object], base: type, state: Any) -> Any:
    return cls.__new__(cls)


@dataclass(frozen=True)
class _Dtype:
    name: str


@dataclass(frozen=True)
class _StorageType:
    name: str


def _rebuild_tensor(storage: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any) -> dict[str, Any]:
    return {"storage": storage, "offset": offset, "size": tuple(size), "stride": tuple(stride)}


class _Unpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes, torch.Size / dtypes / storage types and a tensor rebuild record."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))

    def find_class(self, module: str, name: str) -> Any:
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module == "builtins" and name == "object":
            return object
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
            return lambda *parts: "/".join(str(p) for p in parts)
        if module == "torch":
            if name == "Size":
                return tuple
            if name in TORCH_DTYPES or name in ("strided", "contiguous_format", "preserve_format", "channels_last",
                                                "sparse_coo") or hasattr(_Dtype, name):
                return _Dtype(name)
            if name.endswith("Storage"):
                return _StorageType(name)
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module.startswith("torch.distributed.checkpoint") and name in _DCP_CLASSES:
            return _DCP_CLASSES[name]
        if (module == "torch.serialization" and name == "_get_layout") or (
                module.startswith("torch.distributed.checkpoint") and name in ("_MEM_FORMAT_ENCODING",)):
            return lambda *a: a[0] if a else None  # enum values: their names are all this tool needs
        raise pickle.UnpicklingError(f"{module}.{name} is not a class a DCP checkpoint holds")

    def persistent_load(self, pid: Any) -> Any:
        return pid


def _unpickle(data: bytes, where: str) -> Any:
    try:
        return _Unpickler(data).load()
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is one message
        raise ConversionError(f"{where}: cannot read it as torch.distributed.checkpoint metadata ({exc})") from None


@dataclass
class DcpSource:
    """The model tensors of a DCP checkpoint and what was left out."""

    tensors: dict[str, ChunkedTensor]
    files: list[str]  # .distcp files the model tensors lie in
    skipped: list[str]  # one line each: training state and non-tensor entries left out


def _dtype_of(props: Any, fqn: str, where: str) -> str:
    dtype = getattr(props, "dtype", None)
    if dtype is None and isinstance(getattr(props, "state", None), tuple):
        dtype = props.state[0]
    name = getattr(dtype, "name", None)
    if name not in TORCH_DTYPES:
        raise ConversionError(f"{where}: tensor {fqn!r} has dtype {name or dtype!r}, which this tool cannot convert "
                              f"(expected one of {sorted(TORCH_DTYPES)})")
    return TORCH_DTYPES[name]


def model_entries(fqns: list[str], paths: dict[str, Any] | None = None) -> tuple[dict[str, str], Counter[str]]:
    """Model entries among a state dict's `fqns`: {name in the model: fqn}, and a count of the rest by group.

    `paths` (the metadata's planner_data: fqn -> the keys of the nested state dict it came from) tells a
    group from a dotted name: where the state dict holds a `model` group (torchtitan's and NeMo's training
    checkpoints: `{"model": ..., "optimizer": ...}`), only it is kept, named by its keys inside the group;
    otherwise every entry but the training-state groups (TRAINING_STATE). A flat model state dict whose names
    start with `model.` (a Hugging Face model's) is kept whole. Without `paths`, a `model.` prefix counts as a
    group only beside a training-state group."""
    def path(f: str) -> tuple[str, ...]:
        p = (paths or {}).get(f)
        if isinstance(p, (tuple, list)) and p and all(isinstance(k, (str, int)) for k in p):
            return tuple(str(k) for k in p)
        head, dot, tail = f.partition(".")
        return (head, tail) if dot and paths is None else (f,)

    split = {f: path(f) for f in fqns}
    nested = {f: p for f, p in split.items() if len(p) > 1}
    grouped = any(p[0] == "model" for p in nested.values()) and (
        paths is not None or any(p[0] in TRAINING_STATE for p in nested.values()))
    keep: dict[str, str] = {}
    rest: Counter[str] = Counter()
    for f, p in split.items():
        if grouped:
            if p[0] == "model" and len(p) > 1:
                keep[".".join(p[1:])] = f
            else:
                rest[p[0]] += 1
        elif len(p) > 1 and p[0] in TRAINING_STATE:
            rest[p[0]] += 1
        else:
            keep[f] = f
    return keep, rest


def read_dcp(storage: Any, file_sizes: dict[str, int]) -> DcpSource:
    """The model tensors of the DCP checkpoint at `storage`'s root, each as a ChunkedTensor whose chunks point
    at their bytes in the .distcp files. `file_sizes`: name -> size of the files listed there.

    Reads `.metadata` and, per chunk, the zip directory and data.pkl of its torch.save record (ranged reads,
    in parallel). Raises ConversionError naming the file and tensor for a missing or truncated file, a chunk
    record that is not a torch.save archive, or chunks that do not tile their tensor.
    """
    where = storage.display(METADATA)
    meta = _unpickle(storage.read_bytes(METADATA), where)
    entries = getattr(meta, "state_dict_metadata", None)
    storage_data = getattr(meta, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage_data, dict):
        raise ConversionError(f"{where}: has no state_dict_metadata / storage_data (not a torch DCP checkpoint?)")
    # (fqn, chunk offsets) -> storage info
    info: dict[tuple[str, tuple[int, ...]], Any] = {}
    for idx, sinfo in storage_data.items():
        offset = getattr(idx, "offset", None)
        info[(getattr(idx, "fqn", ""), tuple(offset) if offset is not None else ())] = sinfo
    tensor_fqns = {f for f, e in entries.items() if getattr(e, "kind", "") == "TensorStorageMetadata"}
    planner = getattr(meta, "planner_data", None)
    keep, rest = model_entries(list(entries), planner if isinstance(planner, dict) else None)
    non_tensor = sorted(f for f in keep.values() if f not in tensor_fqns)
    skipped = []
    if rest:
        skipped.append(f"{METADATA}: {sum(rest.values())} training-state entries not converted ("
                       + ", ".join(f"{g} {n}" for g, n in sorted(rest.items())) + ")")
    if non_tensor:
        skipped.append(f"{METADATA}: {len(non_tensor)} non-tensor model entries not converted (e.g. {non_tensor[0]!r})")

    todo: list[tuple[str, str, int, Any, Any]] = []  # (name, fqn, chunk index, chunk metadata, storage info)
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, fqn in keep.items():
        e = entries[fqn]
        if getattr(e, "kind", "") != "TensorStorageMetadata":
            continue
        dtype = _dtype_of(getattr(e, "properties", None), fqn, where)
        shapes[name] = (tuple(int(d) for d in e.size), dtype)
        for k, ch in enumerate(e.chunks):
            sinfo = info.get((fqn, tuple(ch.offsets)))
            if sinfo is None:
                raise ConversionError(f"{where}: tensor {fqn!r} has a chunk at offsets {list(ch.offsets)} with no "
                                      "storage entry")
            file = getattr(sinfo, "relative_path", None)
            if not isinstance(file, str) or file not in file_sizes:
                raise ConversionError(f"{where}: names file {file!r} for tensor {fqn!r}, which does not exist")
            end = sinfo.offset + sinfo.length
            if end > file_sizes[file]:
                raise ConversionError(
                    f"{storage.display(file)}: holds {file_sizes[file]} bytes, but tensor {fqn!r} is recorded at "
                    f"bytes {sinfo.offset}..{end} (truncated file?)")
            todo.append((name, fqn, k, ch, sinfo))

    # An object store's reads wait on the network: many at once. Local reads are page-cache copies and the
    # parsing holds the GIL: one thread (a pool's hand-offs cost more than they save).
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(todo)))) if storage.remote else _Inline() as pool:
        edges = edge_blocks(storage, [(t[4].relative_path, t[4].offset, t[4].offset + t[4].length) for t in todo], pool)
        found = list(pool.map(lambda t: _locate(storage, t[1], t[3], t[4], shapes[t[0]][1],
                                                edges.get((t[4].relative_path, t[4].offset), [])), todo))
    by_name: dict[str, list[Chunk]] = {}
    for (name, *_), chunk in zip(todo, found):
        by_name.setdefault(name, []).append(chunk)
    tensors = {}
    for name, (shape, dtype) in shapes.items():
        t = ChunkedTensor(name, dtype, shape, DTYPE_SIZES[dtype], tuple(by_name.get(name, ())))
        t.check_tiling(lambda c: storage.display(c.file))
        tensors[name] = t
    files = sorted({c.file for t in tensors.values() for c in t.chunks})
    return DcpSource(tensors, files, skipped)


class _Inline:
    """A stand-in for ThreadPoolExecutor that maps in the calling thread."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Any, items: Any) -> Any:
        return map(fn, items)


def edge_blocks(storage: Any, records: list[tuple[str, int, int]], pool: ThreadPoolExecutor | _Inline,
                size: int = HEAD_BYTES) -> dict[tuple[str, int], list[tuple[int, bytes]]]:
    """The first and last `size` bytes of each record (file, start, end), read with one request per boundary
    between records that touch (a record's zip directory and the next one's data.pkl lie side by side).
    Returns (file, start) -> [(offset in the record, bytes)]."""
    spans: list[tuple[str, int, int]] = []
    by_file: dict[str, list[tuple[int, int]]] = {}
    for file, start, end in records:
        by_file.setdefault(file, []).append((start, end))
    for file, recs in by_file.items():
        recs = sorted(set(recs))
        for start, end in recs:
            head = (start, min(end, start + size))
            if spans and spans[-1][0] == file and spans[-1][2] >= head[0]:
                spans[-1] = (file, spans[-1][1], max(spans[-1][2], head[1]))
            else:
                spans.append((file, *head))
            tail = (max(start, end - size), end)
            if spans[-1][2] >= tail[0]:
                spans[-1] = (file, spans[-1][1], max(spans[-1][2], tail[1]))
            else:
                spans.append((file, *tail))
    data = list(pool.map(lambda sp: bytes(storage.read_range(*sp)), spans))
    out: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
    located = {f: sorted(set(r)) for f, r in by_file.items()}
    ends = {f: [end for _, end in recs] for f, recs in located.items()}  # ascending: records do not overlap
    for (file, lo, hi), got in zip(spans, data):
        recs = located[file]
        for k in range(bisect.bisect_right(ends[file], lo), len(recs)):
            start, end = recs[k]
            if start >= hi:
                break
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out.setdefault((file, start), []).append((a - start, got[a - lo : b - lo]))
    return out


class _RangeFile(io.RawIOBase):
    """Bytes [start, start + length) of a stored file as a seekable read-only file, its two ends read once."""

    def __init__(self, storage: Any, rel: str, start: int, length: int) -> None:
        self.storage, self.rel, self.start, self.length, self.pos = storage, rel, start, length, 0
        self.blocks: list[tuple[int, bytes]] = []

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        a = self.pos
        self.pos = max(a, end)
        if a >= end:
            return b""
        for lo, data in self.blocks:
            if lo <= a and end <= lo + len(data):
                return data[a - lo : end - lo]
        lo = max(0, min(a, self.length - HEAD_BYTES)) if end - a < HEAD_BYTES else a
        hi = max(end, min(self.length, lo + HEAD_BYTES))
        data = bytes(self.storage.read_range(self.rel, self.start + lo, self.start + hi))
        self.blocks.append((lo, data))
        return data[a - lo : end - lo]

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _locate(storage: Any, fqn: str, ch: Any, sinfo: Any, dtype: str, blocks: list[tuple[int, bytes]]) -> Chunk:
    """The Chunk of chunk metadata `ch` of tensor `fqn`: where its elements lie inside its torch.save record
    (`blocks`: bytes of the record already read, as (offset in the record, bytes))."""
    file, offsets, sizes = sinfo.relative_path, tuple(int(o) for o in ch.offsets), tuple(int(s) for s in ch.sizes)
    whole = Chunk(file, sinfo.offset, offsets, sizes, raw=False, record=(sinfo.offset, sinfo.length))
    where = f"{storage.display(file)}: tensor {fqn!r} (chunk at offsets {list(offsets)}, bytes {sinfo.offset}.." \
            f"{sinfo.offset + sinfo.length})"
    if getattr(sinfo, "transform_descriptors", None):
        raise ConversionError(f"{where}: is stored through transforms {list(sinfo.transform_descriptors)} "
                              "(compression or another storage extension), which this tool does not read")
    f = _RangeFile(storage, file, sinfo.offset, sinfo.length)
    f.blocks = list(blocks)
    try:
        names: dict[str, Any] | None = _stored_entries(f)
        if names is not None and "data.pkl" in names:  # the usual record: read without zipfile's machinery
            rebuilt = _unpickle(_entry_bytes(f, names["data.pkl"]), where)
            order = _entry_bytes(f, names["byteorder"]).decode() if "byteorder" in names else "little"
        else:
            zf = zipfile.ZipFile(f)
            names = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
            pkl = names.get("data.pkl")
            if pkl is None:
                raise zipfile.BadZipFile("no data.pkl")
            rebuilt = _unpickle(zf.read(pkl), where)
            order = zf.read(names["byteorder"]).decode() if "byteorder" in names else "little"
    except StorageError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as exc:
        raise ConversionError(f"{where}: is not a torch.save record ({exc}; truncated or overwritten file?)") from None
    if not (isinstance(rebuilt, dict) and isinstance(rebuilt.get("storage"), tuple) and len(rebuilt["storage"]) == 5):
        return whole
    _, stype, key, _, _ = rebuilt["storage"]
    entry = names.get(f"data/{key}")
    numel = math.prod(sizes)
    contiguous = tuple(math.prod(sizes[i + 1:]) for i in range(len(sizes)))
    ok = (entry is not None and entry.compress_type == zipfile.ZIP_STORED and order == "little"
          and isinstance(stype, _StorageType) and STORAGE_DTYPES.get(stype.name) == dtype
          and rebuilt["offset"] == 0 and rebuilt["size"] == sizes
          and (numel <= 1 or all(st == c for st, c, d in zip(rebuilt["stride"], contiguous, sizes) if d > 1))
          and entry.file_size == numel * DTYPE_SIZES[dtype])
    if not ok:
        return whole
    assert entry is not None
    f.seek(entry.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ConversionError(f"{where}: is not a torch.save record (bad zip entry header)")
    data_at = entry.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    if data_at + entry.file_size > sinfo.length:
        raise ConversionError(f"{where}: its data runs past the record's end (truncated file?)")
    return Chunk(file, sinfo.offset + data_at, offsets, sizes)


@dataclass(frozen=True)
class _Entry:
    """A zip central-directory entry: what _locate needs of it (zipfile.ZipInfo's names)."""

    header_offset: int
    compress_type: int
    file_size: int


def _stored_entries(f: _RangeFile) -> dict[str, _Entry] | None:
    """The entries of the zip archive `f` (names after the archive's top folder) from its end-of-central-directory
    record and central directory, for archives without a comment and without zip64 records (a torch.save record
    of a chunk under 4 GiB); None for anything else (zipfile reads those)."""
    n = f.length
    if n < 22:
        return None
    f.seek(n - 22)
    eocd = f.read(22)
    if eocd[:4] != b"PK\x05\x06":
        return None
    count, cd_size, cd_offset = struct.unpack_from("<HII", eocd, 10)
    if cd_offset == 0xFFFFFFFF or count == 0xFFFF or cd_offset + cd_size > n - 22:
        return None
    f.seek(cd_offset)
    cd = f.read(cd_size)
    out: dict[str, _Entry] = {}
    pos = 0
    for _ in range(count):
        if cd[pos : pos + 4] != b"PK\x01\x02" or pos + 46 > len(cd):
            return None
        method, = struct.unpack_from("<H", cd, pos + 10)
        csize, usize, nlen, elen, clen = struct.unpack_from("<IIHHH", cd, pos + 20)
        local, = struct.unpack_from("<I", cd, pos + 42)
        if 0xFFFFFFFF in (csize, usize, local):
            return None
        name = cd[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        out[name.split("/", 1)[-1]] = _Entry(local, method, usize)
        pos += 46 + nlen + elen + clen
    return out


def _entry_bytes(f: _RangeFile, entry: _Entry) -> bytes:
    """The bytes of a stored (uncompressed) entry of the archive `f`, found through its local header."""
    if entry.compress_type != zipfile.ZIP_STORED:
        raise zipfile.BadZipFile("a compressed entry")
    f.seek(entry.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local header")
    f.seek(entry.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little"))
    data = f.read(entry.file_size)
    if len(data) != entry.file_size:
        raise zipfile.BadZipFile("entry runs past the record's end")
    return data


def load_chunk(storage: Any, chunk: Chunk, tensor: ChunkedTensor) -> bytes:
    """The elements of a chunk that is not raw, row-major: its torch.save record read whole and loaded with
    torch.load (weights only)."""
    import torch

    assert chunk.record is not None
    start, length = chunk.record
    data = storage.read_range(chunk.file, start, start + length)
    t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if tuple(t.shape) != chunk.sizes:
        raise ConversionError(f"{storage.display(chunk.file)}: tensor {tensor.name!r}: chunk record holds shape "
                              f"{list(t.shape)}, metadata says {list(chunk.sizes)}")
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b""
