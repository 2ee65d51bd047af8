"""What an adapter directory holds, before and around its expert LoRA.

Reads listings, adapter_config.json and safetensors headers only (never tensor data), and
names each case of FORMATS.md "What an adapter directory can hold that is not expert LoRA":
the directory-level ones (config only, checkpoint-N folders only, .bin only, zero-tensor
files, several adapters in several files), the tensor-level ones that are not LoRA (prefix
tuning, full model weights, other peft types), and the kinds of tensors that pass through
(attention LoRA, router LoRA, modules_to_save tensors).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ConversionError
from convert.families import Family, detect_family, load_families, representative, template_regex
from convert.formats.adapter_layouts import guess_family
from convert.formats.checkpoint import OTHER_WEIGHTS, open_checkpoint
from convert.formats.safetensors import FileHeader, TensorInfo, read_header
from convert.io.storage import Storage, Store, read_json
from convert.settings import StorageSettings

ADAPTER_CONFIG = "adapter_config.json"
CONVERTED, PASSED_THROUGH, REFUSED = "converted", "passed_through", "refused"
# peft's prompt-learning methods: their weights are virtual-token embeddings, not LoRA.
PROMPT_LEARNING = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CARTRIDGE"}
# peft's factor names, and grouped-native ones such as NeMo's `lora_gate_and_up_A` / `lora_down_B`.
LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|lora_[a-z_]+_[AB])(\.|$)")
PROMPT_NAME = re.compile(r"(^|\.)(prompt_embeddings|prefix_task_cols|prefix_task_rows|prefix_task|prompt_encoder|adaption_prompt)")
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
ATTENTION_PARTS = ("attn", "attention")
ROUTER_LEAVES = ("gate", "router")


@dataclass
class Verdict:
    """The named cases found, the outcome they lead to, and the sentences that explain it."""

    outcome: str | None = None
    cases: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def refuse(self, case: str, reason: str) -> None:
        """Record a case that makes the whole directory unconvertible."""
        self.outcome = REFUSED
        self.add(case, reason)

    def add(self, case: str, reason: str) -> None:
        """Record a case and the reason it leads to the outcome."""
        if case not in self.cases:
            self.cases.append(case)
        self.reasons.append(reason)

    def note(self, case: str, text: str) -> None:
        """Record a case that does not change the outcome (reported only)."""
        if case not in self.cases:
            self.cases.append(case)
        self.notes.append(text)


@dataclass
class AdapterDir:
    """The adapter's files and tensors (merged over its weight files)."""

    storage: Store
    files: list[str]
    subdirs: list[str]
    config: dict[str, Any]
    weight_files: list[str] = field(default_factory=list)
    file_tensors: dict[str, int] = field(default_factory=dict)  # weight file -> tensor count
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


