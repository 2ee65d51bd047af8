"""The data checks of the verifier: one expert of one layer at a time, or one pass-through tensor in chunks.

A relation (base weights: convert.verify.base; adapters: a module of their own) describes
each side of an expert layer as an `ExpertSide`: something that loads expert e as
{role: tensor} in one canonical per-expert form. The checks here compare the two sides
role by role: bit for bit where the dtypes agree (bytes were moved), allclose after an
upcast where they differ (a cast happened), or always allclose for derived quantities
such as LoRA deltas. Memory is bounded by one expert (or one chunk) per side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from convert.io.storage import Storage
from convert.verify.tables import Stored, element_size, to_tensor

CHUNK_BYTES = 16 << 20
FLOATS = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


@dataclass(frozen=True)
class Mismatch:
    """One finding: the tensor (destination name where there is one), the expert, what differs, by how much."""

    tensor: str
    what: str
    expert: int | None = None
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        where = self.tensor + (f" expert {self.expert}" if self.expert is not None else "")
        diff = f" (max abs diff {self.max_abs_diff:.6g})" if self.max_abs_diff is not None else ""
        return f"{where}: {self.what}{diff}" if where else f"{self.what}{diff}"


def read_stored(storage: Storage, t: Stored, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end) of the data of stored tensor `t` (default: all of it)."""
    end = t.nbytes if end is None else end
    return storage.read_range(t.file, t.start + start, t.start + end)


class ExpertSide(Protocol):
    """One side (source or destination) of one expert layer."""

    def load(self, storage: Storage, e: int) -> dict[str, tuple[torch.Tensor, str]]:
        """Expert e as {role: (tensor in canonical per-expert form, name of the stored tensor it came from)}."""
        ...

    def expert_bytes(self, e: int) -> int:
        """Bytes read to load expert e."""
        ...


@dataclass(frozen=True)
class ExpertCheck:
    """Compare every expert of one layer between source and destination.

    `exact`: compare bits where dtypes agree (weights); False: always allclose (derived deltas).
    """

    layer: str
    num_experts: int
    src: ExpertSide
    dst: ExpertSide
    exact: bool = True
    rtol: float | None = None
    atol: float | None = None
    rel_atol: float | None = None  # atol as a fraction of the largest magnitude on either side


@dataclass(frozen=True)
class PassCheck:
    """A tensor that must reach the destination unchanged (up to a dtype cast)."""

    src: Stored
    dst: Stored


