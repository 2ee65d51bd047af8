"""What the machine did while a benchmark case ran: the disk's read and write rates, the CPUs' time and the dirty
page cache, sampled from /proc (Linux) every `interval` seconds in a background thread.

    with Timeline(Path("/tmp")) as tl:     # the block device that holds /tmp
        subprocess.run(...)
    row["timeline"] = tl.result()

`result()` is a dict of equal-length lists, one entry per interval: `t` (seconds since the start), `read_mb_s` and
`write_mb_s` (the device's completed sectors, MB/s), `busy` / `iowait` (cores' worth of non-idle time and of
iowait), `dirty_mb` / `writeback_mb` (/proc/meminfo), and `device` (the diskstats name); empty where /proc has no
such entries (another OS, a path on no block device).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's own size


def block_device(path: Path) -> str | None:
    """The /proc/diskstats name of the device holding `path` (its whole disk where `path` is on a partition), or
    None where there is none."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if not sys_dev.exists():
        return None
    real = sys_dev.resolve()
    if (real / "partition").exists():  # a partition: count its disk, whose queue it shares
        real = real.parent
    return real.name


def _disk_sectors(name: str) -> tuple[int, int] | None:
    """(sectors read, sectors written) of device `name` so far, or None."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 9 and f[2] == name:
            return int(f[5]), int(f[9])
    return None


def _cpu_ticks() -> tuple[int, int, int]:
    """(all, idle, iowait) clock ticks of every CPU so far."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(f[:8]), f[3], f[4]


def _meminfo_mb(*keys: str) -> list[float]:
    """The /proc/meminfo values of `keys`, in MB."""
    vals = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, rest = line.partition(":")
        vals[k] = int(rest.split()[0]) * 1024 / 1e6
    return [round(vals.get(k, 0.0), 1) for k in keys]


class Timeline:
    """Samples /proc while its block runs (a context manager; an `interval` of 0 samples nothing); `result()`
    after it."""

    def __init__(self, path: Path, interval: float = 0.25) -> None:
        self.device = block_device(path) if Path("/proc/diskstats").exists() else None
        self.interval = interval
        self._stop = threading.Event()
        self._rows: list[tuple[float, float, float, float, float, float, float]] = []
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)

    def __enter__(self) -> Timeline:
        if self.device and self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        assert self.device
        t0 = prev_t = time.perf_counter()
        prev_d = _disk_sectors(self.device) or (0, 0)
        prev_c = _cpu_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        stopped = False
        while not stopped:  # a last sample when stopped: the case's end
            stopped = self._stop.wait(self.interval)
            now = time.perf_counter()
            d, c = _disk_sectors(self.device) or prev_d, _cpu_ticks()
            dt = now - prev_t
            total, idle, iowait = (c[i] - prev_c[i] for i in range(3))
            self._rows.append((round(now - t0, 3), round((d[0] - prev_d[0]) * SECTOR / 1e6 / dt, 1),
                               round((d[1] - prev_d[1]) * SECTOR / 1e6 / dt, 1),
                               round((total - idle - iowait) / hz / dt, 2), round(iowait / hz / dt, 2),
                               *_meminfo_mb("Dirty", "Writeback")))
            prev_t, prev_d, prev_c = now, d, c

    def result(self) -> dict[str, Any]:
        """The samples as lists (module docstring); an empty dict where nothing was sampled."""
        if not self._rows:
            return {}
        cols = list(zip(*self._rows))
        keys = ("t", "read_mb_s", "write_mb_s", "busy", "iowait", "dirty_mb", "writeback_mb")
        return {"device": self.device, "interval": self.interval, **{k: list(v) for k, v in zip(keys, cols)}}


def summary(tl: dict[str, Any]) -> str:
    """One line of a timeline: the mean read and write MB/s, busy and iowait cores over the case, the most dirty
    page cache at any sample."""
    if not tl:
        return "-"
    dts = [b - a for a, b in zip([0.0, *tl["t"]], tl["t"])]  # each sample's own interval (the last is shorter)
    mean = {k: sum(v * dt for v, dt in zip(tl[k], dts)) / tl["t"][-1]
            for k in ("read_mb_s", "write_mb_s", "busy", "iowait")}
    return (f"read {mean['read_mb_s']:.0f} MB/s, write {mean['write_mb_s']:.0f} MB/s, "
            f"{mean['busy']:.1f} cores busy, {mean['iowait']:.1f} in iowait, peak dirty {max(tl['dirty_mb']):.0f} MB")
