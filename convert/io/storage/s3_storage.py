"""S3 (s3fs), on top of the generic fsspec kind: reads conditional on the ETag a job pinned (If-Match), pins from
one listing per directory, streamed ranged GETs (S3RangeReader), batched deletes, server-side copies, multipart
uploads, conditional writes of small objects (the destination's lock), a client that fails at once where the
endpoint cannot be reached.

Requests go through s3fs's `call_s3` (and, for streamed bodies, its coroutine `_call_s3` on its event loop).
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from convert.errors import ConversionError, SourceChanged, StorageError, reason_of, service_error, unreachable
from convert.io.pins import Pin, SourcePins
from convert.io.range_stream import RangeReader
from convert.io.storage.base_storage import storage_kind, with_retries
from convert.io.storage.fsspec_storage import FsspecPinning, FsspecStorage, _pin_of
from convert.io.storage.store import Store
from convert.settings import StorageSettings

# The store's settings (convert.settings.StorageSettings) tune it. Object stores (measured with bench.s3; see
# bench/results/S3.md): the client keeps up to `s3_pool` connections (it must not be smaller than the requests a
# process has in flight, or they queue); botocore retries throttling in `s3_retry_mode`, `s3_retry_attempts`
# times. Byte copies into local files stream each request's body (S3RangeReader), so its size costs no memory: one
# request reads up to `s3_stream_bytes` (a rank's spans come in whole rounds of --workers; 64 MiB gave 329 MB on 4
# workers 6 spans, the last 2 read while the others' workers idled: bench.s3trace). Reads of an S3 source are
# conditional on the ETag the plan pinned (If-Match); `s3_conditional_reads` off (for a store that refuses the
# condition) reads without it, and the source is then checked by a listing after the data instead.


def _etag(pin: Pin) -> str | None:
    """The ETag of a pin (SourcePinning.pin), or None."""
    etag = pin.get("ETag") or pin.get("etag")
    return str(etag) if etag else None


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


async def _fill(body: Any, view: memoryview, progress: list[int]) -> None:
    """Copy the next len(view) bytes of `body` into `view`, counting them in progress[0] as they land."""
    n = view.nbytes
    while progress[0] < n:
        chunk = await body.read(n - progress[0])
        if not chunk:
            raise EOFError
        view[progress[0] : progress[0] + len(chunk)] = chunk
        progress[0] += len(chunk)


class S3RangeReader(RangeReader):
    """Bytes [start, end) of an S3 object by one streaming ranged GET, its body consumed as it arrives.

    A ranged GET of tens of MB costs one first-byte latency instead of one per few MB, and its body is consumed
    a caller-sized piece at a time (convert.engine.executor writes each piece to its place in a local shard). A
    transient failure mid-body is resumed by a new ranged GET from the first byte not yet received, within the
    store's retry budget. Each GET is conditional on the file's pin where the store has one (S3Pinning.expect:
    If-Match its ETag), so the bytes of one read, resumed or not, and of every read of a job, are of one version
    of the file. Use as a context manager (closes the response).
    """

    def __init__(self, storage: S3Storage, rel: str, start: int, end: int) -> None:
        """No request yet: the first readinto opens the body."""
        super().__init__(storage, rel, start, end)
        self.s3 = storage
        self._body: Any = None

    def close(self) -> None:
        """Release the response (an unread rest of the body is dropped with its connection)."""
        if self._body is not None:
            body, self._body = self._body, None
            body.close()

    def _fill(self, out: memoryview) -> None:
        """Fill `out` from the open body (opened now where none is), resuming a broken one within the retries."""
        start, done = self.pos, [0]

        def attempt() -> None:
            progress = [done[0]]
            try:
                if self._body is None:
                    self._body = self._open(start + done[0])
                self._sync(_fill, self._body, out, progress)
            except EOFError:
                raise ConversionError(
                    f"{self.s3.display(self.rel)}: expected bytes up to offset {self.end}, the object ends at "
                    f"{start + progress[0]} (truncated file?)"
                ) from None
            except BaseException as exc:
                self.close()  # the next attempt asks again from the first byte not yet here
                self.s3._pins.raise_if_refused(self.rel, exc)
                raise
            finally:
                done[0] = progress[0]

        self.s3._retry("read", self.rel, attempt)

    def _open(self, start: int) -> Any:
        """The body of a ranged GET of [start, self.end), conditional on the file's pin (S3Storage.ranged_get)."""
        return self._sync(self.s3.ranged_get, self.rel, start, self.end)

    def _sync(self, fn: Any, *args: Any) -> Any:
        """Run the coroutine function `fn(*args)` on the filesystem's event loop; its result."""
        from fsspec.asyn import sync

        return sync(self.s3.fs.loop, fn, *args)


