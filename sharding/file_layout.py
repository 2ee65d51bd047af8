"""Arithmetic of output shards that needs no file format: tensor order and size strings."""

from __future__ import annotations

import re


def natural_key(name: str) -> list[object]:
    """Sort key that orders `layers.10` after `layers.9`."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units like transformers, binary with 'i')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r} (expected e.g. 5GB, 500MB, 2GiB)")
    number, unit, binary = float(m[1]), m[2].upper(), m[3]
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * ((1024 if binary else 1000) ** power))
