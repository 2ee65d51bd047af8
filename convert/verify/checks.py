"""The data checks of the verifier: one expert of one layer at a time, or one pass-through tensor in chunks.

A relation (base weights: convert.verify.base; adapters: a module of their own) describes
each side of an expert layer as an `ExpertSide`: something that loads expert e as
{role: tensor} in one canonical per-expert form. The checks here compare the two sides
role by role: bit for bit where the dtypes agree (bytes were moved), allclose after an
upcast where they differ (a cast happened), or always allclose for derived quantities
such as LoRA deltas. Memory is bounded by one expert (or one chunk) per side.

Speed: the equality checks run at memory speed and do no per-element Python work. Equal
dtypes are compared with memcmp over contiguous memory (a strided view, e.g. a transposed
expert, is first copied into a reused block), on numpy arrays of the elements' bits
(`Raw`): checking a conversion that only moved bytes never imports torch (seconds of
start-up). Torch is imported where values are computed: a cast is checked by casting the
source to the destination dtype block by block (the conversion's own rounding) and
comparing bits, and only when that differs does the allclose comparison at the narrower
precision decide; details of a difference (first differing element, max abs diff) are
computed, with torch, only after one is found. Checks of relations whose sides keep
nothing between experts (`streaming`) read into a per-thread buffer that is reused from one
expert to the next (`reads_into`), so memory stays flat and several experts can be checked
by parallel threads (convert.verify).
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union

import numpy as np

from convert.io.storage import Store
from convert.verify.tables import Raw, Stored, element_size, to_raw

if TYPE_CHECKING:
    from _ctypes import CFuncPtr

    import torch

# What a side loads for one role: the bits of stored data (base weights; no torch), or a tensor (derived values).
Data = Union[Raw, "torch.Tensor"]

CHUNK_BYTES = 8 << 20  # a pass-through tensor is compared in chunks of this many bytes a side
MIN_CHUNK_BYTES = 1 << 20  # ... or fewer, down to this, to hold no more than an expert item (pass_chunks)
BLOCK_BYTES = 2 << 20  # one block of a cast or strided comparison: stays in the CPU caches
ALIGN = 64
TILE = 64  # columns of a transposed block gathered at once (_dense_raw)
FLOATS = ("float64", "float32", "float16", "bfloat16")  # torch dtypes' names (`_name`)


def _load_memcmp() -> CFuncPtr | None:
    """The C library's memcmp (it runs without the GIL), or None where there is none."""
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_memcmp = _load_memcmp()


class _ThreadBuffers(threading.local):
    """Per-thread reusable memory: the read buffer of `reads_into` and scratch blocks."""

    def __init__(self) -> None:
        self.arena: bytearray | None = None
        self.active = False
        self.used = 0
        self.scratch: dict[int, np.ndarray] = {}  # slot -> uint8 block


_buffers = _ThreadBuffers()


@contextmanager
def reads_into(nbytes: int) -> Iterator[None]:
    """Within the block, this thread's `read_stored` calls read into one reused buffer of at least `nbytes`
    (plus alignment) instead of fresh bytes objects; reads beyond it get fresh bytes. The tensors made from
    those reads must not be used after the block: the next block overwrites the buffer."""
    need = nbytes + 64 * ALIGN
    b = _buffers
    if b.arena is None or len(b.arena) < need:
        b.arena = None  # free the old buffer first
        b.arena = bytearray(need)
    b.active, b.used = True, 0
    try:
        yield
    finally:
        b.active, b.used = False, 0


def release_buffers() -> None:
    """Free this thread's reusable buffers (call when its share of the checks is done)."""
    _buffers.arena = None
    _buffers.scratch.clear()


def _block(slot: int, nbytes: int) -> np.ndarray:
    """This thread's reused uninitialised uint8 block of slot `slot`, exactly `nbytes` long."""
    buf = _buffers.scratch.get(slot)
    if buf is None or buf.size < nbytes:
        buf = _buffers.scratch[slot] = np.empty(max(nbytes, BLOCK_BYTES), dtype=np.uint8)
    return buf[:nbytes]


