"""LoRA merge (issue #24): `convert.merge_adapter` against peft merge_and_unload + save_pretrained and `cp -r`.

    python -m bench.merge --preset small                  # here: a 2-layer, 8-expert Qwen3-MoE-shaped base
    python -m bench.merge --preset large --out $OUT       # lent 16-core machine: ~15 GB bf16 base, one command

Inputs (bench.synthetic / bench.dequant writers, N(0, 0.02) values): a Qwen3-30B-A3B-shaped base in bf16
(hidden 2048, moe_intermediate 768, 128 experts; `large`: 12 layers, ~15 GB) with a peft target_parameters
adapter of rank 16 on every expert (gate_up_proj, down_proj: lora_A [E*r, in], lora_B [out, r*E]) and on
q/k/v/o_proj, float32 as peft saves float32 LoRA; and a DeepSeek-V3-shaped FP8 MoE layer (bench.dequant's
`full` preset, 11.6 GB) with a rank-16 per-expert adapter on every expert's gate/up/down_proj.

Cases, each one command timed end to end (process start-up included), page cache dropped before each where
allowed and the code pages of python, torch, the tool and the peers read in again (as bench.run takes a cold
cache: the data cold, the programs not), else posix_fadvise(DONTNEED) of the inputs; outputs deleted after each:
`cp -r` of the base; the tool at each rank count (`--nproc N --stats`); with --ceiling, the tool's byte copy of
the same base (`fuse_experts`: the same bytes read and written with no compute, what the disk allows a merge);
peft (`from_pretrained` in bf16, `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`) where it
fits memory; tinker-cookbook's shard merge where the package is importable (it is not installed by the
constraints: reported as not run otherwise). Every case ends with its output on disk: `cp -r` runs `sync` on its
files, the tool fsyncs its own before it commits, and each peer's script fsyncs every file it wrote before it
exits (its row's `sync_s`: the peer alone would return with those bytes still in the page cache; the report gives
the ratio without them too). Peak RSS: the tool's --stats (VmHWM of every rank), the peer's own VmHWM. Targets:
>= 0.8x cp -r end to end at the most ranks, >= 3x the fastest peer, <= 1 GiB peak RSS per rank.

--repeats N runs the bf16 cases in N rounds (cp -r, the tool, the peers in each) and reports medians; --timeline
samples the disk and CPUs during each case (bench.timeline); --tool-env VAR=VALUE adds the tool with that setting,
--tool-tree DIR the tool from another checkout.
Writes MERGE-<preset>.md and merge-<preset>.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.timeline import Timeline, summary

REPO = Path(__file__).resolve().parent.parent
# The end of each peer's script: its output fsynced (timed: `sync_s`) and one JSON line of peak RSS, `sync_s` and
# the script's own `report`.
SYNCED_EXIT = r"""
t = time.perf_counter()
for root, _, names in os.walk(dst):  # the output on disk, as the tool's commit and `cp -r && sync` leave theirs
    for name in names:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
