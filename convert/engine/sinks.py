"""Where a job's output bytes go: local files written in place, or object-store multipart uploads.

Both keep the same promises: nothing looks complete before the commit, and a re-run of
the same job (same plan fingerprint) after a crash resumes instead of starting over.
- LocalSink: every shard is preallocated as `<name>.incomplete`; each rank writes its
  pieces at their final offsets and appends finished piece ids to its journal (after an
  fsync of the data), every Settings.journal_seconds of work or Settings.journal_bytes of data
  (MOE_CONVERT_JOURNAL_SECONDS, MOE_CONVERT_JOURNAL_BYTES), whichever comes first. The commit
  renames the shards.
- MultipartSink: every shard is one multipart upload; each part (>= 5 MiB but the last)
  is assembled in memory by one rank and uploaded. Uploaded parts are the journal (S3's
  ListParts). The commit completes the uploads; the objects appear only then.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from convert.engine.executor import Executor
from convert.engine.part_fill import Copy, fill_computed, group_parts, new_buffers, part_copies, read_run, read_runs
from convert.errors import ConversionError
from convert.formats.shard_layout import OutputFile
from convert.io.memory import ByteBudget, pin_mmap_threshold
from convert.io.storage import MultipartUploads, PositionalWrites, Store, read_json
from convert.plan.base import Piece
from convert.settings import DEFAULT_SETTINGS, Settings
from sharding.parts import MIN_PART, Part, choose_max_part, plan_parts

STATE_DIR = ".moe-convert"
STATE_FILE = f"{STATE_DIR}/state.json"
OUTPUT_RECORD = f"{STATE_DIR}/output.json"  # what a finished job wrote (convert.engine.output_record); kept after the commit
# The lock of the job writing the destination now (convert.engine.dest_lock): no output, never removed with the state.
LOCK_FILE = f"{STATE_DIR}/lock.json"
INCOMPLETE = ".incomplete"
# The defaults of a job's Settings (convert.settings; a job's own come with it, read when it starts):
# Parts a rank builds and uploads at once: min(--workers, this). Each holds one part in memory.
UPLOAD_THREADS = DEFAULT_SETTINGS.upload_threads
# Parts whose source bytes touch are filled together (convert.engine.part_fill), up to this many parts'
# bytes per group: a per-expert source's projections of one expert then come by one request, not one
# per projection and part (bench.s3, S3 -> S3).
GROUP_PARTS = DEFAULT_SETTINGS.group_parts
# Part bytes a rank holds at most, per upload thread and in parts (being filled, waiting or uploading), so
# that every worker reads while it uploads: sharding.parts.PART_MEMORY sizes parts to it.
HELD_PARTS = DEFAULT_SETTINGS.held_parts


@dataclass
class SinkJob:
    """What a sink needs to know of the job.

    Rank 0 holds the whole job (every file, piece and rank's assignment); each rank runs its own
    view of it (Sink.for_rank), which holds only what that rank writes: its pieces (by their index
    in the plan), the slots they write, and, for uploads, its parts.
    """

    files: list[OutputFile]
    pieces: Sequence[Piece] | Mapping[int, Piece]  # index in the plan -> piece (a view: only its rank's)
    assignment: list[list[int]]
    fingerprint: str
    workers: int = 4
    resume: dict[str, Any] = field(default_factory=dict)  # filled by prepare() on rank 0, then sent to each rank
    state: dict[str, Any] = field(default_factory=dict)  # more entries for the state file (source pins, outputs)
    parts: list[Part] | None = None  # a rank's view of an upload job: the parts it builds (None: planned here)


def _whole(job: SinkJob) -> Sequence[Piece]:
    """The pieces of rank 0's whole job, in plan order (a rank's view holds a mapping of its own only)."""
    assert not isinstance(job.pieces, Mapping), "a rank's view of the job where the whole job is needed"
    return job.pieces


def _view(job: SinkJob, rank: int, todo: Sequence[int], headers: Collection[str] = (), **fields: Any) -> SinkJob:
    """Rank `rank`'s view of `job`: pieces `todo`, and the files they write with only their slots
    (the header bytes only of the files named in `headers`)."""
    pieces = {i: job.pieces[i] for i in todo}
    written = {w.tensor for p in pieces.values() for w in p.writes}
    files = []
    for f in job.files:
        slots = {name: slot for name, slot in f.slots.items() if name in written}
        if slots or f.name in headers:
            files.append(OutputFile(f.name, f.header if f.name in headers else b"", f.size, slots))
    assignment: list[list[int]] = [[] for _ in job.assignment]
    assignment[rank] = list(todo)
    return SinkJob(files, pieces, assignment, job.fingerprint, job.workers, **fields)


class Sink(Protocol):
    """Where a job's bytes go (LocalSink, MultipartSink). Rank 0 prepares the destination and cuts each rank's
    view of the job (for_rank); every rank runs its view (run, returning what the commit needs of it); rank 0
    commits with every rank's result, or discards an earlier unfinished job's state (--overwrite)."""

    def prepare(self, job: SinkJob, resuming: bool) -> dict[str, Any]:
        """Rank 0: set up the destination for `job` (resuming: find what an earlier run finished); returns
        `job.resume` (with "skipped": skipped_summary())."""
        ...

    def run(self, job: SinkJob, rank: int, on_done: Callable[[int], None]) -> Any:
        """Write rank `rank`'s unfinished share of `job` (its view), calling `on_done(bytes)` as pieces land."""
        ...

    def commit(self, job: SinkJob, results: Sequence[Any]) -> None:
        """Rank 0: make the written files appear under their final names (`results`: every rank's run())."""
        ...

    def discard(self, job_state: dict[str, Any] | None) -> None:
        """Forget an unfinished job's state and partial files (its state file's `job_state`)."""
        ...

    def rank_pieces(self, job: SinkJob, rank: int) -> list[Piece]:
        """The pieces rank `rank` still has to write (of its view, or of the whole job on rank 0)."""
        ...

    def for_rank(self, job: SinkJob, rank: int) -> SinkJob:
        """Rank 0, after prepare(): rank `rank`'s view of `job`."""
        ...


