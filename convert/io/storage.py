"""All byte I/O of the tool, behind fsspec: ranged reads, positional writes, small files.

Local paths get fast paths (pread/pwrite on cached descriptors, a bounded-buffer copy
loop or `os.copy_file_range`); any other fsspec URL goes through the filesystem's own calls.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from convert.errors import (
    ConversionError, CredentialsError, EndpointUnreachable, SourceChanged, StorageError, credentials_problem,
    reason_of, service_error, unreachable,
)

T = TypeVar("T")
RETRIES = int(os.environ.get("MOE_CONVERT_RETRIES", "8"))
LOCAL_COPY = os.environ.get("MOE_CONVERT_LOCAL_COPY", "buffered")  # or "kernel": copy_file_range
COPY_BUFFER_BYTES = 1 << 20
# Configs and indexes are small (a 90k-tensor index is ~10 MB); anything larger is refused unread.
MAX_JSON_BYTES = 64 << 20
WRITE_BEHIND = os.environ.get("MOE_CONVERT_WRITE_BEHIND", "1") != "0"
_SYNC_FILE_RANGE_WRITE = 2
# Object stores (measured with bench.s3; see bench/results/S3.md): adjacent source ranges are read by one
# ranged GET of up to S3_GET_BYTES; the client keeps up to S3_POOL connections (it must not be smaller than
# the requests a process has in flight, or they queue); botocore retries throttling in S3_RETRY_MODE.
S3_GET_BYTES = int(os.environ.get("MOE_CONVERT_S3_GET_BYTES", 32 << 20))
# Byte copies into local files stream each request's body (convert.io.range_stream), so its size costs no
# memory: one request reads up to this many bytes (a rank's spans come in whole rounds of --workers; 64 MiB
# gave 329 MB on 4 workers 6 spans, the last 2 read while the others' workers idled: bench.s3trace).
S3_STREAM_BYTES = int(os.environ.get("MOE_CONVERT_S3_STREAM_BYTES", 256 << 20))
S3_POOL = int(os.environ.get("MOE_CONVERT_S3_POOL", 64))
S3_RETRY_MODE = os.environ.get("MOE_CONVERT_S3_RETRY_MODE", "standard")
# Reads of an S3 source are conditional on the ETag the plan pinned (If-Match); 0 turns that off for a store that
# refuses the condition, and the source is then checked by a listing after the data instead.
S3_CONDITIONAL_READS = os.environ.get("MOE_CONVERT_S3_CONDITIONAL_READS", "1") != "0"
S3_RETRY_ATTEMPTS = int(os.environ.get("MOE_CONVERT_S3_RETRY_ATTEMPTS", 5))
_thread_state = threading.local()
# Fields of fsspec's info() that identify an object's content (S3, GCS, Azure); times where there is none.
PIN_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash")
PIN_TIME_KEYS = ("LastModified", "last_modified", "mtime", "updated")
# Object-store requests a job sends at once outside its data phase (pins, small-file copies): each
# waits out the store's latency (20-50 ms on S3), so a chain of them in a row costs that many times it.
PIN_WORKERS = int(os.environ.get("MOE_CONVERT_CONTROL_THREADS", 16))


def _etag(pin: Mapping[str, Any]) -> str | None:
    """The ETag of a pin (Storage.pin), or None."""
    etag = pin.get("ETag") or pin.get("etag")
    return str(etag) if etag else None


def _pin_of(info: dict[str, Any]) -> dict[str, Any]:
    """Storage.pin's fields of an fsspec info() or ls(detail=True) entry: size, then identity or time fields."""
    pin: dict[str, Any] = {"size": int(info.get("size") or 0)}
    for keys in (PIN_KEYS, PIN_TIME_KEYS):
        pin.update({k: str(info[k]) for k in keys if info.get(k) not in (None, "")})
        if len(pin) > 1:
            break
    return pin


def temp_name(path: str) -> str:
    """A temporary name next to `path`, unique per writer: `<path>.<pid>.<8 random hex>.tmp`."""
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library, or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range() if WRITE_BEHIND else None


def _copy_buffer() -> memoryview:
    """This thread's copy buffer (small enough to stay in the CPU cache between pread and pwrite)."""
    buf = getattr(_thread_state, "buf", None)
    if buf is None:
        buf = _thread_state.buf = memoryview(bytearray(COPY_BUFFER_BYTES))
    return buf


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


