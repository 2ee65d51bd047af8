"""`python -m convert.inspect PATH [--json]`: what a base checkpoint or adapter directory holds, and what can be done with it.

    python -m convert.inspect DIR_OR_URL [--json] [--base-config CONFIG_JSON] [--storage-options JSON]

Reads metadata only (listings, configs, safetensors headers). Reports the kind (base or
adapter), family, layout or expert-LoRA pattern, E, ranks, dtypes, tensor counts, layers,
the conversions that apply, and a named outcome: "converted" (a conversion applies),
"passed_through" (the conversion tools would copy it unchanged) or "refused" (with the
reason). Exit 0 whenever PATH could be read, whatever the outcome; 2 when it cannot.
"""

from __future__ import annotations

import json
import posixpath
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from convert.errors import ConversionError, StorageError, describe
from convert.families import PER_EXPERT, Family, detect_family, find_family
from convert.families.namings import HF, apply_source_naming
from convert.flag_types import json_object
from convert.formats.adapter_dir import (
    ADAPTER_CONFIG,
    CONVERTED,
    PASSED_THROUGH,
    REFUSED,
    AdapterDir,
    Verdict,
    adapter_family,
    check_not_lora,
    checkpoint_dirs,
    find_base_config,
    format_layers,
    is_lora,
    layer_of,
    open_adapter_dir,
    sort_others,
    subdir_adapters,
)
from convert.formats.adapter_layouts import detect_expert_lora
from convert.formats.adapter_source import open_adapter
from convert.formats.checkpoint import OTHER_WEIGHTS, Checkpoint, open_checkpoint
from convert.formats.dcp import METADATA as DCP_METADATA
from convert.formats.model_config import read_base_config
from convert.formats.safetensors import TensorInfo, read_header
from convert.inspect.targets import odd_packings, packing_fix, target_verdicts, words
from convert.io.storage import Storage, Store
from convert.plan.expert_groups import ExpertGroup, find_expert_groups
from convert.plan.readers import ALLOW_FLAG, unread_per_expert
from convert.settings import Settings, StorageSettings
from convert.toplevel import ToolParser, run_guarded

BASE, ADAPTER, UNKNOWN = "base", "adapter", "unknown"
EXIT_CODES = """exit codes:
  0    PATH could be read (whatever the outcome)
  2    PATH or --base-config does not exist or cannot be read
  130  interrupted (Ctrl-C; 143 for SIGTERM)
"""
SPLIT_ADAPTER = "split_adapter -> per-expert"
FUSE_ADAPTER_LAYOUTS = ("peft", "grouped")
KIND_TEXT = {
    "attention_lora": "attention LoRA",
    "router_lora": "router LoRA",
    "other_lora": "other LoRA",
    "modules_to_save": "modules_to_save full tensors",
}
CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
               "target_modules", "target_parameters", "modules_to_save", "base_model_name_or_path")


