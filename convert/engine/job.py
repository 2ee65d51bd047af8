"""One conversion job across all ranks: rank 0 coordinates (plan, prepare, scatter, gather, commit); every rank,
rank 0 included, works (receive its part, run it, report).

The coordinator (rank 0) plans (a Planner, convert.engine.planner: the checkpoint conversion's is here), takes
the destination's lock and judges the destination again under it, prepares it, and sends each rank only its own
part (its pieces and the slots they write: a rank's memory grows with its share, not with the checkpoint). Each
worker streams its own pieces to their final place through a Sink (local files written in place, or multipart
uploads). Only when every rank succeeded does the coordinator commit the shards, copy the source's other files,
write the output record and the final files (the index) last: a destination with its index and record is
complete. A destination holding the state of an unfinished job with the same plan fingerprint is resumed, not
redone. Every source file read is pinned at plan time and checked on resume and before the commit
(convert.engine.output_record).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from convert.engine.dest_lock import DestinationLock, LockLost, lock_times
from convert.engine.executor import PHASES, piece_memory, warm_up
from convert.engine.output_record import Contents, judge_destination, record_bytes
from convert.engine.planner import Draft, JobOptions, JobSetup, Planner, choose_ep, fingerprint
from convert.engine.sinks import OUTPUT_RECORD, Sink, SinkJob, clear_state, make_sink, read_state, state_listing
from convert.errors import ConversionError, error_text, set_destination
from convert.families import PER_EXPERT, Family, detect_family
from convert.families.namings import apply_source_naming, output_layout
from convert.formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from convert.formats.chunks import ChunkedTensor, ChunkedView
from convert.formats.dcp import load_chunk
from convert.formats.model_config import CONFIG_DTYPE_NAMES, config_bytes, read_base_config, with_dtype
from convert.formats.shard_layout import OutputFile, layout_files, weight_map
from convert.io.pins import STATE_KEY, SourcePins, check_pins
from convert.io.storage import Storage, Store
from convert.plan.base import plan_conversion
from convert.plan.chunk_reads import localize
from convert.plan.trainer_names import finish_plan
from convert.settings import BEFORE_COMMIT, BEFORE_LOCK
from launch.dist import Dist

__all__ = ["JobOptions", "JobSetup", "CheckpointPlanner", "plan_job", "run_job", "run_planned", "execute",
           "describe", "open_source", "choose_ep", "fingerprint", "peak_rss_bytes", "proc_io"]


# -- the plan of a checkpoint conversion (rank 0) ---------------------------------------------------------------


def open_source(src: Store, opts: JobOptions) -> tuple[Checkpoint, Family]:
    """The source checkpoint's metadata, its config taken from --base-config where given, and its family.
    Raises ConversionError where the source has no config.json and no --base-config gives one."""
    ckpt = open_checkpoint(src)
    if opts.base_config:
        ckpt.config = read_base_config(opts.base_config, opts.storage_options)
    elif not ckpt.config:
        raise ConversionError(f"{src.display()}: has no config.json ({ckpt.container} source); pass the model's "
                              "config.json with --base-config")
    return ckpt, detect_family(ckpt.config, src.display("config.json"), opts.family)


class CheckpointPlanner(Planner):
    """The plan of a base-weight conversion (fuse or split): the source's metadata, its family, the target layout
    and names, the pieces, the output shards and the final files (config.json where rewritten, the index)."""

    uneven_note = True

    def draft(self, opts: JobOptions, dist: Dist, src: Store, closing: ExitStack) -> Draft:
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
        files = layout_files(plan.targets, opts.max_shard_bytes, plan.metadata)
        total = sum(t.nbytes for t in plan.targets)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map(files).items()))}
        layouts = sorted({lay for _, lay in plan.groups})
        summary = [
            f"plan: {plan.family} {'/'.join(layouts)} -> {plan.target_layout}; {len(plan.groups)} expert layers, "
            f"E={plan.num_experts}, dtype={opts.dtype or 'keep'}",
            f"  source: {opts.src}" + (f" ({ckpt.container}, {len(ckpt.chunked)} tensors saved in chunks)"
                                        if ckpt.container != "safetensors" else ""),
            f"  destination: {opts.dst}",
        ]
        tail: list[str] = []
        copy_files, final = list(plan.copy_files), {}
        moved = bool(ckpt.config) and ckpt.config_place != "config.json"  # found elsewhere: written at the top
        if opts.base_config or moved or (opts.dtype and "config.json" in copy_files):
            # --base-config: the given config is the output's; a cast changes the weights' dtype: config.json must
            # say so (rewritten, not copied), and a dequantizing cast drops quantization_config.
            if "config.json" in copy_files:
                copy_files.remove("config.json")
            config = ckpt.config
            if plan.dequantized:
                config = {k: v for k, v in config.items() if k != "quantization_config"}
            final["config.json"] = config_bytes(with_dtype(config, opts.dtype) if opts.dtype else config)
            if opts.base_config:
                tail.append(f"  config.json: from --base-config {opts.base_config}")
            if opts.dtype:
                tail.append(f"  config.json: dtype keys set to {CONFIG_DTYPE_NAMES[opts.dtype]}")
        final[INDEX_NAME] = (json.dumps(index, indent=2) + "\n").encode()
        tail += [f"  note: {n}" for n in [*ckpt.notes, *plan.notes]]
        fp = fingerprint(
            opts.src, sorted((n, h.file_size) for n, h in ckpt.headers.items()),
            [(f.name, f.size, f.header) for f in files], plan.pieces,
        )
        setup = JobSetup(
            summary=summary, files=files, pieces=plan.pieces, assignment=[], ep=0,
            copy_files=copy_files, final_files=final, fingerprint=fp, job_id=uuid.uuid4().hex,
            chunked=chunked, notices=[f"note: {opts.src}: {n}" for n in ckpt.notes],
        )
        return Draft(setup, plan.num_experts, src.display("config.json"), [*ckpt.source_files, *plan.copy_files],
                     src, tail)


CHECKPOINTS = CheckpointPlanner()


def plan_job(opts: JobOptions, dist: Dist) -> JobSetup:
    """Rank 0's work before any byte moves: read metadata, plan, lay out, check the destination."""
    return CHECKPOINTS.plan(opts, dist)


