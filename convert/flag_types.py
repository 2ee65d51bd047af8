"""argparse types of the command-line flags: each refuses a bad value with a message that names the value
and what was expected (argparse prefixes the flag), never a function name."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sharding.file_layout import parse_size


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (for --ep, --workers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def size_arg(text: str) -> int:
    """argparse type: a byte size such as 5GB, 500MB, 2GiB or 1073741824 (for --max-shard-size)."""
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 5GB, 500MB, 2GiB, 1073741824)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of at least 1 byte")
    return value


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object (for --storage-options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {type(value).__name__}")
    return value
