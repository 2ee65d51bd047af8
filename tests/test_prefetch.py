"""convert.engine.executor.Prefetcher: the source read ahead of the pieces, by a thread of its own."""

from __future__ import annotations

import threading

from convert.engine.executor import Prefetcher
from convert.plan.base import Piece, Read, Write


class BlockingSource:
    """A local source whose read-ahead requests wait until `release` is set; the first one can fail."""

    remote = False

    def __init__(self, fail_first: bool = False) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()  # a request is under way
        self.requests: list[tuple[str, int, int]] = []
        self.fail_first = fail_first

    def prefetch(self, file: str, start: int, end: int) -> None:
        self.entered.set()
        self.release.wait()
        self.requests.append((file, start, end))
        if self.fail_first and len(self.requests) == 1:
            raise OSError("read ahead refused")


def _pieces(n: int, size: int) -> list[Piece]:
    return [Piece(reads=[Read("a.safetensors", i * size, (i + 1) * size, "BF16")],
                  writes=[Write(f"t{i}", 0, size, "BF16")]) for i in range(n)]


def test_reached_never_waits_for_the_disk_and_every_byte_is_asked_for_once_in_order():
    """With the source's read-ahead blocked, reached() still returns for every piece; once it is released, the
    requests (merged where they touch) cover each piece's bytes exactly once, in file order, a window ahead."""
    src = BlockingSource()
    pieces = _pieces(20, 1 << 20)
    ahead = Prefetcher(src, pieces, window=4 << 20)  # type: ignore[arg-type]
    caller = threading.Thread(target=lambda: [ahead.reached(i) for i in range(len(pieces))])
    caller.start()
    caller.join(timeout=10)
    stuck = caller.is_alive()  # the caller made a request itself and waits on the disk
    before = list(src.requests)
    src.release.set()
    caller.join()
    assert not stuck and before == []
    ahead.close()
    covered = [b for _, a, e in src.requests for b in range(a >> 20, e >> 20)]
    assert covered == list(range(20))
    assert all(e - a >= 2 << 20 for _, a, e in src.requests[:-1])  # half-window steps, not one per piece


def test_a_failed_request_is_dropped_and_the_rest_still_made():
    src = BlockingSource(fail_first=True)
    src.release.set()
    with Prefetcher(src, _pieces(10, 1 << 20), window=2 << 20) as ahead:  # type: ignore[arg-type]
        for i in range(10):
            ahead.reached(i)
    assert len(src.requests) > 1 and src.requests[-1][2] == 10 << 20


def test_after_a_failure_the_requests_left_are_dropped():
    """Leaving the `with` on an exception (a piece failed) joins the thread without making the requests still
    queued: only the one already under way completes."""
    src = BlockingSource()
    try:
        with Prefetcher(src, _pieces(40, 1 << 20), window=4 << 20) as ahead:  # type: ignore[arg-type]
            for i in range(40):
                ahead.reached(i)
            assert src.entered.wait(10)
            threading.Timer(0.2, src.release.set).start()
            raise RuntimeError("a piece failed")
    except RuntimeError:
        pass
    assert len(src.requests) == 1


def test_no_window_asks_nothing():
    """A window of 0 (MOE_CONVERT_READ_AHEAD=0): no read-ahead request at all, and no thread started."""
    src = BlockingSource()
    src.release.set()
    with Prefetcher(src, _pieces(10, 1 << 20), window=0) as ahead:  # type: ignore[arg-type]
        for i in range(10):
            ahead.reached(i)
        assert ahead._thread is None
    assert src.requests == []
