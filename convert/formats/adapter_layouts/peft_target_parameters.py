"""Layout peft_target_parameters: peft `ParamWrapper` on the fused 3-D expert parameters (peft >= 0.17).

The expert dimension is folded into the rank: `P.experts.(base_layer.)*lora_A.weight` [E*r, in] (expert-major) and
`lora_B.weight` [out, r*E] (expert-minor); one wrapper per targeted parameter (the family's fused tensors, e.g.
gate_up_proj and down_proj), innermost (most `base_layer.`) first in declaration order. Which wrapper is which
parameter is decided by shape and by the family's tables, never by a name in code; shapes contradicting both are
refused. Other producers' packings of the same wrappers (older peft orientation, expert-major lora_B) are the
variant modules of convert.formats.lora_producers; a caller that does not read them is refused such a layer.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import defaultdict

from convert.errors import ConversionError
from convert.formats.adapter_layouts.context import Context, summary
from convert.formats.adapter_layouts.group import ExpertLoraGroup, LoraFactor, module_key, pattern_value
from convert.formats.adapter_layouts.tables import fused_param_roles, lora_tensors
from convert.formats.lora_producers import (
    IN_OUT,
    ORIENTATIONS,
    RANK_MAJOR,
    BOrder,
    b_order,
    describe,
    marker_fix,
    version_orientation,
)
from convert.formats.safetensors import TensorInfo

NAME = "peft_target_parameters"
EXAMPLE = "peft '<layer>.experts.lora_A.weight' [E*r, in]"
_RX = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<nest>(?:base_layer\.)*)lora_(?P<f>[AB])\.weight$")


def claim(name: str, info: TensorInfo, roles_of_proj: dict[str, str]) -> str | None:
    """The layer prefix (module path before `.experts`) of tensor `name` when it is of this layout, else None."""
    m = _RX.match(name)
    return m["prefix"] if m and len(info.shape) == 2 else None


def detect(ctx: Context, prefix: str, items: dict[str, TensorInfo]) -> ExpertLoraGroup:
    """The group of layer `prefix` from its wrappers' tensors `items`: which fused parameter each wrapper is (by shape
    and the family tables), E and r, and the packing (orientation: the one the shapes fit, else `peft_version`'s;
    lora_B column order: convert.formats.lora_producers.b_order)."""
    wrappers = _wrappers(ctx, prefix, items)
    tensor_sets = list(dict.fromkeys(tuple(t[0] for t in lora_tensors(f)) for f in ctx.families))
    most = max(len(ts) for ts in tensor_sets)
    if len(wrappers) > most:
        raise ConversionError(
            f"{ctx.where}: layer {prefix} has {len(wrappers)} nested peft wrappers on its experts; expected at most "
            f"{most} (one per fused expert parameter of the family)"
        )
    params = fused_param_roles(ctx.guess.family)
    name_of = {roles: p for p, roles in params.items()}
    targeted = {
        params[t.rsplit(".", 1)[-1]]
        for t in (ctx.adapter_config.get("target_parameters") or [])
        if t.rsplit(".", 1)[-1] in params
    }
    described = "; ".join(f"{w['A'].name} {list(w['A'].shape)} / {list(w['B'].shape)}" for w in wrappers.values())
    orientation, assign, num, ranks, counts = _choose_fit(ctx, prefix, wrappers, tensor_sets, targeted, name_of,
                                                          described)
    order = _b_order(ctx, prefix, wrappers, assign, name_of, orientation)
    role_rank, role_dims, factors = _role_factors(wrappers, assign, ranks, orientation)
    target_param = tuple((assign[d], name_of[assign[d]]) for d in sorted(assign, reverse=True))
    group = summary(ctx, prefix, NAME, num, role_rank, role_dims, factors,
                     needs_order=any(len(r) > 1 for r in assign.values()), target_param=target_param,
                     role_experts=ctx.role_experts(num, counts))
    if (orientation, order.order) != (IN_OUT, RANK_MAJOR) and not ctx.packings:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: peft expert LoRA {described} is packed as {describe(orientation, str(order.order))}, "
            "which this command does not read; convert it first: python -m convert.split_adapter --src "
            f"{ctx.where} --dst OUT --target per-expert"
        )
    return dataclasses.replace(group, orientation=orientation, b_order=str(order.order),
                               producer=f"{describe(orientation, str(order.order))} ({order.why})")


# (orientation, wrapper depth -> roles, E, depth -> rank, role -> expert count): one reading of a layer's wrappers
_Fit = tuple[str, dict[int, tuple[str, ...]], int, dict[int, int], dict[str, int]]


def _wrappers(ctx: Context, prefix: str, items: dict[str, TensorInfo]) -> dict[int, dict[str, TensorInfo]]:
    """Wrapper depth (its number of `base_layer.`) -> {"A": lora_A, "B": lora_B} of layer `prefix`'s tensors `items`;
    raises where a factor has no partner or the folded dims disagree."""
    wrappers: dict[int, dict[str, TensorInfo]] = defaultdict(dict)
    for name, info in items.items():
        m = _RX.match(name)
        assert m
        wrappers[m["nest"].count("base_layer.")][m["f"]] = info
    for ab in wrappers.values():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))
            raise ConversionError(
                f"{ctx.where}: tensor {have.name!r} has no lora_{'B' if 'A' in ab else 'A'} partner in layer {prefix}"
            )
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise ConversionError(
                f"{ctx.where}: tensor {a.name!r} {list(a.shape)} and {b.name!r} {list(b.shape)}: peft folds E*r into "
                f"lora_A dim 0 and lora_B dim 1, which must be equal"
            )
    return wrappers


def _assignments(tensor_sets: list[tuple[tuple[str, ...], ...]], depths: list[int]) -> list[dict[int, tuple[str, ...]]]:
    """Every distinct assignment of wrapper `depths` to fused tensors (roles) of one of `tensor_sets`."""
    assignments: list[dict[int, tuple[str, ...]]] = []
    for ts in tensor_sets:
        for chosen in itertools.permutations(ts, len(depths)):
            assign = dict(zip(depths, chosen))
            if assign not in assignments:
                assignments.append(assign)
    return assignments


def _choose_fit(
    ctx: Context, prefix: str, wrappers: dict[int, dict[str, TensorInfo]],
    tensor_sets: list[tuple[tuple[str, ...], ...]], targeted: set[tuple[str, ...]],
    name_of: dict[tuple[str, ...], str], described: str,
) -> _Fit:
    """The one reading of the wrappers the shapes, config and family tables allow (nesting in declaration order
    breaking ties) in the orientation _pick_orientation picks; raises where none fits or several do."""
    depths = sorted(wrappers)
    reasons: list[str] = []
    oriented: list[_Fit] = []
    for assign in _assignments(tensor_sets, depths):
        for orientation in ORIENTATIONS:  # peft >= 0.19.1's first, then older ones
            ok, why, num, ranks, counts = _peft_check(ctx, prefix, wrappers, assign, targeted, name_of, orientation)
            if ok:
                oriented.append((orientation, assign, num, ranks, counts))
            elif orientation == IN_OUT:
                reasons.append(why)
    known = sorted(set(name_of.values()))
    if not oriented:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: peft expert LoRA {described} fits none of the fused expert parameters "
            f"{known} ({'; '.join(dict.fromkeys(reasons))}), read with peft >= 0.19.1's shapes or older ones"
        )
    if len(oriented) > 1 and ctx.guess.family and len(depths) > 1:
        # peft wraps a module's parameters in their declaration order, the first innermost (most base_layer.)
        declared = [t[0] for t in lora_tensors(ctx.guess.family)]
        oriented = [o for o in oriented if _nested_in_order(o[1], declared)] or oriented
    distinct: list[dict[int, tuple[str, ...]]] = []
    for o in oriented:
        if o[1] not in distinct:
            distinct.append(o[1])
    if len(distinct) > 1:
        raise ConversionError(
            f"{ctx.where}: layer {prefix}: cannot tell by shape which of {known} peft expert LoRA {described} is "
            "for; pass --base-config (the base model's config.json) so the hidden and intermediate sizes decide"
        )
    orientation = _pick_orientation(ctx, prefix, described, {o[0] for o in oriented})
    return next(o for o in oriented if o[0] == orientation)


def _b_order(ctx: Context, prefix: str, wrappers: dict[int, dict[str, TensorInfo]],
             assign: dict[int, tuple[str, ...]], name_of: dict[tuple[str, ...], str], orientation: str) -> BOrder:
    """The lora_B column order of the layer's wrappers (one for all); raises where one cannot be told or they differ."""
    orders: dict[int, BOrder] = {}
    for depth, roles in assign.items():
        found = b_order(ctx.adapter_config, name_of.get(roles, "/".join(roles)), orientation)
        if found.order is None:
            raise ConversionError(
                f"{ctx.where}: layer {prefix}: the lora_B column order of {wrappers[depth]['B'].name!r} "
                f"{list(wrappers[depth]['B'].shape)} cannot be told from its shape ({found.why}); "
                + marker_fix(ctx.where + "/adapter_config.json")
            )
        orders[depth] = found
    if len({o.order for o in orders.values()}) > 1:
        raise ConversionError(f"{ctx.where}: layer {prefix}: adapter_config.json declares different lora_B orders for the "
                              "wrappers of one layer; expected one")
    return next(iter(orders.values()))