sync_s = time.perf_counter() - t
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"peak_rss_bytes": hwm, "sync_s": sync_s, **report}))
"""
PEER = r"""
import json, os, sys, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, dst = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(dst, max_shard_size="5GB")
report = {"torch_threads": torch.get_num_threads()}
""" + SYNCED_EXIT
# tinker-cookbook 0.6.1's shard merge: build_hf_model(merge_strategy="shard") from local paths, on an adapter in
# Tinker's layout (bench.merge_peers.write_tinker_adapter). tinker_cookbook/weights/__init__.py also imports
# weights.download (the Tinker SDK and pyrage) and the Hub publishing helpers, which the merge never calls: the
# package stands in without its __init__, so only the merge path's own modules load (torch, transformers,
# safetensors). It loads the adapter onto CUDA where available (its own default), the shards on the CPU.
TINKER = r"""
import json, os, sys, time, types
import tinker_cookbook
base, adapter, dst = sys.argv[1:4]
pkg = types.ModuleType("tinker_cookbook.weights")
pkg.__path__ = [os.path.join(os.path.dirname(tinker_cookbook.__file__), "weights")]
sys.modules["tinker_cookbook.weights"] = pkg
from tinker_cookbook.weights._export import build_hf_model
import torch
build_hf_model(base_model=base, adapter_path=adapter, output_path=dst, merge_strategy="shard")
report = {"adapter_device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()}
""" + SYNCED_EXIT


@dataclass(frozen=True)
class Preset:
    layers: int
    experts: int
    vocab: int
    ranks: tuple[int, ...]
    fp8: str | None  # bench.dequant preset of the FP8 case, None: no FP8 case
    peer: bool


PRESETS = {
    "small": Preset(layers=2, experts=8, vocab=8192, ranks=(1, 4), fp8="tiny", peer=True),
    "large": Preset(layers=12, experts=128, vocab=151936, ranks=(1, 4, 16), fp8="full", peer=True),
}
RANK = 16


def write_peft_adapter(dst: Path, layers: int, E: int, H: int, I: int, attn: dict[str, tuple[int, int]],
                       seed: int = 0) -> None:
    """A peft target_parameters adapter (float32) on every expert and the attention projections."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}

    def f(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(np.float32)

    for layer in range(layers):
        p = f"base_model.model.model.layers.{layer}"
        t[f"{p}.mlp.experts.base_layer.lora_A.weight"] = f(E * RANK, H)
        t[f"{p}.mlp.experts.base_layer.lora_B.weight"] = f(2 * I, RANK * E)
        t[f"{p}.mlp.experts.lora_A.weight"] = f(E * RANK, I)
        t[f"{p}.mlp.experts.lora_B.weight"] = f(H, RANK * E)
        for proj, (out, inp) in attn.items():
            t[f"{p}.self_attn.{proj}.lora_A.weight"] = f(RANK, inp)
            t[f"{p}.self_attn.{proj}.lora_B.weight"] = f(out, RANK)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": sorted(attn),
           "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "task_type": "CAUSAL_LM",
           "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "rank_pattern": {},
           "alpha_pattern": {}, "base_model_name_or_path": "Qwen/Qwen3-30B-A3B", "fan_in_fan_out": False,
           "init_lora_weights": True, "modules_to_save": None}
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def write_bf16_case(base: Path, adapter: Path, layers: int, experts: int, vocab: int) -> float:
    """The bf16 case: a Qwen3-30B-A3B-shaped bf16 base in `base` (`layers`, `experts`, `vocab`; normal values, 5 GB
    shards) and in `adapter` a peft target_parameters adapter of rank RANK on every expert's gate_up and down and
    on q/k/v/o; returns the base's GB."""
    from bench.synthetic import checkpoint_specs, write_synthetic

    specs, cfg = checkpoint_specs("qwen3-30b-a3b", layers, "BF16", experts=experts, vocab=vocab)
    gb = write_synthetic(str(base), specs, cfg, 5_000_000_000, data="normal", jobs=os.cpu_count() or 1) / 1e9
    write_peft_adapter(adapter, layers, experts, 2048, 768,
                       {"q_proj": (4096, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048), "o_proj": (2048, 4096)})
    return gb


def write_per_expert_adapter(dst: Path, layers: int, E: int, H: int, I: int, seed: int = 0) -> None:
    """A per-expert adapter (float32) on every expert's gate/up/down_proj (DeepSeek-V3 names)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for e in range(E):
            for proj, (out, inp) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                m = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"
                t[f"{m}.lora_A.weight"] = rng.standard_normal((RANK, inp), dtype=np.float32) * 0.01
                t[f"{m}.lora_B.weight"] = rng.standard_normal((out, RANK), dtype=np.float32) * 0.01
    dst.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 32,
                                                         "target_modules": ["gate_proj", "up_proj", "down_proj"]}))


# Imported after a drop_caches so that every case starts with its code pages in memory, as bench.run's cases do
# (the data is cold, python and torch are not): the tool's and both peers' modules.
WARM = ("import importlib.util, torch, safetensors, numpy, convert.merge_adapter\n"
        "for m in ('transformers', 'peft', 'tinker_cookbook'):\n"
        "    try:\n        importlib.util.find_spec(m) and __import__(m)\n    except Exception:\n        pass\n")


def drop(paths: list[Path], env: dict[str, str]) -> str:
    """Evict the inputs from the page cache (bench.run.cold_cache: drop_caches where allowed, then WARM)."""
    from bench.run import cold_cache

    return cold_cache(paths, True, 0.0, WARM, env, REPO)


@dataclass
class Case:
    """One command timed in every round: its row's name, the command, its inputs (dropped from the page cache
    before it runs), environment, --stats file, whether --timeline samples it, and where it runs."""

    name: str
    cmd: list[str]
    inputs: list[Path]
    env: dict[str, str]
    stats: Path | None = None
    cwd: Path | None = None
    sampled: bool = True


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def as_typed(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the thread-count variables a harness may set (THREAD_VARIABLES): every case runs as a
    user types it, the peers' torch with its own default threads, the tool with the limits it sets itself."""
    return {k: v for k, v in environ.items() if k not in THREAD_VARIABLES}


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    return time.perf_counter() - t0, proc


