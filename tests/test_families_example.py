"""`convert.example --family F` for every family it offers writes a checkpoint that `fuse_experts` fuses (issue 26).

In-process (world size 1), tiny shapes: the example of each family, detected as that family, fused with
`--verify`; then split back (`--verify`), which returns the example's own tensors byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert import example, fuse_experts, split_experts
from convert.families import detect_family
from helpers import load_dir, raw_bytes


def offered_families() -> list[str]:
    """The choices of `convert.example --family`, read from its own parser."""
    action = next(a for a in example.build_parser()._actions if "--family" in a.option_strings)
    return list(action.choices)


def call(main, *argv: str) -> int:
    """Run an entry point's main() in this process; returns its exit code."""
    try:
        main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_every_family_is_offered():
    from convert.families import load_families

    assert offered_families() == sorted(load_families())


@pytest.mark.parametrize("family", offered_families())
def test_the_example_of_every_offered_family_fuses(tmp_path: Path, family: str):
    src, fused, split = tmp_path / "src", tmp_path / "fused", tmp_path / "split"
    # 32: the MXFP4 family packs 32 values per scale (the smallest shapes every family takes)
    assert call(example.main, str(src), "--family", family, "--layers", "2", "--experts", "3", "--hidden", "32",
                "--intermediate", "32", "--max-shard-size", "20KB") == 0
    config = json.loads((src / "config.json").read_text())
    assert detect_family(config, str(src / "config.json")).name == family
    assert call(fuse_experts.main, "--src", str(src), "--dst", str(fused), "--verify", "--no-progress") == 0
    assert (fused / "model.safetensors.index.json").is_file()
    # split back: the flag is for the families whose per-expert layout no consumer reads (gpt-oss)
    assert call(split_experts.main, "--src", str(fused), "--dst", str(split), "--verify", "--allow-unread-layout",
                "--no-progress") == 0
    before, after = load_dir(src), load_dir(split)
    assert set(before) == set(after)
    assert all(raw_bytes(before[k]) == raw_bytes(after[k]) for k in before)


def test_mxfp4_example_needs_multiples_of_32(tmp_path: Path, capsys):
    assert call(example.main, str(tmp_path / "x"), "--family", "gpt_oss_mxfp4", "--hidden", "48") == 2
    assert "must be multiples of 32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
