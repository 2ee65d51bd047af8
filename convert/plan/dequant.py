"""Dequantizing FP8 block-scaled and MXFP4 weights while converting: one tensor (or one expert) at a time, on CPU.

`w[i, j] = fp8[i, j] * scale_inv[i // bm, j // bn]`, computed in float32 and then cast, as
transformers' `Fp8Dequantize` computes it; the block size comes from the config
(`weight_block_size`, default 128x128), never from the scale grid, so ragged edge blocks are right.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from convert.plan.ndarrays import E4M3FN_BITS, E5M2_BITS, Fp8Bits
from convert.plan.transforms import Unit, decode, encode, torch_dtypes

if TYPE_CHECKING:
    import numpy as np
    import torch

DEFAULT_BLOCK = (128, 128)


def block_size(config: dict[str, Any]) -> tuple[int, int]:
    """The FP8 block size of a config.json's `quantization_config` (128x128 when it names none)."""
    for cfg in (config, config.get("text_config")):
        q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if isinstance(q, dict) and isinstance(q.get("weight_block_size"), list) and len(q["weight_block_size"]) == 2:
            return int(q["weight_block_size"][0]), int(q["weight_block_size"][1])
    return DEFAULT_BLOCK


_CHUNK_ELEMENTS = 1 << 22  # float32 temporaries of at most 16 MiB per call