def _role_factors(
    wrappers: dict[int, dict[str, TensorInfo]], assign: dict[int, tuple[str, ...]], ranks: dict[int, int],
    orientation: str,
) -> tuple[dict[str, int], dict[str, tuple[int, int]], list[LoraFactor]]:
    """(role -> rank, role -> [out, in], the factors, innermost wrapper first) of the wrappers read as `assign` in
    `orientation`."""
    role_rank: dict[str, int] = {}
    role_dims: dict[str, tuple[int, int]] = {}
    factors: list[LoraFactor] = []
    for depth, roles in sorted(assign.items()):
        a, b = wrappers[depth]["A"], wrappers[depth]["B"]
        out_all, inn = ORIENTATIONS[orientation].linear_dims(a.shape[1], b.shape[0])
        for role in roles:
            role_rank[role] = ranks[depth]
            role_dims[role] = (out_all // len(roles), inn)
        factors.append(LoraFactor(a.name, roles, "A", None, a.shape, a.dtype))
        factors.append(LoraFactor(b.name, roles, "B", None, b.shape, b.dtype))
    return role_rank, role_dims, factors


def _pick_orientation(ctx: Context, prefix: str, described: str, fits: set[str]) -> str:
    """The one orientation (IN_OUT/OUT_IN) of a peft layer: the only one its shapes fit, else `peft_version`'s.

    Raises ConversionError where the shapes fit both and the file does not say which peft saved it, and
    where the shapes contradict the `peft_version` the file names.
    """
    said = version_orientation(ctx.adapter_config)
    version = ctx.adapter_config.get("peft_version")
    if len(fits) == 1:
        (only,) = fits
        if said is not None and said != only:
            raise ConversionError(
                f"{ctx.where}: layer {prefix}: peft expert LoRA {described} has {describe(only, RANK_MAJOR).split(',')[0]}, "
                f"but adapter_config.json says peft {version} saved it, which writes the other orientation; expected "
                "the shapes of the peft that saved the file"
            )
        return only
    if said is not None:
        return said
    raise ConversionError(
        f"{ctx.where}: layer {prefix}: peft expert LoRA {described} fits both peft >= 0.19.1's shapes (lora_A [E*r, in], "
        "lora_B [out, E*r]) and older ones (lora_A [E*r, out], lora_B [in, E*r]): its in and out sizes are equal "
        "(e.g. 2 x intermediate == hidden), and adapter_config.json names no peft_version; the two readings give "
        "transposed deltas. Set \"peft_version\" in adapter_config.json to the peft release that saved it "
        "(or pass --base-config where the sizes differ)"
    )


def _nested_in_order(assign: dict[int, tuple[str, ...]], declared: list[tuple[str, ...]]) -> bool:
    """Whether the wrappers, innermost first, hold the family's fused tensors in their declared order."""
    idx = [declared.index(assign[d]) for d in sorted(assign, reverse=True)]
    return idx == sorted(idx)


def _peft_check(
    ctx: Context, prefix: str, wrappers: dict[int, dict[str, TensorInfo]], assign: dict[int, tuple[str, ...]],
    targeted: set[tuple[str, ...]], name_of: dict[tuple[str, ...], str], orientation: str = IN_OUT,
) -> tuple[bool, str, int, dict[int, int], dict[str, int]]:
    """Whether `assign` (wrapper depth -> roles) fits the shapes, config and base dims read in `orientation`; with E,
    the ranks and each role's expert count (more than E for roles of the family's `extra_experts`)."""
    dims: dict[tuple[str, ...], tuple[int, int]] = {}
    nums: dict[int, int] = {}
    ranks: dict[int, int] = {}
    for depth, roles in assign.items():
        a, b = wrappers[depth]["A"], wrappers[depth]["B"]
        folded = a.shape[0]
        out, inn = ORIENTATIONS[orientation].linear_dims(a.shape[1], b.shape[0])
        param = name_of.get(roles, "/".join(roles))
        if targeted and roles not in targeted:
            return False, f"target_parameters does not list {param}", 0, {}, {}
        if out % len(roles):
            return False, f"{b.name} has {out} rows, which do not split into {len(roles)} roles of {param}", 0, {}, {}
        per_out = out // len(roles)
        want_out, want_in = ctx.expected(roles[0])
        if (want_out is not None and per_out != want_out) or (want_in is not None and inn != want_in):
            return False, f"{param} needs [out, in] = [{want_out}, {want_in}] per role", 0, {}, {}
        dims[roles] = (per_out, inn)
        key = module_key(prefix, "experts", param)
        r = pattern_value(ctx.adapter_config.get("rank_pattern"), key, ctx.adapter_config.get("r"))
        if isinstance(r, int) and r > 0:
            if folded % r:
                return False, f"{a.name} dim 0 = {folded} is not a multiple of r = {r}", 0, {}, {}
            num = folded // r
        elif ctx.base_experts:
            num = (ctx.role_counts or {}).get(roles[0], ctx.base_experts)
            if folded % num:
                return False, f"{a.name} dim 0 = {folded} is not a multiple of E = {num}", 0, {}, {}
            r = folded // num
        else:
            raise ConversionError(
                f"{ctx.where}: adapter_config.json has no rank r, so the expert count folded into {a.name!r} "
                f"{list(a.shape)} is unknown; pass --base-config"
            )
        nums[depth] = num
        ranks[depth] = r
    plain = {nums[d] for d, roles in assign.items() if not ctx.extra_key(roles[0])}
    if len(plain) > 1:
        return False, (f"the wrappers imply different expert counts {sorted(set(nums.values()))}"
                       + ctx.other_table({r: nums[x] for x, rs in assign.items() for r in rs})), 0, {}, {}
    num = plain.pop() if plain else min(nums.values())
    if ctx.role_counts and ctx.base_experts:
        num = ctx.base_experts
    for d, roles in assign.items():
        want = (ctx.role_counts or {}).get(roles[0], num) if ctx.base_experts else num
        if ctx.extra_key(roles[0]) and not ctx.base_experts:
            want = max(want, nums[d])  # E + the extra experts, whatever their number
        if nums[d] != want:
            extra = ctx.extra_key(roles[0])
            return False, (f"{name_of.get(roles, '/'.join(roles))} holds {nums[d]} experts, expected {want}"
                           + (f" (E + {extra})" if extra else " (E)")
                           + ctx.other_table({r: nums[x] for x, rs in assign.items() for r in rs})), 0, {}, {}
    sides: dict[bool, tuple[tuple[str, ...], tuple[int, int]]] = {}
    for roles, out_in in dims.items():
        output = ctx.is_output(roles[0])
        if output is not None:
            sides.setdefault(output, (roles, out_in))
            if out_in != sides[output][1]:
                return False, f"{name_of.get(roles)} and {name_of.get(sides[output][0])} differ in [out, in]", 0, {}, {}
    if True in sides and False in sides:
        (i_roles, (i_out, i_in)), (o_roles, (o_out, o_in)) = sides[False], sides[True]
        if (i_out, i_in) != (o_in, o_out):
            return False, (f"{name_of.get(i_roles)} [out, in] = [{i_out}, {i_in}] is not the transpose of "
                           f"{name_of.get(o_roles)}'s [{o_out}, {o_in}]"), 0, {}, {}
    return True, "", num, ranks, {role: nums[d] for d, roles in assign.items() for role in roles}

