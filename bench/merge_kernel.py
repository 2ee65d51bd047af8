"""The FP8 merge's compute alone: convert.plan.merge_quant.merge_fp8 on one DeepSeek-V3 expert projection.

    python -m bench.merge_kernel --out $OUT            # lent 16-core machine, ~30 s
    python -m bench.merge_kernel --rows 256 --procs 2  # smoke test

One expert projection (2048 x 7168 FP8 e4m3fn, 128x128 float32 scale grid) and a rank-16 LoRA, one BLAS thread
(numpy's, as the merge gives it), timed per call (minimum and median of --repeats after two warm-up calls), in one
process and in --procs processes at once (each core's speed when every core merges, as 16 ranks do), for each
--tiles width (merge_fp8's `tile_cols`: 0 the whole 128-row block row, else tiles of that many columns); and what
a merge's start-up pays to import its compute library, `import numpy` against `import torch`; and each step of
merge_fp8 timed alone on one tile, where a machine's time goes. Two kinds of base codes:
- `random`: uniformly random bytes, NaN codes avoided (bench.dequant's `uniform` codes): 7/128 of them have a zero
  exponent field and a nonzero mantissa, FP8 subnormals, which the integer decode (convert.plan.ndarrays) spells
  as float32 subnormals;
- `quantized`: N(0, 0.02) values quantized with amax / 448 block scales, as released checkpoints are (about 1e-4
  subnormal codes; bench.dequant's default codes are drawn from this distribution).
A merge of the bench's FP8 layer does 768 such calls (256 experts x 3 projections); its data phase cannot beat 768 x the
per-call time / cores. Writes KERNEL.md and kernel.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RANK = 16
KINDS = ("random", "quantized")


def inputs(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[Any, ...]:
    """merge_fp8's arguments for one expert projection with base codes of `kind`: (w, scale, a, b, q_out,
    scale_out), codes and grids as convert.plan.ndarrays holds them (uint8 codes, float32 scales)."""
    import numpy as np

    from convert.plan import ndarrays as nd
    from convert.plan.merge_quant import FP8_MAX

    rng = np.random.default_rng(seed)
    gr, gc = -(-rows // 128), -(-cols // 128)
    if kind == "random":
        w = rng.integers(0, 256, rows * cols, dtype=np.uint8)
        w[(w & 0x7F) == 0x7F] ^= 1
        w = w.reshape(rows, cols)
        scale = rng.random((gr, gc), dtype=np.float32) * 9e-4 + 1e-4
    else:
        x = rng.standard_normal((gr * 128, gc * 128), dtype=np.float32) * 0.02
        blocks = x.reshape(gr, 128, gc, 128)
        scale = (np.abs(blocks).max(axis=(1, 3)) / np.float32(FP8_MAX)).astype(np.float32)
        g = np.clip(blocks / scale[:, None, :, None], -FP8_MAX, FP8_MAX).reshape(gr * 128, gc * 128)[:rows, :cols]
        w = np.empty((rows, cols), np.uint8)
        nd.float32_to_into(np.ascontiguousarray(g, dtype=np.float32), "F8_E4M3", w)
    a = rng.standard_normal((RANK, cols), dtype=np.float32) * np.float32(0.01)
    b = rng.standard_normal((rows, RANK), dtype=np.float32) * np.float32(0.01)
    return w, scale, a, b, np.empty_like(w), np.empty_like(scale)


def time_calls(kind: str, rows: int, cols: int, repeats: int, tile: int = 0) -> list[float]:
    """Seconds of each of `repeats` merge_fp8 calls in tiles of `tile` columns (after two warm-up calls), one
    BLAS thread."""
    from convert.plan import ndarrays as nd
    from convert.plan.merge_quant import merge_fp8

    nd.single_threaded_blas()
    w, scale, a, b, q, grid = inputs(kind, rows, cols)
    args = (w, "F8_E4M3", scale, "F32", a, b, 2.0, (128, 128), q, grid, tile)
    for _ in range(2):
        merge_fp8(*args)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        merge_fp8(*args)
        out.append(time.perf_counter() - t)
    return out


def stage_times(kind: str, cols: int, repeats: int = 200) -> dict[str, float]:
    """Milliseconds of each step of merge_fp8 on one tile (128 rows x `cols` columns, base codes of `kind`), each
    step run `repeats` times on its own with the functions merge_fp8 calls: where a machine's time goes."""
    import numpy as np

    from convert.plan import ndarrays as nd
    from convert.plan.merge_quant import _block_amax, _fresh_scales

    nd.single_threaded_blas()
    w, scale, a, b, _, _ = inputs(kind, 128, cols)
    n, bits = 128 * cols, nd.FP8_BITS["F8_E4M3"]
    W, D, M, G = (np.empty((128, cols), np.float32) for _ in range(4))
    t32, codes, signs, grid = np.empty((128, cols), np.uint32), np.empty((128, cols), np.uint8), \
        np.empty((128, cols), np.uint8), np.empty(scale.shape[1], np.float32)
    per = scale[0]
    nd.fp8_scaled_into(w, "F8_E4M3", per, 128, W)
    nd.matmul_into(b, a, D)
    np.add(D, W, out=M)
    used = _fresh_scales(_block_amax(M, 128), "F32", grid)
    nd.scale_column_blocks(M, used, 128, np.divide, G)
    steps: dict[str, Any] = {
        "decode base (fp8_scaled_into)": lambda: nd.fp8_scaled_into(w, "F8_E4M3", per, 128, W),
        "b @ a (matmul_into)": lambda: nd.matmul_into(b, a, D),
        "times s": lambda: np.multiply(D, np.float32(2.0), out=G),
        "plus base": lambda: np.add(D, W, out=M),
        "block amax": lambda: _block_amax(M, 128),
        "divide by scale": lambda: nd.scale_column_blocks(M, used, 128, np.divide, G),
        "round to FP8 (fp8_round_into)": lambda: nd.fp8_round_into(G, bits, codes, W, [t32, signs]),
        "codes' values times scale": lambda: nd.scale_column_blocks(W, used, 128, np.multiply, W),
        "survival dots": lambda: [float(np.dot(x.reshape(-1), y.reshape(-1))) for x, y in
                                  ((D, D), (G, D), (G, G), (M, M))],
    }
    out = {}
    for name, step in steps.items():
        step()
        t = time.perf_counter()
        for _ in range(repeats):
            step()
        out[name] = (time.perf_counter() - t) / repeats * 1e3
    return out | {"elements": float(n)}


