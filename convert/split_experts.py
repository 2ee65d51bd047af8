"""`python -m convert.split_experts`: any fused MoE layout (auto-detected) -> per-expert HF layout.

    python -m convert.split_experts --nproc 8 --src DIR --dst DIR [--ep N] [--max-shard-size 5GB] ...
"""

from __future__ import annotations

from convert.cli import base_parser, job_options, run_main, with_verify
from convert.families import PER_EXPERT
from convert.job import run_job


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the split job on every rank."""
    args = base_parser("convert.split_experts", __doc__.splitlines()[0]).parse_args(argv)
    opts = job_options(args, PER_EXPERT)
    run_main(with_verify(args, lambda dist: run_job(opts, dist)), args.nproc)


if __name__ == "__main__":
    main()
