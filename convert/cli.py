"""Command-line flags shared by the entry points, and the wrapper that runs a job under any launcher."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from convert.engine.job import JobOptions
from convert.families.namings import naming_names
from convert.flag_types import json_object, positive_int, size_arg
from convert.plan.transforms import DTYPE_NAMES
from convert.settings import JobHooks, Settings
from convert.toplevel import ToolParser, default_workers
from launch.local import add_nproc_flag

if TYPE_CHECKING:
    from convert.engine.adapter_job import AdapterJobOptions


def base_parser(prog: str, description: str, names: bool = True) -> argparse.ArgumentParser:
    """Parser with the flags every conversion takes (`names`: with --names, the tensor names written)."""
    p = ToolParser(prog=prog, description=description)
    p.add_argument("--src", required=True, help="source directory or fsspec URL")
    p.add_argument("--dst", required=True, help="destination directory or fsspec URL: absent or empty, or this same "
                   "job's unfinished output (resumed)")
    p.add_argument("--ep", type=positive_int, default=None, help="number of expert slices (default: world size); may exceed it")
    p.add_argument("--max-shard-size", default="5GB", type=size_arg, help="largest output shard (default 5GB)")
    p.add_argument("--dtype", default="keep", choices=sorted(DTYPE_NAMES), help="cast floating tensors (default keep)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (files, bytes and memory per rank) and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier moe-convert output in --dst: only the files it wrote, "
                   "exactly as it left them, are removed first (anything else there is refused)")
    p.add_argument("--family", default=None, help="model family (default: from config.json model_type)")
    p.add_argument("--base-config", default=None, metavar="CONFIG_JSON",
                   help="the model's config.json (path or URL) for a source without one, such as a trainer's "
                        "checkpoint; written into the output")
    if names:
        p.add_argument("--names", default="hf", choices=naming_names(),
                       help="tensor names to write: hf (default) or a trainer's (configs/namings/*.json: torchtitan, "
                            "nemo_automodel, megatron); a source in a trainer's names is detected and read either way")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="pieces in flight per rank (default 4; on a local --dst, up to 16 while this machine "
                        "has a core per worker of its ranks)")
    p.add_argument("--storage-options", type=json_object, default={}, help="JSON of fsspec options, e.g. an endpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats", default=None, help="write per-rank stats (peak RSS, bytes read/written, time) as JSON")
    p.add_argument("--verify", action="store_true", help="after writing, check the output with convert.verify "
                   "(same ranks); on a mismatch exit 1 and rename the index to *.unverified")
    add_nproc_flag(p)
    return p


def job_environment() -> dict[str, Any]:
    """A job's settings and test hooks (JobOptions.settings, JobOptions.hooks), read from the environment as the
    job starts: the one place an entry point reads them (convert.settings; docs/ENVIRONMENT.md). The hooks are
    there for tests that run the tool as a subprocess only."""
    return {"settings": Settings.from_env(), "hooks": JobHooks.from_env()}


def job_options(args: argparse.Namespace, layout: str | None) -> JobOptions:
    """JobOptions from parsed base flags and the target layout (with the job's environment, job_environment)."""
    return JobOptions(
        src=args.src, dst=args.dst, layout=layout, ep=args.ep, max_shard_bytes=args.max_shard_size,
        dtype=DTYPE_NAMES[args.dtype], dry_run=args.dry_run, overwrite=args.overwrite, family=args.family,
        workers=args.workers or default_workers(args.dst), storage_options=args.storage_options,
        show_progress=not args.no_progress,
        stats_path=args.stats, names=getattr(args, "names", "hf"), base_config=args.base_config,
        **job_environment(),
    )


def computes(args: argparse.Namespace) -> bool:
    """Whether a base conversion with flags `args` computes with torch (a cast or dequantization; its --verify
    then checks a cast too: checking moved bytes takes none)."""
    return getattr(args, "dtype", "keep") not in (None, "keep")


def inputs(args: argparse.Namespace) -> list[str]:
    """The locations a job of `args` reads whole (its --src, and --adapter where it has one), which run_main
    reads ahead while torch loads; none for --dry-run, which reads no data."""
    if args.dry_run:
        return []
    return [args.src, *([args.adapter] if getattr(args, "adapter", None) else [])]


def adapter_parser(prog: str, description: str, default_target: str) -> argparse.ArgumentParser:
    """The base conversion flags plus --base-config and --target (default `default_target`); an adapter is one
    file unless --max-shard-size is given."""
    from convert.targets.rules import TARGETS  # adapters only: a base conversion does not load them

    p = base_parser(prog, description, names=False)
    for action in p._actions:
        if action.dest == "base_config":
            action.help = "the base model's config.json (path or URL): family, hidden/intermediate sizes, E"
    p.add_argument("--target", default=default_target, choices=TARGETS,
                   help=f"the consumer the output is for: its expert layout, names and adapter_config.json for the "
                        f"base model's family (configs/targets/*.json; default {default_target})")
    for action in p._actions:
        if action.dest == "max_shard_size":
            action.default = None
            action.help = ("cut the adapter into shards of at most this size with an index (default: one "
                           "adapter_model.safetensors, which is what servers and peft read)")
    return p


def adapter_options(args: argparse.Namespace, layout: str) -> AdapterJobOptions:
    """AdapterJobOptions from parsed flags."""
    from convert.engine.adapter_job import AdapterJobOptions

    base = job_options(args, layout)
    return AdapterJobOptions(**{**base.__dict__, "base_config": args.base_config, "target": args.target})
