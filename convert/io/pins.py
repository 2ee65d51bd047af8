"""Source pins: what identifies a file's content without reading it, and the checks a job makes of them.

Every store has one `SourcePinning` object (its `pinning`, convert.io.storage.store.Store): it takes a `Pin`
per file (pin, pins) and holds the store's reads to them where the store takes conditions (expect,
probe_conditions, reads_pinned). A job's pins are a `SourcePins` (file name -> Pin), taken at plan time
(source_pins), kept in the state file as they are (a JSON object of JSON objects: pins_from_state reads them
back), and compared with pins taken later (changed_pins, check_pins), which name the files that changed. How a
pin is taken and how reads are held to it is each store kind's (convert.io.storage); this module types the pins
and the pinning object and compares pins, reaching a store through `PinSource` (its pinning and display).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypedDict, runtime_checkable

from convert.errors import ConversionError

STATE_KEY = "pins"  # the entry of the state file (.moe-convert/state.json) holding a job's SourcePins


class Pin(TypedDict, total=False):
    """One file's pin (SourcePinning.pin): two equal pins mean the file was not rewritten in between. Each kind records
    some of these fields; the object-store ones are fsspec info() fields, kept under fsspec's names
    (convert.io.storage.fsspec_storage.PIN_KEYS, PIN_TIME_KEYS) as strings."""

    size: int  # every kind: the file's size in bytes
    mtime_ns: int  # LocalStorage: st_mtime_ns (an in-place rewrite changes it)
    ctime_ns: int  # LocalStorage: st_ctime_ns
    ino: int  # LocalStorage: the inode (a replacement of the file changes it)
    ETag: str  # S3Storage (from its listing or a HEAD); FsspecStorage where info() gives it
    etag: str  # FsspecStorage where info() gives the ETag under this name
    VersionId: str  # S3Storage on a versioned bucket (a HEAD gives it, a listing not); FsspecStorage likewise
    version_id: str  # FsspecStorage where info() gives it (an identity field, fsspec_storage.PIN_KEYS)
    generation: str  # FsspecStorage where info() gives it (an identity field)
    md5Hash: str  # FsspecStorage where info() gives it (an identity field)
    LastModified: str  # FsspecStorage where info() gives none of the identity fields (a time, PIN_TIME_KEYS)
    last_modified: str  # FsspecStorage, likewise
    mtime: str  # FsspecStorage, likewise
    updated: str  # FsspecStorage, likewise

SourcePins = dict[str, Pin]  # file name (relative to the store) -> its Pin: the pins of a job's source files


@runtime_checkable
class SourcePinning(Protocol):
    """A store's source pins: what identifies each file's content without reading it, and how reads are held to
    it (every store has one: convert.io.storage.store.Store.pinning; each kind says which Pin fields it takes)."""

    def pin(self, rel: str) -> Pin:
        """The current pin of the file `rel` (FileNotFoundError where it is gone)."""
        ...

    def pins(self, names: Sequence[str], like: SourcePins | None = None,
             workers: int | None = None, listed: bool = False) -> SourcePins:
        """name -> pin(name) for each of `names`, with as few requests (up to `workers` at once) as the store allows."""
        ...

    def expect(self, pins: SourcePins) -> None:
        """Make later reads of the files of `pins` conditional on their pins, where the store takes conditions."""
        ...

    def probe_conditions(self, pins: SourcePins) -> None:
        """Start finding out in the background whether the store applies expect()'s conditions (else nothing)."""
        ...

    def reads_pinned(self, names: Iterable[str]) -> bool:
        """True where every read of `names` was held to its pin: no check of the pins after the reads is needed."""
        ...


class PinSource(Protocol):
    """What the checks of this module call on a store (convert.io.storage.store.Store has it)."""

    @property
    def pinning(self) -> SourcePinning:
        """The store's source pins."""
        ...

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it, for messages."""
        ...


def source_pins(src: PinSource, names: list[str]) -> SourcePins:
    """name -> pin of each source file a job reads or copies (metadata only; from the plan's own listing of the
    source where it saw them all)."""
    return src.pinning.pins(names, listed=True)


def changed_pins(src: PinSource, pins: SourcePins) -> list[tuple[str, str]]:
    """(file as the user names it, what changed) for each pinned file that is no longer as pinned."""
    out = []
    pinning = src.pinning
    try:
        current = pinning.pins(list(pins), like=pins)
    except FileNotFoundError:  # which one: ask them one by one
        current = {}
    for name, pin in sorted(pins.items()):
        try:
            now = current[name] if name in current else pinning.pin(name)
        except FileNotFoundError:
            out.append((src.display(name), "deleted"))
            continue
        diff = [k for k in sorted(set(pin) | set(now)) if pin.get(k) != now.get(k)]
        if diff:
            out.append((src.display(name), "/".join(diff)))
    return out


def changed_text(changed: list[tuple[str, str]], when: str) -> str:
    """The message naming the first of the `changed` files (changed_pins' answer, not empty) and how many more."""
    name, what = changed[0]
    more = f", and {len(changed) - 1} more file(s)" if len(changed) > 1 else ""
    return f"source file {name} changed {when} ({what} differ{more})"


def check_pins(src: PinSource, pins: SourcePins, when: str, then: str) -> None:
    """Raise ConversionError "source file X changed <when> (<fields> differ); <then>" if any pinned file changed."""
    changed = changed_pins(src, pins)
    if changed:
        raise ConversionError(f"{changed_text(changed, when)}; {then}")


def pins_from_state(state: Mapping[str, Any]) -> SourcePins | None:
    """The SourcePins a state file (`state`: its JSON object) holds under STATE_KEY, or None where it holds none
    (or something else there)."""
    pins = state.get(STATE_KEY)
    return pins if isinstance(pins, dict) else None
