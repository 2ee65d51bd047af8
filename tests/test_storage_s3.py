"""Storage's control-plane requests on S3 (moto's server): pins from one listing, batched removals, parallel copies.

Each test checks what the job relies on (a changed or deleted source is still found; what is removed
is exactly what was named) and, through tests/s3_server.FlakyProxy, which requests carry it.
"""

from __future__ import annotations

import gc
import warnings

import pytest

from convert.errors import ConversionError
from convert.io.pins import changed_pins, check_pins, source_pins
from convert.io.storage import Storage
from s3_server import FlakyProxy

BUCKET = "moe-storage"
NAMES = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "tokenizer.json"]


def _put(fs, prefix: str, names: list[str] = NAMES) -> None:
    for i, name in enumerate(names):
        fs.pipe(f"{BUCKET}/{prefix}/{name}", f"{name} v1 {i}".encode())


def test_pins_from_one_listing_equal_per_file_pins(s3, s3env):
    _put(s3env, "pins")
    proxy = FlakyProxy(s3.port, every=0, deny=lambda method, path: method == "HEAD")
    try:
        st = Storage(f"s3://{BUCKET}/pins", {"endpoint_url": proxy.url})
        pins = st.pinning.pins(NAMES)
        assert proxy.denied == 0 and proxy.seen == 1, "pins of one directory: one listing, no HEAD"
    finally:
        proxy.stop()
    direct = Storage(f"s3://{BUCKET}/pins")
    assert pins == {n: direct.pinning.pin(n) for n in NAMES}  # the same fields a HEAD gives
    assert all(set(p) == {"size", "ETag"} for p in pins.values()), pins


def test_listed_pins_still_find_a_changed_or_deleted_source(s3, s3env):
    _put(s3env, "changed")
    st = Storage(f"s3://{BUCKET}/changed")
    pins = st.pinning.pins(NAMES)
    assert changed_pins(st, pins) == []
    s3env.pipe(f"{BUCKET}/changed/model-00002-of-00002.safetensors", b"rewritten, same prefix, longer")
    changed = dict(changed_pins(st, pins))
    assert list(changed) == [f"s3://{BUCKET}/changed/model-00002-of-00002.safetensors"], changed
    assert "ETag" in changed[f"s3://{BUCKET}/changed/model-00002-of-00002.safetensors"]
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors changed during the conversion"):
        check_pins(st, pins, "during the conversion", "not committed")
    s3env.rm(f"{BUCKET}/changed/config.json")
    with pytest.raises(OSError, match="config.json"):
        check_pins(st, {"config.json": pins["config.json"]}, "during the conversion", "not committed")


@pytest.mark.parametrize("store", ["applies If-Match", "ignores If-Match"])
def test_reads_count_as_pinned_only_where_the_store_refuses_an_unmet_condition(s3, s3env, store):
    """SourcePinning.probe_conditions asks the store once (a 1-byte GET on an ETag no object has); reads count as pinned
    (no listing of the source after them) only where it was refused with 412: moto's server applies If-Match, and
    behind a proxy that drops the header it is a store that ignores it."""
    _put(s3env, "probe")
    proxy = FlakyProxy(s3.port, every=0, drop_headers=("If-Match",) if store == "ignores If-Match" else ())
    try:
        st = Storage(f"s3://{BUCKET}/probe", {"endpoint_url": proxy.url})
        pins = st.pinning.pins(NAMES)
        st.pinning.expect(pins)
        assert not st.pinning.reads_pinned(NAMES), "not before the store was asked"
        seen = proxy.seen
        st.pinning.probe_conditions(pins)
        assert st.pinning.reads_pinned(NAMES) == (store == "applies If-Match")
        assert proxy.seen == seen + 1 and proxy.ranges[-1] == "bytes=0-0", "one GET of the first byte"
        st.pinning.probe_conditions(pins)
        assert st.pinning.reads_pinned(NAMES) == (store == "applies If-Match") and proxy.seen == seen + 1, "asked once"
    finally:
        proxy.stop()


