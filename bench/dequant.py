"""Benchmark: dequantizing a DeepSeek-V3-shaped FP8 checkpoint to bf16, the tool against the usual ways.

    python -m bench.dequant [--preset full|tiny] [--out bench/results] [--workdir DIR] [--no-drop-caches]

Writes a per-expert FP8 block-scaled checkpoint of real DeepSeek-V3 shapes (H=7168, I=2048, E=256,
MLA attention, a small vocabulary so the expert layers dominate; random data, FP8 codes drawn as FP8_CODES says)
into a temporary directory, then times from a cold page cache:

- the tool: `convert.split_experts --dtype bf16` (per-expert bf16 out) at 1, 2 and 4 ranks, end to end
  and its data phase (--stats), with each rank's peak RSS;
- (a) `cp -r` of the source (the floor for moving the bytes);
- (b) the whole-shard approach of DeepSeek's `fp8_cast_bf16.py`, on CPU with torch: load a whole shard,
  dequantize every FP8 weight (scales found in any shard), `save_file` the shard;
- (c) transformers: `from_pretrained` (FP8 dequantized on load) + `save_pretrained`; skipped with the reason
  when transformers cannot do it here.

Results: DEQUANT.md and dequant.json in --out. The tool's output is checked against (b) byte for byte.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.run import GB, Bench, Case, Row, _remove, check_disk, cp_command, rss_text

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Shape:
    """The model shapes and run settings of one preset."""

    hidden: int = 7168
    inter: int = 2048
    experts: int = 256
    layers: int = 1
    vocab: int = 2048
    heads: int = 128
    q_lora: int = 1536
    kv_lora: int = 512
    nope: int = 128
    rope: int = 64
    v_head: int = 128
    shard_bytes: int = 4_300_000_000  # the released DeepSeek-V3 shards are ~4.3 GB
    world_sizes: tuple[int, ...] = (1, 2, 4)
    repeats: int = 1
    transformers: bool = True
    fp8_codes: str = "quantized"  # FP8_CODES: how the FP8 weights' codes are drawn


PRESETS = {
    # One MoE layer of DeepSeek-V3 (256 experts + MLA + shared expert): 11.5 GB FP8 in, 23 GB bf16 out.
    "full": Shape(),
    "tiny": Shape(hidden=256, inter=128, experts=8, layers=2, vocab=128, heads=2, q_lora=64, kv_lora=32, nope=32,
                  rope=16, v_head=32, shard_bytes=1_500_000, world_sizes=(1, 2), repeats=1),
}


def config(s: Shape) -> dict[str, Any]:
    """The DeepSeek-V3 config.json of `s` (every layer MoE) with its FP8 quantization_config."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": s.hidden,
        "intermediate_size": 18432 if s.hidden == 7168 else 2 * s.inter, "moe_intermediate_size": s.inter,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.heads,
        "n_routed_experts": s.experts, "n_shared_experts": 1, "num_experts_per_tok": 8 if s.experts >= 8 else 2,
        "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "q_lora_rank": s.q_lora, "kv_lora_rank": s.kv_lora,
        "qk_rope_head_dim": s.rope, "qk_nope_head_dim": s.nope, "v_head_dim": s.v_head, "vocab_size": s.vocab,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                "activation_scheme": "dynamic"},
    }


