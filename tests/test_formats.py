"""The file formats the tool reads, held to the libraries that define them.

safetensors headers: every header the safetensors library (0.8) refuses is refused with one
message naming the file (and tensor), every header it accepts is accepted with the same
tensors; checked on a table of edge cases, on random save_file outputs and on random
mutations of valid headers. Index / config JSON files: size bound before reading, UTF-8,
weight_map values that are plain file names; through the real entry points.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from convert import fuse_experts, split_adapter
from convert.errors import ConversionError
from convert.example import example_tensors, write_checkpoint
from convert.formats.safetensors import DTYPE_SIZES, FORMAT_DTYPE_BITS, MAX_HEADER_BYTES, read_header
from convert.io.storage import MAX_JSON_BYTES, Storage
from helpers import run_tool

INDEX = "model.safetensors.index.json"
TOOL_ONLY = "not converted by this tool"  # the refusal of a valid file whose dtype the tool does not handle


# ----------------------------------------------------------------------------- writing and reading raw files


class Obj(list):  # type: ignore[type-arg]
    """A JSON object written as its (key, value) pairs in order, duplicates allowed."""


class Raw(str):
    """A JSON token written as is (e.g. -0, 4.0, 1e400, NaN)."""


def enc(value: Any) -> str:
    """JSON text of `value` (Obj, Raw, lists, str, int, bool, None)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{enc(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(enc(v) for v in value) + "]"
    return json.dumps(value)


def tensor(dtype: Any = "F32", shape: Any = (1,), offsets: Any = (0, 4), **extra: Any) -> Obj:
    return Obj([("dtype", dtype), ("shape", list(shape)), ("data_offsets", list(offsets)), *extra.items()])


def write(path: Path, header: bytes | str | Obj, data_len: int) -> Path:
    """A safetensors file: the 8-byte length, `header` (Obj: encoded), `data_len` data bytes."""
    raw = header if isinstance(header, bytes) else (enc(header) if isinstance(header, Obj) else header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))
    return path


def library(path: Path) -> tuple[bool, dict[str, tuple[str, tuple[int, ...]]] | str]:
    """(True, {name: (dtype, shape)}) if safetensors.safe_open reads the file, else (False, its error)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return True, {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - whatever the library raises is a refusal
        return False, f"{type(exc).__name__}: {exc}"


def ours(path: Path) -> tuple[bool, Any]:
    """(True, FileHeader) if the tool's reader accepts the file, else (False, its one-line message)."""
    try:
        return True, read_header(Storage(str(path.parent)), path.name)
    except ConversionError as exc:
        return False, str(exc)


def same_view(path: Path) -> None:
    """Both readers accept `path` and agree on every tensor's name, dtype, shape; our offsets hold its bytes."""
    lib_ok, lib = library(path)
    our_ok, header = ours(path)
    assert lib_ok and our_ok, (lib, header)
    assert {n: (t.dtype, t.shape) for n, t in header.tensors.items()} == lib
    raw = path.read_bytes()
    assert header.data_start + sum(t.nbytes for t in header.tensors.values()) == len(raw)
    with safe_open(str(path), framework="pt") as f:
        for name, t in header.tensors.items():
            if not t.nbytes:
                continue  # nothing to compare (and torch cannot build a [2**64 - 1, 0] tensor)
            want = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert raw[t.start : t.end] == want, name


# ----------------------------------------------------------------------------- the table

A = tensor()  # a valid F32 [1] at [0, 4]
REFUSED: dict[str, tuple[Any, int, list[str]]] = {
    # data_offsets: unsigned integers only (floats were rounded down before), exactly two of them
    "offset_fraction": (Obj([("a", tensor(offsets=(0, Raw("16384.5"))))]), 16384, ["'a'", "data_offsets [0, 16384.5]"]),
    "offset_float_whole": (Obj([("a", tensor(offsets=(0, Raw("4.0"))))]), 4, ["'a'", "two non-negative integers"]),
    "offset_exponent": (Obj([("a", tensor(offsets=(0, Raw("4e0"))))]), 4, ["'a'", "data_offsets"]),
    "offset_minus_zero": (Obj([("a", tensor(offsets=(Raw("-0"), 4)))]), 4, ["'a'", "data_offsets"]),
    "offset_negative": (Obj([("a", tensor(offsets=(-4, 0)))]), 4, ["'a'", "data_offsets"]),
    "offset_bool": (Obj([("a", tensor(offsets=(False, 4)))]), 4, ["'a'", "data_offsets [false, 4]"]),
    "offset_string": (Obj([("a", tensor(offsets=("0", "4")))]), 4, ["'a'", "data_offsets"]),
    "offset_three": (Obj([("a", tensor(offsets=(0, 4, 4)))]), 4, ["'a'", "data_offsets [0, 4, 4]"]),
    "offset_one": (Obj([("a", tensor(offsets=(4,)))]), 4, ["'a'", "data_offsets [4]"]),
    "offset_object": (Obj([("a", Obj([("dtype", "F32"), ("shape", [1]), ("data_offsets", Obj([("0", 0)]))]))]), 4,
                      ["'a'", "data_offsets"]),
    "offset_beyond_u64": (Obj([("a", tensor(shape=(0,), offsets=(2**64, 2**64)))]), 0, ["'a'", "data_offsets"]),
    # shape
    "shape_float": (Obj([("a", tensor(shape=(Raw("1.0"),)))]), 4, ["'a'", "shape [1.0]"]),
    "shape_negative": (Obj([("a", tensor(shape=(-1,)))]), 4, ["'a'", "shape [-1]"]),
    "shape_null": (Obj([("a", Obj([("dtype", "F32"), ("shape", None), ("data_offsets", [0, 4])]))]), 4,
                   ["'a'", "shape null"]),
    "shape_overflow": (Obj([("a", tensor(shape=(2**32, 2**32, 0), offsets=(0, 0)))]), 0, ["'a'", "2**64 elements"]),
    "shape_bits_overflow": (Obj([("a", tensor(shape=(2**62,), offsets=(0, 0)))]), 0, ["'a'", "2**64 bits"]),
    "shape_vs_offsets": (Obj([("a", tensor(shape=(2,)))]), 4, ["'a'", "hold 4 bytes, but F32 [2] needs 8"]),
    "subbyte_partial": (Obj([("a", tensor("F4", (3,), (0, 2)))]), 2, ["'a'", "whole number of bytes"]),
    # dtype
    "dtype_unknown": (Obj([("a", tensor("F12"))]), 4, ["'a'", "unknown dtype 'F12'"]),
    "dtype_lowercase": (Obj([("a", tensor("f32"))]), 4, ["'a'", "unknown dtype 'f32'"]),
    "dtype_null": (Obj([("a", tensor(None))]), 4, ["'a'", "unknown dtype null"]),
    "dtype_map_value": (Obj([("a", tensor(Obj([("F32", [])])))]), 4, ["'a'", "unknown dtype"]),
    "dtype_map_two": (Obj([("a", tensor(Obj([("F32", None), ("F16", None)])))]), 4, ["'a'", "unknown dtype"]),
    # the tensor entry
    "entry_number": (Obj([("a", 5)]), 4, ["'a'", "malformed header entry 5"]),
    "entry_null": (Obj([("a", None)]), 4, ["'a'", "malformed header entry"]),
    "entry_short_list": (Obj([("a", ["F32", [1]])]), 4, ["'a'", "malformed header entry"]),
    "entry_missing_field": (Obj([("a", Obj([("dtype", "F32"), ("data_offsets", [0, 4])]))]), 4, ["'a'", "no 'shape'"]),
    "entry_field_twice": (Obj([("a", Obj([("dtype", "F32"), ("shape", [1]), ("dtype", "F32"),
                                          ("data_offsets", [0, 4])]))]), 4, ["'a'", "'dtype' twice"]),
    "entry_repeated_first_malformed": (Obj([("a", 5), ("a", A)]), 4, ["'a'", "malformed"]),
    # __metadata__
    "metadata_list": (Obj([("__metadata__", []), ("a", A)]), 4, ["__metadata__"]),
    "metadata_int_value": (Obj([("__metadata__", Obj([("format", 1)])), ("a", A)]), 4, ["__metadata__ 'format'"]),
    "metadata_null_value": (Obj([("__metadata__", Obj([("format", None)])), ("a", A)]), 4, ["__metadata__ 'format'"]),
    "metadata_twice": (Obj([("__metadata__", None), ("__metadata__", Obj()), ("a", A)]), 4, ["__metadata__ appears twice"]),
    # JSON that Python's json module reads but serde_json does not
    "nan_in_extra_field": (Obj([("a", tensor(x=Raw("NaN")))]), 4, ["not valid JSON"]),
    "number_out_of_range": (Obj([("a", tensor(x=Raw("1e400")))]), 4, ["not valid JSON", "out of range"]),
    "lone_surrogate_name": ('{"\\ud800":' + enc(A) + "}", 4, ["not valid JSON", "surrogate"]),
    "lone_surrogate_metadata": ('{"__metadata__":{"x":"\\udc00"},"a":' + enc(A) + "}", 4, ["surrogate"]),
    "nested_128_deep": (Obj([("a", tensor(x=Raw("[" * 126 + "]" * 126)))]), 4, ["not valid JSON", "127 levels"]),
    "nested_very_deep": (Obj([("a", tensor(x=Raw("[" * 100_000 + "]" * 100_000)))]), 4, ["not valid JSON"]),
    "nul_padding": (enc(Obj([("a", A)])) + "\0\0", 4, ["not valid JSON"]),
    "utf8_bom": ("\ufeff" + enc(Obj([("a", A)])), 4, ["not valid JSON"]),
    "control_character": ('{"a\tb":' + enc(A) + "}", 4, ["not valid JSON"]),
    "invalid_utf8": (b'{"a\xff":' + enc(A).encode() + b"}", 4, ["not valid UTF-8"]),
    "top_level_list": ("[]", 0, ["not a JSON object"]),
    "empty_header": ("", 0, ["not valid JSON"]),
    # the data layout: packed from offset 0, no gap, no overlap, the last tensor ends the file
    "gap_at_start": (Obj([("a", tensor(offsets=(4, 8)))]), 8, ["'a'", "starts at data offset 4"]),
    "gap_between": (Obj([("a", A), ("b", tensor(offsets=(8, 12)))]), 12, ["'b'", "4 unused bytes"]),
    "overlap": (Obj([("a", tensor(shape=(2,), offsets=(0, 8))), ("b", tensor(offsets=(4, 8)))]), 8,
                ["'a'", "'b'", "overlap"]),
    "empty_tensor_inside_another": (Obj([("a", tensor(shape=(2,), offsets=(0, 8))), ("e", tensor(shape=(0,), offsets=(4, 4)))]),
                                    8, ["'a'", "'e'", "overlap"]),
    "empty_tensor_past_the_end": (Obj([("a", A), ("e", tensor(shape=(0,), offsets=(8, 8)))]), 4, ["'e'"]),
    "same_offsets_twice": (Obj([("a", A), ("b", A)]), 4, ["'a'", "'b'", "overlap"]),
    "trailing_bytes": (Obj([("a", A)]), 5, ["1 bytes follow the last tensor 'a'"]),
    "trailing_bytes_no_tensors": (Obj(), 3, ["3 bytes follow the header"]),
    "truncated": (Obj([("a", A)]), 3, ["'a'", "truncated file?"]),
    "end_before_begin": (Obj([("a", tensor(shape=(0,), offsets=(4, 0)))]), 4, ["'a'", "data_offsets [4, 0]"]),
}

ACCEPTED: dict[str, tuple[Any, int]] = {
    "plain": (Obj([("a", A)]), 4),
    "no_tensors": (Obj(), 0),
    "no_tensors_metadata": (Obj([("__metadata__", Obj([("format", "pt")]))]), 0),
    "metadata_null": (Obj([("__metadata__", None), ("a", A)]), 4),
    "metadata_repeated_key": (Obj([("__metadata__", Obj([("k", "1"), ("k", "2")])), ("a", A)]), 4),
    "metadata_after_tensors": (Obj([("a", A), ("__metadata__", Obj([("", "")]))]), 4),
    "scalar": (Obj([("a", tensor(shape=()))]), 4),
    "empty_tensors_anywhere": (Obj([("z", tensor(shape=(0, 3), offsets=(4, 4))), ("a", A),
                                    ("y", tensor("BF16", (5, 0), (0, 0)))]), 4),
    "out_of_name_order": (Obj([("b", tensor(offsets=(4, 8))), ("a", A)]), 8),
    "list_form_entry": (Obj([("a", ["F32", [1], [0, 4]])]), 4),
    "dtype_map_form": (Obj([("a", tensor(Obj([("F32", None)])))]), 4),
    "repeated_name_last_counts": (Obj([("a", tensor(shape=(9,), offsets=(0, 36))), ("a", A)]), 4),
    "unknown_fields": (Obj([("a", tensor(x=Obj([("y", [1, None, -0.5, Raw("-0"), 2**70, "s"])]), z=Raw("1e-400")))]), 4),
    "unknown_field_twice": (Obj([("a", tensor(x=1, **{"x ": 2}))]), 4),
    "nested_127_deep": (Obj([("a", tensor(x=Raw("[" * 125 + "]" * 125)))]), 4),
    "surrogate_pair_name": ('{"\\ud83d\\ude00":' + enc(A) + "}", 4),
    "escaped_keys": ('{"__m\\u0065tadata__":{"x":"1"},"a\\/b":{"d\\u0074ype":"F\\u0033\\u0032","shape":[1],'
                     '"data_offsets":[0,4]}}', 4),
    "whitespace_padding": (" \t\n\r" + enc(Obj([("a", A)])) + "   \n", 4),
    "empty_name": (Obj([("", A)]), 4),
    "u64_max_dimension": (Obj([("a", tensor("U8", (2**64 - 1, 0), (0, 0)))]), 0),
}


def _table_file(tmp_path: Path, header: Any, data_len: int) -> Path:
    return write(tmp_path / "case.safetensors", header, data_len)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_headers_the_library_refuses_are_refused_with_a_named_message(tmp_path, case):
    header, data_len, fragments = REFUSED[case]
    path = _table_file(tmp_path, header, data_len)
    lib_ok, lib = library(path)
    assert not lib_ok, f"the safetensors library accepts {case}: {lib}"
    ok, msg = ours(path)
    assert not ok, f"{case} accepted: {msg}"
    assert msg.startswith(str(path) + ":") and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_headers_the_library_accepts_are_read_alike(tmp_path, case):
    header, data_len = ACCEPTED[case]
    same_view(_table_file(tmp_path, header, data_len))


@pytest.mark.parametrize("dtype", sorted(set(FORMAT_DTYPE_BITS) - set(DTYPE_SIZES)))
def test_valid_files_with_dtypes_the_tool_does_not_convert_are_refused_as_such(tmp_path, dtype):
    bits = FORMAT_DTYPE_BITS[dtype]
    path = write(tmp_path / "x.safetensors", Obj([("t", tensor(dtype, (8,), (0, bits)))]), bits)
    assert library(path)[0]
    ok, msg = ours(path)
    assert not ok and str(path) in msg and "'t'" in msg and f"dtype {dtype}" in msg and TOOL_ONLY in msg


def test_file_level_limits_match_the_library(tmp_path):
    """Shorter than 8 bytes; a length running past the file; the 100 MB header limit (sparse file, never read)."""
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\0" * 7)
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", 50) + b"{}")
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 64)
    for path, fragment in ((short, "too short"), (past, "runs past the end"), (big, "exceeds the 100000000-byte limit")):
        assert not library(path)[0]
        ok, msg = ours(path)
        assert not ok and str(path) in msg and fragment in msg, msg


