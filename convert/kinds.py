"""The conversion entry points a batch manifest can name, by kind.

Each entry point module exposes `build_parser()` (its own command line, the one source of
truth for its flags), `run(args, dist, report)` (the job for parsed flags, on this rank) and
`MARKER` (the file whose presence marks a finished destination). A batch runner maps a
manifest job's `kind` to its module here and parses the job's keys with that parser.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, Protocol

from launch.dist import Dist

KINDS: dict[str, str] = {
    "fuse_experts": "convert.fuse_experts",
    "split_experts": "convert.split_experts",
    "split_adapter": "convert.split_adapter",
    "fuse_adapter": "convert.fuse_adapter",
    "merge_adapter": "convert.merge_adapter",
}


class EntryPoint(Protocol):
    """What a conversion entry point module provides to batch runners."""

    MARKER: str

    def build_parser(self) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None) -> int: ...


def entry_point(kind: str) -> EntryPoint:
    """The entry point module of `kind` (one of KINDS); raises KeyError for an unknown kind."""
    return importlib.import_module(KINDS[kind])
