"""Unit tests of the pure planning pieces: EP slices, piece assignment, shard layout, multipart parts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.synthetic import checkpoint_specs, write_synthetic
from convert.families import load_families
from convert.formats.checkpoint import open_checkpoint
from convert.formats.shard_layout import layout_files
from convert.io.storage import Storage
from convert.plan.base import plan_conversion
from sharding.ep import assign_pieces, expert_slices
from sharding.file_layout import parse_size
from sharding.parts import _cuts, plan_parts


@pytest.mark.parametrize("E, ep", [(128, 8), (5, 2), (5, 3), (3, 5), (7, 7), (128, 16)])
def test_expert_slices_cover_every_expert_once(E, ep):
    slices = expert_slices(E, ep)
    assert len(slices) == ep
    assert [e for r in slices for e in r] == list(range(E))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("25KB") == 25_000
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("five gigs")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    specs, config = checkpoint_specs("tiny", layers=3, experts=6)
    write_synthetic(str(root), specs, config, 40_000)
    ckpt = open_checkpoint(Storage(str(root)))
    return plan_conversion(ckpt, load_families()["qwen3_moe"], "transformers")


@pytest.mark.parametrize("ep, world", [(1, 1), (2, 2), (4, 2), (3, 2), (6, 3), (16, 4)])
def test_assignment_owns_experts_by_slice(plan, ep, world):
    assignment = assign_pieces(plan.pieces, plan.num_experts, ep, world)
    flat = sorted(i for idx in assignment for i in idx)
    assert flat == list(range(len(plan.pieces))), "every piece exactly once"
    slices = expert_slices(plan.num_experts, ep)
    for rank, idx in enumerate(assignment):
        for i in idx:
            e = plan.pieces[i].expert
            if e is not None:
                s = next(k for k, r in enumerate(slices) if e in r)
                assert s % world == rank


def test_layout_places_every_byte_once(plan):
    files = layout_files(plan.targets, 30_000, {"format": "pt"})
    assert len(files) > 1
    for f in files:
        spans = sorted((s.start, s.end) for s in f.slots.values())
        assert spans[0][0] == len(f.header)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "tensors must be contiguous"
        assert spans[-1][1] == f.size
    names = [n for f in files for n in f.slots]
    assert sorted(names) == sorted(t.name for t in plan.targets)
    # pieces write every byte of every tensor exactly once
    covered = {}
    for p in plan.pieces:
        for w in p.writes:
            covered.setdefault(w.tensor, []).append((w.start, w.end))
    for t in plan.targets:
        spans = sorted(covered[t.name])
        assert spans[0][0] == 0 and spans[-1][1] == t.nbytes
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), t.name


@pytest.mark.parametrize("world", [1, 2, 3])
def test_parts_tile_files_and_respect_minimum(plan, world):
    files = layout_files(plan.targets, 10**9, {"format": "pt"})
    assignment = assign_pieces(plan.pieces, plan.num_experts, world, world)
    parts = plan_parts(files, plan.pieces, assignment, min_part=4000, max_part=20000)
    for f in files:
        mine = [p for p in parts if p.file == f.name]
        assert [p.number for p in mine] == list(range(1, len(mine) + 1))
        assert mine[0].start == 0 and mine[-1].end == f.size
        assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
        assert all(4000 <= p.end - p.start <= 20000 for p in mine[:-1])
    if world > 1:
        assert len({p.owner for p in parts}) == world, "every rank should own some parts"


def test_choose_max_part_sizes_parts_to_the_job():
    from sharding.parts import MAX_PART, MIN_PART, PART_FLOOR, PART_MEMORY, PARTS_PER_THREAD, choose_max_part

    assert choose_max_part(100 << 30, 1, 1) == MAX_PART  # a large job over one connection: the largest parts
    assert choose_max_part(1, 1, 1) == PART_FLOOR
    assert choose_max_part(100 << 30, 1, 1024) == MIN_PART  # memory first, down to S3's minimum
    for total, ranks, threads in [(1 << 30, 4, 16), (3 << 30, 2, 8), (200 << 20, 1, 2), (100 << 30, 1, 64)]:
        size = choose_max_part(total, ranks, threads)
        assert MIN_PART <= size <= MAX_PART
        # A rank's part buffers stay bounded; within that, every upload thread gets its share of parts
        # unless that would make parts smaller than the floor (or the memory bound is lower still).
        assert 3 * threads * size <= PART_MEMORY or size == MIN_PART
        memory_cap = max(MIN_PART, PART_MEMORY // (3 * threads))
        assert total // size >= ranks * threads * PARTS_PER_THREAD or size >= PART_FLOOR or size == memory_cap


def test_group_pieces_keeps_order_and_bounds_group_reads(plan):
    from convert.engine.executor import group_pieces

    groups = group_pieces(plan.pieces, 1 << 20)
    assert [i for g in groups for i in g] == list(range(len(plan.pieces)))
    for g in groups:
        assert len(g) == 1 or sum(plan.pieces[i].read_bytes for i in g) <= 1 << 20


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9000), st.integers(0, 2)), min_size=1, max_size=60), st.integers(0, 500),
       st.integers(1000, 5000), st.integers(1, 4))
def test_cuts_hold_whole_pieces_where_the_sizes_allow(pieces, header, min_part, span):
    """Parts tile the file, every part but the last holds min_part..max_part bytes, and a part ends inside a piece
    only where no piece starts in the window a part may end in."""
    max_part = min_part * span + 10
    spans, at = [(0, header, 0, -1)], header
    for i, (n, rank) in enumerate(pieces):
        spans.append((at, at + n, rank, i))
        at += n
    cuts = _cuts(spans, at, min_part, max_part)
    assert cuts[0] == 0 and cuts[-1] == at and cuts == sorted(set(cuts))
    assert all(min_part <= b - a <= max_part for a, b in zip(cuts[:-2], cuts[1:-1]))
    assert cuts[-1] - cuts[-2] <= max_part
    starts = {s[0] for s in spans[1:]}
    for a, b in zip(cuts, cuts[1:-1]):
        if b not in starts:
            window = [s for s in starts if a + min_part <= s <= a + max_part and at - s >= min_part]
            assert not window, (a, b, window)
