"""`python -m convert.fuse_experts`: per-expert MoE checkpoint -> fused [E, ...] layout.

    python -m convert.fuse_experts --nproc 8 --src DIR --dst DIR [--layout transformers|stacked] [--ep N] ...
"""

from __future__ import annotations

import argparse
from typing import Any

from convert.cli import base_parser, computes, inputs, job_options
from convert.engine.job import run_job
from convert.families import load_families
from convert.formats.checkpoint import INDEX_NAME
from convert.toplevel import run_main
from convert.verify.hook import with_verify
from launch.dist import Dist

MARKER = INDEX_NAME  # the file whose presence marks a finished destination


def build_parser() -> argparse.ArgumentParser:
    """The command line: the base conversion flags plus --layout (a fused layout of some family)."""
    p = base_parser("convert.fuse_experts", __doc__.splitlines()[0])
    fused = sorted({name for fam in load_families().values() for name in fam.fused})
    p.add_argument(
        "--layout",
        default=None,
        choices=fused,
        help="fused layout: transformers (default; what transformers>=5 holds) or stacked; gpt_oss: native",
    )
    return p


def run(args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run the fuse (and --verify) described by parsed flags `args` on this rank; returns the exit code.

    `report`, if given, receives on rank 0 the bytes written, any error and the verifier's outcome.
    """
    opts = job_options(args, args.layout)
    return with_verify(args, lambda d: run_job(opts, d, report), MARKER, report)(dist)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the fuse job on every rank."""
    args = build_parser().parse_args(argv)
    run_main(lambda dist: run(args, dist), args.nproc, preload_torch=computes(args), inputs=inputs(args))


if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
