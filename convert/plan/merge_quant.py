"""The merge's arithmetic in numpy: `merge_into` (W + s * B @ A rounded once to the output dtype; without a
delta, a dequantization or cast), `merge_fp8` (merged and requantized to FP8 block scales), and requantizing
merged weights and how much of each LoRA delta survives it:

- MXFP4 (OCP microscaling, gpt-oss): `mxfp4_quantize` is the inverse of convert.plan.dequant.mxfp4_dequantize:
  per block of 32 values a fresh E8M0 scale 2**k, k the smallest integer with amax / 2**k <= 6 (byte k + 127,
  clamped to 0..254; an all-zero block gets byte 127), each value divided by it and rounded to the nearest FP4
  e2m1 magnitude (0, 0.5, 1, 1.5, 2, 3, 4, 6), ties to the even code (the one whose mantissa bit is 0: 0.25 -> 0,
  0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), the sign kept (a negative value that rounds to
  zero is stored as -0, code 8); code = sign << 3 | magnitude index, two codes a byte, the even element in the
  low nibble. Values the scale cannot reach (above 6 * 2**127) saturate at +-6.
- Survival: each requantizing compute piece adds, per weight it requantizes, float64 sums of its delta
  (d = merged - base, in float32), of the requantized weight's change (g = Q(merged) - base) and of the
  merged weight: `survived` = <g, d> / <d, d> (the share of the delta the stored weight keeps: 1 exact, 0
  lost under the quantization step) and `rel_err` = |Q(W + d) - (W + d)| / |W + d|. The rows are kept per
  process (SURVIVAL), taken by the merge job after its pieces ran and gathered to rank 0 like the other
  per-rank results; every requantized weight is measured (no sampling: a few elementwise passes per weight).
"""

from __future__ import annotations

import math
import threading

import numpy as np

WARN_SURVIVED = 0.5  # a requantized delta keeping less than half of itself is mostly below the quantization step
FP4_MAX = 6.0
# midpoints between consecutive FP4 e2m1 magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6)
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class Survival:
    """Per-process rows (label, format, <d,d>, <g,d>, |g-d|^2, |W+d|^2) of the weights requantized here."""

    def __init__(self) -> None:
        self._rows: list[tuple[str, str, float, float, float, float]] = []
        self._lock = threading.Lock()

    def add(self, label: str, fmt: str, base: np.ndarray, delta: np.ndarray, want2: float, got: np.ndarray) -> None:
        """Record one requantized weight: `base` its float32 base values, `delta` merged - base, `want2` the
        squared norm of the merged values, `got` the dequantized requantized values (overwritten)."""
        g = np.subtract(got, base, out=got)
        dd = float(np.sum(delta * delta, dtype=np.float64))
        gd = float(np.sum(g * delta, dtype=np.float64))
        err = float(np.sum((g - delta) ** 2, dtype=np.float64))
        with self._lock:
            self._rows.append((label, fmt, dd, gd, err, want2))

    def record(self, label: str, fmt: str, sums: tuple[float, float, float, float]) -> None:
        """Record one requantized weight from its sums (<d,d>, <g,d>, |g-d|^2, |W+d|^2) computed elsewhere."""
        with self._lock:
            self._rows.append((label, fmt, *sums))

    def take(self) -> list[tuple[str, str, float, float, float, float]]:
        """The rows recorded so far, and forget them (a batch runs several jobs in one process)."""
        with self._lock:
            rows, self._rows = self._rows, []
        return rows


SURVIVAL = Survival()


def squared_norm(x: np.ndarray) -> float:
    """sum(x * x) in float64."""
    return float(np.sum(x * x, dtype=np.float64))


FP8_MAX = 448.0
FP8_SCRATCH = 20  # first of the 4 thread_scratch slots merge_fp8 works in (one tile of float32 each)
FP8_BITS_SCRATCH = 50  # first of merge_fp8's 5 slots of the FP8 encoder's tiles (3 uint32, 2 uint8)
TILE_COLS = 2048  # merge_fp8's tile width in columns (a multiple of the block's; 0: whole block rows): KERNEL-large.md


MERGE_SCRATCH = 60  # first of merge_into's 5 thread_scratch slots (two float32 and three uint32 row tiles)
MERGE_TILE = 1 << 18  # float32 elements of merge_into's row tiles (1 MiB: within a core's L2)


