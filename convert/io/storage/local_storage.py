"""Local files: pread on cached descriptors, fadvise, atomic small-file writes (temp name + fsync + rename), and
the local kind's capabilities: positional writes (LocalPositional: pwrite on cached descriptors, a bounded-buffer
copy loop or `os.copy_file_range`, sync_file_range write-behind, fsync) and pins from stat (LocalPinning)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from fsspec.implementations.local import LocalFileSystem

from convert.errors import ConversionError
from convert.io.pins import Pin, SourcePins
from convert.io.storage.base_storage import Pinning, Storage, storage_kind, temp_name
from convert.io.storage.store import Store
from convert.settings import StorageSettings

COPY_BUFFER_BYTES = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2
_thread_state = threading.local()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library, or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# Looked up once; a store calls it only where its settings ask for write-behind (StorageSettings.write_behind).
_sync_file_range = _load_sync_file_range()


def _copy_buffer() -> memoryview:
    """This thread's copy buffer (small enough to stay in the CPU cache between pread and pwrite)."""
    buf = getattr(_thread_state, "buf", None)
    if buf is None:
        buf = _thread_state.buf = memoryview(bytearray(COPY_BUFFER_BYTES))
    return buf


@storage_kind
class LocalStorage(Storage):
    """A directory of this machine's filesystem. Errors are not retried (a local error is not transient). Its
    settings choose the copy loop (local_copy) and whether writes are handed to the disk as they go
    (write_behind)."""

    remote = False
    _attempts = 1
    pinning: LocalPinning
    positional: LocalPositional

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 settings: StorageSettings | None = None) -> None:
        """Descriptors are opened on first use and cached per (file, flags) until close()."""
        super().__init__(url, storage_options, settings)
        self._fds: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self.pinning = LocalPinning(self)
        self.positional = LocalPositional(self)

    @classmethod
    def serves(cls, fs: Any) -> bool:
        """fsspec's local filesystem (plain paths, file://)."""
        return isinstance(fs, LocalFileSystem)

    def place(self) -> str:
        """The root's real path (symbolic links resolved)."""
        return os.path.realpath(self.root)

    # -- metadata ----------------------------------------------------------
    def size(self, rel: str) -> int:
        """Size in bytes of the file `rel`."""
        return self._retry("stat", rel, lambda: os.stat(self.path(rel)).st_size)

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """name -> size in bytes of every file directly below `rel` (one directory scan)."""
        def scan() -> dict[str, int]:
            with os.scandir(self.path(rel)) as it:
                return {e.name: e.stat().st_size for e in it if e.is_file(follow_symlinks=False)}
        return self._retry("list", rel, scan)

    # -- reads -------------------------------------------------------------
    def _fd(self, rel: str, flags: int) -> int:
        """The cached descriptor of `rel` opened with `flags` (opened now where there is none)."""
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
        """Start reading bytes [start, end) of `rel` into the page cache in the background (fadvise WILLNEED)."""
        if end > start:
            try:
                os.posix_fadvise(self._fd(rel, os.O_RDONLY), start, end - start, os.POSIX_FADV_WILLNEED)
            except OSError as exc:
                raise self._error("read", rel, exc) from exc

    def _read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel` by pread on its cached descriptor, up to its end."""
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
        return b"".join(chunks)

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on, straight into it (preadv); short reads are an error."""
        n = out.nbytes
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

    def _read_file(self, rel: str) -> bytes:
        """The whole of the file `rel`."""
        def read() -> bytes:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self._retry("read", rel, read)

    # -- writes ------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file atomically (temp name + fsync + rename).

        The temp name is unique per writer (`temp_name`), so two jobs or threads writing the same
        file never share one; it is removed again if the write fails.
        """
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

    def _move(self, src_path: str, dst_path: str) -> None:
        """rename's one attempt: os.replace."""
        os.replace(src_path, dst_path)

    def close(self) -> None:
        """Close the cached descriptors."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class LocalPinning(Pinning):
    """Pins of local files from stat: reads take no conditions, the pins are checked after them."""

    store: LocalStorage

    def pin(self, rel: str) -> Pin:
        """Size, mtime_ns, ctime_ns and inode of the file `rel` (an in-place rewrite changes mtime/ctime, a
        replacement the inode)."""
        st = self.store._retry("stat", rel, lambda: os.stat(self.store.path(rel)))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}

    def pins(self, names: Sequence[str], like: SourcePins | None = None,
             workers: int | None = None, listed: bool = False) -> SourcePins:
        """name -> pin(name) for each of `names`, one stat each (the hints are of no use here)."""
        return {n: self.pin(n) for n in sorted(set(names))}


class LocalPositional:
    """Positional writes into preallocated local files (Store.positional of a LocalStorage), on its cached
    descriptors."""

    def __init__(self, store: LocalStorage) -> None:
        """The files of `store`."""
        self.store = store
        self._fd = store._fd  # bound once: pwrite and the copy loop call it per range

    def path(self, rel: str) -> str:
        """The path of `rel` on this machine."""
        return self.store.path(rel)

    def create_sized(self, rel: str, head: bytes, size: int) -> None:
        """Create (or truncate) `rel` as a file of `size` bytes starting with `head`."""
        try:
            with open(self.store.path(rel), "wb") as f:
                f.write(head)
                f.truncate(size)
        except OSError as exc:
            raise self.store._error("create", rel, exc) from exc

    def pwrite(self, rel: str, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset` of the existing file `rel`."""
        view = memoryview(data)
        try:
            fd = self._fd(rel, os.O_WRONLY)
            while view.nbytes:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise self.store._error("write", rel, exc) from exc

    def can_copy_from(self, src: Store) -> bool:
        """True from a store of local files (one with positional writes: a LocalStorage, or a view of one that
        hands its attributes through, convert.formats.chunks.ChunkedView): descriptor to descriptor."""
        return src.positional is not None

    def copy_range_from(self, src: Store, src_rel: str, src_off: int, dst_rel: str, dst_off: int, n: int) -> None:
        """Copy n bytes from `src` file at `src_off` into our file `dst_rel` at `dst_off`: directly where
        can_copy_from(src) (_copy_range), else read_range + pwrite."""
        if src.positional is not None:
            self._copy_range(src, src_rel, src_off, dst_rel, dst_off, n)
        else:
            self.pwrite(dst_rel, dst_off, src.read_range(src_rel, src_off, src_off + n))

    def _copy_range(self, src: Store, src_rel: str, src_off: int, dst_rel: str, dst_off: int, n: int) -> None:
        """Copy between local files through a reused 1 MiB buffer per thread (pread into it, pwrite from it), or
        with `copy_file_range` where this store's settings say local_copy "kernel" (MOE_CONVERT_LOCAL_COPY). On
        ext4 (no copy offload) copy_file_range is an in-kernel splice that costs ~1.5x the CPU of the buffered
        loop (measured by bench.run); choose it where the filesystem offloads copies (NFS >= 4.2 server-side
        copy, reflinks)."""
        local = cast(LocalPositional, src.positional).store  # can_copy_from: a LocalStorage or a view of one
        reading = True  # which side an OSError came from, for its message
        try:
            sfd = local._fd(src_rel, os.O_RDONLY)
            reading = False
            dfd = self._fd(dst_rel, os.O_WRONLY)
            if self.store.settings.local_copy == "kernel" and hasattr(os, "copy_file_range"):
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
                raise local._error("read", src_rel, exc) from exc
            # copy_file_range does both: name the destination (where ENOSPC, EROFS, EDQUOT arise)
            raise self.store._error("write", dst_rel, exc) from exc

    def start_writeback(self, rel: str, start: int, end: int) -> None:
        """Ask the kernel to start writing bytes [start, end) of our file `rel` to disk now, without waiting.

        Keeps the disk busy while later bytes are produced, so the closing fsync finds little
        left to flush (a 441 MB write + fsync took 0.33 s, 0.24 s with this every 8 MB, on
        ext4). Linux only; elsewhere (or where the settings' write_behind is off: MOE_CONVERT_WRITE_BEHIND=0) a
        no-op.
        """
        if self.store.settings.write_behind and _sync_file_range is not None and end > start:
            _sync_file_range(self._fd(rel, os.O_WRONLY), start, end - start, _SYNC_FILE_RANGE_WRITE)

    def fsync(self, rel: str) -> None:
        """Flush our file `rel` to disk."""
        try:
            os.fsync(self._fd(rel, os.O_WRONLY))
        except OSError as exc:
            raise self.store._error("write (fsync)", rel, exc) from exc
