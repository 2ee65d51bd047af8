"""Whether any consumer reads the per-expert layout a split would write: the family file's `per_expert_readers`.

A family whose file says `"per_expert_readers": {"readers": [], "note": ...}` (gpt-oss: transformers, vLLM and
SGLang read its experts only fused, and skip per-expert tensors without an error) is not split unless the user
asks for that layout (`split_experts --allow-unread-layout`); the refusal names the source, the family, its
file and the note. Families whose file does not say are split as before. No model is named here: the families
decide.
"""

from __future__ import annotations

import posixpath
from typing import Any

from convert.errors import ConversionError
from convert.families import Family, detect_family, load_families

ALLOW_FLAG = "--allow-unread-layout"  # split_experts' flag (batch manifests: allow_unread_layout: true)


def written_family(family: Family, dtype: str | None) -> Family:
    """The family whose per-expert layout a split of a `family` source with `--dtype` `dtype` (None: keep) writes:
    the family's own, or the target family of its dequantization (`quantization.dequantize`, e.g. MXFP4 gpt-oss
    -> gpt_oss) when `dtype` dequantizes it."""
    if dtype and family.dequantize is not None:
        return load_families().get(family.dequantize[0], family)
    return family


def unread_per_expert(family: Family, dtype: str | None = None) -> Family | None:
    """The family whose per-expert layout a split would write (see written_family) when its file says no consumer
    reads it (`per_expert_readers.readers` is []); None when some consumer does, or the file does not say."""
    written = written_family(family, dtype)
    return written if written.per_expert_readers == () else None


def refusal(source: str, family: Family, written: Family, dtype_flag: str | None = None) -> str:
    """The one-line refusal of a split of `source` (a `family` checkpoint) into `written`'s unread per-expert layout;
    `dtype_flag`: the --dtype value where it dequantizes into another family."""
    via = f" (the {family.name} experts dequantized with --dtype {dtype_flag})" if written is not family else ""
    return (f"{source}: no consumer reads the per-expert layout of the {written.name} family{via} that split_experts "
            f"would write ({written.source}: per_expert_readers.readers is []): {written.per_expert_note.rstrip('.')}. "
            f"Pass {ALLOW_FLAG} to write it anyway (batch manifests: allow_unread_layout: true)")


def check_split_source(config: Any, source: str, family_override: str | None, dtype: str | None,
                       dtype_flag: str | None) -> None:
    """Before a split is planned: raise ConversionError (refusal) when the source `source` (as the user wrote it),
    whose config.json holds `config` (None where it has none), is of a family whose per-expert layout (after --dtype
    `dtype`) no consumer reads. Where the config names no known family, nothing is decided here (the planner
    reports that as it always does)."""
    if not isinstance(config, dict):
        return
    try:
        family = detect_family(config, posixpath.join(source.rstrip("/"), "config.json"), family_override)
    except ConversionError:
        return
    written = unread_per_expert(family, dtype)
    if written is not None:
        raise ConversionError(refusal(source, family, written, dtype_flag))
