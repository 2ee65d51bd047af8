"""The computes of a merge's pieces (convert.plan.merge plans them): from the bytes of a piece's reads (the base's
tensors, then the LoRA factors) to the bytes of its writes, in float32, rounded once to the output dtype.

- MergeExperts: a run of experts of any layout the family tables describe (decoded into per-expert role arrays
  by the family's ops, merged, encoded back), FP8 block-scaled weights dequantized and requantized, or with
  --dtype dequantized; stepped (convert.plan.base.SteppedCompute): an expert's writes at a time.
- MergeMxfp4: a run of experts of an MXFP4 layer (gpt-oss as released), requantized or dequantized; stepped.
- MergeTensor: rows of one other LoRA'd weight (attention, router, dense MLP), FP8 ones whole.
- CastRun: one read's elements in another dtype (--dtype).
Factor says where one expert's A or B is among a piece's reads, whatever the adapter's layout. Everything
computes in numpy (convert.plan.ndarrays); requantizing computes record how much of each delta survived
(merge_quant.SURVIVAL).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from convert.formats.safetensors import DTYPE_SIZES
from convert.io.memory import thread_scratch
from convert.plan import ndarrays as nd
from convert.plan.dequant import fp8_dequantize_into, mxfp4_dequantize
from convert.plan.merge_quant import SURVIVAL, merge_fp8, merge_into, mxfp4_quantize, squared_norm
from convert.plan.transforms import Unit, decode_arrays, encode_arrays_into, unit_nbytes

# thread_scratch slots of an expert piece's outputs and of its roles' merges, two per role (slot 0 holds its
# reads; merge_quant.FP8_SCRATCH on are merge_fp8's)
OUTPUT_SCRATCH = 1
DELTA_SCRATCH = 2
DEQUANTIZED_SCRATCH = 30  # first of the slots of --dtype's dequantized FP8 weights without a delta, one each


@dataclass(frozen=True)
class Factor:
    """Where one expert's LoRA factor (A as [r, in], B as [out, r]) is among a piece's read buffers.

    kind: "each" (one read per expert of the run, `read + e - first`: a per-expert tensor, or a module's
    whole factor), "run" (one read of [n, *slice] for experts first..first+n-1 of a 3-D factor or of a
    folded peft lora_A viewed [n, r, in]; `shared`: one slice for every expert), "minor" (the whole peft
    lora_B [out, r*E], expert e at `.view(out, r, E)[:, :, e]`), "major" (a whole expert-major lora_B
    [out, E*r], expert e at `.view(out, E, r)[:, e, :]`). `transpose`: the slice is [in, r] / [r, out]
    (NeMo grouped; the older peft orientation, whose lora_A rows are B_e^T and lora_B columns A_e^T); a B
    holding several roles keeps role `part` of `parts` (halves, or rows part::parts), after the transpose.
    """

    read: int
    dtype: str
    shape: tuple[int, ...]  # of one read buffer
    kind: str
    first: int = 0
    experts: int = 1
    shared: bool = False
    transpose: bool = False
    part: int = 0
    parts: int = 1
    order: str = "concat"

    def of(self, bufs: Sequence[bytes | memoryview], e: int) -> np.ndarray:
        """Expert e's factor, from the piece's read buffers (a view, its elements as ndarrays holds them)."""
        if self.kind == "each":
            x = nd.view(bufs[self.read + e - self.first], self.dtype, self.shape)
        elif self.kind == "run":
            whole = nd.view(bufs[self.read], self.dtype, self.shape)
            x = whole[0 if self.shared else e - self.first]
        elif self.kind == "major":
            whole = nd.view(bufs[self.read], self.dtype, self.shape)
            x = whole.reshape(whole.shape[0], self.experts, whole.shape[1] // self.experts)[:, e, :]
        else:
            whole = nd.view(bufs[self.read], self.dtype, self.shape)
            x = whole.reshape(whole.shape[0], whole.shape[1] // self.experts, self.experts)[:, :, e]
        if self.transpose:
            x = x.T
        if self.parts == 1:
            return x
        if self.order == "interleave":
            return x[self.part :: self.parts]
        n = x.shape[0] // self.parts
        return x[self.part * n : (self.part + 1) * n]

    def float32(self, bufs: Sequence[bytes | memoryview], e: int) -> np.ndarray:
        """Expert e's factor in float32 (exact)."""
        return nd.to_float32(self.of(bufs, e), self.dtype)


@dataclass(frozen=True)
class RoleDelta:
    """The LoRA of one role: its factors and each expert's scaling (the run's experts, in order)."""

    role: str
    a: Factor
    b: Factor
    scaling: tuple[float, ...]


