"""One conversion job across all ranks: plan on rank 0, check, lay out, stream, commit.

Rank 0 reads the metadata and builds the plan, the output file layout and the
piece assignment, and broadcasts them (every rank then holds the same plan). Each
rank streams its own pieces straight to their final offsets in `*.incomplete`
files. Only when every rank succeeded does rank 0 rename the shards, copy the
source's other files and write the index last: a destination with an index is complete.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from convert.checkpoint import INDEX_NAME, open_checkpoint
from convert.errors import ConversionError
from convert.executor import Executor, piece_memory
from convert.families import detect_family
from convert.planner import Plan, plan_conversion
from convert.storage import Storage
from launch.dist import Dist
from sharding.ep import assign_pieces, expert_slices
from sharding.file_layout import OutputFile, layout_files, weight_map

INCOMPLETE = ".incomplete"


@dataclass
class JobOptions:
    """Everything a base-weight conversion needs; mirrors the command-line flags."""

    src: str
    dst: str
    layout: str | None  # target layout; None = the family's default fused layout
    ep: int | None = None
    max_shard_bytes: int = 5_000_000_000
    dtype: str | None = None
    dry_run: bool = False
    overwrite: bool = False
    family: str | None = None
    workers: int = 4
    storage_options: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    stats_path: str | None = None  # rank 0 writes per-rank stats (peak RSS, bytes, seconds) here as JSON


@dataclass
class JobSetup:
    """What rank 0 decides and every rank receives."""

    plan: Plan
    files: list[OutputFile]
    assignment: list[list[int]]
    ep: int
    job_id: str


def _check_destination(src: Storage, dst: Storage, overwrite: bool) -> None:
    if src.is_local and dst.is_local:
        s, d = os.path.realpath(src.root), os.path.realpath(dst.root)
    else:
        s, d = src.fs.unstrip_protocol(src.root), dst.fs.unstrip_protocol(dst.root)
    if d == s or d.startswith(s.rstrip("/") + "/"):
        raise ConversionError(f"--dst {dst.url} is the source or inside it; choose a directory outside --src")
    if s.startswith(d.rstrip("/") + "/"):
        raise ConversionError(f"--dst {dst.url} contains the source {src.url}; choose another directory")
    if dst.exists() and not dst.isdir():
        raise ConversionError(f"--dst {dst.url} exists and is not a directory")
    if dst.exists() and not overwrite:
        files, dirs = dst.list_dir()
        if files or dirs:
            raise ConversionError(f"--dst {dst.url} exists and is not empty; pass --overwrite to replace its contents")


def plan_job(opts: JobOptions, dist: Dist) -> JobSetup:
    """Rank 0's work before any byte moves: read metadata, plan, check the destination."""
    src = Storage(opts.src, opts.storage_options)
    dst = Storage(opts.dst, opts.storage_options)
    ckpt = open_checkpoint(src)
    family = detect_family(ckpt.config, src.display("config.json"), opts.family)
    layout = opts.layout or family.default_fused
    plan = plan_conversion(ckpt, family, layout, opts.dtype)
    ep = opts.ep or dist.world_size
    if ep < 1:
        raise ConversionError(f"--ep must be >= 1, got {ep}")
    files = layout_files(plan.targets, opts.max_shard_bytes, plan.metadata)
    assignment = assign_pieces(plan.pieces, plan.num_experts, ep, dist.world_size)
    if not opts.dry_run:
        _check_destination(src, dst, opts.overwrite)
    return JobSetup(plan, files, assignment, ep, uuid.uuid4().hex)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def describe(setup: JobSetup, opts: JobOptions, world: int) -> str:
    """Human-readable plan: files, per-rank bytes and estimated peak memory."""
    plan = setup.plan
    layouts = sorted({lay for _, lay in plan.groups})
    slices = expert_slices(plan.num_experts, setup.ep)
    sizes = sorted({len(r) for r in slices})
    lines = [
        f"plan: {plan.family} {'/'.join(layouts)} -> {plan.target_layout}; {len(plan.groups)} expert layers, "
        f"E={plan.num_experts}, dtype={opts.dtype or 'keep'}",
        f"  source: {opts.src}",
        f"  destination: {opts.dst}",
        f"  ep={setup.ep} expert slices over {world} rank(s); experts per slice: "
        + ("/".join(str(s) for s in sizes))
        + (f" (ep does not divide E={plan.num_experts}: slices differ by one expert)" if len(sizes) > 1 else ""),
    ]
    if setup.ep > world:
        lines.append(f"  each rank works through up to {-(-setup.ep // world)} slices in turn")
    total = sum(f.size for f in setup.files)
    lines.append(f"  output: {len(setup.files)} file(s), {_gb(total)} + {INDEX_NAME}, {len(plan.copy_files)} other file(s) copied")
    for f in setup.files:
        lines.append(f"    {f.name}  {_gb(f.size)}  {len(f.slots)} tensors")
    lines.append("  rank  pieces  read        written     est. peak memory")
    for r, idx in enumerate(setup.assignment):
        pieces = [plan.pieces[i] for i in idx]
        rd = sum(p.read_bytes for p in pieces)
        wr = sum(p.write_bytes for p in pieces)
        peak = max((piece_memory(p) for p in pieces), default=0) * max(1, opts.workers)
        lines.append(f"  {r:>4}  {len(pieces):>6}  {_gb(rd):>10}  {_gb(wr):>10}  {_gb(peak):>10}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _prepare_outputs(dst: Storage, files: list[OutputFile], overwrite: bool) -> None:
    dst.makedirs()
    if overwrite and dst.exists(INDEX_NAME):
        dst.remove(INDEX_NAME)  # the old output stops looking complete before anything changes
    names = {f.name for f in files}
    existing, _ = dst.list_dir()
    for name in existing:
        stale = name.endswith(".safetensors" + INCOMPLETE) or (name.startswith("model-") and name.endswith(".safetensors"))
        if overwrite and stale and name not in names:
            dst.remove(name)
    for f in files:
        dst.create_sized(f.name + INCOMPLETE, f.header, f.size)


def _commit(src: Storage, dst: Storage, setup: JobSetup) -> None:
    for f in setup.files:
        dst.rename(f.name + INCOMPLETE, f.name)
    for name in setup.plan.copy_files:
        dst.copy_file_from(src, name)
    total = sum(t.nbytes for t in setup.plan.targets)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map(setup.files).items()))}
    dst.write_bytes(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


def peak_rss_bytes() -> int:
    """This process's peak resident set size, from the OS (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ConversionError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def run_job(opts: JobOptions, dist: Dist) -> int:
    """Run the job on this rank; returns the process exit code (0 ok, 1 failed, 2 refused)."""
    setup: JobSetup | str | None = None
    if dist.is_main:
        try:
            setup = plan_job(opts, dist)
        except (ConversionError, OSError, ValueError) as exc:
            setup = _error_text(exc)
    setup = dist.broadcast(setup)
    if isinstance(setup, str):
        if dist.is_main:
            print(f"error: {setup}", file=sys.stderr)
        return 2
    assert setup is not None
    if opts.dry_run:
        if dist.is_main:
            print(describe(setup, opts, dist.world_size))
        return 0

    src = Storage(opts.src, opts.storage_options)
    dst = Storage(opts.dst, opts.storage_options)
    status: str | None = None
    if dist.is_main:
        try:
            _prepare_outputs(dst, setup.files, opts.overwrite)
        except (ConversionError, OSError) as exc:
            status = _error_text(exc)
    status = dist.broadcast(status)
    if status:
        if dist.is_main:
            print(f"error: {status}", file=sys.stderr)
        return 1

    slots = {name: (f.name + INCOMPLETE, slot) for f in setup.files for name, slot in f.slots.items()}
    mine = [setup.plan.pieces[i] for i in setup.assignment[dist.rank]]
    total = sum(p.write_bytes for p in setup.plan.pieces)
    key = f"moe_convert/{setup.job_id}"
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not (dist.is_main and opts.show_progress))

    def on_done(n: int) -> None:
        value = dist.counter_add(key + "/bytes", n)
        if dist.is_main:
            bar.update(value - bar.n)

    t0 = time.perf_counter()
    error: str | None = None
    try:
        Executor(src, dst, slots, opts.workers).run(mine, on_done)
        for name in sorted({slots[w.tensor][0] for p in mine for w in p.writes}):
            dst.fsync(name)
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then exit non-zero
        error = f"rank {dist.rank}: {_error_text(exc)}"
    finally:
        src.close()
        dst.close()
    dist.counter_add(key + "/done", 1)
    if dist.is_main:
        while dist.counter_add(key + "/done", 0) < dist.world_size:
            bar.update(dist.counter_add(key + "/bytes", 0) - bar.n)
            time.sleep(0.2)
        bar.update(dist.counter_add(key + "/bytes", 0) - bar.n)
        bar.close()
    stats = {
        "rank": dist.rank,
        "peak_rss_bytes": peak_rss_bytes(),
        "read_bytes": sum(p.read_bytes for p in mine),
        "written_bytes": sum(p.write_bytes for p in mine),
        "pieces": len(mine),
        "seconds": time.perf_counter() - t0,
    }
    gathered = dist.gather((error, stats))
    errors = [e for e, _ in gathered if e]
    if dist.is_main and opts.stats_path:
        with open(opts.stats_path, "w") as fh:
            json.dump({"world_size": dist.world_size, "ep": setup.ep, "ranks": [s for _, s in gathered]}, fh, indent=2)
    if errors:
        if dist.is_main:
            for e in errors:
                print(f"error: {e}", file=sys.stderr)
            print(f"error: conversion failed; {opts.dst} has no index and is incomplete", file=sys.stderr)
        return 1
    if dist.is_main:
        try:
            _commit(src, dst, setup)
        except (ConversionError, OSError) as exc:
            print(f"error: commit failed: {_error_text(exc)}", file=sys.stderr)
            dist.broadcast(False)
            return 1
        dist.broadcast(True)
        elapsed = time.perf_counter() - t0
        size = sum(f.size for f in setup.files)
        print(
            f"wrote {len(setup.files)} file(s), {_gb(size)} to {opts.dst} in {elapsed:.2f} s "
            f"({size / max(elapsed, 1e-9) / 1e9:.3f} GB/s) with {dist.world_size} rank(s)"
        )
        return 0
    return 0 if dist.broadcast(None) else 1
