"""Open an adapter directory for conversion: its config, tensors (with their files) and the base config.

The directory-level cases (config only, checkpoint folders only, .bin only, zero tensors,
several adapters, prompt tuning, full weights under an adapter name) are decided by
convert.formats.adapter_dir, the same code `convert.inspect` reports with; any refusal there is a
ConversionError here, raised before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from convert.errors import ConversionError
from convert.formats.adapter_dir import (
    ADAPTER_CONFIG,
    REFUSED,
    Verdict,
    check_not_lora,
    find_base_config,
    open_adapter_dir,
)
from convert.formats.checkpoint import OTHER_WEIGHTS, TensorRef, open_checkpoint
from convert.formats.safetensors import TensorInfo
from convert.io.storage import Storage, StorageSettings, Store

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"


@dataclass
class AdapterSource:
    """Metadata of a source adapter: every tensor with its file, adapter_config.json, the base config."""

    storage: Store
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    base_config: dict[str, Any] | None
    base_config_source: str
    other_files: list[str]  # top-level files copied unchanged (README, tokenizer files, ...)
    notes: list[str] = field(default_factory=list)
    file_sizes: dict[str, int] = field(default_factory=dict)
    index_file: str | None = None

    @property
    def infos(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo of every tensor (what convert.formats.adapter_layouts reads)."""
        return {n: ref.info for n, ref in self.tensors.items()}

    def display(self, rel: str = "") -> str:
        """The source (or a file in it) as the user would write it, for messages."""
        return self.storage.display(rel)


def open_adapter(url: str, base_config: str | None, storage_options: dict[str, Any] | None,
                 settings: StorageSettings | None = None) -> AdapterSource:
    """Read the adapter at `url` (metadata only); raises ConversionError naming the file on refusal.

    `base_config`: path or URL of the base model's config.json (--base-config), optional. `settings`: the
    job's store settings (the defaults where None).
    """
    storage = Storage(url, storage_options, settings)
    if not storage.isdir():
        raise ConversionError(f"{storage.display()}: source is not a directory")
    verdict = Verdict()
    adir = open_adapter_dir(storage, verdict)
    if verdict.outcome != REFUSED and ADAPTER_CONFIG not in adir.files:
        verdict.refuse("no_config", f"{storage.display()}: has no {ADAPTER_CONFIG} (not a peft adapter directory)")
    if verdict.outcome != REFUSED:
        check_not_lora(adir, verdict)
    if verdict.outcome == REFUSED:
        raise ConversionError("; ".join(verdict.reasons))
    index = next((f for f in adir.files if f.endswith(".safetensors.index.json")), None)
    if index is None:
        name = adir.weight_files[0]
        tensors = {n: TensorRef(name, info) for n, info in adir.tensors.items()}
        sizes = {name: storage.size(name)}
    else:
        ckpt = open_checkpoint(storage, index_name=index)
        tensors = dict(ckpt.tensors)
        sizes = {n: h.file_size for n, h in ckpt.headers.items()}
    weights = set(adir.weight_files) | ({index} if index else set())
    notes = list(verdict.notes)
    other = []
    for f in adir.files:
        if f in weights or f == ADAPTER_CONFIG or f.startswith("."):
            continue
        if f.endswith(".safetensors") or f.endswith(".safetensors.index.json") or OTHER_WEIGHTS.search(f):
            notes.append(f"skipped {f}: weights outside the adapter, not copied")
        else:
            other.append(f)
    notes += [f"skipped {d}/: subdirectory, not copied" for d in adir.subdirs if not d.startswith(".")]
    cfg, source = find_base_config(adir, base_config, storage_options)
    if base_config and not isinstance(cfg, dict):
        raise ConversionError(f"--base-config {base_config}: not a JSON object")
    return AdapterSource(storage, adir.config, tensors, cfg, source, other, notes, sizes, index)
