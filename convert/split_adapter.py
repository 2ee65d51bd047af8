"""`python -m convert.split_adapter`: expert LoRA in any layout -> what a server (vLLM by default) loads.

    python -m convert.split_adapter --nproc 8 --src ADAPTER_DIR --dst OUT_DIR [--target vllm|sglang|peft|per-expert]
        [--ep N] [--base-config CONFIG_JSON] [--dtype keep|bf16|fp32] [--dry-run]

Inputs (auto-detected per layer): peft target_parameters (rank folded with the experts),
3-D partially shared w1/w2/w3, NeMo grouped, or already per-expert. Output: the target's layout
for the base model's family (configs/targets/*.json): per-expert
`...experts.{e}.<proj>.lora_A|lora_B.weight`, or the peft target_parameters layout where the
target loads that (gpt-oss on vLLM); every key under the target's names (the family's renames),
zero pairs for projections the target needs, adapter_config.json rewritten for the target.
"""

from __future__ import annotations

import argparse
from typing import Any

from convert.cli import adapter_options, adapter_parser, inputs
from convert.engine.adapter_job import ADAPTER_CONFIG, SPLIT, run_adapter_job
from convert.toplevel import run_main
from convert.verify.hook import with_verify
from launch.dist import Dist

MARKER = ADAPTER_CONFIG  # the file whose presence marks a finished destination


def build_parser() -> argparse.ArgumentParser:
    """The command line: the adapter conversion flags."""
    return adapter_parser("convert.split_adapter", __doc__.splitlines()[0], "vllm")


def run(args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run the split (and --verify) described by parsed flags `args` on this rank; returns the exit code.

    `report`, if given, receives on rank 0 the bytes written, any error and the verifier's outcome.
    """
    opts = adapter_options(args, SPLIT)
    return with_verify(args, lambda d: run_adapter_job(opts, d, report), MARKER, report)(dist)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the split on every rank."""
    args = build_parser().parse_args(argv)
    run_main(lambda dist: run(args, dist), args.nproc, preload_torch=True, inputs=inputs(args))


if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