def run_case(rows: list[dict[str, Any]], name: str, cmd: list[str], inputs: list[Path], out: Path,
             env: dict[str, str], stats: Path | None = None, sample: bool = False, round_: int = 0,
             cwd: Path | None = None) -> None:
    """Run one case cold (drop), time it, and append its row: seconds, rc, the tool's --stats (peak RSS per rank,
    thread seconds per phase, data phase) or a peer's own JSON line, with `sample` the machine's timeline
    (bench.timeline) of the disk holding `out`; `cwd`: where the command runs (a `python -m` imports from there
    first)."""
    shutil.rmtree(out, ignore_errors=True)
    cache = drop(inputs, env)
    with Timeline(out.parent, 0.25 if sample else 0.0) as tl:
        seconds, proc = timed(cmd, env, cwd)
    row: dict[str, Any] = {"case": name, "seconds": round(seconds, 3), "rc": proc.returncode, "cache": cache}
    if round_:
        row["round"] = round_
    if sample:
        row["timeline"] = tl.result()
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
    if stats is not None and stats.exists():
        s = json.loads(stats.read_text())
        row["peak_rss_per_rank"] = max(r["peak_rss_bytes"] for r in s["ranks"])
        phases: dict[str, float] = {}
        for r in s["ranks"]:  # where the ranks' worker threads spent the streaming phase, summed
            for k, v in (r.get("phase_seconds") or {}).items():
                phases[k] = round(phases.get(k, 0.0) + v, 2)
        row["phase_thread_s"] = phases
        spans = [r["data_span"] for r in s["ranks"] if r.get("data_span")]
        if spans:  # the streaming phase, first rank's start to last rank's end (the rest: start-up, plan, commit)
            row["data_s"] = round(max(b for _, b in spans) - min(a for a, _ in spans), 3)
    elif proc.returncode == 0 and proc.stdout.strip().splitlines()[-1:] and \
            proc.stdout.strip().splitlines()[-1].startswith("{"):
        last = json.loads(proc.stdout.strip().splitlines()[-1])
        row["peak_rss_per_rank"] = last["peak_rss_bytes"]
        for key in ("adapter_device", "sync_s", "torch_threads"):
            if key in last:
                row[key] = round(last[key], 3) if key == "sync_s" else last[key]
    rows.append(row)
    print(json.dumps(row), flush=True)
    shutil.rmtree(out, ignore_errors=True)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def peer_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """The tool at its most ranks against the fastest peer: in each round that timed both, and of the medians."""
    def ok(r: dict[str, Any]) -> bool:
        return r["rc"] == 0 and r["seconds"] > 0

    tools = [r for r in rows if ok(r) and r["case"].startswith("tool ") and "rank(s)" in r["case"]
             and "," not in r["case"] and "byte copy" not in r["case"]]
    peers = [r for r in rows if ok(r) and not r["case"].startswith(("tool ", "cp "))]
    if not tools or not peers:
        return []
    most = max(int(r["case"].split()[1]) for r in tools)
    name = f"tool {most} rank(s)"
    def unsynced(r: dict[str, Any]) -> float:
        return float(r["seconds"] - r.get("sync_s", 0.0))

    lines = []
    for k in sorted({r.get("round", 0) for r in rows}):
        t = [r["seconds"] for r in tools if r["case"] == name and r.get("round", 0) == k]
        p = [r for r in peers if r.get("round", 0) == k]
        if t and p:
            f = min(p, key=lambda r: r["seconds"])
            lines.append(f"- round {k}: {name} {t[0]:.2f} s; fastest peer {f['seconds']:.2f} s, {unsynced(f):.2f} s "
                         f"before its fsync: {f['seconds'] / t[0]:.2f}x ({unsynced(f) / t[0]:.2f}x)")
    t_med = _median([r["seconds"] for r in tools if r["case"] == name])
    by_peer: dict[str, list[dict[str, Any]]] = {}
    for r in peers:
        by_peer.setdefault(r["case"], []).append(r)
    peer, p_rows = min(by_peer.items(), key=lambda cv: _median([r["seconds"] for r in cv[1]]))
    p_med, p_uns = _median([r["seconds"] for r in p_rows]), _median([unsynced(r) for r in p_rows])
    lines.append(f"- medians: {name} {t_med:.2f} s; {peer} {p_med:.2f} s, {p_uns:.2f} s before its fsync: "
                 f"**{p_med / t_med:.2f}x** ({p_uns / t_med:.2f}x)")
    return lines


