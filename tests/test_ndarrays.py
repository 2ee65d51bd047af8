"""convert.plan.ndarrays (the merge's torch-free float conversions) against torch's own, bit for bit; the family
ops on numpy arrays against the same ops on torch tensors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from convert.families.ops import Pipeline, op_from_json
from convert.plan import ndarrays as nd
from convert.plan.transforms import Unit, decode_arrays, encode_arrays_into

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
         "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}


def _bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of `t` as ndarrays holds its dtype."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().view(
        {1: np.uint8, 2: np.uint16, 4: np.uint32}[t.element_size()])


def _every_value(dtype: str) -> np.ndarray:
    """Every bit pattern of a 1- or 2-byte `dtype`, as ndarrays holds it."""
    return np.arange(1 << (8 * np.dtype(nd.STORAGE[dtype]).itemsize), dtype=nd.STORAGE[dtype])


def _float32_samples() -> np.ndarray:
    """float32 values across the whole range: random magnitudes from 1e-45 to 1e38 of both signs, the ties between
    consecutive FP8 and bf16 values (and a bit above and below each), zeros, infinities, NaNs."""
    rng = np.random.default_rng(0)
    x = [rng.standard_normal(1 << 17) * 10.0 ** rng.integers(-45, 38, 1 << 17)]
    for dtype in ("F8_E4M3", "F8_E5M2", "BF16"):
        v = torch.from_numpy(_bits_of_all(dtype)).view(TORCH[dtype]).float().numpy()
        v = np.unique(v[np.isfinite(v)])
        mid = ((v[1:].astype(np.float64) + v[:-1]) / 2).astype(np.float32)
        x += [v, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))]
    x.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 448, 464, 470, 480, 500, 1e30, -1e30, 57344,
                       61439, 61440, 65536], dtype=np.float64))
    x.append(np.array([0xFFFFFFFF, 0x7FFFFFFF, 0xFF800001], dtype=np.uint32).view(np.float32))  # NaN payloads
    return np.concatenate([v.astype(np.float32) for v in x])


def _bits_of_all(dtype: str) -> np.ndarray:
    width = np.dtype(nd.STORAGE[dtype]).itemsize
    return np.arange(1 << (8 * width), dtype={1: np.uint8, 2: np.int16}[width])


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F8_E4M3", "F8_E5M2"])
def test_float32_to_dtype_gives_torchs_bits(dtype):
    """float32 -> bf16 / fp16 / e4m3fn / e5m2: torch's rounding (to nearest, ties to even; subnormals; e4m3fn
    saturating at 448, e5m2 to inf) for every sample; NaN stays NaN (FP8: torch's code, sign kept)."""
    x = _float32_samples()
    got = nd.empty(x.shape, dtype)
    nd.float32_to_into(x, dtype, got)
    want = _bits(torch.from_numpy(x).to(TORCH[dtype]))
    nan = np.isnan(x)
    got_bits = got.view(want.dtype)
    assert np.array_equal(got_bits[~nan], want[~nan])
    back = np.empty(x.shape, np.float32)
    nd.float32_into(got, dtype, back)
    assert np.isnan(back[nan]).all()
    if dtype.startswith("F8"):
        assert np.array_equal(got_bits[nan], want[nan])


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F8_E4M3", "F8_E5M2", "F8_E8M0"])
def test_dtype_to_float32_gives_torchs_values_for_every_code(dtype):
    """Every bit pattern of the dtype decodes to torch's float32 bits, NaN and inf codes included."""
    codes = _every_value(dtype)
    got = np.empty(codes.shape, np.float32)
    nd.float32_into(codes, dtype, got)
    raw = torch.from_numpy(codes.view(np.int16) if codes.itemsize == 2 else codes)
    want = raw.view(TORCH[dtype]).float().numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("cols", [384, 300, 5])
@pytest.mark.parametrize("special", [False, True])
def test_fp8_scaled_decode_is_torchs_value_times_the_scale(dtype, cols, special):
    """fp8_scaled_into: torch's float32 value of every code times its column block's scale, rounded once: subnormal
    codes, scales that make subnormal products, NaN/inf codes (`special`), a scale too large to fold 2**unbias
    into, and a column tile of wider rows (strided)."""
    fp8 = TORCH[dtype]
    g = torch.Generator().manual_seed(cols)
    finite = torch.arange(256, dtype=torch.uint8).view(fp8).float().isfinite()
    pool = torch.arange(256, dtype=torch.uint8)[finite | special]
    codes = pool[torch.randint(0, len(pool), (130, cols + 64), generator=g)]
    codes.view(-1)[: len(pool)] = pool[: codes.numel()]
    tile = codes[:, 64:]  # a strided tile of wider rows
    per_col = torch.rand(-(-cols // 128), generator=g) + 0.5
    per_col[0] = 2.0**-126 if special else 3.0**-40  # products below float32's normal range
    for big in (False, True):
        if big:
            per_col[-1] = 2.0**20  # folding 2**unbias into it would overflow
        want = tile.contiguous().view(fp8).float() * per_col.repeat_interleave(128)[:cols]
        got = np.empty((130, cols), np.float32)
        nd.fp8_scaled_into(tile.numpy(), dtype, per_col.numpy(), 128, got)
        assert np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32))  # NaN's bits too


@pytest.mark.parametrize("src,dst", [(s, d) for s in ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
                                     for d in ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2") if s != d])
def test_cast_between_float_dtypes_is_torchs(src, dst):
    """nd.cast of every pair it allows: torch's `.to(dtype)` bits (NaN aside), through float32 rounded once."""
    assert nd.casts(src, dst)
    x = _float32_samples()[::7]
    x = x[np.isfinite(x)]
    t = torch.from_numpy(x).to(TORCH[src])
    got = nd.cast(t.numpy() if src in nd.NATIVE_FLOATS else _bits(t), src, dst)
    want = _bits(t.to(TORCH[dst]))
    assert np.array_equal(got.view(want.dtype), want)
    assert not nd.casts("F64", "BF16") and nd.casts("F64", "F32") and not nd.casts("I32", "F32")


@pytest.mark.parametrize("ops,parts,shape", [
    ([], 1, (6, 4)),
    ([{"op": "concat", "dim": 0}], 2, (6, 4)),
    ([{"op": "concat", "dim": 0}, {"op": "transpose", "dims": [0, 1]}], 2, (6, 4)),
    ([{"op": "interleave", "dim": 0}, {"op": "transpose", "dims": [0, 1]}], 2, (6, 4)),
    ([{"op": "interleave", "dim": -1}], 3, (2, 5)),
    ([{"op": "transpose", "dims": [0, 1]}, {"op": "concat", "dim": 1}], 2, (3, 4)),
])
def test_family_ops_on_numpy_arrays_match_torch(ops, parts, shape):
    """A pipeline's fuse and split on numpy arrays give torch's tensors, and split hands back views where torch's
    do (encode_arrays_into writes through them); encode/decode of a unit round-trips."""
    pipeline = Pipeline(tuple(op_from_json(o, "test") for o in ops), parts)
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(parts)]
    fused = pipeline.fuse(arrays)
    want = pipeline.fuse([torch.from_numpy(a) for a in arrays])
    assert np.array_equal(fused, want.numpy())
    back = pipeline.split(np.ascontiguousarray(fused))
    assert all(np.array_equal(b, a) for b, a in zip(back, arrays))
    for j, (b, t) in enumerate(zip(back, pipeline.split(want.contiguous()))):
        assert np.array_equal(b, t.numpy()), j


def test_encode_and_decode_arrays_of_a_fused_unit_cast_on_the_way():
    """encode_arrays_into: roles held in other dtypes are cast (rounded once) into the unit's; decode_arrays reads
    the unit back into its roles, as torch's encode/decode do."""
    from convert.families import FusedTensor

    pipeline = Pipeline(tuple(op_from_json(o, "test") for o in [{"op": "interleave", "dim": 0},
                                                                  {"op": "transpose", "dims": [0, 1]}]), 2)
    fused = FusedTensor("{prefix}.w", ("gate", "up"), pipeline)
    unit = Unit(fused, None, "BF16")
    shapes = {"gate": (4, 3), "up": (4, 3)}
    rng = np.random.default_rng(4)
    gate = rng.standard_normal((4, 3)).astype(np.float32)
    up_bf16 = _bits(torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32)).to(torch.bfloat16))
    buf = memoryview(bytearray(4 * 3 * 2 * 2))
    encode_arrays_into(unit, {"gate": gate, "up": up_bf16}, {"gate": "F32", "up": "BF16"}, buf, shapes)
    roles = decode_arrays(unit, buf, shapes)
    assert np.array_equal(roles["gate"], _bits(torch.from_numpy(gate).to(torch.bfloat16)))
    assert np.array_equal(roles["up"], up_bf16)


