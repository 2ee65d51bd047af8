"""An adapter conversion job: plan on rank 0, then the generic stream-and-commit of convert.engine.job.

The output is one `adapter_model.safetensors` (what peft, vLLM and SGLang read) written in place
by every rank at its pieces' offsets, whatever its size; only an explicit --max-shard-size cuts it
into `adapter_model-0000i-of-0000N` shards with an index (with a warning where the target cannot
read that). adapter_config.json is written last and marks the output complete.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from convert.plan.adapter import AdapterPlan, plan_fuse, plan_split
from convert.plan.adapter_target import target_rules
from convert.formats.adapter_source import ADAPTER_INDEX, ADAPTER_WEIGHTS, AdapterSource, open_adapter
from convert.engine.job import JobOptions, JobSetup, check_destination, choose_ep, fingerprint, run_planned
from convert.engine.output_record import source_pins
from convert.io.storage import Storage
from launch.dist import Dist
from sharding.ep import assign_pieces, expert_slices
from convert.formats.shard_layout import layout_files, weight_map

ADAPTER_CONFIG = "adapter_config.json"
SPLIT = "per_expert"


@dataclass
class AdapterJobOptions(JobOptions):
    """JobOptions plus the adapter flags: `layout` is "per_expert" (split) or a fused adapter layout."""

    target: str = "vllm"  # configs/targets/<target>.json: the consumer the output is written for


def plan_adapter(opts: AdapterJobOptions, ep: int) -> tuple[AdapterSource, AdapterPlan]:
    """Open the source adapter and plan the conversion (rank 0); the caller closes `src.storage`."""
    src = open_adapter(opts.src, opts.base_config, opts.storage_options)
    try:
        if opts.layout == SPLIT:
            return src, plan_split(src, opts.dtype, ep, target=opts.target)
        return src, plan_fuse(src, str(opts.layout), opts.dtype, target=opts.target)
    except BaseException:
        src.storage.close()
        raise


def plan_adapter_job(opts: AdapterJobOptions, dist: Dist) -> JobSetup:
    """Rank 0's work before any byte moves: read metadata, plan, lay out the file, check the destination."""
    src, plan = plan_adapter(opts, opts.ep or dist.world_size)
    dst = Storage(opts.dst, opts.storage_options)
    try:  # the metadata reads cached descriptors: release them (a batch runs many jobs in one process)
        where = f"the adapter {src.display()}" + (f" (base config: {src.base_config_source})" if src.base_config_source else "")
        ep, ep_note = choose_ep(opts.ep, dist.world_size, plan.num_experts, where)
        if ep != (opts.ep or dist.world_size) and opts.layout == SPLIT:
            plan = plan_split(src, opts.dtype, ep, target=opts.target)  # the split gathers peft lora_B once per slice: re-plan
        return _lay_out(opts, dist, ep, src, plan, dst, ep_note)
    finally:
        src.storage.close()
        dst.close()


def _lay_out(opts: AdapterJobOptions, dist: Dist, ep: int, src: AdapterSource, plan: AdapterPlan, dst: Storage,
             ep_note: str = "") -> JobSetup:
    """Output file layout, final files, piece assignment, plan summary and destination check."""
    files = layout_files(plan.targets, opts.max_shard_bytes or sys.maxsize, {"format": "pt"}, stem="adapter_model")
    final: dict[str, bytes] = {}
    shard_note = ""
    if len(files) == 1:
        files[0].name = ADAPTER_WEIGHTS
    else:
        rules = target_rules(opts.target, plan.family)
        if not rules.sharded:
            shard_note = (f"--max-shard-size cuts the adapter into {len(files)} shards with an index; {opts.target} "
                          "cannot read a sharded adapter (it reads one adapter_model.safetensors: configs/targets/"
                          f"{opts.target}.json, sharded false): leave --max-shard-size out for one file")
            print(f"warning: {shard_note}", file=sys.stderr, flush=True)
        total = sum(t.nbytes for t in plan.targets)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map(files).items()))}
        final[ADAPTER_INDEX] = (json.dumps(index, indent=2) + "\n").encode()
    # Top-level keys sorted; nested ones kept in order: peft uses the first rank_pattern/alpha_pattern key that matches.
    final[ADAPTER_CONFIG] = (json.dumps(dict(sorted(plan.config.items())), indent=2) + "\n").encode()
    assignment = assign_pieces(plan.pieces, plan.num_experts, ep, dist.world_size)
    sizes = sorted({len(r) for r in expert_slices(plan.num_experts, ep)})
    summary = [
        f"plan: {plan.description}, dtype={opts.dtype or 'keep'}",
        f"  source: {opts.src}",
        f"  destination: {opts.dst}",
        f"  ep={ep} expert slices over {dist.world_size} rank(s); experts per slice: " + "/".join(map(str, sizes)),
    ]
    if ep > dist.world_size:
        summary.append(f"  each rank works through up to {-(-ep // dist.world_size)} slices in turn")
    if ep_note:
        summary.append(f"  {ep_note}")
    if opts.layout == SPLIT and any(g.pattern == "peft_target_parameters" for g in plan.groups):
        summary.append("  peft lora_B is expert-minor (an expert's columns are strided over the whole tensor): "
                       "each slice reads all of it once")
    summary += [f"  note: {n}" for n in plan.notes]
    fp = fingerprint("adapter", opts.layout, opts.target, opts.src, sorted(src.file_sizes.items()),
                     [(f.name, f.size, f.header) for f in files], plan.pieces, final[ADAPTER_CONFIG])
    read = [*src.file_sizes, *([src.index_file] if src.index_file else []), ADAPTER_CONFIG, *src.other_files]
    pins = {} if opts.dry_run else source_pins(src.storage, read)
    resuming = False if opts.dry_run else check_destination(src.storage, dst, opts.overwrite, ADAPTER_CONFIG, fp)
    return JobSetup(
        summary=summary, files=files, pieces=plan.pieces, assignment=assignment, ep=ep,
        copy_files=src.other_files, final_files=final, fingerprint=fp, resuming=resuming,
        job_id=uuid.uuid4().hex, pins=pins, target=plan.target,
    )


def run_adapter_job(opts: AdapterJobOptions, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Plan (rank 0) and run an adapter conversion on this rank; returns the exit code (0, 1, or 2 = refused)."""
    return run_planned(plan_adapter_job, opts, dist, report)
