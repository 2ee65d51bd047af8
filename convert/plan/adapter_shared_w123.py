"""Layout shared_w123 (convert.formats.adapter_layouts.shared_w123), planning: 3-D `experts.w1/w2/w3` factors whose
dim 0 is E or 1 (shared by every expert).

split: byte copies (a shared factor's one slice goes to every expert); fuse (`--layout shared_w123`): the shared-outer
form (the input projections' lora_A and the output projection's lora_B shared), exact only where those factors are
identical across experts, else refused. No compute step: every piece is a copy or cast.
"""

from __future__ import annotations

import re
from typing import Any

from convert.errors import ConversionError
from convert.families import Family
from convert.formats.adapter_layouts import ExpertLoraGroup, module_key, output_role
from convert.formats.adapter_layouts.shared_w123 import NAME
from convert.formats.safetensors import DTYPE_SIZES
from convert.plan.adapter_build import (
    Builder,
    block_read,
    expert_outputs,
    family_prefix,
    group_scale,
    identical,
    input_roles,
    zero_per_expert,
)
from convert.plan.base import Piece, Write
from convert.targets.rules import TargetRules

PATTERN = NAME
LAYOUT = NAME  # fuse_adapter --layout shared_w123
SERVED_AS = None  # no target's expert_layout: a target converts it (SGLang's shared-outer loader: configs/targets)
NEEDS_FAMILY = True
HOLDS_EXTRA_EXPERTS = False  # one expert count per layer


def words(g: ExpertLoraGroup) -> str:
    """The layout of `g` in words."""
    return g.pattern


def keeps(g: ExpertLoraGroup) -> bool:
    """Whether a target loading this layout takes `g` as it is."""
    return True


def a_stacks(family: Family) -> set[tuple[str, ...]] | None:
    """Roles whose per-expert lora_A must agree for one fused factor to hold them: none (each role has its own)."""
    return None


def fuse_config(family: Family, roles: list[str], params: set[str]) -> dict[str, Any]:
    """adapter_config.json edits of a fuse output: target_modules gains the layout's own projection names."""
    return {"target_modules_add": [shared_w123_proj(family, r) for r in roles]}


def written_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """adapter_config.json of a fuse output: as rewritten (no peft wrappers, so no packing to state)."""
    return config, []


def fuse_notes(family: Family, shared_a: bool, config: dict[str, Any], kept: set[str]) -> list[str]:
    """Notes of a fuse output: none."""
    return []


def split(b: Builder, g: ExpertLoraGroup, family: Family | None, ep: int, rules: TargetRules) -> None:
    """Every expert's pair of layer `g`: a byte copy (or cast) of its slice of each factor, a shared factor's one
    slice copied to every expert; zero pairs where the target needs them."""
    assert family is not None
    prefix = family_prefix(family, g.prefix, b.where, b.names)
    _split(b, g, family, prefix)
    if rules.all_roles:
        zero_per_expert(b, g, family, prefix, rules)


def _split(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str) -> None:
    for role in g.roles:
        fa, fb = g.factor((role,), "A"), g.factor((role,), "B")
        proj = fa.name.split(".")[-3]
        src_key = module_key(g.prefix, "experts", proj)
        da, db = b.out_dtype(fa), b.out_dtype(fb)
        out, inn = g.dims_of(role)
        r = g.rank_of(role)
        for e in range(g.num_experts):
            name_a, name_b = expert_outputs(b, g, family, prefix, role, e, src_key, (da, db))
            for f, name, block, dt in ((fa, name_a, r * inn, da), (fb, name_b, out * r, db)):
                read = block_read(b.ref(f), 0 if f.shared else e, block)
                b.pieces.append(Piece((read,), (Write(name, 0, block * DTYPE_SIZES[dt], dt),), None, e))


def fuse(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, shared_a: bool, rules: TargetRules) -> set[str]:
    """The 3-D factors of per-expert layer `g`: the input projections' lora_A and the output projection's lora_B
    shared (written once, refused unless identical across experts), the others per expert; no target_parameters."""
    _fuse(b, g, family, prefix)
    return set()


def _fuse(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str) -> None:
    E = g.num_experts
    experts_path = b.names.out_module(family.experts_path.format(prefix=prefix))
    for role in g.roles:
        shared_factor = "B" if role == output_role(family) else "A"
        refs = [b.ref(g.factor((role,), shared_factor, e)) for e in range(E)]
        bad = identical(b.src, refs)
        if bad is not None:
            raise ConversionError(
                f"{b.where}: the shared w1/w2/w3 layout keeps one {role} lora_{shared_factor} for all experts, but "
                f"{refs[bad].info.name!r} differs from {refs[0].info.name!r}: not exact; use --layout peft or grouped"
            )
        proj = shared_w123_proj(family, role)
        out, inn = g.dims_of(role)
        r = g.rank_of(role)
        scale = group_scale(b, g, family, prefix, (role,))
        module = f"{experts_path}.{proj}"
        b.module(module, scale, re.escape(f"experts.{proj}"), (f"{module}.lora_B.weight",))
        for which, block, shape_e in (("A", r * inn, (r, inn)), ("B", out * r, (out, r))):
            f0 = g.factor((role,), which, 0)
            dt = b.out_dtype(f0)
            name = f"{module}.lora_{which}.weight"
            shared = which == shared_factor
            b.target(name, dt, (1 if shared else E, *shape_e))
            nbytes = block * DTYPE_SIZES[dt]
            for e in range(1 if shared else E):
                ref = b.ref(g.factor((role,), which, e))
                b.pieces.append(Piece((block_read(ref, 0, block),), (Write(name, e * nbytes, (e + 1) * nbytes, dt),), None, e))


def shared_w123_proj(family: Family, role: str) -> str:
    """The 3-D partially shared layout's own name of `role`: w1/w3 for the input projections, w2 for the output.

    The layout numbers the projections as the original Mixtral experts did (w1 the first input
    projection, w3 the second, w2 the output), whatever the family calls them.
    """
    names = {**dict(zip(input_roles(family), ("w1", "w3"))), output_role(family): "w2"}
    if role not in names:
        raise ConversionError(f"the shared 3-D layout names two input projections and one output; the "
                              f"{family.name} family's role {role!r} has no name there")
    return names[role]
