"""Which packing a peft expert wrapper holds, from adapter_config.json (the shapes alone do not always say).

- orientation: shapes decide where they can (detection tries both, convert.formats.adapter_layouts
  .peft_target_parameters); `peft_version` in adapter_config.json (peft writes it on every save) decides where they
  cannot (`version_orientation`).
- lora_B column order: only adapter_config.json can tell: Unsloth's marker `lora_B_layout` ("rank_major" or
  "grouped_by_expert"; top level, in `auto_mapping`, or per parameter under `unsloth_fused_expert_lora.parameters`,
  unsloth_zoo/temporary_patches/moe_utils.py), or the peft that saved the file (`peft_version`) (`b_order`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from convert.formats.lora_producers import expert_major, peft_current, peft_legacy, rank_major

IN_OUT, OUT_IN = peft_current.NAME, peft_legacy.NAME
RANK_MAJOR, EXPERT_MAJOR = rank_major.NAME, expert_major.NAME
# Unsloth's marker (unsloth_zoo moe_utils.py: FUSED_EXPERT_LORA_LAYOUT_KEY / _DETAIL_KEY and its two values)
MARKER_KEY = "lora_B_layout"
MARKER_DETAIL_KEY = "unsloth_fused_expert_lora"
MARKER_VALUES = {"rank_major": RANK_MAJOR, "grouped_by_expert": EXPERT_MAJOR}
FLIP_VERSION = (0, 19, 1)  # huggingface/peft#3165: the first release with today's orientation


def peft_version(config: dict[str, Any]) -> tuple[int, int, int] | None:
    """The peft release that saved the adapter (`peft_version`, e.g. "0.19.0" or "0.21.2@<sha>"), None when absent."""
    v = config.get("peft_version")
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(v)) if v else None
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def version_orientation(config: dict[str, Any]) -> str | None:
    """The orientation the saving peft writes (from `peft_version`), None when the file does not say."""
    v = peft_version(config)
    if v is None:
        return None
    return IN_OUT if v >= FLIP_VERSION else OUT_IN


def _auto_mapping(config: dict[str, Any]) -> dict[str, Any]:
    """adapter_config.json's `auto_mapping` object ({} where it has none)."""
    auto = config.get("auto_mapping")
    return auto if isinstance(auto, dict) else {}


def _marker_value(value: Any) -> str | None:
    return MARKER_VALUES.get(value) if isinstance(value, str) else None


def declared_b_order(config: dict[str, Any], param: str) -> str | None:
    """The lora_B column order adapter_config.json declares for fused parameter `param` (e.g. "gate_up_proj").

    Unsloth's per-parameter detail wins over its flat marker; either at the top level or in
    `auto_mapping` (where older Unsloth releases put it). None when nothing is declared.
    """
    auto = _auto_mapping(config)
    for source in (config, auto):
        detail = source.get(MARKER_DETAIL_KEY)
        if isinstance(detail, dict) and isinstance(detail.get("parameters"), dict):
            entry = detail["parameters"].get(param)
            if isinstance(entry, dict) and _marker_value(entry.get(MARKER_KEY)):
                return _marker_value(entry.get(MARKER_KEY))
        if _marker_value(source.get(MARKER_KEY)):
            return _marker_value(source.get(MARKER_KEY))
    return None


def unsloth_unmarked(config: dict[str, Any]) -> bool:
    """Whether the adapter was saved by Unsloth (its `auto_mapping.unsloth_fixed`) without a lora_B marker.

    unsloth_zoo's `saved_lora_b_layouts` reads such a save as grouped_by_expert only when the loading process
    runs the separated forward: the file alone does not say which order it holds.
    """
    auto = _auto_mapping(config)
    if not auto.get("unsloth_fixed"):
        return False
    return all(declared_b_order(config, p) is None for p in _detail_params(config) or [""])


def _detail_params(config: dict[str, Any]) -> list[str]:
    detail = config.get(MARKER_DETAIL_KEY)
    return list(detail.get("parameters") or {}) if isinstance(detail, dict) else []


@dataclass(frozen=True)
class BOrder:
    """The lora_B column order of one wrapper and the evidence for it (`why`); `order` None: undecidable."""

    order: str | None
    why: str


