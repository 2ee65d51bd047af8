"""Tensors saved in chunks (convert.formats.chunks) and torch DCP records (convert.formats.dcp), against torch."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from convert.errors import ConversionError
from convert.formats.checkpoint import open_checkpoint
from convert.formats.chunks import Chunk, ChunkedTensor, ChunkedView
from convert.io.storage import Storage
from helpers import raw_bytes


class _Files:
    """A stand-in storage holding files in memory (read_range / read_into / display only)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self.files[rel][start:end]

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        out[:] = self.files[rel][start : start + out.nbytes]

    def display(self, rel: str = "") -> str:
        return rel


def _boxes(shape: tuple[int, ...], rng: random.Random) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A random grid of boxes tiling `shape` (cuts along up to every dim)."""
    cuts = [sorted({0, d, *rng.sample(range(1, d), min(d - 1, rng.randint(0, 2)))}) if d > 1 else [0, d]
            for d in shape]
    return [(tuple(lo for lo, _ in edges), tuple(hi - lo for lo, hi in edges))
            for edges in itertools.product(*[list(zip(c, c[1:])) for c in cuts])]


@pytest.mark.parametrize("seed", range(12))
def test_any_byte_range_of_a_chunked_tensor_reads_as_the_tensor(seed):
    rng = random.Random(seed)
    shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3)))
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.int16).reshape(shape)
    files: dict[str, bytes] = {}
    chunks = []
    boxes = _boxes(shape, rng)
    rng.shuffle(boxes)
    for k, (off, size) in enumerate(boxes):
        piece = full[tuple(slice(o, o + s) for o, s in zip(off, size))].contiguous()
        name = f"f{k % 2}"
        start = len(files.get(name, b"")) + 3
        files[name] = files.get(name, b"") + b"xyz" + raw_bytes(piece)
        chunks.append(Chunk(name, start, off, size))
    t = ChunkedTensor("t", "I16", shape, 2, tuple(chunks))
    t.check_tiling(lambda c: c.file)
    view = ChunkedView(_Files(files), {"<chunks>/t": t})
    data = raw_bytes(full)
    for _ in range(30):
        a, b = sorted(rng.sample(range(0, len(data) // 2 + 1), 2))
        assert view.read_range("<chunks>/t", 2 * a, 2 * b) == data[2 * a : 2 * b]
        out = bytearray(2 * (b - a))
        view.read_into("<chunks>/t", 2 * a, memoryview(out))
        assert bytes(out) == data[2 * a : 2 * b]
        ranges = t.file_ranges(2 * a, 2 * b)
        assert ranges is not None
        assert b"".join(files[f][x:y] for f, x, y in ranges) == data[2 * a : 2 * b]


def test_chunks_that_overlap_or_leave_a_gap_are_refused():
    over = ChunkedTensor("w", "F32", (4, 2), 4, (Chunk("a", 0, (0, 0), (3, 2)), Chunk("b", 0, (2, 0), (2, 2))))
    with pytest.raises(ConversionError, match="'w'.*overlaps"):
        over.check_tiling(lambda c: c.file)
    gap = ChunkedTensor("w", "F32", (4, 2), 4, (Chunk("a", 0, (0, 0), (1, 2)), Chunk("b", 0, (2, 0), (2, 2))))
    with pytest.raises(ConversionError, match="'w'.*unsaved"):
        gap.check_tiling(lambda c: c.file)


def test_dcp_records_are_read_raw_or_whole_as_torch_loads_them(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {
        "plain": torch.randn(5, 3),
        "bf16": torch.randn(4, 6).to(torch.bfloat16),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # saved with its strides: read whole, then made contiguous
        "int8": torch.arange(-5, 5, dtype=torch.int8),
        "scalar": torch.tensor(3.5),
    }
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    ckpt = open_checkpoint(Storage(str(tmp_path)))
    assert ckpt.container == "torch-dcp"
    assert set(ckpt.tensors) == set(state)
    assert list(ckpt.chunked) == ["<chunks>/transposed"]  # the one tensor whose bytes are not one range
    for name, t in state.items():
        ref = ckpt.tensors[name]
        assert ref.info.shape == tuple(t.shape)
        assert ckpt.storage.read_range(ref.file, ref.info.start, ref.info.end) == raw_bytes(t.reshape(-1)), name


def test_a_malicious_metadata_pickle_is_refused_without_running_it(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Boom()))
    (tmp_path / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"\.metadata: cannot read it.*builtins\.print"):
        open_checkpoint(Storage(str(tmp_path)))


def test_a_flat_hf_state_dict_keeps_every_tensor_and_a_model_group_only_its_own(tmp_path):
    import torch.distributed.checkpoint as dcp

    from convert.formats.dcp import model_entries

    flat = {"model.embed_tokens.weight": torch.ones(2), "lm_head.weight": torch.zeros(2)}
    dcp.save(flat, checkpoint_id=str(tmp_path / "flat"), no_dist=True)
    assert sorted(open_checkpoint(Storage(str(tmp_path / "flat"))).tensors) == sorted(flat)
    grouped = {"model": {"lm_head.weight": torch.zeros(2)}, "optimizer": {"state": {"m": torch.ones(1)}}}
    dcp.save(grouped, checkpoint_id=str(tmp_path / "grouped"), no_dist=True)
    ckpt = open_checkpoint(Storage(str(tmp_path / "grouped")))
    assert list(ckpt.tensors) == ["lm_head.weight"] and "optimizer 1" in ckpt.notes[0]
    # without planner data, a `model.` prefix is a group only beside training state
    assert sorted(model_entries(["model.a", "lm_head.w"])[0]) == ["lm_head.w", "model.a"]
    assert sorted(model_entries(["model.a", "optimizer.m"])[0]) == ["a"]
