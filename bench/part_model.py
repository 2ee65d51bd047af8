"""A model of one rank's S3 -> S3 data phase: how the part planner and the grouped fill meet latency.

    python -m bench.part_model [--experts 2,21,100,400] [--ranks 1,1,1,4] [--workers 1,4,16,16]
                               [--latency-ms 320,800] [--conn-mbps 5] [--layers 1] [--vocab 1000]

For each case, plans a fuse of a synthetic per-expert `qwen3-30b-a3b` checkpoint (metadata only: sparse files in
a temporary directory), takes rank 0's multipart parts as MultipartSink would, and replays its pipeline as
discrete events: `workers` readers take the fill tasks in order (one GET per run of touching source bytes, each
paying the mean first-byte latency plus its bytes at the per-connection rate), a part uploads once its last task
ends (on `workers` upload connections, the same cost), and a group opens only while the byte budget has room.
Prints the modelled data phase of each variant: parts filled one by one (the fill before grouping) and the
grouped fill, each with the part cuts of sharding.parts (pieces whole) and with cuts every max part. On the lent
machine the model was within 2% of bench.s3's measured data phase at 1 x 1 and 1 x 4 (bench/results/S3-weak-s3s3.md).
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
from collections.abc import Sequence

import sharding.parts as parts_mod
from bench.synthetic import checkpoint_specs, write_synthetic
from convert.engine.job import JobOptions, _plan_source
from convert.engine.part_fill import Copy, group_parts, part_copies, read_runs
from convert.engine.sinks import GROUP_PARTS, HELD_PARTS, MultipartSink, SinkJob
from convert.io.storage import Storage
from launch.dist import Dist
from sharding.parts import Part, plan_parts


def _cuts_every_max(spans: list[tuple[int, int, int, int]], size: int, min_part: int, max_part: int) -> list[int]:
    """The part cuts before pieces were kept whole: at rank changes, else every max_part bytes."""
    cuts, prev_rank = [0], spans[0][2]
    for start, _, rank, _ in spans[1:]:
        while start - cuts[-1] > max_part:
            cuts.append(cuts[-1] + max_part)
        if rank != prev_rank and start - cuts[-1] >= min_part and size - start >= min_part:
            cuts.append(start)
        prev_rank = rank
    while size - cuts[-1] > max_part:
        cuts.append(cuts[-1] + max_part)
    return cuts + [size]


def rank_parts(ckpt: str, ranks: int, workers: int, whole_pieces: bool) -> tuple[list[Part], list[Copy], int]:
    """Rank 0's parts of a fuse of `ckpt` over `ranks` ranks, their byte copies, and the largest part size."""
    setup = _plan_source(JobOptions(src=ckpt, dst=ckpt + "-out", layout=None, max_shard_bytes=200_000_000,
                                    dry_run=True), Dist(rank=0, world_size=ranks), Storage(ckpt))
    job = SinkJob(setup.files, setup.pieces, setup.assignment, setup.fingerprint, workers)
    size = MultipartSink(Storage(ckpt), Storage(ckpt)).part_size(job)
    cuts = parts_mod._cuts
    try:
        if not whole_pieces:
            parts_mod._cuts = _cuts_every_max
        mine = [p for p in plan_parts(job.files, job.pieces, job.assignment, parts_mod.MIN_PART, size) if p.owner == 0]
    finally:
        parts_mod._cuts = cuts
    slot_of = {name: (f.name, slot) for f in job.files for name, slot in f.slots.items()}
    copies, _ = part_copies(mine, job.pieces, slot_of)
    return mine, copies, size


def data_phase(parts: Sequence[Part], copies: Sequence[Copy], group_bytes: int, run_bytes: int, budget: int,
               workers: int, latency: float, rate: float) -> tuple[float, int]:
    """Modelled seconds of one rank's data phase, and its GETs: groups of at most `group_bytes` of parts, runs of
    at most `run_bytes`, at most `budget` bytes of parts held (filling, waiting or uploading)."""
    sizes = [p.end - p.start for p in parts]
    groups = group_parts(sizes, copies, group_bytes)
    of_part: dict[int, list[Copy]] = {}
    for c in copies:
        of_part.setdefault(c.part, []).append(c)
    readers, uploaders = [0.0] * workers, [0.0] * workers
    releases: list[tuple[float, int]] = []  # (time a part's upload ends, its bytes)
    tasks: list[tuple[int, set[int]]] = []  # (bytes of a GET, the parts it fills), in the order readers take them
    left: dict[int, int] = {}
    held, opened, taken, end, gets = 0, 0, 0, 0.0, 0
    while True:
        r = min(range(workers), key=lambda i: readers[i])
        now = readers[r]
        while releases and releases[0][0] <= now:
            held -= heapq.heappop(releases)[1]
        while opened < len(groups):
            n = sum(sizes[k] for k in groups[opened])
            if held and held + n > budget:
                break
            held += n
            for run in read_runs([c for k in groups[opened] for c in of_part.get(k, ())], run_bytes):
                touched = {c.part for c in run}
                for k in touched:
                    left[k] = left.get(k, 0) + 1
                tasks.append((sum(c.n for c in run), touched))
            opened += 1
        if taken == len(tasks):
            if opened == len(groups) or not releases:
                break
            readers[r] = max(now, releases[0][0])  # waits for the budget
            continue
        n, touched = tasks[taken]
        taken += 1
        gets += 1
        readers[r] = done = now + latency + n / rate
        for k in sorted(touched):
            left[k] -= 1
            if not left[k]:
                u = min(range(workers), key=lambda i: uploaders[i])
                uploaders[u] = max(uploaders[u], done) + latency + sizes[k] / rate
                heapq.heappush(releases, (uploaders[u], sizes[k]))
                end = max(end, uploaders[u])
    return end, gets


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="2,21,100,400")
    p.add_argument("--ranks", default="1,1,1,4")
    p.add_argument("--workers", default="1,4,16,16")
    p.add_argument("--latency-ms", default="320,800", help="LO,HI: the mean is charged per request")
    p.add_argument("--conn-mbps", type=float, default=5.0)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1000)
    a = p.parse_args(argv)
    lo, hi = (float(x) / 1000 for x in a.latency_ms.split(","))
    latency, rate = (lo + hi) / 2, a.conn_mbps * 1e6
    cases = zip(*(list(map(int, v.split(","))) for v in (a.experts, a.ranks, a.workers)))
    print("| E | ranks x workers | part MiB | variant | GETs | data s (model) | vs parts one by one |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="moe-part-model-") as tmp:
        for experts, ranks, workers in cases:
            ckpt = f"{tmp}/e{experts}"
            specs, config = checkpoint_specs("qwen3-30b-a3b", a.layers, experts=experts, vocab=a.vocab)
            write_synthetic(ckpt, specs, config, 200_000_000)
            base = None
            for whole in (False, True):
                parts, copies, size = rank_parts(ckpt, ranks, workers, whole)
                budget = HELD_PARTS * workers * size  # MultipartSink.held_bytes
                for name, group, run in (("parts one by one", size, 1 << 62),
                                         ("grouped", min(GROUP_PARTS, workers) * size, size)):
                    secs, gets = data_phase(parts, copies, group, run, budget, workers, latency, rate)
                    base = base or secs
                    cuts = "pieces whole" if whole else "cut every max part"
                    print(f"| {experts} | {ranks} x {workers} | {size / 2**20:.0f} | {name}, {cuts} | {gets} | "
                          f"{secs:.1f} | {base / secs:.2f}x |")


if __name__ == "__main__":
    main()
