"""A model family, built from its (validated) family file: expert names, fused layouts, renames.

`extends`: a family file may name another family; every key it does not give is the
parent's, except the keys that say what the family is (`family`, `description`,
`model_types`, `architectures`, `generated_from`, `transformers_versions`), and `extra_renames` appends rename
rules to the parent's. The engine reads families only through this module; it never
names a model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from convert.errors import ConversionError
from convert.families.names import Rename, literal, pattern_regex, template_regex, to_disk, to_model
from convert.families.ops import Op, Pipeline, Split, op_from_json
from convert.families.schema import FamilySpec, FusedSpec, MergeSpec, OpSpec, PerExpertReadersSpec, SplitSpec, dump

PER_EXPERT = "per_expert"
# Quantization companions every family has unless its file says otherwise: a per-expert weight's
# suffix -> the fused tensor's suffix, as transformers' quantizers name them (`update_weight_conversions`
# appends `weight_scale_inv`'s `_scale_inv` to both the source and the target pattern of each converter).
DEFAULT_COMPANIONS = {"_scale_inv": "_scale_inv", "_scale": "_scale"}
# Ops a companion (a scale grid of 128x128 blocks) goes through exactly as its weight: concat and transpose
# move whole blocks; an interleave or chunk of rows does not map onto a block grid.
_COMPANION_OPS = {"concat", "transpose"}
NOT_INHERITED = ("family", "description", "model_types", "architectures", "generated_from", "transformers_versions",
                 "extends", "extra_renames")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)([.+-]?[A-Za-z0-9.]*)$")  # a release, e.g. 5.25.0 or 5.26.0.dev0
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_LEAF = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_READER = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")  # a consumer name in per_expert_readers


@dataclass(frozen=True)
class FusedTensor:
    """One fused [E, ...] tensor of a layout: its key template (model naming), the roles it holds and how.

    `pipeline` builds one expert's slice from the parts (one per role, in `parts` order).
    """

    template: str
    parts: tuple[str, ...]
    pipeline: Pipeline

    @property
    def op(self) -> str:
        """"interleave" when the parts are interleaved, else "concat" (how gate and up share the slice)."""
        return "interleave" if any(o.name == "interleave" for o in self.pipeline.ops) else "concat"

    @property
    def transpose(self) -> bool:
        """True when the parts are stored transposed ([in, out])."""
        return any(o.name == "transpose" for o in self.pipeline.ops)

    @property
    def is_byte_copy(self) -> bool:
        """True when one expert's slice is the plain concatenation of its parts' bytes."""
        return self.pipeline.is_byte_copy

    @property
    def leaf(self) -> str:
        """The tensor's name inside the experts module (e.g. `gate_up_proj`)."""
        return self.template.rsplit(".experts.", 1)[-1]


@dataclass(frozen=True)
class Cut:
    """One joined tensor and its parts as a conversion reads and writes them (see Merge.cuts)."""

    whole: str
    parts: tuple[str, ...]
    read_whole: bool  # True: `whole` is read and cut into `parts`; False: `parts` are read and joined into `whole`


