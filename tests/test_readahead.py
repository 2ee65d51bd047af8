"""launch.readahead: a job's input read into the page cache while torch loads (checked with mincore)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from launch.readahead import CHUNK, ReadAhead, chunks

PAGE = mmap.PAGESIZE


def cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore of a mapping of it)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def evicted_file(path: Path, size: int) -> Path:
    """A file of `size` random bytes, written, synced and dropped from the page cache (skips where it cannot be)."""
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if cached_pages(path) > size // PAGE // 10:
        pytest.skip(f"{path.parent} keeps its files in memory (tmpfs?): nothing to read ahead")
    return path


def test_chunks_cover_every_byte_once_and_shares_split_them():
    sizes = [0, 3 * CHUNK + 5, CHUNK, 7]
    every = list(chunks(sizes))
    assert [(f, o) for f, o, _ in every] == [(1, 0), (1, CHUNK), (1, 2 * CHUNK), (1, 3 * CHUNK), (2, 0), (3, 0)]
    assert [n for _, _, n in every] == [CHUNK, CHUNK, CHUNK, 5, CHUNK, 7]
    shares = [list(chunks(sizes, (i, 3))) for i in range(3)]
    assert sorted(c for s in shares for c in s) == sorted(every)
    assert shares[1] == [every[1], every[4]]


def test_the_files_end_up_in_the_page_cache(tmp_path):
    a = evicted_file(tmp_path / "a.safetensors", 2 * CHUNK + 3 * PAGE)
    b = evicted_file(tmp_path / "b.safetensors", 5 * PAGE)
    ra = ReadAhead([str(a), str(tmp_path / "missing.safetensors"), str(b)]).start()
    assert ra.wait() == a.stat().st_size + b.stat().st_size
    assert cached_pages(a) == a.stat().st_size // PAGE
    assert cached_pages(b) == b.stat().st_size // PAGE


def test_the_budget_and_a_share_bound_what_is_read(tmp_path):
    a = evicted_file(tmp_path / "a.safetensors", 4 * CHUNK)
    assert ReadAhead([str(a)], budget=CHUNK).start().wait() == CHUNK
    assert cached_pages(a) < 3 * CHUNK // PAGE  # the first chunk (and the kernel's own readahead past it), no more
    b = evicted_file(tmp_path / "b.safetensors", 4 * CHUNK)
    assert ReadAhead([str(b)], share=(1, 2)).start().wait() == 2 * CHUNK
    assert cached_pages(b) >= 2 * CHUNK // PAGE  # chunks 1 and 3 at least


def test_stopped_at_once_it_reads_no_further(tmp_path):
    a = evicted_file(tmp_path / "a.safetensors", 8 * CHUNK)
    before = cached_pages(a)
    ra = ReadAhead([str(a)])
    ra._stop.set()  # stopped before its threads ask for anything
    assert ra.start().wait() == 0
    assert cached_pages(a) == before
    with ReadAhead([]) as nothing:
        pass
    assert nothing.requested == 0


@pytest.mark.parametrize(("env", "world", "expect"), [
    ({}, 1, (["a"], (0, 1))),  # a lone process reads all
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 4, (["a"], (1, 4))),  # one node: every 4th chunk from 1
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 8, ([], (0, 1))),  # two nodes: nothing
    ({"LOCAL_WORLD_SIZE": "4"}, 4, ([], (0, 1))),  # no LOCAL_RANK: nothing
])
def test_launched_ranks_share_the_reading_ahead(monkeypatch, env, world, expect):
    import launch.dist

    seen: list[tuple[list[str], tuple[int, int]]] = []

    class Recorder(ReadAhead):
        def __init__(self, paths, budget=None, share=(0, 1), threads=1):
            seen.append((list(paths), share))
            super().__init__([], budget, share, threads)

    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launch.dist, "ReadAhead", Recorder)
    launch.dist._import_torch_reading_ahead(["a"], world)
    assert seen == [expect]
