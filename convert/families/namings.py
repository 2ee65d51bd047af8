"""Trainer namings as data (configs/namings/*.json): the tensor names and fused layouts a trainer saves.

A trainer with expert parallelism (torchtitan, NeMo AutoModel, Megatron) saves its own names: a naming
file maps them to the names of the model's Hugging Face checkpoint ("HF names": what `save_pretrained`
writes for per-expert tensors, the family's fused templates for fused ones), per config.json
`model_type`. One entry renames one tensor, with numeric placeholders (`{L}`, `{e}`) anywhere in either
name (`linear_fc1.weight{e}`); an entry with several HF names says the trainer tensor is those tensors
joined along dim 0 (Megatron's fc1 = [gate; up]), in `sizes` shares (config keys or numbers; equal when
absent), and with `groups` (a config key or number), joined group by group: group g holds the g-th of
`groups` equal row blocks of each HF tensor, in order (Megatron's q/k/v interleaved per query group).
A trainer's fused expert layout that needs ops is a layout in the family-file format (`layouts`,
checked as a family file's), added to the family; `layout` names the one the trainer writes.

Input side (`source_view`): a pure function of the tensor names, shapes and byte ranges. It detects the
naming from the names and gives every tensor under its HF name, a dim-0 part of a joined tensor as a
narrower byte range; a part held in several row blocks (groups > 1) is given as one tensor per block,
named `<HF name>#<g>` (joined back after planning: convert.plan.trainer_names.join_parts). Tensors the
naming lists in `skip` (load-balancing buffers) are left out and reported; a tensor the naming does not
place is refused. Output side (convert.plan.trainer_names.rename_plan): a plan's targets and writes renamed
to the trainer's names, joined parts written at their offsets. `hf_views` gives convert.verify both sides
under HF names. No model or projection is named in this module: the files do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ConversionError
from convert.families.family import PER_EXPERT, Family, FusedTensor, _pipeline
from convert.families.ops import config_value
from convert.families.schema import FusedSpec, parse

NAMINGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "namings"
HF = "hf"  # --names default: the Hugging Face names
PART = "#"  # `<HF name>#<g>`: row block g of an HF tensor held in several blocks by a trainer tensor
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


# --- the file format (strict, as the family files: convert.families.schema.parse) -----------------------

@dataclass(frozen=True)
class TensorSpec:
    """One trainer tensor and the HF tensor(s) it is."""

    trainer: str
    hf: str | list[str]
    sizes: list[int | str] | None = None  # shares of the HF tensors along dim 0 (default: equal)
    groups: int | str = 1  # joined group by group (config key or number)
    input_only: bool = False  # read, never written (another name of the same tensor is written)


@dataclass(frozen=True)
class ModelNamingSpec:
    """The naming of one model type."""

    tensors: list[TensorSpec] = field(default_factory=list)
    layout: str = PER_EXPERT  # the layout of the trainer's expert tensors (after renaming)
    layouts: dict[str, dict[str, FusedSpec]] = field(default_factory=dict)  # added to the family
    skip: dict[str, str] = field(default_factory=dict)  # name template (`*`: anything) -> why it has no counterpart
    passthrough: bool = False  # names no entry matches are HF names already
    source: str = ""  # what this was read from (framework release and files)


@dataclass(frozen=True)
class NamingSpec:
    """A whole naming file: `models` maps config.json model_type -> its naming."""

    naming: str
    description: str = ""
    models: dict[str, ModelNamingSpec] = field(default_factory=dict)


# --- built -------------------------------------------------------------------------------------------------

def _template(template: str, anything: bool = False) -> re.Pattern[str]:
    """`{name}` -> a decimal index (named group); with `anything`, `*` -> any text."""
    out, pos, seen = "", 0, set()
    for m in _PLACEHOLDER.finditer(template):
        part = re.escape(template[pos:m.start()])
        out += part.replace(r"\*", ".*") if anything else part
        key = m[1]
        out += f"(?P={key})" if key in seen else rf"(?P<{key}>0|[1-9]\d*)"
        seen.add(key)
        pos = m.end()
    rest = re.escape(template[pos:])
    out += rest.replace(r"\*", ".*") if anything else rest
    return re.compile(f"^{out}$")


def fill_template(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m[1]], template)


@dataclass(frozen=True)
class TensorMap:
    trainer: str
    hf: tuple[str, ...]
    sizes: tuple[int | str, ...] | None
    groups: int | str
    input_only: bool
    trainer_rx: re.Pattern[str] = field(compare=False)
    hf_rx: tuple[re.Pattern[str], ...] = field(compare=False)

    @property
    def renames(self) -> bool:
        """False for an entry that keeps the name (it does not tell a trainer checkpoint from an HF one)."""
        return self.hf != (self.trainer,)

    def shares(self, config: dict[str, Any], where: str) -> list[int]:
        return [s if isinstance(s, int) else config_value(config, s, where) for s in (self.sizes or [1] * len(self.hf))]

    def n_groups(self, config: dict[str, Any], where: str) -> int:
        return self.groups if isinstance(self.groups, int) else config_value(config, self.groups, where)


@dataclass(frozen=True)
class Naming:
    """A trainer's naming of one model type (built from a naming file)."""

    name: str
    source: str  # the naming file
    model_type: str
    description: str
    reference: str  # what it was read from
    tensors: tuple[TensorMap, ...]
    layout: str
    layouts: dict[str, dict[str, FusedSpec]]
    skip: tuple[tuple[re.Pattern[str], str, str], ...]  # (regex, template, why)
    passthrough: bool

    def layout_leaves(self) -> tuple[str, ...]:
        """The tensor names (inside the experts module) of the naming's own layouts."""
        return tuple(sorted({leaf for ts in self.layouts.values() for leaf in ts}))

    def skipped(self, name: str) -> str | None:
        """Why tensor `name` (either side's naming) has no counterpart, if the naming says so."""
        return next((why for rx, _, why in self.skip if rx.match(name)), None)

    def fits(self, family: Family) -> bool:
        """Whether this naming's layouts name only roles of `family`."""
        return all(p in family.role_leaves for ts in self.layouts.values() for t in ts.values() for p in t.parts)

    def with_layouts(self, family: Family) -> Family:
        """`family` with this naming's layouts added (checked as a family file's layouts are)."""
        if not self.layouts:
            return family
        fused = dict(family.fused)
        for layout, tensors in self.layouts.items():
            where = f"{self.source}: models.{self.model_type}.layouts.{layout}"
            if layout in fused or layout == PER_EXPERT:
                if _same(fused.get(layout), tensors, family, where):
                    continue
                raise ConversionError(f"{where}: family {family.name} ({family.source}) already has a layout {layout!r}")
            built, covered = [], []
            for tname, t in tensors.items():
                unknown = [p for p in t.parts if p not in family.role_leaves]
                if unknown or not t.parts:
                    raise ConversionError(f"{where}.{tname}: parts {t.parts} must be roles of family {family.name} "
                                          f"({sorted(family.role_leaves)})")
                built.append(FusedTensor(f"{family.experts_path}.{tname}", tuple(t.parts),
                                         _pipeline(t.ops, len(t.parts), f"{where}.{tname}")))
                covered += t.parts
            if sorted(covered) != sorted(family.role_leaves):
                raise ConversionError(f"{where}: holds roles {sorted(covered)}; expected each of "
                                      f"{sorted(family.role_leaves)} exactly once")
            leaves = {t.leaf for ts in fused.values() for t in ts}
            clash = sorted(leaves & {t.leaf for t in built})
            if clash:
                raise ConversionError(f"{where}: tensor {clash[0]!r} is already a tensor of another layout of "
                                      f"{family.name}; a layout's tensors need names of their own")
            fused[layout] = tuple(built)
        return dataclasses.replace(family, fused=fused)


