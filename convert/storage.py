"""All byte I/O of the tool, behind fsspec: ranged reads, positional writes, small files.

Local paths get fast paths (pread/pwrite on cached descriptors, kernel-side
`os.copy_file_range`); any other fsspec URL goes through the filesystem's own calls.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from convert.errors import ConversionError


class Storage:
    """One fsspec filesystem plus a root directory (a local path or a URL such as s3://b/p)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._fds: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    # -- paths -------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Absolute path (in this filesystem) of `rel` below the root."""
        return posixpath.join(self.root, rel)

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it, for messages."""
        return posixpath.join(self.url.rstrip("/"), rel) if rel else self.url

    # -- metadata ----------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def isdir(self, rel: str = "") -> bool:
        return bool(self.fs.isdir(self.path(rel)))

    def size(self, rel: str) -> int:
        """Size in bytes of the file `rel`."""
        if self.is_local:
            return os.stat(self.path(rel)).st_size
        return int(self.fs.size(self.path(rel)))

    def list_dir(self, rel: str = "") -> tuple[list[str], list[str]]:
        """(files, subdirectories) directly below `rel`, as names relative to it."""
        files, dirs = [], []
        for entry in self.fs.ls(self.path(rel), detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            (dirs if entry["type"] == "directory" else files).append(name)
        return sorted(files), sorted(dirs)

    # -- reads -------------------------------------------------------------
    def _fd(self, rel: str, flags: int) -> int:
        key = (rel, flags)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(self.path(rel), flags)
                self._fds[key] = fd
            return fd

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file `rel`; short reads are an error naming the file."""
        if end <= start:
            return b""
        if self.is_local:
            fd = self._fd(rel, os.O_RDONLY)
            chunks, pos = [], start
            while pos < end:
                chunk = os.pread(fd, end - pos, pos)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
            data = b"".join(chunks)
        else:
            data = self.fs.cat_file(self.path(rel), start=start, end=end)
        if len(data) != end - start:
            raise ConversionError(
                f"{self.display(rel)}: expected {end - start} bytes at offset {start}, got {len(data)} (truncated file?)"
            )
        return data

    def read_bytes(self, rel: str) -> bytes:
        """The whole of a small file (configs, indexes)."""
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        """Parse the small JSON file `rel`; errors name the file."""
        try:
            return json.loads(self.read_bytes(rel))
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{self.display(rel)}: not valid JSON ({exc})") from exc

    # -- writes ------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file atomically where the filesystem allows (temp name + rename)."""
        if self.is_local:
            tmp = self.path(rel) + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(rel))
        else:
            self.fs.pipe_file(self.path(rel), data)

    def create_sized(self, rel: str, head: bytes, size: int) -> None:
        """Create (or truncate) `rel` as a file of `size` bytes starting with `head`."""
        self._require_local("positional writes")
        with open(self.path(rel), "wb") as f:
            f.write(head)
            f.truncate(size)

    def pwrite(self, rel: str, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset` of the existing file `rel`."""
        self._require_local("positional writes")
        fd = self._fd(rel, os.O_WRONLY)
        view = memoryview(data)
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def copy_range_from(self, src: "Storage", src_rel: str, src_off: int, dst_rel: str, dst_off: int, n: int) -> None:
        """Copy n bytes from `src` file at `src_off` into our file `dst_rel` at `dst_off`.

        Uses the kernel (`copy_file_range`) when both ends are local, else read + pwrite.
        """
        if src.is_local and self.is_local and hasattr(os, "copy_file_range"):
            sfd = src._fd(src_rel, os.O_RDONLY)
            dfd = self._fd(dst_rel, os.O_WRONLY)
            while n:
                done = os.copy_file_range(sfd, dfd, n, src_off, dst_off)
                if done <= 0:
                    raise ConversionError(f"{src.display(src_rel)}: unexpected end of file at offset {src_off}")
                n, src_off, dst_off = n - done, src_off + done, dst_off + done
            return
        self.pwrite(dst_rel, dst_off, src.read_range(src_rel, src_off, src_off + n))

    def fsync(self, rel: str) -> None:
        if self.is_local:
            fd = self._fd(rel, os.O_WRONLY)
            os.fsync(fd)

    def rename(self, src_rel: str, dst_rel: str) -> None:
        self.close()
        if self.is_local:
            os.replace(self.path(src_rel), self.path(dst_rel))
        else:
            self.fs.mv(self.path(src_rel), self.path(dst_rel))

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel))

    def copy_file_from(self, src: "Storage", rel: str, dst_rel: str | None = None) -> None:
        """Copy a whole (small) file from `src` to the same name (or `dst_rel`) here."""
        self.write_bytes(dst_rel or rel, src.read_bytes(rel))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _require_local(self, what: str) -> None:
        if not self.is_local:
            raise ConversionError(f"{self.url}: {what} to this filesystem are not supported yet (local paths only)")
