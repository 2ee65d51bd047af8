"""A job's source store that also reads the files of further sources (e.g. the adapter a merge adds to a base).

A piece's `Read.file` names a file of the job's source (`--src`) as it is, or a file of another source as
`//<name>/<file>` (`source_file`): a name no listing of a directory can give, so it never collides with a
file of the source. Reads (read_range, read_into, fetch, open_range, prefetch) are routed to the store that
holds the file; every other attribute is the job's source's own (its pinning, its display, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from convert.io.storage import Fetched, fetch

SOURCE_PREFIX = "//"


def source_file(source: str, rel: str) -> str:
    """The name pieces read file `rel` of the extra source `source` under."""
    return f"{SOURCE_PREFIX}{source}/{rel}"


def split_source(name: str) -> tuple[str | None, str]:
    """(extra source, file) of a piece's file name; (None, name) for a file of the job's own source."""
    if not name.startswith(SOURCE_PREFIX):
        return None, name
    source, _, rel = name[len(SOURCE_PREFIX):].partition("/")
    return source, rel


class SourcesView:
    """The job's source `storage` plus the extra sources `others` (name -> Store), read by piece file names."""

    def __init__(self, storage: Any, others: dict[str, Any]) -> None:
        self.storage = storage
        self.others = others

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def _route(self, name: str) -> tuple[Any, str]:
        source, rel = split_source(name)
        return (self.storage, name) if source is None else (self.others[source], rel)

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it."""
        store, rel = self._route(rel)
        return str(store.display(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel`."""
        store, rel = self._route(rel)
        return bytes(store.read_range(rel, start, end))

    def read_into(self, rel: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of `rel` from `start` on."""
        store, rel = self._route(rel)
        store.read_into(rel, start, out)

    def prefetch(self, rel: str, start: int, end: int) -> None:
        """Store.prefetch on the store holding `rel`."""
        store, rel = self._route(rel)
        store.prefetch(rel, start, end)

    def open_range(self, rel: str, start: int, end: int) -> Any:
        """Store.open_range on the store holding `rel`."""
        store, rel = self._route(rel)
        return store.open_range(rel, start, end)

    def fetch(self, ranges: Sequence[tuple[str, int, int]], max_get: int | None = None) -> Any:
        """convert.io.storage.fetch, each store's ranges fetched by that store, held under the piece file names."""
        out = Fetched(self)
        by: dict[str | None, list[tuple[str, int, int]]] = {}
        for name, start, end in ranges:
            by.setdefault(split_source(name)[0], []).append((name, start, end))
        for source, rs in by.items():
            store = self.storage if source is None else self.others[source]
            local = [(split_source(n)[1], a, b) for n, a, b in rs]
            got = fetch(store, local, max_get)
            prefix = "" if source is None else source_file(source, "")
            for rel, spans in got._spans.items():
                for span in spans:
                    out._spans.setdefault(prefix + rel, []).append(span)
        for spans in out._spans.values():
            spans.sort(key=lambda s: s[0])
        return out

    def close(self) -> None:
        """Close every store."""
        for store in self.others.values():
            store.close()
        self.storage.close()
