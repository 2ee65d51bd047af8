"""Model families as data: each `configs/<family>.json` names a family's expert tensors.

A family file gives the per-expert key template of every role (gate, up, down, and
optionally biases) and, for each fused layout, the fused tensors: which roles each
holds and how one expert's slice is built from them (`op`: concat or interleave,
`transpose`: whether each 2-D part is transposed first), and `architectures`: the
transformers model classes of its model types (what peft's `auto_mapping.base_model_class`
names). The engine never names a model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ConversionError

PER_EXPERT = "per_expert"
CONFIGS_DIR = Path(os.environ.get("MOE_CONVERT_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))


@dataclass(frozen=True)
class FusedTensor:
    """One fused [E, ...] tensor of a layout: its key template and the roles it holds."""

    template: str
    parts: tuple[str, ...]
    op: str = "concat"  # "concat" along dim 0 of the (transposed) parts, or "interleave" on the last dim
    transpose: bool = False

    @property
    def is_byte_copy(self) -> bool:
        """True when one expert's slice is the plain concatenation of its parts' bytes."""
        return self.op == "concat" and not self.transpose


@dataclass(frozen=True)
class Family:
    """Key names and layouts of one model family."""

    name: str
    model_types: tuple[str, ...]
    num_experts_keys: tuple[str, ...]
    per_expert: dict[str, str]
    fused: dict[str, tuple[FusedTensor, ...]]
    default_fused: str
    refuse: dict[str, str] = field(default_factory=dict)
    architectures: tuple[str, ...] = ()  # transformers model classes of the family (peft's auto_mapping names one)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.per_expert)

    @property
    def layouts(self) -> tuple[str, ...]:
        return (PER_EXPERT, *self.fused)

    def num_experts(self, config: dict[str, Any], where: str) -> int:
        """The expert count of `config` (config.json contents); `where` names the file for errors."""
        cfg = config.get("text_config", config) if not any(k in config for k in self.num_experts_keys) else config
        for key in self.num_experts_keys:
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
        raise ConversionError(
            f"{where}: has none of {list(self.num_experts_keys)} (the number of experts of a {self.name} model)"
        )


def template_regex(template: str) -> re.Pattern[str]:
    """Compile a key template with `{prefix}` and optional `{e}` into an anchored regex."""
    pattern = re.escape(template).replace(r"\{prefix\}", r"(?P<prefix>.+?)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{pattern}$")


def _parse(obj: dict[str, Any], source: str) -> Family:
    try:
        fused = {
            layout: tuple(
                FusedTensor(t["name"], tuple(t["parts"]), t.get("op", "concat"), bool(t.get("transpose", False)))
                for t in tensors
            )
            for layout, tensors in obj["fused"].items()
        }
        family = Family(
            name=obj["family"],
            model_types=tuple(obj["model_types"]),
            num_experts_keys=tuple(obj["num_experts_keys"]),
            per_expert=dict(obj["per_expert"]),
            fused=fused,
            default_fused=obj["default_fused"],
            refuse=dict(obj.get("refuse", {})),
            architectures=tuple(obj.get("architectures", ())),
        )
    except (KeyError, TypeError) as exc:
        raise ConversionError(f"{source}: malformed family file ({exc!r})") from exc
    for layout, tensors in family.fused.items():
        for t in tensors:
            if t.op not in ("concat", "interleave") or any(p not in family.per_expert for p in t.parts):
                raise ConversionError(f"{source}: layout {layout!r} tensor {t.template!r} has a bad op or role")
    if family.default_fused not in family.fused:
        raise ConversionError(f"{source}: default_fused {family.default_fused!r} is not one of its layouts")
    return family


def load_families(directory: Path = CONFIGS_DIR) -> dict[str, Family]:
    """Every family file in `directory`, by family name."""
    families = {}
    for path in sorted(directory.glob("*.json")):
        fam = _parse(json.loads(path.read_text()), str(path))
        families[fam.name] = fam
    return families


def detect_family(config: dict[str, Any], where: str, override: str | None = None) -> Family:
    """The family of a model from its config.json (`model_type`), or the one named by `override`."""
    families = load_families()
    if override:
        if override not in families:
            raise ConversionError(f"unknown family {override!r}; known: {sorted(families)}")
        return families[override]
    model_type = config.get("model_type")
    for fam in families.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in families.values() for t in f.model_types)
    raise ConversionError(
        f"{where}: model_type {model_type!r} is not a known MoE family (known: {known}); "
        "add a family file to configs/ or pass --family"
    )
