"""Keep large transient buffers out of the heap so a rank's RSS stays at what it holds now.

glibc raises its mmap threshold after large frees, after which multi-MB piece buffers
come from per-thread heap arenas that are never given back: RSS grows with the job.
Pinning the threshold keeps every buffer >= 1 MiB in its own mapping, freed at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3


@functools.cache
def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve allocations of at least `nbytes` by mmap; returns False where not glibc.

    Done once per process; glibc is opened by its soname first (find_library runs `ldconfig -p`).
    """
    for find in (lambda: "libc.so.6", lambda: ctypes.util.find_library("c")):
        name = find()
        try:
            return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, nbytes)) if name else False
        except (OSError, AttributeError):
            continue
    return False
