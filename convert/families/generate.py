"""`python -m convert.families.generate [--out DIR] [--check]`: family files from the installed transformers.

A maintenance command, never imported by a conversion (it imports transformers). It reads
transformers' checkpoint conversion table (`conversion_mapping.py`) and writes one family
file per conversion pattern whose expert tensors are merged from per-expert tensors
(`MergeModulelist`) into `configs/families/` (model types with identical tables become
aliases of one family; a family differing from another only by more rename rules
`extends` it). Model types it cannot express are listed with the reason. `--check` writes
nothing and exits 1 when the committed files differ from a fresh generation.

How a transformers entry becomes a family:
- each `WeightConverter` with `MergeModulelist(dim=0)` gives a fused tensor: its source
  patterns (`<container>.experts.*.<leaf>`) give the roles (named after the fused tensor:
  `gate_up_proj` <- gate, up; `down_proj` <- down) and their per-expert leaves; the ops after
  the merge become ops on one expert's slice (dims shift down by one). A pattern without a
  container (`.experts.*.w1.weight`) means the model's `mlp` (every such model holds its
  experts under `mlp` once the renames ran);
- `WeightRenaming` -> a rename rule (same patterns); `PrefixChange` -> a one-way rule
  (transformers does not undo it when saving a model it did not load);
- a `WeightConverter` with only `Concatenate(dim=0)` of non-expert tensors -> a merge (its
  `num_shards_attribute`, the config key giving the number of `*` parts, -> `count_key`);
- a `WeightConverter` with only `Split(dim=0)` of one non-expert tensor into several -> a split
  (`splits`): transformers sizes the parts by the model's parameters, the family file by config
  keys the parts are proportional to (SPLIT_SHARES, checked against the parameters of each model
  type's model built from its default config on the meta device);
- anything else (other ops, grouped renames) makes the model type inexpressible.
What the table cannot say is data here: RENAME_FIXES (rules of the table that are wrong),
EXTRA_EXPERTS (roles held by more experts than E: the family file's `extra_experts`, emitted only
where the installed transformers' model holds them) and SPLIT_SHARES.
Other facts come from the auto classes and config classes: the class names of each model
type (`architectures`), the config key of E (the attribute, and its `attribute_map`
aliases), and the config keys that make layers dense.

Each file records the transformers releases whose table gives it (`transformers_versions`): a
file whose content (every key but `description`, `generated_from` and that list) is what the
committed file says keeps the committed list plus the installed release; any other starts anew.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.families.family import version_key
from convert.families.names import literal, pattern_regex
from convert.families.registry import BUILTIN_DIR

E_CANDIDATES = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
DENSE_CANDIDATES = (
    "first_k_dense_replace", "num_dense_layers", "mlp_only_layers", "decoder_sparse_step", "mlp_layer_types",
    "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "expert_layer_period",
    "expert_layer_offset", "moe_layer_freq",
)
ROLE_WORDS = {"gate", "up", "down"}
DEFAULT_CONTAINER = "mlp"
# Names the v1 family files had, kept so that `--family` flags and reports keep working.
FAMILY_NAMES = {"qwen2_moe": "qwen3_moe"}
# Rules of transformers' table that are wrong as written, as (family, source pattern) -> corrected pattern.
# deepseek_v4 (transformers 5.23): `\.norm\.` -> `.kv_norm.` also renames the final `model.norm.weight`, so
# transformers' own save_pretrained -> from_pretrained round trip loses that weight; the attention's
# norm is the only one meant.
RENAME_FIXES = {("deepseek_v4", r"\.norm\."): r"(?<!^model)\.norm\."}
# Model types whose modeling code may hold some roles for more experts than E, which transformers' table cannot
# say: model type -> {role: config key added to E} (the family file's `extra_experts`; such a model type gets a
# family of its own that `extends` the one of its table entry). Emitted only where the installed transformers'
# model holds them (its fused parameters' dim 0, on the meta device). longcat_flash: transformers 5.23's
# LongcatFlashExperts held `gate_up_proj` [n_routed_experts + zero_expert_num, 2I, H] (the identity "zero"
# experts had router slots and gate/up rows, which save_pretrained wrote as experts.{e}.gate_proj/up_proj) and
# `down_proj` [n_routed_experts, H, I]; from 5.25 both hold n_routed_experts (the zero experts have no weights).
# configs/legacy/transformers-5.23.0/longcat_flash.json keeps the 5.23 definition.
EXTRA_EXPERTS = {"longcat_flash": {"gate": "zero_expert_num", "up": "zero_expert_num"}}
# Parts of a split non-expert tensor (transformers' `Split`, sized by the model's parameters) -> the config key
# their size along the split dim is proportional to: attention projections cut from a fused q/k/v (every head,
# query or key/value, has one head_dim). Checked per model type against its model's parameters.
SPLIT_SHARES = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads", "v_proj": "num_key_value_heads"}
# Keys of a generated file that say which transformers made it, not what it describes.
VERSION_KEYS = ("description", "generated_from", "transformers_versions")


class Inexpressible(Exception):
    """A transformers table entry the family format cannot say (message: why)."""


@dataclass
class Entry:
    """One transformers table entry translated: everything but the identity keys."""

    experts: dict[str, Any]
    layouts: dict[str, Any]
    renames: list[dict[str, Any]]
    merges: list[dict[str, Any]]
    splits: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # model types / class names sharing it
    extra_experts: dict[str, str] = field(default_factory=dict)  # from EXTRA_EXPERTS

    def body(self) -> str:
        return json.dumps([self.experts, self.layouts, self.renames, self.merges, self.splits, self.extra_experts],
                          sort_keys=True)


def _unescape(pattern: str) -> str:
    return pattern.replace("\\.", ".")


def _expert_pattern(pattern: str) -> tuple[str | None, str]:
    """(container or None, leaf) of `<container>.experts.*.<leaf>`."""
    p = _unescape(pattern).lstrip(".")
    head, sep, leaf = p.partition("experts.*.")
    if not sep or not leaf or any(c in leaf for c in "*()[]^$\\|?+"):
        raise Inexpressible(f"expert source pattern {pattern!r} is not <container>.experts.*.<leaf>")
    head = head.rstrip(".")
    return (head or None), leaf


def _fused_pattern(pattern: str) -> tuple[str | None, str]:
    p = _unescape(pattern).lstrip(".")
    head, sep, leaf = p.rpartition("experts.")
    if not sep or not leaf or "." in leaf or "*" in p:
        raise Inexpressible(f"expert target pattern {pattern!r} is not <container>.experts.<name>")
    return (head.rstrip(".") or None), leaf


def _ops(ops: list[Any], shift: int) -> list[dict[str, Any]]:
    from transformers.core_model_loading import Concatenate, Transpose

    out: list[dict[str, Any]] = []
    for op in ops:
        if type(op) is Concatenate and op.num_shards_attribute is None:
            out.append({"op": "concat", "dim": op.dim - shift})
        elif type(op) is Transpose and not op.check_dims:
            out.append({"op": "transpose", "dims": [op.dim0 - shift, op.dim1 - shift]})
        else:
            raise Inexpressible(f"op {op!r} has no family-file equivalent")
    if any(o.get("dim", 0) < 0 or min(o.get("dims", [0])) < 0 for o in out):
        raise Inexpressible(f"ops {ops!r} act on the expert dimension")
    return out


@dataclass
class _Parts:
    """What a table entry's transforms say, gathered one transform at a time (translate)."""

    containers: set[str | None] = field(default_factory=set)
    roles: dict[str, str] = field(default_factory=dict)  # role -> per-expert leaf
    fused: dict[str, dict[str, Any]] = field(default_factory=dict)  # fused tensor name -> its family-file spec
    renames: list[dict[str, Any]] = field(default_factory=list)
    merges: list[dict[str, Any]] = field(default_factory=list)
    splits: list[dict[str, Any]] = field(default_factory=list)