def layer_of(name: str) -> int | None:
    """The layer index of a tensor or module name: its first all-digit path component."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def format_layers(layers: list[int] | set[int]) -> str:
    """Sorted layer numbers with runs compressed: [0, 1, 2, 7] -> "0-2, 7"."""
    out: list[str] = []
    values = sorted(set(layers))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


def checkpoint_dirs(subdirs: list[str]) -> list[str]:
    """The `checkpoint-N` subfolders, by step."""
    found = [m for m in map(CHECKPOINT_DIR.match, subdirs) if m]
    return [m.string for m in sorted(found, key=lambda m: int(m[1]))]


def is_lora(name: str) -> bool:
    """True for a LoRA factor (lora_A/B, embedding A/B, DoRA magnitude) of any module."""
    return bool(LORA_PART.search(name))


def lora_module(name: str) -> str:
    """The module a LoRA tensor belongs to: the name before `.lora_*`."""
    m = LORA_PART.search(name)
    return name[: m.start()] if m else name


def lora_kind(name: str) -> str:
    """attention_lora, router_lora or other_lora, from the module path of a LoRA tensor."""
    parts = lora_module(name).split(".")
    if any(a in p for p in parts for a in ATTENTION_PARTS):
        return "attention_lora"
    if parts and parts[-1] in ROUTER_LEAVES:
        return "router_lora"
    return "other_lora"


def subdir_adapters(storage: Store, subdirs: list[str]) -> list[str]:
    """Subfolders (not checkpoint-N) that hold an adapter of their own (peft saves extra adapters so)."""
    out = []
    for d in subdirs:
        if d.startswith(".") or CHECKPOINT_DIR.match(d):
            continue
        if storage.exists(posixpath.join(d, ADAPTER_CONFIG)):
            out.append(d)
    return out


def _read_config(storage: Store, verdict: Verdict) -> dict[str, Any]:
    try:
        config = read_json(storage, ADAPTER_CONFIG)
    except ConversionError as exc:
        verdict.refuse("invalid", str(exc))
        return {}
    if not isinstance(config, dict):
        verdict.refuse("invalid", f"{storage.display(ADAPTER_CONFIG)}: is not a JSON object")
        return {}
    return config


def open_adapter_dir(storage: Store, verdict: Verdict, only_file: str | None = None) -> AdapterDir:
    """List the adapter directory at `storage`'s root and read its config and safetensors headers.

    `only_file` restricts the weights to that one safetensors file. Directory-level cases are
    recorded in `verdict`; when one refuses, the returned AdapterDir holds what was read so far.
    """
    files, subdirs = storage.list_dir()
    config = _read_config(storage, verdict) if ADAPTER_CONFIG in files else {}
    adir = AdapterDir(storage, files, subdirs, config)
    if verdict.outcome == REFUSED:
        return adir
    where = storage.display()
    ckpts = checkpoint_dirs(subdirs)
    indexes = [f for f in files if f.endswith(".safetensors.index.json")]
    weights = [only_file] if only_file else [f for f in files if f.endswith(".safetensors")]
    if not weights:
        others = [f for f in files if OTHER_WEIGHTS.search(f)]
        nested = subdir_adapters(storage, subdirs)
        if ckpts:
            last = ckpts[-1]
            verdict.refuse(
                "checkpoints_only",
                f"{where}: no adapter weights at the top level, only training checkpoint folders "
                f"{', '.join(d + '/' for d in ckpts)}; inspect one of them, e.g. "
                f"`python -m convert.inspect {storage.display(last)}`",
            )
        elif others:
            bins = ", ".join(others)
            verdict.refuse(
                "bin_only",
                f"{where}: no safetensors file, only {bins}: pickled weights are not read (unsafe to load, "
                "cannot be streamed); save them as safetensors first (e.g. "
                "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')`)",
            )
        elif nested:
            verdict.refuse(
                "multiple_adapters",
                f"{where}: no adapter weights at the top level; the subfolders {', '.join(d + '/' for d in nested)} "
                f"each hold an adapter: inspect them one at a time, e.g. "
                f"`python -m convert.inspect {storage.display(nested[0])}`",
            )
        elif ADAPTER_CONFIG in files:
            verdict.refuse(
                "config_only",
                f"{where}: holds only {ADAPTER_CONFIG} (and no weights): there is nothing to convert "
                "(were the weights not uploaded?)",
            )
        else:
            verdict.refuse("no_weights", f"{where}: no weight files ({', '.join(files) or 'empty directory'})")
        return adir

    if indexes and not only_file:
        # A sharded adapter: the index names its files (same validation as a base checkpoint).
        try:
            ckpt = open_checkpoint(storage, index_name=indexes[0])
        except ConversionError as exc:
            verdict.refuse("invalid", str(exc))
            return adir
        adir.weight_files = sorted(ckpt.headers)
        adir.file_tensors = {n: len(h.tensors) for n, h in ckpt.headers.items()}
        adir.tensors = {name: ref.info for name, ref in ckpt.tensors.items()}
        return adir

    headers: dict[str, FileHeader] = {}
    for name in weights:
        try:
            headers[name] = read_header(storage, name)
        except ConversionError as exc:
            verdict.refuse("invalid", f"{storage.display(name)}: {exc}" if name not in str(exc) else str(exc))
            return adir
    adir.file_tensors = {n: len(h.tensors) for n, h in headers.items()}
    empty = [n for n, h in headers.items() if not h.tensors]
    full = [n for n, h in headers.items() if h.tensors]
    if not full:
        verdict.refuse(
            "zero_tensors",
            f"{where}: {', '.join(empty)} hold{'s' if len(empty) == 1 else ''} 0 tensors: "
            "an empty or incomplete upload, nothing to convert",
        )
        return adir
    if empty:
        verdict.note("zero_tensors", f"{', '.join(empty)}: 0 tensors (ignored)")
    if len(full) > 1:
        names = ", ".join(f"{n} ({len(headers[n].tensors)} tensors)" for n in full)
        verdict.refuse(
            "multiple_adapters",
            f"{where}: {len(full)} weight files and no index tying them together: {names}. These are several "
            "adapters (or shards without their *.safetensors.index.json); convert one at a time: put each file "
            f"with {ADAPTER_CONFIG} in its own directory as adapter_model.safetensors, or inspect one with "
            f"`python -m convert.inspect {storage.display(full[0])}`",
        )
        return adir
    adir.weight_files = full
    adir.tensors = dict(headers[full[0]].tensors)
    ignored = [f for f in files if OTHER_WEIGHTS.search(f)]
    if ignored and not only_file:
        verdict.note("other_weight_files", f"{', '.join(ignored)}: weights in another format, ignored")
    if ckpts:
        verdict.note("checkpoint_dirs", f"also holds training checkpoints {', '.join(d + '/' for d in ckpts)} (not inspected)")
    return adir


def check_not_lora(adir: AdapterDir, verdict: Verdict) -> bool:
    """Refuse what is not LoRA: prompt learning, other peft methods, full model weights. True if refused."""
    where = adir.storage.display()
    peft_type = str(adir.config.get("peft_type") or "").upper()
    names = sorted(adir.tensors)
    lora = [n for n in names if is_lora(n)]
    prompt = [n for n in names if PROMPT_NAME.search(n)]
    if peft_type in PROMPT_LEARNING or (not lora and prompt and len(names) <= 2):
        shapes = ", ".join(f"{n} {list(adir.tensors[n].shape)}" for n in names[:2])
        verdict.refuse(
            "prefix_tuning",
            f"{where}: a prompt-learning adapter ({peft_type or 'no peft_type'}; {len(names)} tensor(s): {shapes}), "
            "not LoRA: it has no expert weights to convert; serve it as is",
        )
        return True
    if peft_type and peft_type != "LORA":
        verdict.refuse(
            "not_lora",
            f"{where}: peft_type {peft_type} is not LORA; only LoRA adapters (lora_A/lora_B) are converted",
        )
        return True
    if not lora:
        weights = ", ".join(adir.weight_files)
        example = ", ".join(repr(n) for n in names[:3])
        verdict.refuse(
            "full_weights",
            f"{where}: {weights} holds {len(names)} tensors and none is LoRA (no lora_A/lora_B; e.g. {example}): "
            "these are model weights under an adapter name, not an adapter. If they are a whole checkpoint, "
            "give it its config.json and use convert.fuse_experts / convert.split_experts",
        )
        return True
    return False


@dataclass
class OtherTensors:
    """The tensors that are not expert LoRA, by kind: module names, ranks and layers of each kind."""

    counts: Counter[str] = field(default_factory=Counter)  # kind -> tensor count
    modules: dict[str, set[str]] = field(default_factory=dict)  # kind -> module leaf names
    ranks: dict[str, set[int]] = field(default_factory=dict)  # module leaf -> ranks
    layers: dict[str, set[int]] = field(default_factory=dict)  # kind -> layers


def sort_others(tensors: dict[str, TensorInfo], others: list[str]) -> OtherTensors:
    """Sort the non-expert tensors into attention/router/other LoRA and modules_to_save full tensors."""
    out = OtherTensors()
    for name in others:
        info = tensors[name]
        if is_lora(name):
            kind = lora_kind(name)
            module = lora_module(name)
            leaf = module.split(".")[-1]
            if ".lora_A." in name + "." and len(info.shape) == 2:
                out.ranks.setdefault(leaf, set()).add(info.shape[0])
        else:
            kind = "modules_to_save"
            leaf = ".".join(p for p in name.split(".")[-2:-1] if not p.isdigit()) or name.split(".")[-1]
        out.counts[kind] += 1
        out.modules.setdefault(kind, set()).add(leaf)
        layer = layer_of(name)
        if layer is not None:
            out.layers.setdefault(kind, set()).add(layer)
    return out


def find_base_config(
    adir: AdapterDir, base_config_path: str | None, storage_options: dict[str, Any] | None,
    settings: StorageSettings | None = None,
) -> tuple[dict[str, Any] | None, str]:
    """The base model's config.json for an adapter, and where it came from.

    In order: `--base-config`, a config.json next to the adapter, the adapter config's
    `base_model_name_or_path` when it is a local directory or in the local Hugging Face cache
    (never downloaded). Returns (None, "") when none is found. `settings`: the store settings the
    config's store is opened with (None: those of the adapter's store, `adir.storage.settings`).
    """
    settings = adir.storage.settings if settings is None else settings
    if base_config_path:
        parent, name = posixpath.split(base_config_path.rstrip("/"))
        store = Storage(parent or ".", storage_options, settings)
        return read_json(store, name), f"--base-config {base_config_path}"
    if "config.json" in adir.files:
        try:
            cfg = read_json(adir.storage, "config.json")
        except ConversionError:
            cfg = None  # a broken config.json next to the adapter is not the adapter's problem
        if isinstance(cfg, dict):
            return cfg, adir.storage.display("config.json")
    base = adir.config.get("base_model_name_or_path")
    if isinstance(base, str) and base:
        for candidate in _local_configs(base):
            try:
                return read_json(Storage(str(candidate.parent), None, settings), candidate.name), str(candidate)
            except (OSError, ConversionError):
                continue  # unreadable, too large, not UTF-8 or not JSON: try the next one
    return None, ""


def _local_configs(base: str) -> list[Path]:
    out = [Path(base) / "config.json"]
    if "/" in base and not base.startswith(("/", ".")):
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
        )
        repo = Path(hub) / ("models--" + base.replace("/", "--")) / "snapshots"
        if repo.is_dir():
            out += sorted(repo.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in out if p.is_file()]


def adapter_family(
    base_config: dict[str, Any] | None, config_source: str, tensors: dict[str, TensorInfo], adapter_config: dict[str, Any]
) -> tuple[Family | None, str]:
    """The model family of an adapter's base model, and how it was found (or why not).

    From the base config's model_type when there is one; else from adapter_config.json
    (convert.formats.adapter_layouts.guess_family); else from per-expert LoRA key names that only one
    family's templates (configs/families/*.json) produce. Returns (None, why) when undecided.
    """
    if base_config is not None:
        try:
            fam = detect_family(base_config, config_source)
        except ConversionError as exc:
            return None, str(exc)
        return fam, f"model_type {base_config.get('model_type')!r} in {config_source}"
    guess = guess_family(adapter_config, None, "")
    if guess.family is not None:
        return guess.family, guess.source
    families = load_families()
    matched = set()
    for fam in families.values():
        for tpl in fam.per_expert.values():
            if tpl.endswith(".weight"):
                rx = template_regex(tpl[: -len(".weight")] + ".lora_A.weight")
                if any(rx.match(n) for n in tensors):
                    matched.add(fam.name)
    rep = representative(matched)  # families that share these names and differ only in other tensors agree
    if rep is not None:
        return rep, "per-expert LoRA key names"
    return None, "unknown: no base config.json and adapter_config.json does not name it; pass --base-config"
