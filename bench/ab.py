"""A/B of two (or more) trees of the tool on the same inputs: is a change slower, end to end, at real scale?

    python -m bench.ab --tree before=/path/to/old/checkout --tree after=/path/to/new/checkout \\
        --suites fuse,split,merge-fp8 --ranks 1,4,16 --layers 6 --out OUT
    python -m bench.ab --tree a=. --tree b=. --preset tiny --out OUT       # smoke test, seconds

Each case is the user's whole command (`python -m convert.X --nproc N ...`, process start to exit) run from the
tree's own directory (cwd and PYTHONPATH), from a cold page cache the way bench.run takes it (sync +
drop_caches where allowed, else posix_fadvise(DONTNEED) of the inputs; the code pages of python, torch and the
tree's modules are warmed again after a drop, as every other benchmark here does). The trees alternate order
from round to round so drift hits both alike; with --repeats R each case is sampled R times per tree and the
median reported. Inputs are generated once: suite `fuse` a per-expert Qwen3-30B-A3B-shaped bf16 checkpoint
(bench.synthetic, `--layers` layers, random bytes), `split` the fused layout of it, `merge-fp8` bench.dequant's
DeepSeek-V3 FP8 layer with a rank-16 per-expert adapter (bench.merge), `merge-bf16` bench.merge's bf16 case
(Qwen3-30B-A3B shapes, `--layers` layers, 128 experts; a rank-16 peft target_parameters adapter on every expert
and q/k/v/o). The first tree's output of each suite's
largest rank count is compared byte for byte with the other trees'; `cp -r` of the suite's input (synced, as the
tool syncs its output) is sampled in every round of every case, in the rotation with the trees, and each case's
trees are measured against its own median. Writes AB.md and ab.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARM = "import torch, torch.distributed, safetensors, numpy, fsspec, convert.engine.job, convert.merge_adapter"
SUITES = ("fuse", "split", "merge-fp8", "merge-bf16")


SETTLE_SECONDS = 1.0
CP = "cp -r"  # the baseline sampled in every round of every case, beside the trees


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a command run from `tree`: its modules first on the path, one OpenMP thread."""
    return dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")


def sample(cmd: list[str], tree: Path, inputs: list[Path], out: Path, stats: Path, drop: bool) -> dict[str, Any]:
    """One timed run of `cmd` from `tree`, from a cold page cache (bench.run.cold_cache; `drop`: drop_caches where
    allowed): wall seconds, data phase and peak RSS per rank from --stats."""
    from bench.run import cold_cache

    env = tree_env(tree)
    shutil.rmtree(out, ignore_errors=True)
    stats.unlink(missing_ok=True)
    cache = cold_cache(inputs, drop, SETTLE_SECONDS, WARM, env, tree)
    t0 = time.monotonic()  # the clock of --stats' data_span and prepare_at
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    t1 = time.monotonic()
    row: dict[str, Any] = {"seconds": round(t1 - t0, 3), "rc": proc.returncode, "cache": cache}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    elif stats.exists():
        s = json.loads(stats.read_text())
        spans = [r["data_span"] for r in s["ranks"] if r.get("data_span")]
        if spans:  # start-up (to the destination's preparation), prepare, data phase, commit and exit
            first, last = min(a for a, _ in spans), max(b for _, b in spans)
            row["data_s"] = round(last - first, 3)
            row["timeline_s"] = {"start": round(s["prepare_at"] - t0, 3), "prepare": round(first - s["prepare_at"], 3),
                                 "data": round(last - first, 3), "end": round(t1 - last, 3)}
        row["peak_rss_per_rank"] = max(r["peak_rss_bytes"] for r in s["ranks"])
    return row


