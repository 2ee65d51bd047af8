"""Any fsspec filesystem that is not local (GCS, Azure, HTTP, memory, ...), through the filesystem's own calls:
every operation retried on transient failures, listings asked afresh (never fsspec's cached ones), pins from
info() (ETag / version / generation fields, else a modification time: FsspecPinning). No positional writes,
multipart uploads or conditional writes (its capability attributes are None). S3 specializes it (s3_storage)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from convert.io.pins import Pin, SourcePins
from convert.io.storage.base_storage import Pinning, Storage, fallback_kind
from convert.settings import StorageSettings

# Fields of fsspec's info() that identify an object's content (S3, GCS, Azure); times where there is none.
PIN_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash")
PIN_TIME_KEYS = ("LastModified", "last_modified", "mtime", "updated")


def _pin_of(info: Mapping[str, Any]) -> Pin:
    """A pin's fields (SourcePinning.pin) of an fsspec info() or ls(detail=True) entry: size, then identity or time fields."""
    pin: dict[str, Any] = {"size": int(info.get("size") or 0)}
    for keys in (PIN_KEYS, PIN_TIME_KEYS):
        pin.update({k: str(info[k]) for k in keys if info.get(k) not in (None, "")})
        if len(pin) > 1:
            break
    return cast(Pin, pin)


@fallback_kind
class FsspecStorage(Storage):
    """A root on any fsspec filesystem (the kind of every filesystem no other kind serves)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 settings: StorageSettings | None = None) -> None:
        """Pins from info() (FsspecPinning)."""
        super().__init__(url, storage_options, settings)
        self.pinning = FsspecPinning(self)

    @classmethod
    def serves(cls, fs: Any) -> bool:
        """Any filesystem."""
        return True

    def _forget(self, rel: str) -> None:
        """Drop fsspec's cached listing of `rel`: another process may have changed it."""
        self.fs.invalidate_cache(self.path(rel))

    # -- metadata ----------------------------------------------------------
    def size(self, rel: str) -> int:
        """Size in bytes of the file `rel`."""
        return int(self._retry("stat", rel, lambda: self.fs.size(self.path(rel))))

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """name -> size in bytes of every file directly below `rel` (one listing)."""
        self._forget(rel)
        entries = self._retry("list", rel, lambda: self.fs.ls(self.path(rel), detail=True))
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e["type"] != "directory"}

    # -- reads -------------------------------------------------------------
    def _read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel` by the filesystem's cat_file."""
        return self._retry("read", rel, lambda: self.fs.cat_file(self.path(rel), start=start, end=end))

    def _read_file(self, rel: str) -> bytes:
        """The whole of the file `rel` by the filesystem's cat_file."""
        return self._retry("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    # -- writes ------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file by the filesystem's pipe_file (object stores: one PUT, atomic)."""
        self._retry("write", rel, lambda: self.fs.pipe_file(self.path(rel), data))


class FsspecPinning(Pinning):
    """Pins from the filesystem's info() (SourcePinning of an FsspecStorage): reads take no conditions, the pins
    are checked after them."""

    def pin(self, rel: str) -> Pin:
        """Size plus the ETag / version / generation fields the filesystem reports for `rel` (its modification
        time where it reports none of them)."""
        store = self.store
        store._forget(rel)
        return _pin_of(store._retry("stat", rel, lambda: store.fs.info(store.path(rel))))

    def pins(self, names: Sequence[str], like: SourcePins | None = None,
             workers: int | None = None, listed: bool = False) -> SourcePins:
        """name -> pin(name) for each of `names`: up to `workers` requests at once (None: the settings'
        control_threads)."""
        return self._pin_each(sorted(set(names)), {}, like, self._workers(workers))

    def _workers(self, workers: int | None) -> int:
        """`workers`, or the settings' control_threads where None: requests sent at once outside the data phase."""
        return self.store.settings.control_threads if workers is None else workers

    def _pin_each(self, names: list[str], found: SourcePins, like: SourcePins | None,
                  workers: int) -> SourcePins:
        """name -> pin of each of `names` (sorted): those in `found` as they are, unless their pin in `like` holds a
        field `found`'s has not (a VersionId a listing does not give); the others by pin(), `workers` at once."""
        rest = [n for n in names if n not in found or set((like or {}).get(n, {})) - set(found[n])]
        if rest:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(rest)))) as pool:
                found.update(zip(rest, pool.map(self.pin, rest)))
        return {n: found[n] for n in names}
