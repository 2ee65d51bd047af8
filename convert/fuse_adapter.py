"""`python -m convert.fuse_adapter`: per-expert expert LoRA -> a fused adapter layout.

    python -m convert.fuse_adapter --nproc 8 --src ADAPTER_DIR --dst OUT_DIR --layout peft|grouped|shared_w123
        [--target peft|vllm|sglang|per-expert] [--ep N] [--base-config CONFIG_JSON] [--dtype keep|bf16|fp32] [--dry-run]

`peft`: target_parameters on the fused 3-D expert parameters (what PeftModel.from_pretrained
loads on a transformers >= 5 model); `grouped`: NeMo GroupedExpertsLoRA tensors;
`shared_w123`: the 3-D partially shared layout, only where its shared factors are identical
across experts (else refused). `--target` (default peft) names the keys and writes adapter_config.json
for that consumer; `--layout peft --target vllm` is accepted where vLLM loads the family's adapters in
the peft layout (gpt-oss), and refused, pointing to split_adapter, where it loads them per expert.
"""

from __future__ import annotations

import argparse
from typing import Any

from convert.cli import adapter_options, adapter_parser, inputs
from convert.engine.adapter_job import ADAPTER_CONFIG, run_adapter_job
from convert.plan.adapter import FUSED_LAYOUTS
from convert.toplevel import run_main
from convert.verify.hook import with_verify
from launch.dist import Dist

MARKER = ADAPTER_CONFIG  # the file whose presence marks a finished destination


def build_parser() -> argparse.ArgumentParser:
    """The command line: the adapter conversion flags plus --layout (required)."""
    p = adapter_parser("convert.fuse_adapter", __doc__.splitlines()[0], "peft")
    p.add_argument("--layout", required=True, choices=FUSED_LAYOUTS, help="target adapter layout")
    return p


def run(args: argparse.Namespace, dist: Dist, report: dict[str, Any] | None = None) -> int:
    """Run the fuse (and --verify) described by parsed flags `args` on this rank; returns the exit code.

    `report`, if given, receives on rank 0 the bytes written, any error and the verifier's outcome.
    """
    opts = adapter_options(args, args.layout)
    return with_verify(args, lambda d: run_adapter_job(opts, d, report), MARKER, report)(dist)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the fuse on every rank."""
    args = build_parser().parse_args(argv)
    run_main(lambda dist: run(args, dist), args.nproc, preload_torch=True, inputs=inputs(args))


if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
