"""One conversion job across all ranks: plan on rank 0, check, lay out, stream, commit.

Rank 0 reads the metadata and builds the plan, the output file layout and the
piece assignment, and sends each rank only its own part (its pieces and the slots they
write: a rank's memory grows with its share, not with the checkpoint). Each
rank streams its own pieces to their final place through a sink (local files written
in place, or multipart uploads). Only when every rank succeeded does rank 0 commit
the shards, copy the source's other files, write the output record and the final files
(the index) last: a destination with its index and record is complete. A destination
holding the state of an unfinished job with the same plan fingerprint is resumed, not
redone. Every source file read is pinned at plan time and checked on resume and before
the commit (convert.engine.output_record).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import hashlib
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from convert.formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from convert.formats.chunks import ChunkedTensor, ChunkedView
from convert.formats.dcp import load_chunk
from convert.plan.chunk_reads import localize
from convert.errors import ConversionError, error_text, set_destination
from convert.engine.executor import piece_memory, warm_up
from convert.families import PER_EXPERT, Family, detect_family
from convert.families.namings import apply_source_naming, output_layout
from convert.plan.trainer_names import finish_plan
from convert.formats.model_config import CONFIG_DTYPE_NAMES, config_bytes, read_base_config, with_dtype
from convert.engine.output_record import (
    check_existing, check_pins, classify, record_bytes, refuse_foreign, source_pins,
)
from convert.plan.base import Piece, plan_conversion
from convert.engine.dest_lock import DestinationLock, LockLost, lock_times
from convert.engine.sinks import (
    LOCK_FILE, OUTPUT_RECORD, STATE_DIR, SinkJob, clear_state, make_sink, read_state, state_listing,
)
from convert.io.storage import PIN_WORKERS, Storage
from launch.dist import Dist
from sharding.ep import assign_pieces, expert_slices
from convert.formats.shard_layout import OutputFile, layout_files, weight_map



@dataclass
class JobOptions:
    """Everything a conversion needs; mirrors the command-line flags."""

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
    base_config: str | None = None  # config.json for a source without one (--base-config), written into the output
    names: str = "hf"  # the tensor names written: "hf" or a trainer naming (configs/namings/*.json)


@dataclass
class JobSetup:
    """What rank 0 decides and every rank receives: a complete description of the output."""

    summary: list[str]  # plan lines for --dry-run
    files: list[OutputFile]
    pieces: list[Piece]
    assignment: list[list[int]]
    ep: int
    copy_files: list[str]  # source files copied unchanged at commit
    final_files: dict[str, bytes]  # written at commit, in order; the last marks the output complete
    fingerprint: str
    resuming: bool = False
    job_id: str = ""
    pins: dict[str, dict[str, Any]] = field(default_factory=dict)  # source file -> Storage.pin at plan time
    target: str | None = None  # the adapter target the output is written for (recorded in the output record)
    chunked: dict[str, ChunkedTensor] = field(default_factory=dict)  # chunked tensors pieces read virtually
    notices: list[str] = field(default_factory=list)  # printed before the job starts (what the source left out)
    sources: dict[str, str] = field(default_factory=dict)  # extra sources pieces read (convert.io.sources): name -> URL

    @property
    def outputs(self) -> list[str]:
        """Every file the job writes into --dst, in write order (the marker last)."""
        return [f.name for f in self.files] + list(self.copy_files) + list(self.final_files)


def fingerprint(*parts: Any) -> str:
    """A stable hash of a plan: the same source and options give the same fingerprint.

    The hash of each part's repr(), fed item by item for a list (the same bytes as its repr,
    without building the repr of every piece of a large plan at once).
    """
    h = hashlib.sha256()
    for part in parts:
        if type(part) is list:
            h.update(b"[")
            for i, item in enumerate(part):
                h.update(((", " if i else "") + repr(item)).encode())
            h.update(b"]")
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:32]


def _same_place(src: Storage, dst: Storage) -> tuple[str, str]:
    return src.place(), dst.place()


def check_destination(src: Storage, dst: Storage, overwrite: bool, marker: str, fp: str) -> bool:
    """Refuse a destination that would lose data or overlap the source; True when resuming.

    An absent or empty destination is fresh; one holding an unfinished job with the same
    plan fingerprint (and unchanged source files) is resumed; a moe-convert output needs
    --overwrite; anything moe-convert did not write is never overwritten
    (convert.engine.output_record.check_existing).
    """
    return destination_in_use(src, dst) and check_existing(src, dst, overwrite, marker, fp)


def destination_in_use(src: Storage, dst: Storage) -> bool:
    """The first half of check_destination, which needs no plan: refuse a destination that is or holds the
    source, or is a file; True when it holds anything (for check_existing to judge)."""
    s, d = _same_place(src, dst)
    if d == s or d.startswith(s.rstrip("/") + "/"):
        raise ConversionError(f"--dst {dst.url} is the source or inside it; choose a directory outside --src")
    if s.startswith(d.rstrip("/") + "/"):
        raise ConversionError(f"--dst {dst.url} contains the source {src.url}; choose another directory")
    if not dst.exists():
        return False
    if not dst.isdir():
        raise ConversionError(f"--dst {dst.url} exists and is not a directory")
    files, dirs = dst.list_dir()
    return bool(files or dirs) and not _only_a_lock(dst, files, dirs)


def plan_job(opts: JobOptions, dist: Dist) -> JobSetup:
    """Rank 0's work before any byte moves: read metadata, plan, lay out, check the destination."""
    src = Storage(opts.src, opts.storage_options)
    dst = Storage(opts.dst, opts.storage_options)
    try:
        return _plan_job(opts, dist, src, dst)
    finally:  # the header reads cached descriptors: release them (a batch runs many jobs in one process)
        src.close()
        dst.close()


