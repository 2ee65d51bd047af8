"""An adapter conversion job: its plan (an AdapterPlanner, convert.engine.planner) on rank 0, then the generic
stream-and-commit of convert.engine.job.

The output is one `adapter_model.safetensors` (what peft, vLLM and SGLang read) written in place
by every rank at its pieces' offsets, whatever its size; only an explicit --max-shard-size cuts it
into `adapter_model-0000i-of-0000N` shards with an index (with a warning where the target cannot
read that). adapter_config.json is written last and marks the output complete.
"""

from __future__ import annotations

import json
import sys
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from convert.engine.job import run_planned
from convert.engine.planner import Draft, JobOptions, JobSetup, Planner, fingerprint
from convert.formats.adapter_source import ADAPTER_INDEX, ADAPTER_WEIGHTS, AdapterSource, open_adapter
from convert.formats.shard_layout import layout_files, weight_map
from convert.io.storage import Store
from convert.plan.adapter import AdapterPlan, plan_fuse, plan_split
from convert.plan.adapter_target import target_rules
from launch.dist import Dist

ADAPTER_CONFIG = "adapter_config.json"
SPLIT = "per_expert"


@dataclass
class AdapterJobOptions(JobOptions):
    """JobOptions plus the adapter flags: `layout` is "per_expert" (split) or a fused adapter layout."""

    target: str = "vllm"  # configs/targets/<target>.json: the consumer the output is written for


def plan_adapter(opts: AdapterJobOptions, ep: int) -> tuple[AdapterSource, AdapterPlan]:
    """Open the source adapter and plan the conversion (rank 0) with `ep` expert slices; the caller closes
    `src.storage`."""
    src = open_adapter(opts.src, opts.base_config, opts.storage_options, opts.settings.storage)
    try:
        if opts.layout == SPLIT:
            return src, plan_split(src, opts.dtype, ep, target=opts.target)
        return src, plan_fuse(src, str(opts.layout), opts.dtype, target=opts.target)
    except BaseException:
        src.storage.close()
        raise


class AdapterPlanner(Planner):
    """The plan of an adapter conversion: one plan, cut by the requested expert slices (Planner.requested_ep: the
    split gathers peft lora_B once per slice, and the planner's EP choice never changes them), laid out as one
    adapter_model.safetensors (or shards, with an explicit --max-shard-size) and adapter_config.json last."""

    def draft(self, opts: JobOptions, dist: Dist, src: Store, closing: ExitStack) -> Draft:
        assert isinstance(opts, AdapterJobOptions)
        adapter, plan = plan_adapter(opts, self.requested_ep(opts, dist))
        closing.callback(adapter.storage.close)  # the metadata reads cached descriptors: released after the plan
        where = f"the adapter {adapter.display()}" + (f" (base config: {adapter.base_config_source})"
                                                      if adapter.base_config_source else "")
        return _lay_out(opts, adapter, plan, where)


ADAPTERS = AdapterPlanner()


def plan_adapter_job(opts: AdapterJobOptions, dist: Dist) -> JobSetup:
    """Rank 0's work before any byte moves: read metadata, plan, lay out the file, check the destination."""
    return ADAPTERS.plan(opts, dist)


def _lay_out(opts: AdapterJobOptions, src: AdapterSource, plan: AdapterPlan, where: str) -> Draft:
    """Output file layout, final files and plan summary (the planner adds the EP choice, the pins and the
    destination's judgment)."""
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
    summary = [
        f"plan: {plan.description}, dtype={opts.dtype or 'keep'}",
        f"  source: {opts.src}",
        f"  destination: {opts.dst}",
    ]
    tail = []
    if opts.layout == SPLIT and any(g.pattern == "peft_target_parameters" for g in plan.groups):
        tail.append("  peft lora_B is expert-minor (an expert's columns are strided over the whole tensor): "
                    "each slice reads all of it once")
    tail += [f"  note: {n}" for n in plan.notes]
    fp = fingerprint("adapter", opts.layout, opts.target, opts.src, sorted(src.file_sizes.items()),
                     [(f.name, f.size, f.header) for f in files], plan.pieces, final[ADAPTER_CONFIG])
    read = [*src.file_sizes, *([src.index_file] if src.index_file else []), ADAPTER_CONFIG, *src.other_files]
    setup = JobSetup(
        summary=summary, files=files, pieces=plan.pieces, assignment=[], ep=0,
        copy_files=src.other_files, final_files=final, fingerprint=fp,
        job_id=uuid.uuid4().hex, target=plan.target,
    )
    return Draft(setup, plan.num_experts, where, read, src.storage, tail)


def run_adapter_job(opts: AdapterJobOptions, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Plan (rank 0) and run an adapter conversion on this rank; returns the exit code (0, 1, or 2 = refused)."""
    return run_planned(plan_adapter_job, opts, dist, report)
