"""Command-line flags shared by the entry points, and the wrapper that runs a job under any launcher."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from convert.checkpoint import INDEX_NAME
from convert.job import JobOptions
from convert.transforms import DTYPE_NAMES
from launch.dist import Dist, exit_process, init_dist
from launch.local import add_nproc_flag
from sharding.file_layout import parse_size


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser with the flags every conversion takes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--src", required=True, help="source directory or fsspec URL")
    p.add_argument("--dst", required=True, help="destination directory or fsspec URL (must be empty or absent)")
    p.add_argument("--ep", type=int, default=None, help="number of expert slices (default: world size); may exceed it")
    p.add_argument("--max-shard-size", default="5GB", type=parse_size, help="largest output shard (default 5GB)")
    p.add_argument("--dtype", default="keep", choices=sorted(DTYPE_NAMES), help="cast floating tensors (default keep)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (files, bytes and memory per rank) and exit")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --dst: its old index, config and safetensors files are removed first")
    p.add_argument("--family", default=None, help="model family (default: from config.json model_type)")
    p.add_argument("--workers", type=int, default=4, help="pieces in flight per rank (default 4)")
    p.add_argument("--storage-options", type=json.loads, default={}, help="JSON of fsspec options, e.g. an endpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats", default=None, help="write per-rank stats (peak RSS, bytes read/written, time) as JSON")
    p.add_argument("--verify", action="store_true", help="after writing, check the output with convert.verify "
                   "(same ranks); on a mismatch exit 1 and rename the index to *.unverified")
    add_nproc_flag(p)
    return p


def job_options(args: argparse.Namespace, layout: str | None) -> JobOptions:
    """JobOptions from parsed base flags and the target layout."""
    return JobOptions(
        src=args.src, dst=args.dst, layout=layout, ep=args.ep, max_shard_bytes=args.max_shard_size,
        dtype=DTYPE_NAMES[args.dtype], dry_run=args.dry_run, overwrite=args.overwrite, family=args.family,
        workers=args.workers, storage_options=args.storage_options, show_progress=not args.no_progress,
        stats_path=args.stats,
    )


def with_verify(
    args: argparse.Namespace, job: Callable[[Dist], int], marker: str = INDEX_NAME
) -> Callable[[Dist], int]:
    """`job`, then with --verify (after a successful, non-dry run) convert.verify on the same ranks.

    `marker` is the output file that marks it complete; it is renamed if verification finds a mismatch.
    """
    def body(dist: Dist) -> int:
        code = job(dist)
        if code != 0 or not getattr(args, "verify", False) or getattr(args, "dry_run", False):
            return code
        from convert.verify import VerifyOptions, verify_after

        opts = VerifyOptions(args.src, args.dst, getattr(args, "family", None), args.storage_options,
                             getattr(args, "base_config", None))
        return verify_after(opts, dist, marker)

    return body


def run_main(body: Callable[[Dist], int], nproc: int = 1) -> None:
    """Join the process group (first forking `nproc` local ranks when > 1), run `body`, leave the group
    and exit with its code."""
    dist = init_dist(nproc=nproc)
    try:
        code = body(dist)
        # Nobody leaves before rank 0 has printed its report: a launcher stops every rank once one has exited.
        dist.barrier()
    finally:
        dist.close()
    exit_process(code, dist)