@dataclass
class Report:
    """The result of an inspection; `as_json()` is the stable machine-readable form."""

    path: str
    kind: str = UNKNOWN
    family: str | None = None
    family_source: str = ""
    layout: str | None = None  # base checkpoints: the expert layout ("mixed" when layers differ)
    container: str | None = None  # base checkpoints: safetensors, torch-dcp or sharded-safetensors
    names: str | None = None  # base checkpoints: the tensor names, "hf" or a trainer naming (configs/namings)
    pattern: str | None = None  # adapters: the expert-LoRA pattern ("mixed" when layers differ)
    num_experts: int | None = None
    ranks: dict[str, list[int]] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count
    tensors: int = 0
    files: dict[str, int] = field(default_factory=dict)  # weight file -> tensor count
    categories: dict[str, int] = field(default_factory=dict)  # tensor kind -> count
    layers: dict[str, list[int]] = field(default_factory=dict)  # "all", "experts", and per tensor kind
    groups: list[dict[str, Any]] = field(default_factory=list)  # one per expert layer
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json essentials
    conversions: list[str] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=dict)  # base checkpoints: method, block size, scale dtype
    verdict: Verdict = field(default_factory=Verdict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapters: per target, what it does as is, the fix
    producers: list[str] = field(default_factory=list)  # adapters: the producer-level layouts found (peft shapes, ...)

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON-serialisable object with stable keys."""
        out = asdict(self)
        verdict = out.pop("verdict")
        out.update(outcome=self.verdict.outcome, cases=verdict["cases"], reasons=verdict["reasons"],
                   notes=verdict["notes"])
        return out

    def count_tensors(self, tensors: dict[str, TensorInfo]) -> None:
        """Fill tensor count, dtypes and the layers seen from the tensors' metadata."""
        self.tensors = len(tensors)
        self.dtypes = dict(sorted(Counter(t.dtype for t in tensors.values()).items()))
        layers = {layer_of(n) for n in tensors}
        self.layers["all"] = sorted(x for x in layers if x is not None)


def _set_layout(values: list[str]) -> str | None:
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else ("mixed" if distinct else None)


# ---------------------------------------------------------------- kinds
def _peek_is_lora(storage: Store, weights: list[str]) -> bool:
    for name in weights[:1]:
        try:
            return any(is_lora(t) for t in read_header(storage, name).tensors)
        except ConversionError:
            return False
    return False


def guess_kind(storage: Store, files: list[str], subdirs: list[str]) -> str:
    """base, adapter or unknown, from the file names (and, without configs, the first file's tensor names)."""
    weights = [f for f in files if f.endswith(".safetensors")]
    if ADAPTER_CONFIG in files or any(f.startswith("adapter_model") for f in files):
        return ADAPTER
    if DCP_METADATA in files:
        return BASE
    if weights:
        return ADAPTER if _peek_is_lora(storage, weights) else BASE
    if "config.json" in files or any(OTHER_WEIGHTS.search(f) for f in files):
        return BASE
    ckpts = checkpoint_dirs(subdirs)
    if ckpts:
        inner, _ = storage.list_dir(ckpts[-1])
        return ADAPTER if ADAPTER_CONFIG in inner else (BASE if "config.json" in inner else UNKNOWN)
    if subdir_adapters(storage, subdirs):
        return ADAPTER
    return UNKNOWN


# ---------------------------------------------------------------- base checkpoints
def inspect_base(storage: Store, files: list[str], subdirs: list[str], report: Report,
                 base_config: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
    """Classify a base checkpoint: container, family, per-layer expert layout, E, and the conversions that apply.
    `base_config`: the model's config.json for a checkpoint without one (a trainer's)."""
    verdict = report.verdict
    where = storage.display()
    if not any(f.endswith(".safetensors") for f in files) and DCP_METADATA not in files:
        _refuse_without_weights(storage, files, subdirs, verdict)
        return
    try:
        ckpt = open_checkpoint(storage)
    except ConversionError as exc:
        verdict.refuse("invalid", str(exc))
        return
    _describe_container(ckpt, report)
    if base_config:
        ckpt.config = read_base_config(base_config, storage_options)
    if not ckpt.config:
        verdict.refuse("no_config", f"{where}: no config.json: the model family and the number of experts are unknown"
                       + (" (a trainer's checkpoint: pass the model's config.json with --base-config)"
                          if ckpt.container != "safetensors" else ""))
        return
    try:
        ckpt, family, own_layouts, groups = _expert_layers(storage, ckpt, report)
    except ConversionError as exc:
        verdict.refuse("unsupported", str(exc))
        return
    if not groups:
        verdict.refuse("no_experts", f"{where}: no {family.name} expert tensors found (a dense model, or other key names)")
        return
    _describe_groups(report, groups)
    layouts = [g.layout for g in groups]
    unread = unread_per_expert(family)
    report.conversions += _base_conversions(own_layouts, layouts, unread is not None)
    report.quantization = _quantization(ckpt.config, family, groups)
    if report.quantization.get("dequantize"):
        report.conversions.append("--dtype bf16|fp16|fp32 (dequantize while converting)")
    by_layout = Counter(layouts)
    report.verdict.outcome = CONVERTED
    verdict.add(
        "base_" + ("mixed" if len(by_layout) > 1 else layouts[0]),
        f"{family.name} checkpoint, E={report.num_experts}, experts in "
        + ", ".join(f"{n} layer(s) {lay}" for lay, n in sorted(by_layout.items())),
    )
    if unread is not None:
        held = (", in which this checkpoint holds expert layers (fuse_experts writes the layout they read)"
                if PER_EXPERT in by_layout else "")
        verdict.note("unread_per_expert", f"no consumer reads the {unread.name} per-expert layout{held}; "
                                          f"{unread.source}: {unread.per_expert_note}")


def _refuse_without_weights(storage: Store, files: list[str], subdirs: list[str], verdict: Verdict) -> None:
    """Refuse a directory without safetensors or DCP weights: naming the checkpoints below it, its other weight
    files, or none."""
    where = storage.display()
    ckpts = checkpoint_dirs(subdirs)
    others = [f for f in files if OTHER_WEIGHTS.search(f)]
    if ckpts:
        verdict.refuse("checkpoints_only", f"{where}: no weights at the top level, only {', '.join(d + '/' for d in ckpts)}; "
                       f"inspect one, e.g. `python -m convert.inspect {storage.display(ckpts[-1])}`")
    elif others:
        verdict.refuse("bin_only", f"{where}: no safetensors file, only {', '.join(others)}: "
                       "save the checkpoint as safetensors first (`save_pretrained(..., safe_serialization=True)`)")
    else:
        verdict.refuse("no_weights", f"{where}: no weight files")


def _describe_container(ckpt: Checkpoint, report: Report) -> None:
    """The report's tensor counts, files (with the tensors each holds) and container; the checkpoint's skipped
    files and training state as notes."""
    report.count_tensors({n: r.info for n, r in ckpt.tensors.items()})
    held = Counter(r.file for r in ckpt.tensors.values())  # a chunked tensor counts in each file holding a chunk
    for t in ckpt.chunked.values():
        held.update({c.file for c in t.chunks})
    report.files = {n: held[n] for n in sorted(ckpt.headers)}
    report.container = ckpt.container
    if ckpt.chunked:
        report.container += f" ({len(ckpt.chunked)} of {len(ckpt.tensors)} tensors saved in chunks)"
    for what in ckpt.skipped:
        report.verdict.note("skipped_files", f"{what}")
    for what in ckpt.notes:
        report.verdict.note("training_state", f"{what}")


def _expert_layers(storage: Store, ckpt: Checkpoint,
                   report: Report) -> tuple[Checkpoint, Family, tuple[str, ...], list[ExpertGroup]]:
    """(the checkpoint read in HF names, its family with its quantization companions, the layouts --layout offers,
    its expert layers), the report's family, names and E filled in; raises ConversionError where the family or E
    cannot be told."""
    family = detect_family(ckpt.config, storage.display("config.json"))
    report.family, report.family_source = family.name, find_family(ckpt.config)[1]
    own_layouts = family.layouts  # --layout choices (a naming's layouts are written through --names)
    ckpt, family, view = apply_source_naming(ckpt, family)  # a trainer's names read as HF names
    report.names = view.naming.name if view.naming else HF
    for line in view.notes():
        report.verdict.note("trainer_names", line)
    family = family.with_companions(family.companions_in(ckpt.tensors))
    report.num_experts = family.num_experts(ckpt.config, storage.display("config.json"))
    groups, _ = find_expert_groups(ckpt, family, report.num_experts)
    return ckpt, family, own_layouts, groups


def _describe_groups(report: Report, groups: list[ExpertGroup]) -> None:
    """The report's layout, expert layers, tensor kinds and one entry per expert layer."""
    report.layout = _set_layout([g.layout for g in groups])
    report.layers["experts"] = sorted(x for x in (layer_of(g.prefix) for g in groups) if x is not None)
    report.categories = {"expert": sum(len(g.per_expert) + len(g.fused) for g in groups)}
    report.categories["other"] = report.tensors - report.categories["expert"]
    for g in groups:
        report.groups.append({
            "prefix": g.prefix, "layer": layer_of(g.prefix), "layout": g.layout, "num_experts": g.num_experts,
            "shapes": {r: list(s) for r, s in g.role_shape.items()}, "dtypes": sorted(set(g.role_dtype.values())),
        })


def _base_conversions(own_layouts: tuple[str, ...], layouts: list[str], unread: bool) -> list[str]:
    """The layout conversions of a checkpoint whose expert layers are in `layouts`: to each of `own_layouts` not
    every layer is in (per-expert only with the flag where `unread`: no consumer reads it)."""
    out: list[str] = []
    for target in own_layouts:
        if all(lay == target for lay in layouts):
            continue
        if target == PER_EXPERT and unread:  # refused without the flag (convert.plan.readers)
            out.append(f"split_experts {ALLOW_FLAG} -> per-expert (no consumer reads it)")
            continue
        out.append("split_experts -> per-expert" if target == PER_EXPERT else f"fuse_experts --layout {target}")
    return out


def _quantization(config: dict[str, Any], family: Any, groups: list[Any]) -> dict[str, Any]:
    """What config.json's quantization_config and the expert tensors say about quantization ({} when none)."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) and not family.companion_roles:
        return {}
    q = q if isinstance(q, dict) else {}
    scale_dtypes = sorted({g.role_dtype[r] for g in groups for r in family.companion_roles if r in g.role_dtype})
    out: dict[str, Any] = {"method": q.get("quant_method"), "block_size": q.get("weight_block_size"),
                           "scale_dtypes": scale_dtypes,
                           "scales": sorted({r.split("_", 1)[1] for r in family.companion_roles})}
    if q.get("quant_method") == "mxfp4":
        out.update(block_size=[1, 32], scale_dtypes=["U8 (E8M0)"], scales=["blocks", "scales"])
    out["dequantize"] = bool(family.companion_roles) or family.dequantize is not None  # --dtype dequantizes
    return out


# ---------------------------------------------------------------- adapters
def inspect_adapter(
    storage: Store, report: Report, base_config_path: str | None, storage_options: dict[str, Any] | None,
    only_file: str | None = None,
) -> None:
    """Classify an adapter directory: directory cases, non-LoRA cases, expert-LoRA pattern, pass-through kinds."""
    verdict = report.verdict
    adir = open_adapter_dir(storage, verdict, only_file)
    report.config = {k: adir.config[k] for k in CONFIG_KEYS if k in adir.config}
    report.files = dict(sorted(adir.file_tensors.items()))
    report.count_tensors(adir.tensors)
    if verdict.outcome == REFUSED or check_not_lora(adir, verdict):
        return
    base_config, source = find_base_config(adir, base_config_path, storage_options, storage.settings)
    family, how = adapter_family(base_config, source, adir.tensors, adir.config)
    report.family, report.family_source = (family.name if family else None), how
    if family and base_config:
        try:
            report.num_experts = family.num_experts(base_config, source)
        except ConversionError:
            pass
    try:
        groups, others = detect_expert_lora(adir.tensors, adir.config, base_config, storage.display(), packings=True)
    except ConversionError as exc:
        verdict.refuse("invalid_expert_lora", str(exc))
        return
    _describe_adapter(adir, report, groups, others, base_config)
    src = None
    if only_file is None:
        try:
            src = open_adapter(storage.url, base_config_path, storage_options, storage.settings)
        except ConversionError:
            src = None  # what stops it is reported above; no fix is planned
    report.servers = target_verdicts(report.family, adir.config, adir.tensors, adir.files, report.num_experts,
                                     (base_config or {}).get("model_type"), storage.display(), groups, src,
                                     base_config_path)
    _packing_verdicts(report, groups, storage.display())


def _packing_verdicts(report: Report, groups: list[Any], where: str) -> None:
    """Peft wrappers packed otherwise than peft 0.21 reads them (older shapes, expert-major lora_B): the
    producer-level layout and the command that reads it exactly (per target: `servers`)."""
    odd = odd_packings(groups)
    if not odd:
        return
    report.verdict.add("expert_lora_packing", f"expert LoRA packed as {odd[0].producer} on layers "
                       f"{format_layers(_layers(odd))}: "
                       f"servers and peft read peft 0.21's packing; fix: {packing_fix(where)}")


def _layers(groups: list[Any]) -> list[int]:
    """The layers of the expert groups `groups` that sit in a numbered layer (in the groups' order)."""
    return [x for x in (layer_of(g.prefix) for g in groups) if x is not None]


def _describe_adapter(adir: AdapterDir, report: Report, groups: list[Any], others: list[str],
                      base_config: dict[str, Any] | None) -> None:
    verdict = report.verdict
    sorted_others = sort_others(adir.tensors, others)
    expert_layers = sorted(_layers(groups))
    report.categories = {"expert_lora": sum(len(g.tensors) for g in groups), **dict(sorted(sorted_others.counts.items()))}
    report.layers["experts"] = expert_layers
    for kind, layers in sorted(sorted_others.layers.items()):
        report.layers[kind] = sorted(layers)
    report.ranks = {leaf: sorted(r) for leaf, r in sorted(sorted_others.ranks.items())}
    if groups:
        expert_ranks: dict[str, set[int]] = {}
        for g in groups:
            for role, r in g.role_rank:
                expert_ranks.setdefault(f"experts.{role}", set()).add(r)
        report.ranks = {**{k: sorted(v) for k, v in expert_ranks.items()}, **report.ranks}
        report.pattern = _set_layout([g.pattern for g in groups])
        experts = sorted({g.num_experts for g in groups})
        report.num_experts = experts[0] if len(experts) == 1 else report.num_experts
    for g in groups:
        report.groups.append({
            "prefix": g.prefix, "layer": layer_of(g.prefix), "pattern": g.pattern, "num_experts": g.num_experts,
            "rank": g.rank, "roles": list(g.roles), "dtypes": list(g.dtypes), "tensors": len(g.tensors),
            **({"producer": g.producer} if g.producer else {}),
        })
    report.producers = list(dict.fromkeys(g.producer or g.pattern for g in groups))

    to_convert = [g for g in groups if g.pattern != PER_EXPERT]
    per_expert = [g for g in groups if g.pattern == PER_EXPERT]
    for pattern in sorted({g.pattern for g in to_convert}):
        gs = [g for g in to_convert if g.pattern == pattern]
        verdict.add(
            "expert_lora",
            f"expert LoRA, pattern {pattern}: E={_one(g.num_experts for g in gs)}, per-expert rank "
            f"{_one(g.rank for g in gs)}, roles {'/'.join(gs[0].roles)}, on layers "
            f"{format_layers(_layers(gs))}: "
            "split_adapter converts it to per-expert",
        )
    if per_expert:
        verdict.add(
            "per_expert",
            f"expert LoRA already per-expert: E={_one(g.num_experts for g in per_expert)}, rank "
            f"{_one(g.rank for g in per_expert)}, on layers "
            f"{format_layers(_layers(per_expert))}: "
            "split_adapter passes it through unchanged; fuse_adapter can fuse it",
        )
    for kind, count in sorted(sorted_others.counts.items()):
        modules = ", ".join(sorted(sorted_others.modules[kind]))
        kind_layers = sorted_others.layers.get(kind)
        on = f" on layers {format_layers(kind_layers)}" if kind_layers else ""
        verdict.add(kind, f"{KIND_TEXT[kind]} ({modules}; {count} tensors){on}: passed through unchanged")

    if to_convert:
        verdict.outcome = CONVERTED
        report.conversions.append(SPLIT_ADAPTER)
    else:
        verdict.outcome = PASSED_THROUGH
        if per_expert:
            report.conversions += [f"fuse_adapter --layout {lay}" for lay in FUSE_ADAPTER_LAYOUTS]
        else:
            verdict.reasons.append("no expert LoRA: nothing to convert (split_adapter would copy every tensor unchanged)")

    if groups:
        total = base_config.get("num_hidden_layers") if isinstance(base_config, dict) else None
        reference = set(range(total)) if isinstance(total, int) else set(report.layers.get("all", []))
        if set(expert_layers) < reference:
            verdict.note(
                "partial_layers",
                f"expert LoRA on layers {format_layers(expert_layers)} only (of {format_layers(reference)}); "
                "still convertible: the other layers have no expert LoRA",
            )
    floats = [d for d in report.dtypes if d in ("F32", "BF16", "F16", "F64")]
    if len(floats) > 1:
        kinds_by_dtype: dict[str, set[str]] = {}
        expert_names = {n for g in groups for n in g.tensors}
        for name, info in adir.tensors.items():
            kind = "expert LoRA" if name in expert_names else ("other LoRA" if is_lora(name) else "full tensors")
            kinds_by_dtype.setdefault(info.dtype, set()).add(kind)
        verdict.note(
            "mixed_dtypes",
            "mixed dtypes: " + ", ".join(
                f"{d} ({report.dtypes[d]} tensors: {', '.join(sorted(kinds_by_dtype[d]))})" for d in floats
            ) + "; each tensor keeps its dtype unless --dtype is given",
        )


def _one(values: Any) -> str:
    distinct = sorted(set(values))
    return str(distinct[0]) if len(distinct) == 1 else "/".join(str(v) for v in distinct)


# ---------------------------------------------------------------- entry
class PathError(Exception):
    """PATH (or --base-config) does not exist or cannot be read."""


def inspect_path(path: str, base_config: str | None = None, storage_options: dict[str, Any] | None = None,
                 settings: StorageSettings | None = None) -> Report:
    """Inspect the checkpoint or adapter at `path` (a directory, a .safetensors file, or an fsspec URL).

    `base_config`: the base model's config.json for an adapter (path or URL). `settings`: the store settings
    every store it opens gets (main reads them from the environment; None: the defaults). Returns the Report;
    raises PathError when `path` or `base_config` does not exist or cannot be read.
    """
    try:
        storage = Storage(path, storage_options, settings)
        if not storage.exists():
            raise PathError(f"{path}: does not exist")
        if base_config and not Storage(base_config, storage_options, settings).exists():
            raise PathError(f"--base-config {base_config}: does not exist")
        report = Report(path)
        only_file = None
        if not storage.isdir():
            parent, name = posixpath.split(path.rstrip("/"))
            if not name.endswith(".safetensors"):
                report.verdict.refuse("not_a_checkpoint", f"{path}: is a file, not a directory or a .safetensors file")
                return report
            storage, only_file = Storage(parent or ".", storage_options, settings), name
        files, subdirs = storage.list_dir()
        try:
            _dispatch(storage, files, subdirs, report, base_config, storage_options, only_file)
        except ConversionError as exc:  # anything malformed that the steps above did not name a case for
            report.verdict.refuse("invalid", str(exc))
        return report
    except (StorageError, ConversionError) as exc:  # permissions, an unreachable store, no credentials, no such protocol
        raise PathError(str(exc)) from exc
    except OSError as exc:
        raise PathError(f"{path}: cannot be read ({describe(exc)})") from exc


def _dispatch(storage: Store, files: list[str], subdirs: list[str], report: Report, base_config: str | None,
              storage_options: dict[str, Any] | None, only_file: str | None) -> None:
    report.kind = guess_kind(storage, [only_file] if only_file else files, subdirs)
    if report.kind == ADAPTER:
        inspect_adapter(storage, report, base_config, storage_options, only_file)
    elif report.kind == BASE and not only_file:
        inspect_base(storage, files, subdirs, report, base_config, storage_options)
    elif report.kind == BASE and only_file:
        header = read_header(storage, only_file)
        report.count_tensors(header.tensors)
        report.files = {only_file: len(header.tensors)}
        report.verdict.refuse("single_file", f"{storage.display(only_file)}: one file of a base checkpoint; "
                              "inspect its directory")
    else:
        listing = ", ".join(files + [d + "/" for d in subdirs]) or "an empty directory"
        report.verdict.refuse("no_weights", f"{storage.display()}: neither a checkpoint nor an adapter ({listing})")


def render_text(report: Report) -> str:
    """The human-readable form of a report."""
    lines = [f"{report.path}: {report.kind}"]
    lines += _config_lines(report.config)
    lines += _summary_lines(report)
    lines += _group_lines(report.groups)
    if report.quantization:
        lines.append(_quantization_line(report.quantization))
    lines += _outcome_lines(report)
    lines += _server_lines(report.servers)
    return "\n".join(lines)


def _config_lines(c: dict[str, Any]) -> list[str]:
    """An adapter's adapter_config.json keys (`c`, the report's config) as lines ([] without one)."""
    if not c:
        return []
    lines = ["  adapter_config: " + ", ".join(f"{k}={json.dumps(c[k])}" for k in
                                              ("peft_type", "r", "lora_alpha", "use_rslora") if k in c)]
    lines += [f"    {key}: {json.dumps(c[key])}" for key in ("target_modules", "target_parameters", "modules_to_save")
              if c.get(key)]
    return lines


def _summary_lines(report: Report) -> list[str]:
    """The lines of what the report found that it has: family, container, layout, names, pattern, producers, E,
    ranks, tensors and files, kinds, dtypes, layers."""
    lines: list[str] = []
    if report.family or report.family_source:
        lines.append(f"  family: {report.family or 'unknown'} ({report.family_source})")
    named = (("container", report.container), ("layout", report.layout), ("names", report.names),
             ("pattern", report.pattern))
    lines += [f"  {label}: {value}" for label, value in named if value]
    lines += [f"  producer layout: {producer}" for producer in report.producers]
    if report.num_experts is not None:
        lines.append(f"  experts (E): {report.num_experts}")
    if report.ranks:
        lines.append("  ranks: " + ", ".join(f"{m} {'/'.join(map(str, r))}" for m, r in report.ranks.items()))
    if report.files:
        lines.append(f"  tensors: {report.tensors} in {len(report.files)} file(s): "
                     + ", ".join(f"{f} ({n})" for f, n in report.files.items()))
    if report.categories:
        lines.append("  kinds: " + ", ".join(f"{k} {n}" for k, n in report.categories.items() if n))
    if report.dtypes:
        lines.append("  dtypes: " + ", ".join(f"{d} x{n}" for d, n in report.dtypes.items()))
    lines += [f"  layers ({key}): {format_layers(layers)}" for key, layers in report.layers.items() if layers]
    return lines


def _group_lines(groups: list[dict[str, Any]]) -> list[str]:
    """One line per expert group outside a numbered layer, then one per distinct description with its layers."""
    lines: list[str] = []
    runs: dict[str, list[int]] = {}  # one line per distinct group description, with its layers
    for g in groups:
        detail = f"rank {g['rank']}, roles {'/'.join(g['roles'])}" if "rank" in g else \
            ", ".join(f"{r} {s}" for r, s in g["shapes"].items())
        desc = f"{g.get('pattern') or g.get('layout')}, E={g['num_experts']}, {detail}"
        if g["layer"] is None:
            lines.append(f"    {g['prefix']}: {desc}")
        else:
            runs.setdefault(desc, []).append(g["layer"])
    return lines + [f"    layers {format_layers(layers)}: {desc}" for desc, layers in runs.items()]


def _quantization_line(qz: dict[str, Any]) -> str:
    """The report's quantization (`qz`) as one line."""
    block = "x".join(map(str, qz["block_size"])) if qz.get("block_size") else "?"
    return (f"  quantization: {qz.get('method')}, blocks {block}, scales {'/'.join(qz['scale_dtypes']) or '?'}"
            f" ({', '.join(qz['scales'])}); lossless conversions keep it"
            + ("; --dtype dequantizes" if qz.get("dequantize") else "; --dtype refused"))


def _outcome_lines(report: Report) -> list[str]:
    """The outcome with its cases, the conversions that apply, the reasons and the notes."""
    lines = [f"  outcome: {report.verdict.outcome}  [{', '.join(report.verdict.cases)}]"]
    if report.conversions:
        lines.append("  conversions:")
        lines += [f"    {c}" for c in report.conversions]
    else:
        lines.append("  conversions: none")
    lines += [f"  reason: {r}" for r in report.verdict.reasons]
    lines += [f"  note: {n}" for n in report.verdict.notes]
    return lines


def _server_lines(servers: dict[str, dict[str, Any]]) -> list[str]:
    """What each server makes of the path as it is (the report's `servers`; [] without any)."""
    if not servers:
        return []
    lines = ["  servers (as is; docs/SERVERS.md):"]
    for name, v in servers.items():
        lines.append(f"    {name}: {words(v)}  [{v['as_is']}]")
        lines += [f"      drops: {m}" for m in v.get("drops", [])]
        lines += [f"      refused: {m}" for m in v["refusals"]]
        lines += [f"      warning: {m}" for m in v["warnings"]]
        lines += [f"      fix: {v['fix']}"] if v.get("fix") else []
        lines += [f"      no fix: {v['no_fix']}"] if v.get("no_fix") else []
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse flags, inspect PATH, print the report; returns the exit code (0 read, 2 unreadable)."""
    p = ToolParser(prog="convert.inspect", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    p.add_argument("path", help="checkpoint or adapter directory, a .safetensors file, or an fsspec URL")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--base-config", default=None, help="the base model's config.json (for adapters)")
    p.add_argument("--storage-options", type=json_object, default={}, help="JSON of fsspec options")
    args = p.parse_args(argv)
    settings = Settings.from_env()  # the stores' knobs (settings.storage): read once, as the inspection starts

    def run() -> int:
        try:
            report = inspect_path(args.path, args.base_config, args.storage_options, settings.storage)
        except PathError as exc:
            if args.json:
                print(json.dumps({"path": args.path, "kind": UNKNOWN, "outcome": "error", "reasons": [str(exc)]}))
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(report.as_json(), indent=2) if args.json else render_text(report))
        return 0

    return run_guarded(run)
