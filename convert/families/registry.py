"""Every family file, and the one family detection of the tool.

Family files are read from `configs/families/` of this repository, then from each directory
of `MOE_CONVERT_CONFIGS` (os.pathsep-separated; a directory holding a `families/` folder
means that folder). A later directory's family replaces an earlier one of the same name,
and claims its model types and class names first; inside one directory a model type or
class claimed by two families is an error.

`detect_family` finds the family of a model from, in this order: `--family` (a family
name, model type or class name), `config.json` `model_type`, its `architectures`, its
`text_config` (`model_type`, `architectures`), or, for an adapter's `adapter_config.json`,
peft's `auto_mapping` (`base_model_class`, `parent_library`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import ConversionError
from convert.families.family import Family, build_family, resolve
from convert.families.schema import FamilySpec, parse

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "configs" / "families"
# Tables as other transformers releases defined a model type (configs/legacy/transformers-<release>/), one family
# directory each: used by adding one to MOE_CONVERT_CONFIGS; a refusal over expert counts names the one that fits.
LEGACY_DIR = BUILTIN_DIR.parent / "legacy"
ENV = "MOE_CONVERT_CONFIGS"


def family_dirs() -> list[Path]:
    """The directories family files are read from, built-in first."""
    dirs = [BUILTIN_DIR]
    for entry in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
        path = Path(entry)
        dirs.append(path / "families" if (path / "families").is_dir() else path)
    return dirs


@dataclass(frozen=True)
class Registry:
    """The families of some directories, with their model-type and class-name indexes."""

    families: dict[str, Family]
    by_model_type: dict[str, str]
    by_class: dict[str, str]


_cache: dict[tuple[Any, ...], Registry] = {}


def _read_dir(directory: Path) -> list[tuple[FamilySpec, str]]:
    if not directory.is_dir():
        raise ConversionError(f"{directory}: family directory does not exist ({ENV} names it)")
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except ValueError as exc:
            raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
        spec = parse(FamilySpec, obj, str(path))
        if spec.family != path.stem:
            raise ConversionError(f"{path}: 'family' is {spec.family!r}; it must be the file name ({path.stem!r})")
        out.append((spec, str(path)))
    return out


def registry(dirs: list[Path] | None = None) -> Registry:
    """The families of `dirs` (default: family_dirs()), cached while no file is added to or removed from them."""
    dirs = family_dirs() if dirs is None else dirs
    listing = tuple((str(d), d.stat().st_mtime_ns if d.is_dir() else None) for d in dirs)
    if listing in _cache:
        return _cache[listing]
    specs: dict[str, tuple[FamilySpec, str]] = {}
    layer_of: dict[str, int] = {}
    for layer, d in enumerate(dirs):
        for spec, path in _read_dir(d):
            specs[spec.family] = (spec, path)
            layer_of[spec.family] = layer
    resolved = resolve(specs)
    families = {name: build_family(resolved[name], specs[name][1]) for name in sorted(specs)}
    by_model_type: dict[str, str] = {}
    by_class: dict[str, str] = {}
    for layer in range(len(dirs)):
        seen_type: dict[str, str] = {}
        seen_class: dict[str, str] = {}
        for name, fam in families.items():
            if layer_of[name] != layer:
                continue
            for index, seen, keys, what in ((by_model_type, seen_type, fam.model_types, "model type"),
                                            (by_class, seen_class, fam.architectures, "class")):
                for key in keys:
                    if key in seen:
                        raise ConversionError(
                            f"{fam.source}: {what} {key!r} is also claimed by family {seen[key]!r} ({families[seen[key]].source})"
                        )
                    seen[key] = name
                    index[key] = name
    reg = Registry(families, by_model_type, by_class)
    _cache[listing] = reg
    return reg


def load_families(directory: Path | str | None = None) -> dict[str, Family]:
    """Every family by name: of `directory` alone when given, else of family_dirs()."""
    return registry([Path(directory)] if directory is not None else None).families


def dequantized_family(family: Family) -> Family:
    """The family whose roles and names `family`'s dequantized weights have (an MXFP4 family's
    quantization.dequantize target: what its LoRA was trained on), else `family` itself; raises ConversionError
    where the target is not a known family."""
    if family.dequantize is None:
        return family
    target = load_families().get(family.dequantize[0])
    if target is None:
        raise ConversionError(f"{family.source}: quantization.dequantize names unknown family {family.dequantize[0]!r}")
    return target


def family_by_name(name: str) -> Family:
    """The family called `name`, or claiming model type / class `name`; raises ConversionError if none."""
    reg = registry()
    key = name if name in reg.families else reg.by_model_type.get(name) or reg.by_class.get(name)
    if not key:
        raise ConversionError(f"unknown family {name!r}; known: {sorted(reg.families)} (or one of their model types)")
    return reg.families[key]


def expert_signature(family: Family) -> str:
    """What a family says about its expert tensors (names on both sides, layouts, ops), as a comparable string."""
    layouts = {lay: [(t.template, t.parts, t.pipeline.to_json()) for t in ts] for lay, ts in family.fused.items()}
    return json.dumps([family.per_expert, family.expert_templates, layouts, family.default_fused], sort_keys=True)


def representative(names: set[str] | list[str]) -> Family | None:
    """One family standing for `names` (families whose per-expert names all matched) if they agree, else None.

    Several families can share their expert tensors' names and layouts and differ only in other
    tensors' renames (e.g. every family extending mixtral); for expert-only work any of them
    does. Of families whose templates all matched, those naming more of the key (a container
    rather than none) are kept; the one chosen has the fewest rename rules (then the first name).
    """
    families = registry().families
    fams = [families[n] for n in sorted(set(names))]

    def literal_length(f: Family) -> int:  # a template naming its container explains more of a name
        return max(len(t.split("{e}")[0].replace("{prefix}", "")) for t in f.per_expert.values())

    most = max((literal_length(f) for f in fams), default=0)
    fams = [f for f in fams if literal_length(f) == most]
    if not fams or len({expert_signature(f) for f in fams}) != 1:
        return None
    return min(fams, key=lambda f: (len(f.renames), f.name))


def _parent_library_type(lib: str) -> str | None:
    m = re.match(r"^transformers\.models\.([a-z0-9_]+)\.", lib)
    return m[1] if m else None


def find_family(config: dict[str, Any], reg: Registry | None = None) -> tuple[Family | None, str]:
    """The family a config.json (or an adapter_config.json) names, and how it was found; (None, why) if none.

    `reg`: the families to look in (default: registry()). Never raises for an unknown model; raises
    ConversionError only for bad family files.
    """
    reg = reg or registry()
    evidence: list[tuple[str, str]] = []  # (family name, how), strongest first
    if "peft_type" in config or "auto_mapping" in config:
        mapping = config.get("auto_mapping") or {}
        if isinstance(mapping, dict):
            cls = str(mapping.get("base_model_class") or "")
            if cls in reg.by_class:
                evidence.append((reg.by_class[cls], f"auto_mapping.base_model_class {cls!r}"))
            lib = str(mapping.get("parent_library") or "")
            mt = _parent_library_type(lib)
            if mt in reg.by_model_type:
                evidence.append((reg.by_model_type[str(mt)], f"auto_mapping.parent_library {lib!r}"))
        if evidence:
            names = {e[0] for e in evidence}
            if len(names) > 1:
                return None, f"adapter_config.json names several families ({sorted(names)})"
            return reg.families[evidence[0][0]], evidence[0][1]
        return None, "adapter_config.json does not name the base model's class"
    for cfg, at in ((config, ""), (config.get("text_config"), "text_config.")):
        if not isinstance(cfg, dict):
            continue
        mt = cfg.get("model_type")
        if isinstance(mt, str) and mt in reg.by_model_type:
            return reg.families[reg.by_model_type[mt]], f"{at}model_type {mt!r}"
        archs = cfg.get("architectures") or []
        hits = {reg.by_class[a]: a for a in archs if isinstance(a, str) and a in reg.by_class}
        if len(hits) == 1:
            name, cls = next(iter(hits.items()))
            return reg.families[name], f"{at}architectures {cls!r}"
        if len(hits) > 1:
            return None, f"{at}architectures {sorted(hits.values())} name several families ({sorted(hits)})"
    return None, f"model_type {config.get('model_type')!r} is not a known MoE family"


def quant_method(config: dict[str, Any]) -> str | None:
    """config.json's `quantization_config.quant_method` (or its text_config's), if any."""
    for cfg in (config, config.get("text_config")):
        q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if isinstance(q, dict) and isinstance(q.get("quant_method"), str):
            return str(q["quant_method"])
    return None


def quantized_variant(family: Family, config: dict[str, Any], where: str) -> Family:
    """The family that describes a checkpoint of `family` quantized as `config` says (itself if none does)."""
    method = quant_method(config)
    name = family.quant_formats.get(method or "")
    if not name:
        return family
    if name not in registry().families:
        raise ConversionError(f"{family.source}: quantization.formats names unknown family {name!r} (for {where})")
    return registry().families[name]


def detect_family(config: dict[str, Any], where: str, override: str | None = None) -> Family:
    """The family of a model: `override` (--family) if given, else from `config` (see find_family).

    `config` is a config.json (or an adapter_config.json) as a dict; `where` names it for errors.
    Raises ConversionError naming `where` when no family fits.
    """
    if override:
        return quantized_variant(family_by_name(override), config, where)
    family, how = find_family(config)
    if family is not None:
        return quantized_variant(family, config, where)
    reg = registry()
    raise ConversionError(
        f"{where}: {how} (known model types: {sorted(reg.by_model_type)}); "
        f"add a family file to configs/families/ (or a directory in ${ENV}) or pass --family"
    )


def _shown(path: Path | str) -> str:
    """`path` relative to the working directory where it lies below it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def _table_sets() -> list[tuple[list[Path], str]]:
    """(family directories, how to use them) of each other set of tables: the current directories with each
    directory of configs/legacy/ added, and without the legacy ones they hold."""
    current = family_dirs()
    legacy = sorted(d.resolve() for d in LEGACY_DIR.iterdir() if d.is_dir()) if LEGACY_DIR.is_dir() else []
    plain = [d for d in current if d.resolve() not in legacy]
    sets = []
    if len(plain) < len(current):
        sets.append((plain, f"leave {', '.join(_shown(d) for d in current if d not in plain)} out of {ENV}"))
    for d in legacy:
        if d not in {c.resolve() for c in current}:
            sets.append(([*plain, d], f"add {_shown(d)} to {ENV}"))
    return sets


def other_table_fits(family: Family, config: dict[str, Any], found: dict[str, int]) -> str:
    """Where the expert counts a checkpoint or adapter holds (`found`: role -> experts) are not `family`'s for
    `config` (its config.json): a sentence part naming another set of tables (another transformers release's,
    configs/legacy/) whose family for `config` holds exactly those counts, and how to use it; "" when none does.
    """
    def versions(f: Family) -> str:
        return f"transformers {', '.join(f.transformers_versions)}" if f.transformers_versions else "written by hand"

    for dirs, how in _table_sets():
        try:
            other, _ = find_family(config, registry(dirs))
            if other is None or Path(other.source).resolve() == Path(family.source).resolve():
                continue
            counts = other.role_experts(config, other.num_experts(config, "config.json"), "config.json")
        except ConversionError:
            continue
        shared = {r: found[r] for r in counts if r in found}
        if shared and all(counts[r] == n for r, n in shared.items()):
            held = ", ".join(f"{r} {n}" for r, n in shared.items())
            return (f"; its experts per role ({held}) are what family {other.name} of {_shown(other.source)} "
                    f"({versions(other)}) holds, not {family.name} of {_shown(family.source)} ({versions(family)}): "
                    f"to convert it with that table, {how}")
    return ""
