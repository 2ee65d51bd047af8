"""The store interface every kind implements, and what all kinds share.

`Storage(url, storage_options, settings)` opens a store: fsspec makes the filesystem, and the first registered
kind (`storage_kind`, then `fallback_kind`) whose `serves` accepts it becomes the object's class. The store keeps
the job's `settings` (convert.settings.StorageSettings: retries, request sizes, the S3 client, local copies; read
from the environment by the entry point when the job starts, never here), or the defaults where none are given.
Callers see the methods and capability flags of `Storage` only; what differs between kinds (local system calls,
S3 requests, fsspec calls) lives in the kinds' classes (local_storage, s3_storage, fsspec_storage beside this
module), so a new kind is a new class, not a branch.

The public read and copy entry points (read_range, read_bytes, copy_range_from) are defined here once and call
the kind's protected hooks (_read, _read_file, _copy_range), so whatever wraps them on Storage sees every kind.
"""

from __future__ import annotations

import bisect
import json
import os
import posixpath
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import fsspec

from convert.errors import (
    ConversionError,
    CredentialsError,
    EndpointUnreachable,
    StorageError,
    credentials_problem,
    reason_of,
    service_error,
    unreachable,
)
from convert.io.pins import Pin, SourcePins
from convert.io.range_stream import RangeReader
from convert.settings import DEFAULT_STORAGE_SETTINGS, StorageSettings

_S = TypeVar("_S", bound="Storage")

T = TypeVar("T")
K = TypeVar("K", bound="type[Storage]")
# Configs and indexes are small (a 90k-tensor index is ~10 MB); anything larger is refused unread.
MAX_JSON_BYTES = 64 << 20
# The store's settings (StorageSettings) size the rest. Object stores (measured with bench.s3; see
# bench/results/S3.md): adjacent source ranges are read by one ranged GET of up to `s3_get_bytes`
# (Storage.fetch's default); a job sends up to `control_threads` requests at once outside its data phase (pins,
# small-file copies): each waits out the store's latency (20-50 ms on S3), so a chain of them in a row costs that
# many times it.


def temp_name(path: str) -> str:
    """A temporary name next to `path`, unique per writer: `<path>.<pid>.<8 random hex>.tmp`."""
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def _is_permanent(exc: BaseException) -> bool:
    """True for errors a retry cannot fix: bad input, missing objects, credentials, 4xx answers but 408/429."""
    if isinstance(exc, (ConversionError, StorageError, FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, TypeError)):  # TypeError: options the filesystem does not take
        return True
    if type(exc).__name__ in ("ParamValidationError", "InvalidRegionError", "InvalidEndpointConfigurationError"):
        return True
    if credentials_problem(exc) or unreachable(exc):
        return True
    answer = service_error(exc)
    if answer is not None:
        return 400 <= answer[0] < 500 and answer[0] not in (408, 429)
    return False


def storage_error(op: str, target: str, exc: BaseException, attempts: int = 1) -> StorageError:
    """`exc` (from an I/O or object-store call doing `op` on `target`) as a StorageError that names both."""
    if isinstance(exc, StorageError):
        return exc
    problem = credentials_problem(exc)
    if problem:
        return CredentialsError(op, target, problem)
    where = unreachable(exc)
    if where:
        return EndpointUnreachable(where[0], target, where[1])
    reason = reason_of(exc)
    if attempts > 1:
        reason = f"failed after {attempts} attempts: {reason}"
    return StorageError(op, target, reason)


