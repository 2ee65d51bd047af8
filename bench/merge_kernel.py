"""The FP8 merge's compute alone: convert.plan.merge_quant.merge_fp8 on one DeepSeek-V3 expert projection.

    python -m bench.merge_kernel --out $OUT            # lent 16-core machine, ~30 s
    python -m bench.merge_kernel --rows 256 --procs 2  # smoke test

One expert projection (2048 x 7168 FP8 e4m3fn, 128x128 float32 scale grid) and a rank-16 LoRA, one torch thread,
timed per call (minimum and median of --repeats after two warm-up calls), in one process and in --procs processes
at once (each core's speed when every core merges, as 16 ranks do), for each --tiles width (merge_fp8's
`tile_cols`: 0 the whole 128-row block row, else tiles of that many columns); with --numpy also
bench.merge_numpy's kernel (the same computation without torch), how many of its codes differ from merge_fp8's,
and `import numpy` against `import torch`. Two kinds of base codes:
- `random`: uniformly random bytes, NaN codes avoided (bench.dequant's `uniform` codes): 7/128 of them have a zero
  exponent field and a nonzero mantissa, FP8 subnormals, which the integer decode (convert.plan.dequant) spells
  as float32 subnormals;
- `quantized`: N(0, 0.02) values quantized with amax / 448 block scales, as released checkpoints are (about 1e-4
  subnormal codes; bench.dequant's default codes are drawn from this distribution).
Then torch's profiler over --repeats calls of each kind: the ops by self CPU time. A merge of the
bench's FP8 layer does 768 such calls (256 experts x 3 projections); its data phase cannot beat 768 x the
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
# one BLAS thread for numpy's matmul too (torch's is set per process); read when numpy loads, after this
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
RANK = 16
KINDS = ("random", "quantized")


def inputs(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[Any, ...]:
    """(w, scale, a, b, q_out, scale_out) of one expert projection with base codes of `kind`."""
    import numpy as np
    import torch

    from convert.plan.merge_quant import FP8_MAX

    rng = np.random.default_rng(seed)
    gr, gc = -(-rows // 128), -(-cols // 128)
    if kind == "random":
        codes = rng.integers(0, 256, rows * cols, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] ^= 1
        w = torch.from_numpy(codes.reshape(rows, cols)).view(torch.float8_e4m3fn)
        scale = torch.from_numpy(rng.random((gr, gc), dtype=np.float32) * 9e-4 + 1e-4)
    else:
        x = torch.from_numpy(rng.standard_normal((gr * 128, gc * 128), dtype=np.float32) * 0.02)
        blocks = x.view(gr, 128, gc, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
        w = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(gr * 128, gc * 128)[:rows, :cols]
        w = w.contiguous().to(torch.float8_e4m3fn)
    a = torch.from_numpy(rng.standard_normal((RANK, cols), dtype=np.float32) * 0.01)
    b = torch.from_numpy(rng.standard_normal((rows, RANK), dtype=np.float32) * 0.01)
    return w, scale, a, b, torch.empty_like(w), torch.empty_like(scale)


def time_calls(kind: str, rows: int, cols: int, repeats: int, tile: int = 0, impl: str = "torch") -> list[float]:
    """Seconds of each of `repeats` merge_fp8 calls (`impl` numpy: bench.merge_numpy's) in tiles of `tile`
    columns (after two warm-up calls), one thread."""
    import torch

    torch.set_num_threads(1)
    w, scale, a, b, q, grid = inputs(kind, rows, cols)
    if impl == "numpy":
        import numpy as np

        from bench.merge_numpy import merge_fp8_numpy

        args = (w.view(torch.uint8).numpy(), scale.numpy(), a.numpy(), b.numpy(), 2.0, (128, 128),
                np.empty(w.shape, np.uint8), np.empty(scale.shape, np.float32), tile)
        call = merge_fp8_numpy
    else:
        from convert.plan.merge_quant import merge_fp8

        args, call = (w, scale, a, b, 2.0, (128, 128), q, grid, tile), merge_fp8
    for _ in range(2):
        call(*args)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        call(*args)
        out.append(time.perf_counter() - t)
    return out


def numpy_against_torch(kind: str, rows: int, cols: int, tile: int) -> dict[str, Any]:
    """How many codes (and scales) bench.merge_numpy's merge gives otherwise than merge_fp8 on codes of `kind`."""
    import numpy as np
    import torch

    from bench.merge_numpy import merge_fp8_numpy
    from convert.plan.merge_quant import merge_fp8

    w, scale, a, b, q, grid = inputs(kind, rows, cols)
    merge_fp8(w, scale, a, b, 2.0, (128, 128), q, grid, tile)
    qn, gn = np.empty(w.shape, np.uint8), np.empty(scale.shape, np.float32)
    merge_fp8_numpy(w.view(torch.uint8).numpy(), scale.numpy(), a.numpy(), b.numpy(), 2.0, (128, 128), qn, gn, tile)
    return {"codes": int(qn.size), "differing_codes": int((qn != q.view(torch.uint8).numpy()).sum()),
            "differing_scales": int((gn != grid.numpy()).sum())}


def import_seconds(module: str, times: int = 3) -> float:
    """The fastest of `times` fresh interpreters' `import module`, in seconds (its files in the page cache)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout) for _ in range(times))


def profile_ops(kind: str, rows: int, cols: int, repeats: int, top: int = 12) -> list[dict[str, Any]]:
    """torch's profiler over `repeats` calls on codes of `kind`: the `top` ops by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from convert.plan.merge_quant import merge_fp8

    torch.set_num_threads(1)
    w, scale, a, b, q, grid = inputs(kind, rows, cols)
    merge_fp8(w, scale, a, b, 2.0, (128, 128), q, grid)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            merge_fp8(w, scale, a, b, 2.0, (128, 128), q, grid)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls_per_merge": e.count / repeats, "ms_per_merge": e.self_cpu_time_total / 1e3 / repeats}
            for e in ops]


