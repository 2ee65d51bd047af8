"""The benchmark on a many-core machine: the tool end to end at 1-16 ranks against cp, dd, naive and transformers 5.

    python -m bench.manycore --out OUT --workdir /tmp/mc --phase 1   # generate + the tool's runs
    python -m bench.manycore --out OUT --workdir /tmp/mc --phase 2   # the peers (regenerates what is missing)
    python -m bench.manycore --out bench/results --merge A.json B.json   # report from the phases' JSON
    python -m bench.manycore --preset tiny --out OUT                  # everything, in seconds (smoke test)

Every case is one sample of the user's whole command (process start to exit) from a cold page
cache (bench.run's Bench: sync + drop_caches as root, else fadvise DONTNEED), with the tool's data
phase and per-rank peak RSS from its --stats beside it. Checkpoints are bench.synthetic's
Qwen3-30B-A3B-shaped per-expert checkpoints (real E, H, I; random bytes; loadable by transformers).
The tool runs as `python -m convert.X --nproc N` and as `torchrun --standalone --nproc-per-node N -m convert.X`.
Each phase writes manycore-phaseN.json to --out and to --workdir (a later phase on the same machine
merges the earlier one), then MANYCORE.md + manycore.json of every phase it has.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.run import (
    GB,
    REPO,
    Bench,
    Case,
    Row,
    check_disk,
    compare_tensors,
    cp_command,
    dir_bytes,
    environment,
    mem_available,
    rss_text,
)
from bench.synthetic import checkpoint_specs, write_synthetic

TARGET_CP = 0.9  # end to end, vs cp -r + sync, at TARGET_RANKS
TARGET_RANKS = (1, 4, 16)
TARGET_HF = 2.0  # vs transformers 5, both directions
TARGET_RSS = 600 * 2**20  # per rank
FLAT = 1.15  # peak RSS per rank at the big size / at the small size, at most


@dataclass(frozen=True)
class Settings:
    """What a many-core run covers."""

    preset: str = "qwen3-30b-a3b"
    vocab: int = 32000
    experts: int | None = None
    big: int = 12  # layers: ~15.2 GB
    small: int = 6  # ~7.6 GB: per-rank RSS must not grow with the size
    ranks: tuple[int, ...] = (1, 4, 16)  # fuse of the big checkpoint, --nproc
    torchrun_ranks: tuple[int, ...] = (4, 16)
    split_ranks: tuple[int, ...] = (1, 4, 16)
    small_ranks: tuple[int, ...] = (1, 4, 16)
    optional_ranks: tuple[int, ...] = (8,)  # fuse --nproc, after the rest; skipped when it would overrun --budget
    src_shard: int = 4_000_000_000
    max_shard: int = 5_000_000_000
    settle_seconds: float = 1.0
    gen_jobs: int = 8
    dd_block: str = "64M"


FULL = Settings()
TINY = Settings(preset="tiny", vocab=128, big=2, small=1, ranks=(1, 2), torchrun_ranks=(2,), split_ranks=(1,),
                small_ranks=(1,), optional_ranks=(), src_shard=100_000, max_shard=200_000, settle_seconds=0.0,
                gen_jobs=2, dd_block="1M")
# Real shapes at 2 and 1 layers (~2.6 GB): a minute's check of a machine before the full run.
CHECK = Settings(big=2, small=1, ranks=(1, 16), torchrun_ranks=(16,), split_ranks=(16,), small_ranks=(1, 16),
                 optional_ranks=())
PRESETS = {"full": FULL, "check": CHECK, "tiny": TINY}


class ManyCore:
    """One phase of the many-core benchmark in `work`: its rows are saved after every case."""

    def __init__(self, s: Settings, work: Path, out: Path, phase: str, drop: bool, budget: float) -> None:
        self.s, self.work, self.out, self.phase, self.budget = s, work, out, phase, budget
        self.t0 = time.perf_counter()
        self.b = Bench(s, work, drop, self.log)  # type: ignore[arg-type]  # Bench reads settle_seconds only
        self.checks: dict[str, str] = {}
        self.env = environment(self.b.drop_caches)
        self.env.update(machine_facts(work))
        self.src = {L: work / f"src-L{L}" for L in (s.big, s.small)}
        self.fused = work / f"fused-L{s.big}"
        self.dst, self.stats = work / "out", work / "stats.json"
        self.peer_env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- data ----------------------------------------------------------------
    def ensure_source(self, layers: int) -> Path:
        """The per-expert checkpoint of `layers` layers, generated unless a complete one is there."""
        d = self.src[layers]
        specs, cfg = checkpoint_specs(self.s.preset, layers, experts=self.s.experts, vocab=self.s.vocab)
        marker = d / ".complete"
        want = json.dumps({"layers": layers, "preset": self.s.preset, "vocab": self.s.vocab, "shard": self.s.src_shard})
        if marker.exists() and marker.read_text() == want:
            return d
        shutil.rmtree(d, ignore_errors=True)
        check_disk(self.work, sum(x.nbytes for x in specs))
        t = time.perf_counter()
        total = write_synthetic(str(d), specs, cfg, self.s.src_shard, data="random", seed=layers, jobs=self.s.gen_jobs)
        os.sync()
        marker.write_text(want)
        self.log(f"generated L{layers}: {total / GB:.2f} GB in {time.perf_counter() - t:.1f} s")
        return d

    def ensure_fused(self) -> Path:
        """The tool's fused output of the big checkpoint (split's source), made untimed unless there."""
        marker = self.fused / ".complete"
        if not marker.exists():
            shutil.rmtree(self.fused, ignore_errors=True)
            src = self.ensure_source(self.s.big)
            self.b.timed(nproc_cmd("convert.fuse_experts", self.args(src, self.fused), max(self.s.ranks)), [src])
            marker.write_text("")
        return self.fused

    def args(self, src: Path, dst: Path, stats: bool = False) -> list[str]:
        a = ["--src", str(src), "--dst", str(dst), "--no-progress", "--max-shard-size", str(self.s.max_shard)]
        return a + (["--stats", str(self.stats)] if stats else [])

    # -- running -------------------------------------------------------------
    def sample(self, case: Case, estimate: float | None = None) -> None:
        """One sample of `case`; an optional case (`estimate` = its expected seconds) is skipped with a note
        when it would end past the budget. Saves the phase after every case (a killed run keeps its rows)."""
        if estimate is not None and self.elapsed() + estimate > self.budget:
            case.row.note = f"skipped: would end past the time budget ({self.budget:.0f} s)"
            self.log(f"  {case.row.name}: {case.row.note}")
        else:
            self.b.sample(case)
        self.b.rows.append(case.row)
        self.save()

    def estimate(self, op: str) -> float:
        """Expected seconds of one more sample like the slowest earlier row of `op` (+ cold-cache set-up)."""
        done = [r.seconds for r in self.b.rows if r.op == op and r.layers == self.s.big and r.samples]
        return (max(done) if done else 60.0) + 8.0

    def tool_case(self, op: str, layers: int, n: int, launcher: str, src: Path, dst: Path) -> Case:
        module = {"fuse": "convert.fuse_experts", "split": "convert.split_experts"}[op]
        cmd = (nproc_cmd if launcher == "nproc" else torchrun_cmd)(module, self.args(src, dst, stats=True), n)
        row = Row(f"{op} L{layers} {launcher} {n}", op, layers, n, n, dir_bytes(src), note=launcher)
        return Case(row, cmd, [src], dst if dst == self.dst else None, self.stats)

    def phase1(self) -> None:
        """The tool: fuse at both sizes, then split of its fused output, at the target rank counts."""
        s = self.s
        src = self.ensure_source(s.small)
        for n in s.small_ranks:
            self.sample(self.tool_case("fuse", s.small, n, "nproc", src, self.dst))
        shutil.rmtree(src, ignore_errors=True)
        src = self.ensure_source(s.big)
        shutil.rmtree(self.fused, ignore_errors=True)
        for i, n in enumerate(n for n in s.ranks if n not in s.optional_ranks):
            keep = i == 0  # the first fuse's output stays: split's source and the peers' fused checkpoint
            self.sample(self.tool_case("fuse", s.big, n, "nproc", src, self.fused if keep else self.dst))
            if keep:
                (self.fused / ".complete").write_text("")
        for n in s.split_ranks:
            self.sample(self.tool_case("split", s.big, n, "nproc", self.fused, self.dst))

    def phase1_extra(self) -> None:
        """torchrun and the optional rank counts (each skipped when it would overrun), the split check."""
        s = self.s
        src, fused = self.ensure_source(s.big), self.ensure_fused()
        runs = [("torchrun", n) for n in s.torchrun_ranks] + [("nproc", n) for n in s.optional_ranks]
        for launcher, n in runs:
            self.sample(self.tool_case("fuse", s.big, n, launcher, src, self.dst), self.estimate("fuse"))
        if self.elapsed() + self.estimate("split") > self.budget:
            self.log("split check skipped: time budget")
            return
        check = self.work / "split-check"
        shutil.rmtree(check, ignore_errors=True)
        self.b.timed(nproc_cmd("convert.split_experts", self.args(fused, check), max(s.split_ranks)), [])
        self.checks[f"split L{s.big}: the tool's split of its fuse vs the source"] = compare_tensors(check, src)
        shutil.rmtree(check, ignore_errors=True)

    def phase2(self) -> None:
        """The peers on the same bytes: cp -r + sync, dd direct, transformers 5 (fuse, split), naive fuse."""
        s, L = self.s, self.s.big
        src, fused = self.ensure_source(L), self.ensure_fused()
        nbytes, fbytes = dir_bytes(src), dir_bytes(fused)
        for name, where, size in (("per-expert", src, nbytes), ("fused", fused, fbytes)):
            self.sample(Case(Row(f"cp -r {name} L{L}", "cp", L, 1, 0, size), cp_command(where, self.dst), [where],
                             self.dst))
        big = self.work / "dd.bin"
        block = parse_block(s.dd_block)
        count = math.ceil(nbytes / block)
        self.sample(Case(Row(f"dd direct write L{L}", "dd-write", L, 1, 0, count * block),
                         ["dd", "if=/dev/zero", f"of={big}", f"bs={s.dd_block}", f"count={count}", "oflag=direct",
                          "conv=fsync", "status=none"], [], None))
        self.sample(Case(Row(f"dd direct read L{L}", "dd-read", L, 1, 0, count * block),
                         ["dd", f"if={big}", "of=/dev/null", f"bs={s.dd_block}", "iflag=direct", "status=none"],
                         [self.work], None))
        big.unlink()
        for r in self.b.rows[-2:]:
            r.peak_rss = [0] * len(r.samples)  # dd's own RSS is not measured (ru_maxrss counts this process)
        hf = self.work / "hf"
        for op, where, size in (("fuse", src, nbytes), ("split", fused, fbytes)):
            shutil.rmtree(hf, ignore_errors=True)
            row = Row(f"transformers {op} L{L}", f"transformers-{op}", L, 1, 0, size)
            self.sample(Case(row, [sys.executable, "-m", "bench.baselines", f"transformers-{op}", "--src", str(where),
                                   "--dst", str(hf), "--max-shard-size", str(s.max_shard)], [where], None,
                             env=self.peer_env))
            self.checks[f"transformers {op} L{L}: output layout"] = output_layout(hf)
            shutil.rmtree(hf, ignore_errors=True)
        self.naive("fuse", src, fused, None)

    def phase3(self) -> None:
        """A re-run of the 1-rank cases (fuse, split) with the peers they are judged against (cp -r both ways,
        transformers split), for a change that affects one rank only (e.g. the default --workers)."""
        s, L = self.s, self.s.big
        src = self.ensure_source(L)
        shutil.rmtree(self.fused, ignore_errors=True)
        self.sample(self.tool_case("fuse", L, 1, "nproc", src, self.fused))
        (self.fused / ".complete").write_text("")
        self.sample(self.tool_case("split", L, 1, "nproc", self.fused, self.dst))
        for name, where in (("per-expert", src), ("fused", self.fused)):
            self.sample(Case(Row(f"cp -r {name} L{L}", "cp", L, 1, 0, dir_bytes(where)), cp_command(where, self.dst),
                             [where], self.dst))
        hf = self.work / "hf"
        shutil.rmtree(hf, ignore_errors=True)
        row = Row(f"transformers split L{L}", "transformers-split", L, 1, 0, dir_bytes(self.fused))
        self.sample(Case(row, [sys.executable, "-m", "bench.baselines", "transformers-split", "--src", str(self.fused),
                               "--dst", str(hf), "--max-shard-size", str(s.max_shard)], [self.fused], None,
                         env=self.peer_env))
        shutil.rmtree(hf, ignore_errors=True)

    def phase2_extra(self) -> None:
        """The naive split (skipped when it would overrun)."""
        self.naive("split", self.ensure_fused(), self.ensure_source(self.s.big), self.estimate("naive-fuse"))

    def naive(self, op: str, where: Path, expect: Path, estimate: float | None) -> None:
        """The naive baseline `op` of checkpoint `where` (when the RAM allows); its output checked against `expect`."""
        s, L = self.s, self.s.big
        size = dir_bytes(where)
        need = 2.5 * size + 2 * GB
        row = Row(f"naive {op} L{L}", f"naive-{op}", L, 1, 0, size)
        if mem_available() < need:
            row.note = f"skipped: needs ~{need / GB:.0f} GB of RAM, {mem_available() / GB:.0f} GB available"
            self.b.rows.append(row)
            return
        out = self.work / "naive"
        shutil.rmtree(out, ignore_errors=True)
        self.sample(Case(row, [sys.executable, "-m", "bench.baselines", f"naive-{op}", "--src", str(where),
                               "--dst", str(out), "--max-shard-size", str(s.max_shard)], [where], None,
                         env=self.peer_env), estimate)
        if row.samples:
            self.checks[f"naive {op} L{L}: output vs the tool's"] = compare_tensors(out, expect)
        shutil.rmtree(out, ignore_errors=True)

    def save(self) -> None:
        """This phase's JSON to --out and the work dir; then the report of every phase found."""
        self.env["bench_seconds"] = round(self.elapsed(), 1)
        data = {"phase": self.phase, "settings": asdict(self.s), "environment": self.env, "checks": self.checks,
                "rows": [dict(asdict(r), seconds=r.seconds, stream_seconds=r.stream_seconds) for r in self.b.rows]}
        text = json.dumps(data, indent=1) + "\n"
        for d in (self.out, self.work):
            (d / f"manycore-phase{self.phase}.json").write_text(text)
        phases = {}
        for d in (self.work, self.out):  # --out last: this run's own file wins
            for f in sorted(d.glob("manycore-phase*.json")):
                p = json.loads(f.read_text())
                phases[p["phase"]] = p
        write_report([phases[k] for k in sorted(phases)], self.out)


