"""What a destination holds and who wrote it; what a job read, and whether it changed since.

A finished job leaves `.moe-convert/output.json` (the output record): every file it wrote,
in write order, with its size, plus the plan fingerprint and the tool version. It is written
after the shards and copied files and before the final marker (the index or
adapter_config.json), so "complete moe-convert output" = marker + record naming it. An
unfinished job's `.moe-convert/state.json` names the files it will write. `--overwrite`
removes only files one of the two names (plus `.incomplete` shards and the unique temp
files of write_bytes); a destination holding anything else is refused.

A destination is judged in one place, judge_destination: by the plan (beside the source's planning) and
again by rank 0 once it holds the destination's lock, whose verdict then says what the job does there.

Source pins (convert.io.pins.Pin, SourcePinning.pin: size, mtime, ctime, inode locally; size and
ETag/version on object stores) of every file a job reads are taken at plan time (convert.io.pins),
kept in the state file and checked at the start of a resume and before the commit. They are not part of the plan fingerprint,
so a resume after a source change names the file instead of calling it another job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from convert.engine.dest_lock import LockTimes, refuse_if_locked
from convert.engine.sinks import INCOMPLETE, LOCK_FILE, OUTPUT_RECORD, STATE_DIR, read_state
from convert.errors import ConversionError
from convert.io.pins import changed_pins, changed_text, pins_from_state
from convert.io.storage import Store

TOOL = "moe-convert"
UNVERIFIED = ".unverified"  # convert.verify.run.verify_after renames the marker of a wrong output so
_TEMP = re.compile(r"^(?P<base>.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # convert.io.storage.temp_name


def tool_version() -> str:
    """The installed moe-convert version, or "unknown" when running from a plain source tree."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(TOOL)
    except (ImportError, PackageNotFoundError):
        return "unknown"


def record_bytes(files: list[tuple[str, int]], fingerprint: str, marker: str, target: str | None = None) -> bytes:
    """The output record of a job that wrote `files` ((name, size) in write order, `marker` last); `target`: the
    adapter target (configs/targets) the output was written for, if any."""
    doc: dict[str, Any] = {"tool": TOOL, "version": tool_version(), "fingerprint": fingerprint, "marker": marker,
                           "files": [{"name": name, "size": size} for name, size in files]}
    if target is not None:
        doc["target"] = target
    return (json.dumps(doc, indent=1) + "\n").encode()


def read_record(dst: Store) -> dict[str, Any] | None:
    """The output record in `dst` if there is a well-formed one written by this tool, else None."""
    try:
        if not dst.exists(OUTPUT_RECORD):
            return None
        doc = json.loads(dst.read_bytes(OUTPUT_RECORD))
    except (ValueError, OSError, ConversionError):
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or doc.get("tool") != TOOL or not all(
        isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int) for f in files
    ):
        return None
    return {**doc, "files": [(f["name"], f["size"]) for f in files]}


def is_complete_output(dst: Store, marker: str) -> bool:
    """True when `dst` holds a complete moe-convert output whose final marker is `marker`.

    That is: an output record naming `marker`, and every file it lists present with its recorded size.
    """
    if not dst.exists() or not dst.isdir():
        return False
    record = read_record(dst)
    if record is None or record.get("marker") != marker:
        return False
    sizes = dst.file_sizes()
    return all(sizes.get(name) == size for name, size in record["files"])


@dataclass
class Contents:
    """A destination's top-level entries, split into what this tool wrote and everything else."""

    owned: list[str] = field(default_factory=list)  # files, in the order to remove them (markers first)
    foreign: list[str] = field(default_factory=list)  # files and directories this tool did not write
    changed: list[str] = field(default_factory=list)  # recorded files whose size is no longer the recorded one


def classify(dst: Store) -> Contents:
    """What of `dst` (an existing directory) the output record and the job state say this tool wrote."""
    sizes = dst.file_sizes()
    _, dirs = dst.list_dir()
    record = read_record(dst) or {"files": []}
    state = read_state(dst) or {}
    out = Contents()
    ordered: list[str] = []
    for name, size in reversed(record["files"]):  # reverse write order: the marker first
        for candidate in (name, name + UNVERIFIED):
            if candidate in sizes:
                (ordered if sizes[candidate] == size else out.changed).append(candidate)
    outputs = [n for n in state.get("outputs", []) if isinstance(n, str)]
    for name in reversed(outputs):
        for candidate in (name, name + INCOMPLETE):
            if candidate in sizes and candidate not in ordered and candidate not in out.changed:
                ordered.append(candidate)
    if state:  # shards of an unfinished job (also one whose state predates the outputs list)
        ordered += [n for n in sorted(sizes) if n.endswith(".safetensors" + INCOMPLETE) and n not in ordered]
    for name in sorted(sizes):
        m = _TEMP.match(name)
        if m and (m.group("base") in ordered or m.group("base") in outputs) and name not in ordered:
            ordered.append(name)
    out.owned = ordered
    out.foreign = [n for n in sorted(sizes) if n not in ordered and n not in out.changed]
    out.foreign += [d + "/" for d in dirs if d != STATE_DIR]
    return out