def _plan_job(opts: JobOptions, dist: Dist, src: Storage, dst: Storage) -> JobSetup:
    # The destination's first look is a request chain of its own on an object store: beside the source's.
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_use = None if opts.dry_run else pool.submit(destination_in_use, src, dst)
        setup = _plan_source(opts, dist, src)
        if in_use is not None:
            setup.resuming = in_use.result() and check_existing(src, dst, opts.overwrite, INDEX_NAME,
                                                                 setup.fingerprint)
    return setup


def open_source(src: Storage, opts: JobOptions) -> tuple[Checkpoint, Family]:
    """The source checkpoint's metadata, its config taken from --base-config where given, and its family.
    Raises ConversionError where the source has no config.json and no --base-config gives one."""
    ckpt = open_checkpoint(src)
    if opts.base_config:
        ckpt.config = read_base_config(opts.base_config, opts.storage_options)
    elif not ckpt.config:
        raise ConversionError(f"{src.display()}: has no config.json ({ckpt.container} source); pass the model's "
                              "config.json with --base-config")
    return ckpt, detect_family(ckpt.config, src.display("config.json"), opts.family)


def _plan_source(opts: JobOptions, dist: Dist, src: Storage) -> JobSetup:
    """The job's plan from the source's metadata (resuming left False: _plan_job decides it)."""
    ckpt, family = open_source(src, opts)
    ckpt, family, view = apply_source_naming(ckpt, family)  # trainer names read as HF names
    naming, wanted = output_layout(opts.names, opts.layout, family, ckpt.config, src.display("config.json"))
    if wanted is not None and wanted != PER_EXPERT and wanted not in family.fused:
        raise ConversionError(f"--layout {wanted}: the {family.name} family ({src.display('config.json')}) has "
                              f"no such fused layout; its fused layouts: {', '.join(family.fused)}")
    layout = wanted or family.default_fused
    plan = plan_conversion(ckpt, family, layout, opts.dtype, renaming=bool(view.naming or naming))
    plan = finish_plan(plan, view, naming, ckpt.config, src.display())
    plan.pieces, chunked = localize(plan.pieces, ckpt.chunked)
    ep, ep_note = choose_ep(opts.ep, dist.world_size, plan.num_experts, src.display("config.json"))
    files = layout_files(plan.targets, opts.max_shard_bytes, plan.metadata)
    assignment = assign_pieces(plan.pieces, plan.num_experts, ep, dist.world_size)
    total = sum(t.nbytes for t in plan.targets)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map(files).items()))}
    slices = expert_slices(plan.num_experts, ep)
    sizes = sorted({len(r) for r in slices})
    layouts = sorted({lay for _, lay in plan.groups})
    summary = [
        f"plan: {plan.family} {'/'.join(layouts)} -> {plan.target_layout}; {len(plan.groups)} expert layers, "
        f"E={plan.num_experts}, dtype={opts.dtype or 'keep'}",
        f"  source: {opts.src}" + (f" ({ckpt.container}, {len(ckpt.chunked)} tensors saved in chunks)"
                                    if ckpt.container != "safetensors" else ""),
        f"  destination: {opts.dst}",
        f"  ep={ep} expert slices over {dist.world_size} rank(s); experts per slice: "
        + "/".join(str(n) for n in sizes)
        + (f" (ep does not divide E={plan.num_experts}: slices differ by one expert)" if len(sizes) > 1 else ""),
    ]
    if ep > dist.world_size:
        summary.append(f"  each rank works through up to {-(-ep // dist.world_size)} slices in turn")
    if ep_note:
        summary.append(f"  {ep_note}")
    copy_files, final = list(plan.copy_files), {}
    moved = bool(ckpt.config) and ckpt.config_place != "config.json"  # found elsewhere: written at the top
    if opts.base_config or moved or (opts.dtype and "config.json" in copy_files):
        # --base-config: the given config is the output's; a cast changes the weights' dtype: config.json must say
        # so (rewritten, not copied), and a dequantizing cast drops quantization_config.
        if "config.json" in copy_files:
            copy_files.remove("config.json")
        config = ckpt.config
        if plan.dequantized:
            config = {k: v for k, v in config.items() if k != "quantization_config"}
        final["config.json"] = config_bytes(with_dtype(config, opts.dtype) if opts.dtype else config)
        if opts.base_config:
            summary.append(f"  config.json: from --base-config {opts.base_config}")
        if opts.dtype:
            summary.append(f"  config.json: dtype keys set to {CONFIG_DTYPE_NAMES[opts.dtype]}")
    final[INDEX_NAME] = (json.dumps(index, indent=2) + "\n").encode()
    summary += [f"  note: {n}" for n in [*ckpt.notes, *plan.notes]]
    fp = fingerprint(
        opts.src, sorted((n, h.file_size) for n, h in ckpt.headers.items()),
        [(f.name, f.size, f.header) for f in files], plan.pieces,
    )
    read = [*ckpt.source_files, *plan.copy_files]
    return JobSetup(
        summary=summary, files=files, pieces=plan.pieces, assignment=assignment, ep=ep,
        copy_files=copy_files, final_files=final,
        fingerprint=fp, job_id=uuid.uuid4().hex, pins={} if opts.dry_run else source_pins(src, read),
        chunked=chunked, notices=[f"note: {opts.src}: {n}" for n in ckpt.notes],
    )