def read_state(dst: Store) -> dict[str, Any] | None:
    """The state file of an unfinished job in `dst`, or None."""
    if not dst.exists(STATE_FILE):
        return None
    try:
        return dict(read_json(dst, STATE_FILE))
    except ConversionError:
        return None


def state_listing(dst: Store) -> tuple[list[str], list[str]]:
    """(files, subdirectories) of `dst`'s state directory (both empty where there is none); for clear_state,
    which can then remove them from an object store without a listing of its own."""
    try:
        return dst.list_dir(STATE_DIR)
    except OSError:
        if not dst.exists(STATE_DIR):
            return [], []
        raise


def clear_state(dst: Store, listed: tuple[list[str], list[str]] | None = None, keep_record: bool = True) -> None:
    """Remove an unfinished job's state (state file, journals) from `dst`, keeping the output record (unless
    `keep_record` is False) and the lock of the job running now.

    On an object store, `listed` may be state_listing()'s answer taken before (None: list now).
    """
    lock = LOCK_FILE.rsplit("/", 1)[1]
    keep = {lock, OUTPUT_RECORD.rsplit("/", 1)[1]} if keep_record else {lock}
    if dst.remote:  # one listing, one batched delete (a chain of HEADs and DELETEs costs latency each)
        files, dirs = listed if listed is not None else state_listing(dst)
        state = STATE_FILE.rsplit("/", 1)[1]
        dst.remove_many([f"{STATE_DIR}/{n}" for n in files if n not in keep | {state}])
        for name in dirs:
            dst.remove_tree(f"{STATE_DIR}/{name}")
        dst.remove_many([STATE_FILE] if state in files else [])  # the state file last
        return
    if not dst.exists(STATE_DIR):
        return
    files, dirs = dst.list_dir(STATE_DIR)
    for name in sorted(files, key=lambda n: n == "state.json"):  # the state file last
        if name not in keep:
            dst.remove(f"{STATE_DIR}/{name}")
    for name in dirs:
        dst.remove_tree(f"{STATE_DIR}/{name}")
    if not keep & set(files) and dst.positional is not None:
        os.rmdir(dst.positional.path(STATE_DIR))


