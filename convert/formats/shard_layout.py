"""Deterministic layout of output safetensors shards: which tensor goes in which file, at which offset.

Tensors are packed in natural name order (so each layer stays together) into shards
of at most `max_shard_bytes` (a larger tensor gets a shard of its own). Inside a
shard, tensors are ordered by element size (largest first) to keep data aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from convert.formats.safetensors import DTYPE_SIZES, TensorSlot, build_header
from sharding.file_layout import natural_key


class TensorSpec(Protocol):
    # read-only: a frozen dataclass (convert.plan.base.TargetTensor) matches
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...


@dataclass
class OutputFile:
    """One output shard: its name, header bytes, total size and each tensor's absolute slot."""

    name: str
    header: bytes
    size: int
    slots: dict[str, TensorSlot]


def layout_files(
    tensors: Sequence[TensorSpec], max_shard_bytes: int, metadata: dict[str, str], stem: str = "model"
) -> list[OutputFile]:
    """Pack `tensors` into shards named `{stem}-0000i-of-0000N.safetensors`."""
    groups: list[list[TensorSpec]] = []
    size = 0
    for t in sorted(tensors, key=lambda t: natural_key(t.name)):
        if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    files = []
    for i, group in enumerate(groups, start=1):
        ordered = sorted(group, key=lambda t: (-DTYPE_SIZES[t.dtype], natural_key(t.name)))
        header, slots, total = build_header([(t.name, t.dtype, tuple(t.shape)) for t in ordered], metadata)
        files.append(OutputFile(f"{stem}-{i:05d}-of-{n:05d}.safetensors", header, total, slots))
    return files


def weight_map(files: Sequence[OutputFile]) -> dict[str, str]:
    """tensor name -> shard file name, for the index."""
    return {name: f.name for f in files for name in f.slots}


def keep_files(files: dict[str, list[str]], tensors: Sequence[TensorSpec],
               metadata: dict[str, dict[str, str]]) -> list[OutputFile]:
    """Shards named and filled as a source's: `files` maps each shard name to its tensors in data order,
    `tensors` gives each tensor's (output) dtype and shape, `metadata` each shard's `__metadata__`."""
    spec = {t.name: t for t in tensors}
    out = []
    for name, names in files.items():
        header, slots, total = build_header([(n, spec[n].dtype, tuple(spec[n].shape)) for n in names],
                                            metadata.get(name) or {"format": "pt"})
        out.append(OutputFile(name, header, total, slots))
    return out