def _scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reused uninitialised tensor of `shape` and `dtype` (one per slot and thread; the memory of `_block`)."""
    import torch

    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(_block(slot, n)).view(dtype).view(shape)


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


def read_stored(storage: Store, t: Stored, start: int = 0, end: int | None = None) -> bytes | memoryview:
    """Bytes [start, end) of the data of stored tensor `t` (default: all of it).

    Inside `reads_into` (this thread) they are read straight into the reused buffer and a view of it
    is returned; otherwise a fresh bytes object.
    """
    end = t.nbytes if end is None else end
    n = end - start
    b = _buffers
    if b.active and b.arena is not None and n > 0 and b.used + n <= len(b.arena):
        view = memoryview(b.arena)[b.used : b.used + n]
        storage.read_into(t.file, t.start + start, view)
        b.used += -(-n // ALIGN) * ALIGN
        return view
    return storage.read_range(t.file, t.start + start, t.start + end)


class ExpertSide(Protocol):
    """One side (source or destination) of one expert layer."""

    def load(self, storage: Store, e: int) -> Mapping[str, tuple[Data, str]]:
        """Expert e as {role: (its data in canonical per-expert form, name of the stored tensor it came from)}."""
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
    # The sides read each expert afresh and keep nothing between experts: their reads may go to a reused
    # buffer and experts may be checked by parallel threads.
    streaming: bool = False

    def item_bytes(self, e: int, roles: tuple[str, ...] | None = None) -> int:
        """Bytes both sides read for expert e, or for its `roles` only (what one check of it holds in memory)."""
        if roles is None:
            return self.src.expert_bytes(e) + self.dst.expert_bytes(e)
        # roles are given only where both sides have role_sets (role_groups), and such sides take them
        return self.src.expert_bytes(e, roles) + self.dst.expert_bytes(e, roles)  # type: ignore[call-arg]


def role_groups(check: ExpertCheck) -> list[tuple[str, ...] | None]:
    """The parts one expert of `check` is compared in: groups of roles that no stored tensor of either side
    splits (a fused gate_up and the per-expert gate and up it holds are one group), so that a thread holds
    one group's bytes of both sides at a time, not the whole expert's. [None] (the whole expert at once)
    where a side cannot load part of an expert (no `role_sets`)."""
    sets: list[tuple[str, ...]] = []
    for side in (check.src, check.dst):
        role_sets = getattr(side, "role_sets", None)
        if role_sets is None:
            return [None]
        sets += role_sets()
    groups: list[set[str]] = []
    for roles in sets:
        merged, rest = set(roles), []
        for g in groups:
            if g & merged:
                merged |= g
            else:
                rest.append(g)
        groups = [*rest, merged]
    return [*sorted(tuple(sorted(g)) for g in groups)] or [None]


@dataclass(frozen=True)
class PassCheck:
    """A tensor that must reach the destination unchanged (up to a dtype cast)."""

    src: Stored
    dst: Stored


def computes(check: ExpertCheck | PassCheck) -> bool:
    """Whether comparing `check` takes torch whatever the data: a cast (the dtypes of a tensor or of an expert
    role differ) or derived values (not `exact`, or sides that are not base weights' `role_dtypes`). Checks of
    moved bytes need it only to describe a difference they find."""
    if isinstance(check, PassCheck):
        return check.src.dtype != check.dst.dtype
    if not check.exact:
        return True
    src, dst = getattr(check.src, "role_dtypes", None), getattr(check.dst, "role_dtypes", None)
    return src is None or dst is None or src() != dst()


def _tolerance(a: torch.dtype, b: torch.dtype) -> tuple[float, float]:
    """rtol/atol for values that went through the narrower of two float dtypes."""
    import torch

    eps = max(torch.finfo(a).eps, torch.finfo(b).eps)
    tiny = max(torch.finfo(a).smallest_normal, torch.finfo(b).smallest_normal)
    return eps, tiny


def _wide(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.double() if t.dtype == torch.float64 else t.float()


def compare(
    a: Data, b: Data, exact: bool = True, rtol: float | None = None, atol: float | None = None,
    origin: int = 0, shape: tuple[int, ...] | None = None, rel_atol: float | None = None,
) -> tuple[str | None, float | None]:
    """Compare source `a` with destination `b`: (None, max abs diff or None) when they agree, else (what
    differs, max abs diff).

    Same dtype and `exact`: the bits must be equal. Otherwise both are upcast and compared with
    allclose (NaN matching NaN) at the tolerance of the narrower dtype, or the `rtol`/`atol` given;
    with `exact` and the default tolerance, a `b` that is bit for bit `a` cast to b's dtype is
    accepted without that comparison (it would pass it).
    `rel_atol` sets atol to that fraction of the largest magnitude of either tensor. The first
    differing element is named by its index in `shape` (default: a's shape), counting from flat
    element `origin` (for chunks of a larger tensor).

    `Raw` data of one dtype whose bits agree is accepted without importing torch; anything else (a
    cast, a difference to describe) is compared as torch tensors.
    """
    if isinstance(a, Raw) and isinstance(b, Raw):
        if a.shape != b.shape:
            return f"shape {list(b.shape)}, expected {list(a.shape)}", None
        if exact and a.dtype == b.dtype and (a.bits.size == 0 or _equal_raw(a.bits, b.bits)):
            return None, 0.0
    a = a.tensor() if isinstance(a, Raw) else a
    b = b.tensor() if isinstance(b, Raw) else b
    return _compare_tensors(a, b, exact, rtol, atol, origin, shape, rel_atol)


def _compare_tensors(
    a: torch.Tensor, b: torch.Tensor, exact: bool, rtol: float | None, atol: float | None, origin: int,
    shape: tuple[int, ...] | None, rel_atol: float | None,
) -> tuple[str | None, float | None]:
    """`compare` of two torch tensors."""
    import torch

    shape = tuple(a.shape) if shape is None else shape

    def _first(differs: torch.Tensor) -> list[int]:
        return _unravel(origin + int(differs.reshape(-1).nonzero()[0]), shape)

    if tuple(a.shape) != tuple(b.shape):
        return f"shape {list(b.shape)}, expected {list(a.shape)}", None
    if a.numel() == 0:
        return None, 0.0
    is_float = _name(a.dtype) in FLOATS and _name(b.dtype) in FLOATS
    if exact and a.dtype == b.dtype:
        if _equal_bits(a, b):
            return None, 0.0
        ab, bb = _bits(a), _bits(b)
        at = _first((ab != bb).any(dim=1))
        if not is_float:
            return f"{_name(b.dtype)} values differ (first at {at})", None
        return f"bytes differ (first at {at})", _max_diff(a, b)
    if exact and is_float and rtol is None and atol is None and rel_atol is None and _cast_matches(a, b):
        return None, None  # b is a cast to its dtype, rounded as torch rounds, with no value out of range
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


def _equal_raw(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two same-shaped arrays of one item size hold the same bits (contiguous: one memcmp, no copy)."""
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return _same_buffer(a, b)
    return all(_same_buffer(_dense_raw(x, 0), _dense_raw(y, 1)) for x, y in _raw_blocks(a, b))


def _raw_blocks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`_blocks` of two numpy arrays: corresponding blocks of about BLOCK_BYTES, in the strided one's memory order."""
    if a.ndim >= 2 and not (a.flags.c_contiguous and b.flags.c_contiguous):
        ref = a if b.flags.c_contiguous else b
        order = sorted(range(ref.ndim), key=lambda d: -ref.strides[d])
        a, b = a.transpose(order), b.transpose(order)
    if a.flags.c_contiguous and b.flags.c_contiguous or a.ndim < 2:
        a, b = a.reshape(-1), b.reshape(-1)  # views where contiguous; 1-d strided views stay views
    row = math.prod(a.shape[1:])
    step = max(1, BLOCK_BYTES // max(1, row * max(a.itemsize, b.itemsize)))
    for i in range(0, a.shape[0], step):
        yield a[i : i + step], b[i : i + step]


def _dense_raw(x: np.ndarray, slot: int) -> np.ndarray:
    """`x` if contiguous, else its copy in a reused scratch block (numpy copies without the GIL). A transposed
    `x` (its last dim strides furthest) is gathered TILE columns at a time: the source lines those columns
    touch stay in the L1 cache from one row to the next (2.5x a plain copy of a transposed bf16 expert)."""
    if x.flags.c_contiguous:
        return x
    out = _block(slot, x.nbytes).view(x.dtype).reshape(x.shape)
    if x.ndim >= 2 and x.strides[-1] > x.strides[-2] and x.shape[-1] > TILE:
        for j in range(0, x.shape[-1], TILE):
            np.copyto(out[..., j : j + TILE], x[..., j : j + TILE])
    else:
        np.copyto(out, x)
    return out


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    """Bytewise equality of two contiguous arrays of the same byte size."""
    if _memcmp is not None:
        return a.nbytes == 0 or _memcmp(a.ctypes.data, b.ctypes.data, a.nbytes) == 0
    return bool(np.array_equal(a, b))


def _blocks(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Corresponding blocks of two same-shaped tensors, each about BLOCK_BYTES: flat element ranges of
    contiguous tensors, else runs of the leading dimension, with both tensors' dimensions first put in the
    memory order of the strided one (a transposed expert is then gathered along its rows, not its columns)."""
    if a.dim() >= 2 and not (a.is_contiguous() and b.is_contiguous()):
        ref = a if b.is_contiguous() else b
        strides = ref.stride()
        order = sorted(range(ref.dim()), key=lambda d: -strides[d])
        a, b = a.permute(order), b.permute(order)
    if a.is_contiguous() and b.is_contiguous() or a.dim() < 2:
        a, b = a.reshape(-1), b.reshape(-1)  # views where contiguous; 1-d strided views stay views
    row = math.prod(a.shape[1:])
    step = max(1, BLOCK_BYTES // max(1, row * max(a.element_size(), b.element_size())))
    for i in range(0, a.shape[0], step):
        yield a[i : i + step], b[i : i + step]


def _dense(t: torch.Tensor, slot: int) -> torch.Tensor:
    """`t` if contiguous, else its copy in a reused scratch block."""
    return t if t.is_contiguous() else _scratch(slot, tuple(t.shape), t.dtype).copy_(t)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bytewise equality of two contiguous tensors of the same byte size."""
    import torch

    n = a.numel() * a.element_size()
    if _memcmp is not None:
        return _memcmp(a.data_ptr(), b.data_ptr(), n) == 0
    return _same_bytes(a.reshape(-1).view(torch.uint8).reshape(-1, 1), b.reshape(-1).view(torch.uint8).reshape(-1, 1))


def _equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two same-shaped tensors of one dtype hold the same bits (contiguous: one memcmp, no copy)."""
    if a.is_contiguous() and b.is_contiguous():
        return _same_memory(a, b)
    return all(_same_memory(_dense(x, 0), _dense(y, 1)) for x, y in _blocks(a, b))


def _cast_matches(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when float `b` is bit for bit `a` cast to b's dtype (as torch rounds) and no finite value of `a`
    overflowed to infinity. Such a `b` is allclose to `a` at the narrower dtype's precision; any other `b`
    (another rounding, an overflow, a wrong value) goes to the allclose comparison, which decides."""
    import torch

    overflow = torch.finfo(b.dtype).max < torch.finfo(a.dtype).max
    for x, y in _blocks(a, b):
        want = _scratch(0, tuple(y.shape), b.dtype).copy_(x)
        got = _dense(y, 1)
        if not _same_memory(want, got):
            return False
        if overflow and bool(torch.isinf(got).any()) and not bool(torch.isinf(x).eq(torch.isinf(got)).all()):
            return False
    return True


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of `t`, one row per element."""
    import torch

    flat = t.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # a view of size-1 dims may keep any stride
        flat = flat.new_empty(flat.shape).copy_(flat)
    return flat.contiguous().view(torch.uint8).reshape(t.numel(), -1)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bytewise equality of two [n, itemsize] uint8 tensors, compared in the widest integer words that fit."""
    import torch

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
    import torch

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
    seconds: float = 0.0  # this rank's time comparing data
    threads: int = 1  # threads that compared data on this rank

    def add(self, m: Mismatch) -> None:
        if len(self.mismatches) < self.limit:
            self.mismatches.append(m)
        else:
            self.dropped += 1

    def merge(self, other: Tally) -> None:
        """Add what `other` (a part of this rank's work) checked and found, after what this one has."""
        for m in other.mismatches:
            self.add(m)
        self.dropped += other.dropped
        self.bytes_compared += other.bytes_compared
        self.experts_checked += other.experts_checked
        self.tensors_checked += other.tensors_checked


def run_expert(check: ExpertCheck, src: Store, dst: Store, e: int, tally: Tally,
               roles: tuple[str, ...] | None = None, count: bool = True) -> None:
    """Compare expert e of one layer, role by role (a streaming check reads into this thread's reused buffer).

    `roles`: only those (one of role_groups(check)); `count`: count the expert as checked (once per expert).
    """
    if check.streaming:
        with reads_into(check.item_bytes(e, roles)):
            _run_expert(check, src, dst, e, tally, roles, count)
    else:
        _run_expert(check, src, dst, e, tally, roles, count)


def _run_expert(check: ExpertCheck, src: Store, dst: Store, e: int, tally: Tally,
                roles: tuple[str, ...] | None, count: bool) -> None:
    if roles is None:
        a, b = check.src.load(src, e), check.dst.load(dst, e)
    else:
        # as in ExpertCheck.item_bytes: sides with role_sets, which take roles
        a, b = check.src.load(src, e, roles), check.dst.load(dst, e, roles)  # type: ignore[call-arg]
    tally.bytes_compared += check.item_bytes(e, roles)
    tally.experts_checked += int(count)
    for role in sorted(set(a) | set(b)):
        name = b[role][1] if role in b else a[role][1]
        if role not in b:
            tally.add(Mismatch(name, f"role {role} of the source ({a[role][1]}) is missing in the destination", e))
            continue
        if role not in a:
            tally.add(Mismatch(name, f"role {role} has no counterpart in the source", e))
            continue
        if a[role][0] is None:  # no LoRA in the source: the destination's must be exactly zero (adapters: torch)
            import torch

            got = b[role][0]
            assert isinstance(got, torch.Tensor)  # the sides of adapters load tensors
            what, diff = compare(torch.zeros_like(got), got, True)
        else:
            what, diff = compare(a[role][0], b[role][0], check.exact, check.rtol, check.atol, rel_atol=check.rel_atol)
        if what:
            tally.add(Mismatch(name, f"{role} (source {a[role][1]}): {what}", e, diff))


def pass_chunks(check: PassCheck, item_cap: int | None = None) -> list[tuple[int, int]]:
    """The flat element ranges [i, j) a pass-through tensor is compared in (each at most CHUNK_BYTES a side,
    and with `item_cap` at most half of it a side, down to MIN_CHUNK_BYTES: no chunk holds more than the
    largest expert item); empty when the shapes differ (nothing to compare)."""
    s, d = check.src, check.dst
    if s.shape != d.shape or not element_size(s.dtype):
        return []
    n = s.nbytes // element_size(s.dtype)
    side = CHUNK_BYTES if item_cap is None else min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, item_cap // 2))
    step = max(1, side // max(element_size(s.dtype), element_size(d.dtype)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def chunk_bytes(check: PassCheck, i: int, j: int) -> int:
    """Bytes both sides read for elements [i, j) of a pass-through tensor."""
    return (j - i) * (element_size(check.src.dtype) + element_size(check.dst.dtype))


def run_pass_chunk(check: PassCheck, src: Store, dst: Store, i: int, j: int, tally: Tally) -> bool:
    """Compare elements [i, j) of a pass-through tensor (into this thread's reused buffer); False on a mismatch."""
    s, d = check.src, check.dst
    with reads_into(chunk_bytes(check, i, j)):
        a = to_raw(read_stored(src, s, i * element_size(s.dtype), j * element_size(s.dtype)), s.dtype, (j - i,))
        b = to_raw(read_stored(dst, d, i * element_size(d.dtype), j * element_size(d.dtype)), d.dtype, (j - i,))
        tally.bytes_compared += chunk_bytes(check, i, j)
        what, diff = compare(a, b, origin=i, shape=s.shape)
    if what:
        tally.add(Mismatch(d.name, what, None, diff))
        return False
    return True


def pass_shape_problem(check: PassCheck) -> Mismatch | None:
    """The mismatch of a pass-through tensor whose shape changed, else None."""
    s, d = check.src, check.dst
    if s.shape != d.shape:
        return Mismatch(d.name, f"shape {list(d.shape)}, expected {list(s.shape)} (source {s.name})")
    return None


def run_pass(check: PassCheck, src: Store, dst: Store, tally: Tally) -> None:
    """Compare a pass-through tensor chunk by chunk (flat element ranges); reports the first differing chunk."""
    tally.tensors_checked += 1
    problem = pass_shape_problem(check)
    if problem:
        tally.add(problem)
        return
    for i, j in pass_chunks(check):
        if not run_pass_chunk(check, src, dst, i, j, tally):
            return
