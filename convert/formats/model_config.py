"""config.json of a converted checkpoint: the dtype keys follow a `--dtype` cast.

transformers reads the weights' dtype from `torch_dtype` (transformers < 5) or `dtype`
(transformers >= 5, which prefers it when both are present), at the top level and in a
`text_config` sub-config. A cast must leave no key naming the old dtype.
"""

from __future__ import annotations

import json
from typing import Any

DTYPE_KEYS = ("torch_dtype", "dtype")
# safetensors dtype -> the name transformers writes in config.json
CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def with_dtype(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A copy of `config` (config.json contents) whose dtype keys name safetensors dtype `dtype`.

    Sets `torch_dtype` at the top level (added last when absent) and every `dtype`/`torch_dtype`
    key already present at the top level or in `text_config`; all other keys and their order are kept.
    """
    name = CONFIG_DTYPE_NAMES[dtype]
    out = dict(config)
    for key in DTYPE_KEYS:
        if key in out or key == "torch_dtype":
            out[key] = name
    text = out.get("text_config")
    if isinstance(text, dict):
        out["text_config"] = {k: (name if k in DTYPE_KEYS else v) for k, v in text.items()}
    return out


def config_bytes(config: dict[str, Any]) -> bytes:
    """config.json file contents for `config` (2-space indent, key order kept, trailing newline)."""
    return (json.dumps(config, indent=2) + "\n").encode()


def without_dtype(config: Any) -> Any:
    """`config` with its dtype keys (top level and `text_config`) removed, for comparing two configs."""
    if not isinstance(config, dict):
        return config
    out = {k: v for k, v in config.items() if k not in DTYPE_KEYS}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k not in DTYPE_KEYS}
    return out


def read_base_config(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json at `url` (a local path or an fsspec URL) given with --base-config, as a dict.

    Raises ConversionError naming `url` when it cannot be read or is not a JSON object with a model_type.
    """
    import fsspec

    from convert.errors import ConversionError

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read(16 << 20)
        config = json.loads(data)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"--base-config {url}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConversionError(f"--base-config {url}: expected a model's config.json (a JSON object with model_type)")
    return config