# ----------------------------------------------------------------------------- random files

TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12).filter(
    lambda s: s != "__metadata__")
random_tensors = st.dictionaries(
    names,
    st.tuples(st.sampled_from(sorted(TORCH)), st.lists(st.integers(0, 4), max_size=3), st.integers(0, 2**31)),
    max_size=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_tensors, metadata=st.none() | st.dictionaries(names, names, max_size=3))
def test_every_save_file_output_is_read_like_the_library(spec, metadata):
    """Random save_file outputs (zero-size tensors, scalars, unicode names, __metadata__, header padding)."""
    tensors = {}
    for name, (dtype, shape, seed) in spec.items():
        g = torch.Generator().manual_seed(seed)
        tensors[name] = torch.randint(0, 256, (*shape, TORCH[dtype].itemsize), generator=g, dtype=torch.uint8) \
            .view(TORCH[dtype]).reshape(shape)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "random.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        if not library(path)[0]:  # save_file({}, metadata={...}) writes '{},"__metadata__":{...}}' (safetensors 0.8)
            assert not tensors and not ours(path)[0]
            return
        same_view(path)
        assert ours(path)[1].metadata == (metadata or {})


# Mutations of a valid header: each turns a packed, well-formed file into a neighbour the two readers must agree on.
TOKENS = [Raw(t) for t in ("0", "4", "-0", "-4", "4.0", "0.5", "4e0", "true", "null", '"4"', "[]", "{}",
                           "18446744073709551615", "18446744073709551616", "1e400", "NaN")]
