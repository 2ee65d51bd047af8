"""`python -m convert.example DIR`: write a small random per-expert MoE checkpoint to try the tool on.

The checkpoint has the key names, shapes and config.json of a Hugging Face
Qwen3-MoE (or Mixtral / gpt-oss with --family) model, scaled down, in several
shards with an index; it is generated locally, nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from convert.errors import ConversionError
from convert.families import load_families
from convert.toplevel import ToolParser, run_guarded
from convert.flag_types import positive_int, size_arg
from convert.plan.transforms import TORCH_DTYPES
from convert.formats.shard_layout import layout_files

DTYPE_NAME_OF = {v: k for k, v in TORCH_DTYPES.items()}
TORCH_OF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INDEX = "model.safetensors.index.json"
EXAMPLE_MARKER = ".moe-convert-example.json"  # lists the files an example wrote, so the next one may replace them


def example_tensors(
    family: str, layers: int, experts: int, hidden: int, inter: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Random per-expert tensors and a config.json dict for a small model of `family`."""
    g = torch.Generator().manual_seed(seed)
    fam = load_families()[family]
    heads, head_dim = 4, hidden // 4
    cfg: dict[str, object] = {
        "model_type": family if family in fam.model_types else fam.model_types[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "vocab_size": 256,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family == "mixtral":
        cfg.update(num_local_experts=experts, intermediate_size=inter, num_experts_per_tok=2)
    elif family == "gpt_oss":
        cfg.update(num_local_experts=experts, intermediate_size=inter, num_experts_per_tok=2)
    else:
        cfg.update(num_experts=experts, moe_intermediate_size=inter, intermediate_size=2 * inter, num_experts_per_tok=2)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(256, hidden), "model.norm.weight": rand(hidden)}
    role_shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
                   "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (hidden,)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        t[f"{p}.self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = rand(2 * head_dim, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = rand(2 * head_dim, hidden)
        t[f"{p}.self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        t[f"{p}.input_layernorm.weight"] = rand(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = rand(hidden)
        router = "block_sparse_moe.gate" if family == "mixtral" else ("mlp.router" if family == "gpt_oss" else "mlp.gate")
        t[f"{p}.{router}.weight"] = rand(experts, hidden)
        for e in range(experts):
            for role, tpl in fam.per_expert.items():
                t[tpl.format(prefix=p, e=e)] = rand(*role_shapes[role])
    return t, cfg


class _Spec:
    def __init__(self, name: str, t: torch.Tensor) -> None:
        self.name, self.shape, self.dtype = name, tuple(t.shape), DTYPE_NAME_OF[t.dtype]
        self.nbytes = t.numel() * t.element_size()


def checkpoint_files(tensors: dict[str, torch.Tensor], max_shard: int) -> list[str]:
    """The names of the files write_checkpoint writes for `tensors` (shards, index, config.json)."""
    files = layout_files([_Spec(n, v) for n, v in tensors.items()], max_shard, {"format": "pt"})
    return [f.name for f in files] + [INDEX, "config.json"]


def write_checkpoint(tensors: dict[str, torch.Tensor], config: dict[str, object], out: str, max_shard: int) -> None:
    """Save `tensors` as HF-style shards + index + config.json under `out`."""
    os.makedirs(out, exist_ok=True)
    files = layout_files([_Spec(n, v) for n, v in tensors.items()], max_shard, {"format": "pt"})
    weight_map = {}
    for f in files:
        save_file({n: tensors[n].contiguous() for n in f.slots}, os.path.join(out, f.name), metadata={"format": "pt"})
        weight_map.update({n: f.name for n in f.slots})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    with open(os.path.join(out, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


def clear_previous_example(dst: str) -> None:
    """Make `dst` ready for a fresh example: absent, empty, or holding only a previous example's files
    (which are removed). Raises ValueError (one line) for a directory holding anything else."""
    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise ValueError(f"{dst} exists and is not a directory")
    present = set(os.listdir(dst))
    if not present:
        return
    listed: dict[str, int | None] = {}
    try:
        with open(os.path.join(dst, EXAMPLE_MARKER)) as fh:
            listed = dict(json.load(fh)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # A listed file of another size was replaced by something else since (e.g. a conversion's copy of the list).
    foreign = sorted(n for n in present - {EXAMPLE_MARKER}
                     if n not in listed or listed[n] not in (None, os.path.getsize(os.path.join(dst, n))))
    if not listed or foreign:
        what = f"{foreign[0]!r}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "") if foreign else "files"
        raise ValueError(f"{dst} is not empty and holds {what} that convert.example did not write (or that changed since); "
                         "choose a new or empty directory")
    for name in sorted(present & set(listed)):
        os.remove(os.path.join(dst, name))
    os.remove(os.path.join(dst, EXAMPLE_MARKER))


def main(argv: list[str] | None = None) -> None:
    """Parse flags and write the example checkpoint."""
    p = ToolParser(prog="convert.example", description=__doc__.splitlines()[0])
    p.add_argument("dst")
    p.add_argument("--family", default="qwen3_moe", choices=sorted(load_families()))
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--experts", type=positive_int, default=12)
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--intermediate", type=positive_int, default=96)
    p.add_argument("--dtype", default="bf16", choices=sorted(TORCH_OF))
    p.add_argument("--max-shard-size", default="2MB", type=size_arg)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    def run() -> int:
        tensors, cfg = example_tensors(a.family, a.layers, a.experts, a.hidden, a.intermediate, a.seed,
                                       TORCH_OF[a.dtype])
        try:
            clear_previous_example(a.dst)
        except ValueError as exc:
            raise ConversionError(str(exc)) from exc
        names = checkpoint_files(tensors, a.max_shard_size)
        os.makedirs(a.dst, exist_ok=True)
        marker = os.path.join(a.dst, EXAMPLE_MARKER)
        with open(marker, "w") as fh:  # first (sizes unknown yet): an interrupted write is still ours to replace
            json.dump({"written_by": "convert.example", "files": {n: None for n in names}}, fh)
        write_checkpoint(tensors, cfg, a.dst, a.max_shard_size)
        with open(marker, "w") as fh:
            json.dump({"written_by": "convert.example",
                       "files": {n: os.path.getsize(os.path.join(a.dst, n)) for n in names}}, fh)
        print(f"wrote a random {a.family} checkpoint ({len(tensors)} tensors, one per expert and role) to {a.dst}")
        return 0

    code = run_guarded(run)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