def with_retries(op: str, target: str, fn: Callable[[], T], attempts: int = DEFAULT_STORAGE_SETTINGS.retries) -> T:
    """Call `fn`, retrying transient failures (network, 5xx, throttling) with jittered backoff.

    Permanent errors (bad input, missing objects, credentials, 4xx) are raised at once. Every
    failure is raised as a StorageError naming `op` and `target` (ConversionErrors pass as they are).
    """
    for attempt in range(attempts):
        try:
            return fn()
        except ConversionError:
            raise
        except Exception as exc:  # object stores raise many kinds of transient errors
            if _is_permanent(exc) or attempt == attempts - 1:
                raise storage_error(op, target, exc, attempt + 1) from exc
            time.sleep(min(10.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


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
    """Byte ranges of a Storage's files already in memory; reads inside them are served from there.

    Duck-types the read side of Storage (read_range, read_into, display, is_local) for
    piece_outputs; a read that no fetched range covers goes to the storage itself.
    """

    is_local = False

    def __init__(self, storage: Storage) -> None:
        """Nothing fetched yet (add)."""
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
        return self.storage.display(rel)


# The kinds Storage(url) may open, most recently registered first; then those that serve any filesystem.
_KINDS: list[type[Storage]] = []
_FALLBACKS: list[type[Storage]] = []


def storage_kind(kind: K) -> K:
    """Class decorator: make `kind` one that Storage(url) may open. Kinds registered later are asked first, so a
    kind that specializes another is registered after it and wins where both serve."""
    _KINDS.insert(0, kind)
    return kind


def fallback_kind(kind: K) -> K:
    """Class decorator: make `kind` one that Storage(url) opens where no kind registered by storage_kind serves
    the filesystem (convert.io.storage.fsspec_storage.FsspecStorage: any fsspec filesystem)."""
    _FALLBACKS.insert(0, kind)
    return kind


class Storage:
    """One store: a filesystem plus a root directory (a local path or a URL such as s3://b/p).

    `Storage(url, storage_options, settings)` returns an object of the registered kind that serves the URL's
    filesystem (local files, S3, any other fsspec filesystem), tuned by `settings` (StorageSettings; the
    defaults where None). The capability flags below say what a kind can do; callers test them, never the kind.
    """

    # -- capabilities (class attributes each kind sets) ------------------------------------------------------
    #: Every request is a network round trip: callers batch, merge and stream reads, list once instead of
    #: asking file by file; there is no page cache to prefetch into.
    remote: bool = True
    #: path(rel) names a file of this machine's filesystem: os calls, flock and libraries that open a path work.
    local_paths: bool = False
    #: create_sized / pwrite (positional writes into preallocated files) are supported.
    positional_writes: bool = False
    #: mpu_* (multipart uploads) are supported.
    supports_multipart: bool = False
    #: put_if / read_object / delete_if (conditional writes of small objects) are supported.
    conditional_writes: bool = False
    #: Kind flags for modules not yet moved to the capabilities above (convert.formats.checkpoint); prefer those.
    is_local: bool = False
    is_s3: bool = False
    #: Attempts of one operation (_retry): None for the settings' `retries` (object stores retry transient failures).
    _attempts: int | None = None
    url: str  # as the caller gave it
    settings: StorageSettings  # the job's knobs of its stores (convert.settings)
    fs: Any  # the fsspec filesystem
    root: str  # the root directory, as a path of fs

    def __new__(cls: type[_S], url: str, storage_options: Mapping[str, Any] | None = None,
                settings: StorageSettings | None = None) -> _S:
        """Open the store at `url`: the filesystem fsspec makes for it (with `storage_options`, as each kind
        prepares them for `settings`: prepare_options), as the first registered kind (a subclass of `cls`) that
        serves it, keeping `settings` (the defaults where None)."""
        settings = DEFAULT_STORAGE_SETTINGS if settings is None else settings
        options = dict(storage_options or {})
        for kind in (*_KINDS, *_FALLBACKS):
            options = kind.prepare_options(url, options, settings)
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except (ValueError, ImportError, TypeError) as exc:  # unknown protocol, its package not installed, bad options
            raise ConversionError(f"{url}: cannot open ({exc})") from exc
        chosen = next((k for k in (*_KINDS, *_FALLBACKS) if issubclass(k, cls) and k.serves(fs)), None)
        if chosen is None:
            raise ConversionError(f"{url}: cannot open (no kind of store serves {type(fs).__name__})")
        self = object.__new__(chosen)
        self.url, self.fs, self.root = url, fs, root.rstrip("/") or "/"
        self.settings = settings
        return self

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 settings: StorageSettings | None = None) -> None:
        """Set up the kind's own state (__new__ has opened the filesystem: url, fs, root and settings are set)."""

    @classmethod
    def prepare_options(cls, url: str, options: dict[str, Any], settings: StorageSettings) -> dict[str, Any]:
        """The fsspec options to open `url` with, given the caller's and the store's `settings`: each kind adjusts
        those of its own URLs."""
        return options

    @classmethod
    def serves(cls, fs: Any) -> bool:
        """True where this kind handles the fsspec filesystem `fs`."""
        return False

    # -- paths -------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Absolute path (in this filesystem) of `rel` below the root."""
        return posixpath.join(self.root, rel)

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it, for messages."""
        return posixpath.join(self.url.rstrip("/"), rel) if rel else self.url

    def place(self) -> str:
        """The root as one string comparable across stores: equal for one place, a prefix (plus "/") for a place
        inside another (the source and destination must not overlap)."""
        return str(self.fs.unstrip_protocol(self.root))

    def _retry(self, op: str, rel: str, fn: Callable[[], T]) -> T:
        """`fn` under with_retries, with this kind's attempts (one where an error is not transient), else the
        settings' retries."""
        attempts = self.settings.retries if self._attempts is None else self._attempts
        return with_retries(op, self.display(rel), fn, attempts)

    def _error(self, op: str, rel: str, exc: BaseException) -> StorageError:
        """`exc`, raised doing `op` on `rel`, as a StorageError naming both."""
        return storage_error(op, self.display(rel), exc)

    def _forget(self, rel: str) -> None:
        """Drop what the filesystem cached about `rel` (listings), so the next call asks the store."""

    # -- metadata ----------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        """True where the file or directory `rel` exists."""
        self._forget(rel)
        return bool(self._retry("stat", rel, lambda: self.fs.exists(self.path(rel))))

    def isdir(self, rel: str = "") -> bool:
        """True where `rel` is a directory."""
        return bool(self._retry("stat", rel, lambda: self.fs.isdir(self.path(rel))))

    def size(self, rel: str) -> int:
        """Size in bytes of the file `rel`."""
        raise NotImplementedError

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """name -> size in bytes of every file directly below `rel` (one listing)."""
        raise NotImplementedError

    def pin(self, rel: str) -> Pin:
        """What identifies the current content of the file `rel` without reading it: two equal pins mean the
        file was not rewritten in between (each kind says which fields; convert.io.pins.Pin names them all)."""
        raise NotImplementedError

    def pins(self, names: Sequence[str], like: SourcePins | None = None,
             workers: int | None = None, listed: bool = False) -> SourcePins:
        """name -> pin(name) for each of `names`, with as few requests, and as few in a row, as the store allows
        (up to `workers` at once; None: the settings' control_threads).

        `like` (pins taken earlier, to be compared with these) and `listed` (pins this object's own listings
        saw may serve) are hints a kind may use; errors are pin()'s.
        """
        raise NotImplementedError

    def expect(self, pins: SourcePins) -> None:
        """Make every later read of a file of `pins` (name -> pin) conditional on its pin where the store takes
        conditions, so that a file rewritten since fails the read that meets it (SourceChanged) instead of giving
        bytes of another version. Elsewhere nothing (the pins are checked after the reads)."""

    def probe_conditions(self, pins: SourcePins) -> None:
        """Start finding out, in the background, whether the store applies the conditions of expect() (a store
        that ignores them gives no pinned reads: reads_pinned). Nothing where the store takes none."""

    def reads_pinned(self, names: Iterable[str]) -> bool:
        """True where every read of the files `names` was conditional on their pins and the store applies the
        condition (probe_conditions): no check of the pins after the reads is needed."""
        return False

    def if_match(self, rel: str) -> str | None:
        """The ETag a read of `rel` is conditional on, or None."""
        return None

    def raise_if_refused(self, rel: str, exc: BaseException) -> None:
        """Where `exc` is the store's refusal of a read of `rel` made on its pin's condition, raise what it stands
        for (SourceChanged, or a StorageError saying how to read without conditions); else nothing."""

    def list_dir(self, rel: str = "") -> tuple[list[str], list[str]]:
        """(files, subdirectories) directly below `rel`, as names relative to it."""
        files, dirs = [], []
        self._forget(rel)
        entries = self._retry("list", rel, lambda: self.fs.ls(self.path(rel), detail=True))
        for entry in entries:
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry["type"] == "directory":
                dirs.append(name)
            else:
                files.append(name)
                self._saw_file(posixpath.join(rel, name), entry)
        return sorted(files), sorted(dirs)

    def _saw_file(self, rel: str, entry: dict[str, Any]) -> None:
        """list_dir found the file `rel`, described by the fsspec listing entry `entry` (a kind may keep its pin)."""

    # -- reads -------------------------------------------------------------
    def prefetch(self, rel: str, start: int, end: int) -> None:
        """Start reading bytes [start, end) of `rel` into the page cache in the background (local files; a no-op
        where there is none)."""

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file `rel`; short reads are an error naming the file."""
        if end <= start:
            return b""
        data = self._read(rel, start, end)
        if len(data) != end - start:
            raise ConversionError(
                f"{self.display(rel)}: expected {end - start} bytes at offset {start}, got {len(data)} (truncated file?)"
            )
        return data

    def _read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel` (end > start), as many as there are: read_range checks the count."""
        raise NotImplementedError

    def open_range(self, rel: str, start: int, end: int) -> RangeReader:
        """A reader of bytes [start, end) of `rel` in order (readinto), to use as a context manager. Here each of
        its reads is one read_range; a kind that can stream a range by one request returns its own reader."""
        return RangeReader(self, rel, start, end)

    def fetch(self, ranges: Sequence[tuple[str, int, int]], max_get: int | None = None) -> Fetched:
        """The bytes of `ranges` ((file, start, end) each), read with as few requests as adjacency allows.

        Ranges that touch or overlap in one file are read together, by reads of at most `max_get`
        bytes (None: the settings' s3_get_bytes; a single range larger than that is still one read).
        Returns a Fetched that answers read_range / read_into for any byte range inside the fetched ones.
        """
        out = Fetched(self)
        limit = self.settings.s3_get_bytes if max_get is None else max_get
        for rel, start, end in merge_ranges(ranges, limit):
            out.add(rel, start, self.read_range(rel, start, end))
        return out

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on; short reads are an error."""
        out[:] = self.read_range(rel, start, start + out.nbytes)

    def read_bytes(self, rel: str) -> bytes:
        """The whole of a small file (configs, indexes)."""
        return self._read_file(rel)

    def _read_file(self, rel: str) -> bytes:
        """The whole of the file `rel` (read_bytes)."""
        raise NotImplementedError

    def read_json(self, rel: str, limit: int = MAX_JSON_BYTES) -> Any:
        """Parse the small UTF-8 JSON file `rel` (config, index); errors name the file.

        A file larger than `limit` bytes is refused from its size, before any of it is read.
        """
        where = self.display(rel)
        size = self.size(rel)
        if size > limit:
            raise ConversionError(
                f"{where}: {size} bytes, more than the {limit >> 20} MiB a JSON metadata file may have "
                "(expected a small config or index file)"
            )
        raw = self.read_bytes(rel)
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

    # -- writes ------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        """Create the directory `rel` (and those above it) where missing."""
        self._retry("create directory", rel, lambda: self.fs.makedirs(self.path(rel), exist_ok=True))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file, atomically where the filesystem allows."""
        raise NotImplementedError

    def create_sized(self, rel: str, head: bytes, size: int) -> None:
        """Create (or truncate) `rel` as a file of `size` bytes starting with `head` (positional_writes)."""
        self._unsupported("positional writes")

    def pwrite(self, rel: str, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset` of the existing file `rel` (positional_writes)."""
        self._unsupported("positional writes")

    def can_copy_range_from(self, src: Storage) -> bool:
        """True where copy_range_from moves bytes from `src` without handing them through Python objects."""
        return False

    def copy_range_from(self, src: Storage, src_rel: str, src_off: int, dst_rel: str, dst_off: int, n: int) -> None:
        """Copy n bytes from `src` file at `src_off` into our file `dst_rel` at `dst_off`: directly where this kind
        can (can_copy_range_from: see the kind's _copy_range), else read_range + pwrite."""
        if self.can_copy_range_from(src):
            self._copy_range(src, src_rel, src_off, dst_rel, dst_off, n)
        else:
            self.pwrite(dst_rel, dst_off, src.read_range(src_rel, src_off, src_off + n))

    def _copy_range(self, src: Storage, src_rel: str, src_off: int, dst_rel: str, dst_off: int, n: int) -> None:
        """copy_range_from's direct copy (only called where can_copy_range_from(src))."""
        raise NotImplementedError

    def start_writeback(self, rel: str, start: int, end: int) -> None:
        """Ask for bytes [start, end) of our file `rel` to start going to disk now, without waiting (local files
        on Linux; a no-op elsewhere)."""

    def fsync(self, rel: str) -> None:
        """Flush our file `rel` to durable storage (object stores are durable once written: a no-op there)."""

    def rename(self, src_rel: str, dst_rel: str) -> None:
        """Rename the file `src_rel` to `dst_rel` (replacing it)."""
        self.close()
        self._retry(f"rename {self.display(src_rel)} to", dst_rel, lambda: self._move(self.path(src_rel),
                                                                                       self.path(dst_rel)))

    def _move(self, src_path: str, dst_path: str) -> None:
        """rename's one attempt, on absolute paths."""
        self.fs.mv(src_path, dst_path)

    def remove(self, rel: str) -> None:
        """Remove the file `rel`, if it exists."""
        if self.exists(rel):
            self._retry("remove", rel, lambda: self.fs.rm(self.path(rel)))

    def remove_many(self, rels: Sequence[str]) -> None:
        """Remove the files `rels` (those already gone are fine), with as few requests as the store allows (in
        the store's order where one request removes many: call once per group that may go together)."""
        for rel in rels:
            self.remove(rel)

    def remove_tree(self, rel: str) -> None:
        """Remove the directory `rel` and everything below it, if it exists."""
        if self.exists(rel):
            self._retry("remove", rel, lambda: self.fs.rm(self.path(rel), recursive=True))

    def copy_file_from(self, src: Storage, rel: str, dst_rel: str | None = None) -> None:
        """Copy a whole (small) file from `src` to the same name (or `dst_rel`) here: read, then written (a kind
        may copy within one store without the bytes coming through here)."""
        self.write_bytes(dst_rel or rel, src.read_bytes(rel))

    # -- conditional writes: the destination's lock (convert.engine.dest_lock) -------------------------------
    def put_if(self, rel: str, data: bytes, absent: bool = False, etag: str | None = None) -> str:
        """Write the small object `rel` only where none exists (`absent`) or only where it is the version `etag`;
        returns the new version's ETag (conditional_writes)."""
        self._unsupported("conditional writes", "S3 only")

    def read_object(self, rel: str) -> tuple[bytes, str, float | None] | None:
        """(bytes, ETag, seconds since it was last written by the store's clock) of the small object `rel`, or
        None where there is none (conditional_writes)."""
        self._unsupported("conditional writes", "S3 only")

    def delete_if(self, rel: str, etag: str | None) -> None:
        """Remove the object `rel` where it is still the version `etag` (conditional_writes)."""
        self._unsupported("conditional writes", "S3 only")

    # -- multipart uploads ------------------------------------------------------------------------------------
    def mpu_create(self, rel: str) -> str:
        """Start a multipart upload of `rel`; returns its upload id (supports_multipart)."""
        self._unsupported("multipart uploads", "S3 only")

    def mpu_upload_part(self, rel: str, upload_id: str, number: int, data: bytes | bytearray | memoryview) -> str:
        """Upload part `number` (1-based) of `rel`; returns its ETag (supports_multipart)."""
        self._unsupported("multipart uploads", "S3 only")

    def mpu_list_parts(self, rel: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """Parts already uploaded: number -> (ETag, size); empty if the upload no longer exists (supports_multipart)."""
        self._unsupported("multipart uploads", "S3 only")

    def mpu_complete(self, rel: str, upload_id: str, etags: dict[int, str]) -> None:
        """Assemble `rel` from its parts; the object appears only now (supports_multipart)."""
        self._unsupported("multipart uploads", "S3 only")

    def mpu_abort(self, rel: str, upload_id: str) -> None:
        """Abort an upload and free its parts; an upload already gone is fine (supports_multipart)."""
        self._unsupported("multipart uploads", "S3 only")

    def mpu_pending(self, prefix_rel: str = "") -> list[tuple[str, str]]:
        """(key relative to the root, upload id) of every unfinished upload below the root (supports_multipart)."""
        self._unsupported("multipart uploads", "S3 only")

    # -- life cycle -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Set the client up now (credentials, endpoint) rather than at the first request, where there is one; a
        failure here is left for that request to report."""

    def close(self) -> None:
        """Release what this object holds open (file descriptors); it stays usable (they are opened again)."""

    def _unsupported(self, what: str, where: str = "local paths only") -> NoReturn:
        """Raise: `what` is not supported by this kind of store (`where`: the kinds that support it)."""
        raise ConversionError(f"{self.url}: {what} to this filesystem are not supported yet ({where})")