def choose_ep(requested: int | None, world_size: int, num_experts: int, where: str) -> tuple[int, str]:
    """The number of expert slices, and a plan note when it differs from the default.

    An explicit --ep above E (`num_experts`, read from `where`) is refused; the default (the
    world size) is capped at E, and the ranks without a slice only take non-expert pieces.
    """
    if requested is not None:
        if requested < 1:
            raise ConversionError(f"--ep must be >= 1, got {requested}")
        if requested > num_experts:
            raise ConversionError(f"--ep {requested}: {where} has only E={num_experts} experts; "
                                  f"use --ep {num_experts} or less")
        return requested, ""
    if world_size <= num_experts:
        return world_size, ""
    idle = world_size - num_experts
    return num_experts, (f"ep={num_experts}: {world_size} ranks but only E={num_experts} experts; "
                         f"{idle} rank(s) get no expert slice and take only non-expert pieces")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def describe(setup: JobSetup, workers: int) -> str:
    """Human-readable plan: files, per-rank bytes and estimated peak memory."""
    lines = list(setup.summary)
    total = sum(f.size for f in setup.files)
    finals = ", ".join(setup.final_files)
    lines.append(f"  output: {len(setup.files)} file(s), {_gb(total)} + {finals}; {len(setup.copy_files)} other file(s) copied")
    for f in setup.files:
        lines.append(f"    {f.name}  {_gb(f.size)}  {len(f.slots)} tensors")
    lines.append("  rank  pieces  read        written     est. peak memory")
    for r, idx in enumerate(setup.assignment):
        pieces = [setup.pieces[i] for i in idx]
        rd = sum(p.read_bytes for p in pieces)
        wr = sum(p.write_bytes for p in pieces)
        peak = max((piece_memory(p) for p in pieces), default=0) * max(1, workers)
        lines.append(f"  {r:>4}  {len(pieces):>6}  {_gb(rd):>10}  {_gb(wr):>10}  {_gb(peak):>10}")
    return "\n".join(lines)


