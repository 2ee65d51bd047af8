"""`python -m convert.merge_adapter`: merge a LoRA adapter into its base checkpoint (W + scaling * B @ A).

    python -m convert.merge_adapter --nproc 8 --base BASE --adapter ADAPTER --dst DST [--ep N]
        [--dtype keep|bf16|fp16|fp32] [--max-shard-size SIZE] [--verify] [--dry-run] [--storage-options JSON]

The output is the base's own checkpoint (layout, names, dtype, shard names) with every tensor the adapter
touches merged in float32 and rounded once; every other tensor is a byte copy. Any base layout the family
tables describe (per-expert, fused, gpt-oss native), FP8 block-scaled bases (requantized with fresh block
scales, or all dequantized with --dtype), MXFP4 gpt-oss bases (requantized with fresh E8M0 scales, or written
in bf16 with --dtype), and any expert-LoRA layout (peft target_parameters in any packing detect_expert_lora reads, per-expert,
shared w1/w2/w3, grouped)
plus attention / router / dense LoRA and modules_to_save (the adapter's copy replaces the base tensor). The
merge prints how much of each requantized delta survived; `--verify` recomputes every merged tensor
independently (float64 deltas; FP8 and MXFP4 bases included).
"""

from __future__ import annotations

import argparse
from typing import Any

from convert.cli import inputs, job_environment
from convert.flag_types import json_object, positive_int, size_arg
from convert.formats.checkpoint import INDEX_NAME
from convert.plan.transforms import DTYPE_NAMES
from convert.toplevel import ToolParser, default_workers, run_main
from launch.dist import Dist
from launch.local import add_nproc_flag

MARKER = INDEX_NAME  # the file whose presence marks a finished destination


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = ToolParser(prog="convert.merge_adapter", description=__doc__.splitlines()[0])
    p.add_argument("--base", "--src", dest="src", required=True,
                   help="the base checkpoint directory or fsspec URL (a batch manifest's `src`)")
    p.add_argument("--adapter", required=True, help="the LoRA adapter directory or fsspec URL")
    p.add_argument("--dst", required=True, help="destination directory or fsspec URL: absent or empty, or this same "
                   "job's unfinished output (resumed)")
    p.add_argument("--ep", type=positive_int, default=None, help="number of expert slices (default: world size)")
    p.add_argument("--dtype", default="keep", choices=sorted(DTYPE_NAMES),
                   help="cast every floating output tensor (default keep: the base's dtypes)")
    p.add_argument("--max-shard-size", default=None, type=size_arg,
                   help="write new shards of at most this size (default: the base's own shard files)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (files, bytes and memory per rank) and exit")
    p.add_argument("--overwrite", action="store_true", help="allow a --dst that an earlier moe-convert job wrote")
    p.add_argument("--family", default=None, help="model family (default: from the base's config.json)")
    p.add_argument("--base-config", default=None, metavar="CONFIG_JSON",
                   help="the model's config.json for a base without one (a trainer's checkpoint); written into the output")
    p.add_argument("--workers", type=positive_int, default=None, help="pieces in flight per rank (default 4)")
    p.add_argument("--storage-options", type=json_object, default={}, help="JSON of fsspec options, e.g. an endpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats", default=None, help="write per-rank stats (peak RSS, bytes read/written, time) as JSON")
    p.add_argument("--verify", action="store_true",
                   help="after writing, recompute every merged tensor independently (convert.verify.merge); on a "
                        "mismatch exit 1 and rename the index to *.unverified")
    add_nproc_flag(p)
    return p


def run(args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run the merge (and --verify) described by parsed flags `args` on this rank; returns the exit code."""
    from convert.engine.merge_job import MergeJobOptions, run_merge_job

    workers = args.workers or min(4, default_workers(args.dst))  # pieces compute: a few per rank bound memory
    opts = MergeJobOptions(
        src=args.src, dst=args.dst, layout=None, ep=args.ep, max_shard_bytes=args.max_shard_size or 0,
        dtype=DTYPE_NAMES[args.dtype], dry_run=args.dry_run, overwrite=args.overwrite, family=args.family,
        workers=workers, storage_options=args.storage_options, show_progress=not args.no_progress,
        stats_path=args.stats, base_config=args.base_config, adapter=args.adapter, **job_environment(),
    )
    code = run_merge_job(opts, dist, report)
    if code != 0 or not args.verify or args.dry_run:
        return code
    from convert.verify.merge import verify_merge_after

    return verify_merge_after(args, dist, report, opts.settings.storage)  # the settings the merge ran with


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the merge on every rank."""
    args = build_parser().parse_args(argv)
    # The merge computes in numpy (convert.plan.ndarrays): only --verify loads torch, once, before the ranks fork.
    run_main(lambda dist: run(args, dist), args.nproc, preload_torch=args.verify, inputs=inputs(args))


if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