def test_single_threaded_blas_finds_numpys_openblas():
    """The merge's products run with one BLAS thread whatever OPENBLAS_NUM_THREADS said, in numpy's OpenBLAS
    and in any other one loaded beside it (scipy's, whose symbols carry no 64_ suffix)."""
    import ctypes

    if importlib.util.find_spec("scipy") is not None:
        import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS where scipy is installed)
    assert nd.single_threaded_blas()
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    threads = {}
    for path in paths:
        lib = ctypes.CDLL(path)
        getter = next((getattr(lib, n) for n in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                                                 "openblas_get_num_threads64_", "openblas_get_num_threads")
                       if hasattr(lib, n)), None)
        if getter is not None:
            threads[path] = getter()
    numpy_libs = [p for p in threads if "numpy" in p]
    assert numpy_libs, f"numpy's OpenBLAS not among {paths}"
    assert set(threads.values()) == {1}, threads


def test_the_merges_modules_import_numpy_without_a_blas_thread_pool():
    """convert.plan sets OPENBLAS_NUM_THREADS=1 (where unset) before any of its modules imports numpy, so a merge
    rank or a --nproc parent about to fork starts no thread per core: the process has its main thread alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = ("import convert.engine.merge_job, os, sys; assert 'numpy' in sys.modules; "
            "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]