def same_files(a: Path, b: Path) -> bool:
    """True where directories `a` and `b` hold the same file names with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if (a / n).is_file())


def prepare(suite: str, work: Path, model: str, layers: int, fp8: str, codes: str, jobs: int,
            tree: Path) -> tuple[list[str], list[Path]]:
    """Generate `suite`'s inputs in `work` (once); returns the tool's arguments before --dst and the inputs."""
    if suite == "fuse":
        from bench.synthetic import checkpoint_specs, write_synthetic

        src = work / f"src-L{layers}"
        if not (src / "model.safetensors.index.json").exists():
            specs, cfg = checkpoint_specs(model, layers, vocab=128 if model == "tiny" else 32000)
            write_synthetic(str(src), specs, cfg, 4_000_000_000, data="random", jobs=jobs)
        return ["convert.fuse_experts", "--src", str(src), "--max-shard-size", "5000000000"], [src]
    if suite == "split":
        _, (src,) = prepare("fuse", work, model, layers, fp8, codes, jobs, tree)
        fused = work / f"fused-L{layers}"
        if not (fused / "model.safetensors.index.json").exists():
            subprocess.run([sys.executable, "-m", "convert.fuse_experts", "--src", str(src), "--dst", str(fused),
                            "--nproc", str(min(16, jobs)), "--no-progress", "--max-shard-size", "5000000000"],
                           env=tree_env(tree), cwd=tree, check=True)
        return ["convert.split_experts", "--src", str(fused), "--max-shard-size", "5000000000"], [fused]
    if suite == "merge-bf16":
        from bench.merge import write_bf16_case

        n_layers, experts, vocab = (2, 8, 8192) if model == "tiny" else (layers, 128, 151936)
        base, adapter = work / f"bf16-L{n_layers}-E{experts}", work / f"bf16-L{n_layers}-E{experts}-adapter"
        if not (adapter / "adapter_config.json").exists():
            write_bf16_case(base, adapter, n_layers, experts, vocab)
        return ["convert.merge_adapter", "--base", str(base), "--adapter", str(adapter)], [base, adapter]
    from bench.dequant import PRESETS, generate
    from bench.merge import write_per_expert_adapter

    shape = dataclasses.replace(PRESETS[fp8], fp8_codes=codes)
    base, adapter = work / f"fp8-{fp8}-{codes}", work / f"fp8-{fp8}-{codes}-adapter"
    if not (adapter / "adapter_config.json").exists():
        generate(base, shape, jobs)
        write_per_expert_adapter(adapter, shape.layers, shape.experts, shape.hidden, shape.inter)
    return ["convert.merge_adapter", "--base", str(base), "--adapter", str(adapter)], [base, adapter]


def markdown(res: dict[str, Any]) -> str:
    """The report: one row per case, each tree's median wall and data phase and speed against `cp -r` of the
    suite's input (cp's seconds / the tree's), and each later tree's wall and data phase over the first's."""
    names, first = res["trees"], res["trees"][0]
    head = ["case"] + [f"{k} wall s / data s / vs cp -r" for k in names] + [f"{k} / {first} wall, data"
                                                                            for k in names[1:]]
    head += ["peak RSS/rank", "same bytes"]
    lines = [f"# A/B: {' vs '.join(names)}", "", f"{res['env']}; FP8 codes {res.get('fp8_codes', 'uniform')}; trees: " +
             ", ".join(f"{k} = {v}" + (f" {res['args'][k]}" if res["args"].get(k) else "") for k, v in
                       res["paths"].items()), "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def med(r: dict[str, Any], k: str) -> float:
        vals = [s[k] for s in r["samples"] if k in s]
        return statistics.median(vals) if vals else float("nan")

    for case in res["cases"]:
        cp = med(case[CP], "seconds") if CP in case else float("nan")
        if CP in case:
            lines.append(f"| {case['case']}: cp -r (its input, synced) | {cp:.2f} s |" + " |" * (len(head) - 2))
        wall = {k: med(case[k], "seconds") for k in names}
        data = {k: med(case[k], "data_s") for k in names}
        cells = [f"{wall[k]:.2f} / {data[k]:.2f} / {cp / wall[k]:.2f}x" for k in names]
        cells += [f"{wall[k] / wall[first]:.3f}, {data[k] / data[first]:.3f}" for k in names[1:]]
        cells.append("/".join(f"{max((s.get('peak_rss_per_rank', 0) for s in case[k]['samples']), default=0) >> 20}"
                              for k in names) + " MiB")
        cells.append(str(case.get("same_bytes", "-")))
        lines.append(f"| {case['case']} | " + " | ".join(cells) + " |")
    lines += ["", "Where the wall time went (first sample; seconds: start-up to the destination's preparation, "
              "preparation to the first data, data phase, last data to exit):", ""]
    for case in res["cases"]:
        for k in names:
            t = (case.get(k) or {"samples": [{}]})["samples"][0].get("timeline_s")
            if t:
                lines.append(f"- {case['case']}, {k}: " + " / ".join(f"{v:.2f}" for v in t.values()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, generate the inputs, run every case for both trees, write AB.md and ab.json."""
    from bench.dequant import FP8_CODES

    p = argparse.ArgumentParser(prog="bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                   help="two or more: the trees (the first is the baseline; one path may serve twice, with --args)")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="more flags for tree NAME's commands, e.g. 'w1=--workers 1'")
    p.add_argument("--suites", default=",".join(SUITES))
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--merge-ranks", default="4,16", help="the merge suites' rank counts")
    p.add_argument("--no-cp", action="store_true", help="no `cp -r` of each suite's input beside the trees")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--fp8", default="full", help="bench.dequant preset of the merge-fp8 suite")
    p.add_argument("--fp8-codes", choices=FP8_CODES, default=FP8_CODES[0],
                   help="how the FP8 weights' codes are drawn (bench.dequant.FP8_CODES)")
    p.add_argument("--preset", choices=["tiny"], default=None, help="tiny: bench.synthetic's tiny model, 2 layers, "
                   "and bench.dequant's tiny FP8 layers")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-drop-caches", action="store_true", help="evict the inputs with posix_fadvise only")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in a.tree)
    if len(trees) < 2:
        p.error("--tree NAME=PATH at least twice, with distinct names")
    extra = {k: v.split() for k, v in (x.split("=", 1) for x in a.args)}
    paths = {k: Path(v).resolve() for k, v in trees.items()}
    names = list(paths)
    suites = [s for s in a.suites.split(",") if s]
    for s in suites:
        if s not in SUITES:
            p.error(f"--suites: {s} is none of {', '.join(SUITES)}")
    ranks = [int(n) for n in a.ranks.split(",")]
    merge_ranks = [int(n) for n in a.merge_ranks.split(",")]
    model, layers, fp8 = ("tiny", 2, "tiny") if a.preset == "tiny" else ("qwen3-30b-a3b", a.layers, a.fp8)
    jobs = os.cpu_count() or 1
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"trees": names, "paths": {k: str(v) for k, v in paths.items()}, "cases": [],
                           "args": {k: " ".join(v) for k, v in extra.items()},
                           "env": f"{jobs} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                           "fp8_codes": a.fp8_codes}
    work = Path(tempfile.mkdtemp(prefix="moe-ab-", dir=a.workdir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` too removes the work dir (finally)
    try:
        for suite in suites:
            args, inputs = prepare(suite, work, model, layers, fp8, a.fp8_codes, jobs, paths[names[-1]])
            counts = merge_ranks if suite.startswith("merge-") else ranks
            for n in counts:
                case: dict[str, Any] = {"case": f"{suite} --nproc {n}", **{k: {"samples": []} for k in names}}
                if not a.no_cp:
                    case[CP] = {"samples": []}
                compare = n == max(counts)
                ref, dst, stats = work / "out-reference", work / "out", work / "stats.json"
                same: list[bool] = []
                for r in range(a.repeats):
                    order = names + ([] if a.no_cp else [CP])
                    for k in order if r % 2 == 0 else order[::-1]:  # drift hits every tree (and cp -r) alike
                        if k == CP:
                            row = sample(["bash", "-c", f'cp -r "{inputs[0]}" "{dst}" && sync "{dst}"/*'], REPO,
                                         inputs, dst, work / "none.json", not a.no_drop_caches)
                            case[CP]["samples"].append(row)
                            print(json.dumps({"case": f"{case['case']}: cp -r", **row}), flush=True)
                            shutil.rmtree(dst, ignore_errors=True)
                            continue
                        cmd = [sys.executable, "-m", args[0], *args[1:], "--dst", str(dst), "--nproc", str(n),
                               "--no-progress", "--stats", str(stats), *extra.get(k, [])]
                        row = sample(cmd, paths[k], inputs, dst, stats, not a.no_drop_caches)
                        case[k]["samples"].append(row)
                        print(json.dumps({"case": case["case"], "tree": k, **row}), flush=True)
                        if compare and row["rc"] == 0 and k == names[0] and not ref.exists():
                            dst.rename(ref)  # the first tree's output: the others' are compared with it
                        elif compare and row["rc"] == 0 and ref.exists():
                            same.append(same_files(ref, dst))
                        shutil.rmtree(dst, ignore_errors=True)  # one output on disk at a time, besides ref
                if compare:
                    case["same_bytes"] = len(same) > 0 and all(same)
                shutil.rmtree(ref, ignore_errors=True)
                res["cases"].append(case)
                (out_dir / "ab.json").write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out_dir / "ab.json").write_text(json.dumps(res, indent=2))
    (out_dir / "AB.md").write_text(markdown(res))
    print((out_dir / "AB.md").read_text())


if __name__ == "__main__":
    main()
