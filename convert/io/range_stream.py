"""Reading one byte range of a file in order, a caller-sized piece at a time (Store.open_range).

The reader here serves each piece by one read_range of its store. A store that can stream a range by one
request returns its own reader from open_range (S3: convert.io.storage.s3_storage.S3RangeReader, one ranged
GET whose body is consumed as it arrives, resumed where it broke), with the same interface: callers
(convert.engine.stream_copy, convert.engine.part_fill) never ask which kind of store they read.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

_R = TypeVar("_R", bound="RangeReader")


class RangeSource(Protocol):
    """What a RangeReader reads from (a Store, or any object with its read_range)."""

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file `rel`; short reads are an error naming the file."""
        ...


class RangeReader:
    """Bytes [start, end) of the file `rel` of `storage`, handed out in order by `readinto`: each `readinto` is
    one read_range. Use as a context manager (closes what a subclass holds open)."""

    def __init__(self, storage: RangeSource, rel: str, start: int, end: int) -> None:
        """Nothing is read before the first readinto."""
        self.storage, self.rel, self.pos, self.end = storage, rel, start, end

    def __enter__(self: _R) -> _R:
        """The reader itself; leaving the block closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the reader holds open (nothing here)."""

    def readinto(self, out: memoryview) -> None:
        """Fill `out` with the next out.nbytes bytes of the range; a short file is an error naming it."""
        n = out.nbytes
        if self.pos + n > self.end:
            raise ValueError(f"reading {n} bytes at {self.pos} past the range's end {self.end}")
        self._fill(out)
        self.pos += n

    def _fill(self, out: memoryview) -> None:
        """Fill `out` with the bytes from self.pos on (readinto has checked they are inside the range)."""
        out[:] = self.storage.read_range(self.rel, self.pos, self.pos + out.nbytes)