@dataclass(frozen=True)
class Merge:
    """Non-expert tensors joined into one along dim 0 on one side of a conversion and apart on the other.

    A family file's `merges` (schema.MergeSpec): the model holds the parts (`sources`) joined into `target`,
    in equal parts. Its `splits` (schema.SplitSpec) are the inverse: the checkpoint holds `target` (the split's
    source) and the model holds the parts (the split's targets, here `sources`), sized by `split`. Names are
    patterns as in a rename, in model naming. With `count_key`, the one source pattern holds a `*` standing
    for the part index 0, 1, ..., config[count_key] - 1.
    """

    sources: tuple[str, ...]
    target: str
    count_key: str | None = None
    split: Split | None = None  # a `splits` entry: the model holds the parts, in these shares

    def part_sizes(self, total: int, n: int, config: dict[str, Any], where: str) -> list[int]:
        """The sizes along dim 0 of the `n` parts of a joined tensor of size `total` (raises when they do not fit)."""
        if self.split is not None:
            return self.split.bind(config, where).part_sizes(total)
        if n < 1 or total % n:
            raise ConversionError(f"dim 0 = {total} does not hold {n} equal parts")
        return [total // n] * n

    def cuts(self, names: Iterable[str], fusing: bool, to_model: Any, to_disk: Any, config: dict[str, Any],
             where: str) -> list[Cut]:
        """Every tensor among `names` (as a checkpoint names them) this joins or cuts, with its output names.

        Fusing reads disk naming (`to_model` gives the model's names) and writes model naming; splitting reads
        model naming and writes disk naming (`to_disk`). The model holds the whole of a merge and the parts of
        a split, so fusing joins a merge's parts and cuts a split's whole, and splitting does the reverse.
        """
        if fusing:
            model = {to_model(n): n for n in names}
            if self.split is None:
                return [Cut(whole, tuple(model[p] for p in parts), False)
                        for whole, parts in self.join_names(sorted(model), config, where).items()]
            return [Cut(n, tuple(parts), True) for m, n in sorted(model.items())
                    if (parts := self.cut_names(m, config, where)) is not None]
        if self.split is None:
            return [Cut(n, tuple(to_disk(p) for p in parts), True) for n in sorted(names)
                    if (parts := self.cut_names(n, config, where)) is not None]
        return [Cut(to_disk(whole), tuple(parts), False)
                for whole, parts in self.join_names(sorted(names), config, where).items()]

    def count(self, config: dict[str, Any], where: str) -> int:
        """How many tensors are joined (from the config for a `count_key` merge)."""
        if self.count_key is None:
            return len(self.sources)
        for cfg in (config, config.get("text_config")):
            if isinstance(cfg, dict) and type(cfg.get(self.count_key)) is int and cfg[self.count_key] > 0:
                return int(cfg[self.count_key])
        raise ConversionError(f"{where}: has no {self.count_key!r} (how many {self.sources[0]!r} tensors are joined)")

    def join_names(self, names: list[str], config: dict[str, Any], where: str) -> dict[str, list[str]]:
        """Joined tensor name -> its part names in order, for every part among `names`; raises if parts are missing."""
        joined: dict[str, dict[int, str]] = {}
        target = literal(self.target)
        for name in names:
            for j, source in enumerate(self.sources):
                m = pattern_regex(source).search(name)
                if not m:
                    continue
                if self.count_key is not None:
                    index = re.search(re.escape(literal(source)).replace(r"\*", r"(\d+)"), m.group(0))
                    j = int(index.group(1)) if index else -1
                joined.setdefault(name.replace(m.group(0), target, 1), {})[j] = name
                break
        out = {}
        for whole, parts in sorted(joined.items()):
            n = self.count(config, where)
            if sorted(parts) != list(range(n)):
                one = next(iter(parts.values()))
                raise ConversionError(
                    f"{where}: tensor {one!r} is one of {n} tensors joined into {whole!r}, but the checkpoint has "
                    f"parts {sorted(parts)}"
                )
            out[whole] = [parts[j] for j in range(n)]
        return out

    def cut_names(self, name: str, config: dict[str, Any], where: str) -> list[str] | None:
        """The part names of joined tensor `name`, in order; None when `name` is not a joined tensor."""
        m = pattern_regex(self.target).search(name)
        if not m:
            return None
        if self.count_key is not None:
            source = literal(self.sources[0])
            parts = [source.replace("*", str(i)) for i in range(self.count(config, where))]
        else:
            parts = [literal(s) for s in self.sources]
        return [name.replace(m.group(0), part, 1) for part in parts]


@dataclass(frozen=True)
class Family:
    """Key names and layouts of one model family (built by `build_family`)."""

    name: str
    source: str  # the family file
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    num_experts_keys: tuple[str, ...]
    dense_layer_keys: tuple[str, ...]
    container: str
    role_leaves: dict[str, str]
    fused: dict[str, tuple[FusedTensor, ...]]
    default_fused: str
    renames: tuple[Rename, ...] = ()
    merges: tuple[Merge, ...] = ()
    companions: dict[str, str] = field(default_factory=dict)
    refuse: dict[str, str] = field(default_factory=dict)
    description: str = ""
    quant_formats: dict[str, str] = field(default_factory=dict)  # quant_method -> family name (schema.QuantizationSpec)
    companion_roles: tuple[str, ...] = ()  # roles added by `with_companions` (scale grids of quantized weights)
    companions_dropped: dict[str, str] = field(default_factory=dict)  # layout -> why it cannot carry companions
    # --dtype on this (quantized-format) family: (target family name, {target role: (blocks, scales)}, {target role: source role})
    dequantize: tuple[str, dict[str, tuple[str, str]], dict[str, str]] | None = None
    # role -> config key whose value is added to E for that role (schema.FamilySpec.extra_experts)
    extra_experts: dict[str, str] = field(default_factory=dict)
    transformers_versions: tuple[str, ...] = ()  # the releases whose table gives the file (schema.FamilySpec)
    # the consumers that read the per-expert layout (schema.PerExpertReadersSpec); None: not stated (taken as read)
    per_expert_readers: tuple[str, ...] | None = None
    per_expert_note: str = ""  # why none reads it, what they read instead (required where per_expert_readers is ())

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.role_leaves)

    @property
    def layouts(self) -> tuple[str, ...]:
        return (PER_EXPERT, *self.fused)

    @property
    def experts_path(self) -> str:
        """`{prefix}.<container>.experts` (`{prefix}.experts` without a container)."""
        return "{prefix}" + (f".{self.container}" if self.container else "") + ".experts"

    @functools.cached_property
    def expert_templates(self) -> dict[str, str]:
        """Role -> per-expert key template in model naming (`{prefix}` the layer, `{e}` the expert)."""
        return {role: f"{self.experts_path}.{{e}}.{leaf}" for role, leaf in self.role_leaves.items()}

    @functools.cached_property
    def per_expert(self) -> dict[str, str]:
        """Role -> per-expert key template as a per-expert checkpoint names it (disk naming)."""
        return {role: self.to_disk(tpl) for role, tpl in self.expert_templates.items()}

    def to_model(self, name: str) -> str:
        """A checkpoint tensor name as the model holds it (renames applied as transformers does when loading)."""
        return to_model(self.renames, name)

    def to_disk(self, name: str) -> str:
        """A model tensor name as a per-expert checkpoint names it (as transformers does when saving)."""
        return to_disk(self.renames, name)

    def companions_in(self, names: Iterable[str]) -> list[str]:
        """The per-expert companion suffixes (of `companions`) that expert tensors among `names` carry."""
        found = []
        for pe_suffix, fused_suffix in self.companions.items():
            ends = tuple(f".{leaf}{pe_suffix}" for leaf in self.role_leaves.values())
            ends += tuple(f".{t.leaf}{fused_suffix}" for ts in self.fused.values() for t in ts)
            if any(self.to_model(n).endswith(ends) or n.endswith(ends) for n in names):
                found.append(pe_suffix)
        return found

    def with_companions(self, suffixes: Sequence[str]) -> Family:
        """This family with each weight's companions (`suffixes`, keys of `companions`) as roles of their own.

        Role `gate` with leaf `gate_proj.weight` gains role `gate_scale_inv` (`gate_proj.weight_scale_inv`),
        and each fused tensor `gate_up_proj` a twin `gate_up_proj_scale_inv` built from the companions by
        the same ops (so the scale grids are concatenated as the weights are). Layouts whose ops do not
        move whole blocks (interleave, chunk) are left out and named in `companions_dropped`.
        """
        if not suffixes:
            return self
        roles = dict(self.role_leaves)
        extra = dict(self.extra_experts)
        added: list[str] = []
        for suffix in suffixes:
            for role, leaf in self.role_leaves.items():
                roles[f"{role}{suffix}"] = f"{leaf}{suffix}"
                added.append(f"{role}{suffix}")
                if role in self.extra_experts:  # a weight's scales exist for the same experts as the weight
                    extra[f"{role}{suffix}"] = self.extra_experts[role]
        fused: dict[str, tuple[FusedTensor, ...]] = {}
        dropped: dict[str, str] = {}
        for layout, ts in self.fused.items():
            bad = sorted({o.name for t in ts for o in t.pipeline.ops} - _COMPANION_OPS)
            if bad:
                dropped[layout] = f"its ops {bad} do not keep 128x128 scale blocks whole"
                continue
            twins = [FusedTensor(t.template + self.companions[s], tuple(p + s for p in t.parts), t.pipeline)
                     for s in suffixes for t in ts]
            fused[layout] = (*ts, *twins)
        if not fused:
            raise ConversionError(
                f"family {self.name}: no layout can carry quantization scales ({'; '.join(f'{k}: {v}' for k, v in dropped.items())})"
            )
        default = self.default_fused if self.default_fused in fused else next(iter(fused))
        return dataclasses.replace(self, role_leaves=roles, fused=fused, default_fused=default,
                                   companion_roles=tuple(added), companions_dropped=dropped, extra_experts=extra)

    def fused_leaf_prefixes(self) -> tuple[str, ...]:
        """Names of the fused tensors inside the experts module (any tensor starting with one is an expert tensor)."""
        return tuple(sorted({t.leaf for ts in self.fused.values() for t in ts}))

    def num_experts(self, config: dict[str, Any], where: str) -> int:
        """The expert count of `config` (config.json contents, or its `text_config`); `where` names the file."""
        for cfg in (config, config.get("text_config")):
            if not isinstance(cfg, dict):
                continue
            for key in self.num_experts_keys:
                value = cfg.get(key)
                if type(value) is int and value > 0:
                    return value
        raise ConversionError(
            f"{where}: has none of {list(self.num_experts_keys)} (the number of experts of a {self.name} model)"
        )

    def role_experts(self, config: dict[str, Any], num_experts: int, where: str) -> dict[str, int]:
        """Role -> how many experts hold it: `num_experts` (E), plus, for a role of `extra_experts`, the value
        of its config key in `config` (config.json contents) or its `text_config` (0 where absent or null)."""
        out = {}
        for role in self.role_leaves:
            key = self.extra_experts.get(role)
            out[role] = num_experts + (self._extra_count(config, key, role, where) if key else 0)
        return out

    def _extra_count(self, config: dict[str, Any], key: str, role: str, where: str) -> int:
        """The experts `role` has beyond E: config key `key` of `config` or its `text_config` (0 where absent or
        null); raises where it is not an integer >= 0."""
        for cfg in (config, config.get("text_config")):
            if isinstance(cfg, dict) and cfg.get(key) is not None:
                extra = cfg[key]
                if type(extra) is not int or extra < 0:
                    raise ConversionError(f"{where}: {key!r} is {extra!r}; expected a number of experts (an integer "
                                          f">= 0) added to E for the {self.name} expert role {role!r}")
                return extra
        return 0


