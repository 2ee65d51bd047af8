"""convert.engine.part_fill: upload parts grouped by the source bytes they share, and filled by one request per run."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from convert.engine.part_fill import Copy, group_parts, new_buffers, read_run, read_runs
from convert.io.storage import Storage
from sharding.parts import Part


@st.composite
def part_sets(draw: st.DrawFn) -> tuple[list[int], list[Copy]]:
    """Parts (their sizes) filled by copies from two source files; a source byte range may be cut across parts,
    and a few source bytes go to two places (overlapping copies)."""
    sizes = [draw(st.integers(1, 40)) for _ in range(draw(st.integers(1, 12)))]
    slots = [(k, at) for k, n in enumerate(sizes) for at in range(n)]
    order = draw(st.permutations(range(len(slots))))
    copies, pos = [], {"a": 0, "b": 0}
    i = 0
    while i < len(order):
        n = draw(st.integers(1, 8))
        f = draw(st.sampled_from("ab"))
        for j in order[i : i + n]:  # a run of n source bytes, each copied to a drawn place of a part
            k, at = slots[j]
            copies.append(Copy(f, pos[f], 1, k, at))
            pos[f] += 1
        pos[f] += draw(st.sampled_from([0, 0, 3]))
        i += n
    if copies and draw(st.booleans()):  # one source byte read twice
        c = copies[0]
        copies[-1] = copies[-1]._replace(file=c.file, start=c.start)
    return sizes, copies


@settings(max_examples=300, deadline=None)
@given(part_sets(), st.integers(1, 120))
def test_groups_hold_every_part_once_within_the_budget_and_join_touching_sources(case, budget):
    sizes, copies = case
    groups = group_parts(sizes, copies, budget)
    assert sorted(k for g in groups for k in g) == list(range(len(sizes)))
    assert groups == sorted(groups) and all(g == sorted(g) for g in groups)
    group_of = {k: n for n, g in enumerate(groups) for k in g}
    for g in groups:
        assert len(g) == 1 or sum(sizes[k] for k in g) <= budget
    # two parts whose source bytes touch are apart only where joining them would pass the budget (where a byte
    # is read twice, the bytes after it continue the first copy that reached that far)
    holder: Copy | None = None
    for c in sorted(copies):
        if holder is not None and holder.file == c.file and holder.start + holder.n == c.start:
            ga, gb = group_of[holder.part], group_of[c.part]
            assert ga == gb or sum(sizes[k] for k in groups[ga] + groups[gb]) > budget
        if holder is None or holder.file != c.file or c.start + c.n > holder.start + holder.n:
            holder = c


@settings(max_examples=300, deadline=None)
@given(part_sets(), st.integers(1, 30))
def test_runs_cover_every_byte_once_touch_inside_and_keep_to_their_size(case, max_bytes):
    _, copies = case
    runs = read_runs(copies, max_bytes)
    moved = sorted((c.part, c.at + i, c.file, c.start + i) for r in runs for c in r for i in range(c.n))
    assert moved == sorted((c.part, c.at, c.file, c.start) for c in copies)  # the drawn copies are single bytes
    for run in runs:
        assert sum(c.n for c in run) <= max_bytes
        assert all(a.file == b.file and a.start + a.n == b.start for a, b in zip(run, run[1:]))
    for a, b in zip(runs, runs[1:]):  # a run ends where the bytes stop touching, or where it is full
        if a[-1].file == b[0].file and a[-1].start + a[-1].n == b[0].start:
            assert sum(c.n for c in a) == max_bytes


def test_a_run_is_cut_inside_a_copy_with_its_destination():
    runs = read_runs([Copy("f", 10, 25, 0, 5), Copy("f", 35, 5, 1, 0)], 12)
    assert [[tuple(c) for c in r] for r in runs] == [
        [("f", 10, 12, 0, 5)], [("f", 22, 12, 0, 17)], [("f", 34, 1, 0, 29), ("f", 35, 5, 1, 0)]]


def test_runs_put_every_byte_at_its_place(tmp_path):
    """Parts of two output files, each with a header, filled run by run from a local source file: byte for byte
    what the copies say."""
    src = os.urandom(4000)
    (tmp_path / "s.bin").write_bytes(src)
    parts = [Part("o1", 1, 0, 100, 0, ()), Part("o1", 2, 100, 180, 0, ()), Part("o2", 1, 0, 60, 0, ())]
    copies = [Copy("s.bin", 500, 70, 0, 30), Copy("s.bin", 570, 80, 1, 0), Copy("s.bin", 10, 50, 2, 10),
              Copy("s.bin", 500, 5, 2, 0)]  # bytes 500-505 go to two places
    bufs = new_buffers(parts, [0, 1, 2], {"o1": b"H" * 30, "o2": b"h" * 10})
    for run in read_runs(copies, 64):
        read_run(Storage(str(tmp_path)), run, bufs)
    assert bytes(bufs[0]) == b"H" * 30 + src[500:570]
    assert bytes(bufs[1]) == src[570:650]
    assert bytes(bufs[2]) == src[500:505] + b"h" * 5 + src[10:60]
