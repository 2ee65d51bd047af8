"""The family file format (configs/families/<name>.json), strictly: one dataclass per JSON object.

Every object of a family file is parsed into the dataclass below that describes it: its
fields are the allowed keys (a field's `json` metadata gives the key where it differs from
the field name), their types are checked, a field without a default is required, and an
unknown or misspelled key is an error naming the file, the place and the key (with the
closest allowed key). Cross-field rules (roles named by layouts exist, ops fit their parts,
`extends` resolves) are checked by convert.families.family when the family is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar, Union

from convert.errors import ConversionError


class _Dataclass(Protocol):
    """A dataclass (what dataclasses.fields takes)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


T = TypeVar("T", bound=_Dataclass)


@dataclass(frozen=True)
class OpSpec:
    """One op of a fused tensor's pipeline; which keys an op takes is checked by convert.families.ops."""

    op: str
    dim: int | None = None
    dims: list[int] | None = None
    parts: int | None = None
    sizes: list[int | str] | None = None  # `split`: the parts' shares, whole numbers or config keys


@dataclass(frozen=True)
class FusedSpec:
    """One fused [E, ...] tensor of a layout: the roles it holds, in order, and the ops that join them."""

    parts: list[str]
    ops: list[OpSpec] = field(default_factory=list)


@dataclass(frozen=True)
class ExpertsSpec:
    """Where the experts live: `{prefix}.{container}.experts.{e}.{roles[role]}` (model naming)."""

    container: str
    roles: dict[str, str]


@dataclass(frozen=True)
class RenameSpec:
    """A rename of tensor names from disk naming to model naming (regex, as transformers' WeightRenaming)."""

    source: str = field(metadata={"json": "from"})
    target: str = field(metadata={"json": "to"})
    one_way: bool = False


@dataclass(frozen=True)
class MergeSpec:
    """Several non-expert tensors the model holds as one (e.g. q/k/v conv weights), joined by `ops`.

    `sources` and `target` are name patterns as in a rename (model naming); the sources are
    joined in their order. With `count_key`, `sources` is one pattern whose `*` stands for the
    part index, and the config key says how many parts there are.
    """

    sources: list[str]
    target: str
    ops: list[OpSpec]
    count_key: str | None = None


@dataclass(frozen=True)
class SplitSpec:
    """A non-expert tensor of the checkpoint that the model holds cut into several (transformers' `Split`), e.g. a
    fused `query_key_value` held as `q_proj`, `k_proj`, `v_proj`: the inverse of a merge.

    `source` and `targets` are name patterns as in a rename (model naming, the renames applied); `ops` is one
    `split` whose `sizes` (config keys or whole numbers) give the targets' shares of the source along `dim`, in
    order. Fusing cuts the source into the targets; splitting joins them back (a concat), byte for byte.
    """

    source: str
    targets: list[str]
    ops: list[OpSpec]


@dataclass(frozen=True)
class DequantizeSpec:
    """How a quantized-format family is dequantized (--dtype): into `family`'s roles; each target role
    from an MXFP4 (blocks role, scales role) pair in `mxfp4`, or from one source role cast in `cast`."""

    family: str
    mxfp4: dict[str, list[str]] = field(default_factory=dict)
    cast: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizationSpec:
    """Quantization companions of expert weights (hook, e.g. FP8 `weight_scale_inv`): per-expert suffix -> fused suffix."""

    companions: dict[str, str] = field(default_factory=dict)
    # quant_method of config.json's quantization_config -> the family that describes such a checkpoint
    # (e.g. gpt-oss MXFP4: `*_blocks`/`*_scales` expert tensors instead of bf16 weights)
    formats: dict[str, str] = field(default_factory=dict)
    dequantize: DequantizeSpec | None = None


@dataclass(frozen=True)
class PerExpertReadersSpec:
    """Who reads the family's per-expert layout (what `split_experts` writes): consumer names (e.g.
    "transformers", "vllm", "sglang"), `[]` where none does; `note` says why (what they read instead), and is
    required when `readers` is empty: `split_experts` refuses such a split with it unless asked for the layout
    (--allow-unread-layout). Absent from a family file: its per-expert layout is taken to be read."""

    readers: list[str]
    note: str = ""
    source: str = ""  # where this was read (the consumers' releases and files), for maintainers


@dataclass(frozen=True)
class FamilySpec:
    """A whole family file. With `extends`, every key not given is the parent's (see convert.families.family)."""

    family: str
    description: str = ""
    extends: str | None = None
    generated_from: str | None = None
    # the transformers releases whose conversion table gives this file (generated files: every key but
    # `description`, `generated_from` and this one), e.g. ["5.23.0", "5.25.0"]
    transformers_versions: list[str] | None = None
    model_types: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    num_experts_keys: list[str] | None = None
    # role -> config key: the role is held for E + config[key] experts (0 where the key is absent or null),
    # e.g. router slots of identity ("zero") experts that have gate/up weights but no down weight
    extra_experts: dict[str, str] | None = None
    dense_layer_keys: list[str] | None = None
    experts: ExpertsSpec | None = None
    layouts: dict[str, dict[str, FusedSpec]] | None = None
    default_layout: str | None = None
    renames: list[RenameSpec] | None = None
    extra_renames: list[RenameSpec] = field(default_factory=list)
    merges: list[MergeSpec] | None = None
    splits: list[SplitSpec] | None = None
    quantization: QuantizationSpec | None = None
    refuse: dict[str, str] | None = None
    per_expert_readers: PerExpertReadersSpec | None = None


def _json_key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("json", f.name))


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "object"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"object of {_type_name(typing.get_args(tp)[1])}"
    return {str: "string", int: "integer", bool: "boolean"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for arg in args[:-1]:  # a union of several types (e.g. str | int): the first that fits
            try:
                return _convert(value, arg, where)
            except ConversionError:
                continue
        return _convert(value, args[-1], where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a field's type: a class, never an instance
        return parse(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConversionError(f"{where}: expected a {_type_name(tp)}, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConversionError(f"{where}: expected an {_type_name(tp)}, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    ok = type(value) is tp if tp in (int, bool) else isinstance(value, tp)
    if not ok:
        raise ConversionError(f"{where}: expected a {_type_name(tp)}, got {value!r}")
    return value


def parse(cls: type[T], obj: Any, where: str) -> T:
    """`obj` (parsed JSON) as dataclass `cls`, strictly; `where` names the file and place for errors."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{where}: expected an object, got {type(obj).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_json_key(f): f for f in dataclasses.fields(cls)}
    for key in obj:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConversionError(f"{where}: unknown key {key!r}{hint}; allowed keys: {sorted(fields)}")
    kwargs = {}
    for key, f in fields.items():
        if key not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConversionError(f"{where}: missing required key {key!r}")
            continue
        kwargs[f.name] = _convert(obj[key], hints[f.name], f"{where}.{key}")
    return cls(**kwargs)


def dump(spec: Any) -> Any:
    """A dataclass spec back to its JSON form (keys with default values left out)."""
    if dataclasses.is_dataclass(spec):
        out = {}
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value == default:
                continue
            out[_json_key(f)] = dump(value)
        return out
    if isinstance(spec, list):
        return [dump(v) for v in spec]
    if isinstance(spec, dict):
        return {k: dump(v) for k, v in spec.items()}
    return spec