def tensor_specs(s: Shape) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in file order: each FP8 weight followed by its scale grid."""
    out: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", "BF16", (s.vocab, s.hidden))]

    def fp8(name: str, rows: int, cols: int) -> None:
        out.append((f"{name}.weight", "F8_E4M3", (rows, cols)))
        out.append((f"{name}.weight_scale_inv", "F32", (math.ceil(rows / 128), math.ceil(cols / 128))))

    for layer in range(s.layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", "BF16", (s.hidden,)),
                (f"{p}.post_attention_layernorm.weight", "BF16", (s.hidden,)),
                (f"{p}.self_attn.q_a_layernorm.weight", "BF16", (s.q_lora,)),
                (f"{p}.self_attn.kv_a_layernorm.weight", "BF16", (s.kv_lora,))]
        fp8(f"{p}.self_attn.q_a_proj", s.q_lora, s.hidden)
        fp8(f"{p}.self_attn.q_b_proj", s.heads * (s.nope + s.rope), s.q_lora)
        fp8(f"{p}.self_attn.kv_a_proj_with_mqa", s.kv_lora + s.rope, s.hidden)  # ragged: 576 rows
        fp8(f"{p}.self_attn.kv_b_proj", s.heads * (s.nope + s.v_head), s.kv_lora)
        fp8(f"{p}.self_attn.o_proj", s.hidden, s.heads * s.v_head)
        out += [(f"{p}.mlp.gate.weight", "BF16", (s.experts, s.hidden)),
                (f"{p}.mlp.gate.e_score_correction_bias", "F32", (s.experts,))]
        for proj, (r, c) in (("gate_proj", (s.inter, s.hidden)), ("up_proj", (s.inter, s.hidden)),
                             ("down_proj", (s.hidden, s.inter))):
            fp8(f"{p}.mlp.shared_experts.{proj}", r, c)
        for e in range(s.experts):
            for proj, (r, c) in (("gate_proj", (s.inter, s.hidden)), ("up_proj", (s.inter, s.hidden)),
                                 ("down_proj", (s.hidden, s.inter))):
                fp8(f"{p}.mlp.experts.{e}.{proj}", r, c)
    out += [("model.norm.weight", "BF16", (s.hidden,)), ("lm_head.weight", "BF16", (s.vocab, s.hidden))]
    return out


_SIZES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
# How FP8 weight codes are drawn. `quantized`: as released checkpoints hold them, normal values quantized with
# amax / 448 block scales (drawn from that code distribution; about 1e-4 of them FP8 subnormals). `uniform`:
# uniformly random bytes without NaN codes (the benches before 2026-12-07), 7/128 of them FP8 subnormals, which
# cost some CPUs a microcode assist per arithmetic instruction touching one (bench.merge_kernel).
FP8_CODES = ("quantized", "uniform")


def e4m3_magnitudes() -> Any:
    """float64 values of the 127 finite non-negative float8_e4m3fn codes 0x00..0x7E, by code."""
    import numpy as np

    code = np.arange(127)
    e, m = code >> 3, (code & 7).astype(np.float64)
    return np.where(e == 0, m * 2.0**-9, np.ldexp(1 + m / 8, e - 7))


def quantized_code_table(samples: int = 1 << 22, block: int = 128 * 128, seed: int = 0) -> Any:
    """65536 float8_e4m3fn codes (uint8) at evenly spaced quantiles of the codes of N(0, 1) values quantized
    per block of `block` with scale amax / 448 (round to nearest): a uniformly random uint16 indexing it draws
    a code of that distribution."""
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((samples // block, block))
    x *= 448.0 / np.abs(x).max(axis=1, keepdims=True)
    mags = e4m3_magnitudes()
    mid = (mags[1:] + mags[:-1]) / 2
    codes = np.searchsorted(mid, np.abs(x).ravel()).astype(np.uint8) | (np.signbit(x).ravel().astype(np.uint8) << 7)
    value = np.where(codes >= 128, -1.0, 1.0) * mags[codes & 0x7F]
    order = np.argsort(value, kind="stable")
    pick = ((np.arange(1 << 16) + 0.5) * (codes.size / (1 << 16))).astype(np.int64)
    return codes[order][pick]


_CODE_TABLE: list[Any] = []


def _fill(dtype: str, n: int, rng: Any, fp8_codes: str = "quantized") -> bytes:
    """`n` elements of random data of `dtype`: FP8 codes drawn as `fp8_codes` says (FP8_CODES; never NaN),
    F32 scales in [1e-4, 1e-3), BF16 small normal values (random bytes would hold NaN/inf)."""
    import numpy as np

    if dtype == "F8_E4M3" and fp8_codes == "quantized":
        if not _CODE_TABLE:
            _CODE_TABLE.append(quantized_code_table())
        return _CODE_TABLE[0][rng.integers(0, 1 << 16, n, dtype=np.uint16)].tobytes()
    if dtype == "F8_E4M3":
        a = rng.integers(0, 256, n, dtype=np.uint8)
        a[(a & 0x7F) == 0x7F] ^= 1  # 0x7F/0xFF are NaN in e4m3fn
        return a.tobytes()
    if dtype == "F32":
        return (rng.random(n, dtype=np.float32) * 9e-4 + 1e-4).astype(np.float32).tobytes()
    f = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16 by truncation


def _write_shard(path: str, specs: list[tuple[str, str, tuple[int, ...]]], seed: int, fp8_codes: str) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * _SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for _, dtype, shape in specs:
            fh.write(_fill(dtype, math.prod(shape), rng, fp8_codes))
        fh.flush()
        os.fsync(fh.fileno())


def generate(dst: Path, s: Shape, jobs: int) -> int:
    """Write the FP8 checkpoint of `s` to `dst` in ~shard_bytes shards (a weight and its scale may land in
    different shards, as in the releases); returns the bytes of tensor data."""
    dst.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in tensor_specs(s):
        n = math.prod(spec[2]) * _SIZES[spec[1]]
        if shards[-1] and size + n > s.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with ProcessPoolExecutor(max(1, min(jobs, len(shards)))) as pool:
        list(pool.map(_write_shard, [str(dst / n) for n in names], shards, range(len(shards)),
                      [s.fp8_codes] * len(shards)))
    total = sum(math.prod(sp[2]) * _SIZES[sp[1]] for sh in shards for sp in sh)
    index = {"metadata": {"total_size": total}, "weight_map": {sp[0]: n for n, sh in zip(names, shards) for sp in sh}}
    (dst / INDEX).write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(json.dumps(config(s), indent=2))
    return total


# ---------------------------------------------------------------- baselines (run as subprocesses)

def whole_shard(src: str, dst: str) -> None:
    """DeepSeek's fp8_cast_bf16.py on CPU: per shard, load it whole, dequantize each FP8 weight with its
    scale (from whichever shard holds it, as the script's cached loader does), save_file the new shard."""
    import torch
    from safetensors.torch import load_file, save_file

    from convert.engine.job import peak_rss_bytes

    os.makedirs(dst, exist_ok=True)
    index = json.loads(Path(src, INDEX).read_text())
    weight_map = index["weight_map"]
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str) -> torch.Tensor:
        f = weight_map[name]
        if f not in loaded:
            loaded[f] = load_file(os.path.join(src, f))
            while len(loaded) > 2:  # the script keeps at most two shards cached
                loaded.pop(next(iter(loaded)))
        return loaded[f][name]

    def weight_dequant(x: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
        m, n = x.shape
        scale = s.repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]
        return (x.float() * scale).to(torch.bfloat16)

    new_map: dict[str, str] = {}
    for f in sorted(set(weight_map.values())):
        state = load_file(os.path.join(src, f))
        loaded[f] = state
        out: dict[str, torch.Tensor] = {}
        for name, w in state.items():
            if name.endswith("_scale_inv"):
                continue
            if w.element_size() == 1:
                out[name] = weight_dequant(w, get(f"{name}_scale_inv"))
            else:
                out[name] = w
            new_map[name] = f
        save_file(out, os.path.join(dst, f), metadata={"format": "pt"})
        del out, state
        while len(loaded) > 2:
            loaded.pop(next(iter(loaded)))
    cfg = json.loads(Path(src, "config.json").read_text())
    cfg.pop("quantization_config", None)
    Path(dst, "config.json").write_text(json.dumps(cfg, indent=2))
    Path(dst, INDEX).write_text(json.dumps({"metadata": {}, "weight_map": new_map}, indent=2))
    _fsync_tree(dst)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))


