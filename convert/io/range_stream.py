"""Reading one byte range of an object in order, by one request, without holding it in memory.

A ranged GET of tens of MB costs one first-byte latency instead of one per few MB, and its
body is consumed as it arrives, a caller-sized piece at a time (convert.engine.executor writes
each piece to its place in a local shard). A transient failure mid-body is resumed by a new
ranged GET from the first byte not yet received, within the storage's retry budget. Each GET is
conditional on the file's pin where the storage has one (Storage.expect: If-Match its ETag), so the
bytes of one read, resumed or not, and of every read of a job, are of one version of the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError

if TYPE_CHECKING:
    from convert.io.storage import Storage


async def _fill(body: Any, view: memoryview, progress: list[int]) -> None:
    """Copy the next len(view) bytes of `body` into `view`, counting them in progress[0] as they land."""
    n = view.nbytes
    while progress[0] < n:
        chunk = await body.read(n - progress[0])
        if not chunk:
            raise EOFError
        view[progress[0] : progress[0] + len(chunk)] = chunk
        progress[0] += len(chunk)


class RangeReader:
    """Bytes [start, end) of the file `rel` of `storage`, handed out in order by `readinto`.

    On S3 (s3fs) one streaming ranged GET serves them; elsewhere each `readinto` is one read_range.
    Use as a context manager (closes the response).
    """

    def __init__(self, storage: Storage, rel: str, start: int, end: int) -> None:
        self.storage, self.rel, self.pos, self.end = storage, rel, start, end
        self._body: Any = None

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the response (an unread rest of the body is dropped with its connection)."""
        if self._body is not None:
            body, self._body = self._body, None
            body.close()

    def readinto(self, out: memoryview) -> None:
        """Fill `out` with the next out.nbytes bytes of the range; a short object is an error naming the file."""
        n = out.nbytes
        if self.pos + n > self.end:
            raise ValueError(f"reading {n} bytes at {self.pos} past the range's end {self.end}")
        if not self.storage.is_s3:
            out[:] = self.storage.read_range(self.rel, self.pos, self.pos + n)
            self.pos += n
            return
        start, done = self.pos, [0]

        def attempt() -> None:
            progress = [done[0]]
            try:
                if self._body is None:
                    self._body = self._open(start + done[0])
                self._sync(_fill, self._body, out, progress)
            except EOFError:
                raise ConversionError(
                    f"{self.storage.display(self.rel)}: expected bytes up to offset {self.end}, the object ends at "
                    f"{start + progress[0]} (truncated file?)"
                ) from None
            except BaseException as exc:
                self.close()  # the next attempt asks again from the first byte not yet here
                self.storage.raise_if_refused(self.rel, exc)
                raise
            finally:
                done[0] = progress[0]

        self.storage._retry("read", self.rel, attempt)
        self.pos += n

    def _open(self, start: int) -> Any:
        """The body of a ranged GET of [start, self.end), conditional on the file's pin (Storage.ranged_get)."""
        return self._sync(self.storage.ranged_get, self.rel, start, self.end)

    def _sync(self, fn: Any, *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.storage.fs.loop, fn, *args)