DTYPES = sorted(FORMAT_DTYPE_BITS) + ["F12", "f32"]


@st.composite
def mutated_files(draw: st.DrawFn) -> tuple[str, int]:
    count = draw(st.integers(0, 4))
    entries: list[list[Any]] = []
    pos = 0
    for i in range(count):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        n = DTYPE_SIZES[dtype] * int(torch.tensor(shape).prod()) if shape else DTYPE_SIZES[dtype]
        entries.append([f"t{i}", dtype, list(shape), [pos, pos + n], []])
        pos += n
    metadata: Any = draw(st.sampled_from([None, "absent", Obj([("format", "pt")])]))
    data_len = pos
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["offset", "shape", "dtype", "swap", "list_form", "dtype_map", "extra",
                                     "duplicate", "metadata", "data_len", "drop_field", "field_twice"]))
        if kind == "data_len":
            data_len = max(0, data_len + draw(st.sampled_from([-1, 1, 4])))
            continue
        if kind == "metadata":
            metadata = draw(st.sampled_from([Obj([("format", Raw("1"))]), Raw("[]"), Obj([("a", "b"), ("a", "c")]),
                                             "twice", Raw("null")]))
            continue
        if not entries:
            continue
        e = draw(st.sampled_from(entries))
        if kind == "offset":
            e[3][draw(st.integers(0, 1))] = draw(st.sampled_from(TOKENS) | st.integers(0, pos + 4))
        elif kind == "shape":
            e[2] = e[2] + [draw(st.sampled_from(TOKENS) | st.integers(0, 2))]
        elif kind == "dtype":
            e[1] = draw(st.sampled_from(DTYPES))
        elif kind == "swap":
            other = draw(st.sampled_from(entries))
            e[3], other[3] = other[3], e[3]
        elif kind in ("list_form", "dtype_map", "drop_field", "field_twice"):
            e[4].append(kind)
        elif kind == "extra":
            e[4].append(("extra", draw(st.sampled_from(TOKENS))))
        elif kind == "duplicate":
            entries.append([e[0], e[1], list(e[2]), list(e[3]), list(e[4])])
    pairs: list[tuple[str, Any]] = []
    if metadata == "twice":
        pairs += [("__metadata__", None), ("__metadata__", Obj())]
    elif metadata != "absent" and metadata is not None:
        pairs.append(("__metadata__", metadata))
    for name, dtype, shape, offsets, flags in entries:
        dt: Any = Obj([(dtype, None)]) if "dtype_map" in flags else dtype
        if "list_form" in flags:
            pairs.append((name, [dt, shape, offsets]))
            continue
        fields = [("dtype", dt), ("shape", shape), ("data_offsets", offsets)]
        if "drop_field" in flags:
            fields.pop(1)
        if "field_twice" in flags:
            fields.append(fields[0])
        fields += [f for f in flags if isinstance(f, tuple)]
        pairs.append((name, Obj(fields)))
    return enc(Obj(pairs)), data_len


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_files())
def test_mutated_headers_are_accepted_exactly_when_the_library_accepts_them(case):
    header, data_len = case
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "m.safetensors", header, data_len)
        lib_ok, lib = library(path)
        ok, got = ours(path)
        if ok:
            assert lib_ok, f"accepted what the library refuses ({lib}): {header}"
            assert {n: (t.dtype, t.shape) for n, t in got.tensors.items()} == lib
        else:
            assert str(path) in got and "\n" not in got
            assert not lib_ok or TOOL_ONLY in got, f"refused what the library accepts ({got}): {header}"


