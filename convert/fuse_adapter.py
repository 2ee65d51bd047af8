"""`python -m convert.fuse_adapter`: per-expert expert LoRA -> a fused adapter layout.

    python -m convert.fuse_adapter --nproc 8 --src ADAPTER_DIR --dst OUT_DIR --layout peft|grouped
        [--ep N] [--base-config CONFIG_JSON] [--dtype keep|bf16|fp32] [--dry-run]

`peft`: target_parameters on the fused 3-D expert parameters (what PeftModel.from_pretrained
loads on a transformers >= 5 model); `grouped`: NeMo GroupedExpertsLoRA tensors;
`shared_w123`: the 3-D partially shared layout, only where its shared factors are identical
across experts (else refused).
"""

from __future__ import annotations

from convert.adapter_job import ADAPTER_CONFIG, adapter_options, adapter_parser, run_adapter_job
from convert.adapter_plan import FUSED_LAYOUTS
from convert.cli import run_main, with_verify


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the fuse on every rank."""
    p = adapter_parser("convert.fuse_adapter", __doc__.splitlines()[0])
    p.add_argument("--layout", required=True, choices=FUSED_LAYOUTS, help="target adapter layout")
    args = p.parse_args(argv)
    opts = adapter_options(args, args.layout)
    run_main(with_verify(args, lambda dist: run_adapter_job(opts, dist), ADAPTER_CONFIG), args.nproc)


if __name__ == "__main__":
    main()