def translate(transforms: list[Any]) -> Entry:
    """A transformers table entry as a family body; raises Inexpressible with the reason."""
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    parts = _Parts()
    for t in transforms:
        src, tgt = list(t._original_source_patterns), list(t._original_target_patterns)
        if isinstance(t, WeightConverter):
            _add_converter(parts, list(t.operations), src, tgt)
        elif type(t) is PrefixChange:
            parts.renames.append({"from": src[0], "to": tgt[0], "one_way": True})
        elif type(t) is WeightRenaming:
            if len(src) != 1 or len(tgt) != 1:
                raise Inexpressible(f"renaming {src} -> {tgt} has several patterns")
            parts.renames.append({"from": src[0], "to": tgt[0]})
        else:
            raise Inexpressible(f"{type(t).__name__} {src} -> {tgt} has no family-file equivalent")
    if not parts.fused:
        raise Inexpressible("no expert tensors are merged")
    named = {c for c in parts.containers if c is not None}
    if len(named) > 1:
        raise Inexpressible(f"experts under several containers {sorted(named)}")
    container = named.pop() if named else DEFAULT_CONTAINER
    order = [r for r in ("gate", "up", "down") if r in parts.roles]
    layouts: dict[str, Any] = {"transformers": parts.fused}
    stacked = {f"{r}_proj": {"parts": [r]} for r in order}
    if set(stacked) != set(parts.fused):
        layouts["stacked"] = stacked
    experts = {"container": container, "roles": {r: parts.roles[r] for r in order}}
    return Entry(experts, layouts, parts.renames, parts.merges, parts.splits)


