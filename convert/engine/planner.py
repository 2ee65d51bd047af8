"""Rank 0's planning of a job, before any byte moves: what every kind of job shares, in one place.

A kind of job (a checkpoint conversion, convert.engine.job; an adapter's, convert.engine.adapter_job; a merge,
convert.engine.merge_job) says what its source plans to: a `Draft`, its output files, pieces and final files.
The `Planner` makes the choices every kind shares, each once: the number of expert slices and the pieces'
assignment to ranks (choose_ep), the source pins, and the destination's judgment
(convert.engine.output_record.judge_destination), whose first look runs beside the source's planning.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from convert.engine.dest_lock import lock_times
from convert.engine.output_record import judge_destination, look_at_destination
from convert.errors import ConversionError
from convert.formats.chunks import ChunkedTensor
from convert.formats.shard_layout import OutputFile
from convert.io.pins import SourcePins, source_pins
from convert.io.storage import Storage, Store
from convert.plan.base import Piece
from convert.settings import DEFAULT_SETTINGS, NO_HOOKS, JobHooks, Settings
from launch.dist import Dist
from sharding.ep import assign_pieces, expert_slices


@dataclass
class JobOptions:
    """Everything a conversion needs; mirrors the command-line flags, plus the job's settings and test hooks."""

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
    stats_path: str | None = None  # rank 0 writes per-rank stats (peak RSS, bytes, seconds) as JSON
    base_config: str | None = None  # config.json for a source without one (--base-config), written into the output
    names: str = "hf"  # the tensor names written: "hf" or a trainer naming (configs/namings/*.json)
    settings: Settings = DEFAULT_SETTINGS  # tuning knobs (convert.settings; the entry points read them at job start)
    hooks: JobHooks = NO_HOOKS  # test hooks only (crash, pause, gates; convert.settings.JobHooks)


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
    pins: SourcePins = field(default_factory=dict)  # source file -> SourcePinning.pin at plan time
    target: str | None = None  # the adapter target the output is written for (recorded in the output record)
    chunked: dict[str, ChunkedTensor] = field(default_factory=dict)  # chunked tensors pieces read virtually
    notices: list[str] = field(default_factory=list)  # printed before the job starts (what the source left out)
    sources: dict[str, str] = field(default_factory=dict)  # extra sources pieces read (convert.io.sources): name -> URL

    @property
    def outputs(self) -> list[str]:
        """Every file the job writes into --dst, in write order (the marker last)."""
        return [f.name for f in self.files] + list(self.copy_files) + list(self.final_files)

    @property
    def marker(self) -> str:
        """The final file whose presence marks the output complete (written last)."""
        return next(reversed(self.final_files))


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


@dataclass
class Draft:
    """A kind's plan of its source, before the planner's choices: `setup` without its EP, assignment and pins."""

    setup: JobSetup  # ep 0 and no assignment until the planner chooses them; summary: the lines before the EP's
    num_experts: int  # E: the expert slices are cut from it
    where: str  # where E was read (named by an --ep refusal)
    reads: list[str]  # the source files the job reads or copies: pinned (unless a dry run)
    pin_from: Store  # the storage the kind read them from (its listing serves the pins)
    tail: list[str] = field(default_factory=list)  # summary lines after the EP's


class Planner:
    """Rank 0's plan of one kind of job. A kind implements `draft`; the planner owns the EP choice, the
    assignment, the source pins and the destination's judgment.

    `uneven_note` / `turns_note`: the EP summary line names slices of unequal sizes / a line says that each rank
    works through several slices where --ep exceeds the world size.
    """

    uneven_note = False
    turns_note = True

    def __call__(self, opts: JobOptions, dist: Dist) -> JobSetup:
        return self.plan(opts, dist)

    def plan(self, opts: JobOptions, dist: Dist) -> JobSetup:
        """The job's plan, its destination judged (not for a dry run): the destination's first look (a request
        chain of its own on an object store) runs beside the source's planning; its refusals come after the
        plan's own."""
        src = Storage(opts.src, opts.storage_options, opts.settings.storage)
        dst = Storage(opts.dst, opts.storage_options, opts.settings.storage)
        try:  # the metadata reads cached descriptors: release them (a batch runs many jobs in one process)
            with ThreadPoolExecutor(max_workers=1) as pool:
                look = None if opts.dry_run else pool.submit(look_at_destination, src, dst)
                setup = self.plan_source(opts, dist, src)
                if look is not None:
                    verdict = judge_destination(src, dst, opts.overwrite, setup.marker, setup.fingerprint,
                                                holds=look.result(), times=lock_times(opts.settings))
                    setup.resuming = verdict.resume
            return setup
        finally:
            src.close()
            dst.close()

    def plan_source(self, opts: JobOptions, dist: Dist, src: Store) -> JobSetup:
        """The job's plan from its source (`src`: opts.src opened), EP chosen and pieces assigned; its destination
        not looked at (resuming False)."""
        with ExitStack() as closing:
            draft = self.draft(opts, dist, src, closing)
            setup = draft.setup
            ep, note = choose_ep(opts.ep, dist.world_size, draft.num_experts, draft.where)
            setup.ep = ep
            setup.assignment = assign_pieces(setup.pieces, draft.num_experts, ep, dist.world_size)
            setup.summary = [*setup.summary, *self.ep_lines(ep, note, dist.world_size, draft.num_experts), *draft.tail]
            setup.pins = {} if opts.dry_run else source_pins(draft.pin_from, draft.reads)
            return setup

    @staticmethod
    def requested_ep(opts: JobOptions, dist: Dist) -> int:
        """The slices a kind whose pieces follow the expert slices cuts before E is known (--ep, else the world
        size). choose_ep then keeps it, refuses it, or caps it at E; and E experts cut into ep >= E slices are
        the E one-expert slices (the rest empty, holding no piece): the pieces of one plan are the chosen EP's."""
        return opts.ep or dist.world_size

    def ep_lines(self, ep: int, note: str, world_size: int, num_experts: int) -> list[str]:
        """The plan summary's lines of the EP choice."""
        sizes = sorted({len(r) for r in expert_slices(num_experts, ep)})
        line = (f"  ep={ep} expert slices over {world_size} rank(s); experts per slice: "
                + "/".join(str(n) for n in sizes))
        if self.uneven_note and len(sizes) > 1:
            line += f" (ep does not divide E={num_experts}: slices differ by one expert)"
        lines = [line]
        if self.turns_note and ep > world_size:
            lines.append(f"  each rank works through up to {-(-ep // world_size)} slices in turn")
        if note:
            lines.append(f"  {note}")
        return lines

    def draft(self, opts: JobOptions, dist: Dist, src: Store, closing: ExitStack) -> Draft:
        """The kind's plan of its source (`src`: opts.src opened; what the kind opens itself goes on `closing`)."""
        raise NotImplementedError
