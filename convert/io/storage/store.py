"""The store interface: small protocols that callers type against, and what is built on them for every kind.

`Store` is what every kind of store serves and every caller may use: paths and metadata, reads, writes, life
cycle. What only some kinds can do is reached through a capability accessor, an object or None, tested once per
file or piece (never per byte range):

- `pinning` (every store): a `SourcePinning` (convert.io.pins): pins of source files and reads held to them;
- `positional` (local files): `PositionalWrites`, preallocated files written in place, copies between them,
  write-behind and fsync, the files' paths on this machine;
- `multipart` (S3): `MultipartUploads`, the six operations of a multipart upload;
- `conditional` (S3): `ConditionalObjects`, small objects written, read and removed on conditions (the lock).

The kinds implement them (convert.io.storage.local_storage, s3_storage, fsspec_storage), on the shared base of
base_storage. Helpers built on the protocol rather than on a kind are functions here: read_json, fetch (and
Fetched, merge_ranges), copy_by_reading.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from convert.errors import ConversionError
from convert.io.pins import SourcePinning
from convert.io.range_stream import RangeReader
from convert.settings import StorageSettings

__all__ = [
    "MAX_JSON_BYTES", "ConditionalObjects", "Fetched", "MultipartUploads", "PositionalWrites", "SourcePinning", "Store",
    "copy_by_reading", "fetch", "merge_ranges", "read_json",
]

# Configs and indexes are small (a 90k-tensor index is ~10 MB); anything larger is refused unread.
MAX_JSON_BYTES = 64 << 20


@runtime_checkable
class PositionalWrites(Protocol):
    """Files of this machine written in place (local stores): `Store.positional`."""

    def path(self, rel: str) -> str:
        """The path of `rel` on this machine (os calls, flock and libraries that open a path take it)."""
        ...

    def create_sized(self, rel: str, head: bytes, size: int) -> None:
        """Create (or truncate) `rel` as a file of `size` bytes starting with `head`."""
        ...

    def pwrite(self, rel: str, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset` of the existing file `rel`."""
        ...

    def can_copy_from(self, src: Store) -> bool:
        """True where copy_range_from moves bytes from `src` without handing them through Python objects."""
        ...

    def copy_range_from(self, src: Store, src_rel: str, src_off: int, dst_rel: str, dst_off: int, n: int) -> None:
        """Copy n bytes of `src`'s file `src_rel` at `src_off` into `dst_rel` at `dst_off` (directly where it can)."""
        ...

    def start_writeback(self, rel: str, start: int, end: int) -> None:
        """Ask for bytes [start, end) of `rel` to start going to disk now, without waiting (a hint)."""
        ...

    def fsync(self, rel: str) -> None:
        """Flush the file `rel` to durable storage."""
        ...


