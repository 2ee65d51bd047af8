"""The shared base of the store kinds, and the kind registry.

`Storage(url, storage_options, settings)` opens a store: fsspec makes the filesystem, and the first registered
kind (`storage_kind`, then `fallback_kind`) whose `serves` accepts it becomes the object's class. The store keeps
the job's `settings` (convert.settings.StorageSettings: retries, request sizes, the S3 client, local copies; read
from the environment by the entry point when the job starts, never here), or the defaults where none are given.
Callers see the protocol of convert.io.storage.store (`Store` and its capability objects) only; `Storage` here is
the base the kinds share (fsspec calls for what no kind does otherwise, retries, error naming). What differs
between kinds (local system calls, S3 requests, fsspec calls) lives in the kinds' classes (local_storage,
s3_storage, fsspec_storage beside this module), with what only some kinds can do (positional writes, multipart
uploads, conditional writes) in capability objects of their own, so a new kind is a new class, not a branch.

The public read entry points (read_range, read_bytes) are defined here once and call the kind's protected hooks
(_read, _read_file), so whatever wraps them on Storage sees every kind.
"""

from __future__ import annotations

import os
import posixpath
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

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
from convert.io.pins import Pin, SourcePinning, SourcePins
from convert.io.range_stream import RangeReader
from convert.io.storage.store import (
    ConditionalObjects,
    MultipartUploads,
    PositionalWrites,
    Store,
    copy_by_reading,
)
from convert.settings import DEFAULT_STORAGE_SETTINGS, StorageSettings

_S = TypeVar("_S", bound="Storage")

T = TypeVar("T")
K = TypeVar("K", bound="type[Storage]")
# The store's settings (StorageSettings) size the rest. Object stores (measured with bench.s3; see
# bench/results/S3.md): adjacent source ranges are read by one ranged GET of up to `s3_get_bytes`
# (convert.io.storage.store.fetch's default); a job sends up to `control_threads` requests at once outside its
# data phase (pins, small-file copies): each waits out the store's latency (20-50 ms on S3), so a chain of them in
# a row costs that many times it.


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
    """One store: a filesystem plus a root directory (a local path or a URL such as s3://b/p); the shared base of
    the kinds, and a Store (convert.io.storage.store).

    `Storage(url, storage_options, settings)` returns an object of the registered kind that serves the URL's
    filesystem (local files, S3, any other fsspec filesystem), tuned by `settings` (StorageSettings; the
    defaults where None). What only some kinds can do is reached through the capability attributes below, an
    object or None; callers test those, never the kind.
    """

    #: Every request is a network round trip (Store.remote); local stores set it False.
    remote: bool = True
    #: The store's source pins (every kind sets its own in __init__).
    pinning: SourcePinning
    #: Positional writes into files of this machine (local stores), multipart uploads and conditional writes of
    #: small objects (S3): None here, an object where a kind can.
    positional: PositionalWrites | None = None
    multipart: MultipartUploads | None = None
    conditional: ConditionalObjects | None = None
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

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on; short reads are an error."""
        out[:] = self.read_range(rel, start, start + out.nbytes)

    def read_bytes(self, rel: str) -> bytes:
        """The whole of a small file (configs, indexes)."""
        return self._read_file(rel)

    def _read_file(self, rel: str) -> bytes:
        """The whole of the file `rel` (read_bytes)."""
        raise NotImplementedError

    # -- writes ------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        """Create the directory `rel` (and those above it) where missing."""
        self._retry("create directory", rel, lambda: self.fs.makedirs(self.path(rel), exist_ok=True))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file, atomically where the filesystem allows."""
        raise NotImplementedError

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

    def copy_file_from(self, src: Store, rel: str, dst_rel: str | None = None) -> None:
        """Copy a whole (small) file from `src` to the same name (or `dst_rel`) here: read, then written (a kind
        may copy within one store without the bytes coming through here)."""
        copy_by_reading(src, self, rel, dst_rel)

    # -- life cycle -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Set the client up now (credentials, endpoint) rather than at the first request, where there is one; a
        failure here is left for that request to report."""

    def close(self) -> None:
        """Release what this object holds open (file descriptors); it stays usable (they are opened again)."""


class Pinning:
    """The source pins of a store whose reads take no conditions (local files, fsspec filesystems): pins are
    checked after the reads (reads_pinned is False). The kinds say how a pin is taken (pin, pins)."""

    def __init__(self, store: Storage) -> None:
        """The pins of `store`'s files."""
        self.store = store

    def pin(self, rel: str) -> Pin:
        """What identifies the current content of the file `rel` without reading it: two equal pins mean the
        file was not rewritten in between (each kind says which fields; convert.io.pins.Pin names them all)."""
        raise NotImplementedError

    def pins(self, names: Sequence[str], like: SourcePins | None = None,
             workers: int | None = None, listed: bool = False) -> SourcePins:
        """name -> pin(name) for each of `names`, with as few requests, and as few in a row, as the store allows
        (up to `workers` at once; None: the settings' control_threads).

        `like` (pins taken earlier, to be compared with these) and `listed` (pins the store's own listings saw
        may serve) are hints a kind may use; errors are pin()'s.
        """
        raise NotImplementedError

    def expect(self, pins: SourcePins) -> None:
        """Nothing: the store takes no conditions on reads (the pins are checked after the reads)."""

    def probe_conditions(self, pins: SourcePins) -> None:
        """Nothing: the store takes no conditions on reads."""

    def reads_pinned(self, names: Iterable[str]) -> bool:
        """False: no read was held to a pin, the pins are checked after the reads."""
        return False
