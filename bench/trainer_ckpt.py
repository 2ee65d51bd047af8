"""Trainer checkpoints of a Qwen3-MoE model, written the way torchtitan writes them: the sources of bench.trainer.

    torchrun --standalone --nproc-per-node 8 -m bench.trainer_ckpt --jobs '[{"format": "dcp", "dst": "DIR", "model": {"layers": 6}}]'

(a list of jobs, written one after the other by the same ranks; `model` holds Model's fields).

Every rank holds a Shard(0) slice of every tensor (a DTensor on a gloo CPU mesh: FSDP/EP-style, the experts
dimension split across ranks), and the whole state dict goes through `torch.distributed.checkpoint.save`:

- `dcp`: torchtitan's own names (torchtitan 0.5: `layers.N.moe.routed_experts.inner_experts.w1_EFD` [E, I, H],
  `w3_EFD`, `w2_EDF` [E, H, I], `layers.N.attention.qkv_linear.wq.weight`, `tok_embeddings.weight`,
  `lm_head.weight`, `layers.N.moe.expert_bias_E` (the load-balancing buffer; `--no-expert-bias` leaves it out)...)
  with the default FileSystemWriter: `.metadata` + one `__<rank>_0.distcp` per rank. This is a model-only save
  (`last_save_model_only`), in float32 (torchtitan's default `export_dtype`).
- `hf-sharded`: what torchtitan's `last_save_in_hf` hands to `HuggingFaceStorageWriter(save_distributed=True)`
  before its consolidation: HF names in the per-expert layout (torchtitan's Qwen3 `to_hf` splits the grouped
  experts: rank r holds its own experts' `model.layers.N.mlp.experts.e.{gate,up,down}_proj.weight` whole), the
  dense tensors as Shard(0) DTensors, `fqn_to_index_mapping` of <= 5 GB output files; files
  `shard-<rank+1>-model-<i>-of-<n>.safetensors` whose headers carry `DCP_SHARDING_INFO`. No consolidation.

The values are random-ish and deterministic: element i of tensor T is `base[(crc32(T) + i) % P]` of one seeded
N(0, 0.02) float32 vector of P (prime) elements, so every rank fills its slice at memcpy speed, both formats hold
the same model, and a checker can rebuild any tensor (`expected_tensor`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

P = 4_194_319  # prime length of the base vector (16 MiB of float32)
MAX_SHARD = 5_000_000_000


@dataclass(frozen=True)
class Model:
    """A Qwen3-MoE model's shapes: bench.synthetic's preset with E, vocabulary and layer count overridden."""

    preset: str = "qwen3-30b-a3b"
    layers: int = 6
    experts: int | None = None
    vocab: int | None = None
    dtype: str = "float32"
    expert_bias: bool = True

    def dims(self) -> tuple[int, int, int, int, int, int, int]:
        """(E, H, I, vocab, q heads, head_dim, kv heads)."""
        from bench.synthetic import PRESETS

        family, E, H, I, vocab, (qh, hd), kvh = PRESETS[self.preset]
        assert family == "qwen3_moe", self.preset
        return self.experts or E, H, I, self.vocab or vocab, qh, hd, kvh

    def itemsize(self) -> int:
        return {"float32": 4, "bfloat16": 2}[self.dtype]

    def config(self) -> dict:
        """The model's HF config.json (what `--base-config` gives the tool: trainer outputs have none)."""
        from bench.synthetic import checkpoint_specs

        E, _, _, vocab, _, _, _ = self.dims()
        cfg = dict(checkpoint_specs(self.preset, self.layers, experts=E, vocab=vocab)[1])
        cfg["torch_dtype"] = "bfloat16"
        return cfg


