"""A candidate for a merge that does not import torch: merge_fp8's computation in numpy alone.

Not used by the tool. `python -m bench.merge_kernel --numpy` times it beside convert.plan.merge_quant.merge_fp8 on
the same projection and checks that it gives the same bytes, so that whether a torch-free FP8 merge could keep
torch's speed (and skip its start-up) is measured where the merge runs, before the merge's pieces are rewritten.

The computation is merge_fp8's, step for step (float32 throughout, the same roundings): the FP8 codes decoded by
integer ops, times each block's scale; `b @ a` (numpy's matmul), times s, plus the base; per 128x128 block a fresh
scale amax / 448; each merged value / scale, clamped to +-448, rounded to the nearest FP8 code (ties to even) by
`e4m3fn_codes_into`, integer ops in numpy that give torch's own float32 -> float8_e4m3fn codes. Float32 scale
grids only (no E8M0), and base codes without NaN (merge_fp8 looks for them; this does not).
"""

from __future__ import annotations

from typing import Any

from convert.plan.dequant import E4M3FN_BITS  # torch-free modules: constants only
from convert.plan.merge_quant import FP8_MAX, TILE_COLS

_UNBIAS = 2.0**E4M3FN_BITS.unbias


def e4m3fn_codes_into(x: Any, out: Any, tmp: list[Any]) -> None:
    """float8_e4m3fn codes (uint8 `out`) of finite float32 `x` with |x| <= 448, rounded to nearest, ties to even,
    as torch converts them; `tmp`: three uint32 arrays of x's size. Normal results: the float32 bits rounded at
    bit 20 with the exponent rebased from 127 to 7; below 2**-6: the value plus 2**14 leaves the code in the
    float32's mantissa, rounded there by the float addition (c10's own way)."""
    import numpy as np

    bits = x.view(np.uint32)
    mag, r, s = tmp
    np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=mag)
    np.right_shift(mag, 20, out=r)
    np.bitwise_and(r, np.uint32(1), out=r)
    np.add(r, mag, out=r)
    np.add(r, np.uint32(0x7FFFF), out=r)
    np.right_shift(r, 20, out=r)
    np.subtract(r, np.uint32(120 << 3), out=r)
    np.add(mag.view(np.float32), np.float32(2.0**14), out=s.view(np.float32))
    np.subtract(s, np.uint32(141 << 23), out=s)
    np.copyto(r, s, where=mag < np.uint32(121 << 23))
    np.right_shift(bits, 24, out=s)
    np.bitwise_and(s, np.uint32(0x80), out=s)
    np.bitwise_or(r, s, out=r)
    np.copyto(out, r, casting="unsafe")


def _decode_scaled_into(codes: Any, out: Any, per_col: Any, bn: int) -> None:
    """float32 values of FP8 codes `codes` (uint8 [n, m]) times their column block's scale `per_col`, into `out`."""
    import numpy as np

    ints = out.view(np.int32)
    np.copyto(ints, codes.view(np.int8), casting="unsafe")
    np.left_shift(ints, E4M3FN_BITS.shift, out=ints)
    np.bitwise_and(ints, np.int32(E4M3FN_BITS.mask), out=ints)
    if per_col.size and float(np.abs(per_col).max()) * _UNBIAS >= 2.0**127:  # as merge_fp8: 2**120 apart
        out *= np.float32(_UNBIAS)
        _scale_blocks(out, per_col, bn, np.multiply, out)
    else:
        _scale_blocks(out, per_col * np.float32(_UNBIAS), bn, np.multiply, out)


def _scale_blocks(x: Any, per_col: Any, bn: int, fn: Any, out: Any) -> None:
    """`fn` (multiply or divide) of each column block of `x` [n, m] by its entry of `per_col`, into `out`."""
    n, m = x.shape
    full = m // bn
    if full:
        fn(x[:, : full * bn].reshape(n, full, bn), per_col[:full, None], out=out[:, : full * bn].reshape(n, full, bn))
    if full * bn < m:
        fn(x[:, full * bn :], per_col[full], out=out[:, full * bn :])


def _block_amax(x: Any, bn: int) -> Any:
    """max |x| of each column block of `x` [n, m]: the columns' maximum and negated minimum first (row against
    row, numpy's fast direction), then each block's."""
    import numpy as np

    col = np.maximum(x.max(axis=0), -x.min(axis=0))
    m = col.size
    full = m // bn
    parts = [col[: full * bn].reshape(full, bn).max(axis=1)] if full else []
    if full * bn < m:
        parts.append(col[full * bn :].max(keepdims=True))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def merge_fp8_numpy(w: Any, scale: Any, a: Any, b: Any, s: float, block: tuple[int, int], q_out: Any,
                    scale_out: Any, tile: int = TILE_COLS) -> tuple[float, float, float, float]:
    """merge_fp8 in numpy: FP8 codes `w` (uint8 [rows, cols]) with float32 scale grid `scale`, float32 LoRA
    factors `a` [r, cols] and `b` [rows, r], scaling `s`, in tiles of `tile` columns (0: whole block rows); writes
    the codes into `q_out` (uint8, w's shape) and the fresh grid into `scale_out` (float32); returns the survival
    sums (<d,d>, <g,d>, |g-d|^2, |W+d|^2). numpy's matmul may round `b @ a` differently from torch's in the last
    place, so a rare code can differ from merge_fp8's (bench.merge_kernel counts them)."""
    import numpy as np

    bm, bn = block
    rows, cols = w.shape
    width = cols if tile <= 0 else min(cols, max(bn, tile // bn * bn))
    size = min(bm, rows) * width
    W, D, M, G = (np.empty(size, np.float32) for _ in range(4))
    tmp = [np.empty(size, np.uint32) for _ in range(3)]
    codes = np.empty(size, np.uint8)
    dd = gd = err = want2 = 0.0
    for gi, i in enumerate(range(0, rows, bm)):
        n = min(rows, i + bm) - i
        for c in range(0, cols, width):
            m = min(cols, c + width) - c
            Wc, Dc, Mc, Gc = (x[: n * m].reshape(n, m) for x in (W, D, M, G))
            blocks = slice(c // bn, -(-(c + m) // bn))
            _decode_scaled_into(w[i : i + n, c : c + m], Wc, scale[gi, blocks], bn)
            np.matmul(b[i : i + n], a[:, c : c + m], out=Dc)
            Dc *= np.float32(s)
            np.add(Dc, Wc, out=Mc)
            amax = _block_amax(Mc, bn)
            fresh = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
            scale_out[gi, blocks] = fresh
            _scale_blocks(Mc, fresh, bn, np.divide, Gc)
            np.clip(Gc, -FP8_MAX, FP8_MAX, out=Gc)
            q = codes[: n * m].reshape(n, m)
            e4m3fn_codes_into(Gc, q, [t[: n * m].reshape(n, m) for t in tmp])
            q_out[i : i + n, c : c + m] = q
            _decode_scaled_into(q, Gc, fresh, bn)
            Gc -= Mc
            d, g, mm = Dc.reshape(-1), Gc.reshape(-1), Mc.reshape(-1)
            d2 = float(np.dot(d, d))
            dd += d2
            gd += float(np.dot(g, d)) + d2
            err += float(np.dot(g, g))
            want2 += float(np.dot(mm, mm))
    return dd, gd, err, want2