def nproc_cmd(module: str, args: list[str], n: int) -> list[str]:
    """`python -m module --nproc n ...` (the tool forks its ranks)."""
    return [sys.executable, "-m", module, "--nproc", str(n), *args]


def torchrun_cmd(module: str, args: list[str], n: int) -> list[str]:
    """`torchrun --standalone --nproc-per-node n -m module ...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", module, *args]


def parse_block(b: str) -> int:
    """dd's block size ("64M", "1M") in bytes."""
    return int(b[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[b[-1]]


def output_layout(d: Path) -> str:
    """Whether checkpoint dir `d` holds per-expert or fused expert tensors (from its index)."""
    try:
        names = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    except (OSError, ValueError, KeyError):
        names = {}
        from safetensors import safe_open

        for f in d.glob("*.safetensors"):
            with safe_open(f, "pt") as g:
                names.update(dict.fromkeys(g.keys()))
    per = any(".experts.0." in k for k in names)
    fused = any(k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj") for k in names)
    return "per-expert" if per and not fused else "fused" if fused and not per else "mixed" if per else "no experts"


def machine_facts(work: Path) -> dict[str, Any]:
    """nproc, RAM, the work dir's disk, kernel, library versions."""
    def out(*c: str) -> str:
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    usage = shutil.disk_usage(work)
    facts: dict[str, Any] = {"nproc": out("nproc"), "disk_total_gb": round(usage.total / GB, 1),
                             "disk_free_gb": round(usage.free / GB, 1),
                             "disk_device": (out("df", "-T", str(work)).splitlines()[-1:] or [""])[0],
                             "kernel_full": out("uname", "-a"), "python_exe": sys.executable}
    for dist in ("torch", "safetensors", "transformers"):
        try:
            facts[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            facts[dist] = None
    spec = importlib.util.find_spec("transformers")  # without importing it (seconds)
    if spec and spec.submodule_search_locations:
        src = Path(list(spec.submodule_search_locations)[0]) / "modeling_utils.py"
        facts["save_original_format_arg"] = src.exists() and "save_original_format: bool" in src.read_text()
    return facts


# -- report ---------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if a == a and b == b and b > 0 else float("nan")


def _fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x != x else format(x, spec)


def summarize(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios and targets from the rows of every phase (a case measured again in a later phase counts once,
    by its later row; the size comparison pairs rows of one phase, measured with the same settings)."""
    by = {r["name"]: r for p in phases for r in p["rows"] if r["samples"]}
    rows = list(by.values())
    s = phases[0]["settings"]
    L, small = s["big"], s["small"]
    cp = {"fuse": by.get(f"cp -r per-expert L{L}"), "split": by.get(f"cp -r fused L{L}")}
    hf = {"fuse": by.get(f"transformers fuse L{L}"), "split": by.get(f"transformers split L{L}")}
    targets: list[dict[str, Any]] = []
    for op in ("fuse", "split"):
        for n in TARGET_RANKS:
            r = by.get(f"{op} L{L} nproc {n}")
            if r is None or cp[op] is None:
                continue
            v = _ratio(cp[op]["seconds"], r["seconds"])
            targets.append({"target": f"{op} end to end >= {TARGET_CP}x cp -r at {n} ranks", "value": v,
                            "met": v >= TARGET_CP})
        tool = [r for r in rows if r["op"] == op and r["layers"] == L]
        if hf[op] is not None and tool:
            worst = max(tool, key=lambda r: r["seconds"])
            v = _ratio(hf[op]["seconds"], worst["seconds"])
            targets.append({"target": f"{op} >= {TARGET_HF}x transformers 5 (slowest rank count: {worst['name']})",
                            "value": v, "met": v >= TARGET_HF})
    tool = [r for r in rows if r["op"] in ("fuse", "split")]
    if tool:
        worst = max(tool, key=lambda r: max(r["peak_rss"]))
        v = max(worst["peak_rss"])
        targets.append({"target": f"peak RSS per rank <= {rss_text(TARGET_RSS)} (largest: {worst['name']})",
                        "value": v, "met": v <= TARGET_RSS})
    flat = []
    for n in s["small_ranks"]:
        pairs = [(q.get(f"fuse L{small} nproc {n}"), q.get(f"fuse L{L} nproc {n}"))
                 for q in ({r["name"]: r for r in p["rows"] if r["samples"]} for p in phases)]
        a, b = next(((x, y) for x, y in reversed(pairs) if x and y), (None, None))
        if a and b:
            flat.append({"ranks": n, "small": max(a["peak_rss"]), "big": max(b["peak_rss"]),
                         "growth": _ratio(max(b["peak_rss"]), max(a["peak_rss"]))})
    if flat:
        v = max(f["growth"] for f in flat)
        targets.append({"target": f"peak RSS per rank flat in size (L{L} / L{small} <= {FLAT})", "value": v,
                        "met": v <= FLAT})
    return {"targets": targets, "flat": flat, "cp": cp, "transformers": hf}


def write_report(phases: list[dict[str, Any]], out: Path) -> None:
    """MANYCORE.md and manycore.json (every phase's rows, the summary) into `out`."""
    summ = summarize(phases)
    env = dict(phases[0]["environment"])
    for p in phases[1:]:
        env.update({k: v for k, v in p["environment"].items() if k not in env})
    checks = {k: v for p in phases for k, v in p["checks"].items()}
    rows = [r for p in phases for r in p["rows"]]
    s = phases[0]["settings"]
    (out / "manycore.json").write_text(json.dumps({"phases": phases, "summary": summ}, indent=1) + "\n")
    cp = summ["cp"]
    hf = summ["transformers"]
    lines = ["# Many-core benchmark", "",
             f"Synthetic `{s['preset']}` per-expert checkpoints (real E, H, I; vocabulary {s['vocab']}; random bytes), "
             f"{s['big']} and {s['small']} layers; one sample per case, page cache dropped before each "
             f"(drop_caches: {env.get('drop_caches')}); wall = the whole command, process start to exit. "
             "Written by `python -m bench.manycore` (phases: " + ", ".join(str(p["phase"]) for p in phases) + ").", "",
             "## Machine", "",
             f"- {env.get('nproc')} CPUs (os.cpu_count {env.get('cpus')}), {env.get('mem_total_gb')} GB RAM, "
             f"kernel {env.get('kernel')}, Python {env.get('python')}",
             f"- disk of the work dir: {env.get('disk_device')} ({env.get('disk_total_gb')} GB, "
             f"{env.get('disk_free_gb')} GB free at the start)",
             f"- torch {env.get('torch')}, safetensors {env.get('safetensors')}, transformers {env.get('transformers')} "
             f"(save_pretrained takes save_original_format: {env.get('save_original_format_arg')}); commit "
             f"{env.get('commit')}; {env.get('date')}", "",
             "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in summ["targets"]:
        v = rss_text(t["value"]) if "RSS per rank <=" in t["target"] else _fmt(t["value"])
        lines.append(f"| {t['target']} | {v} | {'met' if t['met'] else 'NOT met'} |")
    if not summ["targets"]:
        lines.append("| (no comparable rows yet) | - | - |")
    lines += ["", "## All cases", "",
              "| case | GB | wall s | GB/s | data phase s | peak RSS (per rank) | wall vs cp | data phase vs cp "
              "| vs transformers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["samples"]:
            lines.append(f"| {r['name']} | {r['nbytes'] / GB:.2f} | {r['note']} | | | | | | |")
            continue
        op = r["op"] if r["op"] in ("fuse", "split") else r["op"].split("-")[-1]
        ref = cp.get(op) if r["layers"] == s["big"] and op in cp else None
        peer = hf.get(op) if r["layers"] == s["big"] and op in hf else None
        tool = r["op"] in ("fuse", "split")
        rss = rss_text(max(r["peak_rss"])) if max(r["peak_rss"], default=0) else "-"
        lines.append(
            f"| {r['name']} | {r['nbytes'] / GB:.2f} | {r['seconds']:.2f} | {r['nbytes'] / r['seconds'] / GB:.3f} | "
            f"{_fmt(r['stream_seconds'])} | {rss} | "
            f"{_fmt(_ratio(ref['seconds'], r['seconds'])) if ref and tool else '-'} | "
            f"{_fmt(_ratio(ref['seconds'], r['stream_seconds'])) if ref and tool else '-'} | "
            f"{_fmt(_ratio(peer['seconds'], r['seconds'])) if peer and tool else '-'} |")
    if summ["flat"]:
        lines += ["", f"## Peak RSS per rank, L{s['small']} vs L{s['big']} (fuse, --nproc)", "",
                  f"| ranks | L{s['small']} | L{s['big']} | growth |", "|---|---|---|---|"]
        lines += [f"| {f['ranks']} | {rss_text(f['small'])} | {rss_text(f['big'])} | {_fmt(f['growth'])} |"
                  for f in summ["flat"]]
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in checks.items()]
    lines += ["", "## Notes", "",
              "- ratios > 1 mean the tool is faster; `data phase vs cp` uses the slowest rank's data phase "
              "(--stats) instead of the whole command.",
              "- dd writes zeros with O_DIRECT (+ fsync) and reads them back with O_DIRECT: the disk's own limit.",
              "- transformers peers: `from_pretrained(dtype=<the checkpoint's dtype>)` (CPU) then `save_pretrained` with "
              "`save_original_format=False` (fuse) or the default (split); the `output layout` check shows what the "
              "split peer really wrote. Peers run with OMP_NUM_THREADS = CPU count; the tool as launched.",
              ""]
    if checks.get(f"transformers split L{s['big']}: output layout") == "fused":
        lines.insert(-1, "- transformers 5 has no split: `save_original_format` restores the format a model was "
                     "*loaded* from, so from_pretrained of a fused checkpoint + save_pretrained writes it fused again "
                     "(the split peer above is a load + save of the same bytes, not a split).")
    (out / "MANYCORE.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run one phase (or all, or only merge phase files into a report)."""
    p = argparse.ArgumentParser(prog="bench.manycore", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--phase", choices=["1", "2", "3", "all"], default="all",
                   help="3: the 1-rank cases again with their peers (a later phase's rows replace earlier ones)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary dir)")
    p.add_argument("--budget", type=float, default=500.0,
                   help="seconds: optional cases (torchrun, 8 ranks, naive split, split check) that would end later are skipped")
    p.add_argument("--layers", type=int, nargs=2, metavar=("BIG", "SMALL"), default=None,
                   help="layer counts of the two checkpoints (full: 12 6, ~15.2 and ~7.6 GB)")
    p.add_argument("--keep", action="store_true", help="keep the work dir's checkpoints after the last phase")
    p.add_argument("--no-drop-caches", action="store_true", help="only fadvise(DONTNEED) the data files")
    p.add_argument("--merge", nargs="+", default=None, help="only write the report from these phase JSON files")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        phases = {}
        for f in a.merge:
            ph = json.loads(Path(f).read_text())
            phases[ph["phase"]] = ph
        write_report([phases[k] for k in sorted(phases)], out)
        print(f"wrote {out / 'MANYCORE.md'}")
        return
    import tempfile

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="moe-manycore-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = PRESETS[a.preset]
    if a.layers:
        settings = Settings(**{**asdict(settings), "big": a.layers[0], "small": a.layers[1]})
    mc = ManyCore(settings, work, out, a.phase, not a.no_drop_caches, a.budget)
    specs, _ = checkpoint_specs(settings.preset, settings.big, experts=settings.experts, vocab=settings.vocab)
    have = sum(dir_bytes(d) for d in (mc.src[settings.big], mc.fused) if d.exists())
    check_disk(work, 3 * sum(x.nbytes for x in specs) - have)  # source + fused + one output at a time
    mc.log(f"work dir {work}; drop_caches {mc.b.drop_caches}; {mc.env.get('nproc')} CPUs; "
           f"{mc.env.get('disk_free_gb')} GB free")
    try:
        if a.phase in ("1", "all"):
            mc.phase1()
        if a.phase == "1":
            mc.phase1_extra()
        if a.phase in ("2", "all"):
            mc.phase2()
        if a.phase == "all":
            mc.phase1_extra()
        if a.phase in ("2", "all"):
            mc.phase2_extra()
        if a.phase == "3":
            mc.phase3()
        mc.save()
        mc.log(f"wrote {out / 'MANYCORE.md'}")
    finally:
        for name in ("out", "naive", "hf", "dd.bin", "split-check", "stats.json"):
            path = work / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if a.phase != "1" and not a.keep:
            for d in (*mc.src.values(), mc.fused):
                shutil.rmtree(d, ignore_errors=True)
            if not a.workdir:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
