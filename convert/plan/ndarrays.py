"""Safetensors bytes as numpy arrays, and the exact float conversions a merge needs, without torch.

numpy has no bfloat16 or float8: such tensors are held as their raw bits (uint16, uint8: `STORAGE`) and
converted here by integer ops that give torch's own conversions bit for bit: bf16 -> float32 (the bits moved up
16), float32 -> bf16 (round to nearest, ties to even; NaN -> 0xFFFF, as torch's vectorized cast), FP8 ->
float32 (Fp8Bits: the byte's fields moved into place, subnormals included, NaN/inf codes fixed up where present)
and float32 -> FP8 (as c10's fp8e4m3fn/fp8e5m2 from_fp32_value: rounded at the FP8 mantissa's last bit with the
exponent rebased; below the smallest normal the value plus a power of two leaves the code in the float32's
mantissa, rounded there by the float addition; NaN -> 0x7F, larger magnitudes -> 448 (e4m3fn, saturating as
torch 2.11-2.13 does) or inf (e5m2), the sign kept).
float16, float32 and float64 are numpy's own, whose conversions round to nearest even as torch's do.

Importing this module costs numpy's import only (0.07 s, against 1-6 s for torch's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np  # after convert.plan's OPENBLAS_NUM_THREADS default (the package is imported first)

from convert.formats.safetensors import numel
from convert.io.memory import thread_scratch


@dataclass(frozen=True)
class Fp8Bits:
    """How an FP8 format's byte becomes float32 bits by integer ops: the byte, sign-extended to int32 and
    shifted left by `shift`, masked by `mask`, is a float32 of the value times 2**-`unbias` (subnormal codes
    included: both formats' subnormals are float32 subnormals there, exactly); codes above `max_finite` are
    NaN or inf, which this spelling does not give."""

    shift: int
    mask: int
    unbias: int
    max_finite: float
    top_code: int  # what torch's float32 -> FP8 conversion gives every larger magnitude (inf included)


# s eeee mmm, bias 7 (the exponent lands at float32's bit 23); saturating: 448 for anything larger
E4M3FN_BITS = Fp8Bits(20, 0x87F00000 - (1 << 32), 120, 448.0, 0x7E)
E5M2_BITS = Fp8Bits(21, 0x8FE00000 - (1 << 32), 112, 57344.0, 0x7C)  # s eeeee mm, bias 15; inf above

# safetensors dtype -> the numpy dtype its elements are held in (raw bits for bf16 and the FP8 formats)
STORAGE: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8,
}
FP8_BITS = {"F8_E4M3": E4M3FN_BITS, "F8_E5M2": E5M2_BITS}
NATIVE_FLOATS = ("F64", "F32", "F16")
CAST_FROM = frozenset({"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})
CAST_TO = frozenset({"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_BF16_NAN = 0xFFFF  # torch's vectorized conversion's NaN (c10's scalar one gives 0x7FC0)
_E8M0_NAN = 0xFF


_BLAS_THREAD_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                        "openblas_set_num_threads64_", "openblas_set_num_threads")


@functools.cache
def single_threaded_blas() -> bool:
    """Give numpy's BLAS (the OpenBLAS numpy's wheels bundle) one thread in this process, whatever the environment
    said when numpy was imported: a merge's products run on the executor's workers, one per core, and OpenBLAS
    cuts a product differently for more threads, which can change a result's last bit; with one thread the
    bytes of a merge do not depend on the rank count. Returns whether it found OpenBLAS (False: another BLAS,
    left as it is)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return False
    found = False
    for path in paths:  # every OpenBLAS loaded (numpy's, and another library's where one brings its own)
        lib = ctypes.CDLL(path)
        setter = next((getattr(lib, n) for n in _BLAS_THREAD_SETTERS if hasattr(lib, n)), None)
        if setter is not None:
            setter(1)
            found = True
    return found


SMALL_GEMM = 1 << 19  # m * n * k of a product OpenBLAS computes by its small-matrix kernels (2x faster at k = 16)