def resolve(specs: dict[str, tuple[FamilySpec, str]]) -> dict[str, FamilySpec]:
    """Each family's spec with `extends` resolved (parent keys filled in); `specs` maps name -> (spec, file)."""
    out: dict[str, FamilySpec] = {}

    def get(name: str, chain: tuple[str, ...]) -> FamilySpec:
        if name in out:
            return out[name]
        spec, path = specs[name]
        if spec.extends is None:
            out[name] = spec
            return spec
        if spec.extends in chain or spec.extends == name:
            raise ConversionError(f"{path}: 'extends' makes a cycle: {' -> '.join((*chain, name, spec.extends))}")
        if spec.extends not in specs:
            raise ConversionError(f"{path}: extends unknown family {spec.extends!r} (known: {sorted(specs)})")
        parent = get(spec.extends, (*chain, name))
        merged = {}
        for f in dataclasses.fields(FamilySpec):
            own = getattr(spec, f.name)
            merged[f.name] = own if f.name in NOT_INHERITED or own is not None else getattr(parent, f.name)
        merged["renames"] = list(merged["renames"] or []) + list(spec.extra_renames)
        merged["extra_renames"] = []
        out[name] = FamilySpec(**merged)
        return out[name]

    for name in specs:
        get(name, ())
    return out


