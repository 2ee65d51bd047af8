"""Synthetic per-expert checkpoints with real model shapes, written without holding them in memory.

`python -m bench.synthetic DIR --preset qwen3-30b-a3b --layers 2` writes a checkpoint whose
expert layers have the real shapes (E, H, I) and names of the family, with `--layers`
MoE layers so a run fits a small disk. Data is `zeros` (sparse files: instant),
`random` (seeded pseudo-random bytes written in bounded chunks: real blocks on disk, so
`cp` cannot skip holes) or `normal` (seeded N(0, 0.02) values in the tensors' dtype, as
trained weights hold: what a `--dtype` cast can be checked on, where random bytes overflow).

`python -m bench.synthetic DIR --adapter shared_w123 --layers 4` writes a LoRA adapter of a
survey's shape instead (see ADAPTER_PRESETS), and its base model's config.json as
`DIR.base-config.json` (for split_adapter's `--base-config`).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from convert.families import load_families
from convert.formats.safetensors import DTYPE_SIZES, build_header, numel
from convert.formats.shard_layout import layout_files
from sharding.file_layout import parse_size

PRESETS = {
    # name: (family, E, H, I, vocab, q heads x head_dim, kv heads)
    "qwen3-30b-a3b": ("qwen3_moe", 128, 2048, 768, 151936, (32, 128), 4),
    "gpt-oss-20b": ("gpt_oss", 32, 2880, 2880, 201088, (64, 64), 8),
    "tiny": ("qwen3_moe", 6, 64, 40, 128, (2, 32), 1),
    "tiny-gpt-oss": ("gpt_oss", 4, 64, 48, 128, (2, 32), 1),
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
        if family == "qwen3_moe":  # Qwen3's per-head RMSNorm of q and k: the model does not load without them
            specs += [Spec(f"{p}.self_attn.q_norm.weight", dtype, (hd,)), Spec(f"{p}.self_attn.k_norm.weight", dtype, (hd,))]
        for e in range(E):
            specs += [Spec(tpl.format(prefix=p, e=e), dtype, shapes[role]) for role, tpl in fam.per_expert.items()]
    config = {"model_type": fam.model_types[0], "hidden_size": H, "num_hidden_layers": layers,
              "num_experts": E, "num_local_experts": E, "moe_intermediate_size": I, "intermediate_size": I,
              "vocab_size": vocab}
    if family == "qwen3_moe":  # the rest of a loadable Qwen3-MoE config (transformers' Qwen3MoeForCausalLM)
        config.update({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_attention_heads": qh, "num_key_value_heads": kvh,
                       "head_dim": hd, "num_experts_per_tok": min(8, E), "decoder_sparse_step": 1,
                       "mlp_only_layers": [], "tie_word_embeddings": False})
    return specs, config


def normal_bytes(rng: np.random.Generator, n: int, dtype: str) -> bytes:
    """`n` bytes of N(0, 0.02) values of safetensors float `dtype` (BF16: float32 values truncated)."""
    item = DTYPE_SIZES[dtype]
    x = rng.standard_normal(n // item, dtype=np.float32) * np.float32(0.02)
    if dtype == "BF16":
        out = (x.view(np.uint32) >> 16).astype(np.uint16)
    else:
        out = x.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])
    return out.tobytes()


def write_synthetic(
    out: str, specs: list[Spec], config: dict, max_shard: int, data: str = "zeros", seed: int = 0, jobs: int = 1
) -> int:
    """Write shards + index + config.json; returns total tensor bytes. `data` is zeros, random or normal
    (normal: every tensor of the first spec's dtype).

    `jobs` > 1 fills that many parts of the shards at once (separate processes, one seed per PART_BYTES part).
    """
    os.makedirs(out, exist_ok=True)
    files = layout_files(specs, max_shard, {"format": "pt"})
    parts: list[tuple[str, int, int, str, int, str]] = []
    for i, f in enumerate(files):
        path = os.path.join(out, f.name)
        with open(path, "wb") as fh:
            fh.write(f.header)
            fh.truncate(f.size)
        if data in ("random", "normal"):
            parts += [(path, pos, min(PART_BYTES, f.size - pos), data, _seed(seed, i, k), specs[0].dtype)
                      for k, pos in enumerate(range(len(f.header), f.size, PART_BYTES))]
    if jobs > 1 and len(parts) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(parts))) as pool:
            list(pool.map(_write_part, parts, chunksize=4))
    else:
        for part in parts:
            _write_part(part)
    total = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f.name for f in files for n in f.slots}}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh)
    return total


# Adapters of the surveys' shapes (../shared/seeds): name -> (base preset, pattern, per-expert rank, dtype).
ADAPTER_PRESETS = {
    # Qwen3-30B-A3B "Pattern A": 3-D w1/w2/w3 LoRA, w1/w3 A and w2 B shared by all experts; rank 32 fp32.
    "shared_w123": ("qwen3-30b-a3b", "shared_w123", 32, "F32"),
    # gpt-oss-20b peft target_parameters on gate_up_proj/down_proj: rank 8 folded with E=32 (256); fp32.
    "peft_target_parameters": ("gpt-oss-20b", "peft_target_parameters", 8, "F32"),
    "tiny_shared_w123": ("tiny", "shared_w123", 4, "F32"),
}
BASE_MODEL_NAMES = {"qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B", "gpt-oss-20b": "openai/gpt-oss-20b"}
PEFT_PREFIX = "base_model.model."


def adapter_specs(preset: str, layers: int, experts: int | None = None) -> tuple[list[Spec], dict[str, Any], dict]:
    """Tensor specs, adapter_config.json and the base model's config.json of an adapter of `preset`.

    Every layer has attention LoRA (q/k/v/o, same rank) and expert LoRA in the preset's pattern.
    """
    base, pattern, r, dtype = ADAPTER_PRESETS[preset]
    family, E, H, I, _, (qh, hd), kvh = PRESETS[base]
    E = experts or E
    _, base_config = checkpoint_specs(base, layers, experts=E, vocab=1)
    attn = {"q": (qh * hd, H), "k": (kvh * hd, H), "v": (kvh * hd, H), "o": (H, qh * hd)}
    specs: list[Spec] = []
    for layer in range(layers):
        p = f"{PEFT_PREFIX}model.layers.{layer}"
        for proj, (out_dim, in_dim) in attn.items():
            specs += [Spec(f"{p}.self_attn.{proj}_proj.lora_A.weight", dtype, (r, in_dim)),
                      Spec(f"{p}.self_attn.{proj}_proj.lora_B.weight", dtype, (out_dim, r))]
        x = f"{p}.mlp.experts"
        if pattern == "shared_w123":
            for w in ("w1", "w3"):
                specs += [Spec(f"{x}.{w}.lora_A.weight", dtype, (1, r, H)), Spec(f"{x}.{w}.lora_B.weight", dtype, (E, I, r))]
            specs += [Spec(f"{x}.w2.lora_A.weight", dtype, (E, r, I)), Spec(f"{x}.w2.lora_B.weight", dtype, (1, H, r))]
        else:
            specs += [Spec(f"{x}.base_layer.lora_A.weight", dtype, (E * r, H)),
                      Spec(f"{x}.base_layer.lora_B.weight", dtype, (2 * I, r * E)),
                      Spec(f"{x}.lora_A.weight", dtype, (E * r, I)), Spec(f"{x}.lora_B.weight", dtype, (H, r * E))]
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_rslora": False, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": BASE_MODEL_NAMES.get(base, base),
    }
    if pattern == "shared_w123":
        config["target_modules"] = "all-linear"
    else:
        config["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    return specs, config, base_config


def write_adapter(out: str, specs: list[Spec], config: dict[str, Any], seed: int = 0) -> int:
    """Write adapter_model.safetensors (small normal values) and adapter_config.json into `out`.

    Returns the bytes of tensor data. Values are finite floats (LoRA-sized), written in bounded chunks.
    """
    os.makedirs(out, exist_ok=True)
    header, _, total = build_header([(s.name, s.dtype, s.shape) for s in specs], {"format": "pt"})
    rng = np.random.default_rng(seed)
    np_dtype = {"F32": np.float32, "F16": np.float16}[specs[0].dtype]
    item = np.dtype(np_dtype).itemsize
    with open(os.path.join(out, "adapter_model.safetensors"), "wb") as fh:
        fh.write(header)
        left = (total - len(header)) // item
        while left:
            n = min(4 << 20, left)
            fh.write((rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np_dtype).tobytes())
            left -= n
    with open(os.path.join(out, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return total - len(header)


PART_BYTES = 64 << 20  # bytes of a shard one job writes (its own seed): every core fills some of every shard


def _seed(seed: int, shard: int, part: int) -> int:
    """The seed of one part: distinct per (seed, shard, part), the same on every run."""
    return int(np.random.SeedSequence([seed, shard, part]).generate_state(1)[0])


def _write_part(job: tuple[str, int, int, str, int, str]) -> None:
    """Fill `size` bytes of an existing shard file from `offset` (random: rng bytes; normal: N(0, 0.02) values of
    `dtype`), in bounded chunks."""
    path, offset, size, data, seed, dtype = job
    rng, chunk = np.random.default_rng(seed), 16 << 20
    with open(path, "r+b") as fh:
        fh.seek(offset)
        left = size
        while left:
            n = min(chunk, left)
            fh.write(rng.bytes(n) if data == "random" else normal_bytes(rng, n, dtype))
            left -= n


def main(argv: list[str] | None = None) -> None:
    """Parse flags and write one synthetic checkpoint or adapter."""
    p = argparse.ArgumentParser(prog="bench.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("dst")
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=None, help="override E")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    p.add_argument("--data", default="zeros", choices=["zeros", "random", "normal"])
    p.add_argument("--max-shard-size", default="5GB", type=parse_size)
    p.add_argument("--adapter", default=None, choices=sorted(ADAPTER_PRESETS), help="write an adapter instead")
    a = p.parse_args(argv)
    if a.adapter:
        specs, cfg, base_cfg = adapter_specs(a.adapter, a.layers, a.experts)
        total = write_adapter(a.dst, specs, cfg)
        with open(a.dst.rstrip("/") + ".base-config.json", "w") as fh:
            json.dump(base_cfg, fh)
        print(f"wrote {total / 1e9:.3f} GB ({len(specs)} tensors) adapter to {a.dst}")
        return
    specs, config = checkpoint_specs(a.preset, a.layers, a.dtype, a.experts, a.vocab)
    total = write_synthetic(a.dst, specs, config, a.max_shard_size, a.data)
    print(f"wrote {total / 1e9:.3f} GB ({len(specs)} tensors) to {a.dst}")


if __name__ == "__main__":
    main()
