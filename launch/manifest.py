"""Batch manifests: read one and check every job against its entry point's own command line.

A manifest (YAML or JSON) is `{defaults: {...}, jobs: [{name, kind, ...}, ...]}`. Every job key
but `name` and `kind` is a flag of that kind's entry point, spelled as on the command line
without the leading dashes, with `_` or `-` (`max_shard_size` or `max-shard-size`); no
abbreviations. Values: a string or number is the flag's value, `true`/`false` switch a flag
on/off, a mapping or list is passed as JSON (`storage_options`), `null` keeps the default.
Each job is turned into the argv of its entry point and parsed by that entry point's argparse
parser, so a manifest accepts exactly what the command line accepts. `defaults` applies to
every job whose kind has that flag (and each defaults key must apply to some job), with one
exception: `max_shard_size` applies to a job writing for a `--target` (adapter kinds) only where
that target reads a sharded adapter (configs/targets `sharded`: SGLang, per-expert); for vLLM and
peft the adapter is written as one adapter_model.safetensors and the job's line notes it, and a
job's own `max_shard_size` for such a target is refused (the command line only warns: a batch
runs unattended and would report the unreadable output `done`).

Every job is checked before any runs; the first problem refuses the whole manifest with one
line naming the file, the job and the key (ConversionError).
"""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any, NoReturn

import yaml

from convert.errors import ConversionError
from convert.kinds import KINDS, entry_point

RESERVED = ("name", "kind")
NOTES = "notes"  # a checked job's notes for its summary line (load_manifest), not a flag
# Flags of the entry points that have no meaning inside a batch (the batch's launcher sets the ranks).
CLI_ONLY = {"help", "nproc", "nproc_per_node"}


class _Refused(Exception):
    """An argparse error raised instead of printing usage and exiting."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def manifest_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.Action]]:
    """Manifest key (`_` spelling) -> (option string, action) for every long flag of `parser`."""
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            key = opt[2:].replace("-", "_")
            if opt.startswith("--") and key not in CLI_ONLY:
                out[key] = (opt, action)
    return out


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"


def job_argv(job: dict[str, Any], kind: str, flags: dict[str, tuple[str, argparse.Action]], where: str) -> tuple[list[str], dict[str, str]]:
    """The command line of one manifest job, and option string -> the key as written (for messages)."""
    argv: list[str] = []
    written: dict[str, str] = {}
    for raw, value in job.items():
        if raw in RESERVED:
            continue
        key = raw.replace("-", "_") if isinstance(raw, str) else repr(raw)
        if key not in flags:
            raise ConversionError(f"{where}: unknown key {raw!r} for kind {kind} ({_suggest(key, list(flags))})")
        opt, action = flags[key]
        if opt in written:
            raise ConversionError(f"{where}: {written[opt]!r} and {raw!r} are the same flag {opt}; give it once")
        written[opt] = raw
        if action.nargs == 0:  # a switch such as --dry-run
            if not isinstance(value, bool):
                raise ConversionError(f"{where}: {raw}: expected true or false, got {value!r}")
            if value:
                argv.append(opt)
        elif value is None:
            continue
        elif isinstance(value, bool):
            raise ConversionError(f"{where}: {raw}: expected a value for {opt}, got {str(value).lower()}")
        elif isinstance(value, (dict, list)):
            argv.append(f"{opt}={json.dumps(value)}")
        else:
            argv.append(f"{opt}={value}")
    return argv, written


def parse_job(job: dict[str, Any], kind: str, where: str) -> argparse.Namespace:
    """Parse one manifest job with its kind's own parser; raises ConversionError naming `where` and the key."""
    parser = entry_point(kind).build_parser()
    parser.allow_abbrev = False
    parser.exit_on_error = False

    def refuse(message: str) -> NoReturn:
        raise _Refused(message)

    parser.error = refuse  # type: ignore[method-assign]  # on purpose: this parser's errors raise, not exit
    argv, written = job_argv(job, kind, manifest_flags(parser), where)
    if "--no-progress" not in argv and "--no-progress" in parser._option_string_actions:
        argv.append("--no-progress")
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        opt = exc.argument_name or ""
        key = written.get(opt.split("/")[-1], opt.lstrip("-"))
        raise ConversionError(f"{where}: {key}: {exc.message}") from None
    except _Refused as exc:
        text = str(exc)
        prefix = "the following arguments are required: "
        if text.startswith(prefix):
            missing = [o.strip().lstrip("-").replace("-", "_") for o in text[len(prefix):].split(",")]
            text = f"missing required key(s) for kind {kind}: {', '.join(missing)}"
        raise ConversionError(f"{where}: {text}") from None