def _pipeline(ops: list[OpSpec], n_parts: int, where: str, parts_out: int = 1) -> Pipeline:
    """The Pipeline of `ops` on `n_parts` parts giving `parts_out`; raises ConversionError naming `where`."""
    built: list[Op] = []
    for i, o in enumerate(ops):
        built.append(op_from_json(dump(o), f"{where}.ops[{i}]"))
    try:
        return Pipeline(tuple(built), n_parts, parts_out)
    except ConversionError as exc:
        raise ConversionError(f"{where}: {exc}") from exc


def version_key(version: str) -> tuple[int, int, int, str]:
    """A release string (e.g. "5.25.0") as a sortable key; raises ValueError for anything else."""
    m = _VERSION.match(version)
    if not m:
        raise ValueError(version)
    return int(m[1]), int(m[2]), int(m[3]), m[4]


def _check_versions(spec: FamilySpec, where: str) -> None:
    """`transformers_versions`: distinct releases in order, required with (and holding the release of) `generated_from`."""
    versions = spec.transformers_versions
    if versions is None:
        raise ConversionError(f"{where}: 'generated_from' without 'transformers_versions' (the transformers releases "
                              "whose conversion table gives this file; `python -m convert.families.generate` writes it)")
    try:
        keys = [version_key(v) for v in versions]
    except ValueError as exc:
        raise ConversionError(f"{where}: transformers_versions: {str(exc)!r} is not a release like \"5.25.0\"") from None
    if not versions or keys != sorted(set(keys)):
        raise ConversionError(f"{where}: transformers_versions {versions!r}: expected one or more distinct releases, "
                              "oldest first")
    made = (spec.generated_from or "").removeprefix("transformers ")
    if spec.generated_from is not None and made not in versions:
        raise ConversionError(f"{where}: generated_from {spec.generated_from!r} is not among transformers_versions "
                              f"{versions!r}")