def _same(existing: tuple[FusedTensor, ...] | None, tensors: dict[str, FusedSpec], family: Family, where: str) -> bool:
    if existing is None:
        return False
    mine = {(f"{family.experts_path}.{n}", tuple(t.parts), _pipeline(t.ops, len(t.parts), where).to_json().__repr__())
            for n, t in tensors.items()}
    return mine == {(t.template, t.parts, t.pipeline.to_json().__repr__()) for t in existing}


def _build(spec: NamingSpec, path: str) -> dict[str, Naming]:
    out = {}
    for model_type, m in spec.models.items():
        where = f"{path}: models.{model_type}"
        maps = []
        for i, t in enumerate(m.tensors):
            at = f"{where}.tensors[{i}]"
            hf = (t.hf,) if isinstance(t.hf, str) else tuple(t.hf)
            if not hf:
                raise ConversionError(f"{at}: 'hf' names no tensor")
            keys = set(_PLACEHOLDER.findall(t.trainer))
            for h in hf:
                if set(_PLACEHOLDER.findall(h)) != keys:
                    raise ConversionError(f"{at}: {t.trainer!r} and {h!r} must have the same placeholders")
            if t.sizes is not None and len(t.sizes) != len(hf):
                raise ConversionError(f"{at}: 'sizes' gives {len(t.sizes)} shares for {len(hf)} HF tensors")
            if any(isinstance(s, int) and s < 1 for s in [*(t.sizes or []), t.groups]):
                raise ConversionError(f"{at}: 'sizes' and 'groups' are whole numbers >= 1 or config keys")
            maps.append(TensorMap(t.trainer, hf, tuple(t.sizes) if t.sizes is not None else None, t.groups,
                                  t.input_only, _template(t.trainer), tuple(_template(h) for h in hf)))
        if m.layout != PER_EXPERT and not _NAME.match(m.layout):
            raise ConversionError(f"{where}.layout: {m.layout!r} is not a layout name")
        skip = []
        for pattern, why in m.skip.items():
            if not why.strip():
                raise ConversionError(f"{where}.skip: {pattern!r}: say why it has no counterpart")
            skip.append((_template(pattern, anything=True), pattern, why))
        out[model_type] = Naming(spec.naming, path, model_type, spec.description, m.source, tuple(maps), m.layout,
                                 dict(m.layouts), tuple(skip), m.passthrough)
    return out


