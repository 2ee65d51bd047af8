"""`python -m convert.verify --src A --dst B`: prove that B is a correct conversion of A.

    python -m convert.verify --nproc N --src A --dst B [--family F] [--report PATH]

Independent of the converter's planner and executor (it builds no plan and moves no byte the
way a conversion does): the verifier reads safetensors checkpoints itself (convert.verify.tables:
raw headers, cross-checked with the safetensors library), derives what B must hold from the family
tables, and compares every expert of every layer slice by slice (bit for bit where bytes
moved, allclose where a dtype changed) and every other tensor chunk by chunk. B's index
must name every tensor exactly once, every shard must exist, total_size must be right, and
the source's other files must be there unchanged. Each rank checks its slice of the experts
(and a share of the other tensors) with --workers threads, each reading one expert (or
chunk) at a time into a buffer it reuses; rank 0 gathers and prints a summary. Exit codes: 0 verified, 1 mismatches found, 2 could not verify (bad arguments or
an invalid source).

What it does share with the converter: the family tables, renames and trainer namings
(convert.families); the reader of trainer containers for a DCP or per-rank-shards source
(convert.formats.checkpoint, .chunks, .dcp); for adapters, the layout detection
(convert.formats.adapter_layouts) and the key naming (convert.plan.adapter_names); the servers'
rules (convert.targets); the output record and the destination lock (convert.engine). It does
not import convert.cli: its launcher wrapper and --workers default are convert.toplevel's.

Relations are pluggable: `RELATIONS` maps a kind ("base", "adapter") to a builder that turns
the two directories into checks (convert.verify.checks); `detect_kind` picks one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from convert.engine.dest_lock import held_until_done
from convert.errors import ConversionError, describe, set_destination
from convert.families import detect_family
from convert.families.namings import hf_views, with_naming_layouts
from convert.flag_types import json_object, positive_int
from convert.formats.checkpoint import SHARDING_KEY, open_checkpoint
from convert.formats.chunks import ChunkedTensor, ChunkedView
from convert.formats.dcp import METADATA as DCP_METADATA
from convert.formats.dcp import load_chunk
from convert.formats.model_config import (
    CONFIG_DTYPE_NAMES,
    DTYPE_KEYS,
    config_bytes,
    read_base_config,
    without_dtype,
)
from convert.formats.safetensors import read_header
from convert.io.storage import Storage, Store, read_json
from convert.settings import DEFAULT_SETTINGS, Settings
from convert.targets.rules import TARGETS
from convert.toplevel import ToolParser, default_workers, run_main
from convert.verify.base import base_relation
from convert.verify.checks import (
    BLOCK_BYTES,
    ExpertCheck,
    Mismatch,
    PassCheck,
    Tally,
    chunk_bytes,
    computes,
    pass_chunks,
    pass_shape_problem,
    release_buffers,
    role_groups,
    run_expert,
    run_pass_chunk,
)
from convert.verify.relation import CannotVerify, Relation, VerifyOptions, compare_files, copied_files
from convert.verify.tables import Stored, Table, Unreadable, element_size, read_table
from convert.verify.target import recorded_target, target_findings
from launch.dist import Dist
from launch.local import add_nproc_flag

BASE_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
# The verifier's knobs are VerifyOptions.settings (convert.settings.Settings, read by the entry point when it
# starts): verify_memory, the data a rank's comparing threads hold together (each one expert of both sides or one
# chunk pair: fewer threads than --workers where one expert is large); verify_read_ahead, the page cache requested
# ahead of the items being compared (local files; 0: none); and the stores' (settings.storage).


def build_base(src: Store, dst: Store, opts: VerifyOptions) -> Relation:
    """The base-weight relation: experts per layer per the family tables, everything else unchanged."""
    src_table, src_problems, chunked, place = source_table(src)
    if src_problems:
        raise CannotVerify(f"the source is not a valid checkpoint: {src_problems[0]}")
    if place != "config.json" and not opts.base_config and src.exists(place):
        opts = dataclasses.replace(opts, base_config=src.display(place))  # NeMo's .hf_metadata/config.json
    if "config.json" not in src_table.files and not opts.base_config:
        raise CannotVerify(f"{src.display('config.json')}: missing (needed for the family and number of experts; "
                           "a trainer's checkpoint: pass the model's config.json with --base-config)")
    try:
        config = read_base_config(opts.base_config, opts.storage_options) if opts.base_config else \
            read_json(src, "config.json")
        family = detect_family(config, src.display("config.json"), opts.family)
        num_experts = family.num_experts(config, src.display("config.json"))
    except (ValueError, ConversionError) as exc:
        raise CannotVerify(str(exc)) from exc
    dst_table, problems = read_table(dst, BASE_INDEX, require_index=True)
    try:  # a side in a trainer's names (configs/namings) is read under HF names
        family = with_naming_layouts(family, config)
        a, b, named = hf_views(src_table.tensors, dst_table.tensors, config, src.display(), dst.display(),
                               lambda n, s: Stored(n, s.file, s.dtype, s.shape, s.start, s.end))
    except ConversionError as exc:
        raise CannotVerify(str(exc)) from exc
    experts, passes, bad_src, found = base_relation(dataclasses.replace(src_table, tensors=a),
                                                    dataclasses.replace(dst_table, tensors=b), family, num_experts,
                                                    config)
    if bad_src:
        raise CannotVerify(f"the source is not a valid {family.name} checkpoint: {bad_src[0]}")
    problems += found
    files = copied_files(src_table, BASE_INDEX)
    problems += compare_files(src, dst, files, {"config.json"})
    problems += config_problems(src, dst, dst_table, config_bytes(config) if opts.base_config else None)
    headline = (f"{family.name}: {len(experts)} expert layer(s) x E={num_experts}; {len(src_table.tensors)} source "
                f"tensors -> {len(dst_table.tensors)} destination tensors in {len(dst_table.shards)} file(s); "
                f"{len(files)} other file(s)") + "".join(f"; {line}" for line in named)
    return Relation("base", headline, experts, passes, problems, len(src_table.tensors), len(dst_table.tensors),
                    len(dst_table.shards), src_chunked=chunked)


def source_table(src: Store) -> tuple[Table, list[str], dict[str, ChunkedTensor], str]:
    """The source's table and the problems found, its chunked tensors (virtual file -> tensor) and where its
    config.json is: a trainer's checkpoint (torch DCP, per-rank safetensors shards) is read through
    convert.formats.checkpoint, whose tensors saved in chunks are read as virtual files
    (convert.formats.chunks.ChunkedView)."""
    files, dirs = src.list_dir()
    if DCP_METADATA not in files:
        weights = sorted(f for f in files if f.endswith(".safetensors"))
        if not weights or SHARDING_KEY not in read_header(src, weights[0]).metadata:
            table, problems = read_table(src, BASE_INDEX, require_index=False)
            return table, problems, {}, "config.json"
    ckpt = open_checkpoint(src)
    tensors = {n: Stored(n, r.file, r.info.dtype, r.info.shape, r.info.start, r.info.end)
               for n, r in ckpt.tensors.items()}
    table = Table(src.display(), tensors, files, dirs, sorted(ckpt.headers), None)
    return table, [], ckpt.chunked, ckpt.config_place


def config_problems(src: Store, dst: Store, dst_table: Table, given: bytes | None = None) -> list[str]:
    """The destination's config.json must equal the source's (or `given`, the --base-config one), except that its
    dtype keys (top level and text_config) may change, and must then name the dtype the destination's floating
    tensors have."""
    if not dst.exists("config.json"):
        return [f"{dst.display('config.json')}: missing (--base-config gave one)"] if given is not None else []
    raw = dst.read_bytes("config.json")
    source = given if given is not None else src.read_bytes("config.json")
    if raw == source:
        return []
    where = dst.display("config.json")
    try:
        before, after = json.loads(source), json.loads(raw)
    except ValueError as exc:
        return [f"{where}: not valid JSON ({exc})"]
    if without_dtype(before) != without_dtype(after):
        return [f"{where}: differs from {'--base-config' if given is not None else src.display('config.json')} "
                "(beyond its dtype keys)"]
    floats = {t.dtype for t in dst_table.tensors.values() if t.dtype in CONFIG_DTYPE_NAMES}
    if len(floats) != 1:
        return []
    want = CONFIG_DTYPE_NAMES[floats.pop()]
    sub = after.get("text_config") if isinstance(after.get("text_config"), dict) else {}
    claims = [(k, v) for k, v in after.items() if k in DTYPE_KEYS] + [(f"text_config.{k}", v) for k, v in sub.items()
                                                                     if k in DTYPE_KEYS]
    return [f"{where}: {k} is {v!r} but the tensors are {want}" for k, v in claims if v != want]


def build_adapter(src: Store, dst: Store, opts: VerifyOptions) -> Relation:
    """The adapter relation: per-expert LoRA deltas B_e @ A_e * scaling equal on both sides."""
    from convert.verify.adapter import adapter_relation  # imports torch: only when an adapter is verified

    return adapter_relation(src, dst, opts)


RELATIONS: dict[str, Callable[[Store, Storage, VerifyOptions], Relation]] = {
    "base": build_base,
    "adapter": build_adapter,
}


def detect_kind(src: Store) -> str:
    """"adapter" for a directory holding adapter_config.json, else "base"."""
    files, _ = src.list_dir()
    return "adapter" if ADAPTER_CONFIG in files else "base"


def plan_verify(opts: VerifyOptions) -> Relation:
    """Rank 0: read both directories' metadata and build the checks. Raises CannotVerify.

    An adapter output is also checked against its target's rules (--target, else the target its
    output record names); without --src, only against those rules."""
    dst = Storage(opts.dst, opts.storage_options, opts.settings.storage)
    src = Storage(opts.src, opts.storage_options, opts.settings.storage) if opts.src is not None else None
    try:
        if not dst.isdir():
            raise CannotVerify(f"{opts.dst}: the destination is not a directory")
        if src is None:
            return _target_relation(dst, opts)
        if not src.isdir():
            raise CannotVerify(f"{opts.src}: the source is not a directory")
        kind = detect_kind(src)
        relation = RELATIONS[kind](src, dst, opts)
        target = opts.target or (recorded_target(dst) if kind == "adapter" else None)
        if target is not None:
            if kind != "adapter":
                raise CannotVerify(f"--target {target}: {opts.src} is not an adapter (target rules are for adapters)")
            refusals, warnings, headline = target_findings(dst, target, opts.family, opts.base_config,
                                                           opts.storage_options)
            relation.problems += refusals
            relation.notes += [headline, *warnings]
        return relation
    except Unreadable as exc:
        raise CannotVerify(str(exc)) from exc
    finally:
        if src is not None:
            src.close()
        dst.close()


def _target_relation(dst: Store, opts: VerifyOptions) -> Relation:
    """`verify --target T --dst D` without --src: D against T's rules only (no tensor comparison)."""
    target = opts.target or recorded_target(dst)
    if target is None:
        raise CannotVerify("no --src: give --target (or verify an output whose record names its target)")
    refusals, warnings, headline = target_findings(dst, target, opts.family, opts.base_config, opts.storage_options)
    files, _ = dst.list_dir()
    return Relation("adapter target", headline, [], [], refusals, 0, 0, len([f for f in files if f.endswith(".safetensors")]),
                    notes=warnings)