@storage_kind
class S3Storage(FsspecStorage):
    """A bucket prefix on S3 or a store that speaks its API (s3fs)."""

    multipart: S3Multipart
    conditional: S3Conditional

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 settings: StorageSettings | None = None) -> None:
        """Make the client skip botocore's retries of an unreachable endpoint; no pins yet."""
        super().__init__(url, storage_options, settings)
        fail_fast_when_unreachable(self.fs)
        self._pins = S3Pinning(self)  # the reads below consult it (if_match) on every request
        self.pinning = self._pins
        self.multipart = S3Multipart(self)
        self.conditional = S3Conditional(self)

    @classmethod
    def prepare_options(cls, url: str, options: dict[str, Any], settings: StorageSettings) -> dict[str, Any]:
        """For s3:// and s3a:// URLs: name the endpoint of AWS_ENDPOINT_URL (fsspec caches filesystems by their
        arguments, so a client made for another endpoint, same process, is never reused), and size the client's
        connection pool and retries (`settings`: s3_pool, s3_retry_mode, s3_retry_attempts) unless the caller
        did."""
        if not url.startswith(("s3://", "s3a://")):
            return options
        options = dict(options)
        if os.environ.get("AWS_ENDPOINT_URL") and "endpoint_url" not in options \
                and "endpoint_url" not in (options.get("client_kwargs") or {}):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", settings.s3_pool)
        config.setdefault("retries", {"mode": settings.s3_retry_mode, "max_attempts": settings.s3_retry_attempts})
        options["config_kwargs"] = config
        return options

    @classmethod
    def serves(cls, fs: Any) -> bool:
        """Where the S3 API itself is at hand (s3fs: call_s3, split_path)."""
        return hasattr(fs, "call_s3") and hasattr(fs, "split_path")

    def _s3(self, what: str, method: str, rel: str, **kwargs: Any) -> Any:
        """The answer of the S3 request `method` on the object `rel` (with `kwargs`), under with_retries (the
        settings' retries)."""
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return with_retries(what, self.display(rel), lambda: self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs),
                            self.settings.retries)

    def _saw_file(self, rel: str, entry: dict[str, Any]) -> None:
        """Keep the pin of a file list_dir found: reads of it are conditional on it (S3Pinning.read_pin)."""
        self._pins._listed[rel] = _pin_of(entry)

    # -- reads -------------------------------------------------------------
    def _read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel`: by one GET conditional on its pin where it has one, else by cat_file."""
        if self._pins.if_match(rel):
            return self._read_pinned(rel, start, end)
        return super()._read(rel, start, end)

    async def ranged_get(self, rel: str, start: int, end: int, etag: str | None = None) -> Any:
        """(await on fs.loop) The body of one GET of bytes [start, end) of `rel`, conditional on `etag`, else on
        its pin where there is one (if_match); the caller reads and closes it."""
        from s3fs.core import version_id_kw

        bucket, key, version = self.fs.split_path(self.path(rel))
        etag = etag or self._pins.if_match(rel)
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
            except Exception as exc:  # a refused condition is told apart from other errors
                self._pins.raise_if_refused(rel, exc)
                raise

        return self._retry("read", rel, attempt)

    def open_range(self, rel: str, start: int, end: int) -> RangeReader:
        """A reader of bytes [start, end) of `rel` by one streaming ranged GET (S3RangeReader)."""
        return S3RangeReader(self, rel, start, end)

    def _read_file(self, rel: str) -> bytes:
        """The whole of the file `rel`: by one GET conditional on its pin where it has one, else by cat_file."""
        pin = self._pins.read_pin(rel)
        if pin and _etag(pin):
            return self._read_pinned(rel, 0, int(pin["size"])) if int(pin["size"]) else b""
        return super()._read_file(rel)

    # -- writes ------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        """Nothing: S3 has no directories (and s3fs's makedirs would create a missing bucket)."""

    def remove_many(self, rels: Sequence[str]) -> None:
        """Remove the files `rels` (those already gone are fine) by one DeleteObjects request per 1000 keys (their
        order is then S3's: call once per group that may go together)."""
        rels = list(rels)
        for i in range(0, len(rels), 1000):
            batch = rels[i : i + 1000]
            bucket, _, _ = self.fs.split_path(self.path(batch[0]))
            keys = [{"Key": self.fs.split_path(self.path(r))[1]} for r in batch]
            delete = functools.partial(self.fs.call_s3, "delete_objects", Bucket=bucket,
                                       Delete={"Objects": keys, "Quiet": True})
            resp = with_retries("remove", self.display(batch[0]), delete, self.settings.retries)
            for rel in batch:
                self._forget(rel)
            errors = resp.get("Errors") or []
            if errors:
                e = errors[0]
                raise StorageError("remove", f"s3://{bucket}/{e.get('Key', '')}", f"{e.get('Code')}: {e.get('Message')}")

    def copy_file_from(self, src: Store, rel: str, dst_rel: str | None = None) -> None:
        """Copy a whole (small) file from `src` to the same name (or `dst_rel`) here: within one store (the same
        endpoint and credentials: the same s3fs filesystem) by a server-side copy, one request; else read, then
        written."""
        same_store = getattr(src, "fs", None) is self.fs  # an S3Storage, or a view of one that hands its attributes
        if same_store:  # through (ChunkedView)
            s3 = cast(S3Storage, src)
            bucket, key, _ = self.fs.split_path(s3.path(rel))
            pins = s3._pins
            etag = pins.if_match(rel)
            try:
                self._s3("copy to", "copy_object", dst_rel or rel, CopySource={"Bucket": bucket, "Key": key},
                         **({"CopySourceIfMatch": etag} if etag else {}))
            except StorageError as exc:  # e.g. an object above the store's single-copy limit: the bytes go through here
                pins.raise_if_refused(rel, exc)
            else:
                # Not every store applies the condition (moto does not), and the copy's ETag cannot tell (under
                # SSE-KMS no ETag is its bytes' MD5): the file's pin is checked after the data, as before.
                pins._unverified.add(rel)
                return
        super().copy_file_from(src, rel, dst_rel)

    def connect(self) -> None:
        """Set the client up now (credentials, endpoint, service model) rather than at the first request. A
        failure here is left for that request to report."""
        try:
            self.fs.connect()  # s3fs: set_session's blocking form (set_session itself is a coroutine)
        except Exception:  # noqa: BLE001, S110 - reported by the first real request, with its file
            pass


class S3Pinning(FsspecPinning):
    """Pins of an S3Storage's files (SourcePinning), from one listing per directory, and the conditions its reads
    are made on: If-Match the pinned ETag (expect, or the store's own listing), where the store applies it
    (probe_conditions). The store's reads ask if_match / raise_if_refused here."""

    store: S3Storage

    def __init__(self, store: S3Storage) -> None:
        """No pins yet."""
        super().__init__(store)
        self._listed: SourcePins = {}  # file -> pin, as the store's listings saw it
        self._expect: SourcePins = {}  # file -> the pin every read of it is conditional on
        self._unverified: set[str] = set()  # files copied server-side: their pins are still checked after
        self._applies_conditions: Future[bool] | None = None  # probe_conditions' answer

    def pins(self, names: Sequence[str], like: SourcePins | None = None,
             workers: int | None = None, listed: bool = False) -> SourcePins:
        """name -> pin(name) for each of `names`, with as few requests, and as few in a row, as the store allows.

        One listing per directory gives size and ETag of every file in it (what pin() takes from a HEAD); a file
        the listing does not show, or whose pin in `like` (pins taken earlier, to be compared with these) holds a
        field a listing has not (a VersionId), gets its own pin(), up to `workers` at once (None: the settings'
        control_threads). Errors are pin()'s: a
        missing file raises as pin() does. With `listed`, pins this object's own earlier listings (list_dir) saw
        serve without a request: for a job's plan, whose listing found the very files it pins (a change after it
        is still a change).
        """
        names = sorted(set(names))
        if listed and all(n in self._listed for n in names):
            return {n: cast(Pin, dict(self._listed[n])) for n in names}
        found: SourcePins = {}
        for parent in sorted({posixpath.dirname(n) for n in names}):
            try:
                files, _ = self.store.list_dir(parent)  # records each file's pin (self._listed)
            except OSError:
                continue  # each file's own pin() below names the problem
            found.update({n: self._listed[n] for n in (posixpath.join(parent, f) for f in files)})
        return self._pin_each(names, found, like, self._workers(workers))

    def expect(self, pins: SourcePins) -> None:
        """Make every later read of a file of `pins` (name -> pin) conditional on its pinned ETag (If-Match), so
        that a file rewritten since fails the read that meets it (SourceChanged) instead of giving bytes of
        another version. Reads of files this object's own listing saw are conditional on the ETag it saw."""
        self._expect.update({n: cast(Pin, dict(p)) for n, p in pins.items() if _etag(p)})

    def probe_conditions(self, pins: SourcePins) -> None:
        """Start asking, in the background, whether the store applies If-Match to reads: one GET of the first
        byte of a non-empty file of `pins` on an ETag no object has, which such a store refuses (HTTP 412). Until
        it has answered so, no read counts as pinned (reads_pinned): a store that ignores the condition would
        hand out bytes of a file rewritten during the job."""
        rel = next((n for n, pin in pins.items() if pin.get("size")), None)
        if self.store.settings.s3_conditional_reads and self._applies_conditions is None and rel is not None:
            pool = ThreadPoolExecutor(max_workers=1)
            self._applies_conditions = pool.submit(self._refuses_unmet_condition, rel)
            pool.shutdown(wait=False)

    def _refuses_unmet_condition(self, rel: str) -> bool:
        """True where a GET of `rel`'s first byte on an unmet If-Match is refused with 412; False where it is
        answered, or fails otherwise (the reads are then checked by a listing after them, as unconditional)."""
        from fsspec.asyn import sync

        async def get() -> None:
            (await self.store.ranged_get(rel, 0, 1, etag='"moe-convert-probe"')).close()

        try:
            sync(self.store.fs.loop, get)
        except Exception as exc:  # noqa: BLE001 - any answer but 412 means: do not rely on the condition
            answer = service_error(exc)
            return answer is not None and (answer[0] == 412 or answer[1] == "PreconditionFailed")
        return False

    def reads_pinned(self, names: Iterable[str]) -> bool:
        """True where every read of the files `names` was conditional on their pins (expect, or this object's
        listing) and the store applies the condition (probe_conditions): no check of the pins after the reads
        is needed."""
        if self._applies_conditions is None or not self._applies_conditions.result():
            return False
        return all(self.if_match(n) and n not in self._unverified for n in names)

    def read_pin(self, rel: str) -> Pin | None:
        """The pin a read of `rel` is conditional on (expect, else this object's listing), or None (also where the
        settings' s3_conditional_reads is off: MOE_CONVERT_S3_CONDITIONAL_READS=0)."""
        if not self.store.settings.s3_conditional_reads:
            return None
        return self._expect.get(rel) or self._listed.get(rel)

    def if_match(self, rel: str) -> str | None:
        """The ETag a read of `rel` is conditional on (read_pin), or None."""
        pin = self.read_pin(rel)
        return _etag(pin) if pin else None

    def raise_if_refused(self, rel: str, exc: BaseException) -> None:
        """Where `exc` is the store's refusal of a read of `rel` made on its pin's condition, raise what it stands
        for: SourceChanged where the file changed (HTTP 412); a StorageError saying how to read without conditions
        where the store does not implement them (HTTP 501, S3's answer to a header it does not take)."""
        answer = service_error(exc)
        if answer is None:
            return
        if answer[0] == 412 or answer[1] == "PreconditionFailed":
            raise SourceChanged(f"source file {self.store.display(rel)} changed during the conversion (its ETag is no "
                                f"longer {self.if_match(rel)})") from None
        if (answer[0] == 501 or answer[1] == "NotImplemented") and self.if_match(rel):
            raise StorageError("read", self.store.display(rel), f"{reason_of(exc)}; this store does not take If-Match, "
                               "on which every read of a source is made: set MOE_CONVERT_S3_CONDITIONAL_READS=0") \
                from None


class S3Conditional:
    """Conditional writes of small objects on S3 (Store.conditional of an S3Storage): the destination's lock
    (convert.engine.dest_lock)."""

    def __init__(self, store: S3Storage) -> None:
        """The objects of `store`."""
        self.store = store

    def put_if(self, rel: str, data: bytes, absent: bool = False, etag: str | None = None) -> str:
        """Write the small object `rel` only where none exists (`absent`: If-None-Match: *) or only where it is the
        version `etag` (If-Match); returns the new ETag. A condition not met fails (HTTP 412, or 409 where another
        conditional write of it is under way; If-Match on a missing object: 404), with the answer in the error's
        chain (convert.errors.service_error)."""
        condition = {"IfNoneMatch": "*"} if absent else {"IfMatch": etag}
        try:
            return str(self.store._s3("write", "put_object", rel, Body=data, **condition)["ETag"])
        finally:
            self.store._forget(rel)

    def read_object(self, rel: str) -> tuple[bytes, str, float | None] | None:
        """(bytes, ETag, seconds since it was last written by the store's own clock: its Date against the
        object's LastModified) of the small object `rel`, or None where there is none."""
        from fsspec.asyn import sync

        bucket, key, _ = self.store.fs.split_path(self.store.path(rel))

        async def get() -> tuple[bytes, str, float | None]:
            resp = await self.store.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data = bytes(await body.read())
            finally:
                body.close()
            date = (resp.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
            return data, str(resp.get("ETag", "")), _server_age(resp.get("LastModified"), date)

        def attempt() -> tuple[bytes, str, float | None] | None:
            try:
                return sync(self.store.fs.loop, get)
            except FileNotFoundError:
                return None
            except Exception as exc:  # a missing object is an answer, not an error
                answer = service_error(exc)
                if answer and (answer[0] == 404 or answer[1] in ("NoSuchKey", "NotFound")):
                    return None
                raise

        return self.store._retry("read", rel, attempt)

    def delete_if(self, rel: str, etag: str | None) -> None:
        """Remove the object `rel` where it is still the version `etag` (If-Match; unconditionally where the store
        takes no condition on a delete). Another version, or none, is left as it is."""
        try:
            self.store._s3("remove", "delete_object", rel, **({"IfMatch": etag} if etag else {}))
        except OSError as exc:
            answer = service_error(exc)
            if answer and (answer[0] == 501 or answer[1] == "NotImplemented"):
                self.store._s3("remove", "delete_object", rel)
            elif not answer or not (answer[0] in (404, 412) or answer[1] in ("PreconditionFailed", "NoSuchKey")):
                raise
        finally:
            self.store._forget(rel)


class S3Multipart:
    """Multipart uploads on S3 (Store.multipart of an S3Storage): one per output shard (convert.engine.sinks)."""

    def __init__(self, store: S3Storage) -> None:
        """The uploads of `store`."""
        self.store = store

    def create(self, rel: str) -> str:
        """Start a multipart upload of `rel`; returns its upload id."""
        return str(self.store._s3("start upload of", "create_multipart_upload", rel)["UploadId"])

    def upload_part(self, rel: str, upload_id: str, number: int, data: bytes | bytearray | memoryview) -> str:
        """Upload part `number` (1-based) of `rel`; returns its ETag."""
        body = data if isinstance(data, (bytes, bytearray)) else bytes(data)  # a copy only where needed
        resp = self.store._s3(f"upload part {number} of", "upload_part", rel, UploadId=upload_id, PartNumber=number,
                              Body=body)
        return str(resp["ETag"])

    def list_parts(self, rel: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """Parts already uploaded: number -> (ETag, size). Empty if the upload no longer exists."""
        out: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                resp = self.store._s3("list parts of", "list_parts", rel, UploadId=upload_id, PartNumberMarker=marker)
            except OSError as exc:
                if _no_such_upload(exc):
                    return {}
                raise
            for p in resp.get("Parts", []):
                out[int(p["PartNumber"])] = (str(p["ETag"]), int(p["Size"]))
            if not resp.get("IsTruncated"):
                return out
            marker = int(resp["NextPartNumberMarker"])

    def complete(self, rel: str, upload_id: str, etags: dict[int, str]) -> None:
        """Assemble `rel` from its parts; the object appears only now."""
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        self.store._s3("complete upload of", "complete_multipart_upload", rel, UploadId=upload_id,
                       MultipartUpload={"Parts": parts})
        self.store._forget(rel)

    def abort(self, rel: str, upload_id: str) -> None:
        """Abort an upload and free its parts (an upload already gone is fine)."""
        try:
            self.store._s3("abort upload of", "abort_multipart_upload", rel, UploadId=upload_id)
        except OSError as exc:
            if not _no_such_upload(exc):
                raise

    def pending(self, prefix_rel: str = "") -> list[tuple[str, str]]:
        """(key relative to the root, upload id) of every unfinished upload below the root."""
        bucket, key, _ = self.store.fs.split_path(self.store.path(prefix_rel))
        resp = with_retries(
            "list uploads of", self.store.display(),
            lambda: self.store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key.rstrip("/") + "/"),
            self.store.settings.retries,
        )
        _, root_key, _ = self.store.fs.split_path(self.store.root)
        return [
            (u["Key"][len(root_key):].lstrip("/"), u["UploadId"]) for u in resp.get("Uploads", [])
        ]
