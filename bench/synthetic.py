"""Synthetic per-expert checkpoints with real model shapes, written without holding them in memory.

`python -m bench.synthetic DIR --preset qwen3-30b-a3b --layers 2` writes a checkpoint whose
expert layers have the real shapes (E, H, I) and names of the family, with `--layers`
MoE layers so a run fits a small disk. Data is `zeros` (sparse files: instant) or
`random` (written in bounded chunks).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from convert.families import load_families
from convert.safetensors_format import DTYPE_SIZES, numel
from sharding.file_layout import layout_files, parse_size

PRESETS = {
    # name: (family, E, H, I, vocab, q heads x head_dim, kv heads)
    "qwen3-30b-a3b": ("qwen3_moe", 128, 2048, 768, 151936, (32, 128), 4),
    "gpt-oss-20b": ("gpt_oss", 32, 2880, 2880, 201088, (64, 64), 8),
    "tiny": ("qwen3_moe", 6, 64, 40, 128, (2, 32), 1),
}


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * DTYPE_SIZES[self.dtype]


def checkpoint_specs(
    preset: str, layers: int, dtype: str = "BF16", experts: int | None = None, vocab: int | None = None
) -> tuple[list[Spec], dict]:
    """Tensor specs and config.json of a per-expert checkpoint of `preset` with `layers` layers."""
    family, E, H, I, preset_vocab, (qh, hd), kvh = PRESETS[preset]
    E, vocab = experts or E, vocab or preset_vocab
    fam = load_families()[family]
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I), "gate_bias": (I,), "up_bias": (I,), "down_bias": (H,)}
    specs = [Spec("model.embed_tokens.weight", dtype, (vocab, H)), Spec("model.norm.weight", dtype, (H,)),
             Spec("lm_head.weight", dtype, (vocab, H))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        specs += [
            Spec(f"{p}.self_attn.q_proj.weight", dtype, (qh * hd, H)),
            Spec(f"{p}.self_attn.k_proj.weight", dtype, (kvh * hd, H)),
            Spec(f"{p}.self_attn.v_proj.weight", dtype, (kvh * hd, H)),
            Spec(f"{p}.self_attn.o_proj.weight", dtype, (H, qh * hd)),
            Spec(f"{p}.input_layernorm.weight", dtype, (H,)),
            Spec(f"{p}.post_attention_layernorm.weight", dtype, (H,)),
            Spec(f"{p}.mlp.{'router' if family == 'gpt_oss' else 'gate'}.weight", dtype, (E, H)),
        ]
        for e in range(E):
            specs += [Spec(tpl.format(prefix=p, e=e), dtype, shapes[role]) for role, tpl in fam.per_expert.items()]
    config = {"model_type": fam.model_types[0], "hidden_size": H, "num_hidden_layers": layers,
              "num_experts": E, "num_local_experts": E, "moe_intermediate_size": I, "intermediate_size": I,
              "vocab_size": vocab}
    return specs, config


def write_synthetic(out: str, specs: list[Spec], config: dict, max_shard: int, data: str = "zeros") -> int:
    """Write shards + index + config.json; returns total tensor bytes. `data` is zeros or random."""
    os.makedirs(out, exist_ok=True)
    files = layout_files(specs, max_shard, {"format": "pt"})
    chunk = 16 << 20
    for f in files:
        with open(os.path.join(out, f.name), "wb") as fh:
            fh.write(f.header)
            fh.truncate(f.size)
            if data == "random":
                fh.seek(len(f.header))
                left = f.size - len(f.header)
                while left:
                    n = min(chunk, left)
                    fh.write(os.urandom(n))
                    left -= n
    total = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f.name for f in files for n in f.slots}}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh)
    return total


def main(argv: list[str] | None = None) -> None:
    """Parse flags and write one synthetic checkpoint."""
    p = argparse.ArgumentParser(prog="bench.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("dst")
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=None, help="override E")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    p.add_argument("--data", default="zeros", choices=["zeros", "random"])
    p.add_argument("--max-shard-size", default="5GB", type=parse_size)
    a = p.parse_args(argv)
    specs, config = checkpoint_specs(a.preset, a.layers, a.dtype, a.experts, a.vocab)
    total = write_synthetic(a.dst, specs, config, a.max_shard_size, a.data)
    print(f"wrote {total / 1e9:.3f} GB ({len(specs)} tensors) to {a.dst}")


if __name__ == "__main__":
    main()
