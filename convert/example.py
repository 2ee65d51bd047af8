"""`python -m convert.example DIR`: write a small random per-expert MoE checkpoint to try the tool on.

The checkpoint has the per-expert key names, shapes and config.json of a Hugging Face
Qwen3-MoE model (or of any family of the family tables with --family: `fuse_experts`
fuses every one of them), scaled down, in several shards with an index; it is
generated locally, nothing is downloaded. gpt_oss_mxfp4 writes MXFP4 experts
(U8 blocks and E8M0 scales per expert, the layout `split_experts --allow-unread-layout`
writes from a released gpt-oss), which needs --hidden and --intermediate multiples of 32.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from convert.errors import ConversionError
from convert.families import load_families
from convert.flag_types import positive_int, size_arg
from convert.formats.shard_layout import layout_files
from convert.plan.transforms import TORCH_DTYPES
from convert.toplevel import ToolParser, run_guarded

DTYPE_NAME_OF = {v: k for k, v in TORCH_DTYPES.items()}
TORCH_OF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INDEX = "model.safetensors.index.json"
EXAMPLE_MARKER = ".moe-convert-example.json"  # lists the files an example wrote, so the next one may replace them


def example_tensors(
    family: str, layers: int, experts: int, hidden: int, inter: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Random per-expert tensors and a config.json dict for a small model of `family`."""
    g = torch.Generator().manual_seed(seed)
    families = load_families()
    fam = families[family]
    # A family with no model type of its own (gpt_oss_mxfp4) is read through another's config.json: that
    # family's model type and the quant_method its `quantization.formats` maps to this family.
    quantized = next(((f.model_types[0], method) for f in families.values() if f.model_types
                      for method, target in f.quant_formats.items() if target == family), None)
    packed = any(role.endswith("_blocks") for role in fam.per_expert)
    if packed and (hidden % 32 or inter % 32):
        raise ValueError(f"--family {family}: --hidden and --intermediate must be multiples of 32 "
                         f"(MXFP4 packs 32 values per scale); got {hidden} and {inter}")
    heads, head_dim = 4, hidden // 4
    cfg: dict[str, object] = {
        "model_type": quantized[0] if quantized else (family if family in fam.model_types else fam.model_types[0]),
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
    elif cfg["model_type"] == "gpt_oss":
        cfg.update(num_local_experts=experts, intermediate_size=inter, num_experts_per_tok=2)
    else:
        cfg.update(num_experts=experts, moe_intermediate_size=inter, intermediate_size=2 * inter, num_experts_per_tok=2)
    # The key this family's config.json names its expert count with (the one conversions read first).
    cfg.setdefault(fam.num_experts_keys[0], experts)
    if quantized:
        cfg["quantization_config"] = {"quant_method": quantized[1]}

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(256, hidden), "model.norm.weight": rand(hidden)}
    role_shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
                   "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (hidden,),
                   # MXFP4 (per expert, as nn.Linear rows [out, in] packed along `in`): 32 values a scale, 2 a byte
                   "gate_blocks": (inter, hidden // 32, 16), "up_blocks": (inter, hidden // 32, 16),
                   "down_blocks": (hidden, inter // 32, 16), "gate_scales": (inter, hidden // 32),
                   "up_scales": (inter, hidden // 32), "down_scales": (hidden, inter // 32)}

    def expert_tensor(role: str) -> torch.Tensor:
        shape = role_shapes[role]
        if role.endswith("_blocks"):  # any byte is two FP4 codes
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        if role.endswith("_scales"):  # E8M0 exponents near 2**0 (bias 127)
            return torch.randint(120, 131, shape, generator=g, dtype=torch.uint8)
        return rand(*shape)

    for layer in range(layers):
        p = f"model.layers.{layer}"
        t[f"{p}.self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = rand(2 * head_dim, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = rand(2 * head_dim, hidden)
        t[f"{p}.self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        t[f"{p}.input_layernorm.weight"] = rand(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = rand(hidden)
        router = "mlp.router" if cfg["model_type"] == "gpt_oss" else "mlp.gate"
        t[f"{p}.{router}.weight"] = rand(experts, hidden)
        for e in range(experts):
            for role, tpl in fam.expert_templates.items():
                t[tpl.format(prefix=p, e=e)] = expert_tensor(role)
    # The tensors the model holds apart and its checkpoints joined (a family's `splits`: Param2MoE's q/k/v
    # projections are one `query_key_value` on disk), joined along dim 0 as save_pretrained writes them.
    for merge in fam.merges:
        if merge.split is not None:
            # model naming in and out (the renames are undone below, once, on every name)
            for cut in merge.cuts(sorted(t), False, fam.to_model, lambda name: name, cfg, "convert.example"):
                t[cut.whole] = torch.cat([t.pop(part) for part in cut.parts])
    # Names as the model holds them -> as its per-expert checkpoint names them (the family's renames undone,
    # as save_pretrained does: Mixtral's `mlp.` is `block_sparse_moe.` on disk, nemotron_h's `model.` `backbone.`).
    return {fam.to_disk(name): tensor for name, tensor in t.items()}, cfg


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


def build_parser() -> ToolParser:
    """The command line of convert.example."""
    p = ToolParser(prog="convert.example", description=__doc__.splitlines()[0])
    p.add_argument("dst", help="the directory to write (absent, empty, or holding an earlier example, which is replaced)")
    p.add_argument("--family", default="qwen3_moe", choices=sorted(load_families()),
                   help="the model family whose per-expert names and config.json to write (default: qwen3_moe); "
                        "fuse_experts fuses the example of each")
    p.add_argument("--layers", type=positive_int, default=4, help="decoder layers, each an MoE layer (default 4)")
    p.add_argument("--experts", type=positive_int, default=12, help="experts per layer, E (default 12)")
    p.add_argument("--hidden", type=positive_int, default=256, help="hidden size H (default 256)")
    p.add_argument("--intermediate", type=positive_int, default=96, help="an expert's intermediate size I (default 96)")
    p.add_argument("--dtype", default="bf16", choices=sorted(TORCH_OF), help="dtype of the weights (default bf16)")
    p.add_argument("--max-shard-size", default="2MB", type=size_arg,
                   help="largest shard file, e.g. 2MB (default), 500KB: the example has several shards")
    p.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse flags and write the example checkpoint."""
    a = build_parser().parse_args(argv)

    def run() -> int:
        try:
            tensors, cfg = example_tensors(a.family, a.layers, a.experts, a.hidden, a.intermediate, a.seed,
                                           TORCH_OF[a.dtype])
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
