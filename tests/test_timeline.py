"""bench.timeline: what the disk and CPUs did while a case ran, from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.timeline import Timeline, block_device, summary

pytestmark = pytest.mark.skipif(not Path("/proc/diskstats").exists(), reason="Linux /proc only")


def test_timeline_sees_a_synced_write_and_a_busy_core(tmp_path):
    """64 MB written and fsynced by a child that then spins a core: the timeline's write rate over the case adds up
    to at least those bytes (the device's completed sectors) where the directory is on a block device, its busy
    time to at least the spin, and its last sample is the case's end."""
    dev = block_device(tmp_path)
    code = ("import os, time\n"
            f"fd = os.open({str(tmp_path / 'f')!r}, os.O_WRONLY | os.O_CREAT)\n"
            "os.write(fd, os.urandom(64 << 20)); os.fsync(fd); os.close(fd)\n"
            "t = time.perf_counter()\n"
            "while time.perf_counter() - t < 0.6: pass\n")
    with Timeline(tmp_path, 0.1) as tl:
        subprocess.run([sys.executable, "-c", code], check=True)
    res = tl.result()
    if dev is None:  # an overlay or tmpfs: nothing to sample
        assert res == {}
        return
    n = len(res["t"])
    assert n >= 5 and all(len(res[k]) == n for k in ("read_mb_s", "write_mb_s", "busy", "iowait", "dirty_mb"))
    dts = [b - a for a, b in zip([0.0, *res["t"]], res["t"])]
    written_mb = sum(w * dt for w, dt in zip(res["write_mb_s"], dts))
    assert written_mb >= 0.95 * 64 * 2**20 / 1e6, written_mb
    assert sum(b * dt for b, dt in zip(res["busy"], dts)) >= 0.5
    assert "write" in summary(res) and summary({}) == "-"


def test_no_interval_samples_nothing(tmp_path):
    with Timeline(tmp_path, 0.0) as tl:
        os.listdir(tmp_path)
    assert tl.result() == {}