def peak_rss_bytes() -> int:
    """This process's peak resident set size, from the OS.

    VmHWM of /proc/self/status where there is one: ru_maxrss also counts the image before
    exec, i.e. the RSS of whatever large process forked this one.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def proc_io() -> dict[str, int]:
    """This process's I/O counters from /proc/self/io (rchar, read_bytes, ...); empty where absent."""
    try:
        with open("/proc/self/io") as fh:
            return {k: int(v) for k, v in (line.split(":") for line in fh if ":" in line)}
    except OSError:
        return {}


def _error_text(exc: BaseException) -> str:
    return error_text(exc)  # one line; a bug's (ErrorText.internal) exits 1 even before anything was written


def run_planned(
    planner: Callable[[Any, Dist], JobSetup], opts: JobOptions, dist: Dist, report: dict[str, Any] | None = None
) -> int:
    """Plan with `planner(opts, dist)` on rank 0 and run the plan on every rank; returns the exit code.

    `report`, if given, receives on rank 0 the output bytes and any error text.
    """
    setup: JobSetup | str | None = None
    set_destination(None if opts.dry_run else opts.dst)  # named if interrupted or a rank is lost
    if dist.is_main:
        try:
            setup = planner(opts, dist)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or they wait for their part forever
            setup = _error_text(exc)
    return execute(setup, opts, dist, report)