def titan_specs(m: Model) -> list[tuple[str, tuple[int, ...]]]:
    """torchtitan's (0.5) state dict of the model: (name, shape), in the model's order."""
    E, H, I, vocab, qh, hd, kvh = m.dims()
    specs: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (vocab, H))]
    for n in range(m.layers):
        p = f"layers.{n}"
        specs += [(f"{p}.attention.qkv_linear.wq.weight", (qh * hd, H)),
                  (f"{p}.attention.qkv_linear.wk.weight", (kvh * hd, H)),
                  (f"{p}.attention.qkv_linear.wv.weight", (kvh * hd, H)),
                  (f"{p}.attention.wo.weight", (H, qh * hd)),
                  (f"{p}.attention.q_norm.weight", (hd,)),
                  (f"{p}.attention.k_norm.weight", (hd,)),
                  (f"{p}.attention_norm.weight", (H,)),
                  (f"{p}.ffn_norm.weight", (H,)),
                  (f"{p}.moe.router.gate.weight", (E, H)),
                  (f"{p}.moe.routed_experts.inner_experts.w1_EFD", (E, I, H)),
                  (f"{p}.moe.routed_experts.inner_experts.w3_EFD", (E, I, H)),
                  (f"{p}.moe.routed_experts.inner_experts.w2_EDF", (E, H, I))]
        if m.expert_bias:
            specs.append((f"{p}.moe.expert_bias_E", (E,)))
    specs += [("norm.weight", (H,)), ("lm_head.weight", (vocab, H))]
    return specs


# torchtitan's Qwen3 state dict adapter (to_hf), layer-relative: titan suffix -> HF suffix. Experts: see EXPERTS.
TO_HF = {
    "attention.qkv_linear.wq.weight": "self_attn.q_proj.weight",
    "attention.qkv_linear.wk.weight": "self_attn.k_proj.weight",
    "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
}
EXPERTS = {"moe.routed_experts.inner_experts.w1_EFD": "gate_proj", "moe.routed_experts.inner_experts.w3_EFD": "up_proj",
           "moe.routed_experts.inner_experts.w2_EDF": "down_proj"}
TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
       "lm_head.weight": "lm_head.weight"}


def to_hf_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], int | None]]:
    """The HF per-expert tensors of torchtitan tensor `name`: (HF name, shape, expert index or None); [] where
    torchtitan's to_hf drops it (expert_bias_E: Qwen3 has no e_score_correction_bias)."""
    if name in TOP:
        return [(TOP[name], shape, None)]
    _, n, rest = name.split(".", 2)
    if rest in EXPERTS:
        return [(f"model.layers.{n}.mlp.experts.{e}.{EXPERTS[rest]}.weight", shape[1:], e) for e in range(shape[0])]
    if rest in TO_HF:
        return [(f"model.layers.{n}.{TO_HF[rest]}", shape, None)]
    return []


def hf_specs(m: Model) -> list[tuple[str, tuple[int, ...], str, int | None]]:
    """The HF per-expert checkpoint: (HF name, shape, torchtitan name, expert index or None)."""
    return [(hf, shp, name, e) for name, shape in titan_specs(m) for hf, shp, e in to_hf_names(name, shape)]


def fqn_to_index(m: Model, itemsize: int, max_shard: int = MAX_SHARD) -> dict[str, int]:
    """HF name -> output file index (1..n): <= `max_shard` bytes a file, in the model's order (what torchtitan
    reads from the HF assets' model.safetensors.index.json)."""
    out, idx, size = {}, 1, 0
    for hf, shape, _, _ in hf_specs(m):
        n = _numel(shape) * itemsize
        if size and size + n > max_shard:
            idx, size = idx + 1, 0
        out[hf] = idx
        size += n
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def unshardable(m: Model, world: int) -> list[str]:
    """The tensors of `m` whose dim 0 does not split evenly over `world` ranks (each rank holds an equal Shard(0))."""
    return [f"{name} {shape}" for name, shape in titan_specs(m) if shape[0] % world]


