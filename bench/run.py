"""The benchmark: the tool against `cp`, the naive approach and raw save_file, measured in one run.

    python -m bench.run [--quick] [--out bench/results]

Generates synthetic checkpoints of real model shapes (random bytes, so nothing is sparse)
into a temporary directory it removes at the end, then times every case from a cold
page cache (sync + drop_caches when allowed, else posix_fadvise(DONTNEED) on the data),
repeating cases round-robin so drift on a shared machine hits all of them alike. Writes
RESULTS.md, results.json and a plot to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.report import CP_OPS
from bench.synthetic import adapter_specs, checkpoint_specs, write_adapter, write_synthetic
from launch.readahead import mem_available

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


@dataclass(frozen=True)
class Settings:
    """What one benchmark run covers."""

    preset: str = "qwen3-30b-a3b"
    experts: int | None = None  # None = the preset's real E
    vocab: int = 32000  # smaller than the real vocabulary so expert layers dominate, as in the full model
    layers: tuple[int, ...] = (2, 4)  # the second doubles the first: growth of time and memory
    world_sizes: tuple[int, ...] = (1, 2, 4)
    ep_cases: tuple[tuple[int, int], ...] = ((2, 16), (4, 16))  # (world size, --ep > world size), at the smallest L
    repeats: int = 3
    split_layers: tuple[int, ...] = (2,)  # layer counts at which split is measured
    adapters: tuple[tuple[str, int], ...] = (("shared_w123", 8), ("peft_target_parameters", 24))
    adapter_world_sizes: tuple[int, ...] = (1, 2)
    naive: bool = True
    # A second family through the compute path (transpose + interleave), informational: (preset, layers, experts).
    other_family: tuple[str, int, int | None] | None = ("gpt-oss-20b", 1, None)
    other_world_sizes: tuple[int, ...] = (1, 2)
    max_shard: int = 5_000_000_000
    src_shard: int = 4_000_000_000
    settle_seconds: float = 1.0


FULL = Settings()
QUICK = Settings(experts=32, vocab=8000, layers=(1, 2), repeats=1, split_layers=(1,), ep_cases=((2, 16),),
                 adapters=(("shared_w123", 2), ("peft_target_parameters", 4)), settle_seconds=0.5,
                 other_family=("gpt-oss-20b", 1, 4))
TINY = Settings(preset="tiny", experts=None, vocab=128, layers=(1, 2), world_sizes=(1,), ep_cases=((2, 3),),
                repeats=1, split_layers=(), adapters=(("tiny_shared_w123", 2),), adapter_world_sizes=(1,),
                max_shard=200_000, src_shard=100_000, settle_seconds=0.0,
                other_family=("tiny-gpt-oss", 1, None), other_world_sizes=(1,))
PRESETS = {"full": FULL, "quick": QUICK, "tiny": TINY}


@dataclass
class Row:
    """One benchmarked case: its samples (seconds) and what the last sample reported."""

    name: str
    op: str  # cp, fuse, split, naive-fuse, naive-split, dry-run, split_adapter, save_file; family-* (other_family)
    layers: int
    ws: int
    ep: int
    nbytes: int
    samples: list[float] = field(default_factory=list)
    stream: list[float] = field(default_factory=list)  # the tool's data phase (slowest rank), per sample
    peak_rss: list[int] = field(default_factory=list)  # largest process of the case (OS), per sample
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per-rank stats of the last sample
    note: str = ""
    in_bytes: int = 0  # source bytes, where they differ from nbytes (adapters)

    @property
    def seconds(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def stream_seconds(self) -> float:
        return statistics.median(self.stream) if self.stream else float("nan")

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / GB if self.samples else float("nan")

    @property
    def stream_gbps(self) -> float:
        return self.nbytes / self.stream_seconds / GB if self.stream else float("nan")


@dataclass
class Case:
    """How to take one sample of a Row."""

    row: Row
    cmd: list[str]
    inputs: list[Path]  # evicted from the page cache before each sample (unless `warm`)
    out: Path | None = None  # removed before and after each sample
    stats: Path | None = None  # the tool's --stats file
    repeats: int = 1
    env: dict[str, str] = field(default_factory=dict)
    warm: bool = False  # read the inputs into the page cache before timing
    seconds_from_output: bool = False  # the command times itself (prints {"seconds": ...})


def pythonpath() -> str:
    """The repository first, then whatever PYTHONPATH held (packages carried to another machine)."""
    return os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


class Bench:
    """Runs cases in a work directory and collects Rows."""

    def __init__(self, settings: Settings, work: Path, drop_caches: bool, log: Any) -> None:
        self.s, self.work, self.log = settings, work, log
        self.drop_caches = drop_caches and _try_drop_caches()
        self.env = dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1")
        self.rows: list[Row] = []

    # -- running one sample --------------------------------------------------
    def cold(self, data_dirs: list[Path]) -> None:
        """Flush dirty pages and evict the data from the page cache (code pages are warmed again)."""
        cold_cache(data_dirs, self.drop_caches, self.s.settle_seconds, WARM_CODE, self.env, REPO)

    def launch(self, module: str, args: list[str], ws: int) -> list[str]:
        """The command running `module` with `ws` ranks on this machine, as the README has users type it
        (`python -m module --nproc ws`: the tool forks its ranks)."""
        if ws == 1:
            return [sys.executable, "-m", module, *args]
        return [sys.executable, "-m", module, "--nproc", str(ws), *args]

    def timed(self, cmd: list[str], data_dirs: list[Path], env: dict[str, str] | None = None,
              warm: bool = False) -> tuple[float, int, str]:
        """Run `cmd` from a cold cache; returns (wall seconds, peak RSS of its largest process, output).

        The RSS is the OS's ru_maxrss of the process tree, which also counts this process's image
        at fork time: processes that report their own VmHWM (the tool's --stats, the baselines) override it.
        """
        self.cold(data_dirs)
        if warm:
            for d in data_dirs:
                for f in sorted(d.rglob("*")):
                    if f.is_file():
                        with open(f, "rb") as fh:
                            while fh.read(16 << 20):
                                pass
        with tempfile.TemporaryFile("w+") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                    cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            text = out.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-4000:]}")
        return seconds, usage.ru_maxrss * 1024, text

    def sample(self, case: Case) -> None:
        """Take one sample of `case`."""
        row = case.row
        if case.out is not None:
            _remove(case.out)
        seconds, rss, text = self.timed(case.cmd, case.inputs, case.env, case.warm)
        reported = _last_json(text)
        if case.seconds_from_output:
            seconds = reported["seconds"]
        rss = int(reported.get("peak_rss_bytes", rss))
        row.samples.append(seconds)
        row.peak_rss.append(rss if row.op not in CP_OPS else 0)
        if case.stats is not None:
            data = json.loads(case.stats.read_text())
            row.ranks = data["ranks"]
            row.stream.append(max(r["seconds"] for r in data["ranks"]))
            row.peak_rss[-1] = max(r["peak_rss_bytes"] for r in data["ranks"])
        self.log(f"  {row.name}: {seconds:.2f} s ({row.nbytes / seconds / GB:.3f} GB/s)"
                 + (f", data phase {row.stream[-1]:.2f} s" if case.stats is not None else "")
                 + (f", peak RSS {rss_text(row.peak_rss[-1])}" if row.op not in CP_OPS else ""))
        if case.out is not None:
            _remove(case.out)

    def run_rounds(self, cases: list[Case]) -> None:
        """Sample every case round-robin (case i in round k if k < its repeats) and keep their rows."""
        rounds = max((c.repeats for c in cases), default=0)
        for k in range(rounds):
            self.log(f"round {k + 1}/{rounds}")
            for c in cases:
                if k < c.repeats:
                    self.sample(c)
        self.rows += [c.row for c in cases]


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, if it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object on the last line of a baseline's output ({} when there is none)."""
    lines = text.strip().splitlines()
    try:
        obj = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def rss_text(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# What every case imports, read in again after a drop_caches: the data is cold, the programs are not.
WARM_CODE = "import torch, torch.distributed.run, safetensors, numpy, tqdm, fsspec, convert.engine.job"


def cold_cache(data_dirs: list[Path], drop: bool, settle: float, warm: str, env: dict[str, str], cwd: Path) -> str:
    """Flush dirty pages, wait `settle` seconds (the device finishing discards of files removed before), evict the
    files below `data_dirs` (posix_fadvise DONTNEED) and, where `drop` and allowed, drop the whole page cache and
    run the python code `warm` (with `env`, in `cwd`) to read the programs' pages in again. Returns "drop_caches"
    or "fadvise"."""
    os.sync()
    time.sleep(settle)
    for d in data_dirs:
        _fadvise_dontneed(d)
    if drop and _try_drop_caches():
        subprocess.run([sys.executable, "-c", warm], env=env, cwd=cwd, check=True, capture_output=True)
        return "drop_caches"
    return "fadvise"


def _try_drop_caches() -> bool:
    """sync + drop the page cache (root only); True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def _fadvise_dontneed(root: Path) -> None:
    """Evict every file below `root` from the page cache (works without root)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def dir_bytes(root: Path, suffix: str = ".safetensors") -> int:
    """Bytes of the files below `root` ending in `suffix`."""
    return sum(p.stat().st_size for p in root.rglob(f"*{suffix}"))


def cp_command(src: Path, dst: Path) -> list[str]:
    """`cp -r` then fsync of every copied file (the tool fsyncs its output too)."""
    return ["bash", "-c", f'cp -r "{src}" "{dst}" && sync "{dst}"/*']


def check_disk(work: Path, need: int) -> None:
    """Refuse to start when the work directory's disk has less than `need` bytes (+10%) free."""
    free = shutil.disk_usage(work).free
    if free < need * 1.1:
        raise SystemExit(f"bench: needs ~{need * 1.1 / GB:.1f} GB free in {work}, has {free / GB:.1f} GB; "
                         "pass --workdir on a larger disk or --quick")


def compare_tensors(a: Path, b: Path, limit: int = 40) -> str:
    """Compare up to `limit` tensors (expert tensors first) of checkpoint dirs a and b byte for byte."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as g:
                out.update({k: f for k in g.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return f"tensor sets differ: {sorted(set(ia) ^ set(ib))[:5]}"
    names = sorted(ia, key=lambda k: (".experts." not in k, k))[:limit]
    for k in names:
        with safe_open(ia[k], "pt") as ga, safe_open(ib[k], "pt") as gb:
            x, y = ga.get_tensor(k), gb.get_tensor(k)
            if x.shape != y.shape or x.dtype != y.dtype or x.view(-1).view(dtype=_u8()).numpy().tobytes() != \
                    y.view(-1).view(dtype=_u8()).numpy().tobytes():
                return f"{k} differs"
    return f"identical ({len(names)} of {len(ia)} tensors compared byte for byte)"


def _u8() -> Any:
    import torch

    return torch.uint8


def run_base(b: Bench, fused_dirs: dict[int, Path], sources: dict[int, Path]) -> dict[str, str]:
    """Every base-weight case: cp, the tool at each world size and ep, naive; fuse then split."""
    s = b.s
    checks: dict[str, str] = {}
    cases: list[Case] = []
    out, stats = b.work / "out", b.work / "stats.json"
    smallest = min(s.layers)
    for layers in s.layers:
        reps = s.repeats if layers == smallest else max(1, s.repeats - 1)
        src = sources[layers]
        nbytes = dir_bytes(src)
        base = ["--src", str(src), "--dst", str(out), "--no-progress", "--stats", str(stats),
                "--max-shard-size", str(s.max_shard)]
        cases.append(Case(Row(f"cp -r per-expert L{layers}", "cp", layers, 1, 0, nbytes), cp_command(src, out),
                          [src], out, repeats=reps))
        for ws in s.world_sizes:
            cases.append(Case(Row(f"fuse L{layers} ws{ws}", "fuse", layers, ws, ws, nbytes),
                              b.launch("convert.fuse_experts", base, ws), [src], out, stats, reps))
        if layers == smallest:
            cases.append(Case(Row(f"fuse L{layers} ws1 with copy_file_range", "fuse-kernel-copy", layers, 1, 1, nbytes),
                              b.launch("convert.fuse_experts", base, 1), [src], out, stats, reps,
                              env={"MOE_CONVERT_LOCAL_COPY": "kernel"}))
            cases.append(Case(Row(f"fuse L{layers} ws1 without write-behind", "fuse-no-write-behind", layers, 1, 1,
                                  nbytes), b.launch("convert.fuse_experts", base, 1), [src], out, stats, reps,
                              env={"MOE_CONVERT_WRITE_BEHIND": "0"}))
        for ws, ep in s.ep_cases if layers == smallest else ():
            cases.append(Case(Row(f"fuse L{layers} ws{ws} ep{ep}", "fuse", layers, ws, ep, nbytes),
                              b.launch("convert.fuse_experts", [*base, "--ep", str(ep)], ws), [src], out, stats))
        if layers in s.split_layers:
            fused = fused_dirs[layers]
            fbytes = dir_bytes(fused)
            cases.append(Case(Row(f"cp -r fused L{layers}", "cp", layers, 1, 0, fbytes), cp_command(fused, out),
                              [fused], out, repeats=reps))
            args = ["--src", str(fused), "--dst", str(out), "--no-progress", "--stats", str(stats),
                    "--max-shard-size", str(s.max_shard)]
            for ws in s.world_sizes:
                cases.append(Case(Row(f"split L{layers} ws{ws}", "split", layers, ws, ws, fbytes),
                                  b.launch("convert.split_experts", args, ws), [fused], out, stats, reps))
    for ws in s.world_sizes:
        args = ["--src", str(sources[smallest]), "--dst", str(out), "--no-progress", "--dry-run"]
        cases.append(Case(Row(f"startup+plan ws{ws} (--dry-run)", "dry-run", smallest, ws, ws, 0),
                          b.launch("convert.fuse_experts", args, ws), [sources[smallest]], out))
    b.run_rounds(cases)
    for layers in s.split_layers:
        check = b.work / "split-check"
        b.timed(b.launch("convert.split_experts", ["--src", str(fused_dirs[layers]), "--dst", str(check),
                                                   "--no-progress"], 1), [fused_dirs[layers]])
        checks[f"split L{layers}: the tool's split of its fuse vs the source"] = compare_tensors(check, sources[layers])
        shutil.rmtree(check, ignore_errors=True)
    if s.naive:
        checks.update(run_naive(b, fused_dirs, sources))
    return checks


def run_naive(b: Bench, fused_dirs: dict[int, Path], sources: dict[int, Path]) -> dict[str, str]:
    """The naive baseline at every layer count (when the RAM allows), fuse and split; checks its output."""
    s = b.s
    checks: dict[str, str] = {}
    naive_out = b.work / "naive"
    for layers in s.layers:
        src = sources[layers]
        need = 2.5 * dir_bytes(src) + 2 * GB
        if mem_available() < need:
            b.rows.append(Row(f"naive fuse L{layers}", "naive-fuse", layers, 1, 0, dir_bytes(src),
                              note=f"skipped: needs ~{need / GB:.1f} GB of RAM, {mem_available() / GB:.1f} GB available"))
            continue
        row = Row(f"naive fuse L{layers}", "naive-fuse", layers, 1, 0, dir_bytes(src))
        cmd = [sys.executable, "-m", "bench.baselines", "naive-fuse", "--src", str(src), "--dst", str(naive_out),
               "--max-shard-size", str(s.max_shard)]
        shutil.rmtree(naive_out, ignore_errors=True)
        b.sample(Case(row, cmd, [src]))
        b.rows.append(row)
        if layers in fused_dirs:
            checks[f"fuse L{layers}: the tool's output vs the naive output"] = compare_tensors(fused_dirs[layers], naive_out)
        shutil.rmtree(naive_out, ignore_errors=True)
        if layers in s.split_layers:
            fused = fused_dirs[layers]
            row = Row(f"naive split L{layers}", "naive-split", layers, 1, 0, dir_bytes(fused))
            cmd = [sys.executable, "-m", "bench.baselines", "naive-split", "--src", str(fused), "--dst",
                   str(naive_out), "--max-shard-size", str(s.max_shard)]
            b.sample(Case(row, cmd, [fused]))
            b.rows.append(row)
            checks[f"split L{layers}: the naive output vs the source"] = compare_tensors(naive_out, src)
            shutil.rmtree(naive_out, ignore_errors=True)
    return checks


def run_other_family(b: Bench) -> dict[str, str]:
    """A second family's fuse and split (its compute path), against cp and the naive approach; no target."""
    s = b.s
    if s.other_family is None:
        return {}
    preset, layers, experts = s.other_family
    specs, cfg = checkpoint_specs(preset, layers, experts=experts, vocab=s.vocab)
    src, fused, out, stats = (b.work / f"{preset}-src", b.work / f"{preset}-fused", b.work / "out",
                              b.work / "stats.json")
    check_disk(b.work, 3 * sum(x.nbytes for x in specs))
    write_synthetic(str(src), specs, cfg, s.src_shard, data="random", seed=7)
    shard = ["--no-progress", "--max-shard-size", str(s.max_shard)]
    # The split measures the family's compute path (gpt-oss: transpose + deinterleave); no consumer reads gpt-oss
    # per-expert tensors, so split_experts asks for the layout explicitly (its family file's per_expert_readers).
    allow = ["--allow-unread-layout"]
    b.timed(b.launch("convert.fuse_experts", ["--src", str(src), "--dst", str(fused), *shard], 1), [src])
    nbytes, fbytes = dir_bytes(src), dir_bytes(fused)
    cases = [Case(Row(f"{preset} cp -r per-expert L{layers}", "family-cp", layers, 1, 0, nbytes),
                  cp_command(src, out), [src], out, repeats=s.repeats),
             Case(Row(f"{preset} cp -r fused L{layers}", "family-cp", layers, 1, 0, fbytes),
                  cp_command(fused, out), [fused], out, repeats=s.repeats)]
    for op, module, where, size in (("fuse", "convert.fuse_experts", src, nbytes),
                                    ("split", "convert.split_experts", fused, fbytes)):
        args = ["--src", str(where), "--dst", str(out), "--stats", str(stats), *shard, *(allow if op == "split" else [])]
        cases += [Case(Row(f"{preset} {op} L{layers} ws{ws}", f"family-{op}", layers, ws, ws, size),
                       b.launch(module, args, ws), [where], out, stats, s.repeats) for ws in s.other_world_sizes]
        if s.naive and mem_available() > 2.5 * size + 2 * GB:
            cases.append(Case(Row(f"{preset} naive {op} L{layers}", f"family-naive-{op}", layers, 1, 0, size),
                              [sys.executable, "-m", "bench.baselines", f"naive-{op}", "--src", str(where), "--dst",
                               str(out), "--max-shard-size", str(s.max_shard)], [where], out, repeats=s.repeats))
    b.run_rounds(cases)
    check = b.work / "family-check"
    b.timed(b.launch("convert.split_experts", ["--src", str(fused), "--dst", str(check), "--no-progress", *allow], 1),
            [fused])
    result = {f"{preset} L{layers}: the tool's split of its fuse vs the source": compare_tensors(check, src)}
    for d in (check, src, fused):
        shutil.rmtree(d, ignore_errors=True)
    return result


def run_adapters(b: Bench) -> dict[str, str]:
    """split_adapter against raw save_file of its output tensors, per adapter preset."""
    s = b.s
    checks: dict[str, str] = {}
    if importlib.util.find_spec("convert.split_adapter") is None:
        for name, layers in s.adapters:
            b.rows.append(Row(f"split_adapter {name} L{layers}", "split_adapter", layers, 1, 0, 0,
                              note="convert.split_adapter not available in this checkout"))
        return checks
    for name, layers in s.adapters:
        src = b.work / f"adapter-{name}"
        specs, cfg, base_cfg = adapter_specs(name, layers)
        write_adapter(str(src), specs, cfg)
        base_path = b.work / f"adapter-{name}.base-config.json"
        base_path.write_text(json.dumps(base_cfg))
        out, stats, kept = b.work / "adapter-out", b.work / "stats.json", b.work / f"adapter-{name}-split"
        args = ["--src", str(src), "--dst", str(kept), "--base-config", str(base_path), "--no-progress"]
        b.timed(b.launch("convert.split_adapter", args, 1), [src])  # untimed: its output is save_file's input
        out_file = kept / "adapter_model.safetensors"
        nbytes = out_file.stat().st_size
        args = ["--src", str(src), "--dst", str(out), "--base-config", str(base_path), "--no-progress",
                "--stats", str(stats)]
        cases = [Case(Row(f"split_adapter {name} L{layers} ws{ws}", "split_adapter", layers, ws, ws, nbytes),
                      b.launch("convert.split_adapter", args, ws), [src], out, stats, s.repeats)
                 for ws in s.adapter_world_sizes]
        cases.append(Case(Row(f"split_adapter {name} L{layers} ws1, source cached", "split_adapter-warm", layers,
                              1, 1, nbytes), b.launch("convert.split_adapter", args, 1), [src], out, stats,
                          s.repeats, warm=True))
        cases.append(Case(Row(f"split_adapter {name} L{layers} ws1, source cached, without write-behind",
                              "split_adapter-warm-no-write-behind", layers, 1, 1, nbytes),
                          b.launch("convert.split_adapter", args, 1), [src], out, stats, s.repeats, warm=True,
                          env={"MOE_CONVERT_WRITE_BEHIND": "0"}))
        saved = b.work / "saved.safetensors"
        cases.append(Case(Row(f"save_file of the output ({name} L{layers})", "save_file", layers, 1, 0, nbytes),
                          [sys.executable, "-m", "bench.baselines", "save-file", "--src", str(out_file), "--dst",
                           str(saved)], [src, kept], saved, repeats=s.repeats, seconds_from_output=True))
        for c in cases:
            c.row.in_bytes = dir_bytes(src)
        b.run_rounds(cases)
        saved.unlink(missing_ok=True)
        shutil.rmtree(kept, ignore_errors=True)
        checks[f"adapter {name} L{layers}"] = (f"{dir_bytes(src) / 1e6:.1f} MB in, {nbytes / 1e6:.1f} MB out "
                                              f"({len(specs)} tensors in)")
    return checks


def environment(drop_ok: bool) -> dict[str, Any]:
    """Facts about the machine and checkout the numbers were taken on."""
    def cmd(*c: str) -> str:
        try:
            return subprocess.run(c, capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    disk = cmd("df", "-h", tempfile.gettempdir()).splitlines()[-1:] or [""]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "cpus": os.cpu_count(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": disk[0],
        "drop_caches": drop_ok,
        "load_before": os.getloadavg(),
    }


def report(results: dict[str, Any], out_dir: Path, plot: bool = True) -> None:
    """Write RESULTS.md (and the plot, when matplotlib is there) for `results` into `out_dir`."""
    from bench.plot import plot_results
    from bench.report import write_report

    plot_name = plot_results(results, out_dir / "bench.png") if plot else None
    write_report(results, out_dir / "RESULTS.md", plot_name)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the benchmark, write the report."""
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few hundred MB, one repeat (for development)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="full (default), quick or tiny")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where RESULTS.md, results.json, the plot go")
    p.add_argument("--workdir", default=None, help="parent of the temporary data directory (default: $TMPDIR)")
    p.add_argument("--repeats", type=int, default=None, help="samples per main case (median is reported)")
    p.add_argument("--no-drop-caches", action="store_true", help="only fadvise(DONTNEED) the data files")
    p.add_argument("--no-adapters", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", default=None, help="only rewrite the report from an earlier results.json")
    a = p.parse_args(argv)
    if a.from_json:
        report(json.loads(Path(a.from_json).read_text()), Path(a.out), plot=not a.no_plot)
        return
    settings = PRESETS[a.preset or ("quick" if a.quick else "full")]
    if a.repeats:
        settings = Settings(**{**asdict(settings), "repeats": a.repeats})
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moe-bench-", dir=a.workdir))
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    try:
        b = Bench(settings, work, not a.no_drop_caches, log)
        env = environment(b.drop_caches)
        specs = {L: checkpoint_specs(settings.preset, L, experts=settings.experts, vocab=settings.vocab)
                 for L in settings.layers}
        sizes = {L: sum(x.nbytes for x in sp) for L, (sp, _) in specs.items()}
        need = sum(sizes.values()) + sum(sizes[L] for L in settings.split_layers) + 2 * max(sizes.values())
        check_disk(work, need)
        log(f"work dir {work}; drop_caches: {b.drop_caches}; sources "
            + ", ".join(f"L{L}: {sizes[L] / GB:.2f} GB" for L in settings.layers))
        sources = {}
        for L, (sp, cfg) in specs.items():
            sources[L] = work / f"src-L{L}"
            write_synthetic(str(sources[L]), sp, cfg, settings.src_shard, data="random", seed=L)
        fused_dirs = {}  # the tool's fused output: split's source, and compared with the naive fuse
        for L in sorted(set(settings.split_layers) | {min(settings.layers)}):
            fused_dirs[L] = work / f"fused-L{L}"
            b.timed(b.launch("convert.fuse_experts", ["--src", str(sources[L]), "--dst", str(fused_dirs[L]),
                                                      "--no-progress", "--max-shard-size", str(settings.max_shard)], 1),
                    [sources[L]])
        log("generated; base-weight cases")
        checks = run_base(b, fused_dirs, sources)
        for fused in fused_dirs.values():
            shutil.rmtree(fused, ignore_errors=True)
        for src in sources.values():
            shutil.rmtree(src, ignore_errors=True)
        if settings.other_family is not None:
            log(f"{settings.other_family[0]} cases")
            checks.update(run_other_family(b))
        if not a.no_adapters:
            log("adapter cases")
            checks.update(run_adapters(b))
        env["load_after"] = os.getloadavg()
        env["bench_seconds"] = round(time.perf_counter() - t_start, 1)
        results = {"settings": asdict(settings), "environment": env, "checks": checks,
                   "rows": [dict(asdict(r), seconds=r.seconds, stream_seconds=r.stream_seconds) for r in b.rows]}
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        report(results, out_dir, plot=not a.no_plot)
        log(f"wrote {out_dir / 'RESULTS.md'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
