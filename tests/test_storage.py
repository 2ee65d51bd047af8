"""Storage's local fast paths: write-behind hands written ranges to the kernel and never changes bytes."""

import os
import subprocess
import sys

import pytest

from convert.io import storage
from convert.io.storage import Storage


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_write_behind_is_live_on_linux():
    assert storage.WRITE_BEHIND and storage._sync_file_range is not None, "the C library's sync_file_range was not found"
    code = "import convert.io.storage as s; print(s._sync_file_range is None)"
    off = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOE_CONVERT_WRITE_BEHIND": "0"},
                         capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "True", "MOE_CONVERT_WRITE_BEHIND=0 must turn it off"


def test_start_writeback_keeps_the_bytes(tmp_path):
    data = os.urandom(3 << 20)
    st = Storage(str(tmp_path))
    st.create_sized("out.bin", b"head", 4 << 20)
    st.pwrite("out.bin", 1 << 20, data)
    assert storage._sync_file_range is None or storage._sync_file_range(
        st._fd("out.bin", os.O_WRONLY), 1 << 20, len(data), storage._SYNC_FILE_RANGE_WRITE) == 0
    st.start_writeback("out.bin", 1 << 20, (1 << 20) + len(data))
    st.start_writeback("out.bin", 0, 0)
    st.fsync("out.bin")
    st.close()
    got = (tmp_path / "out.bin").read_bytes()
    assert got[:4] == b"head" and got[1 << 20 :] == data and len(got) == 4 << 20