def refuse_foreign(dst: Store, contents: Contents) -> None:
    """Raise the --overwrite refusal for a destination holding files this tool did not write (if any)."""
    if contents.changed:
        raise ConversionError(
            f"--dst {dst.url}: {contents.changed[0]} was changed after moe-convert wrote it; --overwrite only replaces "
            "files exactly as moe-convert left them: move it away or choose another --dst"
        )
    if contents.foreign:
        shown = ", ".join(contents.foreign[:2]) + (f" and {len(contents.foreign) - 2} more" if len(contents.foreign) > 2 else "")
        raise ConversionError(
            f"--dst {dst.url} holds files moe-convert did not write ({shown}); --overwrite only replaces "
            "a moe-convert output: choose an empty or new directory"
        )


@dataclass
class Verdict:
    """What a job does in its destination (judge_destination): start afresh, resume, or, with --overwrite, first
    remove what an earlier moe-convert job wrote there."""

    resume: bool = False  # an unfinished job with this plan (and unchanged source files): resumed
    replace: Contents | None = None  # --overwrite of a destination holding an earlier output: what to remove


def judge_destination(src: Store, dst: Store, overwrite: bool, marker: str, fp: str, *,
                      holds: bool | None = None, locked: bool = False, times: LockTimes | None = None) -> Verdict:
    """The one judgment of a job's destination (whose output is complete with `marker`; `fp`: the plan's
    fingerprint). Refuses (ConversionError) what would lose data or overlap the source; see check_existing.

    `holds`: look_at_destination()'s answer where the plan took it already (beside its reading of the source).
    `locked`: rank 0 holds the destination's lock (so it is a directory, and the place was checked by the plan).
    `times`: the lock's times (the job's Settings) for a look at another job's lock on an object store.
    """
    if holds is None:
        holds = not holds_only_a_lock(dst) if locked else look_at_destination(src, dst)
    if not holds:
        return Verdict()
    return check_existing(src, dst, overwrite, marker, fp, times)


def look_at_destination(src: Store, dst: Store) -> bool:
    """The first half of judge_destination, which needs no plan: refuse a destination that is or holds the
    source, or is a file; True when it holds anything but a job's lock (for check_existing to judge)."""
    s, d = src.place(), dst.place()
    if d == s or d.startswith(s.rstrip("/") + "/"):
        raise ConversionError(f"--dst {dst.url} is the source or inside it; choose a directory outside --src")
    if s.startswith(d.rstrip("/") + "/"):
        raise ConversionError(f"--dst {dst.url} contains the source {src.url}; choose another directory")
    if not dst.exists():
        return False
    if not dst.isdir():
        raise ConversionError(f"--dst {dst.url} exists and is not a directory")
    files, dirs = dst.list_dir()
    return bool(files or dirs) and not _only_a_lock(dst, files, dirs)


def holds_only_a_lock(dst: Store) -> bool:
    """True where `dst` holds nothing but a job's lock."""
    files, dirs = dst.list_dir()
    return _only_a_lock(dst, files, dirs)


def _only_a_lock(dst: Store, files: list[str], dirs: list[str]) -> bool:
    """True where `dst`, whose top level lists `files` and `dirs`, holds nothing but a job's lock (a running job's,
    or one a crashed job left): such a destination counts as empty."""
    if files or dirs != [STATE_DIR]:
        return False
    inner, below = dst.list_dir(STATE_DIR)
    return not below and set(inner) <= {LOCK_FILE.rsplit("/", 1)[1]}


def check_existing(src: Store, dst: Store, overwrite: bool, marker: str, fp: str,
                   times: LockTimes | None = None) -> Verdict:
    """Decide about an existing, non-empty destination directory (judge_destination).

    Refuses (ConversionError): a destination another running job holds the lock of (DestinationInUse,
    convert.engine.dest_lock); a `marker` moe-convert did not write, with or without --overwrite;
    with --overwrite, anything moe-convert did not write; without it, a complete output, an
    unfinished job of another plan, or one whose source files changed since (named).
    """
    refuse_if_locked(dst, times)  # a job writing there now is named, whatever else the destination holds
    contents = classify(dst)
    if marker in contents.foreign:
        raise ConversionError(
            f"--dst {dst.url} holds {marker} but is not a moe-convert output (no {OUTPUT_RECORD} naming it); "
            "it will not be overwritten: choose an empty or new directory"
        )
    if overwrite:
        refuse_foreign(dst, contents)
        return Verdict(replace=contents)
    if is_complete_output(dst, marker):
        raise ConversionError(f"--dst {dst.url} already holds a complete conversion ({marker}); pass --overwrite to redo it")
    state = read_state(dst)
    if state is not None:
        pins = pins_from_state(state)
        changed = changed_pins(src, pins) if pins is not None else []
        if state.get("fingerprint") == fp and not changed:
            return Verdict(resume=True)
        if state.get("fingerprint") == fp:
            raise ConversionError(
                f"{changed_text(changed, 'since the interrupted run')}; the unfinished conversion in --dst {dst.url} "
                "cannot be resumed: pass --overwrite to start over"
            )
        why = f" ({changed_text(changed, 'since')})" if changed else ""
        raise ConversionError(
            f"--dst {dst.url} holds an unfinished conversion of a different source or options{why}; "
            "pass --overwrite to discard it"
        )
    if contents.foreign or contents.changed:
        shown = ", ".join((contents.changed + contents.foreign)[:2])
        raise ConversionError(f"--dst {dst.url} exists and is not empty ({shown}); choose an empty or new directory")
    raise ConversionError(f"--dst {dst.url} exists and is not empty (an earlier moe-convert output); "
                          "pass --overwrite to replace it")