def skipped_summary(done_bytes: int, total_bytes: int, done: int, total: int, unit: str) -> dict[str, Any]:
    """What a resume skips, as prepare() reports it: bytes and count of `unit` (pieces or parts)."""
    return {"skipped_bytes": done_bytes, "total_bytes": total_bytes, "skipped": done, "total": total, "unit": unit}


def make_sink(src: Store, dst: Store, settings: Settings = DEFAULT_SETTINGS) -> Sink:
    """The sink for `dst`: local files, or multipart uploads on an object store (tuned by the job's `settings`)."""
    if dst.positional is not None:
        return LocalSink(src, dst, settings)
    if dst.multipart is not None:
        return MultipartSink(src, dst, settings=settings)
    raise ConversionError(f"{dst.url}: writing to this filesystem is not supported (local paths and S3 are)")


class LocalSink:
    """In-place positional writes into preallocated `*.incomplete` files, with per-rank journals."""

    def __init__(self, src: Store, dst: Store, settings: Settings = DEFAULT_SETTINGS) -> None:
        """`dst` is a store with positional writes (local files)."""
        if dst.positional is None:
            raise ConversionError(f"{dst.url}: positional writes to this filesystem are not supported yet "
                                  "(local paths only)")
        self.src, self.dst, self.settings = src, dst, settings
        self.files: PositionalWrites = dst.positional

    def prepare(self, job: SinkJob, resuming: bool) -> dict[str, Any]:
        """Rank 0: write the state, create missing shard files, collect finished pieces from journals.

        The state file comes first, so every file this job creates is named by it (--overwrite
        may remove only what a moe-convert state or output record names).
        """
        self.dst.makedirs(STATE_DIR)
        self.dst.write_bytes(STATE_FILE, json.dumps({**job.state, "fingerprint": job.fingerprint}).encode())
        done: set[int] = set()
        existing, _ = self.dst.list_dir()
        recreated: set[str] = set()
        for f in job.files:
            name = f.name + INCOMPLETE
            if not (resuming and name in existing and self.dst.size(name) == f.size):
                self.files.create_sized(name, f.header, f.size)
                recreated.add(f.name)
        if resuming:
            journals, _ = self.dst.list_dir(STATE_DIR)
            for j in journals:
                if j.startswith("done-"):
                    text = self.dst.read_bytes(f"{STATE_DIR}/{j}").decode()
                    done.update(int(x) for x in text.split() if x.isdigit())
            done = {i for i in done if i < len(job.pieces)}
            if recreated:  # a shard made anew has lost the bytes its journaled pieces wrote
                file_of = {t: f.name for f in job.files for t in f.slots}
                done = {i for i in done if not any(file_of[w.tensor] in recreated for w in job.pieces[i].writes)}
        skipped = skipped_summary(sum(job.pieces[i].write_bytes for i in done), sum(p.write_bytes for p in _whole(job)),
                                  len(done), len(job.pieces), "pieces")
        return {"done_pieces": sorted(done), "skipped": skipped}

    def rank_pieces(self, job: SinkJob, rank: int) -> list[Piece]:
        done = set(job.resume.get("done_pieces", ()))
        return [job.pieces[i] for i in job.assignment[rank] if i not in done]

    def for_rank(self, job: SinkJob, rank: int) -> SinkJob:
        """Rank 0, after prepare(): what rank `rank` needs to run its unfinished pieces."""
        done = set(job.resume.get("done_pieces", ()))
        return _view(job, rank, [i for i in job.assignment[rank] if i not in done])

    def run(self, job: SinkJob, rank: int, on_done: Callable[[int], None]) -> None:
        """Write this rank's unfinished pieces, journaling them in batches after an fsync.

        Whenever the pieces finished since the last batch reach Settings.journal_bytes, or
        Settings.journal_seconds have passed since it (so a crash loses at most a few
        seconds of work however slow the storage), their fsync + journal entry run on a
        background thread while the executor goes on (its pipeline never drains at a batch
        boundary); a piece enters the journal only after an fsync that started after its bytes
        were written.
        """
        done = set(job.resume.get("done_pieces", ()))
        todo = [i for i in job.assignment[rank] if i not in done]
        slots = {name: (f.name + INCOMPLETE, slot) for f in job.files for name, slot in f.slots.items()}
        executor = Executor(self.src, self.dst, slots, job.workers)
        journal = self.files.path(f"{STATE_DIR}/done-{uuid.uuid4().hex[:8]}-r{rank}.txt")
        batch_bytes = self.settings.journal_bytes
        batch_seconds = self.settings.journal_seconds

        def commit_batch(jf: Any, batch: list[int]) -> None:
            for name in sorted({slots[w.tensor][0] for i in batch for w in job.pieces[i].writes}):
                self.files.fsync(name)
            jf.write("".join(f"{i}\n" for i in batch))
            jf.flush()
            os.fsync(jf.fileno())

        with open(journal, "a") as jf, ThreadPoolExecutor(max_workers=1) as flusher:
            batch: list[int] = []
            size = 0
            pending: Future[None] | None = None
            since = time.monotonic()

            def piece_done(k: int, written: int) -> None:
                nonlocal size, pending, since
                on_done(written)
                batch.append(todo[k])
                size += job.pieces[todo[k]].write_bytes
                if size >= batch_bytes or time.monotonic() - since >= batch_seconds:
                    if pending is not None:
                        pending.result()
                    pending = flusher.submit(commit_batch, jf, batch[:])
                    batch.clear()
                    size = 0
                    since = time.monotonic()

            executor.run([job.pieces[i] for i in todo], piece_done)
            if pending is not None:
                pending.result()
            if batch:
                commit_batch(jf, batch)

    def commit(self, job: SinkJob, results: Sequence[Any]) -> None:
        """Rank 0: give the shards their final names."""
        for f in job.files:
            self.dst.rename(f.name + INCOMPLETE, f.name)

    def discard(self, state: dict[str, Any] | None) -> None:
        """Forget an unfinished job's journals and partial shards (for --overwrite)."""
        clear_state(self.dst, keep_record=False)
        existing, _ = self.dst.list_dir() if self.dst.exists() else ([], [])
        for name in existing:
            if name.endswith(".safetensors" + INCOMPLETE):
                self.dst.remove(name)