def _plan_source(opts: JobOptions, dist: Dist, src: Store) -> JobSetup:
    """The job's plan from the source's metadata, its destination not looked at (resuming False)."""
    return CHECKPOINTS.plan_source(opts, dist, src)


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


def execute(setup: JobSetup | str | None, opts: JobOptions, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run a job planned on rank 0 and commit it; returns the exit code.

    `setup` is rank 0's plan, or the error text that ended its planning; None on the other
    ranks. Rank 0 coordinates (Coordinator: takes the destination's lock, convert.engine.dest_lock, prepares the
    destination and sends each rank only its own part of the job, or the exit code of a job that ends before
    streaming; the lock is given up when the job ends, however it ends); every rank works its part (Worker).
    0 ok, 1 failed (destination left without its final files), 2 refused before writing.
    """
    if dist.is_main:
        assert setup is not None, "rank 0 runs a plan or reports why there is none"
        return Coordinator(setup, opts, dist, report).run()
    return Worker(opts, dist).serve()


def _fail(report: dict[str, Any] | None, text: str) -> None:
    print(f"error: {text}", file=sys.stderr)
    if report is not None:
        report["error"] = report.get("error", "") + text.splitlines()[0] + " "


@dataclass
class RankWork:
    """What rank 0 sends each rank once the job is planned and its destination prepared."""

    job: SinkJob  # the rank's own view of the job (Sink.for_rank): only the pieces it writes
    job_id: str
    pins: SourcePins  # the source files' pins: every read is conditional on them (SourcePinning.expect)
    chunked: dict[str, ChunkedTensor] = field(default_factory=dict)  # the virtual files its pieces read
    sources: dict[str, str] = field(default_factory=dict)  # the extra sources its pieces read (JobSetup.sources)


# What a rank reports once it ran its part: its error (None: ok), its stats, and its sink's result for the commit.
Outcome = tuple["str | None", dict[str, Any], Any]


class Progress:
    """The job's written bytes, counted over every rank (Dist.counter_add), shown as a bar on rank 0 (`show`)."""

    def __init__(self, dist: Dist, job_id: str, total: int, show: bool) -> None:
        self.dist, self.key = dist, f"moe_convert/{job_id}"
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not (dist.is_main and show))

    def add(self, n: int) -> None:
        """This rank wrote `n` more bytes."""
        value = self.dist.counter_add(self.key + "/bytes", n)
        if self.dist.is_main:
            self.bar.update(value - self.bar.n)

    def finish(self) -> None:
        """This rank has streamed its part; rank 0 waits until every rank has."""
        dist = self.dist
        dist.counter_add(self.key + "/done", 1)
        if dist.is_main:
            while dist.counter_add(self.key + "/done", 0) < dist.world_size:
                self.bar.update(dist.counter_add(self.key + "/bytes", 0) - self.bar.n)
                time.sleep(0.02)
            self.bar.update(dist.counter_add(self.key + "/bytes", 0) - self.bar.n)
            self.bar.close()