def load_manifest(path: str) -> list[dict[str, Any]]:
    """Every job of the manifest at `path`, checked and parsed, before any runs.

    Returns one dict per job: `name`, `kind`, `notes` (lines for its summary row) and its parsed
    flags (argparse dests, e.g. `max_shard_size` in bytes, `storage_options` a dict). Raises
    ConversionError (one line naming the file, the job and the key) on the first problem.
    """
    try:
        with open(path) as fh:
            doc = yaml.load(fh, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionError(f"{path}: cannot read manifest ({' '.join(str(exc).split())})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise ConversionError(f"{path}: expected a mapping with a 'jobs' list")
    extra = sorted(str(k) for k in doc if k not in ("defaults", "jobs"))
    if extra:
        raise ConversionError(f"{path}: unknown top-level key {extra[0]!r} ({_suggest(extra[0], ['defaults', 'jobs'])})")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConversionError(f"{path}: defaults is not a mapping")
    if "name" in defaults:
        raise ConversionError(f"{path}: defaults: 'name' is per job")
    jobs: list[dict[str, Any]] = []
    used_defaults: set[Any] = set()
    for i, raw in enumerate(doc["jobs"]):
        where = f"{path}: jobs[{i}]"
        if not isinstance(raw, dict):
            raise ConversionError(f"{where}: is not a mapping")
        name = str(raw["name"]) if raw.get("name") is not None else f"job{i}"
        if raw.get("name") is not None:
            where = f"{path}: job {name!r}"
        kind = raw.get("kind", defaults.get("kind"))
        if kind not in KINDS:
            hint = _suggest(str(kind), list(KINDS)) if kind else f"known kinds: {', '.join(KINDS)}"
            raise ConversionError(f"{where}: {'unknown kind ' + repr(kind) if kind else 'no kind'} ({hint})")
        if any(j["name"] == name for j in jobs):
            raise ConversionError(f"{where}: the name {name!r} is used by an earlier job; names must be unique")
        known = manifest_flags(entry_point(kind).build_parser())
        applied = {k: v for k, v in defaults.items() if k in RESERVED or str(k).replace("-", "_") in known}
        used_defaults |= set(applied)
        args = parse_job({**applied, **raw}, kind, where)
        notes = _unread_shards(args, raw, where)
        jobs.append({**vars(args), "name": name, "kind": kind, NOTES: notes})
    unused = [k for k in defaults if k not in used_defaults]
    if unused:
        key = str(unused[0])
        every = sorted({k for kind in KINDS for k in manifest_flags(entry_point(kind).build_parser())})
        norm = key.replace("-", "_")
        why = (f"no job of this manifest has the flag --{norm.replace('_', '-')}" if norm in every
               else _suggest(norm, every))
        raise ConversionError(f"{path}: defaults: unknown key {key!r} ({why})")
    return jobs


def _unread_shards(args: argparse.Namespace, raw: dict[Any, Any], where: str) -> list[str]:
    """Shards of an output its consumer cannot read: a job writing for a `--target` whose loader reads one adapter
    file (configs/targets `sharded: false`: vLLM, peft) gets no `max_shard_size` from `defaults` (dropped from
    `args`; returns the note saying so), and one given in the job itself is refused (ConversionError naming `where`
    and the key). Returns the job's notes."""
    target = getattr(args, "target", None)
    if target is None or getattr(args, "max_shard_size", None) is None:
        return []
    from convert.targets.rules import TARGETS, load_target  # adapter kinds only

    if load_target(target).reads_shards() is not False:
        return []
    why = (f"the target {target} reads one adapter_model.safetensors, not a sharded adapter "
           f"(configs/targets/{target}.json: sharded false)")
    own = next((k for k in raw if str(k).replace("-", "_") == "max_shard_size"), None)
    if own is not None:
        readers = [t for t in TARGETS if load_target(t).reads_shards()]
        raise ConversionError(f"{where}: {own}: {why}; leave {own} out for one file, or write for a target that reads "
                              f"shards (target: {' or '.join(readers)})")
    args.max_shard_size = None
    return [f"defaults' max_shard_size not applied: {why}; written as one file"]


def job_namespace(job: dict[str, Any]) -> argparse.Namespace:
    """The parsed flags of a job returned by load_manifest, as its entry point's `run` takes them."""
    return argparse.Namespace(**{k: v for k, v in job.items() if k not in (*RESERVED, NOTES)})