# ----------------------------------------------------------------------------- index and config files

E = 4
EXPERT = "model.layers.1.mlp.experts.2.up_proj.weight"


def call(main: Any, *argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code or 0)


def make_src(path: Path) -> Path:
    tensors, cfg = example_tensors("qwen3_moe", 2, E, 32, 24, seed=3)
    write_checkpoint(tensors, cfg, str(path), 20_000)
    return path


def refused(capsys: Any, tmp_path: Path, src: Path, *fragments: str) -> None:
    """fuse_experts on `src` exits 2 with one line holding every fragment, and creates no --dst."""
    dst = tmp_path / "out"
    code = call(fuse_experts.main, "--src", str(src), "--dst", str(dst), "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not dst.exists()


def test_float_data_offsets_in_a_checkpoint_are_refused(tmp_path, capsys):
    """The issue's case: a data offset written as a float (16384.5, or 16384.0) used to be rounded down and converted."""
    src = make_src(tmp_path / "src")
    shard = src / json.loads((src / INDEX).read_text())["weight_map"][EXPERT]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin, end = header[EXPERT]["data_offsets"]
    text = raw[8 : 8 + n].decode().replace(f'"data_offsets":[{begin},{end}]', f'"data_offsets":[{begin},{end}.0]')
    assert text != raw[8 : 8 + n].decode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n :])
    assert not library(shard)[0]
    refused(capsys, tmp_path, src, str(shard), repr(EXPERT), f"data_offsets [{begin}, {end}.0]")


