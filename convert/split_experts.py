"""`python -m convert.split_experts`: any fused MoE layout (auto-detected) -> per-expert HF layout.

    python -m convert.split_experts --nproc 8 --src DIR --dst DIR [--ep N] [--max-shard-size 5GB] [--allow-unread-layout] ...

A family whose file says no consumer reads its per-expert layout (`per_expert_readers`: gpt-oss, bf16 or
MXFP4, or MXFP4 dequantized with --dtype) is refused (exit 2, nothing written) unless --allow-unread-layout.
"""

from __future__ import annotations

import argparse
from typing import Any

from convert.cli import base_parser, computes, inputs, job_options
from convert.engine.job import JobOptions, JobSetup, plan_job, run_planned
from convert.errors import ConversionError
from convert.families import PER_EXPERT
from convert.formats.checkpoint import INDEX_NAME
from convert.io.storage import Storage
from convert.io.storage.store import read_json
from convert.plan.readers import check_split_source
from convert.toplevel import run_main
from convert.verify.hook import with_verify
from launch.dist import Dist

MARKER = INDEX_NAME  # the file whose presence marks a finished destination


def build_parser() -> argparse.ArgumentParser:
    """The command line: the base conversion flags plus --allow-unread-layout."""
    p = base_parser("convert.split_experts", __doc__.splitlines()[0])
    p.add_argument("--allow-unread-layout", action="store_true",
                   help="write the per-expert layout even where the family file says no consumer reads it "
                        "(per_expert_readers: [], e.g. gpt-oss: transformers, vLLM and SGLang read its experts fused "
                        "only); without it such a split is refused")
    return p


def plan_split(opts: JobOptions, dist: Dist, allow_unread: bool, dtype_flag: str | None = None) -> JobSetup:
    """Rank 0's plan of a split (plan_job), refused (ConversionError, before anything is written) where the family
    file says no consumer reads the per-expert layout, unless `allow_unread`. The plan comes first, so a source
    that cannot be read at all is reported as for every other job."""
    setup = plan_job(opts, dist)
    if not allow_unread:
        src = Storage(opts.src, opts.storage_options, opts.settings.storage)
        try:
            config = read_json(src, "config.json")
        except (ConversionError, OSError):
            if src.exists("config.json"):
                raise  # there, but unreadable: the same error planning would meet
            config = None
        finally:
            src.close()
        check_split_source(config, src.display(), opts.family, opts.dtype, dtype_flag)
    return setup


def run(args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run the split (and --verify) described by parsed flags `args` on this rank; returns the exit code.

    `report`, if given, receives on rank 0 the bytes written, any error and the verifier's outcome.
    """
    opts = job_options(args, PER_EXPERT)
    allow = bool(getattr(args, "allow_unread_layout", False))

    def planner(o: JobOptions, d: Dist) -> JobSetup:
        return plan_split(o, d, allow, getattr(args, "dtype", None))

    return with_verify(args, lambda d: run_planned(planner, opts, d, report), MARKER, report)(dist)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the split job on every rank."""
    args = build_parser().parse_args(argv)
    run_main(lambda dist: run(args, dist), args.nproc, preload_torch=computes(args), inputs=inputs(args))


if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
