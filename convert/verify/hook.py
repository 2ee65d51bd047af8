"""`--verify` on a conversion's entry point, without loading the verifier (numpy, and torch for casts) unless asked."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from launch.dist import Dist


def with_verify(
    args: argparse.Namespace, job: Callable[[Dist], int], marker: str, report: dict[str, Any] | None = None
) -> Callable[[Dist], int]:
    """`job` as is, or with --verify (and no --dry-run) convert.verify.run.with_verify of it.

    Takes a conversion's parsed flags `args`, its per-rank `job`, the output file `marker` that marks
    it complete and the optional rank-0 `report`; returns the per-rank callable to run. The verifier
    imports numpy (and torch where it checks a cast): a conversion without --verify loads neither.
    """
    if not getattr(args, "verify", False) or getattr(args, "dry_run", False):
        return job
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS is never used: no thread per core at import
    from convert.verify.run import with_verify as verified

    return verified(args, job, marker, report)
