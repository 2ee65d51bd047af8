"""A source checkpoint's metadata: its safetensors headers, index, config and other files.

Only headers are read (ranged reads); no tensor data is touched here.
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError, StorageError
from convert.formats.safetensors import FileHeader, TensorInfo, read_header
from convert.io.storage import S3_POOL, Storage

INDEX_NAME = "model.safetensors.index.json"
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

    storage: Storage
    headers: dict[str, FileHeader]
    tensors: dict[str, TensorRef]
    config: dict[str, Any]
    other_files: list[str]  # top-level files copied unchanged (configs, tokenizer, ...)
    skipped: list[str]  # what is not copied, and why
    metadata: dict[str, str]
    index_file: str | None


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


def read_weight_map(storage: Storage, index_file: str) -> dict[str, str]:
    """The weight_map of the index `index_file`: tensor name -> shard file name, each checked by safe_relative."""
    where = storage.display(index_file)
    index = storage.read_json(index_file)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ConversionError(f"{where}: has no weight_map object (expected {{tensor name: shard file name}})")
    return {k: safe_relative(v, where, k) for k, v in index["weight_map"].items()}


def _listing(storage: Storage) -> tuple[list[str], list[str]]:
    """(files, subdirectories) at `storage`'s root; ConversionError when it is not a directory. An object
    store is listed once (no separate "is it a directory" request): a prefix with nothing below it is none,
    and a listing that shows only an object named like the prefix itself is asked once more."""
    where = f"{storage.display()}: source is not a directory"
    if storage.is_local:
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


def open_checkpoint(storage: Storage, index_name: str = INDEX_NAME, weight_glob: str = ".safetensors") -> Checkpoint:
    """Read the metadata of the checkpoint at `storage`'s root.

    Uses `index_name` when present, else every top-level `*.safetensors` file. Validates
    that each indexed shard exists, each indexed tensor is in the shard named, and no
    tensor appears twice. Returns a Checkpoint; raises ConversionError naming the file.
    """
    files, subdirs = _listing(storage)
    index_file = index_name if index_name in files else None
    background = ThreadPoolExecutor(max_workers=1)  # config.json beside the index and headers (one round trip less)
    config_read = background.submit(storage.read_json, "config.json") if "config.json" in files else None
    background.shutdown(wait=False)
    # An object store's headers are read at once, beside the index: every listed shard's (a round trip less;
    # a file the index does not name is never looked at, whatever its read gave). Local headers are parsed
    # one at a time (the parse holds the GIL anyway), so at most one file's parse tree is held at once.
    listed = [f for f in files if f.endswith(weight_glob)]
    early: dict[str, Future[FileHeader]] = {}
    if not storage.is_local and listed:
        pool = ThreadPoolExecutor(max_workers=min(S3_POOL, len(listed)))
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
        raise ConversionError(f"{storage.display()}: no *{weight_glob} files found")
    headers = {n: early[n].result() if n in early else read_header(storage, n) for n in shard_names}

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

    config = config_read.result() if config_read is not None else {}
    if not isinstance(config, dict):
        raise ConversionError(f"{storage.display('config.json')}: expected a JSON object, got {type(config).__name__}")
    weight_files = set(shard_names) | ({index_file} if index_file else set())
    rest = [f for f in files if f not in weight_files and not f.endswith(weight_glob)]
    other = [f for f in rest if not OTHER_WEIGHTS.search(f)]
    skipped = [f"{f}: weights in another format, not converted" for f in rest if OTHER_WEIGHTS.search(f)]
    skipped += [f"{d}/: subdirectory, not copied" for d in subdirs if not d.startswith(".")]
    return Checkpoint(
        storage=storage, headers=headers, tensors=tensors, config=config, other_files=other,
        skipped=skipped, metadata=metadata, index_file=index_file,
    )
