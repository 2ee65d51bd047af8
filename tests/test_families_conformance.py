"""Conformance over transformers' own table: every MoE model type whose per-expert checkpoints it fuses at load.

For each model type of the installed transformers' `conversion_mapping.py` whose converters merge per-expert
tensors (`MergeModulelist`) and that has a causal-LM class (the list is built from the table, see
tests/tiny_models.py), a tiny random model is saved by `save_pretrained` in several shards (the per-expert
format) and our command-line tools are run on it as a black box:

- `convert.fuse_experts` of the saved checkpoint: its key set is the model's `state_dict()` key set (tied
  weights excluded), every tensor is bit-identical, and `from_pretrained` of it gives the same logits;
- `convert.split_experts` of that output is the `save_pretrained` checkpoint again: key set and bytes.

A few model types run under `torchrun --standalone --nproc-per-node 2`, the rest as `python -m`. Each model
type is one test case; `test_conformance_summary` prints "conformance: N of M model types pass" with one
line per failure and fails unless every model type passes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiny_models
from helpers import raw_bytes, run_tool

CASES = tiny_models.cases()
RUNNABLE = [c.model_type for c in CASES if c.skip is None]
# Representative subset under torchrun with 2 ranks, three different expert containers and tensor names:
# mlp.experts gate/up/down; block_sparse_moe w1/w3/w2 with a router rename; mixer.experts up/down only
# under a backbone. prefix. (Each torchrun start costs seconds: the rest run as python -m.)
TORCHRUN = {"qwen3_moe", "mixtral", "nemotron_h"}
SAVE_SHARD, OUT_SHARD = "64KB", "100KB"

RESULTS: dict[str, str] = {}  # model type -> "pass" or the first problem

# one worker runs the whole module: the summary test reads the cases' results from this process
pytestmark = pytest.mark.xdist_group("conformance")


def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files of `path`; the index, where there is one, must name each exactly."""
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                assert key not in out, f"{path.name}: tensor {key} in both {where[key]} and {shard.name}"
                out[key], where[key] = f.get_tensor(key), shard.name
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = sorted(k for k in set(weight_map) | set(where) if weight_map.get(k) != where.get(k))
        assert not wrong, f"{path.name}: index and shards disagree on {len(wrong)} tensors, e.g. {wrong[0]}"
    return out


def _examples(keys: set[str], n: int = 2) -> str:
    return ", ".join(sorted(keys)[:n]) + (", ..." if len(keys) > n else "")


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> list[str]:
    """Problems (one line each) between a converted checkpoint `got` and the expected tensors `want`."""
    problems = []
    missing, extra = set(want) - set(got), set(got) - set(want)
    if missing:
        problems.append(f"{what}: {len(missing)} expected keys missing ({_examples(missing)})")
    if extra:
        problems.append(f"{what}: {len(extra)} unexpected keys ({_examples(extra)})")
    bad = {}
    for key in sorted(set(got) & set(want)):
        g, w = got[key], want[key]
        if g.dtype != w.dtype or g.shape != w.shape:
            bad[key] = f"{key} is {g.dtype} {list(g.shape)}, expected {w.dtype} {list(w.shape)}"
        elif raw_bytes(g) != raw_bytes(w):
            bad[key] = f"{key} differs in value"
    if bad:
        problems.append(f"{what}: {len(bad)} tensors not bit-identical ({next(iter(bad.values()))})")
    return problems