def matmul_into(b: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`b @ a` (float32 [m, k] and [k, n]) into `out` [m, n], in calls of rows small enough for OpenBLAS's
    small-matrix kernels (SMALL_GEMM), which at a LoRA's rank take half the time of its blocked ones for the same
    products; the split depends on the shapes alone, so it is the same on every rank (same bytes at any rank
    count; tests compare the bytes with torch's own product)."""
    m, k = b.shape
    step = max(1, SMALL_GEMM // max(1, k * a.shape[1]))
    if step >= m:
        return np.matmul(b, a, out=out)
    for i in range(0, m, step):
        np.matmul(b[i : i + step], a, out=out[i : i + step])
    return out


def view(buf: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """`buf` as an array of safetensors `dtype` (its STORAGE) and `shape`, without a copy (read-only where
    `buf` is)."""
    if numel(shape) == 0:
        return np.empty(shape, dtype=STORAGE[dtype])
    return np.frombuffer(buf, dtype=STORAGE[dtype], count=numel(shape)).reshape(shape)


def scratch(shape: tuple[int, ...], dtype: Any, slot: int) -> np.ndarray:
    """An array of `shape` and numpy `dtype` in this thread's scratch `slot` (convert.io.memory.thread_scratch:
    valid until the thread's next request for that slot)."""
    n = numel(shape)
    if n == 0:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(thread_scratch(n * np.dtype(dtype).itemsize, slot), dtype=dtype, count=n).reshape(shape)


def empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A new array for `shape` elements of safetensors `dtype`."""
    return np.empty(shape, dtype=STORAGE[dtype])


def as_bytes(x: np.ndarray) -> memoryview:
    """The raw little-endian bytes of `x` (a contiguous copy only where it is not contiguous)."""
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8).data


def float32_into(x: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """The float32 values of `x` (elements of safetensors float `dtype`, as STORAGE holds them; any strides) into
    float32 `out` of x's shape, exactly as torch converts them."""
    if dtype in NATIVE_FLOATS:
        np.copyto(out, x, casting="unsafe")
    elif dtype == "BF16":
        bits = out.view(np.uint32)
        np.copyto(bits, x, casting="unsafe")
        np.left_shift(bits, np.uint32(16), out=bits)
    elif dtype in FP8_BITS:
        fp8_decode_into(x, FP8_BITS[dtype], out)
        out *= np.float32(2.0 ** FP8_BITS[dtype].unbias)
    elif dtype == "F8_E8M0":
        bits = out.view(np.uint32)
        np.copyto(bits, x, casting="unsafe")
        e8m0_values_into(bits, out)
    else:
        raise ValueError(f"no float32 values for dtype {dtype}")


def to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32_into, into a new array (x itself where it is float32 already)."""
    if dtype == "F32":
        return x
    out = np.empty(x.shape, dtype=np.float32)
    float32_into(x, dtype, out)
    return out


def e8m0_values_into(codes: np.ndarray, out: np.ndarray) -> None:
    """float32 values 2**(code - 127) of E8M0 codes held widened in uint32 `codes` (they may be `out`'s own bits),
    NaN for code 255 (torch's bits, 0x7F800001); code 0 is 2**-127, a float32 subnormal."""
    nan = codes == _E8M0_NAN
    low = codes == 0
    bits = out.view(np.uint32)
    np.left_shift(codes, np.uint32(23), out=bits)
    if low.any():
        bits[low] = 1 << 22
    if nan.any():
        bits[nan] = 0x7F800001


def fp8_decode_into(codes: np.ndarray, bits: Fp8Bits, out: np.ndarray, finite: bool = False) -> None:
    """FP8 codes `codes` (uint8, any strides) as float32 values times 2**-bits.unbias, into float32 `out` (exact,
    subnormal codes included: a float32 subnormal there); NaN and inf codes give NaN and inf (`finite`: the
    caller knows there are none, codes it just wrote from finite values, and they are not looked for)."""
    ints = out.view(np.int32)
    np.copyto(ints, codes.view(np.int8), casting="unsafe")
    np.left_shift(ints, np.int32(bits.shift), out=ints)
    np.bitwise_and(ints, np.int32(bits.mask), out=ints)
    if not finite and out.size:
        limit = bits.max_finite * 2.0**-bits.unbias  # a NaN/inf code's spelling is beyond it
        if not (float(out.max()) <= limit and float(out.min()) >= -limit):  # reductions: no temporary
            _fix_special_codes(codes, bits, out)


def _fix_special_codes(codes: np.ndarray, bits: Fp8Bits, out: np.ndarray) -> None:
    """NaN and +-inf where `codes` hold them, over their integer-op spelling, with torch's bits: the sign, an
    all-ones exponent, the code's mantissa moved up and, for NaN, the quiet bit (e4m3fn 0x7F -> 0x7FF00000)."""
    mant = 23 - bits.shift
    top = (0x7F >> mant) << mant  # the code's all-ones exponent field
    special = np.flatnonzero((codes & np.uint8(top)).reshape(-1) == top)
    if bits is E4M3FN_BITS:  # e4m3fn has no inf and one NaN, mantissa 111
        special = special[(codes.reshape(-1)[special] & 0x7) == 0x7]
    c = codes.reshape(-1)[special].astype(np.uint32)
    m = c & np.uint32((1 << mant) - 1)
    quiet = np.where((m != 0) | np.bool_(bits is E4M3FN_BITS), np.uint32(0x400000), np.uint32(0))
    value = ((c & np.uint32(0x80)) << np.uint32(24)) | np.uint32(0x7F800000) | (m << np.uint32(bits.shift)) | quiet
    out[np.unravel_index(special, codes.shape)] = value.view(np.float32)  # `out` of any strides


def bf16_into(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """bfloat16 bits (uint16 `out`) of float32 `x`, rounded to nearest even, NaN as 0xFFFF; `tmp`: a uint32
    array of x's shape."""
    u = x.view(np.uint32)
    np.right_shift(u, np.uint32(16), out=tmp)
    np.bitwise_and(tmp, np.uint32(1), out=tmp)
    np.add(tmp, np.uint32(0x7FFF), out=tmp)
    np.add(tmp, u, out=tmp)
    np.right_shift(tmp, np.uint32(16), out=out, casting="unsafe")
    if x.size and np.isnan(x.max()):  # a reduction (NaN propagates): no temporary where there is none
        out[np.isnan(x)] = _BF16_NAN


def _sign_bit(xs: np.ndarray) -> np.ndarray:
    """The FP8 sign bit (0x80 or 0) of each float32 in `xs`, as uint8."""
    return ((xs.view(np.uint32) >> np.uint32(24)) & np.uint32(0x80)).astype(np.uint8)


def fp8_encode_into(x: np.ndarray, bits: Fp8Bits, out: np.ndarray, tmp: list[np.ndarray]) -> None:
    """FP8 codes (uint8 `out`) of float32 `x`, as torch converts them (see the module's docstring): fp8_round_into,
    then the few magnitudes that round past the largest finite value (inf included) given `bits.top_code` and
    NaN 0x7F, the sign kept; `tmp`: three uint32 arrays of x's shape."""
    rounded = tmp[0].view(np.float32)
    fp8_round_into(x, bits, out, rounded, [tmp[1], tmp[2].view(np.uint8)[..., ::4]])
    np.abs(rounded, out=rounded)
    beyond = ~(rounded <= np.float32(bits.max_finite))
    if x.size and np.isnan(x.max()):  # a NaN's rounded bits may wrap around to anything
        beyond |= np.isnan(x)
    special = np.flatnonzero(beyond)
    if special.size:
        at = np.unravel_index(special, x.shape)
        xs = x[at]
        code = np.where(np.isnan(xs), np.uint8(0x7F), np.uint8(bits.top_code))
        out[at] = code | _sign_bit(xs)


def fp8_round_into(x: np.ndarray, bits: Fp8Bits, codes: np.ndarray, rounded: np.ndarray,
                   tmp: list[np.ndarray]) -> None:
    """float32 `x` rounded to the nearest FP8 value, ties to even, as torch rounds: the codes into uint8 `codes` and
    the values they stand for into float32 `rounded` (no decoding needed), for every finite |x| up to the largest
    finite value (what a requantization divides out; fp8_encode_into gives the codes of the others); `tmp`: a
    uint32 and a uint8 array of x's shape (any arrays of x's shape: strides are free). Normal results round x's
    own bits at the FP8 mantissa's last bit; the few below the smallest normal (zeros too) are fixed up one by one
    by c10's float addition."""
    u = x.view(np.uint32)
    r = rounded.view(np.uint32)
    t, sign = tmp
    mant = 23 - bits.shift
    np.right_shift(u, np.uint32(bits.shift), out=r)
    np.bitwise_and(r, np.uint32(1), out=r)
    np.add(r, u, out=r)
    np.add(r, np.uint32((1 << (bits.shift - 1)) - 1), out=r)
    np.bitwise_and(r, np.uint32((0xFFFFFFFF >> bits.shift) << bits.shift), out=r)  # x rounded, sign kept
    np.right_shift(r, np.uint32(bits.shift), out=t)
    np.subtract(t, np.uint32(bits.unbias << mant), out=codes, casting="unsafe")
    np.bitwise_and(codes, np.uint8(0x7F), out=codes)
    np.right_shift(r, np.uint32(24), out=sign, casting="unsafe")
    np.bitwise_and(sign, np.uint8(0x80), out=sign)
    np.bitwise_or(codes, sign, out=codes)
    magnitude = t.view(np.float32)
    np.abs(x, out=magnitude)
    small = np.flatnonzero(magnitude < np.uint32((bits.unbias + 1) << 23).view(np.float32))  # below 2**(1 - bias)
    if small.size:
        at = np.unravel_index(small, x.shape)
        xs = x[at]
        denorm_bits = np.uint32((bits.unbias + bits.shift + 1) << 23)
        s = np.abs(xs) + denorm_bits.view(np.float32)  # the addition rounds onto the FP8 subnormal grid
        code = (s.view(np.uint32) - denorm_bits).astype(np.uint8)
        codes[at] = code | _sign_bit(xs)
        rounded[at] = np.copysign(s - denorm_bits.view(np.float32), xs)


def float32_to_into(x: np.ndarray, dtype: str, out: np.ndarray, tmp: list[np.ndarray] | None = None) -> None:
    """float32 `x` as safetensors float `dtype` into `out` (its STORAGE, x's shape), rounded once as torch rounds;
    `tmp`: three uint32 arrays of x's shape for the bit conversions (allocated where None)."""
    if dtype in NATIVE_FLOATS:
        with np.errstate(over="ignore"):  # float16's overflow is inf, as torch's
            np.copyto(out, x, casting="unsafe")
        return
    if tmp is None:
        tmp = [np.empty(x.shape, dtype=np.uint32) for _ in range(3)]
    if dtype == "BF16":
        bf16_into(x, out, tmp[0])
    elif dtype in FP8_BITS:
        fp8_encode_into(x, FP8_BITS[dtype], out, tmp)
    else:
        raise ValueError(f"no conversion of float32 to dtype {dtype}")


def casts(dtype: str, out_dtype: str) -> bool:
    """Whether `cast` converts `dtype` to `out_dtype` (exactly as torch does: through float32, which holds every
    value of the source; float64 only to and from float32, the others would be rounded twice)."""
    return dtype == out_dtype or (dtype in CAST_FROM and out_dtype in CAST_TO) or {dtype, out_dtype} == {"F64", "F32"}


def cast(x: np.ndarray, dtype: str, out_dtype: str) -> np.ndarray:
    """Elements `x` of safetensors float `dtype` as `out_dtype` (a new array; `x` where the two are one), for the
    pairs `casts` allows."""
    if dtype == out_dtype:
        return x
    out = np.empty(x.shape, dtype=STORAGE[out_dtype])
    if dtype == "F64":
        np.copyto(out, x, casting="unsafe")
    else:
        float32_to_into(to_float32(x, dtype), out_dtype, out)
    return out


def fp8_scaled_into(codes: np.ndarray, dtype: str, per_col: np.ndarray, bn: int, out: np.ndarray,
                    finite: bool = False) -> None:
    """Values of FP8 rows `codes` [n, cols] (any strides: a tile of wider rows) times their column block's float32
    scale `per_col` [ceil(cols / bn)], each product rounded once, into float32 `out` [n, cols]; 2**unbias is
    folded into the scale where that product stays finite (one pass fewer, same values); `finite` as for
    fp8_decode_into."""
    bits = FP8_BITS[dtype]
    fp8_decode_into(codes, bits, out, finite)
    factor = np.float32(2.0**bits.unbias)
    if per_col.size and float(np.abs(per_col).max()) * float(factor) >= 2.0**127:
        out *= factor
    else:
        per_col = per_col * factor
    scale_column_blocks(out, per_col, bn, np.multiply, out)


def scale_column_blocks(x: np.ndarray, per_col: np.ndarray, bn: int, fn: Any, out: np.ndarray) -> None:
    """`fn` (np.multiply or np.divide) of each column block of rows `x` [n, cols] by its entry of `per_col`
    [ceil(cols / bn)] (a ragged last block included), into `out` (x's shape; x itself allowed)."""
    n, m = x.shape
    full = m // bn
    if full:
        fn(x[:, : full * bn].reshape(n, full, bn), per_col[:full, None],
           out=out[:, : full * bn].reshape(n, full, bn))
    if full * bn < m:
        fn(x[:, full * bn :], per_col[full], out=out[:, full * bn :])
