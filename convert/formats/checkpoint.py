"""A source checkpoint's metadata: its tensors, wherever they are stored, its config and other files.

Three containers are read (detected from what the directory holds, named in Checkpoint.container):
- `safetensors`: a Hugging Face directory of *.safetensors files, with or without an index;
- `torch-dcp`: a torch.distributed.checkpoint directory (`.metadata` + `*.distcp`, convert.formats.dcp);
- `sharded-safetensors`: per-rank safetensors files whose headers carry DCP_SHARDING_INFO (torch's
  HuggingFaceStorageWriter(save_distributed=True): torchtitan before consolidation, NeMo AutoModel).
Every tensor is a TensorRef (file, byte range). A tensor saved in several chunks is one contiguous tensor in a
virtual file (convert.formats.chunks), which Checkpoint.storage (a ChunkedView) reads. Only headers and
metadata are read here (ranged reads); no tensor data is touched.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from convert.errors import ConversionError, StorageError
from convert.formats.chunks import Chunk, ChunkedTensor, ChunkedView, virtual_file
from convert.formats.dcp import METADATA, SUFFIX, load_chunk, read_dcp
from convert.formats.safetensors import DTYPE_SIZES, FileHeader, TensorInfo, read_header
from convert.io.storage import Store, read_json

INDEX_NAME = "model.safetensors.index.json"
SHARDING_KEY = "DCP_SHARDING_INFO"  # torch's _hf_utils: {tensor: {"saved_offsets": [...]}} of a per-rank shard
# Where trainers that write no config.json beside the weights keep it (NeMo AutoModel's consolidated HF output).
CONFIG_PLACES = ("config.json", ".hf_metadata/config.json")
# Weights in other formats would be copied in the old layout next to the converted ones: leave them out.
OTHER_WEIGHTS = re.compile(r"(\.bin|\.pt|\.pth|\.ckpt|\.gguf|\.msgpack|\.h5)$|\.bin\.index\.json$")


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the source: the file (relative to the source root) and its header entry."""

    file: str
    info: TensorInfo


@dataclass
class Checkpoint:
    """Metadata of a source checkpoint directory."""

    storage: Store  # a ChunkedView of it where tensors are chunked
    headers: dict[str, FileHeader]  # the weight files (a DCP file's header lists no tensors)
    tensors: dict[str, TensorRef]
    config: dict[str, Any]
    other_files: list[str]  # top-level files copied unchanged (configs, tokenizer, ...)
    skipped: list[str]  # what is not copied, and why
    metadata: dict[str, str]
    index_file: str | None
    container: str = "safetensors"
    chunked: dict[str, ChunkedTensor] = field(default_factory=dict)  # virtual file -> tensor saved in chunks
    meta_files: list[str] = field(default_factory=list)  # other files the tensors' places were read from
    notes: list[str] = field(default_factory=list)  # what the container held that is not converted (one line each)
    config_place: str = "config.json"  # where config.json was read (NeMo keeps it in .hf_metadata/)

    @property
    def source_files(self) -> list[str]:
        """Every file the conversion reads tensors or their places from (what a job pins)."""
        return [*self.headers, *([self.index_file] if self.index_file else []), *self.meta_files]


def safe_relative(name: object, where: str, tensor: str | None = None) -> str:
    """Check a shard name from an index: a plain file name in the index's own directory, returned unchanged.

    Refuses (ConversionError naming `where` and `tensor`) anything else: not a string, empty,
    absolute, with a directory part ('/', '\\'), '.', '..', or a ':' (drive letters, URLs).
    """
    if not (isinstance(name, str) and name and name not in (".", "..") and not any(c in name for c in "/\\:\0")):
        about = f" for tensor {tensor!r}" if tensor else ""
        raise ConversionError(
            f"{where}: refusing shard path {name!r}{about} (expected a plain file name inside the checkpoint "
            "directory; this one is absolute, has a directory part, escapes it or is not a string)"
        )
    return name


def read_weight_map(storage: Store, index_file: str) -> dict[str, str]:
    """The weight_map of the index `index_file`: tensor name -> shard file name, each checked by safe_relative."""
    where = storage.display(index_file)
    index = read_json(storage, index_file)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ConversionError(f"{where}: has no weight_map object (expected {{tensor name: shard file name}})")
    return {k: safe_relative(v, where, k) for k, v in index["weight_map"].items()}


def _listing(storage: Store) -> tuple[list[str], list[str]]:
    """(files, subdirectories) at `storage`'s root; ConversionError when it is not a directory. An object
    store is listed once (no separate "is it a directory" request): a prefix with nothing below it is none,
    and a listing that shows only an object named like the prefix itself is asked once more."""
    where = f"{storage.display()}: source is not a directory"
    if not storage.remote:
        if not storage.isdir():
            raise ConversionError(where)
        return storage.list_dir()
    try:
        files, subdirs = storage.list_dir()
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise ConversionError(where) from None
        raise
    leaf = storage.url.rstrip("/").rsplit("/", 1)[-1]
    if not (files or subdirs) or (files == [leaf] and not subdirs and not storage.isdir()):
        raise ConversionError(where)
    return files, subdirs


