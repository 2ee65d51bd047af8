"""Compute steps of adapter pieces: each turns a piece's source buffers into the bytes of its writes.

A piece whose `regroup` is one of these objects is executed by `outputs(bufs)` (see
convert.engine.executor.piece_outputs): `bufs` are the piece's reads in order, the result is one
buffer per write, in order. Everything else an adapter conversion moves is a plain byte
copy (or cast) and needs no compute. Conventions (FORMATS.md): per-expert lora_A is [r, in],
lora_B is [out, r]; a fused factor of k roles (as the family's fused tensor holds them, e.g.
gate and up) stacks them on its out dim either as k blocks ("concat") or interleaved
("interleave": role j = rows j::k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from convert.io.memory import thread_scratch
from convert.formats.safetensors import DTYPE_SIZES
from convert.plan.transforms import from_bytes, to_bytes

if TYPE_CHECKING:
    import torch

GATHER_SCRATCH = 1  # first thread_scratch slot of FoldedSplit's outputs (slot 0 holds the piece's reads)


def _dtype(name: str) -> "torch.dtype":
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
class FoldedFactors:
    """One peft target_parameters wrapper: lora_A [E*r, in] (expert-major) and lora_B [out, r*E] (expert-minor).

    `out` counts the rows of every role; `parts` roles share the wrapper's lora_A and split
    lora_B's rows (halves or interleaved by `order`).
    """

    a_dtype: str
    b_dtype: str
    out: int
    inn: int
    rank: int
    experts: int
    parts: int
    order: str | None
    dst_a: str
    dst_b: str
    orientation: str = "in_out"
    b_order: str = "rank_major"

    @property
    def a_cols(self) -> int:
        """Columns of the stored lora_A: `in` in peft >= 0.19.1's orientation, `out` (every role) in the older one."""
        return self.inn if self.orientation == "in_out" else self.out

    @property
    def b_rows(self) -> int:
        """Rows of the stored lora_B: `out` (every role), or `in` in the older orientation."""
        return self.out if self.orientation == "in_out" else self.inn


@dataclass(frozen=True)
class FoldedSplit:
    """peft target_parameters wrappers -> each expert's per-role lora_A [r, in] and lora_B [out/parts, r].

    For the experts [first, last) of one EP slice. Reads, per wrapper in order: the lora_A rows
    of those experts (one range), then the whole lora_B. Writes, per wrapper, per expert, per
    role: lora_A (the wrapper's A, for every role), then lora_B. The A outputs are views of the
    read; all B matrices of a wrapper come from one strided copy, back to back.
    """

    wrappers: tuple[FoldedFactors, ...]
    first: int
    last: int

    def outputs(self, bufs: list[bytes | memoryview]) -> list[memoryview]:
        """The writes' bytes, in write order (views of this thread's scratch or of `bufs`)."""
        n_e = self.last - self.first
        out: list[memoryview] = []
        for i, f in enumerate(self.wrappers):
            if f.orientation != "in_out" or f.b_order != "rank_major":
                out += self._general(f, bufs[2 * i], bufs[2 * i + 1], GATHER_SCRATCH + 2 * i)
                continue
            a_size = f.rank * f.inn * DTYPE_SIZES[f.dst_a]
            a = memoryview(bufs[2 * i]).cast("B")
            if f.dst_a != f.a_dtype:
                cast = thread_scratch(n_e * a_size, GATHER_SCRATCH + 2 * i + 1)
                from_bytes(cast, f.dst_a, (n_e * f.rank, f.inn)).copy_(from_bytes(a, f.a_dtype, (n_e * f.rank, f.inn)))
                a = cast
            n = f.out // f.parts
            b = from_bytes(bufs[2 * i + 1], f.b_dtype, (f.out, f.rank, f.experts))[:, :, self.first : self.last]
            if f.parts > 1 and f.order == "interleave":
                picked = b.view(n, f.parts, f.rank, n_e).permute(3, 1, 0, 2)  # role j = rows j::parts
            else:
                picked = b.view(f.parts, n, f.rank, n_e).permute(3, 0, 1, 2)  # role j = the j-th block of rows
            b_size = n * f.rank * DTYPE_SIZES[f.dst_b]
            gathered = thread_scratch(n_e * f.parts * b_size, GATHER_SCRATCH + 2 * i)
            from_bytes(gathered, f.dst_b, (n_e, f.parts, n, f.rank)).copy_(picked)  # one copy (and cast) for all
            for e in range(n_e):
                a_e = a[e * a_size : (e + 1) * a_size]
                for j in range(f.parts):
                    k = e * f.parts + j
                    out += [a_e, gathered[k * b_size : (k + 1) * b_size]]
        return out

    def _general(self, f: FoldedFactors, a_buf: bytes | memoryview, b_buf: bytes | memoryview,
                 slot: int) -> list[memoryview]:
        """Older-orientation or expert-major wrappers: per expert and role, lora_A [r, in] then lora_B [out/parts, r].

        Expert e's stored factors: A_e = A.view(E, r, a_cols)[e]; B_e = B.view(b_rows, r, E)[:, :, e] (rank-major)
        or B.view(b_rows, E, r)[:, e, :] (expert-major). In peft >= 0.19.1's orientation the expert's LoRA is
        (A_e, B_e); in the older one its delta is (B_e @ A_e)^T, so its lora_A is B_e^T and its lora_B A_e^T.
        """
        n_e = self.last - self.first
        a = from_bytes(a_buf, f.a_dtype, (n_e, f.rank, f.a_cols))
        whole_b = from_bytes(b_buf, f.b_dtype, (f.b_rows, f.rank * f.experts))
        if f.b_order == "rank_major":
            b = whole_b.view(f.b_rows, f.rank, f.experts).permute(2, 0, 1)[self.first : self.last]
        else:
            b = whole_b.view(f.b_rows, f.experts, f.rank).permute(1, 0, 2)[self.first : self.last]
        if f.orientation == "in_out":
            new_a, new_b = a, b  # [n_e, r, in], [n_e, out, r]
        else:
            new_a, new_b = b.transpose(1, 2), a.transpose(1, 2)
        n = f.out // f.parts
        if f.parts > 1 and f.order == "interleave":
            parts = new_b.reshape(n_e, n, f.parts, f.rank).permute(0, 2, 1, 3)
        else:
            parts = new_b.reshape(n_e, f.parts, n, f.rank)
        a_size, b_size = f.rank * f.inn * DTYPE_SIZES[f.dst_a], n * f.rank * DTYPE_SIZES[f.dst_b]
        buf_a = thread_scratch(n_e * a_size, slot + 1)
        from_bytes(buf_a, f.dst_a, (n_e, f.rank, f.inn)).copy_(new_a)
        buf_b = thread_scratch(n_e * f.parts * b_size, slot)
        from_bytes(buf_b, f.dst_b, (n_e, f.parts, n, f.rank)).copy_(parts)
        out: list[memoryview] = []
        for e in range(n_e):
            for j in range(f.parts):
                k = e * f.parts + j
                out += [buf_a[e * a_size : (e + 1) * a_size], buf_b[k * b_size : (k + 1) * b_size]]
        return out


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