def base_vector(dtype: str):  # noqa: ANN201
    import torch

    g = torch.Generator().manual_seed(1234)
    return (torch.randn(P, generator=g, dtype=torch.float32) * 0.02).to(getattr(torch, dtype))


def fill(out, base, name: str, start: int) -> None:  # noqa: ANN001
    """Fill the flat tensor `out` with elements start.. of tensor `name` (base[(crc32(name) + i) % P])."""
    flat = out.view(-1)
    pos, k, n = (zlib.crc32(name.encode()) + start) % P, 0, flat.numel()
    while k < n:
        step = min(P - pos, n - k)
        flat[k:k + step].copy_(base[pos:pos + step])
        k, pos = k + step, 0


def expected_tensor(m: Model, hf_name: str):  # noqa: ANN201
    """The HF tensor `hf_name` as the sources hold it (the model's dtype)."""
    import torch

    for hf, shape, titan, e in hf_specs(m):
        if hf == hf_name:
            t = torch.empty(shape, dtype=getattr(torch, m.dtype))
            fill(t, base_vector(m.dtype), titan, 0 if e is None else e * _numel(shape))
            return t
    raise KeyError(hf_name)


def write(fmt: str, dst: str, m: Model, mesh) -> dict:  # noqa: ANN001
    """This rank's part of the checkpoint `fmt` of `m` (called on every rank of `mesh`, a gloo CPU mesh)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, m.dtype)
    base = base_vector(m.dtype)
    t0 = time.perf_counter()

    def local(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if shape[0] % world:
            raise SystemExit(f"{name} {shape}: dim 0 not divisible by {world} ranks")
        rows = shape[0] // world
        t = torch.empty((rows, *shape[1:]), dtype=dtype)
        fill(t, base, name, rank * rows * _numel(shape[1:]))
        return t

    def sharded(name: str, shape: tuple[int, ...]) -> DTensor:
        stride = tuple(_numel(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(local(name, shape), mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    state: dict[str, torch.Tensor] = {}
    if fmt == "dcp":
        for name, shape in titan_specs(m):
            state[name] = sharded(name, shape)
        writer = dcp.FileSystemWriter(dst)
    else:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        E = m.dims()[0]
        mine = range(rank * E // world, (rank + 1) * E // world)
        for name, shape in titan_specs(m):
            hf = to_hf_names(name, shape)
            if hf and hf[0][2] is not None:  # grouped experts: this rank's experts, whole, under per-expert names
                per = _numel(shape[1:])
                for e in mine:
                    t = torch.empty(shape[1:], dtype=dtype)
                    fill(t, base, name, e * per)
                    state[hf[e][0]] = t
            elif hf:
                state[hf[0][0]] = sharded(name, shape)
        writer = HuggingFaceStorageWriter(dst, fqn_to_index_mapping=fqn_to_index(m, m.itemsize()),
                                          save_distributed=True, enable_consolidation=False)
    t1 = time.perf_counter()
    dcp.save(state, storage_writer=writer)
    t2 = time.perf_counter()
    del state
    dist.barrier()
    return {"format": fmt, "dst": dst, "fill_s": round(t1 - t0, 2), "save_s": round(t2 - t1, 2)}


def main(argv: list[str] | None = None) -> None:
    """Write every job of --jobs on this rank (run under torchrun)."""
    p = argparse.ArgumentParser(prog="bench.trainer_ckpt", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", required=True, help='JSON list of {"format": "dcp"|"hf-sharded", "dst": DIR, "model": {...}}')
    a = p.parse_args(argv)
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    done = []
    for job in json.loads(a.jobs):
        if job["format"] not in ("dcp", "hf-sharded"):
            raise SystemExit(f"unknown format {job['format']}")
        m = Model(**job.get("model", {}))
        Path(job["dst"]).mkdir(parents=True, exist_ok=True)
        done.append({**write(job["format"], job["dst"], m, mesh), "model": asdict(m)})
    dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"jobs": done}), flush=True)


if __name__ == "__main__":
    main()