def test_float_data_offsets_are_refused_under_torchrun(tmp_path):
    src = make_src(tmp_path / "src")
    shard = src / json.loads((src / INDEX).read_text())["weight_map"][EXPERT]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode()
    at = text.index('"data_offsets":[', text.index(EXPERT)) + len('"data_offsets":[')
    text = text[:at] + text[at:].replace(",", ".5,", 1)  # begin -> begin.5
    shard.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n :])
    proc = run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "out"), nproc=2, check=False)
    assert proc.returncode != 0 and str(shard) in proc.stderr and repr(EXPERT) in proc.stderr, proc.stderr
    assert ".5," in proc.stderr and not (tmp_path / "out" / INDEX).exists()
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_index_that_is_not_utf8_is_named(tmp_path, capsys):
    src = make_src(tmp_path / "src")
    (src / INDEX).write_bytes((src / INDEX).read_bytes().replace(b"model.norm", b"model.n\xf6rm"))
    refused(capsys, tmp_path, src, str(src / INDEX), "not valid UTF-8 (byte 0xf6 at offset")


def test_config_that_is_not_utf8_is_named(tmp_path, capsys):
    src = make_src(tmp_path / "src")
    (src / "config.json").write_bytes(b'{"model_type": "qwen3_moe\xc3"}')
    refused(capsys, tmp_path, src, str(src / "config.json"), "not valid UTF-8")


