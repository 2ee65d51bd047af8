"""Shared test helpers: run the entry points as real processes, read safetensors outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent


def run_tool(module: str, *args: str, nproc: int | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` (or under `torchrun --standalone --nproc nproc`); returns the process."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module]
    else:
        cmd = [sys.executable, "-m", module]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([*cmd, *args, "--no-progress"] if module.startswith("convert.") and module not in ("convert.example", "convert.inspect") else [*cmd, *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + list(args))} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def load_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, checking the index names each exactly once."""
    path = Path(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    seen_files = set()
    for f in sorted(set(index["weight_map"].values())):
        assert (path / f).is_file(), f"index names missing shard {f}"
        seen_files.add(f)
        with safe_open(path / f, "pt") as g:
            for k in g.keys():
                assert k not in out, f"tensor {k} in two shards"
                assert index["weight_map"][k] == f, f"{k} indexed to {index['weight_map'][k]}, found in {f}"
                out[k] = g.get_tensor(k)
    assert set(out) == set(index["weight_map"]), "index and shards disagree on the tensor set"
    on_disk = {p.name for p in path.glob("*.safetensors")}
    assert on_disk == seen_files, f"shards not in the index: {on_disk - seen_files}"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (for bit-for-bit comparisons)."""
    import torch

    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