def expert_arrays(src: Sequence[Unit], bufs: Sequence[bytes | memoryview],
                   shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """One expert's role arrays (per-expert orientation, views of `bufs`) from its bytes of each `src` unit."""
    roles: dict[str, np.ndarray] = {}
    for unit, buf in zip(src, bufs):
        roles.update(decode_arrays(unit, buf, shapes))
    return roles


@dataclass(frozen=True)
class MergeExperts:
    """A compute piece: a run of experts' base tensors (`src` units each, one read per unit and expert, then the
    LoRA factor reads) -> the merged tensors (`dst` units each, one write per unit and expert).

    Each role of `deltas` is merged in float32 and rounded once to its `dst` unit's dtype; `quant` pairs
    (weight role, scale role) are FP8 block-scaled: dequantized before the merge and requantized after it
    (each requantized weight measured into merge_quant.SURVIVAL under `label`.experts.{e}.{role}), or, where
    not `requantize` (--dtype on an FP8 base), every pair's weight dequantized and written in its `dst` unit's
    dtype, the scale units dropped from `dst`.
    """

    experts: tuple[int, ...]
    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]
    deltas: tuple[RoleDelta, ...]
    quant: tuple[tuple[str, str], ...] = ()
    block: tuple[int, int] = (128, 128)
    requantize: bool = True
    label: str = ""

    uses_torch: ClassVar[bool] = False

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The merged bytes of each write, from the bytes of each read (in this thread's scratch: valid until
        its next piece)."""
        return [out for step in self.steps(bufs) for out in step]

    def steps(self, bufs: Sequence[bytes | memoryview]) -> Iterator[list[memoryview]]:
        """outputs() an expert at a time (convert.plan.base.SteppedCompute): each expert's merged writes, using
        its own base reads and the factor reads."""
        shapes = dict(self.role_shape)
        scale_of = dict(self.quant)
        n = len(self.src)
        sizes = [unit_nbytes(u, shapes) for u in self.dst]
        written = thread_scratch(sum(sizes) * len(self.experts), OUTPUT_SCRATCH)
        held = {r: u.dtype for u in self.src for r in u.roles}
        wanted = {r: u.dtype for u in self.dst for r in u.roles}
        pos = 0
        for i, e in enumerate(self.experts):
            out: list[memoryview] = []
            roles = expert_arrays(self.src, bufs[i * n : (i + 1) * n], shapes)
            dtypes = dict(held)  # what each role's array holds now
            for k, d in enumerate(self.deltas):
                w, wd = roles[d.role], dtypes[d.role]
                scale = scale_of.get(d.role)
                a, b = d.a.float32(bufs, e), d.b.float32(bufs, e)
                if scale is not None and self.requantize:
                    q = nd.scratch(w.shape, w.dtype, DELTA_SCRATCH + 2 * k)
                    grid = nd.scratch(roles[scale].shape, roles[scale].dtype, DELTA_SCRATCH + 2 * k + 1)
                    SURVIVAL.record(f"{self.label}.experts.{e}.{d.role}", "fp8",
                                    merge_fp8(w, wd, roles[scale], dtypes[scale], a, b, d.scaling[i], self.block,
                                              q, grid))
                    roles[d.role], roles[scale] = q, grid
                    continue
                od = wanted[d.role]
                merged = nd.scratch(w.shape, nd.STORAGE[od], DELTA_SCRATCH + 2 * k)
                roles[d.role] = merge_into(w, wd, a, b, d.scaling[i], merged, od,
                                           roles[scale] if scale else None, dtypes.get(scale or "", ""), self.block)
                dtypes[d.role] = od
            if not self.requantize:  # --dtype: the pairs' weights without a delta, dequantized too
                merged_roles = {d.role for d in self.deltas}
                for j, (wr, sr) in enumerate(self.quant):
                    if wr not in merged_roles and wr in roles:
                        od = wanted[wr]
                        values = nd.scratch(roles[wr].shape, nd.STORAGE[od], DEQUANTIZED_SCRATCH + j)
                        roles[wr] = fp8_dequantize_into(roles[wr], dtypes[wr], roles[sr], dtypes[sr], self.block,
                                                        values, od)
                        dtypes[wr] = od
            for unit, size in zip(self.dst, sizes):
                out.append(encode_arrays_into(unit, roles, dtypes, written[pos : pos + size], shapes))
                pos += size
            yield out


@dataclass(frozen=True)
class MergeTensor:
    """A compute piece: rows of one base weight (read 0; with its FP8 scale grid, read 1, where `scale_dtype`),
    then the module's lora_A (whole) and the lora_B rows of those rows -> the merged rows (and scale grid)."""

    shape: tuple[int, ...]  # of the rows read
    dtype: str
    out_dtype: str
    a_shape: tuple[int, ...]
    a_dtype: str
    b_shape: tuple[int, ...]
    b_dtype: str
    scaling: float
    scale_shape: tuple[int, ...] = ()
    scale_dtype: str = ""
    block: tuple[int, int] = (128, 128)
    requantize: bool = True  # False (--dtype on an FP8 base): the merged weight is written as `out_dtype`
    label: str = ""  # the tensor's name, for the FP8 survival report

    uses_torch: ClassVar[bool] = False

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The merged rows' bytes (and the fresh scale grid's, for an FP8 weight requantized)."""
        w = nd.view(bufs[0], self.dtype, self.shape)
        k = 1
        scale = None
        if self.scale_dtype:
            scale = nd.view(bufs[1], self.scale_dtype, self.scale_shape)
            k = 2
        a = nd.to_float32(nd.view(bufs[k], self.a_dtype, self.a_shape), self.a_dtype)
        b = nd.to_float32(nd.view(bufs[k + 1], self.b_dtype, self.b_shape), self.b_dtype)
        if scale is not None and self.requantize:
            q, grid = nd.empty(self.shape, self.dtype), nd.empty(self.scale_shape, self.scale_dtype)
            SURVIVAL.record(self.label, "fp8", merge_fp8(w, self.dtype, scale, self.scale_dtype, a, b, self.scaling,
                                                         self.block, q, grid))
            return [nd.as_bytes(q), nd.as_bytes(grid)]
        out = nd.empty(self.shape, self.out_dtype)
        merge_into(w, self.dtype, a, b, self.scaling, out, self.out_dtype, scale, self.scale_dtype, self.block)
        return [nd.as_bytes(out)]


@dataclass(frozen=True)
class CastRun:
    """A compute piece: one read of `dtype` elements -> the same elements as `out_dtype` (a copy where equal)."""

    dtype: str
    out_dtype: str

    uses_torch: ClassVar[bool] = False

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The read's elements in `out_dtype`."""
        if self.dtype == self.out_dtype:
            return [memoryview(bufs[0])]
        x = nd.view(bufs[0], self.dtype, (len(bufs[0]) // DTYPE_SIZES[self.dtype],))
        return [nd.as_bytes(nd.cast(x, self.dtype, self.out_dtype))]


@dataclass(frozen=True)
class MergeMxfp4:
    """A compute piece: a run of experts of an MXFP4 expert layer (`src` units each, one read per unit and
    expert, then the LoRA factor reads) -> `dst` units each (one write per unit and expert).

    `mx` names each (target role, blocks role, scales role); a role of `deltas` (target roles) is dequantized,
    merged in float32 and requantized (merge_quant.mxfp4_quantize, measured into SURVIVAL under
    `label`.experts.{e}.{role}), or, with `dequant` (--dtype), every target role is dequantized (merged where it
    has a delta), each `cast` (target role, source role) taken as it is, and `dst` holds the target family's units.
    """

    experts: tuple[int, ...]
    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]
    deltas: tuple[RoleDelta, ...]
    mx: tuple[tuple[str, str, str], ...]
    cast: tuple[tuple[str, str], ...] = ()
    dequant: bool = False
    label: str = ""

    uses_torch: ClassVar[bool] = False

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The merged bytes of each write, from the bytes of each read."""
        return [out for step in self.steps(bufs) for out in step]

    def steps(self, bufs: Sequence[bytes | memoryview]) -> Iterator[list[memoryview]]:
        """outputs() an expert at a time (convert.plan.base.SteppedCompute)."""
        shapes = dict(self.role_shape)
        mx = {t: (b, s) for t, b, s in self.mx}
        held = {r: u.dtype for u in self.src for r in u.roles}
        n = len(self.src)
        for i, e in enumerate(self.experts):
            roles = expert_arrays(self.src, bufs[i * n : (i + 1) * n], shapes)
            dtypes = dict(held)
            values: dict[str, np.ndarray] = {}
            for d in self.deltas:
                b, s = mx[d.role]
                w = mxfp4_dequantize(roles[b], roles[s])
                merged = merge_into(w, "F32", d.a.float32(bufs, e), d.b.float32(bufs, e), d.scaling[i],
                                    np.empty(w.shape, dtype=np.float32), "F32")
                if self.dequant:
                    values[d.role] = merged
                    continue
                q, sc = mxfp4_quantize(merged)
                SURVIVAL.add(f"{self.label}.experts.{e}.{d.role}", "mxfp4", w, merged - w, squared_norm(merged),
                             mxfp4_dequantize(q, sc))
                roles[b], roles[s] = q, sc
            if self.dequant:
                for t, (b, s) in mx.items():
                    if t not in values:
                        values[t] = mxfp4_dequantize(roles[b], roles[s])
                dtypes = dict.fromkeys(values, "F32")
                for t, r in self.cast:
                    values[t], dtypes[t] = roles[r], held[r]
                roles = values
            have = {r: tuple(a.shape) for r, a in roles.items()}  # with --dtype, the target family's roles
            yield [encode_arrays_into(unit, roles, dtypes, memoryview(bytearray(unit_nbytes(unit, have))), have)
                   for unit in self.dst]
