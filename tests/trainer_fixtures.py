"""Trainer checkpoints written the way trainers write them: several real gloo processes, sharded DTensors.

`write_trainer_checkpoints` saves a state dict with torch.distributed.checkpoint's FileSystemWriter
(`.metadata` + `__<rank>_0.distcp`) and with HuggingFaceStorageWriter(save_distributed=True) (per-rank
safetensors whose headers carry DCP_SHARDING_INFO). Each tensor is placed by `placement`: sharded
along dim 0 (FSDP / EP), along its last dim (TP), or replicated (saved once); uneven shards where the dim
does not divide by the world size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from s3_server import free_port


def placement(name: str, tensor: torch.Tensor, index: int) -> str:
    """How the fixtures shard a tensor: 'dim0', 'last' or 'replicate' (varied over tensors, deterministic)."""
    if tensor.dim() == 0:
        return "replicate"
    if ".experts." in name or index % 3 == 1:
        return "dim0"
    if tensor.dim() > 1 and index % 3 == 2:
        return "last"
    return "replicate"


def _sharded(state: dict[str, torch.Tensor], mesh: object) -> dict[str, object]:
    from torch.distributed.tensor import Shard, distribute_tensor

    out: dict[str, object] = {}
    for i, (name, t) in enumerate(sorted(state.items())):
        how = placement(name, t, i)
        if how == "replicate":
            out[name] = t
        else:
            out[name] = distribute_tensor(t, mesh, [Shard(0) if how == "dim0" else Shard(t.dim() - 1)])  # type: ignore[arg-type]
    return out


def _worker(rank: int, world: int, port: int, state_path: str, outs: dict[str, tuple[str, str]],
            extra_state: bool) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        states = torch.load(state_path, weights_only=True)
        for name, (kind, path) in outs.items():
            sharded = _sharded(states[name], mesh)
            if kind == "dcp":
                payload: dict[str, object] = {"model": sharded}
                if extra_state:  # what a training checkpoint holds beside the model
                    payload["optimizer"] = {"state": {"exp_avg": torch.zeros(4)}, "param_groups": [{"lr": 0.1}]}
                    payload["train_state"] = {"step": 7}
                dcp.save(payload, checkpoint_id=path)
            else:
                dcp.save(sharded, storage_writer=HuggingFaceStorageWriter(path=path, save_distributed=True))
    finally:
        dist.destroy_process_group()


def write_trainer_checkpoints(outs: dict[str, tuple[str, dict[str, torch.Tensor], Path]], world: int = 3,
                              extra_state: bool = True) -> dict[str, Path]:
    """Save each of `outs` ({name: (kind, state dict, path)}) from `world` gloo processes, started once:
    kind "dcp" -> a torch DCP checkpoint with the model under a `model` group (and optimizer and train_state
    groups beside it when `extra_state`), "sharded" -> HuggingFaceStorageWriter(save_distributed=True) files.
    Returns {name: path}."""
    paths = {name: path for name, (_, _, path) in outs.items()}
    first = next(iter(paths.values()))
    first.parent.mkdir(parents=True, exist_ok=True)
    state_path = first.parent / f".{first.name}.state.pt"
    torch.save({name: {k: v.contiguous() for k, v in state.items()} for name, (_, state, _) in outs.items()},
               state_path)
    # forkserver: torch is imported once for all the children, not once per child (spawn) or unsafely (fork)
    mp.set_forkserver_preload(["torch", "torch.distributed.checkpoint"])
    try:
        mp.start_processes(_worker, args=(world, free_port(), str(state_path),
                                          {name: (kind, str(path)) for name, (kind, _, path) in outs.items()},
                                          extra_state), nprocs=world, start_method="forkserver")
    finally:
        state_path.unlink()
    return paths
