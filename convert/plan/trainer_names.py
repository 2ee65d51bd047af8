"""A plan's targets under a trainer's names (convert.families.namings): renamed, joined parts written at their
offsets, row blocks a trainer held apart joined back. Metadata only: pieces' writes are moved, never their reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families.namings import PART, Naming, TensorMap, View, fill_template
from convert.plan.base import Piece, Plan, TargetTensor, Write


@dataclass(frozen=True)
class Place:
    """Bytes [start, end) of old target `old` are bytes [at, at + end - start) of new target `new`."""

    start: int
    end: int
    new: str
    at: int


@dataclass(frozen=True)
class SplitOutputs:
    """A compute piece whose outputs are cut: output i becomes the slices `cuts[i]` ((size, kept) each, in order;
    a slice not kept is written nowhere)."""

    inner: Any
    cuts: tuple[tuple[tuple[int, bool], ...], ...]

    def outputs(self, bufs: Sequence[bytes | memoryview]) -> list[memoryview]:
        out = []
        for buf, cut in zip(self.inner.outputs(bufs), self.cuts):
            view, pos = memoryview(buf), 0
            for n, kept in cut:
                if kept:
                    out.append(view[pos:pos + n])
                pos += n
        return out


def remap_plan(plan: Plan, places: dict[str, list[Place]], new_targets: list[TargetTensor], dropped: set[str]) -> Plan:
    """`plan` writing `new_targets`: every write to an old target of `places` moved
    to its new places (cut where it spans several), writes to `dropped` targets left out."""
    def moved(w: Any) -> list[Any] | None:
        if w.tensor in dropped:
            return None
        if w.tensor not in places:
            return [w]
        out = []
        for p in places[w.tensor]:
            lo, hi = max(w.start, p.start), min(w.end, p.end)
            if lo < hi:
                out.append(Write(p.new, p.at + lo - p.start, p.at + hi - p.start, w.dtype))
        if sum(x.end - x.start for x in out) != w.end - w.start:
            raise ConversionError(f"internal: write {w} is not covered by the new names' places")
        return out

    pieces = []
    for piece in plan.pieces:
        if all(w.tensor not in places and w.tensor not in dropped for w in piece.writes):
            pieces.append(piece)
            continue
        per_write = [moved(w) for w in piece.writes]
        writes = tuple(x for ws in per_write if ws is not None for x in ws)
        if not writes:
            continue
        regroup = piece.regroup
        if regroup is None:
            if any(ws is None for ws in per_write):
                raise ConversionError("internal: a byte-copy piece writes a left-out tensor beside others")
        elif any(ws is None or len(ws) != 1 for ws in per_write):
            regroup = SplitOutputs(regroup, tuple(((w.end - w.start, False),) if ws is None else
                                                  tuple((x.end - x.start, True) for x in ws)
                                                  for w, ws in zip(piece.writes, per_write)))
        pieces.append(Piece(piece.reads, writes, regroup, piece.expert))
    kept = [t for t in plan.targets if t.name not in places and t.name not in dropped]
    return dataclasses.replace(plan, targets=kept + new_targets, pieces=pieces)


def join_parts(plan: Plan) -> Plan:
    """`plan` with every target named `<name>#<g>` (row block g of an HF tensor a trainer held in several blocks,
    source_view) joined into target `<name>` along dim 0, blocks in order."""
    blocks: dict[str, dict[int, Any]] = {}
    for t in plan.targets:
        base, sep, g = t.name.rpartition(PART)
        if sep and g.isdigit():
            blocks.setdefault(base, {})[int(g)] = t
    if not blocks:
        return plan
    places: dict[str, list[Place]] = {}
    new = []
    for whole, parts in sorted(blocks.items()):
        ordered = [parts[g] for g in sorted(parts)]
        if sorted(parts) != list(range(len(parts))) or len({(t.dtype, t.shape[1:]) for t in ordered}) != 1:
            raise ConversionError(f"internal: the row blocks of {whole!r} do not join ({[t.name for t in ordered]})")
        at = 0
        for t in ordered:
            places[t.name] = [Place(0, t.nbytes, whole, at)]
            at += t.nbytes
        new.append(TargetTensor(whole, ordered[0].dtype, (sum(t.shape[0] for t in ordered), *ordered[0].shape[1:])))
    return remap_plan(plan, places, new, set())


def rename_plan(plan: Plan, naming: Naming, config: dict[str, Any], where: str) -> Plan:
    """`plan` (HF names) writing `naming`'s names: each target renamed, joined tensors' parts written at their
    offsets, tensors of the naming's `skip` left out (a plan note each); a target the naming does not place is
    refused (unless the naming passes unknown names through)."""
    entries = [t for t in naming.tensors if not t.input_only]
    joined: dict[str, tuple[TensorMap, dict[int, Any]]] = {}
    dropped: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for t in plan.targets:
        hit = None
        for entry in entries:
            for j, rx in enumerate(entry.hf_rx):
                m = rx.match(t.name)
                if m:
                    hit = (entry, j, fill_template(entry.trainer, m.groupdict()))
                    break
            if hit:
                break
        if hit is None:
            why = naming.skipped(t.name)
            if why is not None:
                dropped[t.name] = why
            elif naming.passthrough:
                continue
            else:
                raise ConversionError(f"{where}: tensor {t.name!r} has no name in the {naming.name} naming of "
                                      f"{naming.model_type} ({naming.source}); add it there (or to its 'skip')")
            continue
        entry, j, trainer = hit
        if len(entry.hf) == 1:
            renamed[t.name] = trainer
        else:
            got = joined.setdefault(trainer, (entry, {}))[1]
            got[j] = t
    places: dict[str, list[Place]] = {}
    new = []
    by_name = {t.name: t for t in plan.targets}
    for old, trainer in renamed.items():
        t = by_name[old]
        places[old] = [Place(0, t.nbytes, trainer, 0)]
        new.append(TargetTensor(trainer, t.dtype, t.shape))
    for trainer, (entry, got) in sorted(joined.items()):
        missing = [j for j in range(len(entry.hf)) if j not in got]
        parts = [got[j] for j in sorted(got)]
        if missing or len({(p.dtype, p.shape[1:]) for p in parts}) != 1 or any(not p.shape for p in parts):
            raise ConversionError(f"{where}: {trainer!r} joins {list(entry.hf)} along dim 0, but the output has "
                                  f"{[f'{p.name} {p.dtype} {list(p.shape)}' for p in parts]}")
        groups = entry.n_groups(config, where)
        shares = entry.shares(config, where)
        rows = [p.shape[0] for p in parts]
        unit = sum(rows) // (sum(shares) * groups) if sum(rows) % (sum(shares) * groups) == 0 else 0
        if not unit or rows != [unit * s * groups for s in shares]:
            raise ConversionError(f"{where}: {[p.name for p in parts]} have {rows} rows; {trainer!r} holds them "
                                  f"in shares {shares}, in {groups} group(s)")
        row = parts[0].nbytes // rows[0]
        group_bytes = sum(rows) // groups * row
        before = 0
        for p, r in zip(parts, rows):
            block = r // groups * row
            places[p.name] = [Place(g * block, (g + 1) * block, trainer, g * group_bytes + before) for g in range(groups)]
            before += block
        new.append(TargetTensor(trainer, parts[0].dtype, (sum(rows), *parts[0].shape[1:])))
    seen: set[str] = set()
    for t in new:
        if t.name in seen:
            raise ConversionError(f"{where}: output tensor {t.name!r} would be written twice ({naming.source})")
        seen.add(t.name)
    out = remap_plan(plan, places, new, set(dropped))
    notes = [f"tensor names written as {naming.name} ({naming.source}, model type {naming.model_type})"]
    left_out: dict[str, list[str]] = {}  # reason -> the tensors it drops
    for name, reason in dropped.items():
        left_out.setdefault(reason, []).append(name)
    notes += [f"{len(names)} tensor(s) left out (e.g. {names[0]!r}): {reason}" for reason, names in left_out.items()]
    return dataclasses.replace(out, notes=[*out.notes, *notes])


def finish_plan(plan: Plan, view: View, naming: Naming | None, config: dict[str, Any], where: str) -> Plan:
    """A plan made from `view`'s HF names: row blocks joined (join_parts), the view's notes added, and its
    targets renamed to `naming` (rename_plan) where given."""
    plan = join_parts(plan)
    if not view.noted:
        plan = dataclasses.replace(plan, notes=[*plan.notes, *view.notes()])
    return rename_plan(plan, naming, config, where) if naming is not None else plan
