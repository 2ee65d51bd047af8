"""Tensor names: key templates of expert tensors, and the rename rules of a family.

A family's templates name tensors as the model holds them in memory ("model naming":
what transformers >= 5 keeps after loading, and what a fused checkpoint holds). A
per-expert checkpoint may name some tensors otherwise ("disk naming": what
`save_pretrained` writes, e.g. Mixtral's `block_sparse_moe.` for the model's `mlp.`). The
rename rules go from disk naming to model naming, in order, exactly as transformers'
`WeightRenaming` does when loading; `to_disk` applies their inverses in reverse order, as
transformers does when saving. A rule marked `one_way` is applied when loading only
(transformers' `PrefixChange` is not undone when a freshly built model is saved).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from convert.errors import ConversionError


def template_regex(template: str) -> re.Pattern[str]:
    """Compile a key template with `{prefix}` and optional `{e}` into an anchored regex."""
    pattern = re.escape(template).replace(r"\{prefix\}", r"(?P<prefix>.+?)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{pattern}$")


# The two helpers below follow transformers 5.23 `core_model_loading.process_target_pattern` /
# `process_source_pattern` (Apache-2.0), so that a rule renames exactly as transformers does.
def _process_target(pattern: str) -> tuple[str, str | None]:
    pattern = pattern.removeprefix("^")
    pattern = re.sub(r"\(\?.+?\)?\)", "", pattern)  # drop lookahead/lookbehind assertions
    group = re.search(r"\(.+?\)", pattern)
    captured = None
    if group:
        captured = group.group(0)
        pattern = pattern.replace(captured, r"\1", 1)
    return pattern.replace(r"\.", "."), captured


def _process_source(pattern: str, target: str) -> str:
    if target.startswith("^") and not pattern.startswith("^"):
        return f"^{pattern}"
    return pattern


@dataclass(frozen=True)
class _Matcher:
    """One direction of a rename rule, compiled: search `regex`, replace the matched text with `replacement`."""

    regex: re.Pattern[str]
    replacement: str

    @classmethod
    def build(cls, source: str, target: str, where: str) -> _Matcher:
        replacement, captured = _process_target(target)
        if r"\1" in source:
            if captured is None:
                raise ConversionError(f"{where}: rename 'from' {source!r} uses \\1 but 'to' {target!r} has no group")
            source = source.replace(r"\1", captured, 1)
        source = _process_source(source, target)
        pattern = source.replace("*.", r".*\.")
        if re.search(r"[a-zA-Z0-9]$", pattern):
            pattern += r"(?!\w)"  # a name ends on a name boundary: `weight` does not match `weight_scale_inv`
        try:
            regex = re.compile(f"(?P<g0>{pattern})")
        except re.error as exc:
            raise ConversionError(f"{where}: rename 'from' {source!r} is not a valid regex ({exc})") from exc
        return cls(regex, replacement)

    def apply(self, key: str) -> str:
        m = self.regex.search(key)
        if m is None:
            return key
        replacement = self.replacement
        if r"\1" in replacement:
            replacement = replacement.replace(r"\1", m.group(self.regex.groupindex["g0"] + 1) or "")
        return key.replace(m.group(0), replacement, 1)


@dataclass(frozen=True)
class Rename:
    """A rename rule: regex `source` (disk naming) -> `target` (model naming), as transformers' WeightRenaming."""

    source: str
    target: str
    one_way: bool = False
    where: str = field(default="", compare=False)
    _forward: _Matcher = field(init=False, repr=False, compare=False)
    _reverse: _Matcher | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_forward", _Matcher.build(self.source, self.target, self.where))
        reverse = None if self.one_way else _Matcher.build(self.target, self.source, self.where)
        object.__setattr__(self, "_reverse", reverse)

    def to_model(self, key: str) -> str:
        """`key` renamed as transformers renames it when loading."""
        return self._forward.apply(key)

    def to_disk(self, key: str) -> str:
        """`key` renamed as transformers renames it when saving (unchanged for a one-way rule)."""
        return key if self._reverse is None else self._reverse.apply(key)


def to_model(renames: Sequence[Rename], key: str) -> str:
    """Apply every rule in order (disk naming -> model naming)."""
    for r in renames:
        key = r.to_model(key)
    return key


def to_disk(renames: Sequence[Rename], key: str) -> str:
    """Apply every rule's inverse in reverse order (model naming -> disk naming)."""
    for r in reversed(renames):
        key = r.to_disk(key)
    return key


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A name pattern of a merge (as a transformers WeightConverter source pattern), compiled for `search`."""
    return _Matcher.build(pattern, pattern, "merge").regex


def literal(pattern: str) -> str:
    """The text a name pattern stands for when it is written out (as transformers writes a target pattern)."""
    return _process_target(pattern)[0]
