"""Expert-parallel ownership: which rank converts which experts and which other bytes.

EP slice s of n owns a contiguous run of experts; slices are as equal as possible
(the first E % n slices get one expert more when n does not divide E). Slice s is
worked by rank s % world_size, so --ep larger than the world size means each rank
works through several slices in turn. Non-expert pieces are spread by bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Sized(Protocol):
    @property
    def expert(self) -> int | None: ...  # read-only: a frozen dataclass (convert.plan.base.Piece) matches

    @property
    def write_bytes(self) -> int: ...


def expert_slices(num_experts: int, ep: int) -> list[range]:
    """The expert range of each of `ep` slices (empty ranges when ep > num_experts)."""
    if ep < 1:
        raise ValueError(f"--ep must be >= 1, got {ep}")
    base, extra = divmod(num_experts, ep)
    out, start = [], 0
    for s in range(ep):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def slice_of_expert(num_experts: int, ep: int) -> list[int]:
    """For each expert, the index of the EP slice that owns it."""
    owner = [0] * num_experts
    for s, r in enumerate(expert_slices(num_experts, ep)):
        for e in r:
            owner[e] = s
    return owner


def assign_pieces(pieces: Sequence[Sized], num_experts: int, ep: int, world_size: int) -> list[list[int]]:
    """Piece indices per rank, in the order each rank works them.

    Expert pieces go to the rank of their expert's slice, slice by slice; the rest go,
    largest first, to the rank with the fewest bytes so far (ties to the lowest rank).
    """
    slice_of = slice_of_expert(num_experts, ep)
    per_rank_slices: list[list[tuple[int, int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    others = []
    for i, p in enumerate(pieces):
        if p.expert is None:
            others.append(i)
            continue
        s = slice_of[p.expert]
        rank = s % world_size
        per_rank_slices[rank].append((s, i))
        load[rank] += p.write_bytes
    out = [[i for _, i in sorted(items)] for items in per_rank_slices]
    for i in sorted(others, key=lambda i: (-pieces[i].write_bytes, i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[rank].append(i)
        load[rank] += pieces[i].write_bytes
    return out