def worker(argv: list[str]) -> None:
    """`--worker KIND ROWS COLS REPEATS TILE IMPL`: print this process's call times as JSON."""
    kind, rows, cols, repeats, tile = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    print(json.dumps(time_calls(kind, rows, cols, repeats, tile, argv[5])))


def in_processes(kind: str, rows: int, cols: int, repeats: int, procs: int, tile: int = 0,
                 impl: str = "torch") -> list[list[float]]:
    """Call times of `procs` processes merging at once."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bench.merge_kernel", "--worker", kind, str(rows), str(cols), str(repeats),
           str(tile), impl]
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
             f"{res['env']}", "", "| base codes | tile columns | kernel | one process: min / median ms | "
             f"{res['procs']} processes at once: median ms (slowest process) |", "|---|---|---|---|---|"]
    for r in res["kinds"].values():
        lines.append(f"| {r['codes']} | {r['tile']} | {r['kernel']} | {r['one_min_ms']:.1f} / {r['one_median_ms']:.1f}"
                     f" | {r['many_median_ms']:.1f} ({r['many_slowest_ms']:.1f}) |")
    if res.get("numpy"):
        n = res["numpy"]
        lines += ["", f"bench.merge_numpy against merge_fp8 (`--numpy`): `import numpy` {n['import_s']['numpy']:.3f} "
                  f"s, `import torch` {n['import_s']['torch']:.3f} s (fastest of 3 fresh interpreters); codes "
                  "that differ (numpy's matmul may round `b @ a` otherwise in the last place): " + ", ".join(
                      f"{k} {v['differing_codes']} of {v['codes']} (scales {v['differing_scales']})"
                      for k, v in n["differ"].items())]
    for kind, ops in res["ops"].items():
        lines += ["", f"Ops by self CPU time (`{kind}` codes, one process):", "",
                  "| op | calls per merge | ms per merge |", "|---|---|---|"]
        lines += [f"| {o['op']} | {o['calls_per_merge']:.0f} | {o['ms_per_merge']:.2f} |" for o in ops]
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
    p.add_argument("--numpy", action="store_true", help="time bench.merge_numpy's kernel too, and compare its bytes")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = p.parse_args(args_in)
    import torch

    res: dict[str, Any] = {"rows": a.rows, "cols": a.cols, "procs": a.procs, "kinds": {},
                           "env": f"{os.cpu_count()} cores, torch {torch.__version__} "
                                  f"({torch.backends.cpu.get_cpu_capability()}), "
                                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"}
    impls = ("torch", "numpy") if a.numpy else ("torch",)
    for kind, tile, impl in ((k, int(t), i) for k in KINDS for t in a.tiles.split(",") for i in impls):
        one = time_calls(kind, a.rows, a.cols, a.repeats, tile, impl)
        many = in_processes(kind, a.rows, a.cols, a.repeats, a.procs, tile, impl)
        key = kind + (f" {tile}" if tile else "") + (" numpy" if impl == "numpy" else "")
        res["kinds"][key] = {
            "codes": kind, "tile": tile, "kernel": impl, "one_min_ms": min(one) * 1e3, "one_median_ms": statistics.median(one) * 1e3,
            "many_median_ms": statistics.median(t for ts in many for t in ts) * 1e3,
            "many_slowest_ms": max(statistics.median(ts) for ts in many) * 1e3}
    res["ops"] = {kind: profile_ops(kind, a.rows, a.cols, a.repeats) for kind in KINDS}
    if a.numpy:
        tile = int(a.tiles.split(",")[-1])
        res["numpy"] = {"import_s": {m: import_seconds(m) for m in ("numpy", "torch")},
                        "differ": {k: numpy_against_torch(k, a.rows, a.cols, tile) for k in KINDS}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(res, indent=2))
    (out / "KERNEL.md").write_text(markdown(res))
    print((out / "KERNEL.md").read_text())
    return None


if __name__ == "__main__":
    main()
