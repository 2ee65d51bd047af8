"""Flag validation on every entry point: bad values refused by argparse with a message naming the flag (no
function names), --ep checked against E, --layout restricted to the family's fused layouts, a --dtype cast
reflected in config.json, and `convert.example DIR` writing a complete fresh example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert import example, fuse_adapter, fuse_experts, split_adapter, split_experts
from convert.engine.job import JobOptions, plan_job
from convert.example import EXAMPLE_MARKER, checkpoint_files, example_tensors, write_checkpoint
from convert.formats.model_config import with_dtype
from convert.verify import run as verify
from helpers import load_dir, raw_bytes, run_tool
from launch.dist import Dist
from model_fixtures import E, build_model, save_model

ENTRY_POINTS = {"fuse_experts": fuse_experts, "split_experts": split_experts, "split_adapter": split_adapter,
                "fuse_adapter": fuse_adapter}


def call(main, *argv: str) -> int:
    """Run an entry point's main() in this process (world size 1); returns its exit code."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code or 0)


def _small_src(path: Path, experts: int = 5) -> Path:
    tensors, cfg = example_tensors("qwen3_moe", 2, experts, 32, 24, seed=3)
    write_checkpoint(tensors, cfg, str(path), 20_000)
    return path


@pytest.mark.parametrize("kind", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    "flag, value, expect",
    [
        ("--ep", "0", "argument --ep: must be at least 1, got 0"),
        ("--ep", "-3", "argument --ep: must be at least 1, got -3"),
        ("--ep", "two", "argument --ep: 'two' is not a whole number"),
        ("--workers", "0", "argument --workers: must be at least 1, got 0"),
        ("--workers", "-1", "argument --workers: must be at least 1, got -1"),
        ("--max-shard-size", "5XB", "argument --max-shard-size: '5XB' is not a size (examples: 5GB, 500MB, 2GiB, 1073741824)"),
        ("--storage-options", "{endpoint", "argument --storage-options: not valid JSON: "),
        ("--storage-options", "[1]", "argument --storage-options: expected a JSON object"),
    ],
)
def test_bad_flag_values_are_refused_by_name(kind, flag, value, expect, tmp_path, capsys):
    src = _small_src(tmp_path / "src")
    extra = ["--layout", "peft"] if kind == "fuse_adapter" else []
    code = call(ENTRY_POINTS[kind].main, "--src", str(src), "--dst", str(tmp_path / "out"), *extra, flag, value)
    err = capsys.readouterr().err
    assert code == 2 and expect in err, err
    assert "parse_size" not in err and "loads" not in err and "invalid" not in err and "positive_int" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool, argv, expect", [
    ("verify", ["--src", "a", "--dst", "b", "--storage-options", "nope"], "argument --storage-options: not valid JSON"),
    ("inspect", ["a", "--storage-options", "nope"], "argument --storage-options: not valid JSON"),
    ("example", ["OUT", "--max-shard-size", "2XB"], "argument --max-shard-size: '2XB' is not a size"),
    ("example", ["OUT", "--experts", "0"], "argument --experts: must be at least 1, got 0"),
])
def test_other_commands_refuse_bad_values_by_name(tool, argv, expect, tmp_path, capsys):
    import convert.inspect.report

    main = {"verify": verify.main, "inspect": convert.inspect.report.main, "example": example.main}[tool]
    assert call(main, *[str(tmp_path / "out") if a == "OUT" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert expect in err and "loads" not in err and "parse_size" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, layout", [("fuse_experts", "per_expert"), ("fuse_experts", "fused"),
                                          ("fuse_adapter", "per_expert"), ("fuse_adapter", "transformers")])
def test_layout_is_a_choice_of_fused_layouts(kind, layout, tmp_path, capsys):
    src = _small_src(tmp_path / "src")
    code = call(ENTRY_POINTS[kind].main, "--src", str(src), "--dst", str(tmp_path / "out"), "--layout", layout)
    err = capsys.readouterr().err
    assert code == 2 and f"argument --layout: invalid choice: '{layout}'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, layout, names", [("qwen3_moe", "native", "transformers, stacked"),
                                                   ("gpt_oss", "stacked", "native")])
def test_layout_of_another_family_is_refused_after_detection(family, layout, names, tmp_path, capsys):
    tensors, cfg = example_tensors(family, 1, 3, 32, 16, seed=1)
    write_checkpoint(tensors, cfg, str(tmp_path / "src"), 1 << 20)
    code = call(fuse_experts.main, "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out"), "--layout", layout,
                "--no-progress")
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--layout {layout}: the {family} family ({tmp_path / 'src' / 'config.json'}) has no such fused layout; " \
           f"its fused layouts: {names}" in err
    assert not (tmp_path / "out").exists()


def test_explicit_ep_above_the_expert_count_is_refused(tmp_path, capsys):
    src = _small_src(tmp_path / "src", experts=5)
    assert call(fuse_experts.main, "--src", str(src), "--dst", str(tmp_path / "fused"), "--no-progress") == 0
    for module, source in ((fuse_experts, src), (split_experts, tmp_path / "fused")):
        code = call(module.main, "--src", str(source), "--dst", str(tmp_path / "out"), "--ep", "8", "--no-progress")
        err = capsys.readouterr().err
        assert code == 2 and f"--ep 8: {source / 'config.json'} has only E=5 experts; use --ep 5 or less" in err, err
    assert not (tmp_path / "out").exists()