# -- every rank: receive, run, report ---------------------------------------------------------------------------


class Worker:
    """One rank's work on a job: receive its part (RankWork) from the coordinator, run it through the sink, and
    report (error, stats, result) back. Rank 0 is a worker too: its coordinator hands it its part and stores."""

    def __init__(self, opts: JobOptions, dist: Dist) -> None:
        self.opts, self.dist = opts, dist
        self.started = 0.0  # time.perf_counter() when this rank's streaming began

    def serve(self) -> int:
        """A rank other than 0: the whole job as a worker; returns the job's exit code."""
        opts, dist = self.opts, self.dist
        # connect: this rank's object-store clients are set up while rank 0 plans, not once its part arrives
        src: Store = Storage(opts.src, opts.storage_options, opts.settings.storage)
        dst: Store = Storage(opts.dst, opts.storage_options, opts.settings.storage)
        for store in (src, dst):
            store.connect()
        # receive: its part, or the exit code of a job that ended before streaming
        part = dist.scatter(None)
        if isinstance(part, int):
            src.close()
            dst.close()
            return part
        src = _reading(src, part.chunked, part.sources, opts.storage_options)
        sink = make_sink(src, dst, opts.settings)
        src.pinning.expect(part.pins)
        # run, report
        outcome = self.run(part, src, dst, sink)
        del part
        dist.gather_main(outcome)  # the ranks' results only where the commit needs them
        return 0 if dist.broadcast(True) else 1  # rank 0 says whether it committed

    def run(self, part: RankWork, src: Store, dst: Store, sink: Sink, total: int = 0) -> Outcome:
        """Stream this rank's pieces of `part` from `src` into `dst` through `sink`, then close both stores;
        returns what the rank reports. On rank 0 (`total`: the job's bytes) the stats are taken once every rank
        has streamed (Progress.finish)."""
        dist, opts = self.dist, self.opts
        view = part.job
        mine = sink.rank_pieces(view, dist.rank)
        progress = Progress(dist, part.job_id, total, opts.show_progress)
        reached = opts.hooks.on_bytes(dist.rank)  # a test's crash or pause (convert.settings.JobHooks)
        done_here = [0]

        def on_done(n: int) -> None:
            progress.add(n)
            done_here[0] += n
            if reached is not None:
                reached(done_here[0])

        warm_up(mine)
        PHASES.take()  # nothing of an earlier job in this process
        io0 = proc_io()
        self.started = t0 = time.perf_counter()
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
        progress.finish()
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
            # seconds in each phase of the pieces, summed over this rank's worker threads (convert.engine.executor)
            "phase_seconds": PHASES.take(),
        }
        return error, stats, result


# -- rank 0: plan (run_planned), prepare, scatter, gather, commit -----------------------------------------------


