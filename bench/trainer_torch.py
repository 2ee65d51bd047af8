"""torch's own paths from a trainer checkpoint to an HF checkpoint: what bench.trainer measures the tool against.

    python -m bench.trainer_torch dcp-to-hf --src DCP_DIR --dst OUT --base-config config.json [--tmp model.pt]
    python -m bench.trainer_torch consolidate --src SHARDED_DIR --dst OUT --index fqn_to_index.json [--threads N]

dcp-to-hf, the way a user does it with torch alone: `dcp_to_torch_save` (torch.distributed.checkpoint.format_utils:
the whole DCP checkpoint loaded in one process and torch.save'd), `torch.load` of that file, torchtitan's Qwen3
renames (bench.trainer_ckpt.to_hf_names, which follow torchtitan's Qwen3StateDictAdapter.to_hf: each grouped
[E, ...] expert tensor split into E per-expert tensors, expert_bias_E dropped), a cast to bf16, and
`safetensors.torch.save_file` in <= 5 GB shards with model.safetensors.index.json and the config.json. The state
dict is consumed as it is renamed (a careful user: no second full copy held). The temporary .pt is removed at the end.

consolidate: `torch.distributed.checkpoint._consolidate_hf_safetensors.consolidate_safetensors_files` (torch 2.11
to 2.13 give it no public name; HuggingFaceStorageWriter(enable_consolidation=True) and torchtitan's
`last_save_in_hf` call it there) of per-rank sharded safetensors into one HF checkpoint, with the
fqn_to_index_mapping torchtitan takes from the HF assets' index, `num_threads` threads (default: one per output
file, its most); it keeps the source dtype. Then the config.json is copied.

Both fsync what they wrote (as the tool and bench.baselines do) and print one JSON line: peak RSS (VmHWM) and
the seconds of their phases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from bench.baselines import fsync_tree
from convert.engine.job import peak_rss_bytes
from sharding.file_layout import natural_key

INDEX = "model.safetensors.index.json"


def dcp_to_hf(src: str, dst: str, base_config: str, tmp: str, max_shard: int) -> dict[str, float]:
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from bench.trainer_ckpt import to_hf_names

    t0 = time.perf_counter()
    dcp_to_torch_save(src, tmp)
    t1 = time.perf_counter()
    state = torch.load(tmp, map_location="cpu", weights_only=True)
    t2 = time.perf_counter()
    hf: dict[str, torch.Tensor] = {}
    for name in list(state):
        value = state.pop(name)
        for hf_name, _, e in to_hf_names(name, tuple(value.shape)):
            hf[hf_name] = (value if e is None else value[e]).to(torch.bfloat16).contiguous()
        del value
    t3 = time.perf_counter()
    os.makedirs(dst, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(hf, key=natural_key):
        n = hf[name].numel() * hf[name].element_size()
        if groups[-1] and size + n > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: hf[k] for k in names}, os.path.join(dst, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(t.numel() * t.element_size() for t in hf.values())
    with open(os.path.join(dst, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    shutil.copyfile(base_config, os.path.join(dst, "config.json"))
    fsync_tree(dst)
    t4 = time.perf_counter()
    os.remove(tmp)
    return {"dcp_to_torch_save_s": t1 - t0, "torch_load_s": t2 - t1, "rename_split_cast_s": t3 - t2,
            "save_file_s": t4 - t3}


def consolidate(src: str, dst: str, index: str, base_config: str | None, threads: int | None) -> dict[str, float]:
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    with open(index) as fh:
        mapping = {k: int(v) for k, v in json.load(fh).items()}
    n = threads or max(mapping.values())
    t0 = time.perf_counter()
    os.makedirs(dst, exist_ok=True)
    consolidate_safetensors_files(input_dir=src, output_dir=dst, fqn_to_index_mapping=mapping, num_threads=n)
    t1 = time.perf_counter()
    if base_config:
        shutil.copyfile(base_config, os.path.join(dst, "config.json"))
    fsync_tree(dst)
    return {"consolidate_s": t1 - t0, "fsync_s": time.perf_counter() - t1, "num_threads": n}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.trainer_torch", description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["dcp-to-hf", "consolidate"])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--base-config", default=None)
    p.add_argument("--tmp", default=None, help="dcp-to-hf: the torch.save file (default: DST.pt)")
    p.add_argument("--index", default=None, help="consolidate: JSON of HF name -> output file index (1..n)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-shard-size", type=int, default=5_000_000_000)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.op == "dcp-to-hf":
        if not a.base_config:
            p.error("dcp-to-hf needs --base-config")
        out = dcp_to_hf(a.src, a.dst, a.base_config, a.tmp or a.dst.rstrip("/") + ".pt", a.max_shard_size)
    else:
        if not a.index:
            p.error("consolidate needs --index")
        out = consolidate(a.src, a.dst, a.index, a.base_config, a.threads)
    print(json.dumps({**out, "seconds_in_process": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