def _add_converter(parts: _Parts, ops: list[Any], src: list[str], tgt: list[str]) -> None:
    """Add a `WeightConverter` (its `ops`, source and target patterns) to `parts`: a fused expert tensor, a merge
    or a split; raises Inexpressible for any other."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Split

    if ops and type(ops[0]) is MergeModulelist:
        _add_fused(parts, ops, src, tgt)
    elif len(ops) == 1 and type(ops[0]) is Concatenate and ops[0].dim == 0 and len(tgt) == 1:
        parts.merges.append(_merge(ops[0], src, tgt))
    elif len(ops) == 1 and type(ops[0]) is Split and ops[0].dim == 0 and len(src) == 1 and len(tgt) > 1:
        parts.splits.append(_split(src, tgt))
    else:
        raise Inexpressible(f"converter {src} -> {tgt} with ops {ops!r} has no family-file equivalent")


def _add_fused(parts: _Parts, ops: list[Any], src: list[str], tgt: list[str]) -> None:
    """Add the fused expert tensor of a `MergeModulelist` converter to `parts`: its roles (named after the tensor),
    their per-expert leaves and containers, and the ops after the merge on one expert's slice."""
    from transformers.core_model_loading import Concatenate

    if ops[0].dim != 0 or len(tgt) != 1:
        raise Inexpressible(f"converter {src} -> {tgt}: merge on dim {ops[0].dim} or several targets")
    container, name = _fused_pattern(tgt[0])
    parts.containers.add(container)
    words = name.removesuffix("_proj").split("_")
    if len(words) != len(src) or not set(words) <= ROLE_WORDS:
        raise Inexpressible(f"converter {src} -> {tgt}: cannot tell the roles of {name!r}")
    for role, pattern in zip(words, src):
        c, leaf = _expert_pattern(pattern)
        parts.containers.add(c)
        if parts.roles.get(role, leaf) != leaf:
            raise Inexpressible(f"role {role} has two per-expert names ({parts.roles[role]}, {leaf})")
        parts.roles[role] = leaf
    rest = ops[1:]
    if len(src) > 1 and not (rest and type(rest[0]) is Concatenate):
        raise Inexpressible(f"converter {src} -> {tgt}: several roles but no concatenation")
    parts.fused[name] = {"parts": words, **({"ops": _ops(rest, 1)} if rest else {})}


def _merge(op: Any, src: list[str], tgt: list[str]) -> dict[str, Any]:
    """The family file's `merges` entry of a converter joining the tensors `src` into `tgt[0]` by `Concatenate` `op`."""
    count = op.num_shards_attribute
    if any("*" in p for p in src) and not (count and len(src) == 1 and src[0].count("*") == 1):
        raise Inexpressible(f"converter {src} -> {tgt}: not a fixed list of tensors joined into one")
    return {"sources": src, "target": tgt[0], "ops": [{"op": "concat", "dim": 0}],
            **({"count_key": count} if count else {})}


def _split(src: list[str], tgt: list[str]) -> dict[str, Any]:
    """The family file's `splits` entry of a converter splitting `src[0]` into `tgt`, sized by SPLIT_SHARES."""
    if any("*" in p for p in src + tgt):
        raise Inexpressible(f"converter {src} -> {tgt}: a split of name patterns with '*'")
    shares = [SPLIT_SHARES.get(literal(p).strip(".")) for p in tgt]
    if None in shares:
        raise Inexpressible(f"converter {src} -> {tgt}: Split sizes the parts by the model's parameters; "
                            "SPLIT_SHARES gives no config key for "
                            f"{[p for p, k in zip(tgt, shares) if k is None]}")
    return {"source": src[0], "targets": tgt, "ops": [{"op": "split", "dim": 0, "sizes": shares}]}