class Coordinator:
    """Rank 0's part of a planned job, around its own share of the work (a Worker): prepare the destination under
    its lock, scatter each rank's part, gather the ranks' outcomes, commit."""

    def __init__(self, setup: JobSetup | str, opts: JobOptions, dist: Dist, report: dict[str, Any] | None) -> None:
        self.setup, self.opts, self.dist, self.report = setup, opts, dist, report
        self.lock: DestinationLock | None = None  # the destination's, held from prepare() until the job ends
        self.prepare_at = time.monotonic()  # CLOCK_MONOTONIC when the destination's preparation began (--stats)
        self.copies = Copies()  # the source's other files, copied while the shards stream

    def run(self) -> int:
        """The job on rank 0; returns its exit code (every rank's)."""
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> int:
        setup, opts, dist = self.setup, self.opts, self.dist
        if isinstance(setup, str) or opts.dry_run:  # the job ends before streaming: every rank ends with its code
            code = self._failed(setup) if isinstance(setup, str) else self._dry_run(setup)
            return dist.scatter(lambda r: code)
        # prepare
        src = _reading(Storage(opts.src, opts.storage_options, opts.settings.storage), setup.chunked, setup.sources,
                       opts.storage_options)
        dst = Storage(opts.dst, opts.storage_options, opts.settings.storage)
        src.pinning.expect(setup.pins)
        src.pinning.probe_conditions(setup.pins)
        sink = make_sink(src, dst, opts.settings)
        job = SinkJob(setup.files, setup.pieces, setup.assignment, setup.fingerprint, opts.workers,
                      state={STATE_KEY: setup.pins, "outputs": setup.outputs})
        ended = self.prepare(src, dst, sink, job)
        if ended is None:
            self.copies = _start_copies(src, dst, setup.copy_files, setup.pins)
        # scatter
        part = dist.scatter(lambda r: ended if ended is not None else RankWork(
            sink.for_rank(job, r), setup.job_id, setup.pins, setup.chunked, setup.sources))
        if isinstance(part, int):  # the job ended before streaming: no copy was started
            src.close()
            dst.close()
            return part
        skipped: dict[str, Any] = job.resume.get("skipped") or {}
        total = sum(p.write_bytes for p in setup.pieces)
        _release(setup, job)
        if setup.resuming and skipped:
            print(_skipped_line(skipped))
        if self.report is not None:
            self.report["skipped_bytes"] = int(skipped.get("skipped_bytes", 0))
        # rank 0's own share
        worker = Worker(opts, dist)
        outcome = worker.run(part, src, dst, sink, total)
        del part
        # gather, commit
        gathered = dist.gather_main(outcome)
        assert gathered is not None
        ok = self.commit(src, dst, sink, job, gathered, skipped, worker.started)
        return 0 if dist.broadcast(ok) else 1

    def _failed(self, text: str) -> int:
        """Report the error that ended the planning; its exit code."""
        _fail(self.report, text)
        return 1 if getattr(text, "internal", False) else 2

    def _dry_run(self, setup: JobSetup) -> int:
        """Print the plan of a --dry-run; its exit code."""
        print(describe(setup, self.opts.workers))
        return 0

    def prepare(self, src: Store, dst: Store, sink: Sink, job: SinkJob) -> int | None:
        """Before any byte moves: take the destination's lock (held until the job ends), judge the destination
        again under it (the plan looked before the lock was ours: another job may have written it since), clear
        what an --overwrite replaces, and prepare the sink (filling `job.resume`). Returns the exit code of a job
        that ends here, else None."""
        setup, opts = self.setup, self.opts
        assert isinstance(setup, JobSetup)
        for line in setup.notices:
            print(line)
        try:
            opts.hooks.wait_at(BEFORE_LOCK)
            times = lock_times(opts.settings)
            self.lock = DestinationLock.acquire(dst, times)
            verdict = judge_destination(src, dst, opts.overwrite, setup.marker, setup.fingerprint, locked=True,
                                        times=times)
            setup.resuming = verdict.resume
        except (ConversionError, OSError) as exc:
            status = _error_text(exc)
            _fail(self.report, status)
            return 1 if getattr(status, "internal", False) else 2  # nothing was written but the lock, removed again
        try:
            if not setup.resuming:
                _clear_destination(dst, sink, verdict.replace)
            job.resume = sink.prepare(job, setup.resuming)
        except (ConversionError, OSError) as exc:
            status = _error_text(exc)
            _fail(self.report, status)
            # A fresh job that could not even prepare its destination wrote nothing of value: a refusal.
            return 1 if setup.resuming or getattr(status, "internal", False) else 2
        return None

    def commit(self, src: Store, dst: Store, sink: Sink, job: SinkJob, gathered: list[Outcome],
               skipped: dict[str, Any], t0: float) -> bool:
        """After every rank streamed: write the stats, report errors or commit (once the copies, _start_copies',
        are done, and where the destination's lock is still this job's); True when committed. `t0`: when rank 0's
        streaming began (time.perf_counter)."""
        setup, opts, dist, report, copies = self.setup, self.opts, self.dist, self.report, self.copies
        assert isinstance(setup, JobSetup)
        copy_error = copies.error()
        errors = [e for e, _, _ in gathered if e] + ([f"copying the source's other files: {copy_error}"]
                                                     if copy_error else [])
        if opts.stats_path:
            with open(opts.stats_path, "w") as fh:
                json.dump({"world_size": dist.world_size, "ep": setup.ep, "resumed": setup.resuming,
                           "prepare_at": self.prepare_at, "skipped_bytes": int(skipped.get("skipped_bytes", 0)),
                           "skipped": skipped, "ranks": [s for _, s, _ in gathered]}, fh, indent=2)
        if errors:
            for e in errors:
                _fail(report, e)
            print(f"error: conversion failed; {opts.dst} is incomplete (no {setup.marker}). "
                  "Re-run the same command to resume.", file=sys.stderr)
            return False
        opts.hooks.wait_at(BEFORE_COMMIT)
        try:
            # else every read was of the pinned versions, or failed (If-Match), and the copies were checked
            if not copies.settled() and not src.pinning.reads_pinned(setup.pins):
                check_pins(src, setup.pins, "during the conversion", COMMIT_REFUSED)
        except (ConversionError, OSError) as exc:
            _fail(report, _error_text(exc))
            return False
        try:
            _commit(dst, sink, job, setup, [r for _, _, r in gathered], self.lock)
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