@pytest.mark.parametrize("name", [INDEX, "config.json"])
def test_oversized_json_files_are_refused_before_reading(tmp_path, capsys, monkeypatch, name):
    """An index or config above MAX_JSON_BYTES is refused from its size: not one byte of it is read."""
    src = make_src(tmp_path / "src")
    with open(src / name, "r+b") as f:  # sparse: the size alone is the problem
        f.truncate(MAX_JSON_BYTES + 1)
    read: list[str] = []
    real = Storage.read_bytes
    monkeypatch.setattr(Storage, "read_bytes", lambda self, rel: read.append(rel) or real(self, rel))
    refused(capsys, tmp_path, src, str(src / name), f"{MAX_JSON_BYTES + 1} bytes, more than the 64 MiB")
    assert name not in read


@pytest.mark.parametrize("value, shown", [
    ("sub/model-00001.safetensors", "'sub/model-00001.safetensors'"),
    ("./model-00001.safetensors", "'./model-00001.safetensors'"),
    ("..", "'..'"),
    ("", "''"),
    (None, "None"),
    ("s3:model.safetensors", "'s3:model.safetensors'"),
])
def test_weight_map_values_must_be_plain_file_names(tmp_path, capsys, value, shown):
    src = make_src(tmp_path / "src")
    index = json.loads((src / INDEX).read_text())
    index["weight_map"][EXPERT] = value
    (src / INDEX).write_text(json.dumps(index))
    refused(capsys, tmp_path, src, str(src / INDEX), f"refusing shard path {shown} for tensor {EXPERT!r}",
            "plain file name")