@functools.cache
def _meta_model(model_type: str) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """(default config, parameter name -> shape) of `model_type`'s causal LM (else its base model) on the meta device."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = CONFIG_MAPPING[model_type]()
    auto = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    return config, {name: tuple(p.shape) for name, p in model.named_parameters()}


def _check_splits(model_type: str, splits: list[dict[str, Any]]) -> None:
    """Raise Inexpressible unless each split's shares (config keys) size its parts as `model_type`'s model does."""
    try:
        config, shapes = _meta_model(model_type)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built cannot be checked
        raise Inexpressible(f"splits cannot be checked: its model cannot be built ({type(exc).__name__}: {exc})") from None
    text = config.get_text_config()
    for sp in splits:
        keys = sp["ops"][0]["sizes"]
        values = [v for v in (getattr(text, k, None) for k in keys) if type(v) is int and v > 0]
        if len(values) != len(keys) or not all(k in text.to_dict() for k in keys):
            raise Inexpressible(f"split of {sp['source']!r}: config keys {keys} are not all whole numbers of its config")
        first = pattern_regex(sp["targets"][0])
        found = 0
        for name in shapes:
            m = first.search(name)
            if not m:
                continue
            sizes = [shapes.get(name.replace(m.group(0), literal(t), 1), (0,))[0] for t in sp["targets"]]
            if any(size * values[0] != sizes[0] * v for size, v in zip(sizes, values)):
                raise Inexpressible(f"split of {sp['source']!r}: {name} and its siblings have sizes {sizes} along dim 0, "
                                    f"not in proportion to {dict(zip(keys, values))}")
            found += 1
        if not found:
            raise Inexpressible(f"split of {sp['source']!r}: the model has no parameter named {sp['targets'][0]!r}")


def _holds_extra_experts(model_type: str, entry: Entry, extra: dict[str, str]) -> bool:
    """Whether `model_type`'s model holds the fused tensors of `extra`'s roles for more experts than E (on the meta
    device, from its default config); raises Inexpressible where that cannot be told."""
    try:
        config, shapes = _meta_model(model_type)
    except Exception as exc:  # noqa: BLE001
        raise Inexpressible(f"extra_experts {extra}: its model cannot be built ({type(exc).__name__}: {exc})") from None
    text = config.get_text_config()
    e_keys, _ = _config_keys(model_type)
    e = next((getattr(text, k) for k in e_keys if isinstance(getattr(text, k, None), int)), None)
    if e is None or not any(getattr(text, k, None) for k in extra.values()):
        raise Inexpressible(f"extra_experts {extra}: the default config gives no E or no extra experts to tell them by")
    fused = [name for name, t in entry.layouts["transformers"].items() if set(t["parts"]) <= set(extra)]
    sizes = {shape[0] for name, shape in shapes.items() for f in fused if name.endswith(f".experts.{f}")}
    if not sizes:
        raise Inexpressible(f"extra_experts {extra}: the model has no fused {fused} to count the experts of")
    return sizes != {e}


def _class_names() -> dict[str, set[str]]:
    from transformers.models.auto import modeling_auto

    out: dict[str, set[str]] = {}
    for attr in dir(modeling_auto):
        table = getattr(modeling_auto, attr)
        if not (attr.startswith("MODEL_") and attr.endswith("MAPPING_NAMES") and isinstance(table, dict)):
            continue
        for model_type, cls in table.items():
            for c in (cls,) if isinstance(cls, str) else tuple(cls) if isinstance(cls, (tuple, list)) else ():
                out.setdefault(model_type, set()).add(c)
    return out


def _config_keys(model_type: str) -> tuple[list[str], list[str]]:
    """(E keys: the config attribute first, then its aliases; dense-layer keys) of `model_type`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[model_type]()
        text = config.get_text_config()
    except Exception:  # noqa: BLE001 - a config class that cannot be built with defaults: no keys known
        return [], []
    present = {**text.to_dict(), **config.to_dict()}
    amap = {**(getattr(type(text), "attribute_map", {}) or {}), **(getattr(type(config), "attribute_map", {}) or {})}
    real = [k for k in E_CANDIDATES if amap.get(k, k) in present]
    attrs = list(dict.fromkeys(amap.get(k, k) for k in real))
    aliases = [k for k, v in amap.items() if v in attrs and k not in attrs]
    return attrs + aliases, [k for k in DENSE_CANDIDATES if k in present]