def import_seconds(module: str, times: int = 3) -> float:
    """The fastest of `times` fresh interpreters' `import module`, in seconds (its files in the page cache)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout) for _ in range(times))


def worker(argv: list[str]) -> None:
    """`--worker KIND ROWS COLS REPEATS TILE`: print this process's call times as JSON."""
    kind, rows, cols, repeats, tile = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    print(json.dumps(time_calls(kind, rows, cols, repeats, tile)))


def in_processes(kind: str, rows: int, cols: int, repeats: int, procs: int, tile: int = 0) -> list[list[float]]:
    """Call times of `procs` processes merging at once."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bench.merge_kernel", "--worker", kind, str(rows), str(cols), str(repeats),
           str(tile)]
    running = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    out = []
    for p in running:
        text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"bench.merge_kernel: a worker failed (exit {p.returncode})")
        out.append(json.loads(text))
    return out


def markdown(res: dict[str, Any]) -> str:
    """The report."""
    lines = [f"# merge_fp8 on one expert projection ({res['rows']} x {res['cols']}, rank {RANK}, one thread)", "",
             f"{res['env']}", "", "| base codes | tile columns | one process: min / median ms | "
             f"{res['procs']} processes at once: median ms (slowest process) |", "|---|---|---|---|"]
    for r in res["kinds"].values():
        lines.append(f"| {r['codes']} | {r['tile']} | {r['one_min_ms']:.1f} / {r['one_median_ms']:.1f}"
                     f" | {r['many_median_ms']:.1f} ({r['many_slowest_ms']:.1f}) |")
    if res.get("stages"):
        st = dict(res["stages"])
        elements = st.pop("elements")
        lines += ["", f"Steps of merge_fp8 on one 128 x {int(elements) // 128} tile (`quantized` codes), each alone:",
                  "", "| step | ms per tile | ns per element |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {v * 1e6 / elements:.2f} |" for k, v in st.items()]
    imp = res["import_s"]
    lines += ["", f"Start-up a merge pays for its compute library: `import numpy` {imp['numpy']:.3f} s, `import "
              f"torch` {imp['torch']:.3f} s (fastest of 3 fresh interpreters, files in the page cache)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Time and profile merge_fp8; write KERNEL.md and kernel.json to --out."""
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--worker"]:
        return worker(args_in[1:])
    p = argparse.ArgumentParser(prog="bench.merge_kernel", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=7168)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tiles", default="0", help="comma-separated tile widths in columns (0: whole block rows)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = p.parse_args(args_in)
    import numpy as np

    res: dict[str, Any] = {"rows": a.rows, "cols": a.cols, "procs": a.procs, "kinds": {},
                           "env": f"{os.cpu_count()} cores, numpy {np.__version__}, "
                                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"}
    for kind, tile in ((k, int(t)) for k in KINDS for t in a.tiles.split(",")):
        one = time_calls(kind, a.rows, a.cols, a.repeats, tile)
        many = in_processes(kind, a.rows, a.cols, a.repeats, a.procs, tile)
        res["kinds"][kind + (f" {tile}" if tile else "")] = {
            "codes": kind, "tile": tile, "one_min_ms": min(one) * 1e3, "one_median_ms": statistics.median(one) * 1e3,
            "many_median_ms": statistics.median(t for ts in many for t in ts) * 1e3,
            "many_slowest_ms": max(statistics.median(ts) for ts in many) * 1e3}
    res["stages"] = stage_times("quantized", int(a.tiles.split(",")[-1]) or a.cols)
    res["import_s"] = {m: import_seconds(m) for m in ("numpy", "torch")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(res, indent=2))
    (out / "KERNEL.md").write_text(markdown(res))
    print((out / "KERNEL.md").read_text())
    return None


if __name__ == "__main__":
    main()