def open_checkpoint(storage: Store, index_name: str = INDEX_NAME, weight_glob: str = ".safetensors") -> Checkpoint:
    """Read the metadata of the checkpoint at `storage`'s root, whichever container holds it (see the module).

    Safetensors: uses `index_name` when present, else every top-level `*.safetensors` file. Validates that each
    indexed shard exists, each indexed tensor is in the shard named, and no tensor appears twice (except in
    per-rank shards, where each file holds a chunk). Returns a Checkpoint; raises ConversionError naming the file.
    """
    files, subdirs = _listing(storage)
    if METADATA in files and weight_glob == ".safetensors":
        return _open_dcp(storage, files, subdirs)
    index_file = index_name if index_name in files else None
    background = ThreadPoolExecutor(max_workers=1)  # config.json beside the index and headers (one round trip less)
    config_read = _read_config(background, storage, files, subdirs)
    background.shutdown(wait=False)
    # An object store's headers are read at once, beside the index: every listed shard's (a round trip less;
    # a file the index does not name is never looked at, whatever its read gave). Local headers are parsed
    # one at a time (the parse holds the GIL anyway), so at most one file's parse tree is held at once.
    listed = [f for f in files if f.endswith(weight_glob)]
    early: dict[str, Future[FileHeader]] = {}
    if storage.remote and listed:
        pool = ThreadPoolExecutor(max_workers=min(storage.settings.s3_pool, len(listed)))
        early = {n: pool.submit(read_header, storage, n) for n in listed}
        pool.shutdown(wait=False)
    weight_map: dict[str, str] | None = None
    metadata: dict[str, str] = {}
    if index_file:
        weight_map = read_weight_map(storage, index_file)
        shard_names = sorted(set(weight_map.values()))
        for name in shard_names:
            if name not in files:
                raise ConversionError(f"{storage.display(index_file)}: names shard {name!r}, which does not exist")
    else:
        shard_names = listed
    if not shard_names:
        raise ConversionError(f"{storage.display()}: no *{weight_glob} files found (nor a torch DCP {METADATA})")
    headers = {n: early[n].result() if n in early else read_header(storage, n) for n in shard_names}
    if weight_map is None and all(SHARDING_KEY in h.metadata for h in headers.values()):
        chunked = _sharded_tensors(storage, headers)
        return _assemble(storage, files, subdirs, headers, chunked, config_read, "sharded-safetensors",
                         weight_glob=weight_glob)

    tensors: dict[str, TensorRef] = {}
    first_file: dict[str, str] = {}
    for name, header in headers.items():
        for tname in header.tensors:
            if tname in first_file:
                raise ConversionError(
                    f"{storage.display(name)}: tensor {tname!r} is also in {first_file[tname]} (listed twice; "
                    "expected each tensor in exactly one shard)"
                )
            first_file[tname] = name
    for name, header in headers.items():
        metadata.update(header.metadata)
        for tname, info in header.tensors.items():
            if weight_map is not None and weight_map.get(tname) != name:
                if tname not in weight_map:
                    continue  # present in a shard but not indexed: loaders ignore it, so do we
                raise ConversionError(
                    f"{storage.display(index_file or '')}: maps {tname!r} to {weight_map[tname]} but it is in {name}"
                )
            tensors[tname] = TensorRef(name, info)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConversionError(
                f"{storage.display(index_file or '')}: tensor {missing[0]!r} is not in shard {weight_map[missing[0]]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    ckpt = _assemble(storage, files, subdirs, headers, {}, config_read, "safetensors", index_file, weight_glob)
    ckpt.tensors, ckpt.metadata = tensors, metadata
    return ckpt


def _read_config(pool: ThreadPoolExecutor, storage: Store, files: list[str],
                 subdirs: list[str]) -> Future[tuple[str, Any] | None] | None:
    """(where it was found, contents) of config.json, read in `pool` from the first of CONFIG_PLACES that the
    listing shows (a place in a subdirectory only if it exists there); None where none does."""
    for place in CONFIG_PLACES:
        head, _, leaf = place.rpartition("/")
        if (not head and leaf in files) or (head and head in subdirs):
            return pool.submit(_config_at, storage, place, bool(head))
    return None


def _config_at(storage: Store, place: str, maybe: bool) -> tuple[str, Any] | None:
    if maybe and not storage.exists(place):
        return None
    return place, read_json(storage, place)


def _assemble(storage: Store, files: list[str], subdirs: list[str], headers: dict[str, FileHeader],
              chunked: dict[str, ChunkedTensor], config_read: Future[tuple[str, Any] | None] | None, container: str,
              index_file: str | None = None, weight_glob: str = ".safetensors",
              meta_files: tuple[str, ...] = (), notes: tuple[str, ...] = ()) -> Checkpoint:
    """The Checkpoint of a listed directory: `chunked` tensors become TensorRefs (a stored range where one chunk
    holds a tensor whole, else a virtual file), the config is read, other files are sorted into copied/skipped."""
    tensors: dict[str, TensorRef] = {}
    virtual: dict[str, ChunkedTensor] = {}
    for name, t in chunked.items():
        c = t.chunks[0] if len(t.chunks) == 1 else None
        if c is not None and c.raw and c.sizes == t.shape:
            tensors[name] = TensorRef(c.file, TensorInfo(name, t.dtype, t.shape, c.start, c.start + t.nbytes))
        else:
            virtual[virtual_file(name)] = t
            tensors[name] = TensorRef(virtual_file(name), TensorInfo(name, t.dtype, t.shape, 0, t.nbytes))
    place, config = (config_read.result() if config_read is not None else None) or ("config.json", {})
    if not isinstance(config, dict):
        raise ConversionError(f"{storage.display(place)}: expected a JSON object, got {type(config).__name__}")
    weight_files = set(headers) | ({index_file} if index_file else set()) | set(meta_files)
    rest = [f for f in files if f not in weight_files and not f.endswith(weight_glob) and not f.endswith(SUFFIX)]
    other = [f for f in rest if not OTHER_WEIGHTS.search(f)]
    skipped_files = [f"{f}: weights in another format, not converted" for f in rest if OTHER_WEIGHTS.search(f)]
    skipped_files += [f"{d}/: subdirectory, not copied" for d in subdirs if not d.startswith(".")]
    # A ChunkedView stands in for the Storage: it reads the virtual files and forwards every other attribute.
    view: Any = ChunkedView(storage, virtual, load_chunk) if virtual else storage
    return Checkpoint(
        storage=view, headers=headers, tensors=tensors, config=config, other_files=other,
        skipped=skipped_files, metadata={}, index_file=index_file, container=container,
        chunked=virtual, meta_files=list(meta_files), notes=list(notes), config_place=place,
    )


def _sharded_tensors(storage: Store, headers: dict[str, FileHeader]) -> dict[str, ChunkedTensor]:
    """The tensors of per-rank safetensors shards: each file's entry of a tensor is the chunk its
    DCP_SHARDING_INFO places at `saved_offsets`; a tensor's shape is the extent of its chunks."""
    chunks: dict[str, list[Chunk]] = {}
    dtypes: dict[str, tuple[str, str]] = {}
    for name, header in sorted(headers.items()):
        where = storage.display(name)
        try:
            info = json.loads(header.metadata[SHARDING_KEY])
        except ValueError as exc:
            raise ConversionError(f"{where}: {SHARDING_KEY} is not JSON ({exc})") from None
        if not isinstance(info, dict):
            raise ConversionError(f"{where}: {SHARDING_KEY} is not an object of tensor -> saved_offsets")
        for tname, t in header.tensors.items():
            offsets = (info.get(tname) or {}).get("saved_offsets") if isinstance(info.get(tname), dict) else None
            if not (isinstance(offsets, list) and len(offsets) == len(t.shape)
                    and all(isinstance(o, int) and o >= 0 for o in offsets)):
                raise ConversionError(f"{where}: tensor {tname!r} {list(t.shape)} has no saved_offsets of "
                                      f"{len(t.shape)} dims in {SHARDING_KEY}")
            if tname in dtypes and dtypes[tname][0] != t.dtype:
                raise ConversionError(f"{where}: tensor {tname!r} is {t.dtype} here and {dtypes[tname][0]} in "
                                      f"{dtypes[tname][1]}")
            dtypes.setdefault(tname, (t.dtype, name))
            chunks.setdefault(tname, []).append(Chunk(name, t.start, tuple(offsets), tuple(t.shape)))
    out: dict[str, ChunkedTensor] = {}
    for tname, cs in chunks.items():
        dtype = dtypes[tname][0]
        shape = tuple(max(c.offsets[d] + c.sizes[d] for c in cs) for d in range(len(cs[0].sizes)))
        tensor = ChunkedTensor(tname, dtype, shape, DTYPE_SIZES[dtype], tuple(cs))
        tensor.check_tiling(lambda c: storage.display(c.file))
        out[tname] = tensor
    return out


def _open_dcp(storage: Store, files: list[str], subdirs: list[str]) -> Checkpoint:
    """The Checkpoint of a torch DCP directory (convert.formats.dcp)."""
    background = ThreadPoolExecutor(max_workers=1)
    config_read = _read_config(background, storage, files, subdirs)
    background.shutdown(wait=False)
    sizes = storage.file_sizes()
    dcp = read_dcp(storage, sizes)
    headers = {f: FileHeader(f, sizes[f], 0, {}) for f in dcp.files}
    unused = sorted(f for f in files if f.endswith(SUFFIX) and f not in headers)
    notes = list(dcp.skipped) + ([f"{len(unused)} {SUFFIX} files hold training state only (e.g. {unused[0]})"]
                                 if unused else [])
    return _assemble(storage, [f for f in files if f not in unused], subdirs, headers, dcp.tensors, config_read,
                     "torch-dcp", meta_files=(METADATA,), notes=tuple(notes))