def _tool(module: str, src: Path, dst: Path, model_type: str) -> str | None:
    """Run a conversion; None on success, else the tool's error line (paths shown relative to the case's folder)."""
    args = ["--src", str(src), "--dst", str(dst), "--max-shard-size", OUT_SHARD]
    proc = run_tool(module, *args, nproc=2 if model_type in TORCHRUN else None, check=False)
    if proc.returncode == 0:
        return None
    lines = [re.sub(r"^\[(rank|default)\d+\]:\s*", "", ln.strip()) for ln in (proc.stderr + proc.stdout).splitlines()]
    lines = [ln.replace(f"{src.parent}/", "") for ln in lines if ln]
    reason = (next((ln for ln in lines if ln.startswith("error:")), None)
              or next((ln for ln in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b", ln)), None)
              or (lines or ["(no output)"])[-1])
    return f"{module.split('.')[-1]} exited {proc.returncode}: {reason[:400]}"


def _logits_problem(fused: Path, expected: torch.Tensor) -> str | None:
    """None when `from_pretrained(fused)` loads cleanly and gives `expected` logits, else what went wrong."""
    from transformers import AutoModelForCausalLM

    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(fused, attn_implementation="eager", output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is the finding
        return f"from_pretrained(fused) raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    unclean = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if unclean:
        return "from_pretrained(fused): " + "; ".join(f"{k} {_examples(set(map(str, v)))}" for k, v in unclean.items())
    # Tensors load as views of the memory-mapped file at offsets that need not be aligned, and the CPU kernels
    # may then accumulate in another order: fresh copies compare the weights.
    for p in loaded.parameters():
        p.data = p.data.clone()
    if not torch.equal(tiny_models.logits(loaded.eval()), expected):
        return "from_pretrained(fused) gives different logits"
    return None


def _check(model_type: str, root: Path) -> list[str]:
    try:
        model = tiny_models.build(model_type)
    except Exception as exc:  # noqa: BLE001 - a table entry whose config cannot be made tiny is listed, not hidden
        RESULTS[model_type] = f"skip: config cannot be made tiny: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        pytest.skip(RESULTS[model_type])
    expected_logits = tiny_models.logits(model)
    tied = tiny_models.tied_keys(model)
    truth = {k: v for k, v in model.state_dict().items() if k not in tied}
    src, fused, split = root / "per_expert", root / "fused", root / "split"
    model.save_pretrained(src, max_shard_size=SAVE_SHARD)
    assert len(list(src.glob("*.safetensors"))) > 1, "save_pretrained wrote one shard: the case needs several"
    original = _read_dir(src)
    assert any(re.search(r"experts\.\d+\.", k) for k in original), \
        f"{model_type}: save_pretrained wrote no per-expert tensors, nothing to fuse"
    del model

    error = _tool("convert.fuse_experts", src, fused, model_type)
    if error:
        return [error]
    try:
        problems = _compare(_read_dir(fused), truth, "fused vs state_dict")
    except AssertionError as exc:
        return [f"fused output unreadable: {exc}"]
    if (problem := _logits_problem(fused, expected_logits)):
        problems.append(problem)
    error = _tool("convert.split_experts", fused, split, model_type)
    if error:
        return [*problems, error]
    try:
        problems += _compare(_read_dir(split), original, "split vs save_pretrained")
    except AssertionError as exc:
        problems.append(f"split output unreadable: {exc}")
    return problems


@pytest.mark.parametrize("model_type", RUNNABLE)
def test_conformance(model_type: str, tmp_path: Path) -> None:
    RESULTS[model_type] = "did not finish"
    try:
        problems = _check(model_type, tmp_path)
    except pytest.skip.Exception:
        raise
    except Exception as exc:
        RESULTS[model_type] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        raise
    RESULTS[model_type] = (problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")) if problems else "pass"
    assert not problems, f"{model_type}:\n  " + "\n  ".join(problems)


def test_harness_detects_wrong_output(tmp_path: Path) -> None:
    """The checks fail on a fused checkpoint with gate and up swapped, and on one with a misnamed tensor."""
    from safetensors.torch import save_file

    model_type = "qwen3_moe" if "qwen3_moe" in RUNNABLE else RUNNABLE[0]
    model = tiny_models.build(model_type)
    expected = tiny_models.logits(model)
    tied = tiny_models.tied_keys(model)
    truth = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in tied}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        model.config.save_pretrained(tmp_path / name)
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        return tmp_path / name

    right = write("right", truth)
    assert _compare(_read_dir(right), truth, "right") == [] and _logits_problem(right, expected) is None
    gate_up = sorted(k for k in truth if k.endswith("experts.gate_up_proj"))
    assert gate_up, f"{model_type}: no fused gate_up_proj in the state dict"
    swapped = {k: (torch.cat(v.chunk(2, dim=1)[::-1], dim=1) if k in gate_up else v) for k, v in truth.items()}
    wrong = write("swapped", swapped)
    assert "not bit-identical" in " ".join(_compare(_read_dir(wrong), truth, "swapped"))
    assert _logits_problem(wrong, expected) == "from_pretrained(fused) gives different logits"
    renamed = {(k.replace("experts.gate_up_proj", "experts.gate_up") if k == gate_up[0] else k): v for k, v in truth.items()}
    wrong = write("renamed", renamed)
    problems = " ".join(_compare(_read_dir(wrong), truth, "renamed"))
    assert "1 expected keys missing" in problems and "1 unexpected keys" in problems, problems
    assert "missing_keys" in (_logits_problem(wrong, expected) or "")


def test_conformance_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Print "conformance: N of M model types pass", the failures and the skipped table entries."""
    ran = [m for m in RUNNABLE if m in RESULTS]
    if len(ran) < len(RUNNABLE):
        pytest.skip(f"only {len(ran)} of {len(RUNNABLE)} model types ran (a filtered run)")
    skipped = {c.model_type: c.skip for c in CASES if c.skip}
    skipped.update({m: RESULTS[m][len("skip: "):] for m in ran if RESULTS[m].startswith("skip: ")})
    tested = [m for m in ran if m not in skipped]
    passed = [m for m in tested if RESULTS[m] == "pass"]
    lines = [f"conformance: {len(passed)} of {len(tested)} model types pass "
             f"({len(CASES)} table entries merge per-expert tensors; {len(skipped)} skipped)"]
    lines += [f"  FAIL {m}: {RESULTS[m]}" for m in tested if RESULTS[m] != "pass"]
    lines += [f"  skip {m}: {why}" for m, why in sorted(skipped.items())]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert len(passed) == len(tested), lines[0]
