"""A merge job: its plan (a MergePlanner, convert.engine.planner; convert.plan.merge) on rank 0, then the generic
stream-and-commit of convert.engine.job.

The output keeps the base's shard names and each shard's tensors in the base's order (a merged checkpoint
loads wherever the base loaded); `model.safetensors.index.json` is written last and marks it complete. The
pieces read the base (the job's source) and the adapter (an extra source, convert.io.sources): EP, resume,
object stores and the commit are the engine's.
"""

from __future__ import annotations

import json
import sys
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from convert.engine.job import describe, open_source, run_planned
from convert.engine.planner import Draft, JobOptions, JobSetup, Planner, fingerprint
from convert.formats.adapter_source import open_adapter
from convert.formats.checkpoint import INDEX_NAME
from convert.formats.model_config import CONFIG_DTYPE_NAMES, config_bytes, with_dtype
from convert.formats.shard_layout import keep_files, layout_files, weight_map
from convert.io.storage import Store
from convert.plan.chunk_reads import localize
from convert.plan.merge import ADAPTER_SOURCE, check_counts, plan_merge
from convert.plan.merge_quant import SURVIVAL, survival_lines
from launch.dist import Dist

__all__ = ["MergeJobOptions", "plan_merge_job", "run_merge_job", "describe"]


@dataclass
class MergeJobOptions(JobOptions):
    """JobOptions (`src` is the base) plus the adapter; `max_shard_bytes` 0 keeps the base's shards."""

    adapter: str = ""


class MergePlanner(Planner):
    """The plan of a merge: the base (the job's source) and the adapter read, one plan cut by the requested expert
    slices (Planner.requested_ep; the planner's EP choice never changes them), the base's shards kept (or new
    ones), config.json where --dtype or --base-config rewrites it, the index last."""

    turns_note = False

    def draft(self, opts: JobOptions, dist: Dist, src: Store, closing: ExitStack) -> Draft:
        assert isinstance(opts, MergeJobOptions)
        adapter = open_adapter(opts.adapter, None, opts.storage_options, opts.settings.storage)
        closing.callback(adapter.storage.close)
        return _plan(opts, dist, src, adapter, self.requested_ep(opts, dist))


MERGES = MergePlanner()


def plan_merge_job(opts: MergeJobOptions, dist: Dist) -> JobSetup:
    """Rank 0's work before any byte moves: read both sides' metadata, plan, lay out, check the destination."""
    return MERGES.plan(opts, dist)


def _plan(opts: MergeJobOptions, dist: Dist, src: Store, adapter: Any, ep: int) -> Draft:
    ckpt, family = open_source(src, opts)
    plan = plan_merge(ckpt, family, adapter, opts.dtype, ep, run_bytes=opts.settings.merge_run_bytes)
    check_counts(plan)
    plan.pieces, chunked = localize(plan.pieces, ckpt.chunked)
    keep = ckpt.container == "safetensors" and not opts.max_shard_bytes
    if keep:
        files = keep_files(plan.files, plan.targets, plan.metadata)
    else:
        files = layout_files(plan.targets, opts.max_shard_bytes or 5_000_000_000, {"format": "pt"})
    total = sum(t.nbytes for t in plan.targets)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map(files).items()))}
    layers = sorted({f"{lay} <- {pat}" for _, lay, pat in plan.groups})
    summary = [
        f"plan: merge {opts.adapter} into {plan.family} ({', '.join(layers) or 'no expert LoRA'}); "
        f"{len(plan.groups)} expert layers, E={plan.num_experts}, dtype={opts.dtype or 'keep'}",
        f"  base: {opts.src}" + (f" ({ckpt.container})" if ckpt.container != "safetensors" else ""),
        f"  adapter: {opts.adapter}",
        f"  destination: {opts.dst} ({'the base' + chr(39) + 's shards' if keep else 'new shards'})",
    ]
    tail = [f"  note: {n}" for n in [*ckpt.notes, *plan.notes]]
    copy_files, final = list(plan.copy_files), {}
    if opts.base_config or opts.dtype:
        config = ckpt.config
        if plan.dequantized:  # quantized weights written as --dtype: the config no longer describes a quantization
            config = {k: v for k, v in config.items() if k != "quantization_config"}
        config = with_dtype(config, opts.dtype) if opts.dtype else config
        if "config.json" in copy_files:
            copy_files.remove("config.json")
        final["config.json"] = config_bytes(config)
        if opts.dtype:
            tail.append(f"  config.json: dtype keys set to {CONFIG_DTYPE_NAMES[opts.dtype]}")
    final[INDEX_NAME] = (json.dumps(index, indent=2) + "\n").encode()
    adapter_files = sorted(adapter.file_sizes.items())
    fp = fingerprint("merge", opts.src, opts.adapter, sorted((n, h.file_size) for n, h in ckpt.headers.items()),
                     adapter_files, json.dumps(adapter.config, sort_keys=True),
                     [(f.name, f.size, f.header) for f in files], plan.pieces)
    setup = JobSetup(
        summary=summary, files=files, pieces=plan.pieces, assignment=[], ep=0, copy_files=copy_files,
        final_files=final, fingerprint=fp, job_id=uuid.uuid4().hex, chunked=chunked,
        notices=[f"note: {opts.src}: {n}" for n in ckpt.notes], sources={ADAPTER_SOURCE: opts.adapter},
    )
    return Draft(setup, plan.num_experts, src.display("config.json"), [*ckpt.source_files, *plan.copy_files], src,
                 tail)


def run_merge_job(opts: MergeJobOptions, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Plan (rank 0) and run a merge on this rank; returns the exit code (0, 1, or 2 = refused).

    After a successful run, rank 0 prints how much of each requantized weight's delta survived (FP8 / MXFP4,
    convert.plan.merge_quant): every rank's measurements of the pieces it computed, gathered (pieces a resumed
    run skipped are not measured)."""
    SURVIVAL.take()  # nothing of an earlier job in this process
    code = run_planned(plan_merge_job, opts, dist, report)
    if code != 0 or opts.dry_run:  # the code is every rank's (broadcast): either all gather or none
        return code
    gathered = dist.gather_main(SURVIVAL.take())
    if dist.is_main and gathered is not None:
        lines = survival_lines([row for rows in gathered for row in rows])
        for line in lines:
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
        if report is not None and lines:
            report["requantized"] = lines
    return code