@functools.cache
def _load(directory: str) -> dict[str, dict[str, Naming]]:
    """naming name -> model_type -> Naming, from every file of `directory`."""
    out: dict[str, dict[str, Naming]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except ValueError as exc:
            raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
        spec = parse(NamingSpec, obj, str(path))
        if spec.naming != path.stem or not _NAME.match(spec.naming) or spec.naming == HF:
            raise ConversionError(f"{path}: 'naming' is {spec.naming!r}; it must be the file name ({path.stem!r}), "
                                  f"not {HF!r}")
        out[spec.naming] = _build(spec, str(path))
    return out


def naming_names() -> list[str]:
    """Every naming (the values of --names), "hf" first."""
    return [HF, *sorted(_load(str(NAMINGS_DIR)))]


def _model_types(config: Mapping[str, Any]) -> list[str]:
    out = []
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("model_type"), str):
            out.append(cfg["model_type"])
    return out


def namings_for(config: Mapping[str, Any]) -> dict[str, Naming]:
    """The namings that describe a model of config.json `config` (by its model_type, or its text_config's)."""
    out = {}
    for name, by_type in _load(str(NAMINGS_DIR)).items():
        for mt in _model_types(config):
            if mt in by_type:
                out[name] = by_type[mt]
                break
    return out


def naming_for(name: str, config: Mapping[str, Any], where: str) -> Naming | None:
    """The naming `name` (--names) of the model of `config`; None for "hf"; raises when it has none."""
    if name == HF:
        return None
    every = _load(str(NAMINGS_DIR))
    if name not in every:
        raise ConversionError(f"--names {name}: unknown naming (known: {', '.join(naming_names())})")
    found = namings_for(config).get(name)
    if found is None:
        raise ConversionError(f"--names {name}: {NAMINGS_DIR / (name + '.json')} has no naming for model type "
                              f"{_model_types(config)} ({where}); it has {sorted(every[name])}")
    return found


def with_naming_layouts(family: Family, config: Mapping[str, Any]) -> Family:
    """`family` with the layouts of every naming of the model of `config` added, where they fit its roles (a
    quantized variant of the family, e.g. MXFP4 blocks and scales, has roles no trainer layout names)."""
    for naming in namings_for(config).values():
        if naming.fits(family):
            family = naming.with_layouts(family)
    return family