def transformers_roundtrip(src: str, dst: str) -> None:
    """from_pretrained (FP8 dequantized to bf16 on load) + save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from convert.engine.job import peak_rss_bytes

    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                     quantization_config=FineGrainedFP8Config(dequantize=True))
    except ValueError:  # transformers 5.23 raises "Undefined Operation encountered!" with an explicit config;
        # without one, on a CPU-only machine its FP8 quantizer dequantizes on load all the same
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    try:
        model.save_pretrained(dst, max_shard_size="5GB")
    except ValueError:  # 5.23: reverting the fused experts of an FP8-loaded model raises "Undefined Operation"
        import shutil

        shutil.rmtree(dst, ignore_errors=True)
        model.save_pretrained(dst, max_shard_size="5GB", save_original_format=False)  # fused transformers layout
    _fsync_tree(dst)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------- the run

def run(s: Shape, preset: str, work: Path, out_dir: Path, drop_caches: bool, log: Any) -> dict[str, Any]:
    """Generate the source, time every case, check the outputs; returns the results (also written to out_dir)."""
    src, out, stats = work / "src", work / "out", work / "stats.json"
    tool_out, ref_out = work / "tool-out", work / "ref-out"
    assert s.repeats == 1, "the check reuses the timed outputs"
    nparams = sum(math.prod(sp[2]) for sp in tensor_specs(s))
    check_disk(work, nparams * 3)  # the source, one bf16 output
    t0 = time.perf_counter()
    in_bytes = generate(src, s, os.cpu_count() or 1)
    log(f"generated {in_bytes / GB:.2f} GB FP8 source in {time.perf_counter() - t0:.1f} s")
    b = Bench(_settings(s), work, drop_caches, log)
    fp8 = sum(math.prod(sp[2]) for sp in tensor_specs(s) if sp[1] == "F8_E4M3")
    out_bytes = in_bytes + fp8 - sum(math.prod(sp[2]) * 4 for sp in tensor_specs(s) if sp[0].endswith("_scale_inv"))
    py = sys.executable
    cases = [Case(Row("cp -r source", "cp", s.layers, 1, 0, in_bytes), cp_command(src, out), [src], out, repeats=s.repeats)]
    for ws in s.world_sizes:
        args = ["--src", str(src), "--dst", str(out), "--dtype", "bf16", "--no-progress", "--stats", str(stats)]
        if ws == 1:  # its output is kept for the check (repeats is 1)
            args[3] = str(tool_out)
        cases.append(Case(Row(f"tool ws{ws}", "dequant", s.layers, ws, ws, out_bytes),
                          b.launch("convert.split_experts", args, ws), [src], None if ws == 1 else out, stats, s.repeats))
    # The baselines use every core, as a user's run would, and the CPU only, as the tool does (with a GPU in
    # sight transformers keeps the FP8 weights quantized for its GPU kernels instead of dequantizing them).
    threads = {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "CUDA_VISIBLE_DEVICES": ""}
    whole = Case(Row("whole-shard (fp8_cast_bf16 on CPU)", "whole-shard", s.layers, 1, 0, out_bytes),
                 [py, "-m", "bench.dequant", "_whole-shard", str(src), str(ref_out)], [src], None, repeats=s.repeats,
                 env=threads)
    weights = [sp[0] for sp in tensor_specs(s) if sp[1] == "F8_E4M3"]
    sample = weights[:: max(1, len(weights) // 60)]
    # Two rounds so that only one 2x-sized output is on disk at a time: each kept output is hashed, then removed.
    b.run_rounds(cases[:2])
    tool_hash = hash_weights(tool_out, sample)
    _remove(tool_out)
    b.run_rounds([*cases[2:], whole])
    ref_hash = hash_weights(ref_out, sample)
    _remove(ref_out)
    checks: dict[str, str] = {}
    skipped: dict[str, str] = {}
    diff = [k for k in sample if tool_hash[k] != ref_hash[k]]
    checks["tool vs whole-shard (dequantized FP8 weights)"] = (
        f"{diff[0]} differs" if diff else f"identical ({len(sample)} dequantized weights compared byte for byte)")
    if s.transformers:
        row = Row("transformers from_pretrained + save_pretrained", "transformers", s.layers, 1, 0, out_bytes)
        try:
            b.sample(Case(row, [py, "-m", "bench.dequant", "_transformers", str(src), str(out)], [src], out, env=threads))
            b.rows.append(row)
        except RuntimeError as exc:
            skipped[row.name] = "transformers could not do it here: " + failure_reason(str(exc))
            log(str(exc)[-3000:])
            log(f"  skipped: {skipped[row.name]}")
    rows = [asdict(r) | {"seconds": r.seconds, "gbps": r.gbps, "stream_seconds": r.stream_seconds,
                         "stream_gbps": r.stream_gbps} for r in b.rows]
    results = {
        "preset": preset, "shape": asdict(s), "in_bytes": in_bytes, "out_bytes": out_bytes, "rows": rows,
        "checks": checks, "skipped": skipped, "cold_cache": "drop_caches" if b.drop_caches else "posix_fadvise",
        "storage": storage(work),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "torch": _version("torch"), "transformers": _version("transformers")},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dequant.json").write_text(json.dumps(results, indent=2))
    (out_dir / "DEQUANT.md").write_text(report(results))
    return results


def failure_reason(text: str) -> str:
    """The line of a failed command's output that says why: the first exception message naming a tensor or
    a shape (transformers reports its conversion errors above its final RuntimeError), else the last line."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    for x in lines:
        if x.startswith(("ValueError:", "Error:")):
            why = [y for y in lines if y.startswith("Error:")][:1] + [x]
            return " / ".join(dict.fromkeys(why))[:400]
    return lines[-1][:300] if lines else "no output"


