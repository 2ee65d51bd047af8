"""The family tables expert-LoRA detection and conversion read (configs/families), and the family guess.

Projection names (e.g. `gate_proj`/`w1` -> role gate), which roles a fused factor holds and their order inside
it (halves or interleaved) come from the family files, so this module names no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families import Family, find_family, load_families


@dataclass(frozen=True)
class FamilyGuess:
    """The family of an adapter's base model, and how it was found (or why it was not)."""

    family: Family | None
    source: str  # e.g. "--base-config model_type 'gpt_oss'", or the reason it is unknown


def lora_roles(family: Family) -> tuple[str, ...]:
    """The family's roles that LoRA can target (those of weight tensors), in the family's order."""
    return tuple(r for r, leaf in family.role_leaves.items() if leaf.endswith(".weight"))


def role_order(family: Family | None = None) -> tuple[str, ...]:
    """Roles in a stable order: `family`'s, then every other family's (first seen first)."""
    out: dict[str, None] = {}
    for fam in ([family] if family else []) + list(load_families().values()):
        out.update(dict.fromkeys(lora_roles(fam)))
    return tuple(out)


def output_role(family: Family) -> str:
    """The role that maps the expert's intermediate size back to the hidden size: the family's last one.

    Every other role maps hidden -> intermediate (the families' roles are listed input projections
    first, as transformers' conversion table lists them).
    """
    return lora_roles(family)[-1]


def lora_tensors(family: Family) -> tuple[tuple[tuple[str, ...], str, str], ...]:
    """(roles, parameter name, order) of each fused weight tensor of the family's default layout.

    These are the parameters peft's `target_parameters` wraps; `order` says how several roles
    share the out dim ("concat" halves or "interleave"), from the tensor's op pipeline.
    """
    weights = set(lora_roles(family))
    return tuple(
        (t.parts, t.leaf, t.op) for t in family.fused[family.default_fused] if set(t.parts) <= weights
    )


def proj_roles(family: Family | None = None) -> dict[str, str]:
    """Per-expert projection module name -> role, from the family tables (`family`'s names win)."""
    out: dict[str, str] = {}
    for fam in list(load_families().values()) + ([family] if family else []):
        for role in lora_roles(fam):
            out[fam.per_expert[role].rsplit(".", 2)[-2]] = role
    return out


def fused_param_roles(family: Family | None = None) -> dict[str, tuple[str, ...]]:
    """Fused parameter name -> roles it holds, from `family`'s tables (every family's when None)."""
    fams = [family] if family else list(load_families().values())
    out: dict[str, tuple[str, ...]] = {}
    for fam in fams:
        for roles, leaf, _ in lora_tensors(fam):
            out.setdefault(leaf, roles)
    return out


def fused_order(family: Family, roles: tuple[str, ...] | None = None) -> str | None:
    """How the family's fused tensor holding several roles (`roles` when given) orders them: concat or interleave."""
    for parts, _, op in lora_tensors(family):
        if len(parts) > 1 and (roles is None or parts == roles):
            return op
    return None


def family_by_name(name: str) -> Family:
    """The family called `name` (as in configs/)."""
    return load_families()[name]


def base_dims(
    base_config: dict[str, Any] | None, family: Family | None = None
) -> tuple[int | None, int | None, int | None]:
    """(hidden size H, expert intermediate size I, number of experts E) from a config.json, None where absent.

    E is read with `family`'s config keys (every family's when None).
    """
    if not base_config:
        return None, None, None
    cfg = base_config.get("text_config", base_config) if "hidden_size" not in base_config else base_config
    hidden = cfg.get("hidden_size")
    inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    keys = family.num_experts_keys if family else tuple(
        dict.fromkeys(k for f in load_families().values() for k in f.num_experts_keys)
    )
    experts = None
    for key in keys:
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            experts = cfg[key]
            break
    return hidden, inter, experts


def guess_family(adapter_config: dict[str, Any], base_config: dict[str, Any] | None, where: str) -> FamilyGuess:
    """The base model's family: from `base_config` (config.json) when given, else from adapter_config.json.

    Both go through the one family detection (convert.families.find_family): config.json's
    model_type / architectures / text_config; adapter_config.json's peft `auto_mapping`
    (`base_model_class`, `parent_library`). Besides, `base_model_name_or_path` containing a
    family's model_type (e.g. "gpt-oss") counts; used only when every piece of evidence names
    the same family. Raises ConversionError when `base_config` names no known family.
    """
    if base_config is not None:
        fam, how = find_family(base_config)
        if fam is None:
            known = sorted(t for f in load_families().values() for t in f.model_types)
            raise ConversionError(f"--base-config: {how} (known: {known})")
        return FamilyGuess(fam, f"--base-config {how}")
    found: dict[str, str] = {}
    fam, how = find_family({**adapter_config, "auto_mapping": adapter_config.get("auto_mapping") or {}})
    if fam is not None:
        found[fam.name] = how
    name = str(adapter_config.get("base_model_name_or_path") or "")
    if name:
        norm = re.sub(r"[^a-z0-9]+", "_", name.lower())
        hits = {
            fam.name
            for fam in load_families().values()
            for t in fam.model_types
            if re.search(rf"(^|_){re.escape(t)}(_|$)", norm)
        }
        for h in hits:
            found.setdefault(h, f"base_model_name_or_path {name!r}")
    if len(found) == 1:
        fam_name, how = next(iter(found.items()))
        return FamilyGuess(load_families()[fam_name], f"adapter_config.json {how}")
    if not found:
        return FamilyGuess(None, f"{where}: adapter_config.json does not name the base model's family")
    return FamilyGuess(None, f"{where}: adapter_config.json names several families ({sorted(found)})")