# --- input side --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """A tensor's bytes: file, dtype, shape and [start, end) in the file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class View:
    """A checkpoint's tensors under HF names (source_view)."""

    naming: Naming | None
    tensors: dict[str, Span]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (tensor, why)
    parts: dict[str, list[str]] = field(default_factory=dict)  # HF name -> its `#g` block tensors, in order
    noted: bool = False  # notes() already handed to the checkpoint's notes

    def notes(self) -> list[str]:
        """What the plan says about the naming: the naming read, and every tensor left out (with a count)."""
        if self.naming is None:
            return []
        out = [f"tensor names read as {self.naming.name} ({self.naming.source}, model type {self.naming.model_type})"]
        why: dict[str, list[str]] = {}
        for name, reason in self.skipped:
            why.setdefault(reason, []).append(name)
        for reason, names in why.items():
            out.append(f"{len(names)} tensor(s) left out (e.g. {names[0]!r}): {reason}")
        return out


def detect(names: Iterable[str], config: Mapping[str, Any]) -> Naming | None:
    """The naming tensor `names` are in (None: HF names); raises where several fit."""
    names = list(names)
    hits = {}
    for nm in namings_for(config).values():
        rxs = [t.trainer_rx for t in nm.tensors if t.renames]
        leaves = nm.layout_leaves()
        n = sum(1 for x in names if any(rx.match(x) for rx in rxs)
                or (leaves and any(x.endswith(f".experts.{leaf}") for leaf in leaves)))
        if n:
            hits[nm.name] = (n, nm)
    if len(hits) > 1:
        raise ConversionError(f"tensor names fit several trainer namings ({sorted(hits)}); the checkpoint mixes them")
    return next(iter(hits.values()))[1] if hits else None


def source_view(tensors: Mapping[str, Span], config: dict[str, Any], where: str,
                naming: Naming | None = None) -> View:
    """Every tensor of a checkpoint under its HF name (see the module docstring); `naming`: detected when None.

    Raises ConversionError naming `where` and the tensor for a tensor the naming does not place, a joined
    tensor whose dim 0 does not hold its parts, and two tensors giving one HF name.
    """
    naming = naming or detect(tensors, config)
    if naming is None:
        return View(None, dict(tensors))
    out: dict[str, Span] = {}
    view = View(naming, out)

    def put(name: str, span: Span, origin: str) -> None:
        if name in out:
            raise ConversionError(f"{where}: tensor {origin!r} gives HF tensor {name!r}, which another tensor gives too")
        out[name] = span

    for name, span in tensors.items():
        entry = m = None
        for t in naming.tensors:
            m = t.trainer_rx.match(name)
            if m:
                entry = t
                break
        if entry is None or m is None:
            why = naming.skipped(name)
            if why is not None:
                view.skipped.append((name, why))
            elif naming.passthrough:
                put(name, span, name)
            else:
                raise ConversionError(f"{where}: tensor {name!r} is not a tensor of the {naming.name} naming of "
                                      f"{naming.model_type} ({naming.source}); add it there (or to its 'skip')")
            continue
        hf = [fill_template(h, m.groupdict()) for h in entry.hf]
        if len(hf) == 1:
            put(hf[0], span, name)
            continue
        rows_total = span.shape[0] if span.shape else 0
        shares = entry.shares(config, where)
        groups = entry.n_groups(config, where)
        unit, rest = divmod(rows_total, sum(shares) * groups) if rows_total else (0, 1)
        if rest or unit < 1:
            raise ConversionError(f"{where}: tensor {name!r} has shape {list(span.shape)}; its dim 0 does not hold "
                                  f"{groups} group(s) of {list(entry.hf)} in shares {shares}")
        row = (span.end - span.start) // rows_total
        pos = span.start
        for g in range(groups):
            for h, share in zip(hf, shares):
                rows = unit * share
                block = Span(span.file, span.dtype, (rows, *span.shape[1:]), pos, pos + rows * row)
                pos += rows * row
                if groups == 1:
                    put(h, block, name)
                else:
                    put(f"{h}{PART}{g}", block, name)
                    view.parts.setdefault(h, []).append(f"{h}{PART}{g}")
    return view


