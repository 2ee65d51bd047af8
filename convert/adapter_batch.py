"""Batch job kinds for adapters: `split_adapter` and `fuse_adapter` in launch.batch manifests.

A job's keys are the entry point's flags with `_` for `-`: src, dst, ep, dtype, base_config,
max_shard_size, storage_options, overwrite, workers; fuse_adapter also takes layout (required).
A destination holding adapter_config.json is complete and skipped.
"""

from __future__ import annotations

from typing import Any

from convert.adapter_job import ADAPTER_CONFIG, SPLIT, AdapterJobOptions, run_adapter_job
from convert.errors import ConversionError
from launch.batch import _base_options, register
from launch.dist import Dist


def _options(job: dict[str, Any], layout: str) -> AdapterJobOptions:
    base = _base_options(job, layout)
    return AdapterJobOptions(**{**base.__dict__, "base_config": job.get("base_config")})


def run_split_adapter(job: dict[str, Any], dist: Dist, report: dict[str, Any]) -> int:
    """Run one split_adapter manifest job on this rank; returns its exit code."""
    return run_adapter_job(_options(job, SPLIT), dist, report)


def run_fuse_adapter(job: dict[str, Any], dist: Dist, report: dict[str, Any]) -> int:
    """Run one fuse_adapter manifest job (needs `layout`: peft, grouped or shared_w123) on this rank."""
    layout = job.get("layout")
    if not layout:
        if dist.is_main:
            report["error"] = f"job {job.get('name')}: fuse_adapter needs a layout (peft, grouped or shared_w123)"
        return 2
    try:
        opts = _options(job, str(layout))
    except (ConversionError, KeyError, ValueError) as exc:
        report["error"] = str(exc)
        return 2
    return run_adapter_job(opts, dist, report)


KINDS = {"split_adapter": (run_split_adapter, ADAPTER_CONFIG), "fuse_adapter": (run_fuse_adapter, ADAPTER_CONFIG)}
for _kind, (_runner, _marker) in KINDS.items():
    register(_kind, _runner, _marker)