def test_connect_sets_the_client_up_now(s3, s3env):
    """Storage.connect (the ranks' S3 clients, set up while rank 0 plans) makes the client at once: s3fs's
    set_session is a coroutine, and calling it unawaited made none (and warned once collected)."""
    st = Storage(f"s3://{BUCKET}/connect", {"skip_instance_cache": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unawaited coroutine's RuntimeWarning fails here
        st.connect()
        gc.collect()
    assert st.fs._s3 is not None  # s3fs's client


def test_pins_taken_by_head_with_more_fields_are_compared_by_head(s3, s3env):
    """A pin from an earlier run with a field no listing gives (a VersionId) is checked against a HEAD, not dropped."""
    _put(s3env, "versioned")
    st = Storage(f"s3://{BUCKET}/versioned")
    pins = st.pinning.pins(NAMES)
    old = {**pins, "config.json": {**pins["config.json"], "VersionId": "v-earlier"}}
    changed = changed_pins(st, old)
    assert changed == [(f"s3://{BUCKET}/versioned/config.json", "VersionId")], changed


def test_remove_many_removes_exactly_the_named_files_in_one_request(s3, s3env):
    _put(s3env, "rm")
    proxy = FlakyProxy(s3.port, every=0)
    try:
        st = Storage(f"s3://{BUCKET}/rm", {"endpoint_url": proxy.url})
        st.remove_many(["config.json", "tokenizer.json", "never-written.json"])  # an absent one is fine
        assert proxy.seen == 1, "one DeleteObjects request"
    finally:
        proxy.stop()
    left = sorted(p.rsplit("/", 1)[1] for p in s3env.ls(f"{BUCKET}/rm", refresh=True))
    assert left == sorted(set(NAMES) - {"config.json", "tokenizer.json"})


def test_clear_state_keeps_the_output_record(s3, s3env):
    from convert.engine.sinks import OUTPUT_RECORD, STATE_FILE, clear_state

    _put(s3env, "state", [STATE_FILE, OUTPUT_RECORD, ".moe-convert/done-1.txt", "model.safetensors.index.json"])
    st = Storage(f"s3://{BUCKET}/state")
    clear_state(st)
    left = sorted(p.split("/state/", 1)[1] for p in s3env.find(f"{BUCKET}/state"))
    assert left == [OUTPUT_RECORD, "model.safetensors.index.json"]
    clear_state(Storage(f"s3://{BUCKET}/no-such-prefix"))  # nothing to clear: no error


@pytest.mark.parametrize("tensors,gets", [(3, 1), (6000, 2)])
def test_a_shard_header_comes_in_one_read_unless_it_is_longer_than_the_prefix(s3, s3env, tmp_path, tensors, gets):
    """From S3 one ranged GET of the first HEADER_PREFIX bytes holds a usual header; a longer one takes a
    second GET. Either way the header equals the one read from a local copy of the file."""
    import torch
    from safetensors.torch import save_file

    from convert.formats.safetensors import HEADER_PREFIX, read_header

    path = tmp_path / "model.safetensors"
    save_file({f"model.layers.{i}.mlp.experts.{i % 128}.gate_up_proj.weight_scale_inv": torch.zeros(2, dtype=torch.uint8)
               for i in range(tensors)}, str(path))
    local = read_header(Storage(str(tmp_path)), "model.safetensors")
    assert (local.data_start > HEADER_PREFIX) == (gets == 2)
    s3env.put(str(path), f"{BUCKET}/headers{tensors}/model.safetensors")
    seen: list[tuple[str, str]] = []
    proxy = FlakyProxy(s3.port, every=0, deny=lambda method, path: seen.append((method, path)) or False)
    try:
        remote = read_header(Storage(f"s3://{BUCKET}/headers{tensors}", {"endpoint_url": proxy.url}),
                             "model.safetensors")
    finally:
        proxy.stop()
    reads = [p for m, p in seen if m == "GET" and "model.safetensors" in p and "list-type" not in p]
    assert len(reads) == gets, seen
    assert remote.tensors == local.tensors and remote.data_start == local.data_start


def test_a_source_on_s3_is_listed_once_and_a_missing_or_object_source_is_refused(s3, s3env, tmp_path):
    """open_checkpoint lists an S3 source once (no separate directory check) and reads config.json beside the
    index and headers; a prefix with nothing below it, or an object, is refused as no directory."""
    import json

    import torch
    from safetensors.torch import save_file

    from convert.formats.checkpoint import open_checkpoint

    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    for name in ("model.safetensors", "config.json"):
        s3env.put(str(tmp_path / name), f"{BUCKET}/ckpt/{name}")
    seen: list[tuple[str, str]] = []
    proxy = FlakyProxy(s3.port, every=0, deny=lambda method, path: seen.append((method, path)) or False)
    try:
        ckpt = open_checkpoint(Storage(f"s3://{BUCKET}/ckpt", {"endpoint_url": proxy.url}))
        for url in (f"s3://{BUCKET}/nothing-here", f"s3://{BUCKET}/ckpt/config.json"):
            with pytest.raises(ConversionError, match=f"{url}: source is not a directory"):
                open_checkpoint(Storage(url, {"endpoint_url": proxy.url}))
    finally:
        proxy.stop()
    assert sorted(ckpt.tensors) == ["a", "b"] and ckpt.config == {"model_type": "x"}
    first = seen[: next(i for i, (m, p) in enumerate(seen) if "nothing-here" in p)]
    assert len([p for m, p in first if "list-type" in p]) == 1, first


def test_a_small_file_is_copied_within_one_store_by_one_server_side_copy(s3, s3env):
    """Within one store (same endpoint and credentials) copy_file_from sends one request and reads no bytes
    through the client; across stores it reads, then writes. Both give the same bytes."""
    s3env.pipe(f"{BUCKET}/copy-src/tokenizer.json", b'{"vocab": [1, 2, 3]}')
    seen: list[tuple[str, str]] = []
    proxy = FlakyProxy(s3.port, every=0, deny=lambda method, path: seen.append((method, path)) or False)
    try:
        opts = {"endpoint_url": proxy.url}
        Storage(f"s3://{BUCKET}/copy-dst", opts).copy_file_from(Storage(f"s3://{BUCKET}/copy-src", opts),
                                                                "tokenizer.json")
        same = list(seen)
        seen.clear()
        Storage(f"s3://{BUCKET}/copy-dst2", opts).copy_file_from(Storage(f"s3://{BUCKET}/copy-src"), "tokenizer.json")
    finally:
        proxy.stop()
    assert [m for m, _ in same] == ["PUT"], same
    assert ("PUT", f"/{BUCKET}/copy-dst2/tokenizer.json") in seen, seen  # the other store's bytes come through here
    for d in ("copy-dst", "copy-dst2"):
        assert s3env.cat(f"{BUCKET}/{d}/tokenizer.json") == b'{"vocab": [1, 2, 3]}'


def _read_in_chunks(st: Storage, name: str, start: int, end: int, chunk: int) -> bytes:
    out = bytearray(end - start)
    with st.open_range(name, start, end) as stream:
        for off in range(0, end - start, chunk):
            stream.readinto(memoryview(out)[off : min(off + chunk, end - start)])
    return bytes(out)


def test_a_range_is_read_by_one_streamed_request_and_resumed_where_its_body_broke(s3, s3env):
    """Store.open_range (S3RangeReader): one ranged GET serves many reads in order; a body cut off mid-stream is
    asked again from its first missing byte (not from the start, not skipping any), and the bytes are exact."""
    data = bytes(range(256)) * 40_000  # 10 MB
    s3env.pipe(f"{BUCKET}/stream/blob.bin", data)
    broken = [1]

    def cut(method: str, path: str, rng: str | None) -> bool:
        if method == "GET" and rng and broken[0]:
            broken[0] -= 1
            return True
        return False

    proxy = FlakyProxy(s3.port, every=0, cut=cut)
    try:
        st = Storage(f"s3://{BUCKET}/stream", {"endpoint_url": proxy.url})
        whole = _read_in_chunks(st, "blob.bin", 1000, 9_001_000, 1 << 20)
        ranges = list(proxy.ranges)
        proxy.ranges.clear()
        again = _read_in_chunks(st, "blob.bin", 5, 3_000_005, 1 << 20)
    finally:
        proxy.stop()
    assert whole == data[1000:9_001_000]
    assert proxy.cut_bodies == 1
    # The first GET's body broke after half its bytes (4.5 MB) were sent: the second asks from the first byte not
    # received (the connection's reset may drop some sent bytes the client had not read yet), to the same end.
    assert len(ranges) == 2 and ranges[0] == "bytes=1000-9000999", ranges
    resumed = ranges[1].removeprefix("bytes=").split("-")
    assert 1000 < int(resumed[0]) <= 4_501_000 and resumed[1] == "9000999", ranges
    assert again == data[5:3_000_005] and proxy.ranges == ["bytes=5-3000004"]  # unbroken: one request


def test_a_range_past_the_end_of_an_object_is_an_error_naming_it(s3, s3env):
    s3env.pipe(f"{BUCKET}/stream/short.bin", b"x" * 1000)
    st = Storage(f"s3://{BUCKET}/stream")
    with pytest.raises(ConversionError, match=r"short\.bin: expected bytes up to offset 2000, the object ends at 1000"):
        _read_in_chunks(st, "short.bin", 500, 2000, 1500)


def test_a_plans_pins_come_from_its_own_listing_and_still_find_a_change(s3, s3env):
    """source_pins after the plan's listing sends no request; a file changed after that listing is still found."""
    _put(s3env, "planned")
    seen: list[str] = []
    proxy = FlakyProxy(s3.port, every=0, deny=lambda method, path: seen.append(method) or False)
    try:
        st = Storage(f"s3://{BUCKET}/planned", {"endpoint_url": proxy.url})
        st.list_dir()
        before = len(seen)
        pins = source_pins(st, NAMES)
        assert len(seen) == before, "pins from the plan's own listing: no request"
    finally:
        proxy.stop()
    assert pins == Storage(f"s3://{BUCKET}/planned").pinning.pins(NAMES)
    s3env.pipe(f"{BUCKET}/planned/tokenizer.json", b"changed after the listing")
    assert [n for n, _ in changed_pins(Storage(f"s3://{BUCKET}/planned"), pins)] == [
        f"s3://{BUCKET}/planned/tokenizer.json"]
    fresh = Storage(f"s3://{BUCKET}/planned")  # no listing of its own: pins are asked for
    assert fresh.pinning.pins(NAMES, listed=True)["tokenizer.json"] != pins["tokenizer.json"]


def test_headers_are_read_beside_the_index_and_a_shard_it_does_not_name_is_never_judged(s3, s3env, tmp_path):
    """An S3 source's listed shards have their headers read at once, beside the index (the index no longer goes
    first); a listed file the index does not name (here: not a safetensors file at all) changes nothing."""
    import json
    import threading
    import time

    import torch
    from safetensors.torch import save_file

    from convert.formats.checkpoint import open_checkpoint

    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        s3env.put(str(tmp_path / name), f"{BUCKET}/early/{name}")
    s3env.pipe(f"{BUCKET}/early/model.safetensors.index.json", json.dumps(index).encode())
    s3env.pipe(f"{BUCKET}/early/config.json", b'{"model_type": "x"}')
    s3env.pipe(f"{BUCKET}/early/consolidated.safetensors", b"\xff" * 64)  # garbage no index names
    spans: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    def note(method: str, path: str) -> bool:
        name = path.split("?")[0].rsplit("/", 1)[-1]
        with lock:
            spans.setdefault(name, (time.monotonic(), 0.0))
        if name == "model.safetensors.index.json":
            time.sleep(0.6)  # a slow index: headers that waited for it would be asked for 0.6 s later
        return False
    proxy = FlakyProxy(s3.port, every=0, deny=note)
    try:
        ckpt = open_checkpoint(Storage(f"s3://{BUCKET}/early", {"endpoint_url": proxy.url}))
    finally:
        proxy.stop()
    assert sorted(ckpt.tensors) == ["a", "b"] and sorted(ckpt.headers) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "consolidated.safetensors" in spans, "every listed shard's header is asked for"
    # every header request was sent before the (slow) index's answer could have named its shard
    index_sent = spans["model.safetensors.index.json"][0]
    assert all(spans[n][0] - index_sent < 0.4 for n in ckpt.headers), spans
