"""Baselines the benchmark measures the tool against, on the same bytes.

- naive fuse / split: what a user writes without this tool: load every tensor of the
  checkpoint with safetensors, `torch.stack` (or slice) the experts, `save_file` the result
  in shards with an index. The whole state dict is in memory at once.
- save_file: the raw cost of writing a conversion's output tensors with
  `safetensors.torch.save_file` (tensors already in memory; only the write is timed).

Every baseline fsyncs what it wrote, as the tool does, so times compare like with like.

    python -m bench.baselines naive-fuse --src DIR --dst DIR [--layout L] [--max-shard-size 5GB]
    python -m bench.baselines naive-split --src DIR --dst DIR [--max-shard-size 5GB]
    python -m bench.baselines save-file --src FILE.safetensors --dst FILE.safetensors
    python -m bench.baselines transformers-fuse|transformers-split --src DIR --dst DIR [--max-shard-size 5GB]

transformers-fuse / -split: what a transformers-5 user runs: `from_pretrained` (the per-expert
or the fused checkpoint; transformers fuses experts on load), then `save_pretrained` with
`save_original_format=False` (fused, as held in memory) or the default (per-expert, the
checkpoint's original names). The output JSON also names the transformers version and whether
`save_original_format` exists in it.

Each prints one JSON line: {"peak_rss_bytes": ...} (and "seconds" for save-file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

from convert.engine.job import peak_rss_bytes
from convert.families import Family, detect_family, template_regex
from sharding.file_layout import natural_key, parse_size

INDEX = "model.safetensors.index.json"


def load_all(src: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the checkpoint directory `src` in memory, and its config.json."""
    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(src, name)))
    with open(os.path.join(src, "config.json")) as fh:
        return state, json.load(fh)


def save_sharded(state: dict[str, torch.Tensor], src: str, dst: str, max_shard: int) -> None:
    """save_file `state` as size-limited shards + index, copy the other files of `src`, fsync all."""
    os.makedirs(dst, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(state, key=natural_key):
        n = state[name].numel() * state[name].element_size()
        if groups[-1] and size + n > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, written = {}, []
    for i, names in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in names}, os.path.join(dst, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        written.append(fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(dst, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and name != INDEX and os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    fsync_tree(dst)


def fsync_tree(root: str) -> None:
    """fsync every file directly below `root`."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _prefixes(state: dict[str, torch.Tensor], template: str) -> list[str]:
    rx = template_regex(template)
    return sorted({m["prefix"] for k in state for m in [rx.match(k)] if m}, key=natural_key)


def naive_fuse(state: dict[str, torch.Tensor], family: Family, num_experts: int, layout: str) -> None:
    """Replace every layer's per-expert tensors in `state` by the fused tensors of `layout` (in place)."""
    for p in _prefixes(state, family.per_expert[family.roles[0]].replace("{e}", "0")):
        role = {r: [state.pop(tpl.format(prefix=p, e=e)) for e in range(num_experts)]
                for r, tpl in family.per_expert.items()}
        for t in family.fused[layout]:
            parts = [torch.stack([role[r][e].T if t.transpose else role[r][e] for e in range(num_experts)])
                     for r in t.parts]
            if t.op == "interleave":
                fused = torch.stack(parts, dim=-1).flatten(-2)
            else:
                fused = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            state[t.template.format(prefix=p)] = fused.contiguous()
        del role


def naive_split(state: dict[str, torch.Tensor], family: Family, num_experts: int) -> None:
    """Replace every fused tensor in `state` (any layout of `family`) by per-expert tensors (in place)."""
    for layout in family.fused:
        for t in family.fused[layout]:
            for p in _prefixes(state, t.template):
                fused = state.pop(t.template.format(prefix=p))
                k = len(t.parts)
                for e in range(num_experts):
                    x = fused[e]
                    if t.op == "interleave":
                        parts = [x[..., j::k] for j in range(k)]
                    else:
                        parts = list(x.chunk(k, dim=1 if t.transpose and x.dim() == 2 else 0))
                    for r, part in zip(t.parts, parts):
                        part = part.T if t.transpose and part.dim() == 2 else part
                        state[family.per_expert[r].format(prefix=p, e=e)] = part.clone(memory_format=torch.contiguous_format)
                del fused


def run_naive(op: str, src: str, dst: str, layout: str | None, max_shard: int) -> None:
    """The naive baseline `op` (fuse or split) of checkpoint `src` into `dst`."""
    state, config = load_all(src)
    family = detect_family(config, os.path.join(src, "config.json"))
    num_experts = family.num_experts(config, "config.json")
    if op == "fuse":
        naive_fuse(state, family, num_experts, layout or family.default_fused)
    else:
        naive_split(state, family, num_experts)
    save_sharded(state, src, dst, max_shard)


def time_save_file(src_file: str, dst_file: str) -> float:
    """Load `src_file`'s tensors (untimed), then time `save_file` of them to `dst_file` plus its fsync."""
    tensors = load_file(src_file)
    t0 = time.perf_counter()
    save_file(tensors, dst_file, metadata={"format": "pt"})
    fd = os.open(dst_file, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def run_transformers(op: str, src: str, dst: str, max_shard: int) -> dict[str, object]:
    """from_pretrained(`src`) + save_pretrained(`dst`): fused output for op "fuse", per-expert for "split".

    Returns the transformers version and whether save_pretrained takes `save_original_format`.
    """
    import inspect

    import transformers
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    first = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[0]
    with safe_open(os.path.join(src, first), "pt") as f:
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype()  # the checkpoint's own dtype (no float32 upcast)
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    model, info = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, output_loading_info=True)
    bad = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"transformers did not load {src} as its checkpoint: {bad}")
    has_flag = "save_original_format" in inspect.signature(model.save_pretrained).parameters
    kwargs = {"save_original_format": op == "split"} if has_flag else {}
    model.save_pretrained(dst, max_shard_size=max_shard, **kwargs)
    fsync_tree(dst)
    return {"transformers": transformers.__version__, "save_original_format_arg": has_flag}


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run one baseline."""
    p = argparse.ArgumentParser(prog="bench.baselines", description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["naive-fuse", "naive-split", "save-file", "transformers-fuse", "transformers-split"])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--layout", default=None)
    p.add_argument("--max-shard-size", default="5GB", type=parse_size)
    a = p.parse_args(argv)
    out: dict[str, object] = {}
    if a.op == "save-file":
        out["seconds"] = time_save_file(a.src, a.dst)
    elif a.op.startswith("transformers-"):
        out.update(run_transformers(a.op.split("-")[1], a.src, a.dst, a.max_shard_size))
    else:
        run_naive(a.op.split("-")[1], a.src, a.dst, a.layout, a.max_shard_size)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