def _start_copies(src: Store, dst: Store, names: list[str], pins: SourcePins) -> Copies:
    """Rank 0, once the destination is prepared: start copying the source's other files (configs, tokenizer:
    no markers) unchanged into it, all at once, in the background while the shards stream, then checking
    their pins (_check_copied), off the commit's path."""
    if not names:
        return Copies()
    pool = ThreadPoolExecutor(max_workers=min(len(names), src.settings.control_threads))
    copies = Copies([pool.submit(dst.copy_file_from, src, name) for name in names])
    copies.checked = pool.submit(_check_copied, src, names, pins, copies)
    pool.shutdown(wait=False)
    return copies


def _check_copied(src: Store, names: list[str], pins: SourcePins, copies: Copies) -> bool:
    """Once every copy of `names` is done, where every other read of the source was conditional on its pin
    (SourcePinning.reads_pinned): check the pins of the copies the store may not have held to theirs (a server-side
    copy), raising ConversionError where one changed; True then. False where that does not settle the source
    (other reads unconditional, or a copy failed: that failure is reported)."""
    if copies.error() is not None or not src.pinning.reads_pinned(n for n in pins if n not in names):
        return False
    unverified = {n: pins[n] for n in names if n in pins and not src.pinning.reads_pinned([n])}
    if unverified:
        check_pins(src, unverified, "during the conversion", COMMIT_REFUSED)
    return True


def _commit(dst: Store, sink: Sink, job: SinkJob, setup: JobSetup, results: list[Any],
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
    expected: dict[str, int | None] = {f.name: f.size for f in setup.files}  # None: no pinned size (listed)
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


def _release(setup: JobSetup, job: SinkJob) -> None:
    """Rank 0, once every rank has its part: drop what only the planning needed (every piece, every
    slot), keeping the file names and sizes, the final files and the pins the commit needs."""
    slim = [OutputFile(f.name, b"", f.size, {}) for f in setup.files]
    setup.files, setup.pieces, setup.assignment = slim, [], []
    job.files, job.pieces, job.assignment = slim, [], []


def _reading(src: Store | None, chunked: dict[str, ChunkedTensor], sources: dict[str, str] | None = None,
             storage_options: dict[str, Any] | None = None) -> Store:
    """`src` as the pieces read it: a ChunkedView where some read a chunked tensor's virtual file, a SourcesView
    where some read the files of extra `sources` (name -> URL, convert.io.sources; opened with `src`'s settings)."""
    assert src is not None
    # ChunkedView and SourcesView stand in for a Store: each reads what it adds and forwards every other attribute.
    view: Any = ChunkedView(src, chunked, load_chunk) if chunked else src
    if sources:
        from convert.io.sources import SourcesView

        view = SourcesView(view, {k: Storage(url, storage_options, src.settings) for k, url in sources.items()})
    return view


def _clear_destination(dst: Store, sink: Sink, replace: Contents | None) -> None:
    """Before a fresh run: with --overwrite (`replace`: what judge_destination found an earlier moe-convert job
    wrote there, under the lock), remove that, and nothing else.

    Markers go first, the record and state last, so an interrupted clean-up never looks
    complete and a re-run still knows which files are its own.
    """
    dst.makedirs()  # none on S3 (no directories there; s3fs's makedirs would create a missing bucket)
    if replace is None:
        return
    for name in replace.owned:
        dst.remove(name)
    dst.remove(OUTPUT_RECORD)
    sink.discard(read_state(dst))
