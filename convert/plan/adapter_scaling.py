"""adapter_config.json rewriting that keeps every module's LoRA scaling identical.

peft scales a module's delta by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), where
r and lora_alpha come from `rank_pattern` / `alpha_pattern` when one of their keys matches
the end of the module's name (first match in key order), else from the global `r` and
`lora_alpha`. A conversion renames modules and may change a module's rank (folding,
expanding), so the patterns are rebuilt: each output module gets the (r, alpha) that gives
its delta the source's scaling, with the fewest pattern keys that express it, and the result
is checked module by module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.formats.adapter_layouts import pattern_value

Scale = tuple[int, float]  # (r, lora_alpha)


def source_scale(config: dict[str, Any], module: str) -> Scale:
    """(r, alpha) peft uses for `module` (a name without `base_model.model.`) under `config`."""
    r = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return int(r), alpha


def scale_for_rank(config: dict[str, Any], src: Scale, new_rank: int) -> Scale:
    """The (r, alpha) with rank `new_rank` whose scaling equals that of `src` under `config`'s use_rslora."""
    r, alpha = src
    if new_rank == r:
        return src
    if config.get("use_rslora"):
        value = alpha * math.sqrt(new_rank) / math.sqrt(r)
    else:
        value = alpha * new_rank / r
    return new_rank, int(value) if float(value).is_integer() and isinstance(alpha, int) else value


def scaling(config: dict[str, Any], scale: Scale) -> float:
    """The factor a delta is multiplied by for (r, alpha) under `config`'s use_rslora."""
    r, alpha = scale
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass(frozen=True)
class OutputModule:
    """A module of the output adapter: its name, wanted (r, alpha), and pattern keys that could name it.

    `keys` go from most general (e.g. every layer's expert gate_proj) to the exact name.
    """

    name: str
    scale: Scale
    keys: tuple[str, ...]


def _matches(key: str, module: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module) is not None


def rebuild_patterns(
    config: dict[str, Any], converted: list[OutputModule], kept: Iterable[str], where: str
) -> tuple[dict[str, int], dict[str, Any]]:
    """New (rank_pattern, alpha_pattern) for an output with `converted` modules and unchanged `kept` ones.

    Source pattern keys that still match a kept module are preserved; converted modules whose
    scale they would get wrong get keys of their own (placed first, so they win). Raises
    ConversionError if some module's scale cannot be expressed.
    """
    r0, a0 = config.get("r", 8), config.get("lora_alpha", 8)
    kept = list(kept)
    want: dict[str, Scale] = {m: source_scale(config, m) for m in kept}
    for m in converted:
        want[m.name] = m.scale
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, Any] = {}
    for which, src_pat, out, default, pos in (
        ("rank", config.get("rank_pattern") or {}, rank_pattern, r0, 0),
        ("alpha", config.get("alpha_pattern") or {}, alpha_pattern, a0, 1),
    ):
        preserved = {k: v for k, v in src_pat.items() if any(_matches(k, m) for m in kept)}
        own: dict[str, Any] = {}
        for mod in converted:
            if pattern_value({**own, **preserved}, mod.name, default) == mod.scale[pos]:
                continue
            for key in mod.keys:
                hits = [m for m in want if _matches(key, m)]
                if all(want[m][pos] == mod.scale[pos] for m in hits):
                    own[key] = mod.scale[pos]
                    break
        out.update(own)
        out.update(preserved)
        for module, scale in want.items():
            got = pattern_value(out, module, default)
            if got != scale[pos]:
                raise ConversionError(
                    f"{where}: cannot express the {which} of module {module!r} ({scale[pos]}) in adapter_config.json "
                    f"(the patterns give {got})"
                )
    return rank_pattern, alpha_pattern


def keys_matching_no_module(config: dict[str, Any], modules: Iterable[str]) -> list[str]:
    """The rank_pattern/alpha_pattern keys of `config` that match none of `modules` (sorted, each once).

    peft 0.21 warns when it loads an adapter that such keys "did not match any targeted module
    and were ignored", even for keys that match a `target_parameters` entry: its check looks at
    the target_modules only, while it applies the keys to the parameters all the same.
    """
    modules = list(modules)
    keys = {*(config.get("rank_pattern") or {}), *(config.get("alpha_pattern") or {})}
    return sorted(k for k in keys if not any(_matches(k, m) for m in modules))


def rewrite_config(
    config: dict[str, Any],
    converted: list[OutputModule],
    kept: Iterable[str],
    where: str,
    *,
    target_modules_add: Iterable[str] = (),
    target_modules_drop: Iterable[str] = (),
    target_parameters: list[str] | None = None,
) -> dict[str, Any]:
    """A copy of adapter_config.json `config` for the converted adapter.

    rank_pattern/alpha_pattern are rebuilt so every module keeps its scaling; `target_modules`
    (when a list) gains `target_modules_add` and loses `target_modules_drop`; `target_parameters`
    is set to the given list, or removed when None. Everything else is preserved.
    """
    out = dict(config)
    rank_pattern, alpha_pattern = rebuild_patterns(config, converted, kept, where)
    out["rank_pattern"] = rank_pattern
    out["alpha_pattern"] = alpha_pattern
    tm = config.get("target_modules")
    add, drop = list(target_modules_add), set(target_modules_drop)
    if isinstance(tm, list) or tm is None:
        names = [t for t in (tm or []) if t not in drop]
        names += [t for t in add if t not in names]
        out["target_modules"] = sorted(names) if names else None
    if target_parameters is None:
        out.pop("target_parameters", None)
    else:
        out["target_parameters"] = target_parameters
    return out
