"""What a verification checks, shared by the base and adapter relations: the relation itself, the options, and the small-file checks."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from convert.formats.checkpoint import OTHER_WEIGHTS
from convert.io.storage import Store
from convert.settings import DEFAULT_SETTINGS, Settings
from convert.verify.checks import ExpertCheck, PassCheck
from convert.verify.tables import Table


class CannotVerify(Exception):
    """The verification cannot even start (invalid source, unknown family, unsupported kind)."""


@dataclass
class Relation:
    """Everything to check, built from metadata by rank 0 and sent to every rank."""

    kind: str
    headline: str
    experts: list[ExpertCheck]
    passes: list[PassCheck]
    problems: list[str]  # destination mismatches found from metadata alone
    src_tensors: int
    dst_tensors: int
    dst_files: int
    notes: list[str] = field(default_factory=list)
    src_chunked: dict[str, Any] = field(default_factory=dict)  # a trainer source's chunked tensors (ChunkedView)


@dataclass(frozen=True)
class VerifyOptions:
    """What to verify: source and destination (paths or fsspec URLs) and how."""

    src: str | None  # None: check `dst` against `target`'s rules only
    dst: str
    family: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    base_config: str | None = None  # adapters: the base model's config.json (for E where the adapter lacks it)
    max_report: int = 50
    report_path: str | None = None
    workers: int = 4  # threads per rank comparing experts / chunks in parallel (bounded by settings.verify_memory)
    target: str | None = None  # adapters: also check dst against this target's rules (default: the output record's)
    settings: Settings = DEFAULT_SETTINGS  # the stores' and the verifier's knobs (the entry point reads them at start)


def compare_files(src: Store, dst: Store, names: list[str], rewritten: AbstractSet[str] = frozenset()) -> list[str]:
    """Each of `names` (small top-level files of the source) must be in `dst` with the same bytes.

    Files in `rewritten` need only exist (the conversion rewrites them, e.g. adapter_config.json).
    """
    problems = []
    for name in names:
        if not dst.exists(name):
            problems.append(f"{dst.display(name)}: missing (the source has {name})")
        elif name not in rewritten and dst.read_bytes(name) != src.read_bytes(name):
            problems.append(f"{dst.display(name)}: differs from {src.display(name)}")
    return problems


def copied_files(table: Table, index_name: str) -> list[str]:
    """Top-level files of a source a conversion must carry over: all but weights and the index."""
    weights = set(table.shards) | {index_name}
    return [f for f in table.files if f not in weights and not f.endswith(".safetensors")
            and not OTHER_WEIGHTS.search(f) and not f.startswith(".")]
