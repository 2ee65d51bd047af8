"""Compute steps of adapter pieces that every layout shares; each turns a piece's source buffers into the bytes of its writes.

A piece whose `regroup` is one of these objects (or a layout's own: convert.plan.adapter_peft, adapter_grouped) is
executed by `outputs(bufs)` (see convert.engine.executor.piece_outputs): `bufs` are the piece's reads in order, the
result is one buffer per write, in order. Everything else an adapter conversion moves is a plain byte
copy (or cast) and needs no compute. Conventions (FORMATS.md): per-expert lora_A is [r, in],
lora_B is [out, r]; a fused factor of k roles (as the family's fused tensor holds them, e.g.
gate and up) stacks them on its out dim either as k blocks ("concat") or interleaved
("interleave": role j = rows j::k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convert.formats.safetensors import DTYPE_SIZES
from convert.plan.transforms import from_bytes, to_bytes

if TYPE_CHECKING:
    import torch

    from convert.plan.base import Compute

GATHER_SCRATCH = 1  # first thread_scratch slot of FoldedSplit's outputs (slot 0 holds the piece's reads)


def torch_dtype(name: str) -> torch.dtype:
    from convert.plan.transforms import TORCH_DTYPES  # torch is imported on first use only

    return TORCH_DTYPES[name]


def part_rows(rows: int, parts: int, order: str | None) -> list[slice]:
    """The rows of each of `parts` roles inside `rows` fused rows (halves or interleaved)."""
    if parts == 1:
        return [slice(0, rows)]
    if order == "interleave":
        return [slice(j, None, parts) for j in range(parts)]
    if order != "concat":
        raise ValueError(f"unknown order {order!r} of roles in a fused factor (expected concat or interleave)")
    n = rows // parts
    return [slice(j * n, (j + 1) * n) for j in range(parts)]


def merge_rows(mats: list[torch.Tensor], order: str | None) -> torch.Tensor:
    """Inverse of part_rows: the roles' row blocks -> fused rows (concat or interleave)."""
    import torch

    if len(mats) == 1:
        return mats[0]
    if order == "interleave":
        return torch.stack(mats, dim=1).flatten(0, 1)
    return torch.cat(mats, dim=0)


@dataclass(frozen=True)
class ZeroFill:
    """Zero bytes for each write (`sizes`, in write order), with no source read: the factors of a zero LoRA pair."""

    sizes: tuple[int, ...]

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """One zeroed buffer per write."""
        return [memoryview(bytes(n)) for n in self.sizes]


def _wrapped_outputs(inner: Compute | None, bufs: Sequence[bytes | memoryview], read_dtypes: tuple[str, ...],
                     sizes: tuple[int, ...], dtype: str) -> list[bytes | memoryview]:
    """The outputs of the piece a ScaledWrites/PadRank wraps: its compute step's (`inner`), or for a byte copy/cast
    the reads (`bufs` of `read_dtypes`) concatenated, cast to `dtype` and cut into `sizes` bytes each."""
    from convert.plan.transforms import cast_bytes

    if inner is not None:
        return list(inner.outputs(bufs))
    parts = [cast_bytes(b, d, dtype) for b, d in zip(bufs, read_dtypes)]
    data = memoryview(parts[0] if len(parts) == 1 else b"".join(parts)).cast("B")
    outs: list[bytes | memoryview] = []
    pos = 0
    for n in sizes:
        outs.append(data[pos : pos + n])
        pos += n
    return outs


@dataclass(frozen=True)
class ScaledWrites:
    """Another piece's outputs with some of them multiplied by a factor: lora_B * s'/s, where a target applies
    another scaling s than the source's s' to a module.

    `inner`: the piece's own compute step, or None for a byte copy/cast (the reads, of `read_dtypes`,
    concatenated, cast to each write's dtype and cut into `sizes`). `factors`: per write, the factor or
    None. A scaled write is computed in float32 and rounded once to its dtype (`dtypes`).
    """

    inner: Compute | None
    read_dtypes: tuple[str, ...]
    sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    factors: tuple[float | None, ...]

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        """The writes' bytes, the scaled ones recomputed."""
        import torch

        outs = _wrapped_outputs(self.inner, bufs, self.read_dtypes, self.sizes, self.dtypes[0])
        for i, f in enumerate(self.factors):
            if f is None:
                continue
            n = len(outs[i]) // DTYPE_SIZES[self.dtypes[i]]
            t = from_bytes(outs[i], self.dtypes[i], (n,)).to(torch.float32) * f
            outs[i] = to_bytes(t.to(torch_dtype(self.dtypes[i])))
        return outs


@dataclass(frozen=True)
class PadRank:
    """Another piece's outputs with some lora_B [rows, rank] widened to [rows, to] by zero columns (delta unchanged:
    the matching lora_A gets zero rows), where a target needs another rank than the module's.

    `inner`: the piece's own compute step, or None for a byte copy/cast (as in ScaledWrites: the reads
    concatenated, cast to the first write's dtype and cut into `sizes`, the unpadded sizes). `pads`: per write,
    (rows, rank, to) or None.
    """

    inner: Compute | None
    read_dtypes: tuple[str, ...]
    sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    pads: tuple[tuple[int, int, int] | None, ...]

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        """The writes' bytes, the padded ones widened."""
        import torch

        outs = _wrapped_outputs(self.inner, bufs, self.read_dtypes, self.sizes, self.dtypes[0])
        for i, pad in enumerate(self.pads):
            if pad is None:
                continue
            rows, rank, to = pad
            t = from_bytes(outs[i], self.dtypes[i], (rows, rank))
            wide = torch.zeros(rows, to, dtype=t.dtype)
            wide[:, :rank] = t
            outs[i] = to_bytes(wide)
        return outs
