"""Storage's local fast paths (write-behind hands written ranges to the kernel and never changes bytes), range
merging and fetch, and the store protocol (convert.io.storage.store): small, and every kind conforms."""

import os
import sys

import pytest

from convert.io import storage
from convert.io.storage import Storage, local_storage
from convert.settings import Settings


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_write_behind_is_live_on_linux(tmp_path, monkeypatch):
    """On by default; MOE_CONVERT_WRITE_BEHIND=0, read by the entry point (Settings.from_env), turns it off for the
    stores opened with those settings."""
    assert local_storage._sync_file_range is not None, "the C library's sync_file_range was not found"
    calls: list[int] = []

    def sync_file_range(fd: int, start: int, n: int, flags: int) -> int:
        calls.append(n)
        return 0

    monkeypatch.setattr(local_storage, "_sync_file_range", sync_file_range)
    for env, want in (({}, [4096]), ({"MOE_CONVERT_WRITE_BEHIND": "0"}, [])):
        calls.clear()
        st = Storage(str(tmp_path), settings=Settings.from_env(env).storage)
        st.positional.create_sized("out.bin", b"", 8192)
        st.positional.start_writeback("out.bin", 0, 4096)
        st.close()
        assert calls == want, (env, calls)


def test_start_writeback_keeps_the_bytes(tmp_path):
    data = os.urandom(3 << 20)
    st = Storage(str(tmp_path))
    st.positional.create_sized("out.bin", b"head", 4 << 20)
    st.positional.pwrite("out.bin", 1 << 20, data)
    assert local_storage._sync_file_range is None or local_storage._sync_file_range(
        st._fd("out.bin", os.O_WRONLY), 1 << 20, len(data), local_storage._SYNC_FILE_RANGE_WRITE) == 0
    st.positional.start_writeback("out.bin", 1 << 20, (1 << 20) + len(data))
    st.positional.start_writeback("out.bin", 0, 0)
    st.positional.fsync("out.bin")
    st.close()
    got = (tmp_path / "out.bin").read_bytes()
    assert got[:4] == b"head" and got[1 << 20 :] == data and len(got) == 4 << 20


def test_merge_ranges_joins_touching_and_overlapping_reads_within_the_limit():
    ranges = [("a", 10, 30), ("a", 0, 10), ("b", 0, 3), ("a", 40, 50), ("a", 45, 60), ("a", 60, 61), ("b", 3, 3)]
    assert storage.merge_ranges(ranges, 12) == [("a", 0, 10), ("a", 10, 30), ("a", 40, 60), ("a", 60, 61), ("b", 0, 3)]
    assert storage.merge_ranges(ranges, 100) == [("a", 0, 30), ("a", 40, 61), ("b", 0, 3)]
    # Every byte asked for is in exactly one merged range.
    merged = storage.merge_ranges(ranges, 12)
    for f, a, b in ranges:
        if b > a:
            assert sum(1 for g, x, y in merged if g == f and x <= a and b <= y) == 1, (f, a, b)


def test_fetch_serves_reads_from_few_large_reads(tmp_path):
    data = os.urandom(1 << 16)
    (tmp_path / "f.bin").write_bytes(data)
    st = Storage(str(tmp_path))
    calls: list[tuple[int, int]] = []
    real = st.read_range

    def counting(rel: str, start: int, end: int) -> bytes:
        calls.append((start, end))
        return real(rel, start, end)

    st.read_range = counting  # type: ignore[method-assign]
    got = storage.fetch(st, [("f.bin", 100, 200), ("f.bin", 200, 5000), ("f.bin", 9000, 9100)], max_get=1 << 20)
    assert calls == [(100, 5000), (9000, 9100)]
    assert bytes(got.read_range("f.bin", 150, 4000)) == data[150:4000]
    out = memoryview(bytearray(50))
    got.read_into("f.bin", 9010, out)
    assert bytes(out) == data[9010:9060]
    assert bytes(got.read_range("f.bin", 6000, 6100)) == data[6000:6100]  # not fetched: read through
    assert calls[-1] == (6000, 6100)
    st.close()


BUCKET = "moe-protocol"  # the s3env fixture's bucket (tests/conftest.py)


def _members(proto: type) -> set[str]:
    """The names a protocol asks for: its attributes, properties and methods (each protocol here is flat)."""
    names = {n for n in getattr(proto, "__annotations__", {}) if not n.startswith("_")}
    for name, value in vars(proto).items():
        if not name.startswith("_") and (callable(value) or isinstance(value, property)):
            names.add(name)
    return names


def test_the_store_protocol_stays_small_and_every_kind_conforms(tmp_path, s3env):
    """Store is what every kind serves (at most 28 members, capability accessors included); each capability
    protocol is small; each kind is a Store whose capability objects say what it can do (an object or None), and
    the shared base carries no stubs for what a kind cannot do."""
    from convert.io.storage import (
        ConditionalObjects,
        MultipartUploads,
        PositionalWrites,
        SourcePinning,
        Store,
    )

    assert len(_members(Store)) <= 28, sorted(_members(Store))
    assert {"pinning", "positional", "multipart", "conditional", "read_range", "url", "remote"} <= _members(Store)
    for proto in (SourcePinning, PositionalWrites, MultipartUploads, ConditionalObjects):
        assert 1 <= len(_members(proto)) <= 8, (proto.__name__, sorted(_members(proto)))
    for gone in ("pwrite", "create_sized", "put_if", "mpu_create", "expect", "pins", "positional_writes",
                 "supports_multipart", "conditional_writes", "local_paths", "fetch"):
        assert not hasattr(Storage, gone), gone

    local = Storage(str(tmp_path))
    s3 = Storage(f"s3://{BUCKET}/protocol")
    memory = Storage("memory://moe-protocol")
    for store in (local, s3, memory):
        assert isinstance(store, Store), type(store).__name__
        assert isinstance(store.pinning, SourcePinning), type(store).__name__
    assert isinstance(local.positional, PositionalWrites) and local.multipart is None and local.conditional is None
    assert not local.remote
    assert local.positional.can_copy_from(local) and not local.positional.can_copy_from(memory)
    assert s3.positional is None and s3.remote
    assert isinstance(s3.multipart, MultipartUploads) and isinstance(s3.conditional, ConditionalObjects)
    assert memory.positional is None and memory.multipart is None and memory.conditional is None
    local.close()
