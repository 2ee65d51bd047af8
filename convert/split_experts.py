"""`python -m convert.split_experts`: any fused MoE layout (auto-detected) -> per-expert HF layout.

    python -m convert.split_experts --nproc 8 --src DIR --dst DIR [--ep N] [--max-shard-size 5GB] ...
"""

from __future__ import annotations

import argparse
from typing import Any

from convert.formats.checkpoint import INDEX_NAME
from convert.cli import base_parser, computes, job_options, run_main
from convert.families import PER_EXPERT
from convert.engine.job import run_job
from convert.verify.hook import with_verify
from launch.dist import Dist

MARKER = INDEX_NAME  # the file whose presence marks a finished destination


def build_parser() -> argparse.ArgumentParser:
    """The command line: the base conversion flags."""
    return base_parser("convert.split_experts", __doc__.splitlines()[0])


def run(args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run the split (and --verify) described by parsed flags `args` on this rank; returns the exit code.

    `report`, if given, receives on rank 0 the bytes written, any error and the verifier's outcome.
    """
    opts = job_options(args, PER_EXPERT)
    return with_verify(args, lambda d: run_job(opts, d, report), MARKER, report)(dist)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the split job on every rank."""
    args = build_parser().parse_args(argv)
    run_main(lambda dist: run(args, dist), args.nproc, preload_torch=computes(args))


if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