def build_family(spec: FamilySpec, path: str) -> Family:
    """The Family of a resolved spec; raises ConversionError naming `path` for anything inconsistent."""
    where = f"{path}"
    _check_required(spec, where)
    assert spec.experts is not None and spec.layouts is not None and spec.default_layout is not None
    container, roles = spec.experts.container, spec.experts.roles
    _check_experts(container, roles, where)
    experts_path = "{prefix}" + (f".{container}" if container else "") + ".experts"
    fused = {layout: _build_layout(layout, tensors, roles, experts_path, where)
             for layout, tensors in spec.layouts.items()}
    if spec.default_layout not in fused:
        raise ConversionError(f"{where}: default_layout {spec.default_layout!r} is not one of its layouts {sorted(fused)}")
    _check_distinct_layouts(fused, where)
    renames = tuple(
        Rename(r.source, r.target, r.one_way, where=f"{where}: renames[{i}]") for i, r in enumerate(spec.renames or [])
    )
    merges = [_build_merge(m, f"{where}: merges[{i}]") for i, m in enumerate(spec.merges or [])]
    merges += [_build_split(sp, f"{where}: splits[{i}]") for i, sp in enumerate(spec.splits or [])]
    if spec.transformers_versions is not None or spec.generated_from is not None:
        _check_versions(spec, where)
    _check_refuse(spec.refuse or {}, where)
    keys = spec.num_experts_keys or []
    if not keys:
        raise ConversionError(f"{where}: num_experts_keys is empty")
    extra = _extra_experts(dict(spec.extra_experts or {}), roles, fused, where)
    readers = spec.per_expert_readers
    if readers is not None:
        _check_readers(readers, where)
    quant = spec.quantization
    return Family(
        name=spec.family, source=path, model_types=tuple(spec.model_types), architectures=tuple(spec.architectures),
        num_experts_keys=tuple(keys), dense_layer_keys=tuple(spec.dense_layer_keys or ()), container=container,
        role_leaves=dict(roles), fused=fused, default_fused=spec.default_layout, renames=renames, merges=tuple(merges),
        companions=dict(quant.companions) if quant else dict(DEFAULT_COMPANIONS),
        quant_formats=dict(quant.formats) if quant else {}, refuse=dict(spec.refuse or {}),
        description=spec.description, dequantize=_dequantize(spec, roles, where), extra_experts=extra,
        transformers_versions=tuple(spec.transformers_versions or ()),
        per_expert_readers=None if readers is None else tuple(readers.readers),
        per_expert_note=readers.note.strip() if readers is not None else "",
    )


