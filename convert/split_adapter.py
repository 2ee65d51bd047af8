"""`python -m convert.split_adapter`: expert LoRA in any layout -> per-expert LoRA that vLLM loads.

    python -m convert.split_adapter --nproc 8 --src ADAPTER_DIR --dst OUT_DIR [--ep N]
        [--base-config CONFIG_JSON] [--dtype keep|bf16|fp32] [--dry-run]

Inputs (auto-detected per layer): peft target_parameters (rank folded with the experts),
3-D partially shared w1/w2/w3, NeMo grouped, or already per-expert (validated, passed
through). Output: `...experts.{e}.<proj>.lora_A|lora_B.weight` with the family's per-expert
names, attention/router/modules_to_save tensors unchanged, adapter_config.json rewritten.
"""

from __future__ import annotations

from convert.adapter_job import ADAPTER_CONFIG, SPLIT, adapter_options, adapter_parser, run_adapter_job
from convert.cli import run_main, with_verify


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the split on every rank."""
    args = adapter_parser("convert.split_adapter", __doc__.splitlines()[0]).parse_args(argv)
    opts = adapter_options(args, SPLIT)
    run_main(with_verify(args, lambda dist: run_adapter_job(opts, dist), ADAPTER_CONFIG), args.nproc)


if __name__ == "__main__":
    main()