def _ordered(keys: list[list[str]], order: tuple[str, ...]) -> list[str]:
    found = {k for ks in keys for k in ks}
    return [k for k in order if k in found] + sorted(found - set(order))


def generate(committed: Path | None = BUILTIN_DIR) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """(file name stem -> family file object, [(table key, reason skipped)]) from the installed transformers.

    `committed`: the directory of the files these replace, whose `transformers_versions` a file of the same
    content keeps (see the module docstring); None: every file lists the installed release only.
    """
    import transformers
    from transformers.conversion_mapping import (
        _MODEL_TO_CONVERSION_PATTERN,
        _build_checkpoint_conversion_mapping,
        get_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import MergeModulelist, WeightConverter
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    table_keys = sorted(_build_checkpoint_conversion_mapping())
    entries: dict[str, Entry] = {}
    skipped: list[tuple[str, str]] = []
    for key in table_keys:
        transforms = get_checkpoint_conversion_mapping(key) or []
        merged = any(isinstance(t, WeightConverter) and any(type(o) is MergeModulelist for o in t.operations)
                     for t in transforms)
        if not merged:
            continue
        try:
            entry = translate(transforms)
            if entry.splits and key not in CONFIG_MAPPING_NAMES:
                raise Inexpressible("splits are checked against a model type's model; this key is a class name")
            if entry.splits:
                _check_splits(key, entry.splits)
            if key in EXTRA_EXPERTS and _holds_extra_experts(key, entry, EXTRA_EXPERTS[key]):
                entry.extra_experts = EXTRA_EXPERTS[key]
        except Inexpressible as exc:
            skipped.append((key, str(exc)))
            continue
        entries.setdefault(entry.body(), entry).keys.append(key)

    patterns = set(_MODEL_TO_CONVERSION_PATTERN.values())
    classes = _class_names()
    version = transformers.__version__
    groups: dict[str, Entry] = {}
    for entry in entries.values():
        types = [k for k in entry.keys if k in CONFIG_MAPPING_NAMES]
        pattern = sorted(k for k in entry.keys if k in patterns) or sorted(types) or sorted(entry.keys)
        name = FAMILY_NAMES.get(pattern[0], pattern[0])
        groups[name] = entry

    claimed: dict[str, set[str]] = {}
    for name, entry in groups.items():
        for k in entry.keys:
            for c in classes.get(k, set()) | ({k} if k not in CONFIG_MAPPING_NAMES else set()):
                claimed.setdefault(c, set()).add(name)

    files: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(groups.items()):
        types = sorted(k for k in entry.keys if k in CONFIG_MAPPING_NAMES)
        archs = sorted(c for c, owners in claimed.items() if owners == {name}
                       and (c in {x for k in entry.keys for x in classes.get(k, set())} or c in entry.keys))
        e_keys, dense = zip(*(_config_keys(t) for t in types)) if types else ((), ())
        obj: dict[str, Any] = {
            "family": name,
            "description": f"transformers {version} conversion pattern of {', '.join(sorted(entry.keys))}: "
                           "per-expert tensors merged into fused [E, ...] tensors when loading",
            "generated_from": f"transformers {version}",
            "transformers_versions": [version],
            "model_types": types,
            "architectures": archs,
            "num_experts_keys": _ordered(list(e_keys), E_CANDIDATES) or list(E_CANDIDATES),
            **({"extra_experts": entry.extra_experts} if entry.extra_experts else {}),
            "dense_layer_keys": _ordered(list(dense), DENSE_CANDIDATES),
            "experts": entry.experts,
            "layouts": entry.layouts,
            "default_layout": "transformers",
            "renames": [{**r, "from": RENAME_FIXES.get((name, r["from"]), r["from"])} for r in entry.renames],
        }
        if entry.merges:
            obj["merges"] = entry.merges
        if entry.splits:
            obj["splits"] = entry.splits
        files[name] = obj
    _add_extends(files)
    if committed is not None:
        _carry_versions(files, committed, version)
    return files, skipped


def content(obj: dict[str, Any]) -> dict[str, Any]:
    """A family file object without the keys that say which transformers made it (VERSION_KEYS)."""
    return {k: v for k, v in obj.items() if k not in VERSION_KEYS}


def _carry_versions(files: dict[str, dict[str, Any]], committed: Path, version: str) -> None:
    """Give each file whose content the committed file of its name has that file's releases plus `version`."""
    for name, obj in files.items():
        path = committed / f"{name}.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "generated_from" not in old or content(old) != content(obj):
            continue
        before = old.get("transformers_versions") or [str(old["generated_from"]).removeprefix("transformers ")]
        obj["transformers_versions"] = sorted(set(before) | {version}, key=version_key)


def _add_extends(files: dict[str, dict[str, Any]]) -> None:
    """Rewrite each family that is another one plus more rename rules (or `extra_experts`) as `extends` +
    `extra_renames` (+ `extra_experts`)."""
    same = ("experts", "layouts", "default_layout", "merges")  # a child may add splits to a parent without
    parents: dict[str, str] = {}
    for name, obj in files.items():
        best = None
        for other, base in files.items():
            if other == name or any(obj.get(k) != base.get(k) for k in same):
                continue
            if base.get("extra_experts") not in (None, obj.get("extra_experts")):
                continue
            if base.get("splits") not in (None, obj.get("splits")):
                continue
            n = len(base["renames"])
            more = (n < len(obj["renames"]) or obj.get("extra_experts") != base.get("extra_experts")
                    or obj.get("splits") != base.get("splits"))
            if more and n <= len(obj["renames"]) and obj["renames"][:n] == base["renames"]:
                if best is None or n > len(files[best]["renames"]) or (n == len(files[best]["renames"]) and other < best):
                    best = other
        if best is not None:
            parents[name] = best
    for name, parent in parents.items():
        obj, base = files[name], files[parent]
        child: dict[str, Any] = {k: obj[k] for k in ("family", "description", "generated_from", "transformers_versions",
                                                     "extends", "model_types", "architectures") if k in obj}
        child["extends"] = parent
        for key in ("num_experts_keys", "extra_experts", "dense_layer_keys", "splits"):
            if obj.get(key) != base.get(key):
                child[key] = obj[key]
        if len(obj["renames"]) > len(base["renames"]):
            child["extra_renames"] = obj["renames"][len(base["renames"]):]
        order = ["family", "description", "generated_from", "transformers_versions", "extends", "model_types",
                 "architectures", "num_experts_keys", "extra_experts", "dense_layer_keys", "extra_renames", "splits"]
        files[name] = {k: child[k] for k in order if k in child}


def dumps(obj: Any, indent: int = 0, width: int = 110) -> str:
    """JSON with objects broken over lines and what fits kept on one line (the top level always broken)."""
    flat = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or not obj or (indent and len(flat) + indent <= width):
        return flat
    pad = " " * (indent + 2)
    close = " " * indent + ("]" if isinstance(obj, list) else "}")
    if isinstance(obj, list) and all(not isinstance(v, (dict, list)) for v in obj):
        lines, line = [], ""
        for item in (json.dumps(v) for v in obj):
            if line and len(pad) + len(line) + len(item) + 1 > width:
                lines.append(line)
                line = ""
            line += (" " if line else "") + item + ","
        lines.append(line.rstrip(","))
        return "[\n" + "\n".join(pad + ln for ln in lines) + "\n" + close
    if isinstance(obj, list):
        items = [pad + dumps(v, indent + 2, width) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + close
    items = [pad + json.dumps(k) + ": " + dumps(v, indent + 2, width) for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + close


def render(obj: dict[str, Any]) -> str:
    """A family file's text."""
    return dumps(obj) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the generated family files; print what was skipped."""
    p = argparse.ArgumentParser(prog="python -m convert.families.generate", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(BUILTIN_DIR), help="directory of family files (default: configs/families)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the files differ")
    args = p.parse_args(argv)
    out = Path(args.out)
    files, skipped = generate(out)
    differ = []
    for name, obj in sorted(files.items()):
        path = out / f"{name}.json"
        text = render(obj)
        if path.exists():
            old = json.loads(path.read_text())
            if "generated_from" not in old:
                print(f"{path}: written by hand, not replaced (the generated family {name!r} is skipped)", file=sys.stderr)
                continue
            if path.read_text() == text:
                continue
        differ.append(str(path))
        if not args.check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    stale = [p for p in sorted(out.glob("*.json")) if p.stem not in files and "generated_from" in json.loads(p.read_text())]
    for path in stale:
        differ.append(f"{path} (no longer generated)")
        if not args.check:
            path.unlink()
    for key, why in skipped:
        print(f"skipped {key}: {why}")
    print(f"{len(files)} families for {sum(len(f.get('model_types', [])) for f in files.values())} model types; "
          f"{len(differ)} file(s) {'differ' if args.check else 'written'}")
    for d in differ:
        print(f"  {d}")
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