def _check_required(spec: FamilySpec, where: str) -> None:
    """Raise unless `spec` (resolved) gives every key a family cannot do without."""
    for key in ("experts", "layouts", "default_layout", "num_experts_keys"):
        if getattr(spec, key) is None:
            raise ConversionError(f"{where}: missing required key {key!r} (give it, or 'extends' a family that has it)")


def _check_experts(container: str, roles: dict[str, str], where: str) -> None:
    """Raise unless `container` is a dotted module path (or "") and `roles` maps role names to distinct leaves."""
    if container and not _LEAF.match(container):
        raise ConversionError(f"{where}: experts.container {container!r} must be a dotted module path (or \"\")")
    if not roles:
        raise ConversionError(f"{where}: experts.roles is empty")
    for role, leaf in roles.items():
        if not _NAME.match(role) or not _LEAF.match(leaf):
            raise ConversionError(f"{where}: experts.roles {role!r}: {leaf!r} is not a role name and dotted tensor name")
    if len(set(roles.values())) != len(roles):
        raise ConversionError(f"{where}: experts.roles names one tensor for two roles ({sorted(roles.values())})")


def _build_layout(layout: str, tensors: dict[str, FusedSpec], roles: dict[str, str], experts_path: str,
                  where: str) -> tuple[FusedTensor, ...]:
    """The fused tensors of `layout` (name -> spec in `tensors`), each role of `roles` held exactly once."""
    if layout == PER_EXPERT or not _NAME.match(layout):
        raise ConversionError(f"{where}: layouts: {layout!r} is not a fused layout name")
    built = [_build_fused(tname, t, roles, experts_path, f"{where}: layouts.{layout}.{tname}")
             for tname, t in tensors.items()]
    covered = [p for t in tensors.values() for p in t.parts]
    if sorted(covered) != sorted(roles):
        raise ConversionError(
            f"{where}: layouts.{layout} holds roles {sorted(covered)}; expected each of {sorted(roles)} exactly once"
        )
    return tuple(built)


def _build_fused(tname: str, t: FusedSpec, roles: dict[str, str], experts_path: str, at: str) -> FusedTensor:
    """The FusedTensor `tname` of spec `t` (its parts roles of `roles`); `at` names it in errors."""
    if not _LEAF.match(tname) or tname.split(".")[0].isdigit():
        raise ConversionError(f"{at}: not a tensor name")
    unknown = [p for p in t.parts if p not in roles]
    if unknown or not t.parts:
        raise ConversionError(f"{at}: parts {t.parts} must be roles of experts.roles ({sorted(roles)})")
    return FusedTensor(f"{experts_path}.{tname}", tuple(t.parts), _pipeline(t.ops, len(t.parts), at))


def _check_distinct_layouts(fused: dict[str, tuple[FusedTensor, ...]], where: str) -> None:
    """Raise where two layouts of `fused` name the same set of tensors (a checkpoint could not tell them apart)."""
    sets: dict[str, frozenset[str]] = {}
    for layout, ts in fused.items():
        names = frozenset(t.template for t in ts)
        if names in sets.values():
            other = next(k for k, v in sets.items() if v == names)
            raise ConversionError(
                f"{where}: layouts {other!r} and {layout!r} name the same tensors; they cannot be told apart"
            )
        sets[layout] = names


def _build_merge(m: MergeSpec, at: str) -> Merge:
    """The Merge of a `merges` entry `m` (a byte concat on dim 0); `at` names it in errors."""
    if m.count_key is not None and (len(m.sources) != 1 or "*" not in m.sources[0]):
        raise ConversionError(f"{at}: with 'count_key', 'sources' is one pattern with a '*' for the part index")
    if not _pipeline(m.ops, 2 if m.count_key else len(m.sources), at).is_byte_copy or not m.sources:
        raise ConversionError(f"{at}: only a concat on dim 0 of one or more tensors is supported")
    return Merge(tuple(m.sources), m.target, m.count_key)


