"""Peer inputs and checks for bench.merge: tinker-cookbook's shard merge.

tinker-cookbook 0.6.1's `build_hf_model` (tinker_cookbook.weights._export, merge_strategy "shard": one input
shard in RAM at a time, one process, local paths) reads Tinker's own adapter layout, not peft's
target_parameters one: adapter_model.safetensors + adapter_config.json (it reads only `r` and `lora_alpha`,
scaling = lora_alpha / r) with keys

    base_model.model.model.layers.{l}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight   A [r, in], B [out, r]
    base_model.model.model.layers.{l}.mlp.experts.{w1,w3,w2}.lora_{A,B}.weight     A [E, r, in], B [E, out, r]

(w1 gate_proj, w3 up_proj, w2 down_proj; on a per-expert base each expert e gets W += scaling * B[e] @ A[e]).
`write_tinker_adapter` re-lays bench.merge's peft adapter in that layout with the same rank and values: peft's
gate_up_proj wrapper has one A per expert shared by gate and up, so w1 and w3 both get it and split its B rows
(gate = the first half, up = the second); the deltas are the ones peft and the tool apply.

    python -m bench.merge_peers --check     # tool vs tinker-cookbook vs a float32 reference, on a small base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def write_tinker_adapter(peft_dir: Path, dst: Path) -> None:
    """`peft_dir` (bench.merge.write_peft_adapter's layout) re-laid in Tinker's layout, float32 as written."""
    from safetensors.numpy import load_file, save_file

    src = load_file(str(peft_dir / "adapter_model.safetensors"))
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    r = int(cfg["r"])
    out: dict[str, np.ndarray] = {k: v for k, v in src.items() if ".mlp.experts." not in k}
    for x in sorted({k.split(".mlp.experts.")[0] + ".mlp.experts" for k in src if ".mlp.experts." in k}):
        # peft nests the wrappers in target_parameters order: gate_up_proj is the inner one (base_layer)
        for wrapper, roles in ((f"{x}.base_layer", ("w1", "w3")), (x, ("w2",))):
            a, b = src[f"{wrapper}.lora_A.weight"], src[f"{wrapper}.lora_B.weight"]  # [E*r, in], [out, r*E]
            E = a.shape[0] // r
            a3 = a.reshape(E, r, a.shape[1])  # expert-major rows: A_e = rows e*r .. e*r+r
            b3 = b.reshape(b.shape[0], r, E).transpose(2, 0, 1)  # expert-minor columns: B_e = columns e::E
            n = b.shape[0] // len(roles)
            for j, role in enumerate(roles):
                out[f"{x}.{role}.lora_A.weight"] = np.ascontiguousarray(a3)
                out[f"{x}.{role}.lora_B.weight"] = np.ascontiguousarray(b3[:, j * n:(j + 1) * n, :])
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": cfg["lora_alpha"],
                                                         "base_model": cfg.get("base_model_name_or_path")}))


def tinker_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the caller's PYTHONPATH kept after the repo (where tinker-cookbook may be installed)."""
    extra = os.environ.get("PYTHONPATH", "")
    return dict(env, PYTHONPATH=os.pathsep.join(p for p in [str(REPO), extra] if p))


def _load(d: Path) -> dict:
    from safetensors.torch import load_file

    t: dict = {}
    for f in sorted(d.glob("*.safetensors")):
        t.update(load_file(str(f)))
    return t


def check(workdir: str | None = None, layers: int = 2, experts: int = 4, vocab: int = 1024) -> bool:
    """Merge one small base with the tool and with tinker-cookbook (through bench.merge.TINKER); compare every
    tensor with each other, and the adapted ones with W + scaling * B @ A in float32 rounded once to bf16."""
    import torch

    from bench.merge import RANK, TINKER, write_peft_adapter
    from bench.synthetic import checkpoint_specs, write_synthetic

    work = Path(tempfile.mkdtemp(prefix="merge-peers-", dir=workdir))
    try:
        base, peft_ad, tk_ad = work / "base", work / "adapter", work / "tinker-adapter"
        specs, cfg = checkpoint_specs("qwen3-30b-a3b", layers, "BF16", experts=experts, vocab=vocab)
        write_synthetic(str(base), specs, cfg, 40_000_000, data="normal")  # several shards
        H, I = 2048, 768
        attn = {"q_proj": (4096, H), "k_proj": (512, H), "v_proj": (512, H), "o_proj": (H, 4096)}
        write_peft_adapter(peft_ad, layers, experts, H, I, attn)
        write_tinker_adapter(peft_ad, tk_ad)
        env = tinker_env(dict(os.environ, OMP_NUM_THREADS="1"))
        for cmd in ([sys.executable, "-m", "convert.merge_adapter", "--base", str(base), "--adapter", str(peft_ad),
                     "--dst", str(work / "tool"), "--nproc", "1", "--no-progress"],
                    [sys.executable, "-c", TINKER, str(base), str(tk_ad), str(work / "tinker")]):
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            print(f"rc {p.returncode}: {'tool' if cmd[1] == '-m' else 'tinker-cookbook'}: {p.stdout.strip().splitlines()[-1:] or p.stderr[-2000:]}")
            if p.returncode:
                print(p.stderr[-4000:])
                return False
        w, tool, tk = _load(base), _load(work / "tool"), _load(work / "tinker")
        ok = set(w) == set(tool) == set(tk)
        print(f"tensors: base {len(w)}, tool {len(tool)}, tinker {len(tk)}, same names: {ok}")
        from safetensors.numpy import load_file

        ad = load_file(str(peft_ad / "adapter_model.safetensors"))
        scaling = 32 / RANK

        def reference(key: str) -> torch.Tensor | None:
            """W + scaling * B_e @ A_e in float32, rounded once; None for a tensor the adapter does not touch."""
            parts = key.split(".")
            if not key.startswith("model.layers."):
                return None
            p = f"base_model.model.model.layers.{parts[2]}"
            if ".self_attn." in key and parts[4] in attn:
                a, b = ad[f"{p}.self_attn.{parts[4]}.lora_A.weight"], ad[f"{p}.self_attn.{parts[4]}.lora_B.weight"]
            elif ".mlp.experts." in key:
                e, proj = int(parts[5]), parts[6]
                wrap = f"{p}.mlp.experts.base_layer" if proj in ("gate_proj", "up_proj") else f"{p}.mlp.experts"
                A, B = ad[f"{wrap}.lora_A.weight"], ad[f"{wrap}.lora_B.weight"]
                a = A[e * RANK:(e + 1) * RANK]
                b = B.reshape(B.shape[0], RANK, experts)[:, :, e]
                if proj == "gate_proj":
                    b = b[:I]
                elif proj == "up_proj":
                    b = b[I:]
            else:
                return None
            delta = torch.from_numpy(np.ascontiguousarray(b)) @ torch.from_numpy(np.ascontiguousarray(a))
            return (w[key].float() + scaling * delta).to(torch.bfloat16)

        worst = {"tool": 0, "tinker": 0}
        adapted = same = differ = 0
        moved = 1.0
        for key in sorted(w):
            ref = reference(key)
            if ref is None:
                for name, t in (("tool", tool), ("tinker", tk)):
                    if not torch.equal(t[key], w[key]):
                        print(f"{name}: {key} changed but the adapter does not touch it")
                        ok = False
                continue
            adapted += 1
            moved = min(moved, (ref != w[key]).float().mean().item())  # the deltas show in bf16
            for name, t in (("tool", tool), ("tinker", tk)):
                if t[key].dtype != torch.bfloat16 or t[key].shape != w[key].shape:
                    print(f"{name}: {key} {t[key].dtype} {tuple(t[key].shape)}")
                    ok = False
                    continue
                # bf16 values differ by whole units in the last place: count them on the int16 patterns
                ulps = (t[key].view(torch.int16).int() - ref.view(torch.int16).int()).abs().max().item()
                worst[name] = max(worst[name], ulps)
            if torch.equal(tool[key], tk[key]):
                same += 1
            else:
                differ += 1
        print(f"adapted tensors {adapted}: tool == tinker bit for bit in {same}, differ in {differ}; "
              f"max |difference| from the float32 reference in bf16 ulps: {worst}; least share of an adapted "
              f"tensor's values the merge changes: {moved:.2f}")
        ok = ok and adapted > 0 and max(worst.values()) <= 1 and moved > 0.5
        print("check:", "ok" if ok else "FAILED")
        return ok
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.merge_peers", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="merge a small base with the tool and tinker-cookbook")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if args.check:
        sys.exit(0 if check(args.workdir) else 1)
    p.print_help()


if __name__ == "__main__":
    main()
