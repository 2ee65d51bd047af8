"""Compute steps of adapter pieces: each turns a piece's source buffers into the bytes of its writes.

A piece whose `regroup` is one of these objects is executed by `outputs(bufs)` (see
convert.executor.piece_outputs): `bufs` are the piece's reads in order, the result is one
buffer per write, in order. Everything else an adapter conversion moves is a plain byte
copy (or cast) and needs no compute. Conventions (FORMATS.md): per-expert lora_A is [r, in],
lora_B is [out, r]; a fused gate_up factor holds gate and up on its out dim either as
halves ("concat") or interleaved ("interleave": gate = rows 0::2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from convert.transforms import from_bytes, to_bytes

if TYPE_CHECKING:
    import torch


def _dtype(name: str) -> "torch.dtype":
    from convert.transforms import TORCH_DTYPES  # torch is imported on first use only

    return TORCH_DTYPES[name]


def part_rows(rows: int, parts: int, order: str | None) -> list[slice]:
    """The rows of each of `parts` roles inside `rows` fused rows (halves or interleaved)."""
    if parts == 1:
        return [slice(0, rows)]
    if order == "interleave":
        return [slice(j, None, parts) for j in range(parts)]
    if order != "concat":
        raise ValueError(f"unknown gate/up order {order!r}")
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
class FoldedBGather:
    """peft lora_B [out, r*E] (expert-minor) -> B_e [out/parts, r] of experts [first, last), per role.

    Reads: the whole B. Writes: for each expert, for each of `parts` roles, one [out/parts, r] matrix.
    """

    dtype: str
    out: int
    rank: int
    experts: int
    first: int
    last: int
    parts: int
    order: str | None
    dst_dtype: str

    def outputs(self, bufs: list[bytes | memoryview]) -> list[memoryview]:
        """Per-expert, per-role B matrices of this piece's experts."""
        b = from_bytes(bufs[0], self.dtype, (self.out, self.rank, self.experts))
        dst = _dtype(self.dst_dtype)
        rows = part_rows(self.out, self.parts, self.order)
        return [to_bytes(b[rs, :, e].to(dst)) for e in range(self.first, self.last) for rs in rows]


@dataclass(frozen=True)
class GroupedSlice:
    """One expert's grouped (x @ A @ B) factor -> per-expert nn.Linear-form factors.

    The read is the expert's [in, r] slice of A or [r, out] slice of B (`shape`); it is
    transposed, split into `parts` roles by rows (B of gate_and_up), and each part is
    written `copies` times (A of gate_and_up is gate's and up's lora_A).
    """

    dtype: str
    shape: tuple[int, int]
    parts: int
    order: str | None
    copies: int
    dst_dtype: str

    def outputs(self, bufs: list[bytes | memoryview]) -> list[memoryview]:
        """The transposed slice, one buffer per role part and copy."""
        m = from_bytes(bufs[0], self.dtype, self.shape).transpose(0, 1).to(_dtype(self.dst_dtype))
        out = []
        for rs in part_rows(m.shape[0], self.parts, self.order):
            data = to_bytes(m[rs])
            out += [data] * self.copies
        return out


@dataclass(frozen=True)
class FoldedBBuild:
    """Rows [lo, hi) of every expert's per-role B_e [n, r] -> the matching rows of peft lora_B, expert-minor.

    Reads, in order: for each of `parts` roles, for each of the `experts` experts, rows [lo, hi)
    of that role's B_e (`hi - lo` x `rank`). With `expand`, each role gets its own block of the
    folded rank (rank * parts per expert, role j in block j; the matching lora_A stacks the
    roles' A), which is exact when gate and up have different lora_A. Writes: "concat": one
    block of rows per role (role j's rows j*n+lo .. j*n+hi); "interleave": rows 2*lo .. 2*hi.
    """

    dtypes: tuple[str, ...]
    rows: int
    rank: int
    experts: int
    parts: int
    order: str | None
    expand: bool
    dst_dtype: str

    def outputs(self, bufs: list[bytes | memoryview]) -> list[memoryview]:
        """The fused B rows of this chunk, one buffer per write."""
        import torch

        dst = _dtype(self.dst_dtype)
        folded_rank = self.rank * (self.parts if self.expand else 1)
        blocks = []
        for j in range(self.parts):
            per_e = [
                from_bytes(bufs[j * self.experts + e], self.dtypes[j * self.experts + e], (self.rows, self.rank))
                for e in range(self.experts)
            ]
            full = torch.zeros((self.rows, folded_rank, self.experts), dtype=dst)
            at = j * self.rank if self.expand else 0
            full[:, at : at + self.rank, :] = torch.stack(per_e, dim=-1).to(dst)
            blocks.append(full.reshape(self.rows, folded_rank * self.experts))
        if self.parts > 1 and self.order == "interleave":
            return [to_bytes(merge_rows(blocks, "interleave"))]
        return [to_bytes(b) for b in blocks]


@dataclass(frozen=True)
class GroupedBuild:
    """One expert's per-expert factors -> its slice of a grouped (x @ A @ B) factor.

    `which` "A": reads lora_A [r, in] of each distinct A (one when gate and up share it, else
    one per role, stacked on the rank); writes A^T [in, R]. `which` "B": reads lora_B [n, r]
    of each of `parts` roles; writes [R, out] where out = n * parts (halves or interleaved),
    with each role in its own rank block when `expand`.
    """

    which: str
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    parts: int
    order: str | None
    expand: bool
    dst_dtype: str

    def outputs(self, bufs: list[bytes | memoryview]) -> list[memoryview]:
        """The expert's grouped slice."""
        import torch

        dst = _dtype(self.dst_dtype)
        mats = [from_bytes(b, d, s).to(dst) for b, d, s in zip(bufs, self.dtypes, self.shapes)]
        if self.which == "A":
            return [to_bytes(torch.cat(mats, dim=0).transpose(0, 1))]
        if self.expand:
            r = mats[0].shape[1]
            padded = []
            for j, m in enumerate(mats):
                z = torch.zeros((m.shape[0], r * self.parts), dtype=dst)
                z[:, j * r : (j + 1) * r] = m
                padded.append(z)
            mats = padded
        return [to_bytes(merge_rows(mats, self.order).transpose(0, 1))]