def markdown(res: dict[str, Any]) -> str:
    """The report: every row (each against `cp -r` of its own round), then, with rounds, each case's median, the
    tool against the fastest peer, and the timelines' one-line summaries."""
    base = f"bf16 base {res['base_gb']:.2f} GB; " if res["base_gb"] else ""  # 0: the FP8 case alone
    lines = [f"# convert.merge_adapter, preset {res['preset']}", "", base + res["env"], "",
             "| case | seconds | vs cp -r | data phase s | peak RSS / rank | thread s: read/compute/write/copy/writeback "
             "| rank s: prefetch thread/wait | rc |",
             "|---|---|---|---|---|---|---|---|"]
    for suite, rows in res["suites"].items():
        cps = {r.get("round", 0): r["seconds"] for r in rows if r["case"].startswith("cp")}
        for r in rows:
            cp = cps.get(r.get("round", 0))
            ratio = f"{cp / r['seconds']:.2f}x" if cp and r["rc"] == 0 else "-"
            rss = f"{r['peak_rss_per_rank'] / 2**20:.0f} MiB" if "peak_rss_per_rank" in r else "-"
            data = f"{r['data_s']:.2f}" if "data_s" in r else f"(fsync {r['sync_s']:.2f})" if "sync_s" in r else "-"
            ph = r.get("phase_thread_s") or {}
            threads = "/".join(f"{ph.get(k, 0):.1f}" for k in ("read", "compute", "write", "copy", "writeback")) \
                if ph else "-"
            rank = "/".join(f"{ph.get(k, 0):.1f}" for k in ("prefetch", "wait")) if ph else "-"
            case = r["case"] + (f" (adapter on {r['adapter_device']})" if "adapter_device" in r else "")
            case += f", round {r['round']}" if "round" in r else ""
            lines.append(f"| {suite}: {case} | {r['seconds']:.2f} | {ratio} | {data} | {rss} | {threads} | {rank} "
                         f"| {r['rc']} |")
    for suite, rows in res["suites"].items():
        if any("round" in r for r in rows):
            lines += ["", f"Medians, {suite}:", "", "| case | runs | median s | vs median cp -r |", "|---|---|---|---|"]
            by: dict[str, list[float]] = {}
            for r in rows:
                if r["rc"] == 0:
                    by.setdefault(r["case"], []).append(r["seconds"])
            cp_med = _median(by["cp -r"]) if by.get("cp -r") else 0.0
            for case, secs in by.items():
                ratio = f"{cp_med / _median(secs):.2f}x" if cp_med else "-"
                lines.append(f"| {case} | {len(secs)} | {_median(secs):.2f} | {ratio} |")
        ratios = peer_ratios(rows)
        if ratios:
            lines += ["", f"Against the fastest peer, {suite}:", "", *ratios]
        sampled = [r for r in rows if r.get("timeline")]
        if sampled:
            lines += ["", f"Timelines (bench.timeline, every {sampled[0]['timeline']['interval']} s), {suite}:", ""]
            lines += [f"- {r['case']}" + (f", round {r['round']}" if "round" in r else "") + f": {summary(r['timeline'])}"
                      for r in sampled]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Write the inputs, run every case, write the report."""
    from bench.dequant import FP8_CODES

    p = argparse.ArgumentParser(prog="bench.merge", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--no-peer", action="store_true", help="skip peft merge_and_unload")
    p.add_argument("--no-tinker", action="store_true", help="skip tinker-cookbook's shard merge")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--no-fp8", action="store_true", help="skip the FP8 case")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 case (run the FP8 case alone)")
    p.add_argument("--fp8-codes", choices=FP8_CODES, default=FP8_CODES[0],
                   help="how the FP8 weights' codes are drawn (bench.dequant.FP8_CODES)")
    p.add_argument("--workers", default="", help="comma-separated --workers values to run the tool with as well")
    p.add_argument("--ceiling", action="store_true",
                   help="bf16: also time the tool's byte copy of the same base (fuse_experts) at the most ranks")
    p.add_argument("--ranks", default="", help="comma-separated rank counts of the tool (default: the preset's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="bf16: run every case this many times, in rounds (each round: cp -r, the tool, the peers; "
                        "every other round in reverse order); the report adds each case's median and the ratios of "
                        "medians")
    p.add_argument("--tool-env", action="append", default=[], metavar="VAR=VALUE",
                   help="bf16: also run the tool at the most ranks with this variable set (repeatable: one case each)")
    p.add_argument("--tool-tree", action="append", default=[], metavar="DIR",
                   help="bf16: also run the tool at the most ranks from this source tree (another checkout of the "
                        "repository; repeatable: one case each)")
    p.add_argument("--timeline", action="store_true",
                   help="bf16: sample the disk's read/write rates, busy CPUs and dirty pages during each case "
                        "(bench.timeline), into its row")
    args = p.parse_args(argv)
    pre = PRESETS[args.preset]
    if args.ranks:
        pre = dataclasses.replace(pre, ranks=tuple(int(n) for n in args.ranks.split(",")))
    if args.layers:
        pre = dataclasses.replace(pre, layers=args.layers)
    if args.no_fp8:
        pre = dataclasses.replace(pre, fp8=None)
    extra_workers = [int(w) for w in args.workers.split(",") if w]
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.workdir))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(as_typed(os.environ), PYTHONPATH=str(REPO))
    res: dict[str, Any] = {"preset": args.preset, "suites": {}, "env": f"{os.cpu_count()} cores", "base_gb": 0.0}
    try:
        if not args.no_bf16:
            base, adapter = work / "base", work / "adapter"
            t0 = time.perf_counter()
            res["base_gb"] = write_bf16_case(base, adapter, pre.layers, pre.experts, pre.vocab)
            res["generate_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({"generated_gb": res["base_gb"], "seconds": res["generate_s"]}), flush=True)
            rows: list[dict[str, Any]] = []
            tinker = not args.no_tinker and importlib.util.find_spec("tinker_cookbook") is not None
            if tinker:
                from bench.merge_peers import tinker_env, write_tinker_adapter

                tinker_adapter = work / "tinker-adapter"
                write_tinker_adapter(adapter, tinker_adapter)
            tool = [sys.executable, "-m", "convert.merge_adapter", "--base", str(base), "--adapter", str(adapter),
                    "--dst", str(work / "out"), "--no-progress"]
            cases = [Case("cp -r", ["bash", "-c", f'cp -r "{base}" "{work / "out"}" && sync "{work / "out"}"/*'],
                          [base], env)]
            for n in pre.ranks:
                for workers in [None, *extra_workers]:
                    stats = work / f"stats-{n}.json"
                    more = ["--workers", str(workers)] if workers else []
                    cases.append(Case(f"tool {n} rank(s)" + (f", --workers {workers}" if workers else ""),
                                      [*tool, "--nproc", str(n), "--stats", str(stats), *more], [base, adapter], env,
                                      stats))
            n = max(pre.ranks)
            for assignment in args.tool_env:  # the same command at the most ranks, one variable set
                key, _, value = assignment.partition("=")
                stats = work / f"stats-env-{n}.json"
                cases.append(Case(f"tool {n} rank(s), {assignment}", [*tool, "--nproc", str(n), "--stats", str(stats)],
                                  [base, adapter], dict(env, **{key: value}), stats))
            for tree in args.tool_tree:  # the same command from another checkout (an A/B of code in one run)
                stats = work / f"stats-tree-{n}.json"
                path = Path(tree).resolve()
                cases.append(Case(f"tool {n} rank(s), tree {tree}", [*tool, "--nproc", str(n), "--stats", str(stats)],
                                  [base, adapter], dict(env, PYTHONPATH=str(path)), stats, cwd=path))
            if args.ceiling:  # the same bytes read and written by the tool's byte copies: the disk's bound
                cases.append(Case(f"tool byte copy (fuse_experts) {n} rank(s)",
                                  [sys.executable, "-m", "convert.fuse_experts", "--src", str(base), "--dst",
                                   str(work / "out"), "--nproc", str(n), "--no-progress", "--stats",
                                   str(work / "stats-copy.json")], [base], env, work / "stats-copy.json"))
            if pre.peer and not args.no_peer:
                cases.append(Case("peft merge_and_unload + save_pretrained",
                                  [sys.executable, "-c", PEER, str(base), str(adapter), str(work / "out")],
                                  [base, adapter], env, sampled=False))
            if tinker:
                cases.append(Case("tinker-cookbook shard merge", [sys.executable, "-c", TINKER, str(base),
                                                                  str(tinker_adapter), str(work / "out")],
                                  [base, tinker_adapter], tinker_env(env)))
            for k in range(1, args.repeats + 1):
                # every other round runs the cases in reverse: whatever a case leaves behind (its output's
                # deletion, the disk's state) falls on each neighbour alike, not always on the one after it
                for case in cases if k % 2 else cases[::-1]:
                    run_case(rows, case.name, case.cmd, case.inputs, work / "out", case.env, case.stats,
                             sample=args.timeline and case.sampled, round_=k if args.repeats > 1 else 0, cwd=case.cwd)
            if not tinker:
                why = "skipped (--no-tinker)" if args.no_tinker else "not run: tinker-cookbook is not installed"
                rows.append({"case": "tinker-cookbook shard merge", "seconds": 0.0, "rc": -1, "error": [why]})
            else:
                shutil.rmtree(tinker_adapter, ignore_errors=True)
            res["suites"]["qwen3-30b-a3b bf16, peft target_parameters r16 + attention"] = rows
            (out_dir / f"merge-{args.preset}.json").write_text(json.dumps(res, indent=2))
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(adapter, ignore_errors=True)
        if pre.fp8:
            from bench.dequant import PRESETS as FP8
            from bench.dequant import generate

            shape = dataclasses.replace(FP8[pre.fp8], fp8_codes=args.fp8_codes)
            fbase, fad = work / "fp8", work / "fp8-adapter"
            generate(fbase, shape, os.cpu_count() or 1)
            write_per_expert_adapter(fad, shape.layers, shape.experts, shape.hidden, shape.inter)
            rows = []
            run_case(rows, "cp -r", ["bash", "-c", f'cp -r "{fbase}" "{work / "out"}" && sync "{work / "out"}"/*'],
                     [fbase], work / "out", env)
            for n in pre.ranks:
                stats = work / f"stats-fp8-{n}.json"
                run_case(rows, f"tool {n} rank(s)", [sys.executable, "-m", "convert.merge_adapter", "--base", str(fbase),
                                                      "--adapter", str(fad), "--dst", str(work / "out"), "--nproc",
                                                      str(n), "--no-progress", "--stats", str(stats)],
                         [fbase, fad], work / "out", env, stats)
            res["suites"][f"deepseek-v3 FP8 layer ({args.fp8_codes} codes), per-expert r16 (requantized)"] = rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out_dir / f"merge-{args.preset}.json").write_text(json.dumps(res, indent=2))
    (out_dir / f"MERGE-{args.preset}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