def merge_into(w: np.ndarray, w_dtype: str, a: np.ndarray | None, b: np.ndarray | None, s: float, out: np.ndarray,
               out_dtype: str, scale: np.ndarray | None = None, scale_dtype: str = "",
               block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """`w + s * (b @ a)` computed in float32 in peft's order (the product, scaled, then added: an addmm that adds
    the scaled product in one GEMM rounds differently from peft's delta) and rounded once to `out_dtype` into
    `out` (w's shape, as ndarrays holds `out_dtype`); returns `out`. `w` [rows, cols] holds `w_dtype` (an FP8
    weight with its block `scale` grid of `scale_dtype`: dequantized first, each value times its block's scale);
    `a` [r, cols] and `b` [rows, r] are float32, or None: w's values alone, rounded (a dequantization, a cast).
    Row tiles of about MERGE_TILE elements (whole block rows of an FP8 weight) keep the float32 temporaries in
    this thread's scratch and a core's cache."""
    from convert.plan import ndarrays as nd

    rows, cols = w.shape
    step = block[0] if scale is not None else max(1, MERGE_TILE // max(1, cols))
    n = min(rows, step) * cols
    delta, values = (nd.scratch((n,), np.float32, MERGE_SCRATCH + k) for k in range(2))
    tmp = [nd.scratch((n,), np.uint32, MERGE_SCRATCH + 2 + k) for k in range(3)]
    grid = nd.to_float32(scale, scale_dtype) if scale is not None else None
    for i in range(0, rows, step):
        m = min(rows, i + step) - i
        d, v = delta[: m * cols].reshape(m, cols), values[: m * cols].reshape(m, cols)
        base = w[i : i + m]
        if grid is not None:
            nd.fp8_scaled_into(base, w_dtype, grid[i // block[0]], block[1], v)
            base = v
        elif w_dtype != "F32":
            nd.float32_into(base, w_dtype, v)
            base = v
        if a is not None and b is not None:
            nd.matmul_into(b[i : i + m], a, d)
            d *= np.float32(s)
            d += base
            base = d
        nd.float32_to_into(base, out_dtype, out[i : i + m], [t[: m * cols].reshape(m, cols) for t in tmp])
    return out


def merge_fp8(w: np.ndarray, w_dtype: str, scale: np.ndarray, scale_dtype: str, a: np.ndarray, b: np.ndarray,
              s: float, block: tuple[int, int], q_out: np.ndarray, scale_out: np.ndarray,
              tile_cols: int | None = None) -> tuple[float, float, float, float]:
    """Merge `s * b @ a` into FP8 block-scaled weight `w` [rows, cols] (codes of safetensors `w_dtype`; scale grid
    `scale` [gr, gc] of `scale_dtype`, as convert.plan.ndarrays holds them) and requantize it into `q_out` (codes,
    w's shape) and `scale_out` (the grid, same dtype), one tile of a block row at a time in this thread's scratch
    (`tile_cols` columns, rounded down to whole blocks; TILE_COLS when None, 0: the whole row). `a` [r, cols] and
    `b` [rows, r] are float32. The float32 merge is `w + s * (b @ a)` (the product, scaled, then added), each
    block's fresh scale is amax / 448 (for an E8M0 grid the power of two at or above it; 1 for an all-zero block)
    and each value `merged / scale`, clamped to +-448, rounded to nearest FP8 (ndarrays.fp8_round_into, torch's
    own rounding). The tile changes only which bytes are computed together, never a byte of the result.

    Returns the survival sums (<d,d>, <g,d>, |g-d|^2, |W+d|^2) of Survival, d the float32 delta and g the
    requantized weight's change, accumulated per tile (float32 dots, summed in float64) from the
    requantization error e = Q(M) - M of the merged values M: g - d = e and <g,d> = <e,d> + <d,d> (up to the
    rounding of M = W + d, some 1e-7 of M: far below what the report shows). Tiles keep every temporary a few
    MB, reused, and within a core's cache."""
    from convert.plan import ndarrays as nd

    bm, bn = block
    rows, cols = w.shape
    n_max = min(bm, rows)
    tile = TILE_COLS if tile_cols is None else tile_cols
    width = cols if tile <= 0 else min(cols, max(bn, tile // bn * bn))
    size = n_max * width
    W, D, M, G = (nd.scratch((size,), np.float32, FP8_SCRATCH + k) for k in range(4))
    tmp = [nd.scratch((size,), np.uint32, FP8_BITS_SCRATCH + k) for k in range(3)]
    codes, signs = (nd.scratch((size,), np.uint8, FP8_BITS_SCRATCH + 3 + k) for k in range(2))
    bits = nd.FP8_BITS[w_dtype]
    grid = nd.to_float32(scale, scale_dtype)
    dd = gd = err = want2 = 0.0
    for gi, i in enumerate(range(0, rows, bm)):
        n = min(rows, i + bm) - i
        for c in range(0, cols, width):
            m = min(cols, c + width) - c
            Wc, Dc, Mc, Gc = (x[: n * m].reshape(n, m) for x in (W, D, M, G))
            blocks = slice(c // bn, -(-(c + m) // bn))
            nd.fp8_scaled_into(w[i : i + n, c : c + m], w_dtype, grid[gi, blocks], bn, Wc)
            nd.matmul_into(b[i : i + n], a[:, c : c + m], Dc)
            Dc *= np.float32(s)
            np.add(Dc, Wc, out=Mc)
            amax = _block_amax(Mc, bn)
            used = _fresh_scales(amax, scale_dtype, scale_out[gi, blocks])
            nd.scale_column_blocks(Mc, used, bn, np.divide, Gc)
            q = q_out[i : i + n, c : c + m]
            # finite merged values over nonzero scales are within 448 of their scale: already clamped
            if bool(np.isfinite(amax).all()) and bool((used > 0).all()):
                nd.fp8_round_into(Gc, bits, codes[: n * m].reshape(n, m), Wc,
                                  [tmp[0][: n * m].reshape(n, m), signs[: n * m].reshape(n, m)])
                q[...] = codes[: n * m].reshape(n, m)
                nd.scale_column_blocks(Wc, used, bn, np.multiply, Gc)  # Q(M): the codes' values, scaled
            else:
                np.clip(Gc, -FP8_MAX, FP8_MAX, out=Gc)  # inf to 448; NaN stays NaN
                nd.fp8_encode_into(Gc, bits, q, [t[: n * m].reshape(n, m) for t in tmp])
                nd.fp8_scaled_into(q, w_dtype, used, bn, Gc)
            Gc -= Mc  # e = Q(M) - M, the requantization's error: g = e + d up to M's rounding
            d, e, mm = Dc.reshape(-1), Gc.reshape(-1), Mc.reshape(-1)
            d2 = float(np.dot(d, d))
            dd += d2
            gd += float(np.dot(e, d)) + d2
            err += float(np.dot(e, e))
            want2 += float(np.dot(mm, mm))
    return dd, gd, err, want2


def _fresh_scales(amax: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Each block's fresh scale from its amax (amax / 448; 1 for an all-zero block; for an E8M0 grid the power of
    two at or above it), written into `out` (the grid's row of blocks, stored as `dtype`); returns the float32
    scales as stored (what the values are divided by)."""
    from convert.plan import ndarrays as nd

    fresh = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    if dtype == "F8_E8M0":  # the exponent, one up where the mantissa is not zero: ceil(log2) exactly
        bits = fresh.view(np.uint32)
        exp = (bits >> np.uint32(23)) & np.uint32(0xFF)
        code = np.where(exp == 0, 0, np.minimum(exp + ((bits & np.uint32(0x7FFFFF)) != 0), 254))
        out[...] = np.where(exp == 0xFF, 0xFF, code)
    else:
        nd.float32_to_into(fresh, dtype, out)
    return nd.to_float32(np.ascontiguousarray(out), dtype)


def _block_amax(x: np.ndarray, bn: int) -> np.ndarray:
    """max |x| of each column block of `x` [n, m] (NaN where a block holds one): the columns' maximum and
    negated minimum first (row against row, numpy's fast direction), then each block's."""
    col = np.maximum(x.max(axis=0), -x.min(axis=0))
    m = col.size
    full = m // bn
    parts = [col[: full * bn].reshape(full, bn).max(axis=1)] if full else []
    if full * bn < m:
        parts.append(col[full * bn :].max(keepdims=True))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def survival_lines(rows: list[tuple[str, str, float, float, float, float]]) -> list[str]:
    """The merge's report of `rows` (every rank's): one summary line, and one warning line naming the tensors
    whose delta is mostly below the quantization step (none when there are no such tensors)."""
    by: dict[tuple[str, str], list[float]] = {}
    for label, fmt, dd, gd, err, want2 in rows:
        acc = by.setdefault((label, fmt), [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((dd, gd, err, want2)):
            acc[i] += v
    if not by:
        return []
    stats = []
    for (label, fmt), (dd, gd, err, want2) in sorted(by.items()):
        survived = gd / dd if dd > 0 else 1.0
        rel = math.sqrt(err) / math.sqrt(want2) if want2 > 0 else 0.0
        stats.append((label, fmt, survived, rel))
    fmts = "/".join(sorted({f for _, f, _, _ in stats}))
    surv = sorted(s for _, _, s, _ in stats)
    low = [(label, s) for label, _, s, _ in stats if s < WARN_SURVIVED]
    lines = [f"{fmts} requantized: {len(stats)} tensor(s); delta survived: min {surv[0]:.3f}, median "
             f"{surv[len(surv) // 2]:.3f}; rel_err |Q(W+d) - (W+d)| / |W+d|: max {max(r for *_, r in stats):.3g}"]
    if low:
        shown = ", ".join(f"{label} ({s:.2f})" for label, s in sorted(low, key=lambda x: x[1])[:8])
        lines.append(f"warning: in {len(low)} requantized tensor(s) the delta is mostly below the quantization step "
                     f"(survived < {WARN_SURVIVED}): {shown}" + (" ..." if len(low) > 8 else ""))
    return lines


def mxfp4_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 blocks U8 [..., G, 16] and E8M0 scales U8 [..., G] of float32 `x` [..., G*32] (see the module
    docstring for the scale, the rounding and the nibble order)."""
    *lead, n = x.shape
    if n % 32:
        raise ValueError(f"MXFP4 needs a multiple of 32 values per row, got {n}")
    g = x.reshape(*lead, n // 32, 32).astype(np.float32, copy=False)
    amax = np.abs(g).max(axis=-1)
    pos = amax > 0
    top = np.float32(FP4_MAX)
    k = np.ceil(np.log2(np.where(pos, amax, np.float32(1.0)) / top)).astype(np.int32)
    # log2 is rounded: fix k so that it is exactly the smallest with amax <= 6 * 2**k
    with np.errstate(over="ignore"):
        k = np.where(amax > np.ldexp(top, k), k + 1, k)
        k = np.where(amax <= np.ldexp(top, k - 1), k - 1, k)
    k = np.clip(np.where(pos, k, 0), -127, 127).astype(np.int32)
    scaled = np.ldexp(g, (-k)[..., None])
    mag = np.minimum(np.abs(scaled), top)
    mids = np.array(_FP4_MIDPOINTS, dtype=np.float32)
    idx = np.searchsorted(mids, mag, side="left")  # ties to the lower magnitude ...
    tie = mag == mids[np.minimum(idx, len(_FP4_MIDPOINTS) - 1)]
    idx = np.where(tie & (idx % 2 == 1), idx + 1, idx)  # ... or to the even code
    codes = (idx | (np.signbit(scaled).astype(idx.dtype) << 3)).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(blocks), (k + 127).astype(np.uint8)


def mxfp4_half_step(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Half the FP4 spacing (float64) at each value of float `x` [..., G*32] under its block's E8M0 `scales`
    [..., G] (0.25, 0.5 or 1 times the block's scale for |x| / scale below 2, 4, or above): the error bound of
    round-to-nearest."""
    s = np.repeat(np.ldexp(np.ones(scales.shape, dtype=np.float64), scales.astype(np.int32) - 127), 32, axis=-1)
    m = np.abs(x.astype(np.float64)) / s
    return np.where(m < 2, 0.25, np.where(m < 4, 0.5, 1.0)) * s


__all__ = ["FP8_MAX", "SURVIVAL", "Survival", "WARN_SURVIVED", "merge_fp8", "mxfp4_quantize", "mxfp4_half_step", "squared_norm",
           "survival_lines"]
