"""The verifier's benchmark: `convert.verify` against the conversion whose output it checks.

    python -m bench.verify [--preset full|quick|tiny] [--out bench/results] [--before CHECKOUT]

For each case (a byte-copy fuse, a byte-copy split, a `--dtype` cast, and a transposing
gpt-oss fuse) and each world size, one sample runs the conversion with `--stats` from a cold
page cache, then `convert.verify` of its output with `--report`, again from a cold cache
(source and output evicted), at the same world size. Reported: both commands' wall time,
the conversion's data phase (slowest rank, from --stats) and the verifier's (slowest rank's
comparing time, from its report), their ratio (= verify throughput / conversion data-phase
throughput on the same bytes), and the verifier's peak RSS per rank. `--before DIR` also
times the verifier of another checkout (e.g. the one before this change) on the same
output. Writes VERIFY.md and verify.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.run import REPO, Bench, Settings, cold_cache, dir_bytes, environment, rss_text
from bench.synthetic import checkpoint_specs, write_synthetic

GB = 1e9
TARGETS = {"copy": 0.9, "cast": 0.5}  # verify throughput / the conversion's data-phase throughput


@dataclass(frozen=True)
class VerifySettings:
    """What one run covers."""

    preset: str = "qwen3-30b-a3b"
    layers: int = 4
    experts: int | None = None
    vocab: int = 32000
    other: tuple[str, int, int | None] | None = ("gpt-oss-20b", 1, None)  # transposing family: preset, layers, E
    world_sizes: tuple[int, ...] = (1, 2)
    repeats: int = 2
    max_shard: int = 5_000_000_000
    settle_seconds: float = 1.0


PRESETS = {
    "full": VerifySettings(),
    "quick": VerifySettings(layers=1, other=("gpt-oss-20b", 1, 8), repeats=1, settle_seconds=0.5),
    "tiny": VerifySettings(preset="tiny", layers=2, vocab=128, other=("tiny-gpt-oss", 1, None), world_sizes=(1,),
                           repeats=1, max_shard=200_000, settle_seconds=0.0),
}


@dataclass
class Case:
    """One conversion and the verification of its output, at one world size."""

    name: str
    kind: str  # copy, cast or transpose
    ws: int
    src: str
    module: str
    args: list[str]
    nbytes: int = 0  # output tensor bytes
    convert_wall: list[float] = field(default_factory=list)
    convert_data: list[float] = field(default_factory=list)
    verify_wall: list[float] = field(default_factory=list)
    verify_data: list[float] = field(default_factory=list)
    verify_rss: list[int] = field(default_factory=list)  # largest rank
    verify_threads: int = 0
    before_wall: list[float] = field(default_factory=list)
    before_seconds: list[float] = field(default_factory=list)  # the old report's `seconds` (plan + compare)
    before_rss: list[int] = field(default_factory=list)
    ok: bool = True
    note: str = ""


class VerifyBench(Bench):
    """bench.run's Bench, with a cold cache that does not re-import torch after dropping it: both commands
    compared here pay their imports alike, and the ratio is taken on their data phases."""

    def cold(self, data_dirs: list[Path]) -> None:
        cold_cache(data_dirs, self.drop_caches, self.s.settle_seconds, "", self.env, REPO)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "n/a"


def ratio(case: dict[str, Any], wall: bool = False) -> float:
    """The conversion's time over the verifier's (data phases, or wall times): >= 1 means verify is faster."""
    conv = median(case["convert_wall" if wall else "convert_data"])
    ver = median(case["verify_wall" if wall else "verify_data"])
    return conv / ver if ver and not math.isnan(ver) else float("nan")


def sample(b: Bench, case: Case, out: Path, work: Path, before: Path | None) -> None:
    """Convert (cold), verify its output (cold), optionally verify with the older checkout (cold)."""
    stats, report = work / "stats.json", work / "report.json"
    shutil.rmtree(out, ignore_errors=True)
    src = Path(case.src)
    args = ["--src", str(src), "--dst", str(out), "--no-progress", "--stats", str(stats), *case.args]
    seconds, _, _ = b.timed(b.launch(case.module, args, case.ws), [src])
    case.convert_wall.append(seconds)
    case.convert_data.append(max(r["seconds"] for r in json.loads(stats.read_text())["ranks"]))
    case.nbytes = dir_bytes(out)
    vargs = ["--src", str(src), "--dst", str(out), "--report", str(report)]
    seconds, _, _ = b.timed(b.launch("convert.verify", vargs, case.ws), [src, out])
    rep = json.loads(report.read_text())
    case.ok = case.ok and rep["ok"]
    case.verify_wall.append(seconds)
    case.verify_data.append(max(r.get("seconds", rep["seconds"]) for r in rep["ranks"]))
    case.verify_rss.append(max(r["peak_rss_bytes"] for r in rep["ranks"]))
    case.verify_threads = max(r.get("threads", 1) for r in rep["ranks"])
    b.log(f"  {case.name} ws{case.ws}: convert {case.convert_wall[-1]:.2f} s (data {case.convert_data[-1]:.2f} s), "
          f"verify {seconds:.2f} s (data {case.verify_data[-1]:.2f} s, peak RSS {rss_text(case.verify_rss[-1])}), "
          f"{'ok' if rep['ok'] else 'MISMATCH'}")
    if before is not None:
        report.unlink(missing_ok=True)
        env = {"PYTHONPATH": str(before), "PYTHONSAFEPATH": "1"}  # not the current directory's convert/
        seconds, _, _ = b.timed(b.launch("convert.verify", vargs, case.ws), [src, out], env=env)
        rep = json.loads(report.read_text())
        case.before_wall.append(seconds)
        case.before_seconds.append(rep["seconds"])
        case.before_rss.append(max(r.get("peak_rss_bytes", 0) for r in rep["ranks"]))
        b.log(f"  {case.name} ws{case.ws}: verify before {seconds:.2f} s (its own count {rep['seconds']:.2f} s)")
    shutil.rmtree(out, ignore_errors=True)


def make_sources(s: VerifySettings, work: Path, b: Bench) -> dict[str, Path]:
    """The synthetic sources: random bf16 (byte copies), normal bf16 (casts), the transposing family."""
    specs, cfg = checkpoint_specs(s.preset, s.layers, experts=s.experts, vocab=s.vocab)
    srcs = {"random": work / "src-random", "normal": work / "src-normal"}
    write_synthetic(str(srcs["random"]), specs, cfg, s.max_shard, data="random", seed=1)
    write_synthetic(str(srcs["normal"]), specs, cfg, s.max_shard, data="normal", seed=2)
    if s.other is not None:
        preset, layers, experts = s.other
        ospecs, ocfg = checkpoint_specs(preset, layers, experts=experts, vocab=s.vocab)
        srcs["other"] = work / "src-other"
        write_synthetic(str(srcs["other"]), ospecs, ocfg, s.max_shard, data="normal", seed=3)
    srcs["fused"] = work / "fused"  # split's source: the tool's fuse of the random source
    b.timed(b.launch("convert.fuse_experts", ["--src", str(srcs["random"]), "--dst", str(srcs["fused"]),
                                              "--no-progress", "--max-shard-size", str(s.max_shard)], 1),
            [srcs["random"]])
    return srcs


def cases_for(s: VerifySettings, srcs: dict[str, Path]) -> list[Case]:
    shard = ["--max-shard-size", str(s.max_shard)]
    out = []
    for ws in s.world_sizes:
        out += [
            Case("fuse (byte copy)", "copy", ws, str(srcs["random"]), "convert.fuse_experts", shard),
            Case("split (byte copy)", "copy", ws, str(srcs["fused"]), "convert.split_experts", shard),
            Case("fuse --dtype fp16 (cast from bf16)", "cast", ws, str(srcs["normal"]), "convert.fuse_experts",
                 [*shard, "--dtype", "fp16"]),
        ]
        if "other" in srcs:
            out.append(Case(f"{s.other[0]} fuse (transpose + interleave)", "transpose", ws, str(srcs["other"]),
                            "convert.fuse_experts", shard))
    return out


def write_report(results: dict[str, Any], path: Path) -> None:
    """VERIFY.md from the results."""
    s, env, cases = results["settings"], results["environment"], results["cases"]
    lines = [
        "# Verify benchmark",
        "",
        "Produced by `python -m bench.verify`; raw numbers in `verify.json`.",
        "",
        f"- machine: {env['cpus']} CPUs, {env['mem_total_gb']} GB RAM, Linux {env['kernel']}, Python {env['python']}; "
        f"disk `{env['disk']}`",
        f"- commit {env['commit']}, {env['date']}; load average before {tuple(env['load_before'])}, after "
        f"{tuple(env.get('load_after', ()))}; whole run {env.get('bench_seconds', 0)} s",
        "- cold cache before every command: " + ("`sync; echo 3 > /proc/sys/vm/drop_caches`" if env["drop_caches"]
                                                 else "posix_fadvise(DONTNEED) of the source and output files")
        + "; the verifier runs on the conversion's output right after it, at the same world size",
        f"- data: synthetic `{s['preset']}` checkpoints, {s['layers']} layer(s)"
        + (f", E={s['experts']}" if s["experts"] else " (real E, H, I)") + f", vocabulary {s['vocab']}; "
        "byte copies from random bytes, the cast from N(0, 0.02) bf16 values"
        + (f"; {s['other'][0]} with {s['other'][1]} layer(s)" + (f", E={s['other'][2]}" if s['other'][2] else "")
           if s["other"] else ""),
        f"- up to {s['repeats']} sample(s) per case, medians reported"
        + (" (the older verifier: one sample)" if results.get("before") else ""),
        "- *data phase*: the conversion's from its `--stats` (slowest rank: first byte to last); the verifier's from "
        "its `--report` (slowest rank's comparing time, after planning). *ratio* = conversion data phase / verify "
        "data phase = verify throughput / conversion data-phase throughput on the same output bytes (>= 1: the "
        "verifier is faster). Wall times include interpreter start, torchrun and planning.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    for kind, target in TARGETS.items():
        mine = [c for c in cases if c["kind"] == kind and c["verify_data"]]
        if not mine:
            continue
        got = "; ".join(f"{c['name']} ws{c['ws']}: {ratio(c):.2f}x (wall {ratio(c, True):.2f}x)" for c in mine)
        met = all(ratio(c) >= target for c in mine)
        label = "byte-copy outputs" if kind == "copy" else "cast outputs"
        lines.append(f"| verify >= {target}x the conversion's data-phase throughput, {label} | {got} | "
                     f"{'**met**' if met else '**NOT met**'} |")
    rss = [max(c["verify_rss"]) for c in cases if c["verify_rss"]]
    if rss:
        lines.append(f"| verify memory flat (bounded by threads x one expert, not the checkpoint) | peak RSS per rank "
                     f"{rss_text(min(rss))} - {rss_text(max(rss))} | see table |")
    lines += ["", "## Cases", "",
              "| case | ws | output | n | convert wall s | convert data s (min-max) | verify wall s | verify data s "
              "(min-max) | ratio (data) | ratio (wall) | verify peak RSS / rank | threads | result |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(
            f"| {c['name']} | {c['ws']} | {c['nbytes'] / GB:.3f} GB | {len(c['verify_data'])} | "
            f"{median(c['convert_wall']):.2f} | {median(c['convert_data']):.2f} ({spread(c['convert_data'])}) | "
            f"{median(c['verify_wall']):.2f} | {median(c['verify_data']):.2f} ({spread(c['verify_data'])}) | "
            f"{ratio(c):.2f}x | {ratio(c, True):.2f}x | {rss_text(max(c['verify_rss'], default=0))} | "
            f"{c['verify_threads']} | {'ok' if c['ok'] else 'MISMATCH'} |")
    if any(c["before_wall"] for c in cases):
        lines += ["", f"## Before: the verifier of `{results.get('before', '')}` on the same outputs", "",
                  "| case | ws | before: verify wall s | before: its seconds (plan + compare) | before: ratio "
                  "(convert data / its seconds) | before: peak RSS | now: verify wall s | now: ratio (data) | "
                  "speed-up (wall) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in cases:
            if not c["before_wall"]:
                continue
            bw, bs = median(c["before_wall"]), median(c["before_seconds"])
            lines.append(
                f"| {c['name']} | {c['ws']} | {bw:.2f} | {bs:.2f} | {median(c['convert_data']) / bs:.2f}x | "
                f"{rss_text(max(c['before_rss'], default=0))} | {median(c['verify_wall']):.2f} | {ratio(c):.2f}x | "
                f"{bw / median(c['verify_wall']):.2f}x |")
    notes = results.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


SAMPLES = ("convert_wall", "convert_data", "verify_wall", "verify_data", "verify_rss", "before_wall",
           "before_seconds", "before_rss")


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' results (same settings) as one: each case's samples together, environment of the first."""
    out = json.loads(json.dumps(runs[0]))
    cases = {(c["name"], c["ws"]): c for c in out["cases"]}
    for run in runs[1:]:
        for c in run["cases"]:
            mine = cases.setdefault((c["name"], c["ws"]), json.loads(json.dumps({**c, **{k: [] for k in SAMPLES}})))
            for k in SAMPLES:
                mine[k] = mine[k] + c[k]
            mine["ok"] = mine["ok"] and c["ok"]
        out["before"] = out.get("before") or run.get("before")
        out["notes"] = out["notes"] + [n for n in run.get("notes", []) if n not in out["notes"]]
    out["cases"] = list(cases.values())
    out["environment"]["bench_seconds"] = sum(r["environment"].get("bench_seconds", 0) for r in runs)
    out["settings"]["repeats"] = max(len(c["verify_data"]) for c in out["cases"])
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the verify benchmark, write VERIFY.md and verify.json."""
    p = argparse.ArgumentParser(prog="bench.verify", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--world-sizes", default=None, help="comma-separated, e.g. 1,2")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--workdir", default=None, help="parent of the temporary data directory (default: $TMPDIR)")
    p.add_argument("--no-drop-caches", action="store_true", help="only fadvise(DONTNEED) the data files")
    p.add_argument("--before", default=None, help="another checkout whose verifier is timed on the same outputs")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument("--no-other", action="store_true", help="skip the transposing family's case")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only write the report of earlier runs' verify.json files, their samples together")
    p.add_argument("--commit", default=None, help="with --merge: the commit measured (where git could not tell)")
    a = p.parse_args(argv)
    if a.merge:
        results = merge([json.loads(Path(f).read_text()) for f in a.merge])
        if a.commit:
            results["environment"]["commit"] = a.commit
        results["notes"] += a.note
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "verify.json").write_text(json.dumps(results, indent=2) + "\n")
        write_report(results, Path(a.out) / "VERIFY.md")
        return
    s = PRESETS[a.preset]
    over: dict[str, Any] = {}
    if a.layers:
        over["layers"] = a.layers
    if a.world_sizes:
        over["world_sizes"] = tuple(int(x) for x in a.world_sizes.split(","))
    if a.repeats:
        over["repeats"] = a.repeats
    if a.no_other:
        over["other"] = None
    s = VerifySettings(**{**asdict(s), **over})
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moe-verify-bench-", dir=a.workdir))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    try:
        b = VerifyBench(Settings(settle_seconds=s.settle_seconds), work, not a.no_drop_caches, log)
        env = environment(b.drop_caches)
        srcs = make_sources(s, work, b)
        log(f"sources in {work}: " + ", ".join(f"{k} {dir_bytes(v) / GB:.2f} GB" for k, v in srcs.items()))
        cases = cases_for(s, srcs)
        before = Path(a.before).resolve() if a.before else None
        def save() -> None:  # after every sample: a run cut short still leaves its numbers
            env["load_after"] = os.getloadavg()
            env["bench_seconds"] = round(time.perf_counter() - t0, 1)
            results = {"settings": asdict(s), "environment": env, "before": a.before, "notes": a.note,
                       "cases": [asdict(c) for c in cases if c.verify_data]}
            (out_dir / "verify.json").write_text(json.dumps(results, indent=2) + "\n")
            write_report(results, out_dir / "VERIFY.md")

        for k in range(s.repeats):
            log(f"round {k + 1}/{s.repeats}")
            for c in cases:  # the older verifier once per case (it can be slow)
                sample(b, c, work / "out", work, before if k == 0 else None)
                save()
        log(f"wrote {out_dir / 'VERIFY.md'}")
        if not all(c.ok for c in cases):
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
