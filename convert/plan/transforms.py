"""Compute transforms of one expert: dtype casts, and decoding/encoding fused expert slices.

Only pieces that cannot be byte copies come here (transposed or interleaved layouts,
dtype casts); each works on one expert's bytes at a time.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convert.families import FusedTensor
from convert.formats.safetensors import DTYPE_SIZES, numel

if TYPE_CHECKING:
    import torch

# torch is imported on first use only: byte-copy jobs of one rank never need it (it costs ~1 s to import).
_TORCH_DTYPE_ATTRS = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
DTYPE_NAMES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype."""
    import torch

    return {name: getattr(torch, attr) for name, attr in _TORCH_DTYPE_ATTRS.items()}


def __getattr__(name: str) -> Any:
    if name == "TORCH_DTYPES":
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_bytes(buf: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """View `buf` as a tensor of safetensors `dtype` and `shape` (no copy)."""
    import torch

    if numel(shape) == 0:
        return torch.empty(shape, dtype=torch_dtypes()[dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers are fine: we never write through the view
        return torch.frombuffer(buf, dtype=torch_dtypes()[dtype]).view(shape)


def to_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of `t` (contiguous copy only if needed)."""
    import torch

    flat = t.contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # size-1 dims can leave a "contiguous" tensor with a stride != 1
        flat = flat.new_empty(flat.shape).copy_(flat)
    flat = flat.view(torch.uint8)
    return flat.numpy().data  # the array's bytes as a memoryview, as memoryview(array) gives them


def cast_bytes(buf: bytes | memoryview, src: str, dst: str) -> bytes | memoryview:
    """Cast a flat buffer of `src` elements to `dst` elements (in numpy where ndarrays.casts allows it, else in
    torch; the same bytes either way)."""
    if src == dst:
        return buf
    from convert.plan import ndarrays as nd

    if nd.casts(src, dst):
        n = len(buf) // DTYPE_SIZES[src]
        return nd.as_bytes(nd.cast(nd.view(buf, src, (n,)), src, dst))
    dtypes = torch_dtypes()
    n = len(buf) // dtypes[src].itemsize
    return to_bytes(from_bytes(buf, src, (n,)).to(dtypes[dst]))


@dataclass(frozen=True)
class Unit:
    """One tensor of one expert on either side of a conversion.

    Either a per-expert tensor of a single `role`, or one expert's slice of `fused`.
    """

    fused: FusedTensor | None
    role: str | None
    dtype: str

    @property
    def roles(self) -> tuple[str, ...]:
        return self.fused.parts if self.fused else (str(self.role),)

    @property
    def is_byte_copy(self) -> bool:
        return self.fused is None or self.fused.is_byte_copy


def decode(unit: Unit, buf: bytes | memoryview, role_shape: dict[str, tuple[int, ...]],
           view: Callable[[Any, str, tuple[int, ...]], Any] | None = None) -> dict[str, Any]:
    """Split one expert's bytes of `unit` into its roles' tensors in per-expert (nn.Linear) form: views of `buf`
    made by `view` (from_bytes, torch tensors, when None; convert.plan.ndarrays.view for numpy arrays)."""
    make = view or from_bytes
    if unit.fused is None:
        role = str(unit.role)
        return {role: make(buf, unit.dtype, role_shape[role])}
    t = unit.fused
    whole = make(buf, unit.dtype, t.pipeline.slice_shape(role_shape[t.parts[0]]))
    return dict(zip(t.parts, t.pipeline.split(whole)))


def encode(unit: Unit, roles: dict[str, torch.Tensor]) -> memoryview:
    """Build one expert's bytes of `unit` from per-expert role tensors (cast to the unit's dtype)."""
    target = torch_dtypes()[unit.dtype]
    if unit.fused is None:
        return to_bytes(roles[str(unit.role)].to(target))
    t = unit.fused
    return to_bytes(t.pipeline.fuse([roles[p].to(target) for p in t.parts]))


def unit_shape(unit: Unit, role_shape: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of one expert's tensor (or slice of the fused tensor) of `unit`."""
    if unit.fused is None:
        return role_shape[str(unit.role)]
    return tuple(unit.fused.pipeline.slice_shape(role_shape[unit.fused.parts[0]]))


def unit_nbytes(unit: Unit, role_shape: dict[str, tuple[int, ...]]) -> int:
    """The bytes of one expert's tensor (or slice of the fused tensor) of `unit`."""
    return numel(unit_shape(unit, role_shape)) * DTYPE_SIZES[unit.dtype]


def decode_arrays(unit: Unit, buf: bytes | memoryview, role_shape: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """decode() as numpy arrays (convert.plan.ndarrays: bf16 and FP8 as their raw bits), views of `buf`."""
    from convert.plan import ndarrays as nd

    return decode(unit, buf, role_shape, nd.view)


def encode_arrays_into(unit: Unit, roles: dict[str, Any], dtypes: dict[str, str], buf: memoryview,
                       role_shape: dict[str, tuple[int, ...]]) -> memoryview:
    """encode() from numpy arrays into `buf` (writable, unit_nbytes(unit) bytes; no fresh array per expert):
    `roles` hold elements of `dtypes` (as convert.plan.ndarrays holds them), cast to the unit's dtype where it
    differs (rounded once, as torch rounds); written straight into the views of `buf` the unit's ops cut it into
    where they are views, else fused and copied. Returns `buf`."""
    import numpy as np

    from convert.plan import ndarrays as nd

    dst = nd.view(buf, unit.dtype, unit_shape(unit, role_shape))
    parts = [nd.cast(roles[r], dtypes[r], unit.dtype) for r in unit.roles]
    if unit.fused is None:
        np.copyto(dst, parts[0])
        return buf
    views = unit.fused.pipeline.split(dst)
    if all(np.may_share_memory(v, dst) for v in views):  # a copy would be a fresh array, sharing nothing
        for v, part in zip(views, parts):
            np.copyto(v, part)
    else:
        np.copyto(dst, unit.fused.pipeline.fuse(parts))
    return buf


def regroup(
    src_units: tuple[Unit, ...],
    bufs: list[bytes | memoryview],
    dst_units: tuple[Unit, ...],
    role_shape: dict[str, tuple[int, ...]],
) -> list[memoryview]:
    """Convert one expert from the source units' bytes to the target units' bytes."""
    roles: dict[str, torch.Tensor] = {}
    for unit, buf in zip(src_units, bufs):
        roles.update(decode(unit, buf, role_shape))
    return [encode(unit, roles) for unit in dst_units]
