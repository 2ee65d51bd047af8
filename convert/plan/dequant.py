"""Dequantizing FP8 block-scaled and MXFP4 weights while converting: one tensor (or one expert) at a time, on CPU.

`w[i, j] = fp8[i, j] * scale_inv[i // bm, j // bn]`, computed in float32 and then cast, as
transformers' `Fp8Dequantize` computes it; the block size comes from the config
(`weight_block_size`, default 128x128), never from the scale grid, so ragged edge blocks are right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from convert.plan.merge_quant import merge_into
from convert.plan.ndarrays import NATIVE_FLOATS, STORAGE
from convert.plan.transforms import Unit, decode_arrays, encode_arrays_into, torch_dtypes, unit_nbytes

if TYPE_CHECKING:
    import torch

DEFAULT_BLOCK = (128, 128)


def block_size(config: dict[str, Any]) -> tuple[int, int]:
    """The FP8 block size of a config.json's `quantization_config` (128x128 when it names none)."""
    for cfg in (config, config.get("text_config")):
        q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if isinstance(q, dict) and isinstance(q.get("weight_block_size"), list) and len(q["weight_block_size"]) == 2:
            return int(q["weight_block_size"][0]), int(q["weight_block_size"][1])
    return DEFAULT_BLOCK


def _held(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """The elements of tensor `t` as convert.plan.ndarrays holds its dtype (a view where `t` is contiguous), and
    that dtype's safetensors name."""
    import torch

    name = {v: k for k, v in torch_dtypes().items()}[t.dtype]
    t = t.contiguous()
    if name in NATIVE_FLOATS:
        return t.numpy(), name
    return t.view({1: torch.uint8, 2: torch.int16}[t.element_size()]).numpy().view(STORAGE[name]), name


def fp8_dequantize(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Values of FP8 weight `w` [..., out, in] with its scale grid [..., ceil(out/bm), ceil(in/bn)], each value
    times its block's scale (rounded once, as transformers computes it), cast to `dtype` (float32 when None):
    fp8_dequantize_into on the tensors' bytes."""
    import torch

    out_dtype = dtype or torch.float32
    out_name = {v: k for k, v in torch_dtypes().items()}[out_dtype]
    (wn, w_name), (sn, s_name) = _held(w), _held(scale)
    out = fp8_dequantize_into(wn, w_name, sn, s_name, block, np.empty(wn.shape, dtype=STORAGE[out_name]), out_name)
    if out_name in NATIVE_FLOATS:
        return torch.from_numpy(out)
    return torch.from_numpy(out.view(np.int16)).view(out_dtype)


def fp8_dequantize_into(w: np.ndarray, w_dtype: str, scale: np.ndarray, scale_dtype: str,
                        block: tuple[int, int], out: np.ndarray, out_dtype: str) -> np.ndarray:
    """fp8_dequantize in numpy (no torch): FP8 weight `w` [..., rows, cols] (codes of safetensors `w_dtype`) with
    its block scale grid [..., gr, gc] (`scale_dtype`), each value times its block's scale rounded once, then
    rounded to `out_dtype` into `out` (w's shape, convert.plan.ndarrays' storage); returns `out`:
    merge_quant.merge_into without a delta, one [rows, cols] matrix (a fused weight's expert) at a time."""
    for i in np.ndindex(w.shape[:-2]):
        merge_into(w[i], w_dtype, None, None, 0.0, out[i], out_dtype, scale[i], scale_dtype, block)
    return out


# MXFP4 (OCP microscaling, as transformers' integrations/mxfp4.py unpacks it): 32 values a block share one
# E8M0 scale byte (2**(s - 127)); each value a 4-bit index into FP4_VALUES, two a byte, low nibble first.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values [..., G*32] of MXFP4 `blocks` U8 [..., G, 16] with `scales` U8 [..., G].

    Exact in float32 (an FP4 value times a power of two); cast once to the output dtype this gives
    transformers' `convert_moe_packed_tensors` bit for bit (its `ldexp` also rounds once).
    """
    lut = np.array(FP4_VALUES, dtype=np.float32)
    *lead, g, b = blocks.shape
    out = np.empty((*lead, g, 2 * b), dtype=np.float32)
    out[..., 0::2] = lut[blocks & 0x0F]
    out[..., 1::2] = lut[blocks >> 4]
    np.ldexp(out, (scales.astype(np.int32) - 127)[..., None], out=out)
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

    uses_torch: ClassVar[bool] = False

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The expert's bytes of each `dst` unit, from its bytes of each `src` unit (one buffer per read)."""
        shapes = dict(self.role_shape)
        src: dict[str, np.ndarray] = {}
        for unit, buf in zip(self.src, bufs):
            src.update(decode_arrays(unit, buf, shapes))
        held = {role: u.dtype for u in self.src for role in u.roles}
        roles = {t: mxfp4_dequantize(src[b], src[s]) for t, b, s in self.mxfp4}
        dtypes = dict.fromkeys(roles, "F32")
        for t, r in self.cast:
            roles[t], dtypes[t] = src[r], held[r]
        shapes = {r: tuple(a.shape) for r, a in roles.items()}  # the target roles' (the source's name others)
        return [encode_arrays_into(unit, roles, dtypes, memoryview(bytearray(unit_nbytes(unit, shapes))), shapes)
                for unit in self.dst]


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

        w = nd.view(bufs[0], self.dtype, self.shape)
        s = nd.view(bufs[1], self.scale_dtype, self.scale_shape)
        out = nd.empty(self.shape, self.out_dtype)
        return [nd.as_bytes(fp8_dequantize_into(w, self.dtype, s, self.scale_dtype, self.block, out, self.out_dtype))]


@dataclass(frozen=True)
class DequantRegroup:
    """A compute piece: one expert from `src` units (weights and scale grids) to `dst` units (weights only),
    each weight role of `pairs` (weight role, scale role) dequantized before it is regrouped."""

    src: tuple[Unit, ...]
    dst: tuple[Unit, ...]
    role_shape: tuple[tuple[str, tuple[int, ...]], ...]
    pairs: tuple[tuple[str, str], ...]
    block: tuple[int, int]

    uses_torch: ClassVar[bool] = False

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        """The expert's bytes of each `dst` unit, from its bytes of each `src` unit (one buffer per read)."""
        shapes = dict(self.role_shape)
        roles: dict[str, np.ndarray] = {}
        for unit, buf in zip(self.src, bufs):
            roles.update(decode_arrays(unit, buf, shapes))
        dtypes = {role: u.dtype for u in self.src for role in u.roles}
        out_dtype = {role: u.dtype for u in self.dst for role in u.roles}
        for w, s in self.pairs:
            od = out_dtype.get(w, "F32")
            roles[w] = fp8_dequantize_into(roles[w], dtypes[w], roles[s], dtypes[s], self.block,
                                           np.empty(roles[w].shape, dtype=STORAGE[od]), od)
            dtypes[w] = od
        return [encode_arrays_into(unit, roles, dtypes, memoryview(bytearray(unit_nbytes(unit, shapes))), shapes)
                for unit in self.dst]