def with_retries(op: str, target: str, fn: Callable[[], T], attempts: int = RETRIES) -> T:
    """Call `fn`, retrying transient failures (network, 5xx, throttling) with jittered backoff.

    Permanent errors (bad input, missing objects, credentials, 4xx) are raised at once. Every
    failure is raised as a StorageError naming `op` and `target` (ConversionErrors pass as they are).
    """
    for attempt in range(attempts):
        try:
            return fn()
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001 - object stores raise many kinds of transient errors
            if _is_permanent(exc) or attempt == attempts - 1:
                raise storage_error(op, target, exc, attempt + 1) from exc
            time.sleep(min(10.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _no_retry_when_unreachable(caught_exception: BaseException | None = None, **_: Any) -> None:
    """botocore's needs-retry hook: an endpoint that refused the connection or whose host does not resolve
    (convert.errors.unreachable) fails the request at once, instead of after its retries' backoff (seconds each,
    then the tool's own): nothing changes between attempts."""
    if caught_exception is not None and unreachable(caught_exception):
        raise caught_exception


def fail_fast_when_unreachable(fs: Any) -> None:
    """Make the S3 client of s3fs filesystem `fs` (made now or later) skip botocore's retries of a request whose
    endpoint cannot be reached (_no_retry_when_unreachable); its other retries (5xx, throttling, timeouts, resets)
    are kept. Idempotent: fsspec hands out one cached filesystem per set of options."""
    if getattr(fs, "_moe_convert_fail_fast", False):
        return
    hook = {"handler": _no_retry_when_unreachable, "unique_id": "moe-convert-unreachable"}
    if getattr(fs, "_s3", None) is not None:  # a client made already
        fs._s3.meta.events.register("needs-retry.s3", **hook)
    if getattr(fs, "session", None) is None:  # the session s3fs would make, with the hook: clients made from it have it
        import aiobotocore.session

        fs.session = aiobotocore.session.AioSession(**(getattr(fs, "kwargs", None) or {}))
        fs._session_is_owned = False  # kept when s3fs remakes its client (else it would make a session without the hook)
    fs.session.register("needs-retry.s3", **hook)
    fs._moe_convert_fail_fast = True


def _server_age(last_modified: Any, date_header: str | None) -> float | None:
    """Seconds from an object's LastModified to the Date of the store's answer (both the store's clock), or None."""
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    if not isinstance(last_modified, datetime) or not date_header:
        return None
    try:
        return max(0.0, (parsedate_to_datetime(date_header) - last_modified).total_seconds())
    except (TypeError, ValueError):
        return None


def _no_such_upload(exc: BaseException) -> bool:
    """True when `exc` is S3's answer that a multipart upload no longer exists."""
    answer = service_error(exc)
    return (answer is not None and answer[1] == "NoSuchUpload") or "NoSuchUpload" in repr(exc.__cause__ or exc)


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

    def __init__(self, storage: "Storage") -> None:
        self.storage = storage
        self._spans: dict[str, list[tuple[int, int, bytes]]] = {}

    def add(self, rel: str, start: int, data: bytes) -> None:
        """Hold `data`, the bytes of `rel` from `start` on."""
        bisect.insort(self._spans.setdefault(rel, []), (start, start + len(data), data), key=lambda s: s[0])

    def _find(self, rel: str, start: int, end: int) -> memoryview | None:
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
        return self.storage.display(rel)


class Storage:
    """One fsspec filesystem plus a root directory (a local path or a URL such as s3://b/p)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        options = dict(storage_options or {})
        if url.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL") and "endpoint_url" not in options \
                and "endpoint_url" not in (options.get("client_kwargs") or {}):
            # fsspec caches filesystems by their arguments: name the endpoint, so a client made for another
            # endpoint (same process, AWS_ENDPOINT_URL changed since) is never reused.
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        if url.startswith(("s3://", "s3a://")):
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("max_pool_connections", S3_POOL)
            config.setdefault("retries", {"mode": S3_RETRY_MODE, "max_attempts": S3_RETRY_ATTEMPTS})
            options["config_kwargs"] = config
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ValueError, ImportError, TypeError) as exc:  # unknown protocol, its package not installed, bad options
            raise ConversionError(f"{url}: cannot open ({exc})") from exc
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_s3:
            fail_fast_when_unreachable(self.fs)
        self._fds: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._listed: dict[str, dict[str, Any]] = {}  # object stores: file -> pin, as this object's listings saw it
        self._expect: dict[str, dict[str, Any]] = {}  # S3: file -> the pin every read of it is conditional on
        self._unverified: set[str] = set()  # files copied server-side: their pins are still checked after
        self._applies_conditions: Future[bool] | None = None  # probe_conditions' answer

    # -- paths -------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Absolute path (in this filesystem) of `rel` below the root."""
        return posixpath.join(self.root, rel)

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it, for messages."""
        return posixpath.join(self.url.rstrip("/"), rel) if rel else self.url

    def _retry(self, op: str, rel: str, fn: Callable[[], T]) -> T:
        """`fn` under with_retries for object stores; once for local paths (a local error is not transient)."""
        return with_retries(op, self.display(rel), fn, 1 if self.is_local else RETRIES)

    def _error(self, op: str, rel: str, exc: BaseException) -> StorageError:
        return storage_error(op, self.display(rel), exc)

    # -- metadata ----------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        if not self.is_local:
            self.fs.invalidate_cache(self.path(rel))
        return bool(self._retry("stat", rel, lambda: self.fs.exists(self.path(rel))))

    def isdir(self, rel: str = "") -> bool:
        return bool(self._retry("stat", rel, lambda: self.fs.isdir(self.path(rel))))

    def size(self, rel: str) -> int:
        """Size in bytes of the file `rel`."""
        if self.is_local:
            return self._retry("stat", rel, lambda: os.stat(self.path(rel)).st_size)
        return int(self._retry("stat", rel, lambda: self.fs.size(self.path(rel))))

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """name -> size in bytes of every file directly below `rel` (one listing)."""
        if self.is_local:
            def scan() -> dict[str, int]:
                with os.scandir(self.path(rel)) as it:
                    return {e.name: e.stat().st_size for e in it if e.is_file(follow_symlinks=False)}
            return self._retry("list", rel, scan)
        self.fs.invalidate_cache(self.path(rel))
        entries = self._retry("list", rel, lambda: self.fs.ls(self.path(rel), detail=True))
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e["type"] != "directory"}

    def pin(self, rel: str) -> dict[str, Any]:
        """What identifies the current content of the file `rel` without reading it.

        Local: size, mtime_ns, ctime_ns and inode (an in-place rewrite changes mtime/ctime, a
        replacement the inode). Object stores: size plus the ETag / version / generation fields
        the filesystem reports (its modification time where it reports none of them). Two equal
        pins mean the file was not rewritten in between.
        """
        if self.is_local:
            st = self._retry("stat", rel, lambda: os.stat(self.path(rel)))
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
        self.fs.invalidate_cache(self.path(rel))
        return _pin_of(self._retry("stat", rel, lambda: self.fs.info(self.path(rel))))

    def pins(self, names: Sequence[str], like: dict[str, dict[str, Any]] | None = None,
             workers: int = PIN_WORKERS, listed: bool = False) -> dict[str, dict[str, Any]]:
        """name -> pin(name) for each of `names`, with as few requests, and as few in a row, as the store allows.

        S3: one listing per directory gives size and ETag of every file in it (what pin() takes from
        a HEAD); a file the listing does not show, or whose pin in `like` (pins taken earlier, to be
        compared with these) holds a field a listing has not (a VersionId), gets its own pin(), up
        to `workers` at once. Errors are pin()'s: a missing file raises as pin() does. With `listed`,
        pins this object's own earlier listings (list_dir) saw serve without a request: for a job's plan,
        whose listing found the very files it pins (a change after it is still a change).
        """
        names = sorted(set(names))
        if self.is_local:
            return {n: self.pin(n) for n in names}
        if listed and all(n in self._listed for n in names):
            return {n: dict(self._listed[n]) for n in names}
        found: dict[str, dict[str, Any]] = {}
        if self.is_s3:
            for parent in sorted({posixpath.dirname(n) for n in names}):
                try:
                    files, _ = self.list_dir(parent)  # records each file's pin (self._listed)
                except OSError:
                    continue  # each file's own pin() below names the problem
                found.update({n: self._listed[n] for n in (posixpath.join(parent, f) for f in files)})
        rest = [n for n in names if n not in found or set((like or {}).get(n, {})) - set(found[n])]
        if rest:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(rest)))) as pool:
                found.update(zip(rest, pool.map(self.pin, rest)))
        return {n: found[n] for n in names}

    def expect(self, pins: Mapping[str, Mapping[str, Any]]) -> None:
        """Make every later read of a file of `pins` (name -> pin) conditional on its pinned ETag where the store
        takes conditions (S3: If-Match), so that a file rewritten since fails the read that meets it
        (SourceChanged) instead of giving bytes of another version. Reads of files this object's own listing saw
        are conditional on the ETag it saw."""
        if self.is_s3:
            self._expect.update({n: dict(p) for n, p in pins.items() if _etag(p)})

    def probe_conditions(self, pins: Mapping[str, Mapping[str, Any]]) -> None:
        """S3: start asking, in the background, whether the store applies If-Match to reads: one GET of the first
        byte of a non-empty file of `pins` on an ETag no object has, which such a store refuses (HTTP 412). Until
        it has answered so, no read counts as pinned (reads_pinned): a store that ignores the condition would
        hand out bytes of a file rewritten during the job."""
        rel = next((n for n, pin in pins.items() if pin.get("size")), None)
        if self.is_s3 and S3_CONDITIONAL_READS and self._applies_conditions is None and rel is not None:
            pool = ThreadPoolExecutor(max_workers=1)
            self._applies_conditions = pool.submit(self._refuses_unmet_condition, rel)
            pool.shutdown(wait=False)

    def _refuses_unmet_condition(self, rel: str) -> bool:
        """True where a GET of `rel`'s first byte on an unmet If-Match is refused with 412; False where it is
        answered, or fails otherwise (the reads are then checked by a listing after them, as unconditional)."""
        from fsspec.asyn import sync

        async def get() -> None:
            (await self.ranged_get(rel, 0, 1, etag='"moe-convert-probe"')).close()

        try:
            sync(self.fs.loop, get)
        except Exception as exc:  # noqa: BLE001 - any answer but 412 means: do not rely on the condition
            answer = service_error(exc)
            return answer is not None and (answer[0] == 412 or answer[1] == "PreconditionFailed")
        return False

    def reads_pinned(self, names: Iterable[str]) -> bool:
        """True where every read of the files `names` was conditional on their pins (expect, or this object's
        listing) and the store applies the condition (probe_conditions): no check of the pins after the reads
        is needed."""
        if not self.is_s3 or self._applies_conditions is None or not self._applies_conditions.result():
            return False
        return all(self.if_match(n) and n not in self._unverified for n in names)

    def _read_pin(self, rel: str) -> Mapping[str, Any] | None:
        """The pin a read of `rel` is conditional on (expect, else this object's listing), or None (also where
        MOE_CONVERT_S3_CONDITIONAL_READS=0)."""
        if not S3_CONDITIONAL_READS:
            return None
        return self._expect.get(rel) or self._listed.get(rel)

    def if_match(self, rel: str) -> str | None:
        """The ETag a read of `rel` is conditional on (_read_pin), or None."""
        pin = self._read_pin(rel)
        return _etag(pin) if pin else None

    def raise_if_refused(self, rel: str, exc: BaseException) -> None:
        """Where `exc` is the store's refusal of a read of `rel` made on its pin's condition, raise what it stands
        for: SourceChanged where the file changed (HTTP 412); a StorageError saying how to read without conditions
        where the store does not implement them (HTTP 501, S3's answer to a header it does not take)."""
        answer = service_error(exc)
        if answer is None:
            return
        if answer[0] == 412 or answer[1] == "PreconditionFailed":
            raise SourceChanged(f"source file {self.display(rel)} changed during the conversion (its ETag is no "
                                f"longer {self.if_match(rel)})") from None
        if (answer[0] == 501 or answer[1] == "NotImplemented") and self.if_match(rel):
            raise StorageError("read", self.display(rel), f"{reason_of(exc)}; this store does not take If-Match, "
                               "on which every read of a source is made: set MOE_CONVERT_S3_CONDITIONAL_READS=0") \
                from None

    def list_dir(self, rel: str = "") -> tuple[list[str], list[str]]:
        """(files, subdirectories) directly below `rel`, as names relative to it."""
        files, dirs = [], []
        if not self.is_local:
            self.fs.invalidate_cache(self.path(rel))
        entries = self._retry("list", rel, lambda: self.fs.ls(self.path(rel), detail=True))
        for entry in entries:
            name = posixpath.basename(entry["name"].rstrip("/"))
            (dirs if entry["type"] == "directory" else files).append(name)
            if self.is_s3 and entry["type"] != "directory":
                self._listed[posixpath.join(rel, name)] = _pin_of(entry)
        return sorted(files), sorted(dirs)

    # -- reads -------------------------------------------------------------
    def _fd(self, rel: str, flags: int) -> int:
        key = (rel, flags)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(self.path(rel), flags)
                if flags == os.O_RDONLY:
                    # No speculative readahead past what we ask for (it would read other ranks' experts);
                    # prefetch() announces exactly the ranges about to be read instead.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[key] = fd
            return fd

    def prefetch(self, rel: str, start: int, end: int) -> None:
        """Start reading bytes [start, end) of `rel` into the page cache in the background (local files)."""
        if self.is_local and end > start:
            try:
                os.posix_fadvise(self._fd(rel, os.O_RDONLY), start, end - start, os.POSIX_FADV_WILLNEED)
            except OSError as exc:
                raise self._error("read", rel, exc) from exc

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file `rel`; short reads are an error naming the file."""
        if end <= start:
            return b""
        if self.is_local:
            chunks, pos = [], start
            try:
                fd = self._fd(rel, os.O_RDONLY)
                while pos < end:
                    chunk = os.pread(fd, end - pos, pos)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    pos += len(chunk)
            except OSError as exc:
                raise self._error("read", rel, exc) from exc
            data = b"".join(chunks)
        elif self.if_match(rel):
            data = self._read_pinned(rel, start, end)
        else:
            data = self._retry(
                "read", rel, lambda: self.fs.cat_file(self.path(rel), start=start, end=end),
            )
        if len(data) != end - start:
            raise ConversionError(
                f"{self.display(rel)}: expected {end - start} bytes at offset {start}, got {len(data)} (truncated file?)"
            )
        return data

    async def ranged_get(self, rel: str, start: int, end: int, etag: str | None = None) -> Any:
        """S3 (await on fs.loop): the body of one GET of bytes [start, end) of `rel`, conditional on `etag`, else on
        its pin where there is one (if_match); the caller reads and closes it."""
        from s3fs.core import version_id_kw

        bucket, key, version = self.fs.split_path(self.path(rel))
        etag = etag or self.if_match(rel)
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                      **version_id_kw(version), **({"IfMatch": etag} if etag else {}))
        return resp["Body"]

    def _read_pinned(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel` by one GET conditional on its pin (If-Match: SourceChanged where it changed)."""
        from fsspec.asyn import sync

        async def get() -> bytes:
            body = await self.ranged_get(rel, start, end)
            try:
                return bytes(await body.read())
            finally:
                body.close()

        def attempt() -> bytes:
            try:
                return sync(self.fs.loop, get)
            except Exception as exc:  # noqa: BLE001 - a refused condition is told apart from other errors
                self.raise_if_refused(rel, exc)
                raise

        return self._retry("read", rel, attempt)

    def fetch(self, ranges: Sequence[tuple[str, int, int]], max_get: int = S3_GET_BYTES) -> "Fetched":
        """The bytes of `ranges` ((file, start, end) each), read with as few requests as adjacency allows.

        Ranges that touch or overlap in one file are read together, by reads of at most `max_get`
        bytes (a single range larger than that is still one read). Returns a Fetched that answers
        read_range / read_into for any byte range inside the fetched ones.
        """
        out = Fetched(self)
        for rel, start, end in merge_ranges(ranges, max_get):
            out.add(rel, start, self.read_range(rel, start, end))
        return out

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on (local files: straight into it); short reads are an error."""
        n = out.nbytes
        if not self.is_local:
            out[:] = self.read_range(rel, start, start + n)
            return
        done = 0
        while done < n:
            try:
                got = os.preadv(self._fd(rel, os.O_RDONLY), [out[done:]], start + done)
            except OSError as exc:
                raise self._error("read", rel, exc) from exc
            if got <= 0:
                raise ConversionError(
                    f"{self.display(rel)}: expected {n} bytes at offset {start}, got {done} (truncated file?)"
                )
            done += got

    def read_bytes(self, rel: str) -> bytes:
        """The whole of a small file (configs, indexes)."""
        if self.is_local:
            def read() -> bytes:
                with open(self.path(rel), "rb") as f:
                    return f.read()
            return self._retry("read", rel, read)
        pin = self._read_pin(rel)
        if pin and _etag(pin):
            return self._read_pinned(rel, 0, int(pin["size"])) if int(pin["size"]) else b""
        return self._retry("read", rel, lambda: self.fs.cat_file(self.path(rel)))

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
        self._retry("create directory", rel, lambda: self.fs.makedirs(self.path(rel), exist_ok=True))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file atomically where the filesystem allows (temp name + rename).

        The temp name is unique per writer (`temp_name`), so two jobs or threads writing the same
        file never share one; it is removed again if the write fails.
        """
        if self.is_local:
            tmp = temp_name(self.path(rel))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path(rel))
            except BaseException as exc:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                if isinstance(exc, OSError):
                    raise self._error("write", rel, exc) from exc
                raise
        else:
            self._retry("write", rel, lambda: self.fs.pipe_file(self.path(rel), data))

    def create_sized(self, rel: str, head: bytes, size: int) -> None:
        """Create (or truncate) `rel` as a file of `size` bytes starting with `head`."""
        self._require_local("positional writes")
        try:
            with open(self.path(rel), "wb") as f:
                f.write(head)
                f.truncate(size)
        except OSError as exc:
            raise self._error("create", rel, exc) from exc

    def pwrite(self, rel: str, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset` of the existing file `rel`."""
        self._require_local("positional writes")
        view = memoryview(data)
        try:
            fd = self._fd(rel, os.O_WRONLY)
            while view.nbytes:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise self._error("write", rel, exc) from exc

    def copy_range_from(self, src: "Storage", src_rel: str, src_off: int, dst_rel: str, dst_off: int, n: int) -> None:
        """Copy n bytes from `src` file at `src_off` into our file `dst_rel` at `dst_off`.

        Local to local: through a reused 1 MiB buffer per thread (pread into it, pwrite from it),
        or with `copy_file_range` when MOE_CONVERT_LOCAL_COPY=kernel. On ext4 (no copy offload)
        copy_file_range is an in-kernel splice that costs ~1.5x the CPU of the buffered loop
        (measured by bench.run); choose it where the filesystem offloads copies (NFS >= 4.2
        server-side copy, reflinks). Anything else: read_range + pwrite.
        """
        if src.is_local and self.is_local:
            reading = True  # which side an OSError came from, for its message
            try:
                sfd = src._fd(src_rel, os.O_RDONLY)
                reading = False
                dfd = self._fd(dst_rel, os.O_WRONLY)
                if LOCAL_COPY == "kernel" and hasattr(os, "copy_file_range"):
                    while n:
                        done = os.copy_file_range(sfd, dfd, n, src_off, dst_off)
                        if done <= 0:
                            raise ConversionError(f"{src.display(src_rel)}: unexpected end of file at offset {src_off}")
                        n, src_off, dst_off = n - done, src_off + done, dst_off + done
                    return
                buf = _copy_buffer()
                while n:
                    reading = True
                    got = os.preadv(sfd, [buf[: min(len(buf), n)]], src_off)
                    if got <= 0:
                        raise ConversionError(f"{src.display(src_rel)}: unexpected end of file at offset {src_off}")
                    reading = False
                    put = 0
                    while put < got:
                        put += os.pwrite(dfd, buf[put:got], dst_off + put)
                    n, src_off, dst_off = n - got, src_off + got, dst_off + got
            except OSError as exc:
                if reading:
                    raise src._error("read", src_rel, exc) from exc
                # copy_file_range does both: name the destination (where ENOSPC, EROFS, EDQUOT arise)
                raise self._error("write", dst_rel, exc) from exc
            return
        self.pwrite(dst_rel, dst_off, src.read_range(src_rel, src_off, src_off + n))

    def start_writeback(self, rel: str, start: int, end: int) -> None:
        """Ask the kernel to start writing bytes [start, end) of our file `rel` to disk now, without waiting.

        Keeps the disk busy while later bytes are produced, so the closing fsync finds little
        left to flush (a 441 MB write + fsync took 0.33 s, 0.24 s with this every 8 MB, on
        ext4). Local files on Linux only; elsewhere (or with MOE_CONVERT_WRITE_BEHIND=0) a no-op.
        """
        if self.is_local and _sync_file_range is not None and end > start:
            _sync_file_range(self._fd(rel, os.O_WRONLY), start, end - start, _SYNC_FILE_RANGE_WRITE)

    def fsync(self, rel: str) -> None:
        """Flush our local file `rel` to disk (object stores are durable once written: a no-op there)."""
        if self.is_local:
            try:
                os.fsync(self._fd(rel, os.O_WRONLY))
            except OSError as exc:
                raise self._error("write (fsync)", rel, exc) from exc

    def rename(self, src_rel: str, dst_rel: str) -> None:
        self.close()
        op = f"rename {self.display(src_rel)} to"
        if self.is_local:
            self._retry(op, dst_rel, lambda: os.replace(self.path(src_rel), self.path(dst_rel)))
        else:
            self._retry(op, dst_rel, lambda: self.fs.mv(self.path(src_rel), self.path(dst_rel)))

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self._retry("remove", rel, lambda: self.fs.rm(self.path(rel)))

    def remove_many(self, rels: Sequence[str]) -> None:
        """Remove the files `rels` (those already gone are fine): on S3 by one DeleteObjects request per
        1000 keys (their order is then S3's: call once per group that may go together), elsewhere one by one."""
        rels = list(rels)
        if not rels:
            return
        if not self.is_s3:
            for rel in rels:
                self.remove(rel)
            return
        for i in range(0, len(rels), 1000):
            batch = rels[i : i + 1000]
            bucket, _, _ = self.fs.split_path(self.path(batch[0]))
            keys = [{"Key": self.fs.split_path(self.path(r))[1]} for r in batch]
            resp = with_retries("remove", self.display(batch[0]), lambda: self.fs.call_s3(
                "delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True}))
            for rel in batch:
                self.fs.invalidate_cache(self.path(rel))
            errors = resp.get("Errors") or []
            if errors:
                e = errors[0]
                raise StorageError("remove", f"s3://{bucket}/{e.get('Key', '')}", f"{e.get('Code')}: {e.get('Message')}")

    def remove_tree(self, rel: str) -> None:
        """Remove the directory `rel` and everything below it, if it exists."""
        if self.exists(rel):
            self._retry("remove", rel, lambda: self.fs.rm(self.path(rel), recursive=True))

    def copy_file_from(self, src: "Storage", rel: str, dst_rel: str | None = None) -> None:
        """Copy a whole (small) file from `src` to the same name (or `dst_rel`) here: within one object store
        (the same endpoint and credentials) by a server-side copy, one request; else read, then written."""
        if self.is_s3 and src.fs is self.fs:
            bucket, key, _ = self.fs.split_path(src.path(rel))
            etag = src.if_match(rel)
            try:
                self._s3("copy to", "copy_object", dst_rel or rel, CopySource={"Bucket": bucket, "Key": key},
                         **({"CopySourceIfMatch": etag} if etag else {}))
            except StorageError as exc:  # e.g. an object above the store's single-copy limit: the bytes go through here
                src.raise_if_refused(rel, exc)
            else:
                # Not every store applies the condition (moto does not), and the copy's ETag cannot tell (under
                # SSE-KMS no ETag is its bytes' MD5): the file's pin is checked after the data, as before.
                src._unverified.add(rel)
                return
        self.write_bytes(dst_rel or rel, src.read_bytes(rel))

    # -- conditional writes (S3): the destination's lock (convert.engine.dest_lock) ----------------------------
    def put_if(self, rel: str, data: bytes, absent: bool = False, etag: str | None = None) -> str:
        """S3: write the small object `rel` only where none exists (`absent`: If-None-Match: *) or only where it is the
        version `etag` (If-Match); returns the new ETag. A condition not met fails (HTTP 412, or 409 where another
        conditional write of it is under way; If-Match on a missing object: 404), with the answer in the error's
        chain (convert.errors.service_error)."""
        condition = {"IfNoneMatch": "*"} if absent else {"IfMatch": etag}
        try:
            return str(self._s3("write", "put_object", rel, Body=data, **condition)["ETag"])
        finally:
            self.fs.invalidate_cache(self.path(rel))

    def read_object(self, rel: str) -> tuple[bytes, str, float | None] | None:
        """S3: (bytes, ETag, seconds since it was last written by the store's own clock: its Date against the
        object's LastModified) of the small object `rel`, or None where there is none."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path(rel))

        async def get() -> tuple[bytes, str, float | None]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data = bytes(await body.read())
            finally:
                body.close()
            date = (resp.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
            return data, str(resp.get("ETag", "")), _server_age(resp.get("LastModified"), date)

        def attempt() -> tuple[bytes, str, float | None] | None:
            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None
            except Exception as exc:  # noqa: BLE001 - a missing object is an answer, not an error
                answer = service_error(exc)
                if answer and (answer[0] == 404 or answer[1] in ("NoSuchKey", "NotFound")):
                    return None
                raise

        return self._retry("read", rel, attempt)

    def delete_if(self, rel: str, etag: str | None) -> None:
        """S3: remove the object `rel` where it is still the version `etag` (If-Match; unconditionally where the store
        takes no condition on a delete). Another version, or none, is left as it is."""
        try:
            self._s3("remove", "delete_object", rel, **({"IfMatch": etag} if etag else {}))
        except OSError as exc:
            answer = service_error(exc)
            if answer and (answer[0] == 501 or answer[1] == "NotImplemented"):
                self._s3("remove", "delete_object", rel)
            elif not answer or not (answer[0] in (404, 412) or answer[1] in ("PreconditionFailed", "NoSuchKey")):
                raise
        finally:
            self.fs.invalidate_cache(self.path(rel))

    # -- multipart uploads (object stores) ----------------------------------
    @property
    def is_s3(self) -> bool:
        """True where the S3 API itself is at hand (s3fs): batched deletes, server-side copies, multipart uploads."""
        return hasattr(self.fs, "call_s3") and hasattr(self.fs, "split_path")

    @property
    def supports_multipart(self) -> bool:
        return self.is_s3

    def _s3(self, what: str, method: str, rel: str, **kwargs: Any) -> Any:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return with_retries(what, self.display(rel), lambda: self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs))

    def mpu_create(self, rel: str) -> str:
        """Start a multipart upload of `rel`; returns its upload id."""
        return str(self._s3("start upload of", "create_multipart_upload", rel)["UploadId"])

    def mpu_upload_part(self, rel: str, upload_id: str, number: int, data: bytes | bytearray | memoryview) -> str:
        """Upload part `number` (1-based) of `rel`; returns its ETag."""
        body = data if isinstance(data, (bytes, bytearray)) else bytes(data)  # a copy only where needed
        resp = self._s3(f"upload part {number} of", "upload_part", rel, UploadId=upload_id, PartNumber=number, Body=body)
        return str(resp["ETag"])

    def mpu_list_parts(self, rel: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """Parts already uploaded: number -> (ETag, size). Empty if the upload no longer exists."""
        out: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                resp = self._s3("list parts of", "list_parts", rel, UploadId=upload_id, PartNumberMarker=marker)
            except OSError as exc:
                if _no_such_upload(exc):
                    return {}
                raise
            for p in resp.get("Parts", []):
                out[int(p["PartNumber"])] = (str(p["ETag"]), int(p["Size"]))
            if not resp.get("IsTruncated"):
                return out
            marker = int(resp["NextPartNumberMarker"])

    def mpu_complete(self, rel: str, upload_id: str, etags: dict[int, str]) -> None:
        """Assemble `rel` from its parts; the object appears only now."""
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        self._s3("complete upload of", "complete_multipart_upload", rel, UploadId=upload_id,
                 MultipartUpload={"Parts": parts})
        self.fs.invalidate_cache(self.path(rel))

    def mpu_abort(self, rel: str, upload_id: str) -> None:
        """Abort an upload and free its parts (an upload already gone is fine)."""
        try:
            self._s3("abort upload of", "abort_multipart_upload", rel, UploadId=upload_id)
        except OSError as exc:
            if not _no_such_upload(exc):
                raise

    def mpu_pending(self, prefix_rel: str = "") -> list[tuple[str, str]]:
        """(key relative to the root, upload id) of every unfinished upload below the root."""
        bucket, key, _ = self.fs.split_path(self.path(prefix_rel))
        resp = with_retries(
            "list uploads of", self.display(),
            lambda: self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key.rstrip("/") + "/"),
        )
        _, root_key, _ = self.fs.split_path(self.root)
        return [
            (u["Key"][len(root_key):].lstrip("/"), u["UploadId"]) for u in resp.get("Uploads", [])
        ]

    def connect(self) -> None:
        """Object stores: set the client up now (credentials, endpoint, service model) rather than at the first
        request. A failure here is left for that request to report."""
        if self.is_s3:
            try:
                self.fs.connect()  # s3fs: set_session's blocking form (set_session itself is a coroutine)
            except Exception:  # noqa: BLE001 - reported by the first real request, with its file
                pass

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _require_local(self, what: str) -> None:
        if not self.is_local:
            raise ConversionError(f"{self.url}: {what} to this filesystem are not supported yet (local paths only)")
