"""The JSON of a safetensors header, decoded exactly as the safetensors library (0.8) decodes it.

The library parses the header with serde_json into `{"__metadata__": {str: str} | null,
name: TensorInfo, ...}` where TensorInfo is `{"dtype", "shape", "data_offsets"}` (unknown
fields ignored) or the 3-element array `[dtype, shape, data_offsets]`, a dtype is a variant
name or `{name: null}`, and shape / data_offsets hold unsigned 64-bit integers (no floats,
not even 4.0, no -0, no booleans). serde_json is stricter than Python's json module in
ways that matter here: no NaN/Infinity, no number that overflows f64, no lone UTF-16
surrogate escapes, at most 127 nested arrays/objects, `__metadata__` and the TensorInfo
fields at most once each (a repeated tensor name keeps the last entry, but every entry
must be well formed). Python's json does the syntax; this module adds those rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from convert.errors import ConversionError

U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
MAX_DEPTH = 127  # serde_json's recursion limit: 128 nested arrays/objects are refused
FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")

Entry = tuple[str, tuple[int, ...], int, int]  # dtype, shape, begin, end (relative to the data)


class _Pairs(list):
    """A JSON object as its (key, value) pairs in file order, duplicates kept."""


class _Refused(Exception):
    """A JSON value serde_json refuses (the message says why)."""


def _parse_int(text: str) -> int | float:
    # serde_json reads -0 and integers outside [i64 min, u64 max] as floats (out of f64 range: an error).
    if text == "-0":
        return -0.0
    value = int(text)
    if I64_MIN <= value <= U64_MAX:
        return value
    try:
        return float(value)
    except OverflowError:
        raise _Refused(f"number {text[:20]}... out of range") from None


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"number {text[:40]} out of range")
    return value


def _parse_constant(text: str) -> Any:
    raise _Refused(f"{text} is not JSON")


def _check_strings_and_depth(root: Any) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                raise _Refused(f"string {value[:40]!r} holds a lone UTF-16 surrogate escape")
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise _Refused(f"arrays/objects nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, _Pairs):
                for key, item in value:
                    stack.append((key, depth))
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def decode(raw: bytes, where: str) -> _Pairs:
    """The header bytes as nested _Pairs/lists/scalars; ConversionError unless serde_json would parse them."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(
            text, object_pairs_hook=_Pairs, parse_int=_parse_int, parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
        _check_strings_and_depth(value)
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{where}: safetensors header is not valid UTF-8 ({exc})") from exc
    except (ValueError, _Refused) as exc:  # JSONDecodeError, and int() of more than 4300 digits
        raise ConversionError(f"{where}: safetensors header is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise ConversionError(
            f"{where}: safetensors header is not valid JSON (nested deeper than {MAX_DEPTH} levels)"
        ) from exc
    if not isinstance(value, _Pairs):
        raise ConversionError(f"{where}: safetensors header is not a JSON object")
    return value


def _u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX


def _plain(value: Any) -> Any:
    if isinstance(value, _Pairs):
        return {k: _plain(v) for k, v in value}
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _describe(value: Any) -> str:
    """A short JSON rendering of `value` for messages (a string as Python writes it)."""
    text = repr(value) if isinstance(value, str) else json.dumps(_plain(value), ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor(name: str, spec: Any, dtypes: Collection[str], where: str) -> Entry:
    about = f"{where}: tensor {name!r}"
    if isinstance(spec, _Pairs):
        fields: dict[str, Any] = {}
        for key, value in spec:
            if key in FIELDS:
                if key in fields:
                    raise ConversionError(f"{about} has {key!r} twice in its header entry")
                fields[key] = value
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            raise ConversionError(f"{about} has no {missing[0]!r} in its header entry {_describe(spec)}")
        dtype, shape, offsets = (fields[f] for f in FIELDS)
    elif isinstance(spec, list) and len(spec) == 3:
        dtype, shape, offsets = spec
    else:
        raise ConversionError(
            f"{about} has a malformed header entry {_describe(spec)} (expected an object with dtype, shape and "
            "data_offsets)"
        )
    if isinstance(dtype, _Pairs) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # serde's map form of a unit enum variant: {"F32": null}
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise ConversionError(f"{about} has unknown dtype {_describe(dtype)} (expected one of {sorted(dtypes)})")
    if not isinstance(shape, list) or isinstance(shape, _Pairs) or not all(_u64(d) for d in shape):
        raise ConversionError(
            f"{about} has shape {_describe(shape)} (expected a list of non-negative integers)"
        )
    if (
        not isinstance(offsets, list) or isinstance(offsets, _Pairs) or len(offsets) != 2
        or not all(_u64(x) for x in offsets)
    ):
        raise ConversionError(
            f"{about} has data_offsets {_describe(offsets)} (expected [begin, end]: two non-negative integers)"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def _metadata(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, _Pairs):
        raise ConversionError(f"{where}: __metadata__ is {_describe(value)} (expected an object of strings)")
    out: dict[str, str] = {}
    for key, item in value:
        if not isinstance(item, str):
            raise ConversionError(f"{where}: __metadata__ {key!r} is {_describe(item)} (expected a string)")
        out[key] = item
    return out


def header_entries(raw: bytes, where: str, dtypes: Collection[str]) -> tuple[dict[str, Entry], dict[str, str]]:
    """Decode the JSON header `raw` of the file named `where`, as the safetensors library would.

    `dtypes`: the dtype names the format allows. Returns ({tensor name: (dtype, shape, begin,
    end)}, __metadata__); offsets are not yet checked against each other or the file.
    Raises ConversionError naming the file and tensor.
    """
    top = decode(raw, where)
    metadata: dict[str, str] | None = None
    entries: dict[str, Entry] = {}
    for key, value in top:
        if key == "__metadata__":
            if metadata is not None:
                raise ConversionError(f"{where}: __metadata__ appears twice in the safetensors header")
            metadata = _metadata(value, where)
        else:
            entries[key] = _tensor(key, value, dtypes, where)  # a repeated name: the last entry counts
    return entries, metadata or {}