@runtime_checkable
class MultipartUploads(Protocol):
    """Objects uploaded in parts, appearing whole when completed (S3): `Store.multipart`."""

    def create(self, rel: str) -> str:
        """Start a multipart upload of `rel`; returns its upload id."""
        ...

    def upload_part(self, rel: str, upload_id: str, number: int, data: bytes | bytearray | memoryview) -> str:
        """Upload part `number` (1-based) of `rel`; returns its ETag."""
        ...

    def list_parts(self, rel: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """Parts already uploaded: number -> (ETag, size); empty if the upload no longer exists."""
        ...

    def complete(self, rel: str, upload_id: str, etags: dict[int, str]) -> None:
        """Assemble `rel` from its parts; the object appears only now."""
        ...

    def abort(self, rel: str, upload_id: str) -> None:
        """Abort an upload and free its parts; an upload already gone is fine."""
        ...

    def pending(self, prefix_rel: str = "") -> list[tuple[str, str]]:
        """(key relative to the root, upload id) of every unfinished upload below the root."""
        ...


@runtime_checkable
class ConditionalObjects(Protocol):
    """Small objects written, read and removed on conditions of their version (S3): `Store.conditional`."""

    def put_if(self, rel: str, data: bytes, absent: bool = False, etag: str | None = None) -> str:
        """Write `rel` only where none exists (`absent`) or where it is the version `etag`; returns the new ETag."""
        ...

    def read_object(self, rel: str) -> tuple[bytes, str, float | None] | None:
        """(bytes, ETag, seconds since written by the store's clock) of the object `rel`, or None where none."""
        ...

    def delete_if(self, rel: str, etag: str | None) -> None:
        """Remove the object `rel` where it is still the version `etag`."""
        ...


@runtime_checkable
class Store(Protocol):
    """One store (a root on a filesystem or object store): what every kind serves. Open one with
    `convert.io.storage.Storage(url, storage_options, settings)`."""

    url: str  # as the caller gave it
    settings: StorageSettings  # the job's knobs of its stores (convert.settings)
    #: Every request is a network round trip: callers batch, merge and stream reads, list once instead of asking
    #: file by file; there is no page cache to prefetch into.
    remote: bool

    @property
    def pinning(self) -> SourcePinning:
        """The store's source pins and their conditions (every kind has them)."""
        ...

    @property
    def positional(self) -> PositionalWrites | None:
        """Positional writes into files of this machine, or None (local stores only)."""
        ...

    @property
    def multipart(self) -> MultipartUploads | None:
        """Multipart uploads, or None (S3 only)."""
        ...

    @property
    def conditional(self) -> ConditionalObjects | None:
        """Conditional writes of small objects, or None (S3 only)."""
        ...

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it, for messages."""
        ...

    def place(self) -> str:
        """The root as one string comparable across stores (a prefix plus "/" for a place inside another)."""
        ...

    def exists(self, rel: str = "") -> bool:
        """True where the file or directory `rel` exists."""
        ...

    def isdir(self, rel: str = "") -> bool:
        """True where `rel` is a directory."""
        ...

    def size(self, rel: str) -> int:
        """Size in bytes of the file `rel`."""
        ...

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """name -> size in bytes of every file directly below `rel` (one listing)."""
        ...

    def list_dir(self, rel: str = "") -> tuple[list[str], list[str]]:
        """(files, subdirectories) directly below `rel`, as sorted names relative to it."""
        ...

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file `rel`; short reads are an error naming the file."""
        ...

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on; short reads are an error."""
        ...

    def read_bytes(self, rel: str) -> bytes:
        """The whole of a small file (configs, indexes)."""
        ...

    def open_range(self, rel: str, start: int, end: int) -> RangeReader:
        """A reader of bytes [start, end) of `rel` in order (one streamed request where the kind can)."""
        ...

    def prefetch(self, rel: str, start: int, end: int) -> None:
        """Start reading bytes [start, end) of `rel` into the page cache (local files; a no-op elsewhere)."""
        ...

    def makedirs(self, rel: str = "") -> None:
        """Create the directory `rel` (and those above it) where missing."""
        ...

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file, atomically where the filesystem allows."""
        ...

    def copy_file_from(self, src: Store, rel: str, dst_rel: str | None = None) -> None:
        """Copy a whole (small) file of `src` to the same name (or `dst_rel`) here (server-side where it can)."""
        ...

    def rename(self, src_rel: str, dst_rel: str) -> None:
        """Rename the file `src_rel` to `dst_rel` (replacing it)."""
        ...

    def remove(self, rel: str) -> None:
        """Remove the file `rel`, if it exists."""
        ...

    def remove_many(self, rels: Sequence[str]) -> None:
        """Remove the files `rels` (those already gone are fine), with as few requests as the store allows."""
        ...

    def remove_tree(self, rel: str) -> None:
        """Remove the directory `rel` and everything below it, if it exists."""
        ...

    def connect(self) -> None:
        """Set the client up now rather than at the first request, where there is one."""
        ...

    def close(self) -> None:
        """Release what the store holds open (descriptors); it stays usable."""
        ...


# -- built on the protocol: every kind (and every view standing in for a store) gets these ---------------------


def read_json(store: Store, rel: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse the small UTF-8 JSON file `rel` of `store` (config, index); errors name the file.

    A file larger than `limit` bytes is refused from its size, before any of it is read.
    """
    where = store.display(rel)
    size = store.size(rel)
    if size > limit:
        raise ConversionError(
            f"{where}: {size} bytes, more than the {limit >> 20} MiB a JSON metadata file may have "
            "(expected a small config or index file)"
        )
    raw = store.read_bytes(rel)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConversionError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); expected a UTF-8 JSON file"
        ) from exc
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ConversionError(f"{where}: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise ConversionError(f"{where}: not valid JSON (nested too deeply)") from exc


def copy_by_reading(src: Store, dst: Store, rel: str, dst_rel: str | None = None) -> None:
    """Copy a whole (small) file `rel` of `src` to the same name (or `dst_rel`) of `dst`: read, then written."""
    dst.write_bytes(dst_rel or rel, src.read_bytes(rel))


def merge_ranges(ranges: Sequence[tuple[str, int, int]], max_bytes: int) -> list[tuple[str, int, int]]:
    """(file, start, end) ranges with those that touch or overlap in one file merged, in file and offset order.

    Touching ranges merge while the result stays within `max_bytes`; overlapping ones always merge (a
    single range longer than `max_bytes` is kept whole). Empty ranges are dropped.
    """
    out: list[tuple[str, int, int]] = []
    for rel, start, end in sorted(r for r in ranges if r[2] > r[1]):
        if out and out[-1][0] == rel and (start < out[-1][2] or (start == out[-1][2] and end - out[-1][1] <= max_bytes)):
            out[-1] = (rel, out[-1][1], max(end, out[-1][2]))  # overlapping ranges always merge
        else:
            out.append((rel, start, end))
    return out


class Fetched:
    """Byte ranges of a store's files already in memory; reads inside them are served from there.

    Duck-types the read side of a Store (read_range, read_into, display) for piece_outputs; a read that no
    fetched range covers goes to the store itself.
    """

    def __init__(self, storage: Any) -> None:
        """Nothing fetched yet (add). `storage`: the Store (or a view standing in for one) reads fall back to."""
        self.storage = storage
        self._spans: dict[str, list[tuple[int, int, bytes]]] = {}

    def add(self, rel: str, start: int, data: bytes) -> None:
        """Hold `data`, the bytes of `rel` from `start` on."""
        bisect.insort(self._spans.setdefault(rel, []), (start, start + len(data), data), key=lambda s: s[0])

    def _find(self, rel: str, start: int, end: int) -> memoryview | None:
        """The fetched bytes [start, end) of `rel`, or None where no one fetched range holds them all."""
        spans = self._spans.get(rel, [])
        i = bisect.bisect_right(spans, start, key=lambda s: s[0]) - 1
        if i >= 0 and spans[i][0] <= start and end <= spans[i][1]:
            lo = spans[i][0]
            return memoryview(spans[i][2])[start - lo : end - lo]
        return None

    def read_range(self, rel: str, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) of `rel`, from memory where fetched."""
        view = self._find(rel, start, end)
        return view if view is not None else self.storage.read_range(rel, start, end)

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on."""
        view = self._find(rel, start, start + out.nbytes)
        if view is None:
            self.storage.read_into(rel, start, out)
        else:
            out[:] = view

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it (the storage's display)."""
        return str(self.storage.display(rel))


def fetch(source: Any, ranges: Sequence[tuple[str, int, int]], max_get: int | None = None) -> Fetched:
    """The bytes of `ranges` ((file, start, end) each) of `source` (a Store, or a view standing in for one), read
    with as few requests as adjacency allows; a Fetched answers read_range / read_into inside them.

    Ranges that touch or overlap in one file are read together, by reads of at most `max_get` bytes (None: the
    settings' s3_get_bytes; a single range larger than that is still one read), each by one read_range. A view
    whose files are not all the store's (convert.formats.chunks.ChunkedView, convert.io.sources.SourcesView)
    fetches by its own `fetch` method, which this calls.
    """
    own = getattr(type(source), "fetch", None)
    if own is not None:
        return own(source, ranges, max_get)
    out = Fetched(source)
    limit = source.settings.s3_get_bytes if max_get is None else max_get
    for rel, start, end in merge_ranges(ranges, limit):
        out.add(rel, start, source.read_range(rel, start, end))
    return out