def test_weight_map_must_be_an_object(tmp_path, capsys):
    src = make_src(tmp_path / "src")
    (src / INDEX).write_text(json.dumps({"weight_map": [["a", "b"]]}))
    refused(capsys, tmp_path, src, str(src / INDEX), "has no weight_map object")


def _sharded_adapter(path: Path) -> Path:
    """A two-file peft-style adapter with its adapter_model.safetensors.index.json."""
    from adapter_fixtures import lora_config, random_lora

    path.mkdir(parents=True)
    key = "base_model.model.model.layers.{l}.self_attn.q_proj.lora_{f}.weight"
    weight_map = {}
    for layer in range(2):
        name = f"adapter_model-0000{layer + 1}-of-00002.safetensors"
        tensors = {key.format(l=layer, f="A"): random_lora((4, 16), layer), key.format(l=layer, f="B"): random_lora((16, 4), 9)}
        save_file(tensors, str(path / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (path / "adapter_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "adapter_config.json").write_text(json.dumps(lora_config(4, 8, target_modules=["q_proj"])))
    return path


@pytest.mark.parametrize("damage, fragment", [
    ("not_utf8", "not valid UTF-8"),
    ("escapes", "refusing shard path '../x.safetensors'"),
    ("config_not_utf8", "not valid UTF-8"),
])
def test_adapter_index_and_config_problems_are_named(tmp_path, capsys, damage, fragment):
    src = _sharded_adapter(tmp_path / "adapter")
    index = src / "adapter_model.safetensors.index.json"
    if damage == "not_utf8":
        index.write_bytes(index.read_bytes().replace(b"q_proj", b"q_pr\xffj", 1))
        culprit = index
    elif damage == "escapes":
        data = json.loads(index.read_text())
        first = sorted(data["weight_map"])[0]
        data["weight_map"][first] = "../x.safetensors"
        index.write_text(json.dumps(data))
        culprit = index
    else:
        culprit = src / "adapter_config.json"
        culprit.write_bytes(culprit.read_bytes().replace(b'"LORA"', b'"L\x80RA"'))
    dst = tmp_path / "out"
    code = call(split_adapter.main, "--src", str(src), "--dst", str(dst), "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert str(culprit) in err and fragment in err, err
    assert not dst.exists()
    assert os.path.exists(index)  # the user's files are left alone


# ----------------------------------------------------------------------------- declared dependencies

REPO_ROOT = Path(__file__).resolve().parent.parent
OWN = {"convert", "sharding", "launch", "bench", "configs"}
# Packages used through another one's API, invisible to an import scan: (source pattern, distribution).
IMPLICIT = [(".numpy()", "numpy"), ("from safetensors.torch import", "numpy")]


def _requirement_name(req: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


# Run by maintainers, never by a conversion: the family generator reads the installed transformers' table
# (tests/test_families.py checks that conversions run with transformers unimportable).
MAINTAINER_TOOLS = {REPO_ROOT / "convert" / "families" / "generate.py"}


def _imported_distributions(folders: list[str]) -> dict[str, set[str]]:
    """distribution -> files of `folders` that import it (function-level imports included) or use it implicitly."""
    import ast
    import importlib.metadata
    import sys

    dists_of = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path in MAINTAINER_TOOLS:
                continue
            text = path.read_text()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top in OWN:
                        continue
                    for dist in dists_of.get(top, [top]):
                        out.setdefault(_requirement_name(dist), set()).add(str(path.relative_to(REPO_ROOT)))
            for pattern, dist in IMPLICIT:
                if pattern in text:
                    out.setdefault(dist, set()).add(str(path.relative_to(REPO_ROOT)))
    return out


def test_every_package_the_tool_imports_at_run_time_is_declared():
    """convert/, sharding/, launch/, configs/ need only `dependencies`; bench/ also its `bench` extra (not `test`)."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    bench = core | {_requirement_name(r) for r in project["optional-dependencies"]["bench"]}
    for folders, declared in ((["convert", "sharding", "launch", "configs"], core), (["bench"], bench)):
        used = _imported_distributions(folders)
        missing = {d: sorted(files) for d, files in used.items() if d not in declared}
        assert not missing, f"imported by {folders} but not declared: {missing}"
    assert {"transformers", "peft"}.isdisjoint(_imported_distributions(["convert", "sharding", "launch"]))
