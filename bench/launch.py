"""Start-up under torchrun: the tool's ranks against a bare torchrun, `--nproc`, the gloo group and `cp -r`.

    python -m bench.launch --preset small                    # 2 ranks, dry run of the built-in example
    python -m bench.launch --preset large --workdir /tmp/lb  # 8 ranks, fuse of ~15 GB, cold cache

`small` times the cost a rank adds to torchrun's own: the same 2-rank torchrun running `true`
(bare), the tool's `--dry-run` under it (torch-free hub group, the default) and with
MOE_CONVERT_GROUP=gloo (every rank imports torch and joins gloo, as before the hub), and
`--nproc 2`; warm page cache, medians of --repeats, interleaved. Target: hub - bare <= 1.5 s.
`large` times the user's whole command on a Qwen3-30B-A3B-shaped checkpoint (bench.synthetic)
from a cold page cache: `cp -r` + sync, `torchrun --nproc-per-node 8` (hub, and gloo), `--nproc 16`
and the bare torchrun of 8 ranks, with the tool's data phase (its --stats). Target: torchrun at 8
ranks >= 0.9x `cp -r` end to end. Writes LAUNCH-<preset>.md and launch-<preset>.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import GB, REPO, Bench, Settings, cp_command, dir_bytes, environment, pythonpath
from bench.synthetic import checkpoint_specs, write_synthetic

TARGET_ABOVE_BARE_S = 1.5
TARGET_CP = 0.9


def torchrun(n: int, *argv: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node n` running `argv` (a module's `-m ...` or `--no-python ...`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *argv]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of `cmd` (start to exit) and its output; raises when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return seconds, proc.stdout


def small(work: Path, repeats: int, ranks: int) -> dict[str, Any]:
    """Start-up at `ranks` ranks: medians of `repeats` interleaved samples of each case."""
    example, dst = work / "example", work / "out"
    subprocess.run([sys.executable, "-m", "convert.example", str(example)], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONPATH=pythonpath()), capture_output=True)
    job = ["--src", str(example), "--dst", str(dst), "--dry-run", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1")
    cases = {
        "bare torchrun": (torchrun(ranks, "--no-python", "true"), env),
        "tool under torchrun (hub)": (torchrun(ranks, "-m", "convert.fuse_experts", *job), env),
        "tool under torchrun (gloo)": (torchrun(ranks, "-m", "convert.fuse_experts", *job),
                                       {**env, "MOE_CONVERT_GROUP": "gloo"}),
        f"tool --nproc {ranks}": ([sys.executable, "-m", "convert.fuse_experts", "--nproc", str(ranks), *job], env),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (cmd, case_env) in cases.items():
            samples[name].append(_run(cmd, case_env)[0])
    medians = {name: statistics.median(s) for name, s in samples.items()}
    bare = medians["bare torchrun"]
    return {"ranks": ranks, "repeats": repeats, "samples": samples, "medians": medians,
            "above_bare": {name: m - bare for name, m in medians.items() if name != "bare torchrun"},
            "target_above_bare_s": TARGET_ABOVE_BARE_S,
            "met": medians["tool under torchrun (hub)"] - bare <= TARGET_ABOVE_BARE_S}


LARGE_CASES = ("cp", "bare", "hub", "gloo", "nproc16")


def large(work: Path, repeats: int, ranks: int, layers: int, cases_wanted: tuple[str, ...] = LARGE_CASES,
          settle_s: float = 30.0) -> dict[str, Any]:
    """The whole fuse command from a cold cache at `ranks` torchrun ranks on ~1.27 GB x `layers`: the cases of
    `cases_wanted` (LARGE_CASES), round-robin; a freshly written checkpoint is synced and left `settle_s` seconds
    first (the disk's writeback of it would slow the first round)."""
    src, dst = work / "src", work / "dst"
    if not (src / "model.safetensors.index.json").exists():
        specs, config = checkpoint_specs("qwen3-30b-a3b", layers)
        write_synthetic(str(src), specs, config, 4_000_000_000, data="random", jobs=os.cpu_count() or 8)
        os.sync()
        time.sleep(settle_s)
    nbytes = dir_bytes(src)
    bench = Bench(Settings(), work, drop_caches=True, log=print)
    stats = work / "stats.json"
    job = ["--src", str(src), "--dst", str(dst), "--no-progress", "--stats", str(stats)]
    every: dict[str, tuple[str, list[str], dict[str, str]]] = {
        "cp": ("cp -r", cp_command(src, dst), {}),
        "bare": (f"bare torchrun x{ranks}", torchrun(ranks, "--no-python", "true"), {}),
        "hub": (f"torchrun x{ranks} (hub)", torchrun(ranks, "-m", "convert.fuse_experts", *job), {}),
        "gloo": (f"torchrun x{ranks} (gloo)", torchrun(ranks, "-m", "convert.fuse_experts", *job),
                 {"MOE_CONVERT_GROUP": "gloo"}),
        "nproc16": ("--nproc 16", [sys.executable, "-m", "convert.fuse_experts", "--nproc", "16", *job], {}),
    }
    cases = {name: (cmd, env) for key, (name, cmd, env) in every.items() if key in ("cp", "hub", *cases_wanted)}
    rows: dict[str, dict[str, list[float]]] = {name: {"seconds": [], "data": [], "rss": []} for name in cases}
    for k in range(repeats):
        for name, (cmd, env) in cases.items():
            shutil.rmtree(dst, ignore_errors=True)
            stats.unlink(missing_ok=True)
            seconds, _, _ = bench.timed(cmd, [src], env)
            rows[name]["seconds"].append(seconds)
            if stats.exists():
                ranks_stats = json.loads(stats.read_text())["ranks"]
                rows[name]["data"].append(max(r["seconds"] for r in ranks_stats))
                rows[name]["rss"].append(max(r["peak_rss_bytes"] for r in ranks_stats))
            print(f"round {k + 1}: {name}: {seconds:.2f} s", flush=True)
    shutil.rmtree(dst, ignore_errors=True)
    med = {name: statistics.median(r["seconds"]) for name, r in rows.items()}
    cp, hub = med["cp -r"], med[f"torchrun x{ranks} (hub)"]
    return {"ranks": ranks, "bytes": nbytes, "repeats": repeats, "rows": rows, "medians": med,
            "vs_cp": {name: cp / m for name, m in med.items() if name != "cp -r"},
            "vs_cp_per_round": [c / h for c, h in zip(rows["cp -r"]["seconds"], rows[f"torchrun x{ranks} (hub)"]["seconds"])],
            "target_cp": TARGET_CP, "met": cp / hub >= TARGET_CP}


def report(result: dict[str, Any], preset: str, out: Path) -> None:
    """Write LAUNCH-<preset>.md and launch-<preset>.json to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"launch-{preset}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Start-up under torchrun ({preset})", "", f"Machine: {result['environment']}", "",
             f"Command: `python -m bench.launch {' '.join(result['argv'])}`", ""]
    if preset == "small":
        lines += [f"{result['ranks']} ranks, `--dry-run` of the built-in example, warm cache; median of "
                  f"{result['repeats']} interleaved samples.", "", "| case | median s | above bare torchrun s | samples |",
                  "|---|---|---|---|"]
        for name, m in result["medians"].items():
            above = result["above_bare"].get(name)
            lines.append(f"| {name} | {m:.2f} | {'' if above is None else f'{above:+.2f}'} | "
                         + ", ".join(f"{s:.2f}" for s in result["samples"][name]) + " |")
        lines += ["", f"Target: the tool under torchrun <= {TARGET_ABOVE_BARE_S} s above bare torchrun: "
                  + ("met" if result["met"] else "NOT met")]
    else:
        lines += [f"fuse of {result['bytes'] / GB:.1f} GB (Qwen3-30B-A3B shapes), cold page cache, median of "
                  f"{result['repeats']}.", "", "| case | median s | cp -r / case | data phase s | peak RSS/rank MiB |",
                  "|---|---|---|---|---|"]
        for name, m in result["medians"].items():
            row = result["rows"][name]
            data = f"{statistics.median(row['data']):.2f}" if row["data"] else ""
            rss = f"{max(row['rss']) / 2**20:.0f}" if row["rss"] else ""
            lines.append(f"| {name} | {m:.2f} | {result['vs_cp'].get(name, 1.0):.2f}x | {data} | {rss} |")
        lines += ["", f"cp -r / torchrun x{result['ranks']} (hub) per round: "
                  + ", ".join(f"{r:.2f}x" for r in result["vs_cp_per_round"]),
                  "", f"Target: torchrun x{result['ranks']} >= {TARGET_CP}x `cp -r` end to end (medians): "
                  + ("met" if result["met"] else "NOT met")]
    (out / f"LAUNCH-{preset}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the preset, write the report."""
    p = argparse.ArgumentParser(prog="bench.launch", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["small", "large"], default="small")
    p.add_argument("--repeats", type=int, default=None, help="samples per case (small: 7, large: 3)")
    p.add_argument("--ranks", type=int, default=None, help="torchrun ranks (small: 2, large: 8)")
    p.add_argument("--layers", type=int, default=12, help="large: layers of the synthetic checkpoint (12: ~15.2 GB)")
    p.add_argument("--cases", default=",".join(LARGE_CASES),
                   help=f"large: which of {','.join(LARGE_CASES)} to run (cp and hub always run)")
    p.add_argument("--settle", type=float, default=30.0, help="large: seconds to wait after writing the checkpoint")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-launch-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.preset == "small":
        result = small(work, args.repeats or 7, args.ranks or 2)
    else:
        result = large(work, args.repeats or 3, args.ranks or 8, args.layers, tuple(args.cases.split(",")), args.settle)
    result["environment"] = environment(True)
    result["argv"] = sys.argv[1:] if argv is None else argv
    report(result, args.preset, Path(args.out))


if __name__ == "__main__":
    main()