def run_job(opts: JobOptions, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Plan (rank 0) and run a base-weight job on this rank; returns the exit code (0, 1, or 2 = refused)."""
    return run_planned(plan_job, opts, dist, report)


def _fail(report: dict[str, Any] | None, text: str) -> None:
    print(f"error: {text}", file=sys.stderr)
    if report is not None:
        report["error"] = report.get("error", "") + text.splitlines()[0] + " "


@dataclass
class RankWork:
    """What rank 0 sends each rank once the job is planned and its destination prepared."""

    job: SinkJob  # the rank's own view of the job (Sink.for_rank): only the pieces it writes
    job_id: str
    pins: dict[str, dict[str, Any]]  # the source files' pins: every read is conditional on them (Storage.expect)
    chunked: dict[str, ChunkedTensor] = field(default_factory=dict)  # the virtual files its pieces read
    sources: dict[str, str] = field(default_factory=dict)  # the extra sources its pieces read (JobSetup.sources)


def _start(setup: JobSetup | str, opts: JobOptions, sink: Any, job: SinkJob | None, src: Storage, dst: Storage,
           report: dict[str, Any] | None, held: list[DestinationLock]) -> int | None:
    """Rank 0 before any byte moves: report a planning error, print a dry run, or take the destination's lock
    (into `held`), look at the destination again under it and clear and prepare it (filling `job.resume`).
    Returns the exit code of a job that ends here, else None."""
    if isinstance(setup, str):
        _fail(report, setup)
        return 1 if getattr(setup, "internal", False) else 2
    if opts.dry_run:
        print(describe(setup, opts.workers))
        return 0
    assert job is not None
    for line in setup.notices:
        print(line)
    try:
        _pause_point("MOE_CONVERT_PAUSE_BEFORE_LOCK")
        held.append(DestinationLock.acquire(dst, lock_times()))
        # The plan looked at the destination before the lock was ours: another job may have written it since. (With
        # --overwrite, _clear_destination looks again itself.)
        if setup.resuming or not (opts.overwrite or _holds_only_the_lock(dst)):
            setup.resuming = check_destination(src, dst, opts.overwrite, next(reversed(setup.final_files)),
                                               setup.fingerprint)
    except (ConversionError, OSError) as exc:
        status = _error_text(exc)
        _fail(report, status)
        return 1 if getattr(status, "internal", False) else 2  # nothing was written but the lock, removed again
    try:
        if not setup.resuming:
            _clear_destination(dst, sink, setup, opts.overwrite)
        job.resume = sink.prepare(job, setup.resuming)
    except (ConversionError, OSError) as exc:
        status = _error_text(exc)
        _fail(report, status)
        # A fresh job that could not even prepare its destination wrote nothing of value: a refusal.
        return 1 if setup.resuming or getattr(status, "internal", False) else 2
    return None


def _holds_only_the_lock(dst: Storage) -> bool:
    """True where `dst` holds nothing but a job's lock."""
    files, dirs = dst.list_dir()
    return _only_a_lock(dst, files, dirs)


def _only_a_lock(dst: Storage, files: list[str], dirs: list[str]) -> bool:
    """True where `dst`, whose top level lists `files` and `dirs`, holds nothing but a job's lock (a running job's,
    or one a crashed job left): such a destination counts as empty."""
    if files or dirs != [STATE_DIR]:
        return False
    inner, below = dst.list_dir(STATE_DIR)
    return not below and set(inner) <= {LOCK_FILE.rsplit("/", 1)[1]}


def _release(setup: JobSetup, job: SinkJob) -> None:
    """Rank 0, once every rank has its part: drop what only the planning needed (every piece, every
    slot), keeping the file names and sizes, the final files and the pins the commit needs."""
    slim = [OutputFile(f.name, b"", f.size, {}) for f in setup.files]
    setup.files, setup.pieces, setup.assignment = slim, [], []
    job.files, job.pieces, job.assignment = slim, [], []


def _reading(src: Storage | None, chunked: dict[str, ChunkedTensor], sources: dict[str, str] | None = None,
             storage_options: dict[str, Any] | None = None) -> Storage:
    """`src` as the pieces read it: a ChunkedView where some read a chunked tensor's virtual file, a SourcesView
    where some read the files of extra `sources` (name -> URL, convert.io.sources)."""
    assert src is not None
    view = ChunkedView(src, chunked, load_chunk) if chunked else src
    if sources:
        from convert.io.sources import SourcesView

        view = SourcesView(view, {k: Storage(url, storage_options) for k, url in sources.items()})
    return view  # type: ignore[return-value]


def execute(setup: JobSetup | str | None, opts: JobOptions, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run a job planned on rank 0 and commit it; returns the exit code.

    `setup` is rank 0's plan, or the error text that ended its planning; None on the other
    ranks. Rank 0 takes the destination's lock (convert.engine.dest_lock), prepares the destination
    and sends each rank only its own part of the job (or the exit code of a job that ends before
    streaming); the lock is given up when the job ends, however it ends. 0 ok, 1 failed (destination
    left without its final files), 2 refused before writing.
    """
    held: list[DestinationLock] = []
    try:
        return _execute(setup, opts, dist, report, held)
    finally:
        for lock in held:
            lock.release()


def _execute(setup: JobSetup | str | None, opts: JobOptions, dist: Dist, report: dict[str, Any] | None,
             held: list[DestinationLock]) -> int:
    src = dst = None
    sink: Any = None
    job: SinkJob | None = None
    ended: int | None = None
    prepare_at = time.monotonic()
    if dist.is_main:
        assert setup is not None, "rank 0 runs a plan or reports why there is none"
        if isinstance(setup, JobSetup) and not opts.dry_run:
            src = _reading(Storage(opts.src, opts.storage_options), setup.chunked, setup.sources, opts.storage_options)
            dst = Storage(opts.dst, opts.storage_options)
            src.expect(setup.pins)
            src.probe_conditions(setup.pins)
            sink = make_sink(src, dst)
            job = SinkJob(setup.files, setup.pieces, setup.assignment, setup.fingerprint, opts.workers,
                          state={"pins": setup.pins, "outputs": setup.outputs})
        ended = _start(setup, opts, sink, job, src, dst, report, held)  # type: ignore[arg-type]
    else:  # this rank's object-store clients are set up while rank 0 plans, not once its part arrives
        src = Storage(opts.src, opts.storage_options)
        dst = Storage(opts.dst, opts.storage_options)
        for store in (src, dst):
            store.connect()
    copies = _start_copies(src, dst, setup.copy_files, setup.pins) if ended is None and isinstance(setup, JobSetup) \
        and src else Copies()
    part = dist.scatter((lambda r: ended if ended is not None else RankWork(sink.for_rank(job, r), setup.job_id,
                                                                             setup.pins, setup.chunked, setup.sources))
                        if dist.is_main else None)
    if isinstance(part, int):  # the job ended before streaming: no copy was started
        for store in (src, dst):
            if store is not None:
                store.close()
        return part
    view, job_id = part.job, part.job_id
    skipped: dict[str, Any] = {}
    total = 0
    if dist.is_main:
        assert isinstance(setup, JobSetup) and job is not None
        skipped = job.resume.get("skipped") or {}
        total = sum(p.write_bytes for p in setup.pieces)
        _release(setup, job)
        if setup.resuming and skipped:
            print(_skipped_line(skipped))
        if report is not None:
            report["skipped_bytes"] = int(skipped.get("skipped_bytes", 0))
    else:
        src = _reading(src, part.chunked, part.sources, opts.storage_options)
        sink = make_sink(src, dst)
        src.expect(part.pins)
    assert src is not None and dst is not None

    mine = sink.rank_pieces(view, dist.rank)
    key = f"moe_convert/{job_id}"
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not (dist.is_main and opts.show_progress))

    crash_at = _crash_point(dist.rank)
    pause_at = _crash_point(dist.rank, "MOE_CONVERT_PAUSE_AFTER")
    done_here = [0]

    def on_done(n: int) -> None:
        value = dist.counter_add(key + "/bytes", n)
        if dist.is_main:
            bar.update(value - bar.n)
        done_here[0] += n
        if crash_at is not None and done_here[0] >= crash_at:
            os._exit(137)  # simulated crash (MOE_CONVERT_CRASH_AFTER), for resume tests
        if pause_at is not None and done_here[0] >= pause_at:
            _pause(dist.rank)

    warm_up(mine)
    io0 = proc_io()
    t0 = time.perf_counter()
    data_start = time.monotonic()
    error: str | None = None
    result: Any = None
    try:
        result = sink.run(view, dist.rank, on_done)
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then exit non-zero
        error = f"rank {dist.rank}: {_error_text(exc)}"
    finally:
        src.close()
        dst.close()
    io_delta = {k: v - io0.get(k, 0) for k, v in proc_io().items()}
    dist.counter_add(key + "/done", 1)
    if dist.is_main:
        while dist.counter_add(key + "/done", 0) < dist.world_size:
            bar.update(dist.counter_add(key + "/bytes", 0) - bar.n)
            time.sleep(0.02)
        bar.update(dist.counter_add(key + "/bytes", 0) - bar.n)
        bar.close()
    stats = {
        "rank": dist.rank,
        "peak_rss_bytes": peak_rss_bytes(),
        "read_bytes": sum(p.read_bytes for p in mine),
        "written_bytes": sum(p.write_bytes for p in mine),
        "pieces": len(mine),
        # pieces and output slots this rank was sent (its own work only; rank 0 also planned the whole job)
        "held": {"pieces": len(view.pieces), "slots": sum(len(f.slots) for f in view.files)},
        "seconds": time.perf_counter() - t0,
        "data_span": [data_start, time.monotonic()],  # CLOCK_MONOTONIC (machine-wide): for phase traces
        # OS counters over the streaming phase (rchar/wchar: bytes through syscalls; read_bytes: from storage)
        "os_io": io_delta,
    }
    del view, mine
    gathered = dist.gather_main((error, stats, result))  # the ranks' results only where the commit needs them
    ok = True
    if dist.is_main:
        assert gathered is not None and isinstance(setup, JobSetup) and job is not None
        ok = _finish(setup, opts, dist, report, src, dst, sink, job, gathered, skipped, t0, prepare_at, copies,
                     held[0] if held else None)
    return 0 if dist.broadcast(ok) else 1


def _finish(setup: JobSetup, opts: JobOptions, dist: Dist, report: dict[str, Any] | None, src: Storage, dst: Storage,
            sink: Any, job: SinkJob, gathered: list[Any], skipped: dict[str, Any], t0: float,
            prepare_at: float, copies: Copies, lock: DestinationLock | None = None) -> bool:
    """Rank 0 after every rank streamed: write the stats (`prepare_at`: CLOCK_MONOTONIC when the destination's
    preparation began), report errors or commit (once `copies`, _start_copies', are done, and where `lock`, the
    destination's, is still this job's); True when committed."""
    copy_error = copies.error()
    errors = [e for e, _, _ in gathered if e] + ([f"copying the source's other files: {copy_error}"] if copy_error else [])
    if opts.stats_path:
        with open(opts.stats_path, "w") as fh:
            json.dump({"world_size": dist.world_size, "ep": setup.ep, "resumed": setup.resuming,
                       "prepare_at": prepare_at, "skipped_bytes": int(skipped.get("skipped_bytes", 0)), "skipped": skipped,
                       "ranks": [s for _, s, _ in gathered]}, fh, indent=2)
    if errors:
        for e in errors:
            _fail(report, e)
        print(f"error: conversion failed; {opts.dst} is incomplete (no {list(setup.final_files)[-1]}). "
              "Re-run the same command to resume.", file=sys.stderr)
        return False
    _pause_point()
    try:
        # else every read was of the pinned versions, or failed (If-Match), and the copies were checked
        if not copies.settled() and not src.reads_pinned(setup.pins):
            check_pins(src, setup.pins, "during the conversion", COMMIT_REFUSED)
    except (ConversionError, OSError) as exc:
        _fail(report, _error_text(exc))
        return False
    try:
        _commit(dst, sink, job, setup, [r for _, _, r in gathered], lock)
    except LockLost as exc:
        _fail(report, f"{_error_text(exc)}; the output was not committed")
        return False
    except (ConversionError, OSError) as exc:
        _fail(report, f"commit failed: {_error_text(exc)}")
        return False
    set_destination(None)  # complete: an interrupt from now on leaves nothing to resume
    elapsed = time.perf_counter() - t0
    size = sum(f.size for f in setup.files)
    if report is not None:
        report.update(bytes=size, resumed=setup.resuming)
    print(f"wrote {len(setup.files)} file(s), {_gb(size)} to {opts.dst} in {elapsed:.2f} s "
          f"({size / max(elapsed, 1e-9) / 1e9:.3f} GB/s) with {dist.world_size} rank(s)"
          + (" (resumed)" if setup.resuming else ""))
    return True


COMMIT_REFUSED = "the output was not committed; re-run with --overwrite to convert the source as it is now"


@dataclass
class Copies:
    """The source's other files being copied in the background (_start_copies), and the check of their pins that
    runs once they are done (_check_copied: True where it settled the source's pins)."""

    futures: list[Future[None]] = field(default_factory=list)
    checked: Future[bool] | None = None

    def error(self) -> str | None:
        """Wait for every copy; the first failure's text, or None."""
        failed = [c.exception() for c in self.futures]
        return next((_error_text(e) for e in failed if e is not None), None)

    def settled(self) -> bool:
        """Wait for the check after the copies; True where it found every source pin held (ConversionError where
        a copied file changed), False where the commit must check the pins after the data."""
        return self.checked is not None and self.checked.result()


def _start_copies(src: Storage, dst: Storage, names: list[str], pins: dict[str, dict[str, Any]]) -> Copies:
    """Rank 0, once the destination is prepared: start copying the source's other files (configs, tokenizer:
    no markers) unchanged into it, all at once, in the background while the shards stream, then checking
    their pins (_check_copied), off the commit's path."""
    if not names:
        return Copies()
    pool = ThreadPoolExecutor(max_workers=min(len(names), PIN_WORKERS))
    copies = Copies([pool.submit(dst.copy_file_from, src, name) for name in names])
    copies.checked = pool.submit(_check_copied, src, names, pins, copies)
    pool.shutdown(wait=False)
    return copies


def _check_copied(src: Storage, names: list[str], pins: dict[str, dict[str, Any]], copies: Copies) -> bool:
    """Once every copy of `names` is done, where every other read of the source was conditional on its pin
    (Storage.reads_pinned): check the pins of the copies the store may not have held to theirs (a server-side
    copy), raising ConversionError where one changed; True then. False where that does not settle the source
    (other reads unconditional, or a copy failed: that failure is reported)."""
    if copies.error() is not None or not src.reads_pinned(n for n in pins if n not in names):
        return False
    unverified = {n: pins[n] for n in names if n in pins and not src.reads_pinned([n])}
    if unverified:
        check_pins(src, unverified, "during the conversion", COMMIT_REFUSED)
    return True


def _commit(dst: Storage, sink: Any, job: SinkJob, setup: JobSetup, results: list[Any],
            lock: DestinationLock | None = None) -> None:
    """Rank 0: shards into place, output record, final files last, state removed (the other files were
    copied while the shards streamed: _start_copies). Nothing is committed, and the final files are not
    written, where `lock` (the destination's) is no longer this job's (LockLost)."""
    if lock is not None:
        lock.confirm()
    sink.commit(job, results)
    # What must have landed: the planned shards, and the other files as pinned (their pins were checked after
    # the copies). The output's listing checks it while the record is written, the state's while the final
    # files are: a round trip each, on an object store, saved.
    expected = {f.name: f.size for f in setup.files}
    expected.update({n: setup.pins.get(n, {}).get("size") for n in setup.copy_files})
    with ThreadPoolExecutor(max_workers=1) as pool:
        listed = pool.submit(dst.file_sizes)
        sizes = {n: listed.result().get(n, -1) if size is None else int(size) for n, size in expected.items()}
        written = [*sizes.items(), *[(n, len(data)) for n, data in setup.final_files.items()]]
        dst.write_bytes(OUTPUT_RECORD, record_bytes(written, setup.fingerprint, next(reversed(setup.final_files)),
                                                    setup.target))
        landed = listed.result()
        wrong = [n for n, size in sizes.items() if landed.get(n) != size]
        if wrong:
            raise ConversionError(f"{dst.display(wrong[0])}: {landed.get(wrong[0], 'no')} bytes landed, expected "
                                  f"{sizes[wrong[0]]}" + (f" (and {len(wrong) - 1} more file(s))" if len(wrong) > 1 else ""))
        state = pool.submit(state_listing, dst) if dst.remote else None
        if lock is not None:
            lock.confirm()  # the marker is written by the lock's holder only
        for name, data in setup.final_files.items():
            dst.write_bytes(name, data)
        clear_state(dst, state.result() if state else None)


def _skipped_line(skipped: dict[str, Any]) -> str:
    """"resuming: 1.23 GB of 4.56 GB (27%) already written, 40 of 150 pieces skipped"."""
    done, total = skipped["skipped_bytes"], skipped["total_bytes"]
    pct = 100.0 * done / total if total else 0.0
    return (f"resuming: {_gb(done)} of {_gb(total)} ({pct:.0f}%) already written, "
            f"{skipped['skipped']} of {skipped['total']} {skipped['unit']} skipped")


def _pause_point(var: str = "MOE_CONVERT_PAUSE_BEFORE_COMMIT") -> None:
    """Test hook (`var`=PATH): create PATH.waiting and wait (at most 120 s) until PATH exists, so a test can act
    then. MOE_CONVERT_PAUSE_BEFORE_COMMIT: before the final source check (the lock held, the data written);
    MOE_CONVERT_PAUSE_BEFORE_LOCK: after the plan's look at the destination, before the lock is taken."""
    gate = os.environ.get(var)
    if not gate:
        return
    open(gate + ".waiting", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)


def _crash_point(rank: int, var: str = "MOE_CONVERT_CRASH_AFTER") -> int | None:
    """Bytes after which this rank dies (or pauses), from `var`="rank:bytes" (crash and interrupt tests only)."""
    spec = os.environ.get(var, "")
    if ":" not in spec:
        return None
    r, n = spec.split(":", 1)
    return int(n) if int(r) == rank else None


def _pause(rank: int) -> None:
    """Stop mid-job until a signal ends this rank (MOE_CONVERT_PAUSE_AFTER; interruption tests only)."""
    print(f"rank {rank}: paused (MOE_CONVERT_PAUSE_AFTER, pid {os.getpid()})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def _clear_destination(dst: Storage, sink: Any, setup: JobSetup, overwrite: bool) -> None:
    """Before a fresh run: with --overwrite, remove what an earlier moe-convert job wrote, and nothing else.

    Markers go first, the record and state last, so an interrupted clean-up never looks
    complete and a re-run still knows which files are its own.
    """
    dst.makedirs()  # none on S3 (no directories there; s3fs's makedirs would create a missing bucket)
    if not overwrite or not dst.exists():  # an object store has no empty "directory" to list
        return
    contents = classify(dst)
    refuse_foreign(dst, contents)  # checked at plan time already; the directory may have changed since
    for name in contents.owned:
        dst.remove(name)
    dst.remove(OUTPUT_RECORD)
    sink.discard(read_state(dst))