def share(relation: Relation, rank: int, world: int) -> tuple[list[tuple[int, int]], list[int]]:
    """This rank's work: (expert check index, expert) pairs of its expert slice, and pass-through checks.

    Rank r of n checks experts [r*E/n, (r+1)*E/n) of every layer (slices differ by at most one
    expert); pass-through tensors go, largest first, to the least-loaded rank.
    """
    mine: list[tuple[int, int]] = []
    for i, check in enumerate(relation.experts):
        base, extra = divmod(check.num_experts, world)
        lo = rank * base + min(rank, extra)
        hi = lo + base + (1 if rank < extra else 0)
        mine += [(i, e) for e in range(lo, hi)]
    load = [0] * world
    passes: list[int] = []
    for i in sorted(range(len(relation.passes)), key=lambda i: (-relation.passes[i].src.nbytes, i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += relation.passes[i].src.nbytes
        if r == rank:
            passes.append(i)
    return mine, passes


def worker_threads(workers: int, largest: int, budget: int = DEFAULT_SETTINGS.verify_memory) -> int:
    """Threads to compare with: `workers`, fewer where that many items of `largest` bytes (plus each
    thread's scratch blocks) would exceed `budget` (Settings.verify_memory); at least one."""
    per = largest + 2 * BLOCK_BYTES
    return max(1, min(workers, budget // max(1, per)))


# One unit of parallel work: () -> (its findings, the pass-through check it belongs to or -1).
Item = Callable[[], tuple[Tally, int]]
# The byte ranges an item reads: (storage, file, start, end).
Spans = list[tuple[Store, str, int, int]]


def _expert_spans(check: ExpertCheck, src: Store, dst: Store, e: int, roles: tuple[str, ...] | None = None) -> Spans:
    """What expert e's check (of `roles` only, where given) reads, where its sides say (sides without `spans`
    are not read ahead)."""
    out: Spans = []
    for side, storage in ((check.src, src), (check.dst, dst)):
        spans = getattr(side, "spans", None)
        out += [(storage, *span) for span in (spans(e) if roles is None else spans(e, roles))] if spans else []
    return out


def _chunk_spans(check: PassCheck, src: Store, dst: Store, i: int, j: int) -> Spans:
    """What elements [i, j) of a pass-through check read."""
    s, d = check.src, check.dst
    ss, ds = element_size(s.dtype), element_size(d.dtype)
    return [(src, s.file, s.start + i * ss, s.start + j * ss), (dst, d.file, d.start + i * ds, d.start + j * ds)]


def _expert_item(check: ExpertCheck, src: Store, dst: Store, e: int, limit: int,
                 roles: tuple[str, ...] | None = None, count: bool = True) -> tuple[Tally, int]:
    part = Tally([], limit=limit)
    try:
        run_expert(check, src, dst, e, part, roles, count)
    except (ConversionError, OSError, RuntimeError, ValueError) as exc:
        part.add(Mismatch(check.layer, f"could not be read: {exc}", e))
    return part, -1


def _chunk_item(check: PassCheck, index: int, src: Store, dst: Store, i: int, j: int,
                limit: int) -> tuple[Tally, int]:
    part = Tally([], limit=limit)
    try:
        run_pass_chunk(check, src, dst, i, j, part)
    except (ConversionError, OSError, RuntimeError, ValueError) as exc:
        part.add(Mismatch(check.dst.name, f"could not be read: {exc}"))
    return part, index


class ReadAhead:
    """Keeps the page cache filling up to `window` bytes ahead of the items being compared.

    Only the ranges the items will read are requested (posix_fadvise WILLNEED through
    Store.prefetch; local files), merged per file where they touch, refilled in half-window
    steps. The disk then works while the threads compare; it costs page cache, not process memory.
    """

    def __init__(self, spans: list[Spans], window: int = DEFAULT_SETTINGS.verify_read_ahead) -> None:
        """Nothing requested yet: `spans` are each item's byte ranges, in the order the items run; `window` the
        bytes to keep requested ahead (Settings.verify_read_ahead; 0: none)."""
        self.spans, self.window = spans, window
        self.cum = [0]
        for sp in spans:
            self.cum.append(self.cum[-1] + sum(end - start for _, _, start, end in sp))
        self.next = 0  # items [0, next) have been requested
        self.lock = threading.Lock()

    def reached(self, k: int) -> None:
        """Item k is about to run: top the window up when less than half of it is left."""
        with self.lock:
            if self.window <= 0 or self.next >= len(self.spans):
                return
            if self.next > k and self.cum[self.next] - self.cum[k] >= self.window // 2:
                return
            end = max(self.next, k + 1)
            while end < len(self.spans) and self.cum[end] - self.cum[k] < self.window:
                end += 1
            todo, self.next = self.spans[self.next : end], end
        ranges: dict[tuple[int, str], tuple[Store, list[list[int]]]] = {}
        for sp in todo:
            for storage, file, start, end_ in sp:
                if not storage.remote:
                    ranges.setdefault((id(storage), file), (storage, []))[1].append([start, end_])
        for (_, file), (storage, found) in ranges.items():
            found.sort()
            merged = [found[0]]
            for a, b in found[1:]:
                if a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            for a, b in merged:
                try:
                    storage.prefetch(file, a, b)
                except (ConversionError, OSError):  # only a hint: the read itself reports what is wrong
                    pass


def _run_items(items: list[Item], spans: list[Spans], threads: int,
               read_ahead: int = DEFAULT_SETTINGS.verify_read_ahead) -> Iterator[tuple[Tally, int]]:
    """Each item's result, in the items' order, computed by `threads` threads while ReadAhead requests the
    bytes of the items to come (up to `read_ahead` bytes ahead). Torch ops (where torch is loaded: check_share
    loads it for casts) run single-threaded meanwhile: the items are the parallelism (intra-op threads on busy
    cores cost more than they give)."""
    ahead = ReadAhead(spans, read_ahead)

    def run(k: int) -> tuple[Tally, int]:
        ahead.reached(k)
        return items[k]()

    before = torch_threads(1)
    try:
        if threads <= 1:
            for k in range(len(items)):
                yield run(k)
            return
        pool = ThreadPoolExecutor(threads, thread_name_prefix="verify")  # each thread's buffers go with it
        try:
            yield from pool.map(run, range(len(items)))
        finally:  # on an error or interrupt: drop the items not started, wait only for those running
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        torch_threads(before)


def torch_threads(n: int | None) -> int | None:
    """Set torch's intra-op thread count to `n` where torch is loaded (else, or for None, nothing); returns the
    previous count (None: torch was not loaded). Does not import torch: checks of moved bytes never need it."""
    torch = sys.modules.get("torch")
    if n is None or torch is None:
        return None
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    return before


def check_share(relation: Relation, opts: VerifyOptions, rank: int, world: int) -> Tally:
    """Run this rank's share of the data checks; returns what it found.

    Streaming expert checks and pass-through chunks are compared by up to `opts.workers` threads
    (each reading into its own reused buffer); other expert checks (adapters: derived deltas,
    cached factors) one after another on this thread. Findings are reported in the same order
    whatever the thread count: experts as shared, then pass-through tensors (the first differing
    chunk of each).
    """
    experts, passes = share(relation, rank, world)
    if any(computes(relation.experts[i]) for i in {i for i, _ in experts}) or \
            any(computes(relation.passes[i]) for i in passes):
        # Casts are computed by torch: loaded before the threads start (_run_items), and before the clock
        # does, as the conversion loads it before its data phase (convert.engine.executor.warm_up).
        import torch  # noqa: F401
    t0 = time.perf_counter()
    stores = opts.settings.storage
    # without --src (rules only) nothing of `src` is read
    src = Storage(opts.src if opts.src is not None else opts.dst, opts.storage_options, stores)
    if relation.src_chunked:
        src = ChunkedView(src, relation.src_chunked, load_chunk)  # type: ignore[assignment]
    dst = Storage(opts.dst, opts.storage_options, stores)
    limit = max(1, opts.max_report)
    tally = Tally([], limit=limit)
    items: list[Item] = []
    spans: list[Spans] = []
    largest = 0
    try:
        groups = {i: role_groups(c) for i, c in enumerate(relation.experts) if c.streaming}
        for i, e in experts:
            check = relation.experts[i]
            if check.streaming:  # one item per group of roles: a thread holds one group of both sides at a time
                for k, roles in enumerate(groups[i]):
                    items.append(partial(_expert_item, check, src, dst, e, limit, roles, k == 0))
                    spans.append(_expert_spans(check, src, dst, e, roles))
                    largest = max(largest, check.item_bytes(e, roles))
            else:
                tally.merge(_expert_item(check, src, dst, e, limit)[0])
        expert_largest = largest or None
        pass_problems: dict[int, Mismatch] = {}
        for i in passes:
            passing = relation.passes[i]
            tally.tensors_checked += 1
            problem = pass_shape_problem(passing)
            if problem:
                pass_problems[i] = problem
                continue
            for a, b in pass_chunks(passing, expert_largest):  # no larger than an expert item: as many threads fit
                items.append(partial(_chunk_item, passing, i, src, dst, a, b, limit))
                spans.append(_chunk_spans(passing, src, dst, a, b))
                largest = max(largest, chunk_bytes(passing, a, b))
        tally.threads = worker_threads(opts.workers, largest, opts.settings.verify_memory)
        failed: set[int] = set()
        for part, index in _run_items(items, spans, tally.threads, opts.settings.verify_read_ahead):
            if index >= 0:
                if index in failed:  # report only the first differing chunk of a tensor
                    part.mismatches, part.dropped = [], 0
                elif part.mismatches or part.dropped:
                    failed.add(index)
            tally.merge(part)
        for i in passes:  # shape changes of pass-through tensors, after the data findings, as before
            if i in pass_problems:
                tally.add(pass_problems[i])
    finally:
        src.close()
        dst.close()
        release_buffers()
    tally.seconds = time.perf_counter() - t0
    tally.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return tally


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n < 1e9 else f"{n / 1e9:.3f} GB"


def summarize(relation: Relation, tallies: list[Tally], opts: VerifyOptions, world: int, seconds: float) -> tuple[str, dict[str, Any]]:
    """The printed summary and the machine-readable report of a finished verification."""
    found = [Mismatch("", p) for p in relation.problems]
    dropped = 0
    for t in tallies:
        found += t.mismatches
        dropped += t.dropped
    total = len(found) + dropped
    compared = sum(t.bytes_compared for t in tallies)
    experts = sum(t.experts_checked for t in tallies)
    others = sum(t.tensors_checked for t in tallies)
    lines = [
        f"verify {opts.src or '(target rules only)'} -> {opts.dst} ({relation.kind})",
        f"  {relation.headline}",
        f"  checked {experts} expert slice(s) and {others} other tensor(s); {_mb(compared)} compared "
        f"on {world} rank(s) in {seconds:.2f} s",
    ]
    lines += [f"  note: {n}" for n in relation.notes]
    for m in found[: opts.max_report]:
        lines.append(f"  MISMATCH {m}")
    if total > opts.max_report:
        lines.append(f"  ... and {total - opts.max_report} more")
    if opts.src is None:
        lines.append(f"OK: {opts.dst} meets the rules of its target" if total == 0
                     else f"FAILED: {total} rule(s) of its target broken by {opts.dst}")
    else:
        lines.append(f"OK: {opts.dst} is a correct conversion of {opts.src}" if total == 0
                     else f"FAILED: {total} mismatch(es) between {opts.src} and {opts.dst}")
    report = {
        "ok": total == 0, "kind": relation.kind, "src": opts.src, "dst": opts.dst, "mismatches": total,
        "first": [m.__dict__ for m in found[: opts.max_report]], "bytes_compared": compared,
        "experts_checked": experts, "tensors_checked": others, "src_tensors": relation.src_tensors,
        "dst_tensors": relation.dst_tensors, "dst_files": relation.dst_files, "world_size": world,
        "seconds": seconds,
        "ranks": [{"experts_checked": t.experts_checked, "tensors_checked": t.tensors_checked,
                   "bytes_compared": t.bytes_compared, "peak_rss_bytes": t.peak_rss, "seconds": t.seconds,
                   "threads": t.threads} for t in tallies],
    }
    return "\n".join(lines), report


def verify_job(opts: VerifyOptions, dist: Dist, out: dict[str, Any] | None = None) -> int:
    """Verify on every rank of `dist` (rank 0 plans and prints); returns the exit code on every rank.

    `out`, if given, receives on rank 0 `verify`: {"code", "mismatches", "error"}.
    """
    t0 = time.perf_counter()
    set_destination(None)  # verifying writes nothing: an interrupt leaves nothing incomplete
    relation: Relation | str | None = None
    if dist.is_main:
        try:
            relation = plan_verify(opts)
        except (CannotVerify, ConversionError, OSError) as exc:
            relation = f"cannot verify: {exc}"
    relation = dist.broadcast(relation)
    if isinstance(relation, str):
        if dist.is_main:
            print(f"error: {relation}", file=sys.stderr)
            if out is not None:
                out["verify"] = {"code": 2, "mismatches": 0, "error": relation}
        return 2
    try:
        result: Tally | str = check_share(relation, opts, dist.rank, dist.world_size)
    except Exception as exc:  # noqa: BLE001 - reported by rank 0, every rank exits non-zero
        result = f"rank {dist.rank}: {describe(exc)}"
    gathered = dist.gather(result)
    code = 0
    if dist.is_main:
        errors = [g for g in gathered if isinstance(g, str)]
        tallies = [g for g in gathered if isinstance(g, Tally)]
        text, report = summarize(relation, tallies, opts, dist.world_size, time.perf_counter() - t0)
        print(text)
        for e in errors:
            print(f"error: verification could not finish: {e}", file=sys.stderr)
        if not report["ok"]:
            print(f"error: {opts.dst} does not match {opts.src} ({report['mismatches']} mismatch(es))" if opts.src
                  else f"error: {opts.dst}: {report['mismatches']} target rule(s) broken", file=sys.stderr)
        if opts.report_path:
            with open(opts.report_path, "w") as fh:
                json.dump({**report, "errors": errors}, fh, indent=2)
        code = 2 if errors else (0 if report["ok"] else 1)
        if out is not None:
            out["verify"] = {"code": code, "mismatches": report["mismatches"], "error": "; ".join(errors)}
    return int(dist.broadcast(code))


def verify_after(opts: VerifyOptions, dist: Dist, marker: str, report: dict[str, Any] | None = None) -> int:
    """`--verify` of a conversion: verify on the same ranks; on a mismatch rank 0 renames the output's
    completion marker (`marker`, e.g. its index) to `<marker>.unverified`, so the wrong output never looks
    complete. Returns the verifier's exit code; `report` (rank 0) receives its outcome as in verify_job."""
    code = verify_job(opts, dist, report)
    if code == 1 and dist.is_main:
        dst = Storage(opts.dst, opts.storage_options, opts.settings.storage)
        if dst.exists(marker):
            dst.rename(marker, marker + ".unverified")
            print(f"error: renamed {dst.display(marker)} to {marker}.unverified: the output is not a correct "
                  "conversion; do not use it", file=sys.stderr)
    dist.barrier()
    return code


def with_verify(
    args: argparse.Namespace, job: Callable[[Dist], int], marker: str, report: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> Callable[[Dist], int]:
    """`job`, then with --verify (after a successful, non-dry run) the verifier on the same ranks.

    `args` are a conversion's parsed flags; `marker` is the output file that marks it complete,
    renamed if verification finds a mismatch; `report` (rank 0) receives the verifier's outcome.
    `settings`: the check's (convert.settings); None reads them from the environment now, as the conversion's
    entry point builds this wrapper when its job starts (the same variables its job_environment read).
    """
    settings = Settings.from_env() if settings is None else settings

    def body(dist: Dist) -> int:
        checking = getattr(args, "verify", False) and not getattr(args, "dry_run", False)
        if checking and getattr(args, "dtype", "keep") != "keep":
            refusal = dist.broadcast(_dequantize_check_refusal(args, settings) if dist.is_main else None)
            if refusal:
                raise ConversionError(refusal)
        with held_until_done():  # the conversion's lock on --dst is given up after the check (it may rename the marker)
            code = job(dist)
            if code != 0 or not checking:
                return code
            opts = VerifyOptions(args.src, args.dst, getattr(args, "family", None), args.storage_options,
                                 getattr(args, "base_config", None), target=getattr(args, "target", None),
                                 settings=settings)
            return verify_after(opts, dist, marker, report)

    return body


def _dequantize_check_refusal(args: argparse.Namespace, settings: Settings = DEFAULT_SETTINGS) -> str | None:
    """Why --verify with this --dtype is refused before anything is written, or None: the verifier checks
    lossless conversions and casts of float tensors, not the dequantization of a quantized source."""
    src = Storage(args.src, args.storage_options, settings.storage)
    try:
        config = read_json(src, "config.json") if src.exists("config.json") else {}
    finally:
        src.close()
    method = (config.get("quantization_config") or {}).get("quant_method") if isinstance(config, dict) else None
    if method:
        return (f"--verify with --dtype {args.dtype}: {src.display('config.json')} is {method}-quantized and the "
                "verifier does not check dequantized values; drop --verify, or convert without --dtype")
    return None


def parser() -> argparse.ArgumentParser:
    """The verifier's command line."""
    p = ToolParser(prog="convert.verify", description=__doc__.splitlines()[0])
    p.add_argument("--src", default=None,
                   help="the checkpoint or adapter that was converted (adapters: may be left out with --target)")
    p.add_argument("--dst", required=True, help="the conversion to check")
    p.add_argument("--family", default=None, help="model family (default: from config.json model_type)")
    p.add_argument("--base-config", default=None, help="adapters: the base model's config.json")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="adapters: also check --dst against this server's loading rules (docs/SERVERS.md; default: "
                        "the target the output record names); without --src, only that")
    p.add_argument("--storage-options", type=json_object, default={}, help="JSON of fsspec options")
    p.add_argument("--max-report", type=int, default=50, help="mismatches listed (default 50)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="threads per rank comparing in parallel (default: as a conversion's --workers, 4 to 16; "
                        "fewer where experts are large)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    add_nproc_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse flags and verify on every rank."""
    p = parser()
    a = p.parse_args(argv)
    if a.src is None and a.target is None:
        p.error("--src is required (or --target, to check --dst against a target's rules only)")

    settings = Settings.from_env()  # the verifier's and the stores' knobs: read once, as the job starts

    def job(dist: Dist) -> int:  # --workers' default depends on the ranks on this machine: known once joined
        opts = VerifyOptions(a.src, a.dst, a.family, a.storage_options, a.base_config, a.max_report, a.report,
                             a.workers or default_workers(a.dst), a.target, settings)
        return verify_job(opts, dist)

    run_main(job, a.nproc, preload_torch=a.nproc > 1 and computes_locally(a.src, a.dst))


def computes_locally(src: str | None, dst: str) -> bool:
    """Whether verifying `dst` against `src` will compute with torch, as far as local files tell before any
    rank starts: `src` is an adapter (LoRA deltas), or the two config.json differ (a --dtype output: a cast).
    False for remote directories (fsspec URLs: nothing is opened before the ranks fork): a rank that finds a
    cast imports torch itself. Decides whether the --nproc parent loads torch once for every rank."""
    if src is None or any("://" in p and not p.startswith("file://") for p in (src, dst)):
        return False
    src, dst = (p.removeprefix("file://") for p in (src, dst))
    if os.path.isfile(os.path.join(src, ADAPTER_CONFIG)):
        return True
    try:
        with open(os.path.join(src, "config.json"), "rb") as a, open(os.path.join(dst, "config.json"), "rb") as b:
            return a.read() != b.read()
    except OSError:
        return False