def b_order(config: dict[str, Any], param: str, orientation: str) -> BOrder:
    """lora_B's column order for the wrapper of fused parameter `param` read in `orientation`.

    - a marker (`lora_B_layout`) decides;
    - an Unsloth save without a marker: undecidable (Unsloth's own reader asks the process, not the file);
    - today's orientation without a marker: peft's rank-major (what every peft writes and every server reads);
    - pre-0.19.1 shapes: rank-major only when the file says peft saved it (`peft_version`); without it the file
      comes from another exporter, and the two that write these shapes disagree (NeMo AutoModel rank-major,
      Megatron-Bridge expert-major): undecidable.
    """
    declared = declared_b_order(config, param)
    if declared:
        return BOrder(declared, f"adapter_config.json {MARKER_KEY} = {'grouped_by_expert' if declared == EXPERT_MAJOR else declared}")
    if unsloth_unmarked(config):
        return BOrder(None, "saved by Unsloth (auto_mapping.unsloth_fixed) without its lora_B_layout marker: Unsloth "
                            "releases before 2026.9.6 wrote lora_B expert-major (grouped_by_expert), later ones and "
                            "UNSLOTH_MOE_LORA_MERGED=1 runs rank-major")
    if orientation == IN_OUT:
        return BOrder(RANK_MAJOR, "peft's rank-major lora_B (no marker)")
    if peft_version(config) is not None:
        return BOrder(RANK_MAJOR, f"saved by peft {config.get('peft_version')} (rank-major lora_B)")
    return BOrder(None, "pre-0.19.1 shapes without peft_version: not saved by peft; Megatron-Bridge's packed export "
                        "writes lora_B expert-major, NeMo AutoModel's legacy_paramwrapper_layout rank-major")


def stamp_current(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """adapter_config.json for peft wrappers written in peft 0.21's packing (today's shapes, rank-major lora_B): every
    `lora_B_layout` marker the source carried (top level, `auto_mapping`, per parameter) says "rank_major", a
    `peft_version` older than 0.19.1 is dropped, so the file no longer names another packing. Returns the new config
    (the input is not changed) and a note per change."""
    out = dict(config)
    notes: list[str] = []
    marked = unsloth_unmarked(config) or any(_marker_value(src.get(MARKER_KEY)) for src in _sources(config))
    for key, holder in (("", out), ("auto_mapping", dict(out.get("auto_mapping") or {}))):
        changed = False
        if _marker_value(holder.get(MARKER_KEY)) not in (None, RANK_MAJOR):
            holder[MARKER_KEY], changed = "rank_major", True
        detail = holder.get(MARKER_DETAIL_KEY)
        if isinstance(detail, dict) and isinstance(detail.get("parameters"), dict):
            params = {}
            for name, entry in detail["parameters"].items():
                if isinstance(entry, dict) and _marker_value(entry.get(MARKER_KEY)) not in (None, RANK_MAJOR):
                    entry, changed = {**entry, MARKER_KEY: "rank_major"}, True
                params[name] = entry
            holder[MARKER_DETAIL_KEY] = {**detail, "parameters": params}
        if key and changed:
            out[key] = holder
        if changed:
            notes.append(f"adapter_config.json: {(key + '.') if key else ''}{MARKER_KEY} set to \"rank_major\" (the "
                         "output's lora_B is peft's rank-major)")
    if marked and not any(_marker_value(src.get(MARKER_KEY)) for src in _sources(out)):
        out[MARKER_KEY] = "rank_major"
        notes.append(f"adapter_config.json: {MARKER_KEY} = \"rank_major\" added (an Unsloth save: its reader asks "
                     "for the marker)")
    v = peft_version(config)
    if v is not None and v < FLIP_VERSION:
        del out["peft_version"]
        notes.append(f"adapter_config.json: peft_version {config.get('peft_version')} dropped (the output has peft "
                     ">= 0.19.1 shapes)")
    return out, notes


def _sources(config: dict[str, Any]) -> list[dict[str, Any]]:
    auto = _auto_mapping(config)
    return [config, auto]


def marker_fix(where: str) -> str:
    """The edit that settles an undecidable lora_B order: Unsloth's own marker, which this tool reads."""
    return (f"add \"{MARKER_KEY}\": \"grouped_by_expert\" (expert-major: Megatron-Bridge packed export, Unsloth "
            f"before 2026.9.6) or \"rank_major\" (peft, NeMo AutoModel) to {where}")


def describe(orientation: str, order: str) -> str:
    """Producer-level name of a wrapper's packing, e.g. "peft < 0.19.1 shapes, expert-major lora_B"."""
    shapes = (peft_current if orientation == IN_OUT else peft_legacy).WORDS
    return f"{shapes}, {(rank_major if order == RANK_MAJOR else expert_major).WORDS}"