class MultipartSink:
    """One multipart upload per shard; each part built in memory by one rank."""

    def __init__(self, src: Store, dst: Store, min_part: int = MIN_PART, max_part: int | None = None,
                 settings: Settings = DEFAULT_SETTINGS) -> None:
        """`max_part` None: sized to the job (sharding.parts.choose_max_part); `settings.min_part` and
        `settings.max_part`, where set (MOE_CONVERT_MIN_PART, MOE_CONVERT_MAX_PART), take the place of both."""
        self.src, self.dst, self.settings = src, dst, settings
        self.min_part = settings.min_part if settings.min_part is not None else min_part
        self.max_part = settings.max_part if settings.max_part is not None else max_part
        self._planned: tuple[SinkJob, list[Part]] | None = None
        self._uploads = dst.multipart  # None: part_size alone may still be asked (bench.part_model)

    @property
    def uploads(self) -> MultipartUploads:
        """The destination's multipart uploads."""
        if self._uploads is None:
            raise ConversionError(f"{self.dst.url}: multipart uploads to this filesystem are not supported yet "
                                  "(S3 only)")
        return self._uploads

    def threads(self, job: SinkJob) -> int:
        """Parts one rank builds and uploads at once."""
        return max(1, min(job.workers, self.settings.upload_threads))

    def part_size(self, job: SinkJob) -> int:
        """The largest part of this job (the same on every rank)."""
        if self.max_part is not None:
            return self.max_part
        return choose_max_part(sum(f.size for f in job.files), len(job.assignment), self.threads(job))

    def _parts(self, job: SinkJob) -> list[Part]:
        if self._planned is None or self._planned[0] is not job:
            parts = plan_parts(job.files, _whole(job), job.assignment, self.min_part, self.part_size(job))
            self._planned = (job, parts)
        return self._planned[1]

    def prepare(self, job: SinkJob, resuming: bool) -> dict[str, Any]:
        """Rank 0: start (or find again) one upload per shard and list the parts already uploaded."""
        parts = self._parts(job)
        layout = hashlib.sha256(repr([(p.file, p.number, p.start, p.end) for p in parts]).encode()).hexdigest()
        state = (read_state(self.dst) or {}) if resuming else {}
        old = state.get("uploads", {})
        if old and state.get("parts") != layout:
            # Another world size or --ep cut the files differently: earlier parts cannot be reused.
            self.discard(state)
            old = {}
        sizes = {(p.file, p.number): p.end - p.start for p in parts}

        def start(name: str) -> tuple[str, dict[int, str]]:
            upload = old.get(name)
            listed = self.uploads.list_parts(name, upload) if upload else {}
            if upload and (listed or self._upload_alive(name, upload)):
                return upload, {n: etag for n, (etag, size) in listed.items() if sizes.get((name, n)) == size}
            return self.uploads.create(name), {}

        # One request per shard, each waiting out the store's latency: all at once.
        with ThreadPoolExecutor(max_workers=max(1, min(len(job.files), 16))) as pool:
            started = list(pool.map(start, [f.name for f in job.files]))
        uploads = {f.name: u for f, (u, _) in zip(job.files, started)}
        done = {f.name: d for f, (_, d) in zip(job.files, started)}
        self.dst.write_bytes(
            STATE_FILE,
            json.dumps({**job.state, "fingerprint": job.fingerprint, "uploads": uploads, "parts": layout}).encode(),
        )
        skipped = skipped_summary(sum(sizes[(f, n)] for f, d in done.items() for n in d),
                                  sum(sizes.values()), sum(len(d) for d in done.values()), len(sizes), "parts")
        return {"uploads": uploads, "done_parts": {k: {str(n): e for n, e in v.items()} for k, v in done.items()},
                "skipped": skipped}

    def _upload_alive(self, name: str, upload: str) -> bool:
        return any(u == upload for _, u in self.uploads.pending(""))

    def _my_parts(self, job: SinkJob, rank: int) -> list[Part]:
        if job.parts is not None:
            return job.parts
        done = job.resume.get("done_parts", {})
        return [p for p in self._parts(job) if p.owner == rank and str(p.number) not in done.get(p.file, {})]

    def for_rank(self, job: SinkJob, rank: int) -> SinkJob:
        """Rank 0, after prepare(): what rank `rank` needs to build and upload its unfinished parts."""
        parts = self._my_parts(job, rank)
        names = {p.file for p in parts}
        heads = {f.name for f in job.files if f.name in names and any(p.file == f.name and p.start < len(f.header)
                                                                       for p in parts)}
        uploads = {n: u for n, u in job.resume.get("uploads", {}).items() if n in names}
        return _view(job, rank, sorted({i for p in parts for i in p.pieces}), heads,
                     resume={"uploads": uploads}, parts=parts)

    def rank_pieces(self, job: SinkJob, rank: int) -> list[Piece]:
        idx = sorted({i for p in self._my_parts(job, rank) for i in p.pieces})
        return [job.pieces[i] for i in idx]

    def run(self, job: SinkJob, rank: int, on_done: Callable[[int], None]) -> dict[str, dict[int, str]]:
        """Build and upload this rank's unfinished parts; returns {file: {part number: ETag}}.

        Parts whose source bytes touch are grouped (convert.engine.part_fill). A group's buffers are taken out
        of the rank's budget (held_bytes) and filled by tasks that the reading threads share: one per run of
        touching source bytes (at most a part's size: one request each) and one for the pieces it computes.
        A part uploads as soon as its last task ends, while the readers go on.
        """
        pin_mmap_threshold()  # part buffers go back to the OS when freed (convert.memory)
        parts = self._my_parts(job, rank)
        sizes = [p.end - p.start for p in parts]
        headers = {f.name: f.header for f in job.files}
        slot_of = {name: (f.name, slot) for f in job.files for name, slot in f.slots.items()}
        uploads = job.resume["uploads"]
        upload_part = self.uploads.upload_part
        copies, computed = part_copies(parts, job.pieces, slot_of)
        size = self.part_size(job)
        copies_of: dict[int, list[Copy]] = {}
        for c in copies:
            copies_of.setdefault(c.part, []).append(c)
        out: dict[str, dict[int, str]] = {}
        lock = threading.Lock()
        held = ByteBudget(self.held_bytes(job))
        left: dict[int, int] = {}  # part -> its fill tasks not ended yet
        bufs: dict[int, bytearray] = {}  # parts being filled
        uploaded: list[Future[None]] = []

        def upload(k: int, data: bytearray) -> None:
            part = parts[k]
            try:
                etag = upload_part(part.file, uploads[part.file], part.number, data)
                with lock:
                    out.setdefault(part.file, {})[part.number] = etag
                on_done(sizes[k])
            except BaseException:
                held.close()
                raise
            finally:
                held.release(sizes[k])

        def ended(touched: Collection[int]) -> None:
            """One task less for the parts `touched`; those with none left are uploaded. Call under the lock."""
            for k in touched:
                left[k] -= 1
                if not left[k]:
                    uploaded.append(writers.submit(upload, k, bufs.pop(k)))

        def task(fill: Callable[[], None], touched: Collection[int]) -> None:
            try:
                fill()
            except BaseException:
                held.close()
                raise
            with lock:
                ended(touched)

        tasks: list[Future[None]] = []
        threads = self.threads(job)
        # readers end (and submit their last uploads) before the writers' pool closes
        with ThreadPoolExecutor(max_workers=threads) as writers, ThreadPoolExecutor(max_workers=threads) as readers:
            # a group's parts end together and upload at once: at most one per upload thread
            for group in group_parts(sizes, copies, min(self.settings.group_parts, threads) * size):
                if not held.acquire(sum(sizes[k] for k in group)):
                    break
                into = new_buffers(parts, group, headers)
                work: list[tuple[Callable[[], None], set[int]]] = [
                    (partial(read_run, self.src, run, into), {c.part for c in run})
                    for run in read_runs([c for k in group for c in copies_of.get(k, ())], size)
                ]
                todo = [i for k in group for i in computed[k]]
                if todo:
                    work.append((partial(fill_computed, self.src, parts, into, todo, job.pieces, slot_of), set(group)))
                with lock:
                    bufs.update(into)
                    for k in group:
                        left[k] = 1 + sum(k in touched for _, touched in work)
                    ended(group)  # the 1 above: a part without tasks goes at once
                tasks += [readers.submit(task, fill, touched) for fill, touched in work]
            for t in tasks:
                t.result()
            for u in list(uploaded):
                u.result()
        return out

    def held_bytes(self, job: SinkJob) -> int:
        """Part bytes one rank holds at most: Settings.held_parts parts per upload thread (a group holds at most one
        per thread, so it always fits)."""
        return self.threads(job) * self.settings.held_parts * self.part_size(job)

    def commit(self, job: SinkJob, results: Sequence[dict[str, dict[int, str]]]) -> None:
        """Rank 0: complete every upload from the parts of this run and of earlier runs."""
        done = job.resume.get("done_parts", {})
        expected: dict[str, int] = {}
        for p in self._parts(job):
            expected[p.file] = max(expected.get(p.file, 0), p.number)
        complete: list[tuple[str, dict[int, str]]] = []
        for f in job.files:
            etags = {int(n): e for n, e in done.get(f.name, {}).items()}
            for r in results:
                etags.update(r.get(f.name, {}))
            if sorted(etags) != list(range(1, expected[f.name] + 1)):
                raise ConversionError(f"{self.dst.display(f.name)}: parts {sorted(etags)} of {expected[f.name]} uploaded")
            complete.append((f.name, etags))
        # Each completion is one request the store may take seconds to answer for a large object: all at once.
        with ThreadPoolExecutor(max_workers=max(1, min(len(complete), 16))) as pool:
            for fut in [pool.submit(self.uploads.complete, name, job.resume["uploads"][name], etags)
                        for name, etags in complete]:
                fut.result()

    def discard(self, state: dict[str, Any] | None) -> None:
        """Abort the uploads of an unfinished job and forget it (for --overwrite)."""
        for name, upload in (state or {}).get("uploads", {}).items():
            self.uploads.abort(name, upload)
        clear_state(self.dst, keep_record=False)