# --- a conversion job's use of the above (convert.engine.job._plan_source) --------------------------------------

def apply_source_naming(ckpt: Any, family: Family) -> tuple[Any, Family, View]:
    """A checkpoint (convert.formats.checkpoint.Checkpoint) read through the trainer naming its tensor names are
    in: (the Checkpoint with `tensors` keyed by HF names, the family with the namings' layouts added, the View:
    its naming, or None for HF names, and what it left out)."""
    from convert.formats.checkpoint import TensorRef
    from convert.formats.safetensors import TensorInfo

    family = with_naming_layouts(family, ckpt.config or {})
    spans = {n: Span(r.file, r.info.dtype, r.info.shape, r.info.start, r.info.end) for n, r in ckpt.tensors.items()}
    view = source_view(spans, ckpt.config or {}, ckpt.storage.display())
    if view.naming is None:
        return ckpt, family, view
    tensors = {n: TensorRef(s.file, TensorInfo(n, s.dtype, s.shape, s.start, s.end)) for n, s in view.tensors.items()}
    if hasattr(ckpt, "notes"):  # printed by the job before it starts (and in --dry-run's plan)
        ckpt = dataclasses.replace(ckpt, notes=[*ckpt.notes, *view.notes()])
        view.noted = True
    return dataclasses.replace(ckpt, tensors=tensors), family, view


def output_layout(names: str, layout: str | None, family: Family, config: dict[str, Any], where: str
                  ) -> tuple[Naming | None, str | None]:
    """(the naming --names `names` writes, None for "hf"; the layout to write: `layout` (--layout, None for the
    default), or the naming's own); raises where the naming writes another layout than `layout`."""
    naming = naming_for(names, config, where)
    if naming is None:
        return None, layout
    if layout is not None and layout != naming.layout:
        tool = "convert.split_experts" if naming.layout == PER_EXPERT else f"convert.fuse_experts (--layout {naming.layout})"
        raise ConversionError(f"--names {names}: {naming.name} holds {naming.model_type} experts in the "
                              f"{naming.layout!r} layout, not {layout!r}; use {tool}")
    return naming, naming.layout


# --- convert.verify: both sides of a conversion under HF names -------------------------------------------------

def hf_views(a: Mapping[str, Any], b: Mapping[str, Any], config: dict[str, Any], where_a: str, where_b: str,
             make: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Two checkpoints' tensors (name -> an object with file, dtype, shape, start, end, e.g. a verify Stored)
    under HF names (source_view of each; `make(name, Span)` builds one), and the naming of each (lines for a
    report). An HF tensor one side holds in row blocks (`<name>#<g>`) is cut into the same blocks on the other."""
    views = []
    for tensors, where in ((a, where_a), (b, where_b)):
        spans = {n: Span(t.file, t.dtype, tuple(t.shape), t.start, t.end) for n, t in tensors.items()}
        views.append(source_view(spans, config, where))
    for one, other in ((views[0], views[1]), (views[1], views[0])):
        for whole, blocks in one.parts.items():
            if whole not in other.tensors or whole in other.parts:
                continue
            span = other.tensors.pop(whole)
            row = (span.end - span.start) // span.shape[0] if span.shape and span.shape[0] else 0
            pos = span.start
            for name in blocks:
                rows = one.tensors[name].shape[0]
                other.tensors[name] = Span(span.file, span.dtype, (rows, *span.shape[1:]), pos, pos + rows * row)
                pos += rows * row
            if pos != span.end:  # not the same shape: compared whole, it is reported as different
                for name in blocks:
                    other.tensors.pop(name)
                other.tensors[whole] = span
    lines = [f"{w}: tensor names read as {v.naming.name} ({v.naming.source})" for v, w in zip(views, (where_a, where_b))
             if v.naming is not None]
    lines += [f"{w}: {len(v.skipped)} tensor(s) left out of the comparison ({v.skipped[0][1]})"
              for v, w in zip(views, (where_a, where_b)) if v.skipped]
    return ({n: make(n, s) for n, s in views[0].tensors.items()}, {n: make(n, s) for n, s in views[1].tensors.items()},
            lines)