def storage(path: Path) -> str:
    """The mount holding `path`: its mount point, device and file system type, from /proc/mounts."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    return f"{best[1]} ({best[2]} on {best[0]})" if best else "unknown"


def hash_weights(d: Path, names: list[str]) -> dict[str, str]:
    """sha256 of (dtype, shape, bytes) of tensors `names` of checkpoint dir `d` (found via its index)."""
    import hashlib

    import torch
    from safetensors import safe_open

    where = json.loads((d / INDEX).read_text())["weight_map"]
    out = {}
    for k in names:
        with safe_open(d / where[k], "pt") as f:
            t = f.get_tensor(k)
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        out[k] = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode() + raw).hexdigest()
    return out


def _settings(s: Shape) -> Any:
    from bench.run import Settings

    return Settings(preset="dequant", settle_seconds=0.5)


def _version(mod: str) -> str:
    try:
        return str(__import__(mod).__version__)
    except Exception:  # noqa: BLE001 - informational only
        return "not installed"


def report(r: dict[str, Any]) -> str:
    """DEQUANT.md: throughput, memory, targets and checks of one run's results."""
    rows = {x["name"]: x for x in r["rows"]}
    ws_rows = [x for x in r["rows"] if x["op"] == "dequant"]
    base = rows.get("whole-shard (fp8_cast_bf16 on CPU)")
    s = r["shape"]
    lines = [
        "# Dequantizing FP8 to bf16: the tool against the usual ways", "",
        f"Preset `{r['preset']}`: DeepSeek-V3 shapes H={s['hidden']}, I={s['inter']}, E={s['experts']}, "
        f"{s['layers']} MoE layer(s) with MLA attention; {r['in_bytes'] / GB:.2f} GB FP8 in, "
        f"{r['out_bytes'] / GB:.2f} GB bf16 out (per-expert), source and outputs on {r.get('storage', 'unknown')}. "
        f"Cold page cache ({r['cold_cache']}) before each sample. "
        f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, torch {r['machine']['torch']}, "
        f"transformers {r['machine']['transformers']}.", "",
        "GB/s = bytes of bf16 output / wall seconds. Peak RSS: the largest rank (the tool, from --stats) or process.", "",
        "| case | ranks | wall s | GB/s | data phase s | data GB/s | peak RSS per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        per_rank = ", ".join(rss_text(k["peak_rss_bytes"]) for k in x["ranks"]) if x["ranks"] else (
            rss_text(max(x["peak_rss"])) if x["op"] != "cp" and x["peak_rss"] else "-")
        data = (f"{x['stream_seconds']:.2f} | {x['stream_gbps']:.3f}" if x["stream"] else "- | -")
        lines.append(f"| {x['name']} | {x['ws'] or 1} | {x['seconds']:.2f} | {x['gbps']:.3f} | {data} | {per_rank} |")
    for name, why in r["skipped"].items():
        lines.append(f"| {name} | - | skipped | | | | {why} |")
    lines += ["", "## Targets", ""]
    top = max(ws_rows, key=lambda x: x["ws"]) if ws_rows else None
    if top and base:
        speed = top["gbps"] / base["gbps"]
        mem = max(base["peak_rss"]) / max(k["peak_rss_bytes"] for k in top["ranks"])
        lines += [f"- throughput at {top['ws']} ranks vs the whole-shard approach: {speed:.1f}x (target >= 3x at 4 ranks): "
                  + ("met" if speed >= 3 and top["ws"] >= 4 else "NOT met" if top["ws"] >= 4 else "n/a (fewer than 4 ranks)"),
                  f"- peak memory per rank vs the whole-shard approach: {mem:.1f}x less (target >= 10x): "
                  + ("met" if mem >= 10 else "NOT met")]
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in r["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_whole-shard":
        return whole_shard(argv[1], argv[2])
    if argv and argv[0] == "_transformers":
        return transformers_roundtrip(argv[1], argv[2])
    p = argparse.ArgumentParser(prog="bench.dequant", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--workdir", default=None, help="where the data goes (default: the system temp dir)")
    p.add_argument("--no-drop-caches", action="store_true", help="evict with posix_fadvise only")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers case")
    p.add_argument("--fp8-codes", choices=FP8_CODES, default=FP8_CODES[0],
                   help="how the FP8 weights' codes are drawn (FP8_CODES)")
    a = p.parse_args(argv)
    s = Shape(**{**asdict(PRESETS[a.preset]), "fp8_codes": a.fp8_codes})
    if a.no_transformers:
        s = Shape(**{**asdict(s), "transformers": False})
    with tempfile.TemporaryDirectory(prefix="moe-bench-dequant-", dir=a.workdir) as work:
        t0 = time.perf_counter()
        run(s, a.preset, Path(work), Path(a.out), not a.no_drop_caches, lambda m: print(m, flush=True))
        print((Path(a.out) / "DEQUANT.md").read_text())
        print(f"total {time.perf_counter() - t0:.1f} s")
    return None


if __name__ == "__main__":
    main()