def _tolerance(a: torch.dtype, b: torch.dtype) -> tuple[float, float]:
    """rtol/atol for values that went through the narrower of two float dtypes."""
    eps = max(torch.finfo(a).eps, torch.finfo(b).eps)
    tiny = max(torch.finfo(a).smallest_normal, torch.finfo(b).smallest_normal)
    return eps, tiny


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def compare(
    a: torch.Tensor, b: torch.Tensor, exact: bool = True, rtol: float | None = None, atol: float | None = None,
    origin: int = 0, shape: tuple[int, ...] | None = None, rel_atol: float | None = None,
) -> tuple[str | None, float | None]:
    """Compare source `a` with destination `b`: (None, diff) when they agree, else (what differs, max abs diff).

    Same dtype and `exact`: the bits must be equal. Otherwise both are upcast and compared with
    allclose (NaN matching NaN) at the tolerance of the narrower dtype, or the `rtol`/`atol` given.
    `rel_atol` sets atol to that fraction of the largest magnitude of either tensor. The first
    differing element is named by its index in `shape` (default: a's shape), counting from flat
    element `origin` (for chunks of a larger tensor).
    """
    shape = tuple(a.shape) if shape is None else shape

    def _first(differs: torch.Tensor) -> list[int]:
        return _unravel(origin + int(differs.reshape(-1).nonzero()[0]), shape)

    if tuple(a.shape) != tuple(b.shape):
        return f"shape {list(b.shape)}, expected {list(a.shape)}", None
    if a.numel() == 0:
        return None, 0.0
    is_float = a.dtype in FLOATS and b.dtype in FLOATS
    if exact and a.dtype == b.dtype:
        ab, bb = _bits(a), _bits(b)
        if _same_bytes(ab, bb):
            return None, 0.0
        at = _first((ab != bb).any(dim=1))
        if not is_float:
            return f"{_name(b.dtype)} values differ (first at {at})", None
        return f"bytes differ (first at {at})", _max_diff(a, b)
    if not is_float:
        if a.dtype != b.dtype:
            return f"dtype {_name(b.dtype)} where the source has {_name(a.dtype)} (only floats may be cast)", None
        return (None, 0.0) if torch.equal(a, b) else (f"values differ (first at {_first(a != b)})", None)
    if rtol is None or atol is None:
        rt, at_ = _tolerance(a.dtype, b.dtype)
        rtol, atol = rtol if rtol is not None else rt, atol if atol is not None else at_
    wa, wb = _wide(a), _wide(b)
    if rel_atol is not None:
        atol = rel_atol * float(torch.maximum(wa.abs().max(), wb.abs().max()).nan_to_num(0.0))
    diff = _max_diff(a, b)
    close = torch.isclose(wa, wb, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return None, diff
    change = f"{_name(a.dtype)} -> {_name(b.dtype)}" if a.dtype != b.dtype else _name(a.dtype)
    return f"not allclose (rtol {rtol:.3g}, atol {atol:.3g}; {change}; first at {_first(~close)})", diff


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of `t`, one row per element."""
    flat = t.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # a view of size-1 dims may keep any stride
        flat = flat.new_empty(flat.shape).copy_(flat)
    return flat.contiguous().view(torch.uint8).reshape(t.numel(), -1)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bytewise equality of two [n, itemsize] uint8 tensors, compared in the widest integer words that fit."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    for word, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if fa.numel() % word == 0:
            return torch.equal(fa.view(dtype), fb.view(dtype))  # ~30x faster than byte by byte
    return torch.equal(fa, fb)


def _unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    """The index in `shape` of flat element `flat`."""
    out = []
    for d in reversed(tuple(shape)):
        out.append(flat % d)
        flat //= d
    return out[::-1]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (_wide(a) - _wide(b)).abs()
    d = d[~torch.isnan(d)]
    return float(d.max()) if d.numel() else float("nan")


@dataclass
class Tally:
    """What one rank checked and found."""

    mismatches: list[Mismatch]
    bytes_compared: int = 0
    experts_checked: int = 0
    tensors_checked: int = 0
    dropped: int = 0  # mismatches beyond the report limit
    limit: int = 200
    peak_rss: int = 0  # this rank's peak resident set size in bytes, from the OS

    def add(self, m: Mismatch) -> None:
        if len(self.mismatches) < self.limit:
            self.mismatches.append(m)
        else:
            self.dropped += 1


def run_expert(check: ExpertCheck, src: Storage, dst: Storage, e: int, tally: Tally) -> None:
    """Compare expert e of one layer, role by role."""
    a = check.src.load(src, e)
    b = check.dst.load(dst, e)
    tally.bytes_compared += check.src.expert_bytes(e) + check.dst.expert_bytes(e)
    tally.experts_checked += 1
    for role in sorted(set(a) | set(b)):
        name = b[role][1] if role in b else a[role][1]
        if role not in b:
            tally.add(Mismatch(name, f"role {role} of the source ({a[role][1]}) is missing in the destination", e))
            continue
        if role not in a:
            tally.add(Mismatch(name, f"role {role} has no counterpart in the source", e))
            continue
        what, diff = compare(a[role][0], b[role][0], check.exact, check.rtol, check.atol, rel_atol=check.rel_atol)
        if what:
            tally.add(Mismatch(name, f"{role} (source {a[role][1]}): {what}", e, diff))


def run_pass(check: PassCheck, src: Storage, dst: Storage, tally: Tally) -> None:
    """Compare a pass-through tensor chunk by chunk (flat element ranges)."""
    s, d = check.src, check.dst
    tally.tensors_checked += 1
    if s.shape != d.shape:
        tally.add(Mismatch(d.name, f"shape {list(d.shape)}, expected {list(s.shape)} (source {s.name})"))
        return
    n = s.nbytes // element_size(s.dtype) if element_size(s.dtype) else 0
    step = max(1, CHUNK_BYTES // max(element_size(s.dtype), element_size(d.dtype)))
    for i in range(0, n, step):
        j = min(n, i + step)
        a = to_tensor(read_stored(src, s, i * element_size(s.dtype), j * element_size(s.dtype)), s.dtype, (j - i,))
        b = to_tensor(read_stored(dst, d, i * element_size(d.dtype), j * element_size(d.dtype)), d.dtype, (j - i,))
        tally.bytes_compared += (j - i) * (element_size(s.dtype) + element_size(d.dtype))
        what, diff = compare(a, b, origin=i, shape=s.shape)
        if what:  # report the first differing chunk only
            tally.add(Mismatch(d.name, what, None, diff))
            return