@functools.cache
def _fp8_table(dtype: torch.dtype) -> np.ndarray:
    """float32 value of each of the 256 codes of FP8 `dtype`, as torch converts them (NaN codes included)."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()


@functools.cache
def _fp8_pair_table(dtype: torch.dtype) -> np.ndarray:
    """The float32 values of every pair of FP8 `dtype` codes, as one uint64 per little-endian uint16 pair code
    (512 KiB): one lookup yields two values."""
    import numpy as np

    single = _fp8_table(dtype)
    pair = np.arange(1 << 16, dtype=np.uint32)
    table = np.empty((1 << 16, 2), dtype=np.float32)
    table[:, 0], table[:, 1] = single[pair & 0xFF], single[pair >> 8]
    return table.view(np.uint64).reshape(-1)


def _fp8_values(w: torch.Tensor) -> torch.Tensor:
    """float32 values of FP8 tensor `w` (fp8_values_into, into a new tensor)."""
    import torch

    out = torch.empty(w.shape, dtype=torch.float32)
    fp8_values_into(w.contiguous(), out)
    return out


INDEX_SCRATCH = 24  # thread_scratch slot of fp8_values_into's lookup indices


def fp8_values_into(w: torch.Tensor, out: torch.Tensor) -> None:
    """float32 values of contiguous FP8 `w` (torch's own conversion of each code, bit for bit, NaN codes included),
    written into contiguous float32 `out` of the same shape: by integer ops (_decode_bits_into) where they serve,
    else by table lookup (_fp8_table_into)."""
    factor = _decode_bits_into(w, out)
    if factor is None:
        _fp8_table_into(w, out)
    else:
        out.mul_(factor)


def _fp8_table_into(w: torch.Tensor, out: torch.Tensor) -> None:
    """fp8_values_into (`w` of any strides) by table lookup (several times faster than torch's conversion on
    CPU), two codes per lookup where the element count is even. The lookup's indices are widened into this
    thread's scratch first (numpy's take would widen them into a fresh buffer, a page-faulting mapping per call
    under convert.io.memory's pinned mmap threshold)."""
    import numpy as np
    import torch

    from convert.io.memory import thread_scratch

    codes = w.contiguous().view(torch.uint8).numpy().reshape(-1)
    flat = out.numpy().reshape(-1)
    pairs = codes.size % 2 == 0 and np.little_endian
    keys = codes.view(np.uint16) if pairs else codes
    index = np.frombuffer(thread_scratch(keys.size * 8, INDEX_SCRATCH), dtype=np.intp, count=keys.size)
    np.copyto(index, keys, casting="unsafe")
    if pairs:
        np.take(_fp8_pair_table(w.dtype), index, out=flat.view(np.uint64), mode="clip")
    else:
        np.take(_fp8_table(w.dtype), index, out=flat, mode="clip")


def _fp8_bits(dtype: torch.dtype) -> Fp8Bits | None:
    """The integer decoding of FP8 `dtype`, or None where it has none here (the fnuz formats)."""
    import torch

    return {torch.float8_e4m3fn: E4M3FN_BITS, torch.float8_e5m2: E5M2_BITS}.get(dtype)


def _keeps_subnormals() -> bool:
    """Whether this thread's float arithmetic keeps subnormal operands (no denormals-are-zero mode)."""
    import torch

    return bool(torch.tensor([2.0**-140]).mul_(2.0**20).item() == 2.0**-120)


def _decode_bits_into(w: torch.Tensor, out: torch.Tensor, finite: bool = False) -> float | None:
    """Decode FP8 `w` (any strides) into contiguous float32 `out` by integer ops in `out`'s own memory (about
    twice as fast as the table): returns the factor 2**unbias the values in `out` are still short of, or None where the table
    must decode `w` instead (other formats, a thread that flushes subnormals, NaN/inf codes; `finite`: the caller
    knows there are none, codes it just wrote from finite values, and they are not looked for)."""
    import torch

    bits = _fp8_bits(w.dtype)
    if bits is None or not _keeps_subnormals():
        return None
    o = out.view(torch.int32)
    o.copy_(w.view(torch.int8))
    o.bitwise_left_shift_(bits.shift).bitwise_and_(bits.mask)
    if not finite and out.numel():
        lo, hi = torch.aminmax(out)
        if max(-float(lo), float(hi)) > bits.max_finite * 2.0**-bits.unbias:
            return None
    return 2.0**bits.unbias


def fp8_scaled_into(w: torch.Tensor, out: torch.Tensor, per_col: torch.Tensor, bn: int, finite: bool = False) -> None:
    """Values of FP8 rows `w` [n, cols] (any strides: a tile of wider rows) times their column block's float32
    scale `per_col` [ceil(cols / bn)] (each product rounded once, as fp8_values_into then scale_column_blocks give them, bit
    for bit), written into contiguous float32 `out` [n, cols]. Decoded by integer ops where they serve, with
    2**unbias folded into the scale (one pass fewer; exact while that product stays finite); `finite` as for
    _decode_bits_into."""
    factor = _decode_bits_into(w, out, finite)
    if factor is None:
        _fp8_table_into(w, out)
    elif not per_col.numel() or float(per_col.abs().max()) * factor < 2.0**127:
        per_col = per_col * factor
    else:
        out.mul_(factor)
    scale_column_blocks(out, per_col, bn, "mul")


def scale_column_blocks(x: torch.Tensor, per_col: torch.Tensor, bn: int, op: str,
                        out: torch.Tensor | None = None) -> None:
    """Multiply (op "mul") or divide ("div") each column block of rows `x` [n, cols] by its entry of `per_col`
    [ceil(cols / bn)] (a ragged last block included), into `out` (x's shape) or, when None, in place."""
    import torch

    dst = x if out is None else out
    fn = torch.mul if op == "mul" else torch.div
    full = x.shape[1] // bn
    if full:
        shape = (x.shape[0], full, bn)
        fn(x[:, : full * bn].view(shape), per_col[:full].view(1, full, 1), out=dst[:, : full * bn].view(shape))
    if full * bn < x.shape[1]:
        fn(x[:, full * bn :], per_col[full], out=dst[:, full * bn :])


def fp8_dequantize(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Values of FP8 weight `w` [..., out, in] with its scale grid [..., ceil(out/bm), ceil(in/bn)], computed in
    float32 (each value times its block's scale, rounded once, as transformers computes it) and cast to
    `dtype` (float32 when None); a few rows of blocks at a time, so float32 temporaries stay small."""
    import torch

    bm, bn = block
    rows, cols = w.shape[-2:]
    lead = w.shape[:-2]
    s = scale.float()
    out = torch.empty(w.shape, dtype=dtype or torch.float32)
    per_block_row = max(1, bm * cols * math.prod(lead))
    step = bm * max(1, _CHUNK_ELEMENTS // per_block_row)
    grid_cols = -(-cols // bn)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        vals = _fp8_values(w[..., i:j, :])
        sc = s[..., i // bm : -(-j // bm), :]
        if (j - i) % bm == 0 and cols % bn == 0:
            vals.view(*lead, (j - i) // bm, bm, grid_cols, bn).mul_(sc.unsqueeze(-1).unsqueeze(-3))
        else:  # ragged edge blocks: the scale grid expanded to the chunk's elements
            vals.mul_(sc.repeat_interleave(bm, dim=-2)[..., : j - i, :].repeat_interleave(bn, dim=-1)[..., :cols])
        out[..., i:j, :] = vals
    return out


DEQUANT_TILE_SCRATCH = 40  # first of fp8_dequantize_into's 4 thread_scratch slots (float32 and 3 uint32 tiles)


def fp8_dequantize_into(w: np.ndarray, w_dtype: str, scale: np.ndarray, scale_dtype: str,
                        block: tuple[int, int], out: np.ndarray, out_dtype: str) -> np.ndarray:
    """fp8_dequantize in numpy (convert.plan.ndarrays: no torch): FP8 weight `w` [rows, cols] (codes of
    safetensors `w_dtype`) with its block scale grid (`scale_dtype`), each value times its block's scale rounded
    once, then rounded to `out_dtype` into `out` (ndarrays' storage); returns `out`. One block row at a time."""
    import numpy as np

    from convert.plan import ndarrays as nd

    bm, bn = block
    rows, cols = w.shape
    n = min(rows, bm) * cols
    values = nd.scratch((n,), np.float32, DEQUANT_TILE_SCRATCH)
    tmp = [nd.scratch((n,), np.uint32, DEQUANT_TILE_SCRATCH + 1 + k) for k in range(3)]
    grid = nd.to_float32(scale, scale_dtype)
    for i in range(0, rows, bm):
        m = min(rows, i + bm) - i
        v = values[: m * cols].reshape(m, cols)
        nd.fp8_scaled_into(w[i : i + m], w_dtype, grid[i // bm], bn, v)
        nd.float32_to_into(v, out_dtype, out[i : i + m], [t[: m * cols].reshape(m, cols) for t in tmp])
    return out


# MXFP4 (OCP microscaling, as transformers' integrations/mxfp4.py unpacks it): 32 values a block share one
# E8M0 scale byte (2**(s - 127)); each value a 4-bit index into FP4_VALUES, two a byte, low nibble first.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values [..., G*32] of MXFP4 `blocks` U8 [..., G, 16] with `scales` U8 [..., G].

    Exact in float32 (an FP4 value times a power of two); cast once to the output dtype this gives
    transformers' `convert_moe_packed_tensors` bit for bit (its `ldexp` also rounds once).
    """
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    *lead, g, b = blocks.shape
    out = torch.empty(*lead, g, 2 * b, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1), out=out)
    return out.reshape(*lead, g * 2 * b)


@dataclass(frozen=True)
class Mxfp4Regroup:
    """A compute piece: one expert from `src` units (MXFP4 blocks/scales and other roles) to `dst` units of
    another family's roles: each `mxfp4` target role (blocks role, scales role) dequantized, each `cast` role copied."""

    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]
    mxfp4: tuple[tuple[str, str, str], ...]  # (target role, blocks role, scales role)
    cast: tuple[tuple[str, str], ...]  # (target role, source role)

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The expert's bytes of each `dst` unit, from its bytes of each `src` unit (one buffer per read)."""
        shapes = dict(self.role_shape)
        src: dict[str, torch.Tensor] = {}
        for unit, buf in zip(self.src, bufs):
            src.update(decode(unit, buf, shapes))
        roles = {t: mxfp4_dequantize(src[b], src[s]) for t, b, s in self.mxfp4}
        roles.update({t: src[r] for t, r in self.cast})
        return [encode(unit, roles) for unit in self.dst]


@dataclass(frozen=True)
class DequantTensor:
    """A compute piece: one whole FP8 weight and its scale grid (two reads) -> the dequantized weight."""

    shape: tuple[int, ...]
    dtype: str
    scale_shape: tuple[int, ...]
    scale_dtype: str
    out_dtype: str
    block: tuple[int, int]

    uses_torch: ClassVar[bool] = False

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The dequantized weight's bytes, from the weight's and the scale's bytes (numpy: no torch needed)."""
        from convert.plan import ndarrays as nd

        rows, cols = self.shape[-2:]
        w = nd.view(bufs[0], self.dtype, self.shape).reshape(-1, rows, cols)
        s = nd.view(bufs[1], self.scale_dtype, self.scale_shape).reshape(-1, *self.scale_shape[-2:])
        out = nd.empty((w.shape[0], rows, cols), self.out_dtype)
        for i in range(w.shape[0]):  # the experts of a fused weight, one after another
            fp8_dequantize_into(w[i], self.dtype, s[i], self.scale_dtype, self.block, out[i], self.out_dtype)
        return [nd.as_bytes(out)]


@dataclass(frozen=True)
class DequantRegroup:
    """A compute piece: one expert from `src` units (weights and scale grids) to `dst` units (weights only),
    each weight role of `pairs` (weight role, scale role) dequantized before it is regrouped."""

    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]
    pairs: tuple[tuple[str, str], ...]
    block: tuple[int, int]

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The expert's bytes of each `dst` unit, from its bytes of each `src` unit (one buffer per read)."""
        shapes = dict(self.role_shape)
        roles: dict[str, torch.Tensor] = {}
        for unit, buf in zip(self.src, bufs):
            roles.update(decode(unit, buf, shapes))
        out_dtype = {role: torch_dtypes()[u.dtype] for u in self.dst for role in u.roles}
        for w, s in self.pairs:
            roles[w] = fp8_dequantize(roles[w], roles[s], self.block, out_dtype.get(w))
        return [encode(unit, roles) for unit in self.dst]
