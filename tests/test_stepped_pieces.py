"""Stepped pieces (convert.plan.base.SteppedCompute, convert.engine.executor): a piece of several experts reads
each expert's bytes as its step needs them and writes the step's outputs before the next step reads, so that a
rank's reads and writes take turns; the bytes are those of the whole-piece path."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from convert.engine.executor import Executor, LazyReads, piece_outputs
from convert.formats.safetensors import TensorSlot
from convert.io.storage import Storage
from convert.plan.base import Piece, Read, Write, is_stepped

STEP = 1000  # bytes of one step's read and write


@dataclass(frozen=True)
class AddShared:
    """Step i writes read i plus the last read (a factor every step uses), byte by byte, mod 256."""

    steps_: int

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[bytes]:
        return [out for step in self.steps(bufs) for out in step]

    def steps(self, bufs: Sequence[bytes | memoryview]) -> Iterator[list[bytes]]:
        for i in range(self.steps_):
            own = np.frombuffer(bufs[i], np.uint8)
            yield [(own + np.frombuffer(bufs[self.steps_], np.uint8)).tobytes()]


class Recording:
    """Wraps a local store's reads and its positional writes, recording ("read", offset) / ("write", tensor)."""

    def __init__(self, src: Storage, dst: Storage) -> None:
        self.events: list[tuple[str, object]] = []
        read_into, files = src.read_into, dst.positional
        assert files is not None
        pwrite = files.pwrite

        def recorded_read(rel: str, start: int, out: memoryview) -> None:
            self.events.append(("read", start))
            read_into(rel, start, out)

        def recorded_write(rel: str, offset: int, data: bytes | memoryview) -> None:
            self.events.append(("write", offset))
            pwrite(rel, offset, data)

        src.read_into = recorded_read  # type: ignore[method-assign]
        files.pwrite = recorded_write  # type: ignore[method-assign]


def _case(tmp_path: Path, steps: int) -> tuple[Storage, Storage, Piece, dict[str, tuple[str, TensorSlot]], bytes]:
    data = np.random.default_rng(0).integers(0, 256, (steps + 1) * STEP, dtype=np.uint8).tobytes()
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src" / "in.bin").write_bytes(data)
    src, dst = Storage(str(tmp_path / "src")), Storage(str(tmp_path / "dst"))
    assert dst.positional is not None
    dst.positional.create_sized("out.bin", b"", steps * STEP)
    reads = tuple(Read("in.bin", i * STEP, (i + 1) * STEP, "U8") for i in range(steps + 1))
    writes = tuple(Write(f"t{i}", 0, STEP, "U8") for i in range(steps))
    slots = {f"t{i}": ("out.bin", TensorSlot(f"t{i}", "U8", (STEP,), i * STEP, (i + 1) * STEP)) for i in range(steps)}
    return src, dst, Piece(reads, writes, AddShared(steps)), slots, data


def test_each_step_is_written_before_the_next_step_reads(tmp_path: Path) -> None:
    src, dst, piece, slots, data = _case(tmp_path, 3)
    rec = Recording(src, dst)
    assert is_stepped(piece.regroup)
    assert Executor(src, dst, slots, workers=1).run_piece(piece) == 3 * STEP
    shared = 3 * STEP
    assert rec.events == [("read", 0), ("read", shared), ("write", 0),
                          ("read", STEP), ("write", STEP),
                          ("read", 2 * STEP), ("write", 2 * STEP)]
    expected = b"".join(piece_outputs(src, piece))  # the whole-piece path: every read first, then the outputs
    assert (tmp_path / "dst" / "out.bin").read_bytes() == expected
    x, f = np.frombuffer(data, np.uint8), np.frombuffer(data[shared:], np.uint8)
    assert expected == b"".join((x[i * STEP:(i + 1) * STEP] + f).tobytes() for i in range(3))


def test_the_disk_is_started_on_each_steps_writes(tmp_path: Path) -> None:
    src, dst, piece, slots, _ = _case(tmp_path, 3)
    assert dst.positional is not None
    started: list[tuple[str, int, int]] = []
    dst.positional.start_writeback = lambda rel, a, b: started.append((rel, a, b))  # type: ignore[method-assign]
    Executor(src, dst, slots, workers=1).run_piece(piece)
    assert started == [("out.bin", i * STEP, (i + 1) * STEP) for i in range(3)]


def test_lazy_reads_read_each_range_once_on_first_use(tmp_path: Path) -> None:
    src, dst, piece, _, data = _case(tmp_path, 3)
    rec = Recording(src, dst)
    bufs = LazyReads(src, piece.reads)
    assert rec.events == [] and len(bufs) == 4
    assert bytes(bufs[-1]) == data[3 * STEP:]
    assert [bytes(b) for b in bufs[1:3]] == [data[STEP:2 * STEP], data[2 * STEP:3 * STEP]]
    assert bytes(bufs[3]) == data[3 * STEP:]
    assert rec.events == [("read", 3 * STEP), ("read", STEP), ("read", 2 * STEP)]
    with pytest.raises(IndexError):
        bufs[4]


@dataclass(frozen=True)
class ShortOfWrites(AddShared):
    def steps(self, bufs: Sequence[bytes | memoryview]) -> Iterator[list[bytes]]:
        yield from list(super().steps(bufs))[:-1]


def test_a_stepped_compute_that_leaves_writes_unwritten_is_an_error(tmp_path: Path) -> None:
    src, dst, piece, slots, _ = _case(tmp_path, 3)
    short = Piece(piece.reads, piece.writes, ShortOfWrites(3))
    with pytest.raises(AssertionError, match="2 outputs, 3 writes"):
        Executor(src, dst, slots, workers=1).run_piece(short)


@dataclass(frozen=True)
class ExtraStep(AddShared):
    def steps(self, bufs: Sequence[bytes | memoryview]) -> Iterator[list[bytes]]:
        yield from super().steps(bufs)
        yield [b"x"]


def test_a_stepped_compute_with_more_outputs_than_writes_is_an_error(tmp_path: Path) -> None:
    src, dst, piece, slots, _ = _case(tmp_path, 2)
    extra = Piece(piece.reads, piece.writes, ExtraStep(2))
    with pytest.raises(AssertionError, match="a step gave 1 outputs, 0 writes left"):
        Executor(src, dst, slots, workers=1).run_piece(extra)