@dataclass(frozen=True)
class ZeroFill:
    """Zero bytes for each write (`sizes`, in write order), with no source read: the factors of a zero LoRA pair."""

    sizes: tuple[int, ...]

    def outputs(self, bufs: list[bytes | memoryview]) -> list[memoryview]:
        """One zeroed buffer per write."""
        return [memoryview(bytes(n)) for n in self.sizes]


def _wrapped_outputs(inner: object | None, bufs: list[bytes | memoryview], read_dtypes: tuple[str, ...],
                     sizes: tuple[int, ...], dtype: str) -> list[bytes | memoryview]:
    """The outputs of the piece a ScaledWrites/PadRank wraps: its compute step's (`inner`), or for a byte copy/cast
    the reads (`bufs` of `read_dtypes`) concatenated, cast to `dtype` and cut into `sizes` bytes each."""
    from convert.plan.transforms import cast_bytes

    if inner is not None:
        return list(inner.outputs(bufs))  # type: ignore[attr-defined]
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

    inner: object | None
    read_dtypes: tuple[str, ...]
    sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    factors: tuple[float | None, ...]

    def outputs(self, bufs: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """The writes' bytes, the scaled ones recomputed."""
        import torch

        outs = _wrapped_outputs(self.inner, bufs, self.read_dtypes, self.sizes, self.dtypes[0])
        for i, f in enumerate(self.factors):
            if f is None:
                continue
            n = len(outs[i]) // DTYPE_SIZES[self.dtypes[i]]
            t = from_bytes(outs[i], self.dtypes[i], (n,)).to(torch.float32) * f
            outs[i] = to_bytes(t.to(_dtype(self.dtypes[i])))
        return outs


@dataclass(frozen=True)
class PadRank:
    """Another piece's outputs with some lora_B [rows, rank] widened to [rows, to] by zero columns (delta unchanged:
    the matching lora_A gets zero rows), where a target needs another rank than the module's.

    `inner`: the piece's own compute step, or None for a byte copy/cast (as in ScaledWrites: the reads
    concatenated, cast to the first write's dtype and cut into `sizes`, the unpadded sizes). `pads`: per write,
    (rows, rank, to) or None.
    """

    inner: object | None
    read_dtypes: tuple[str, ...]
    sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    pads: tuple[tuple[int, int, int] | None, ...]

    def outputs(self, bufs: list[bytes | memoryview]) -> list[bytes | memoryview]:
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