def test_explicit_ep_above_the_expert_count_is_refused_for_adapters(tmp_path, capsys):
    from adapter_fixtures import make_peft_adapter

    _, src = make_peft_adapter("qwen3_moe", tmp_path / "adapter", seed=5)
    code = call(split_adapter.main, "--src", str(src), "--dst", str(tmp_path / "out"), "--ep", str(E + 1),
                "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and f"--ep {E + 1}: the adapter {src} has only E={E} experts" in err, err
    assert not (tmp_path / "out").exists()


def test_world_larger_than_e_uses_e_slices_and_says_so(tmp_path):
    src = _small_src(tmp_path / "src", experts=1)
    setup = plan_job(JobOptions(str(src), str(tmp_path / "x"), None, dry_run=True), Dist(0, 2))
    assert setup.ep == 1
    assert "  ep=1: 2 ranks but only E=1 experts; 1 rank(s) get no expert slice and take only non-expert pieces" \
        in setup.summary
    rank1 = [setup.pieces[i] for i in setup.assignment[1]]
    assert rank1 and all(p.expert is None for p in rank1), "the rank without experts takes non-expert pieces"
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "two"), "--dry-run", "--nproc", "2")
    assert "2 ranks but only E=1 experts" in proc.stdout
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "two"), "--verify", "--nproc", "2")
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "one"))
    two, one = load_dir(tmp_path / "two"), load_dir(tmp_path / "one")
    assert set(two) == set(one) and all(raw_bytes(two[k]) == raw_bytes(one[k]) for k in one)


def test_with_dtype_keeps_keys_and_order():
    cfg = {"a": 1, "dtype": "bfloat16", "text_config": {"x": 2, "dtype": "bfloat16", "torch_dtype": "bfloat16"}, "z": 3}
    out = with_dtype(cfg, "F16")
    assert list(out) == ["a", "dtype", "text_config", "z", "torch_dtype"]
    assert out["dtype"] == out["torch_dtype"] == "float16"
    assert out["text_config"] == {"x": 2, "dtype": "float16", "torch_dtype": "float16"}
    assert cfg["dtype"] == "bfloat16", "the input is not modified"
    assert with_dtype({"torch_dtype": "float32", "b": 1}, "BF16") == {"torch_dtype": "bfloat16", "b": 1}


def test_dtype_cast_rewrites_config_and_loads_as_fp16(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = build_model("qwen3_moe", seed=9).to(torch.bfloat16)
    src = save_model(model, tmp_path / "src")
    before = json.loads((src / "config.json").read_text())
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "f16"), "--dtype", "fp16", "--verify",
             "--nproc", "2")
    after = json.loads((tmp_path / "f16" / "config.json").read_text())
    assert after["torch_dtype"] == "float16" and after.get("dtype", "float16") == "float16"
    assert [k for k in after if k != "torch_dtype"] == list(before), "other keys and their order are kept"
    assert {k: v for k, v in after.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in before.items() if k not in ("dtype", "torch_dtype")}
    assert AutoConfig.from_pretrained(tmp_path / "f16").dtype == torch.float16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "f16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    # without a cast config.json is copied byte for byte
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "keep"))
    assert (tmp_path / "keep" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    # the verifier checks the dtype keys against the tensors
    (tmp_path / "f16" / "config.json").write_text(json.dumps({**after, "torch_dtype": "bfloat16"}, indent=2))
    proc = run_tool("convert.verify", "--src", str(src), "--dst", str(tmp_path / "f16"), check=False)
    assert proc.returncode == 1 and "torch_dtype is 'bfloat16' but the tensors are float16" in proc.stdout, proc.stdout


def test_example_twice_gives_exactly_the_second_example(tmp_path):
    out = tmp_path / "ex"
    run_tool("convert.example", str(out), "--layers", "3", "--experts", "4", "--hidden", "32", "--intermediate", "16",
             "--max-shard-size", "20KB")
    first = {p.name for p in out.iterdir()}
    run_tool("convert.example", str(out), "--layers", "1", "--experts", "3", "--hidden", "32", "--intermediate", "16",
             "--max-shard-size", "1MB", "--seed", "5")
    tensors, _ = example_tensors("qwen3_moe", 1, 3, 32, 16, seed=5)
    expected = set(checkpoint_files(tensors, 1_000_000)) | {EXAMPLE_MARKER}
    assert {p.name for p in out.iterdir()} == expected and len(first) > len(expected)
    got = load_dir(out)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("case", ["user_file", "changed_file", "not_an_example"])
def test_example_refuses_a_directory_it_did_not_write(tmp_path, case, capsys):
    out = tmp_path / "ex"
    if case == "not_an_example":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        example.main([str(out), "--layers", "1", "--experts", "2", "--hidden", "32", "--intermediate", "16"])
        name = "notes.txt" if case == "user_file" else "config.json"
        with open(out / name, "a") as fh:
            fh.write("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    code = call(example.main, str(out), "--layers", "2")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    name = "config.json" if case == "changed_file" else "notes.txt"
    assert f"{out} is not empty and holds '{name}' that convert.example did not write" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
