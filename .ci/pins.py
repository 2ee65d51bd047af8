"""Print `name==version` for every installed distribution that moe-convert[test,bench] needs, transitively.

Run by .ci/relock in the venv it resolved; its output is constraints.txt. torch is written without
its local build tag (2.13.0, not 2.13.0+cpu), which any build of that version satisfies.
"""
from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement


def norm(name: str) -> str:
    """A distribution name in its normalized form (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


seen: dict[str, tuple[str, set[str]]] = {}
todo = [("moe-convert", {"test", "bench"})]
while todo:
    name, extras = todo.pop()
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    key = norm(dist.metadata["Name"])
    prev = seen.get(key)
    if prev is not None and extras <= prev[1]:
        continue
    seen[key] = (dist.version, (prev[1] if prev else set()) | extras)
    for req in dist.requires or []:
        r = Requirement(req)
        if r.marker:
            ok = any(r.marker.evaluate({"extra": e}) for e in (extras or {""})) or r.marker.evaluate({"extra": ""})
            if not ok:
                continue
        todo.append((r.name, set(r.extras)))
for k in sorted(seen):
    if k != "moe-convert":
        print(f"{k}=={seen[k][0].split('+')[0]}")
