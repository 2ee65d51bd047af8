"""Trainer checkpoints in (issue #23): the tool from torch DCP and per-rank sharded safetensors to HF, against torch.

    python -m bench.trainer --preset small                       # here: 0.59 GB, 2 writer ranks, tool at 4 and 1 ranks
    python -m bench.trainer --preset large --out $OUT            # lent 16-core machine: ~17.4 GB, one command

The sources (bench.trainer_ckpt, written by torchrun ranks over gloo, each holding a Shard(0) DTensor slice):
a Qwen3-30B-A3B-shaped model (hidden 2048, moe_intermediate 768, 128 experts, 32/4 heads of 128, vocabulary
151936; `small`: 8 experts, vocabulary 8192, 2 layers) in float32, as torchtitan exports it, saved

- as a torch DCP checkpoint under torchtitan's names (`.metadata` + `__<rank>_0.distcp`), and
- as torchtitan's `last_save_in_hf` writes it before consolidation: `HuggingFaceStorageWriter(save_distributed=True)`
  per-rank sharded safetensors under HF per-expert names, headers with DCP_SHARDING_INFO.

Cases, each one command timed end to end as a user types it (process start-up included), the page cache
dropped before each (sync + drop_caches where allowed, else posix_fadvise(DONTNEED) of the data; `--cache warm`
reads the inputs first instead), one at a time, outputs checked then deleted:

- DCP: `cp -r` of the DCP directory (the ceiling); the tool (`python -m convert.split_experts --src DCP --dst OUT
  --dtype bf16 --base-config config.json --nproc N --no-progress --stats S`) at each of the preset's rank counts;
  torch's path (bench.trainer_torch dcp-to-hf: dcp_to_torch_save, torch.load, rename + split + bf16 cast,
  save_file in 5 GB shards + index).
- sharded safetensors (written once the DCP directory is gone: the disk holds one source at a time): the tool at
  the most ranks, `--dtype bf16` (the user's command) and `--dtype keep` (float32 out, like for like with
  consolidation); torch's consolidate_safetensors_files (bench.trainer_torch consolidate).

Peak RSS: the tool's --stats (VmHWM of every rank); the torch scripts report their own VmHWM. Every output is
checked: its tensor names are the HF per-expert names of the model (expert_bias_E dropped) and a sample of its
tensors equals the source's values (cast to the output's dtype). A tiny DCP and sharded checkpoint go through the
tool first (the preflight): where the tool cannot convert them, its cases are reported as not run with its
error, the rest still runs, and the command exits 3.

Targets (ratios from the same run): the tool >= 0.8x `cp -r` end to end, >= 3x torch's path, <= 1 GiB peak RSS per
rank. `large` keeps under ~9 minutes on the lent machine (16 cores, ~1 GB/s disk): its optional cases (the tool at
1 rank, the keep-dtype case) are skipped where the estimate says they would pass --deadline. Writes
TRAINER-<preset>.md and trainer-<preset>.json to --out after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.run import GB, REPO, Bench, Settings, cp_command, environment, rss_text
from bench.trainer_ckpt import Model, expected_tensor, fqn_to_index, hf_specs, unshardable

TARGET_CP, TARGET_TORCH, TARGET_RSS = 0.8, 3.0, 1 << 30
TOOL_MODULE = "convert.split_experts"


@dataclass(frozen=True)
class Preset:
    model: Model
    write_ranks: int
    tool_ranks: tuple[int, ...]  # DCP cases, in this order; the first is the sharded-safetensors cases' rank count
    optional_ranks: tuple[int, ...] = ()  # DCP tool cases run last in their phase, where the deadline allows
    keep_case: bool = True  # the tool --dtype keep on the sharded source (optional)
    settle_s: float = 1.0  # after writing a source: sync, then wait (the disk's writeback)
    case_settle_s: float = 1.0  # before each case, after its sync
    one_write: bool = False  # write both sources at once (where the disk holds both and every output)
    deadline_s: float | None = None


PRESETS = {
    "small": Preset(Model("qwen3-30b-a3b", layers=2, experts=8, vocab=8192), write_ranks=2, tool_ranks=(4, 1),
                    settle_s=0.2, case_settle_s=0.2, one_write=True),
    # 6 layers in float32: 17.4 GB a source. Disk at its fullest (DCP + dcp_to_torch_save's .pt + bf16 out):
    # 43.6 GB of the lent machine's ~68 GB free.
    "large": Preset(Model("qwen3-30b-a3b", layers=6), write_ranks=8, tool_ranks=(16, 4), optional_ranks=(1,),
                    settle_s=10.0, deadline_s=510.0),
}
TINY = Model("tiny", layers=2, experts=16, vocab=128)  # the preflight's sources (E: even shards up to 16 writers)


@dataclass
class Row:
    name: str
    kind: str  # cp, tool, torch
    source: str  # dcp, hf-sharded
    ranks: int
    in_bytes: int
    cmd: list[str] = field(default_factory=list)
    out_bytes: int = 0
    seconds: float | None = None
    data_seconds: float | None = None  # the tool's data phase (slowest rank)
    rss: list[int] = field(default_factory=list)  # peak RSS per rank (tool) or of the process (torch)
    phases: dict[str, Any] = field(default_factory=dict)  # the torch scripts' own phase timings
    check: str = ""
    note: str = ""


def data_bytes(root: Path) -> int:
    """Bytes of a checkpoint directory's files (DCP data + .metadata, or safetensors + index)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def write_sources(jobs: list[dict[str, Any]], ranks: int, env: dict[str, str]) -> dict[str, Any]:
    """Write `jobs` (bench.trainer_ckpt) with `ranks` torchrun ranks; returns rank 0's report and the wall time."""
    for job in jobs:
        bad = unshardable(Model(**job["model"]), ranks)
        if bad:
            raise SystemExit(f"bench.trainer: {job['dst']}: dim 0 of {bad[:3]} does not split over {ranks} writer ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "bench.trainer_ckpt", "--jobs", json.dumps(jobs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        ours = [ln for ln in proc.stderr.splitlines() if "torch/distributed/elastic" not in ln]
        raise SystemExit(f"bench.trainer: writing the sources failed ({proc.returncode}):\n" + "\n".join(ours)[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - t0, 2), "ranks": ranks}


def tool_cmd(src: Path, dst: Path, config: Path, ranks: int, stats: Path, dtype: str = "bf16") -> list[str]:
    """The user's command (issue #23)."""
    return [sys.executable, "-m", TOOL_MODULE, "--src", str(src), "--dst", str(dst), "--dtype", dtype,
            "--base-config", str(config), "--nproc", str(ranks), "--no-progress", "--stats", str(stats)]


_EXPECTED: dict[tuple[Model, str], Any] = {}  # the sampled source tensors, built once a run


def check_output(out: Path, m: Model, sample: int = 12) -> str:
    """'ok ...' where `out` is the model's HF per-expert checkpoint (names, and a sample of tensors equal to the
    source's values in the output's dtype), else what differs."""
    import torch
    from safetensors import safe_open

    index = out / "model.safetensors.index.json"
    if not index.exists():
        return "no model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    want = [s[0] for s in hf_specs(m)]
    missing, extra = sorted(set(want) - set(weight_map)), sorted(set(weight_map) - set(want))
    if missing or extra:
        return f"names differ: missing {missing[:3]} ({len(missing)}), extra {extra[:3]} ({len(extra)})"
    E = m.dims()[0]
    last = m.layers - 1
    picks = ["model.embed_tokens.weight", "model.norm.weight",  # (lm_head: sharded as the embedding; 1.2 GB to read)
             "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_norm.weight",
             f"model.layers.{last}.mlp.gate.weight", f"model.layers.{last}.post_attention_layernorm.weight"]
    picks += [f"model.layers.{n}.mlp.experts.{e}.{w}.weight" for n, e in ((0, 0), (last, E - 1))
              for w in ("gate_proj", "up_proj", "down_proj")] + [f"model.layers.{last}.mlp.experts.{E // 2}.down_proj.weight"]
    picks = picks[:sample]
    dtypes = set()
    for name in picks:
        with safe_open(out / weight_map[name], "pt") as f:
            got = f.get_tensor(name)
        dtypes.add(str(got.dtype).replace("torch.", ""))
        if (m, name) not in _EXPECTED:
            _EXPECTED[(m, name)] = expected_tensor(m, name)
        want_t = _EXPECTED[(m, name)].to(got.dtype)
        if got.shape != want_t.shape or not torch.equal(got.view(-1).view(torch.uint8), want_t.view(-1).view(torch.uint8)):
            return f"{name} differs from the source"
    config = "config.json" if (out / "config.json").exists() else "NO config.json"
    return f"ok: {len(weight_map)} tensors named as HF, {len(picks)} sampled equal the source ({'/'.join(sorted(dtypes))}), {config}"


class TrainerBench:
    """The cases of one preset in a work directory; the report is rewritten after every case."""

    def __init__(self, preset_name: str, preset: Preset, work: Path, out: Path, cache: str, drop_caches: bool,
                 deadline: float | None, argv: list[str]) -> None:
        self.name, self.p, self.work, self.out, self.argv = preset_name, preset, work, out, argv
        self.t0 = time.perf_counter()
        self.deadline = deadline
        self.b = Bench(Settings(settle_seconds=preset.case_settle_s), work, cache == "cold" and drop_caches, self.log)
        self.b.env.pop("OMP_NUM_THREADS", None)  # the user's command, as typed
        self.cache = cache
        self.rows: list[Row] = []
        self.info: dict[str, Any] = {"preset": preset_name, "model": asdict(preset.model), "cache": cache,
                                     "drop_requested": cache == "cold" and drop_caches,
                                     "drop_caches": self.b.drop_caches, "writes": [], "skipped": []}
        self.tool_error: str | None = None
        self.config = work / "config.json"
        self.index = work / "fqn_to_index.json"
        self.tiny = replace(TINY, expert_bias=preset.model.expert_bias)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- sources ---------------------------------------------------------------
    def settle(self) -> None:
        os.sync()
        time.sleep(self.p.settle_s)

    def write(self, jobs: list[dict[str, Any]]) -> None:
        rep = write_sources(jobs, self.p.write_ranks, self.b.env)
        self.info["writes"].append(rep)
        self.log(f"wrote {', '.join(j['format'] + ' ' + Path(j['dst']).name for j in rep['jobs'])} with "
                 f"{rep['ranks']} ranks in {rep['wall_s']:.1f} s")
        self.settle()

    # -- one case --------------------------------------------------------------
    def run_case(self, row: Row, inputs: list[Path], dst: Path, stats: Path | None = None) -> None:
        """Time `row.cmd` from a cold (or warm) cache, read its RSS, check its output, delete it."""
        shutil.rmtree(dst, ignore_errors=True)
        if stats is not None:
            stats.unlink(missing_ok=True)
        try:
            seconds, rss, text = self.b.timed(row.cmd, inputs, warm=self.cache == "warm")
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            code = lines[0].rsplit(" exited ", 1)[-1].rstrip(":") if " exited " in lines[0] else "?"
            row.note = f"FAILED (exit {code}): " + " | ".join(ln for ln in lines[1:][-2:] if ln.strip())[-500:]
            self.log(f"  {row.name}: {row.note}")
        else:
            row.seconds = seconds
            reported = _last_json(text)
            if stats is not None and stats.exists():
                ranks = json.loads(stats.read_text())["ranks"]
                row.rss = [r["peak_rss_bytes"] for r in sorted(ranks, key=lambda r: r["rank"])]
                row.data_seconds = max(r["seconds"] for r in ranks)
            elif "peak_rss_bytes" in reported:
                row.rss = [int(reported["peak_rss_bytes"])]
                row.phases = {k: v for k, v in reported.items() if k != "peak_rss_bytes"}
            elif row.kind != "cp":
                row.rss = [rss]
            if dst.is_dir():
                row.out_bytes = data_bytes(dst)
                if row.kind != "cp":
                    row.check = check_output(dst, self.p.model)
            self.log(f"  {row.name}: {seconds:.2f} s ({row.in_bytes / seconds / GB:.3f} GB/s in)"
                     + (f", peak RSS/rank {rss_text(max(row.rss))}" if row.rss else "")
                     + (f", {row.check}" if row.check else ""))
        shutil.rmtree(dst, ignore_errors=True)
        self.rows.append(row)
        self.report()

    def skip(self, row: Row, why: str) -> None:
        row.note = why
        self.rows.append(row)
        self.info["skipped"].append(f"{row.name}: {why}")
        self.log(f"  {row.name}: {why}")
        self.report()

    def fits(self, estimate: float, reserve: float) -> bool:
        return self.deadline is None or self.elapsed() + estimate + reserve <= self.deadline

    # -- the run ---------------------------------------------------------------
    def preflight(self, dcp: Path, sharded: Path) -> None:
        """The tool on the tiny sources (2 ranks): where it cannot convert them, its cases are not run."""
        cfg = self.work / "tiny-config.json"
        cfg.write_text(json.dumps(self.tiny.config()))
        errors = []
        for label, src in (("DCP", dcp), ("sharded safetensors", sharded)):
            dst, stats = self.work / "preflight-out", self.work / "preflight-stats.json"
            shutil.rmtree(dst, ignore_errors=True)
            proc = subprocess.run(tool_cmd(src, dst, cfg, 2, stats), env=self.b.env, cwd=REPO, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
                errors.append(f"{label}: exit {proc.returncode}: {' | '.join(tail)[-500:]}")
            else:
                check = check_output(dst, self.tiny)
                if not check.startswith("ok"):
                    errors.append(f"{label}: wrong output: {check}")
            shutil.rmtree(dst, ignore_errors=True)
        self.info["preflight"] = errors or "ok"
        if errors:
            self.tool_error = "; ".join(errors)
            self.log(f"TOOL STEP FAILED (preflight: `{TOOL_MODULE}` on a tiny DCP and sharded-safetensors "
                     f"checkpoint at 2 ranks): {self.tool_error}")
        else:
            self.log("preflight: the tool converts the tiny DCP and sharded checkpoints correctly")

    def tool_row(self, row: Row, inputs: list[Path], dst: Path, stats: Path) -> None:
        if self.tool_error:
            self.skip(row, "not run: the tool failed its preflight (see Tool step)")
        else:
            self.run_case(row, inputs, dst, stats)

    def run(self) -> int:
        m, p, w = self.p.model, self.p, self.work
        size = sum(n for _, shape, _, _ in hf_specs(m) for n in [_numel(shape) * m.itemsize()])
        # At the fullest: the DCP, dcp_to_torch_save's .pt, the torch path's bf16 output (+ the sharded source).
        need = (2 + 2 / m.itemsize() + (1 if p.one_write else 0)) * size + 1 * GB
        free = shutil.disk_usage(w).free
        self.info.update(source_estimate_bytes=size, disk_free_at_start=free)
        if free < need:
            raise SystemExit(f"bench.trainer: needs ~{need / GB:.1f} GB free in {w}, has {free / GB:.1f} GB")
        self.config.write_text(json.dumps(m.config(), indent=1))
        self.index.write_text(json.dumps(fqn_to_index(m, m.itemsize())))
        self.log(f"work dir {w}; model {asdict(m)}: {size / GB:.2f} GB a source; cache {self.cache}, "
                 f"drop_caches {self.b.drop_caches}; {free / GB:.1f} GB free")
        dcp, sharded, dst, stats = w / "dcp", w / "hf-sharded", w / "out", w / "stats.json"
        tdcp, tsharded = w / "tiny-dcp", w / "tiny-hf-sharded"
        tiny = asdict(self.tiny)
        main_sharded = [{"format": "hf-sharded", "dst": str(sharded), "model": asdict(m)}]
        self.write([{"format": "dcp", "dst": str(tdcp), "model": tiny},
                    {"format": "hf-sharded", "dst": str(tsharded), "model": tiny},
                    {"format": "dcp", "dst": str(dcp), "model": asdict(m)}, *(main_sharded if p.one_write else [])])
        self.preflight(tdcp, tsharded)
        nd = data_bytes(dcp)
        self.info["dcp_files"] = sorted(f.name for f in dcp.iterdir())
        # Phase 1: the DCP source.
        cp = Row("cp -r DCP dir", "cp", "dcp", 1, nd, cp_command(dcp, dst))
        self.run_case(cp, [dcp], dst)
        for n in p.tool_ranks:
            self.tool_row(Row(f"tool DCP -> HF bf16, {n} ranks", "tool", "dcp", n, nd,
                              tool_cmd(dcp, dst, self.config, n, stats)), [dcp], dst, stats)
        torch_row = Row("torch: dcp_to_torch_save + load + split + cast + save_file", "torch", "dcp", 1, nd,
                        [sys.executable, "-m", "bench.trainer_torch", "dcp-to-hf", "--src", str(dcp), "--dst",
                         str(dst), "--base-config", str(self.config), "--tmp", str(w / "model.pt")])
        self.run_case(torch_row, [dcp], dst)
        (w / "model.pt").unlink(missing_ok=True)
        cp_s = cp.seconds or 1.0
        # Left for phase 2 (in cp -r's): writing + settle ~1.5, the tool ~1, consolidation ~2, per case ~0.3.
        reserve = cp_s * (1.5 + 1 + 2 + 0.6) + p.settle_s
        for n in p.optional_ranks:
            row = Row(f"tool DCP -> HF bf16, {n} ranks", "tool", "dcp", n, nd, tool_cmd(dcp, dst, self.config, n, stats))
            if self.tool_error or self.fits(1.6 * cp_s, reserve):
                self.tool_row(row, [dcp], dst, stats)
            else:
                self.skip(row, f"skipped: estimated {1.6 * cp_s:.0f} s would pass the deadline "
                               f"({self.deadline:.0f} s) with phase 2 left")
        shutil.rmtree(dcp, ignore_errors=True)
        # Phase 2: the per-rank sharded safetensors.
        if not p.one_write:
            self.write(main_sharded)
        ns = data_bytes(sharded)
        self.info["sharded_files"] = sorted(f.name for f in sharded.iterdir())
        top = p.tool_ranks[0]
        self.tool_row(Row(f"tool sharded -> HF bf16, {top} ranks", "tool", "hf-sharded", top, ns,
                          tool_cmd(sharded, dst, self.config, top, stats)), [sharded], dst, stats)
        self.run_case(Row("torch: consolidate_safetensors_files", "torch", "hf-sharded", 1, ns,
                          [sys.executable, "-m", "bench.trainer_torch", "consolidate", "--src", str(sharded), "--dst",
                           str(dst), "--index", str(self.index), "--base-config", str(self.config)]), [sharded], dst)
        if p.keep_case:
            row = Row(f"tool sharded -> HF keep dtype, {top} ranks", "tool", "hf-sharded", top, ns,
                      tool_cmd(sharded, dst, self.config, top, stats, dtype="keep"))
            if self.tool_error or self.fits(1.3 * cp_s, 0):
                self.tool_row(row, [sharded], dst, stats)
            else:
                self.skip(row, f"skipped: estimated {1.3 * cp_s:.0f} s would pass the deadline ({self.deadline:.0f} s)")
        shutil.rmtree(sharded, ignore_errors=True)
        self.info["bench_seconds"] = round(self.elapsed(), 1)
        self.report(final=True)
        failed = [r.name for r in self.rows if r.kind != "tool" and r.note.startswith("FAILED")]
        return 3 if self.tool_error else 4 if failed else 0

    # -- the report ------------------------------------------------------------
    def report(self, final: bool = False) -> None:
        result = {"argv": self.argv, "environment": self.env(), "info": self.info, "tool_error": self.tool_error,
                  "rows": [asdict(r) for r in self.rows], "targets": targets(self.rows), "final": final}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"trainer-{self.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (self.out / f"TRAINER-{self.name}.md").write_text(markdown(result))

    def env(self) -> dict[str, Any]:
        if "environment" not in self.info:
            import safetensors
            import torch

            self.info["environment"] = {**environment(self.b.drop_caches), "torch": torch.__version__,
                                        "safetensors": safetensors.__version__}
        return self.info["environment"]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return {}
            return obj if isinstance(obj, dict) else {}
    return {}


def _find(rows: list[dict[str, Any]], kind: str, source: str | None = None) -> dict[str, Any] | None:
    for r in rows:
        if r["kind"] == kind and (source is None or r["source"] == source) and r["seconds"]:
            return r
    return None


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """Every tool row against the three targets."""
    d = [asdict(r) for r in rows]
    cp = _find(d, "cp")
    out = []
    for r in d:
        if r["kind"] != "tool" or not r["seconds"]:
            continue
        torch_ref = _find(d, "torch", r["source"])
        vs_cp = cp["seconds"] / r["seconds"] if cp else None
        vs_torch = torch_ref["seconds"] / r["seconds"] if torch_ref else None
        rss = max(r["rss"]) if r["rss"] else None
        out.append({"case": r["name"], "vs_cp": vs_cp, "vs_torch": vs_torch, "torch_case": torch_ref and torch_ref["name"],
                    "rss": rss, "met_cp": vs_cp is not None and vs_cp >= TARGET_CP,
                    "met_torch": vs_torch is not None and vs_torch >= TARGET_TORCH,
                    "met_rss": rss is not None and rss <= TARGET_RSS})
    return out


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def markdown(res: dict[str, Any]) -> str:
    info, rows = res["info"], res["rows"]
    m = info["model"]
    cp = _find(rows, "cp")
    env = res["environment"]
    lines = [f"# Trainer checkpoints in ({info['preset']})", "",
             f"Machine: {env}", "", f"Command: `python -m bench.trainer {' '.join(res['argv'])}`", ""]
    if not res["final"]:
        lines += ["**Partial: the run had not finished when this was written.**", ""]
    E = m["experts"] or "preset's"
    lines += [f"Model: {m['preset']} shapes, {m['layers']} layers, {E} experts, vocabulary {m['vocab'] or 'real'}, "
              f"{m['dtype']}; sources {info['source_estimate_bytes'] / GB:.2f} GB of tensors each. Sources written by "
              f"torchrun ranks (gloo), each holding a Shard(0) DTensor slice of every tensor: "
              + "; ".join(f"{', '.join(j['format'] for j in w['jobs'])}: {w['ranks']} ranks, {w['wall_s']:.1f} s"
                          for w in info["writes"]) + ".",
              "DCP: `torch.distributed.checkpoint.save` (FileSystemWriter) under torchtitan's names "
              f"({len(info.get('dcp_files', []))} files). Sharded safetensors: HuggingFaceStorageWriter(save_distributed=True)"
              f" under HF per-expert names, as torchtitan's last_save_in_hf before consolidation "
              f"({len(info.get('sharded_files', []))} files).", "",
              "Cache: " + ("cold: sync + drop_caches before each case (allowed)" if info["cache"] == "cold" and
                           info["drop_caches"] else
                           "cold: drop_caches " + ("NOT allowed here" if info.get("drop_requested") else "not asked for")
                           + "; the data files evicted with posix_fadvise(DONTNEED) before each case"
                           if info["cache"] == "cold" else
                           "warm: the inputs read into the page cache before each case") + ". One sample per case; "
              "wall = the whole command, process start to exit; GB/s = source bytes / wall. `cp -r / case`: the DCP "
              "directory's cp -r for every row (the sharded source holds the same tensors); `torch / case`: torch's "
              "path from the row's source (dcp_to_torch_save..., or consolidate_safetensors_files).", ""]
    if info["preset"] == "small":
        lines += ["`small` checks the harness: at 0.6 GB the commands' start-up (torch's import, on a loaded 2-core "
                  "machine) outweighs their data phase, so its ratios say little; the targets are for `large`.", ""]
    if res["tool_error"]:
        lines += ["## Tool step", "", f"**FAILED**: `{TOOL_MODULE}` could not convert the tiny preflight checkpoints, "
                  "so its cases were not run: " + res["tool_error"].replace("|", "\\|"), ""]
    lines += ["## Cases", "", "| case | source | GB in | GB out | wall s | GB/s | cp -r / case | torch / case | "
              "data phase s | peak RSS per rank | output |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        torch_ref = _find(rows, "torch", r["source"])
        if r["seconds"]:
            vs_cp = _f(cp["seconds"] / r["seconds"], "{:.2f}x") if cp else ""
            vs_t = _f(torch_ref["seconds"] / r["seconds"], "{:.2f}x") if torch_ref and r["kind"] != "cp" else ""
            rss = "" if not r["rss"] else (rss_text(max(r["rss"])) if len(r["rss"]) == 1 else
                                          f"{rss_text(max(r['rss']))} (max of {len(r['rss'])})")
            lines.append(f"| {r['name']} | {r['source']} | {r['in_bytes'] / GB:.2f} | {r['out_bytes'] / GB:.2f} | "
                         f"{r['seconds']:.2f} | {r['in_bytes'] / r['seconds'] / GB:.3f} | {vs_cp} | {vs_t} | "
                         f"{_f(r['data_seconds'])} | {rss} | {r['check'] or ''} |")
        else:
            lines.append(f"| {r['name']} | {r['source']} | {r['in_bytes'] / GB:.2f} | | | | | | | | "
                         f"{r['note'].replace('|', '/')} |")
    phases = [r for r in rows if r["phases"]]
    if phases:
        lines += ["", "torch's phases (s): " + "; ".join(
            f"{r['name']}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in r["phases"].items()) for r in phases)]
    lines += ["", "## Targets", "", "| tool case | >= 0.8x cp -r | >= 3x torch | <= 1 GiB RSS per rank |",
              "|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['case']} | {_f(t['vs_cp'], '{:.2f}x')} {'met' if t['met_cp'] else 'NOT met'} | "
                     f"{_f(t['vs_torch'], '{:.2f}x')} {'met' if t['met_torch'] else 'NOT met'} (vs {t['torch_case']}) | "
                     f"{rss_text(t['rss']) if t['rss'] else 'n/a'} {'met' if t['met_rss'] else 'NOT met'} |")
    if not res["targets"]:
        lines.append("| (no tool case measured) | | | |")
    if info["skipped"]:
        lines += ["", "Skipped: " + "; ".join(info["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.trainer", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--write-ranks", type=int, default=None, help="override the preset's writer ranks")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold")
    p.add_argument("--no-drop-caches", action="store_true", help="cold: only posix_fadvise(DONTNEED) the data")
    p.add_argument("--deadline", type=float, default=None, help="seconds: skip optional cases that would pass it "
                   "(default: the preset's; 0: none)")
    p.add_argument("--no-expert-bias", action="store_true", help="leave torchtitan's expert_bias_E out of the DCP")
    p.add_argument("--workdir", default=None, help="parent of the temporary work directory (default: $TMPDIR)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    model = preset.model
    if a.layers:
        model = replace(model, layers=a.layers)
    if a.no_expert_bias:
        model = replace(model, expert_bias=False)
    preset = replace(preset, model=model, write_ranks=a.write_ranks or preset.write_ranks)
    deadline = preset.deadline_s if a.deadline is None else (a.deadline or None)
    work = Path(tempfile.mkdtemp(prefix="moe-trainer-bench-", dir=a.workdir))
    try:
        bench = TrainerBench(a.preset, preset, work, Path(a.out), a.cache, not a.no_drop_caches, deadline,
                             sys.argv[1:] if argv is None else list(argv))
        rc = bench.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
