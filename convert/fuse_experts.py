"""`python -m convert.fuse_experts`: per-expert MoE checkpoint -> fused [E, ...] layout.

    python -m convert.fuse_experts --nproc 8 --src DIR --dst DIR [--layout transformers|stacked] [--ep N] ...
"""

from __future__ import annotations

from convert.cli import base_parser, job_options, run_main, with_verify
from convert.job import run_job


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the fuse job on every rank."""
    p = base_parser("convert.fuse_experts", __doc__.splitlines()[0])
    p.add_argument(
        "--layout",
        default=None,
        help="fused layout: transformers (default; what transformers>=5 holds) or stacked; gpt_oss: native",
    )
    args = p.parse_args(argv)
    opts = job_options(args, args.layout)
    run_main(with_verify(args, lambda dist: run_job(opts, dist)), args.nproc)


if __name__ == "__main__":
    main()