def _build_split(sp: SplitSpec, at: str) -> Merge:
    """The Merge of a `splits` entry `sp` (one split on dim 0 into distinct targets); `at` names it in errors."""
    pipeline = _pipeline(sp.ops, 1, at, parts_out=len(sp.targets))
    op = pipeline.ops[0] if len(pipeline.ops) == 1 else None
    if not isinstance(op, Split) or op.dim != 0 or len(op.sizes) != len(sp.targets):
        raise ConversionError(f"{at}: ops must be one split on dim 0 with one share in 'sizes' per target "
                              f"({len(sp.targets)} targets)")
    if "*" in sp.source or any("*" in t for t in sp.targets) or len(set(sp.targets)) != len(sp.targets):
        raise ConversionError(f"{at}: 'source' and 'targets' are distinct name patterns without '*'")
    return Merge(tuple(sp.targets), sp.source, None, op)


def _check_refuse(refuse: dict[str, str], where: str) -> None:
    """Raise unless every pattern (key) of `refuse` is a valid regex."""
    for pattern in refuse:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConversionError(f"{where}: refuse pattern {pattern!r} is not a valid regex ({exc})") from exc


def _extra_experts(extra: dict[str, str], roles: dict[str, str], fused: dict[str, tuple[FusedTensor, ...]],
                   where: str) -> dict[str, str]:
    """`extra` (role -> config key) checked: roles of `roles`, and one count of experts per fused tensor."""
    for role, key in extra.items():
        if role not in roles or not _NAME.match(key):
            raise ConversionError(f"{where}: extra_experts {role!r}: {key!r} must map a role of experts.roles "
                                  f"({sorted(roles)}) to a config key")
    for layout, ts in fused.items():
        for t in ts:
            if len({extra.get(p) for p in t.parts}) > 1:
                raise ConversionError(
                    f"{where}: layouts.{layout}.{t.leaf}: parts {list(t.parts)} are held for different numbers of "
                    f"experts (extra_experts {[extra.get(p) for p in t.parts]}); one fused tensor holds one count "
                    "of experts"
                )
    return extra


def _check_readers(readers: PerExpertReadersSpec, where: str) -> None:
    """Raise unless `per_expert_readers` names distinct consumers, with a note where it names none."""
    bad = [r for r in readers.readers if not _READER.match(r)]
    if bad or len(set(readers.readers)) != len(readers.readers):
        raise ConversionError(f"{where}: per_expert_readers.readers {readers.readers!r}: expected distinct consumer "
                              "names (e.g. \"transformers\", \"vllm\"), or [] where none reads the layout")
    if not readers.readers and not readers.note.strip():
        raise ConversionError(f"{where}: per_expert_readers: readers is [] (no consumer reads the per-expert layout): "
                              "give a 'note' saying why (it is the reason split_experts refuses with)")


def _dequantize(spec: FamilySpec, roles: dict[str, str], where: str) -> tuple[str, dict[str, tuple[str, str]], dict[str, str]] | None:
    """Family.dequantize of `spec` (target family, mxfp4 target role -> (blocks, scales), cast target -> source)."""
    d = spec.quantization.dequantize if spec.quantization else None
    if d is None:
        return None
    for target, src in [*d.mxfp4.items(), *d.cast.items()]:
        srcs = [src] if isinstance(src, str) else src
        if not srcs or any(r not in roles for r in srcs) or (not isinstance(src, str) and len(src) != 2):
            raise ConversionError(f"{where}: quantization.dequantize.{target}: expected source roles of {sorted(roles)} "
                                  "(mxfp4: [blocks role, scales role])")
    return d.family, {k: (v[0], v[1]) for k, v in d.mxfp4.items()}, dict(d.cast)


__all__ = ["DEFAULT_COMPANIONS", "PER_EXPERT", "Family", "FusedTensor", "Merge", "build_family", "resolve", "template_regex"]
