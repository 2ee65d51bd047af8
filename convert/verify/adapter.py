"""What a correct adapter conversion must satisfy: every expert's LoRA delta is unchanged.

For each MoE layer, each side's expert LoRA is recognised with convert.formats.adapter_layouts
(`detect_expert_lora`: per-expert, peft target_parameters, shared 3-D, grouped), but the
meaning of the factors is re-derived here from FORMATS.md, independently of the converter's
transforms (keys are paired through convert.plan.adapter_names, the naming the converter writes with too): expert e's A_e [r, in] and B_e [out, r] are cut out of whichever tensors hold
them, and delta_e = B_e @ A_e * scaling, with the scaling each side's own adapter_config.json
gives the module (r and lora_alpha through rank_pattern/alpha_pattern, use_rslora). Deltas
are compared in float64: to ~1e-12 where the factors' dtypes agree (bytes moved), to the
narrower dtype's precision where a cast happened. Every other tensor must pass through
(attention and router LoRA with an unchanged scaling, modules_to_save), adapter_config.json
must keep every field the conversion has no reason to change, each side's ranks must agree
with its config, and other files must be copied.

Outputs written for a target (split_adapter/fuse_adapter --target; the target from --target or the
output record) are read as its server reads them: keys are paired through the family's renames
(each side's naming; a source tensor must be under the name the output's naming gives it), expert
leaves by role, the output's scaling as the server applies it (`served_scale`). A role or module
the source has no LoRA for must be an exact zero pair; where the scaling changed, the source's B
is rescaled by s/s' exactly as a target rescaling writes it (`rescaled`) before the comparison.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import torch

from convert.errors import ConversionError
from convert.families import Family, find_family, load_families
from convert.formats.adapter_layouts import PEFT_PREFIX, ExpertLoraGroup, detect_expert_lora, fused_order
from convert.formats.safetensors import TensorInfo
from convert.io.storage import Storage, Store, read_json
from convert.plan.adapter_names import MODEL, KeyNames, source_naming
from convert.settings import StorageSettings
from convert.targets.rules import TargetRules, load_target
from convert.verify.checks import Data, ExpertCheck, PassCheck, read_stored
from convert.verify.relation import CannotVerify, Relation, VerifyOptions, compare_files, copied_files
from convert.verify.tables import Stored, Table, read_table, to_tensor, torch_dtype
from convert.verify.target import recorded_target

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
# adapter_config.json fields a layout conversion rewrites; every other field must survive unchanged
# Config keys a conversion may rewrite: each side's deltas are computed under its own config, so a changed
# scaling key (a target that applies no rsLoRA gets use_rslora false and rescaled B factors) is checked there.
REWRITTEN = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "target_parameters"}
# Relative agreement of deltas when both sides hold the same factor values (float64 rounding only)
SAME_BYTES_RTOL = 1e-12


def module_scale(config: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(r, lora_alpha, scaling) peft gives `module` (its name without `base_model.model.`) under `config`.

    A rank_pattern/alpha_pattern key applies when `module` ends with it (as a regex, after a dot
    or at the start); the first such key in the pattern's order wins.
    """
    def lookup(patterns: Any, default: Any) -> Any:
        for key in patterns or {}:
            if re.match(rf"(.*\.)?({key})$", module):
                return patterns[key]
        return default

    r = lookup(config.get("rank_pattern"), config.get("r", 8))
    alpha = lookup(config.get("alpha_pattern"), config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), float(alpha), float(scaling)


def served_scale(config: dict[str, Any], module: str, rules: TargetRules | None, expert: bool) -> tuple[int, float]:
    """(r, scaling) the server of `rules` applies to `module` under `config` (peft's, `module_scale`, when None):
    rank_pattern / alpha_pattern only where it honours them, rsLoRA only where it applies it (experts apart)."""
    if rules is None:
        r, _, scaling = module_scale(config, module)
        return r, scaling
    view = dict(config)
    if not rules.rank_pattern:
        view["rank_pattern"] = {}
    if not rules.alpha_pattern:
        view["alpha_pattern"] = {}
    view["use_rslora"] = bool(config.get("use_rslora")) and rules.rslora and (not expert or rules.rslora_experts)
    r, _, scaling = module_scale(view, module)
    return r, scaling


def rescaled(b: torch.Tensor, factor: float) -> torch.Tensor:
    """lora_B as a target rescaling writes it: multiplied by `factor` in float32, rounded once to its dtype."""
    return (b.to(torch.float32) * factor).to(b.dtype)


def _module(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass(frozen=True)
class Cut:
    """How to get one expert's factor (A as [r, in], B as [out, r]) out of a stored tensor.

    kind: "whole" (the tensor is the factor), "rows" (peft lora_A [E*r, in]: rows [e*r, (e+1)*r)),
    "index" (3-D [E|1, ...]: x[e], or x[0] when `shared`), "expert_minor" (peft lora_B [out, r*E]:
    B.view(out, r, E)[:, :, e]), "expert_major" (an expert-major lora_B: B.view(out, E, r)[:, e, :]); the cut is
    transposed when `transpose` (grouped NeMo factors; the older peft orientation's factors).
    B factors holding several roles keep the rows of role `part` of `parts`: halves or interleaved (`order`).
    """

    tensor: Stored
    kind: str
    num_experts: int
    shared: bool = False
    transpose: bool = False
    part: int = 0
    parts: int = 1
    order: str = "concat"

    def nbytes(self) -> int:
        """Bytes read per expert (a peft lora_B is read once per layer: its share per expert)."""
        t = self.tensor
        if self.kind == "whole":
            return t.nbytes
        if self.kind == "index":
            return t.nbytes // t.shape[0]
        return t.nbytes // self.num_experts


_CACHE: dict[tuple[str, str, str], torch.Tensor] = {}


def _whole(storage: Store, t: Stored) -> torch.Tensor:
    """A whole factor tensor, kept while consecutive experts of one layer need it (one at a time)."""
    key = (storage.url, t.file, t.name)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = to_tensor(read_stored(storage, t), t.dtype, t.shape)
    return _CACHE[key]


def cut_factor(storage: Store, cut: Cut, e: int) -> torch.Tensor:
    """Expert e's factor."""
    t = cut.tensor
    if cut.kind == "whole":
        x = to_tensor(read_stored(storage, t), t.dtype, t.shape)
    elif cut.kind == "rows":
        size = t.nbytes // cut.num_experts
        x = to_tensor(read_stored(storage, t, e * size, (e + 1) * size), t.dtype,
                      (t.shape[0] // cut.num_experts, *t.shape[1:]))
    elif cut.kind == "index":
        i, size = (0 if cut.shared else e), t.nbytes // t.shape[0]
        x = to_tensor(read_stored(storage, t, i * size, (i + 1) * size), t.dtype, t.shape[1:])
    elif cut.kind == "expert_major":
        whole = _whole(storage, t)
        x = whole.reshape(whole.shape[0], cut.num_experts, whole.shape[1] // cut.num_experts)[:, e, :]
    else:
        whole = _whole(storage, t)
        x = whole.reshape(whole.shape[0], whole.shape[1] // cut.num_experts, cut.num_experts)[:, :, e]
    x = x.T if cut.transpose else x
    if cut.parts == 1:
        return x
    if cut.order == "interleave":
        return x[cut.part :: cut.parts]
    n = x.shape[0] // cut.parts
    return x[cut.part * n : (cut.part + 1) * n]


@dataclass(frozen=True)
class RoleLora:
    """One role of one layer: A and B cuts (one for all experts, or one per expert), scaling and module per expert."""

    role: str
    a: tuple[Cut, ...]
    b: tuple[Cut, ...]
    scaling: tuple[float, ...]
    modules: tuple[str, ...]
    # per expert: B is first multiplied by this factor (`rescaled`), as a target rescaling writes it; () or None: not
    rescale: tuple[float | None, ...] = ()
    # "absent": no LoRA on this side (the other side's pair must be exactly zero; load gives None);
    # "zero": the pair must be exactly zero (a zero pair a target needs): a non-zero factor loads as its largest magnitude
    zero: str = ""

    def cuts(self, e: int) -> tuple[Cut, Cut]:
        return self.a[e if len(self.a) > 1 else 0], self.b[e if len(self.b) > 1 else 0]


@dataclass(frozen=True)
class LoraSide:
    """One side of one layer's expert LoRA: loads expert e's delta of every role (float64)."""

    roles: tuple[RoleLora, ...]

    def load(self, storage: Store, e: int) -> dict[str, tuple[Data, str]]:
        """Expert e's delta of each role (float64; None for a role absent on this side) and its module."""
        out: dict[str, tuple[Data, str]] = {}
        for rl in self.roles:
            if rl.zero == "absent":
                out[rl.role] = (None, rl.modules[e])  # type: ignore[assignment]
                continue
            if e >= len(rl.scaling):  # a role held by fewer experts than the layer's largest count
                continue
            ca, cb = rl.cuts(e)
            a, b = cut_factor(storage, ca, e), cut_factor(storage, cb, e)
            if rl.zero == "zero":
                top = max(float(a.double().abs().max()) if a.numel() else 0.0,
                          float(b.double().abs().max()) if b.numel() else 0.0)
                delta = torch.full((b.shape[0], a.shape[1]), top if top == top else math.inf, dtype=torch.float64)
                out[rl.role] = (delta, rl.modules[e] + " (must be an exact zero pair: the source has no LoRA there)")
                continue
            factor = rl.rescale[e] if rl.rescale else None
            if factor is not None:
                b = rescaled(b, factor)
            out[rl.role] = ((b.double() @ a.double()) * rl.scaling[e], rl.modules[e])
        return out

    def expert_bytes(self, e: int) -> int:
        return sum(c.nbytes() for rl in self.roles if rl.zero != "absent" and e < len(rl.scaling) for c in rl.cuts(e))


def _family_order(family: Family | None) -> str | None:
    """How the family's fused tensor holding several roles stacks them on its out dim (concat halves or interleave)."""
    return fused_order(family) if family is not None else None


def _family(group: ExpertLoraGroup, base_config: dict[str, Any] | None) -> Family | None:
    families = load_families()
    if group.family in families:
        return families[group.family]
    return find_family(base_config)[0] if base_config else None


def layer_key(prefix: str, family: Family | None) -> str:
    """The layer a group belongs to, whatever container the layout names (`mlp`, `block_sparse_moe`)."""
    name = _module(prefix)
    for fams in ([family] if family else [], list(load_families().values())):
        suffixes = set()
        for fam in fams:
            for tpl in [*fam.per_expert.values(), *(t.template for ts in fam.fused.values() for t in ts)]:
                head = tpl.split(".experts", 1)[0]
                if head.startswith("{prefix}"):
                    suffixes.add(head[len("{prefix}"):])
        for suffix in sorted(suffixes, key=len, reverse=True):
            if suffix and name.endswith(suffix):
                return name[: -len(suffix)]
    return name


def lora_side(
    group: ExpertLoraGroup, table: Table, config: dict[str, Any], family: Family | None, where: str,
    rules: TargetRules | None = None,
) -> tuple[LoraSide, list[str]]:
    """The cuts and scalings of one side of one layer, and where its ranks disagree with its config.

    `rules`: the target the side was written for (its server's view of the scaling, `served_scale`); None: peft's."""
    def scale_of(module: str) -> tuple[int, float, float]:
        r, scaling = served_scale(config, module, rules, True)
        if rules is not None and not rules.rank_pattern and not rules.fixed_rank:
            r = -1  # the server takes each tensor's rank as it is
        return r, 0.0, scaling

    E = group.num_experts
    order = _family_order(family)
    problems: list[str] = []
    roles = []
    for role in group.roles:
        E = group.experts_of(role)  # more than E for a role of the family's extra_experts
        if group.pattern == "per_expert":
            fa = [group.factor((role,), "A", e) for e in range(E)]
            fb = [group.factor((role,), "B", e) for e in range(E)]
            modules = [_module(f.name.rsplit(".lora_A", 1)[0]) for f in fa]
            scales = [scale_of(m) for m in modules]
            bad = next((e for e in range(E) if scales[e][0] >= 0 and fa[e].shape[0] != scales[e][0]), None)
            if bad is not None:
                problems.append(f"{where}: tensor {fa[bad].name!r} has rank {fa[bad].shape[0]}, but "
                                f"adapter_config.json gives {modules[bad]} r={scales[bad][0]}")
            roles.append(RoleLora(role, tuple(Cut(table.tensors[f.name], "whole", E) for f in fa),
                                  tuple(Cut(table.tensors[f.name], "whole", E) for f in fb),
                                  tuple(sc[2] for sc in scales), tuple(f.name for f in fb)))
            continue
        fa1 = next(f for f in group.factors if role in f.roles and f.factor == "A")
        fb1 = next(f for f in group.factors if role in f.roles and f.factor == "B")
        k, part = len(fb1.roles), fb1.roles.index(role)
        if k > 1 and order is None:
            raise ConversionError(f"{where}: layer {group.prefix}: cannot tell how {fb1.name!r} orders {'/'.join(fb1.roles)} "
                                  "without the model family; pass --base-config")
        a, b = table.tensors[fa1.name], table.tensors[fb1.name]
        split: dict[str, Any] = dict(part=part, parts=k, order=order or "concat")
        if group.pattern == "peft_target_parameters":
            param = next(p for roles_, p in group.target_param if role in roles_)
            module = _module(f"{group.prefix}.experts.{param}")
            r_tensor = a.shape[0] // E
            b_kind = "expert_minor" if group.b_order == "rank_major" else "expert_major"
            if group.orientation == "in_out":
                cut_a, cut_b = Cut(a, "rows", E), Cut(b, b_kind, E, **split)
            else:  # older peft shapes: the expert's delta is (B_e @ A_e)^T, so its lora_A is B_e^T and lora_B A_e^T
                cut_a, cut_b = Cut(b, b_kind, E, transpose=True), Cut(a, "rows", E, transpose=True, **split)
        elif group.pattern == "shared_w123":  # A [1|E, r, in], B [E|1, out, r]
            module = _module(fa1.name.rsplit(".lora_A", 1)[0])
            r_tensor = a.shape[1]
            cut_a = Cut(a, "index", E, shared=a.shape[0] == 1)
            cut_b = Cut(b, "index", E, shared=b.shape[0] == 1)
        else:  # grouped, x @ A @ B: A [E, in, r], B [E, r, out]
            module = _module(f"{group.prefix}.experts")
            r_tensor = a.shape[2]
            cut_a, cut_b = Cut(a, "index", E, transpose=True), Cut(b, "index", E, transpose=True, **split)
        r, _, scale = scale_of(module)
        if r >= 0 and r != r_tensor:
            problems.append(f"{where}: tensor {fa1.name!r} holds rank {r_tensor} per expert, but "
                            f"adapter_config.json gives {module} r={r}")
        roles.append(RoleLora(role, (cut_a,), (cut_b,), (scale,) * E, (fb1.name,) * E))
    return LoraSide(tuple(roles)), problems


def _pair_roles(src: LoraSide, dst: LoraSide) -> tuple[LoraSide, LoraSide]:
    """The two sides of one layer made comparable: a role only the destination has must be an exact zero pair
    there; where the destination's scaling s' differs from the source's s, the source's B is rescaled by s/s'
    as a target rescaling writes it (float32, rounded once) and scaled by s', so only that exact result passes."""
    have = {rl.role: rl for rl in src.roles}
    src_roles, dst_roles = [], []
    for rl in dst.roles:
        mine = have.get(rl.role)
        if mine is None:
            src_roles.append(RoleLora(rl.role, (), (), rl.scaling, rl.modules, zero="absent"))
            dst_roles.append(dataclasses.replace(rl, zero="zero"))
            continue
        factors = tuple(None if mine.scaling[e] == rl.scaling[e] else mine.scaling[e] / rl.scaling[e]
                        for e in range(min(len(mine.scaling), len(rl.scaling))))
        if any(f is not None for f in factors):
            mine = dataclasses.replace(mine, scaling=rl.scaling, rescale=factors)
        src_roles.append(mine)
        dst_roles.append(rl)
    return LoraSide(tuple(src_roles)), LoraSide(tuple(dst_roles))


def _module_check(
    src_module: str, dst_module: str, src_table: Table, dst_table: Table, src_cfg: dict[str, Any],
    dst_cfg: dict[str, Any], rules: TargetRules | None, where: str,
) -> tuple[ExpertCheck | None, list[str]]:
    """A LoRA module outside the experts (attention, router), maybe renamed: None where its scaling is unchanged
    (its factors must pass through), else a check that its delta is kept by an exact rescaling of its B; and
    what is wrong from metadata (a factor missing)."""
    names = [(f"{src_module}.lora_{f}.weight", f"{dst_module}.lora_{f}.weight") for f in "AB"]
    missing = [d for s, d in names if s in src_table.tensors and d not in dst_table.tensors]
    if missing:
        return None, [f"{where}: tensor {missing[0]!r} is missing"]
    if any(s not in src_table.tensors for s, _ in names):
        return None, []
    _, _, s = module_scale(src_cfg, _module(src_module))
    r_dst, s_dst = served_scale(dst_cfg, _module(dst_module), rules, False)
    if s == s_dst:
        return None, []
    (sa, da), (sb, db) = names
    r_src = src_table.tensors[sa].shape[0]
    role = (f"module {_module(dst_module)} (r, scaling) is {(r_dst, s_dst)}, the source has {(r_src, s)}: its lora_B "
            f"must be the source's times s/s' = {s / s_dst!r} (float32, rounded once)")
    src_side = LoraSide((RoleLora(role, (Cut(src_table.tensors[sa], "whole", 1),), (Cut(src_table.tensors[sb], "whole", 1),),
                                  (s_dst,), (sb,), rescale=(s / s_dst,)),))
    dst_side = LoraSide((RoleLora(role, (Cut(dst_table.tensors[da], "whole", 1),), (Cut(dst_table.tensors[db], "whole", 1),),
                                  (s_dst,), (db,)),))
    same = {src_table.tensors[sa].dtype, src_table.tensors[sb].dtype} == {dst_table.tensors[da].dtype, dst_table.tensors[db].dtype}
    eps = SAME_BYTES_RTOL if same else 4 * max(torch.finfo(torch_dtype(t.dtype)).eps for t in
                                               (src_table.tensors[sa], dst_table.tensors[da]))
    rank = src_table.tensors[sa].shape[0]
    return ExpertCheck(_module(dst_module), 1, src_side, dst_side, exact=False, rtol=eps,
                       rel_atol=eps * math.sqrt(rank + 1)), []


def _relation_family(groups: list[ExpertLoraGroup], base: dict[str, Any] | None) -> Family | None:
    """The base model's family: from --base-config, else the one the expert LoRA's layout names."""
    if base:
        found = find_family(base)[0]
        if found is not None:
            return found
    families = load_families()
    return next((families[g.family] for g in groups if g.family in families), None)


def _infos(table: Table) -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, t.dtype, t.shape, t.start, t.end) for n, t in table.tensors.items()}


def _factor_eps(table: Table, group: ExpertLoraGroup) -> float:
    return max(torch.finfo(torch_dtype(table.tensors[n].dtype)).eps for n in group.tensors)


def _read_config(storage: Store, where: str) -> dict[str, Any]:
    try:
        cfg = read_json(storage, ADAPTER_CONFIG)
    except OSError as exc:
        raise ConversionError(f"{storage.display(ADAPTER_CONFIG)}: cannot be read ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ConversionError(f"{storage.display(ADAPTER_CONFIG)}: not a JSON object")
    return cfg


def load_base_config(path: str | None, storage_options: dict[str, Any],
                     settings: StorageSettings | None = None) -> dict[str, Any] | None:
    """The --base-config file (a config.json path or URL), or None; its store opened with `settings` (None: the
    defaults)."""
    if not path:
        return None
    parent, name = posixpath.split(path.rstrip("/"))
    store = Storage(parent or ".", storage_options, settings)
    try:
        cfg = read_json(store, name)
    except OSError as exc:
        raise ConversionError(f"--base-config {path}: cannot be read ({exc})") from exc
    finally:
        store.close()
    return cfg if isinstance(cfg, dict) else None


@dataclass(frozen=True)
class _Adapter:
    """One side of an adapter relation: its directory, tensors, adapter_config.json, expert LoRA groups, other
    tensors and the key naming its names are read in."""

    storage: Store
    table: Table
    cfg: dict[str, Any]
    groups: list[ExpertLoraGroup]
    other: list[str]
    names: KeyNames


def adapter_relation(src: Store, dst: Store, opts: VerifyOptions) -> Relation:
    """The checks proving `dst` is a conversion of the adapter `src` (see the module docstring)."""

    base = load_base_config(opts.base_config, opts.storage_options, opts.settings.storage)
    src_table, src_cfg = _read_source(src)
    dst_table, dst_cfg, problems = _read_destination(dst)
    try:
        src_groups, src_other = detect_expert_lora(_infos(src_table), src_cfg, base, src.display(), packings=True)
    except ConversionError as exc:
        raise CannotVerify(str(exc)) from exc
    try:
        dst_groups, dst_other = detect_expert_lora(_infos(dst_table), dst_cfg, base, dst.display(), packings=True)
    except ConversionError as exc:
        return Relation("adapter", "adapter (destination unreadable as expert LoRA)", [], [], problems + [str(exc)],
                        len(src_table.tensors), len(dst_table.tensors), len(dst_table.shards))

    family = _relation_family(src_groups + dst_groups, base)
    rules = _target_rules(opts, dst, family, base)
    src_names = KeyNames(family, source_naming(family, src_groups, list(src_table.tensors)), MODEL)
    dst_naming = rules.naming if rules is not None else source_naming(family, dst_groups, list(dst_table.tensors))
    a_side = _Adapter(src, src_table, src_cfg, src_groups, src_other, src_names)
    b_side = _Adapter(dst, dst_table, dst_cfg, dst_groups, dst_other, KeyNames(family, dst_naming, MODEL))

    experts, found = _expert_checks(a_side, b_side, base, rules)
    problems += found
    # a tensor of the source must be under the name the destination's naming gives it (the family's renames)
    passes, lora_modules, extra, found = _other_tensors(a_side, b_side, KeyNames(family, MODEL, dst_naming),
                                                        dst_naming)
    problems += found
    module_experts, module_passes, found = _module_checks(lora_modules, a_side, b_side, rules)
    experts += module_experts
    passes += module_passes
    problems += found
    experts += _zero_pairs(extra, b_side)
    problems += [f"{dst.display()}: tensor {name!r} is not in the source" for name in sorted(set(extra.values()))]
    problems += _config_problems(src_cfg, dst_cfg, dst)
    files = [f for f in copied_files(src_table, ADAPTER_INDEX) if f != ADAPTER_CONFIG]
    problems += compare_files(src, dst, files)
    return Relation("adapter", _headline(a_side, b_side, len(experts)), experts, passes, problems,
                    len(src_table.tensors), len(dst_table.tensors), len(dst_table.shards))


def _read_source(src: Store) -> tuple[Table, dict[str, Any]]:
    """(the source adapter's tensors, its adapter_config.json); raises CannotVerify where it is no valid adapter."""
    src_table, bad = read_table(src, ADAPTER_INDEX, require_index=False, single_name=ADAPTER_WEIGHTS, strict=False)
    if bad:
        raise CannotVerify(f"the source adapter is not valid: {bad[0]}")
    if not src_table.tensors:
        raise CannotVerify(f"{src.display()}: the source adapter holds no tensors")
    return src_table, _read_config(src, src.display())


def _read_destination(dst: Store) -> tuple[Table, dict[str, Any], list[str]]:
    """(the destination's tensors, its adapter_config.json, what is wrong with its files); raises CannotVerify
    without an adapter_config.json."""
    dst_files, _ = dst.list_dir()
    if ADAPTER_CONFIG not in dst_files:
        raise CannotVerify(f"{dst.display(ADAPTER_CONFIG)}: missing (an adapter output without it is incomplete)")
    dst_cfg = _read_config(dst, dst.display())
    require_index = ADAPTER_INDEX in dst_files or ADAPTER_WEIGHTS not in dst_files
    dst_table, found = read_table(dst, ADAPTER_INDEX, require_index=require_index, single_name=ADAPTER_WEIGHTS,
                                  strict=True)
    return dst_table, dst_cfg, found


def _target_rules(opts: VerifyOptions, dst: Store, family: Family | None,
                  base: dict[str, Any] | None) -> TargetRules | None:
    """The rules of the target `dst` was written for (--target, else its output record) for `family`; None: none."""
    target = opts.target or recorded_target(dst)
    model_type = base.get("model_type") if isinstance(base, dict) else None
    return load_target(target).for_family(family.name if family else None, model_type) if target else None


def _expert_checks(src: _Adapter, dst: _Adapter, base: dict[str, Any] | None,
                   rules: TargetRules | None) -> tuple[list[ExpertCheck], list[str]]:
    """(a delta check of every expert layer the destination holds, what is wrong: a layer missing or unlike the
    source's, ranks disagreeing with the destination's config)."""
    experts: list[ExpertCheck] = []
    problems: list[str] = []
    src_by = {layer_key(src.names.canonical_module(g.prefix), _family(g, base)): g for g in src.groups}
    dst_by = {layer_key(dst.names.canonical_module(g.prefix), _family(g, base)): g for g in dst.groups}
    for layer in sorted(set(src_by) | set(dst_by)):
        a, b = src_by.get(layer), dst_by.get(layer)
        if b is None:
            assert a is not None  # the layer is the source's
            problems.append(f"{dst.storage.display()}: the expert LoRA of {layer} (e.g. {a.tensors[0]!r}) is missing")
            continue
        if a is not None and (a.num_experts != b.num_experts or not set(a.roles) <= set(b.roles) or a.slots != b.slots):
            problems.append(f"{dst.storage.display()}: layer {layer} has LoRA for {b.num_experts} experts, roles "
                            f"{list(b.roles)}; the source has {a.num_experts}, {list(a.roles)}")
            continue
        side_a, side_b, found = _layer_sides(a, b, src, dst, base, rules)
        problems += found
        eps = _delta_rtol(src.table, a, dst.table, b)
        rank = max(a.rank if a else 0, b.rank)
        experts.append(ExpertCheck(layer, b.slots, side_a, side_b, exact=False, rtol=eps,
                                   rel_atol=eps * math.sqrt(rank + 1)))
    return experts, problems


def _layer_sides(a: ExpertLoraGroup | None, b: ExpertLoraGroup, src: _Adapter, dst: _Adapter,
                 base: dict[str, Any] | None, rules: TargetRules | None) -> tuple[LoraSide, LoraSide, list[str]]:
    """The comparable sides of one layer (source group `a`, None where it has none; destination group `b`) and
    where the destination's ranks disagree with its config; raises CannotVerify where the source's do."""
    try:
        side_b, pb = lora_side(b, dst.table, dst.cfg, _family(b, base), dst.storage.display(), rules)
        if a is not None:
            side_a, pa = lora_side(a, src.table, src.cfg, _family(a, base), src.storage.display())
        else:
            side_a, pa = LoraSide(()), []
    except ConversionError as exc:
        raise CannotVerify(str(exc)) from exc
    if pa:
        raise CannotVerify(f"the source adapter disagrees with its own config: {pa[0]}")
    side_a, side_b = _pair_roles(side_a, side_b)
    return side_a, side_b, pb


def _delta_rtol(src_table: Table, a: ExpertLoraGroup | None, dst_table: Table, b: ExpertLoraGroup) -> float:
    """The relative tolerance of a layer's deltas: float64 rounding where the factors' dtypes agree, else 4 eps
    of the narrower dtype."""
    src_t = [src_table.tensors[n] for n in a.tensors] if a is not None else []
    same = {t.dtype for t in src_t} <= {dst_table.tensors[n].dtype for n in b.tensors}
    return SAME_BYTES_RTOL if same else 4 * max(_factor_eps(src_table, a) if a else 0.0, _factor_eps(dst_table, b))


def _other_tensors(
    src: _Adapter, dst: _Adapter, out_names: KeyNames, dst_naming: str,
) -> tuple[list[PassCheck], dict[str, tuple[str, str]], dict[str, str], list[str]]:
    """The tensors outside the expert LoRA: (pass-through checks of those that are not LoRA factors, canonical
    module -> (source module, destination module) of the other LoRA modules, canonical key -> name of the
    destination's tensors the source lacks, the source's tensors missing or misnamed in the destination)."""
    dst_canon = {dst.names.key(n): n for n in dst.other}
    src_canon = {src.names.key(n): n for n in src.other}
    passes: list[PassCheck] = []
    lora_modules: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for key, name in src_canon.items():
        want = out_names.key(key)
        if key not in dst_canon or dst_canon[key] != want:
            where = f" (expected as {want!r})" if want != name else ""
            if key in dst_canon:
                where += f"; the destination has it as {dst_canon[key]!r}, not the {dst_naming} naming of its target"
            problems.append(f"{dst.storage.display()}: tensor {name!r} of the source is not in the destination{where}")
            dst_canon.pop(key, None)
            continue
        if ".lora_" in name:
            lora_modules[key.split(".lora_", 1)[0]] = (name.split(".lora_", 1)[0], dst_canon[key].split(".lora_", 1)[0])
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):  # embedding LoRA, DoRA magnitudes, modules_to_save
            passes.append(PassCheck(src.table.tensors[name], dst.table.tensors[dst_canon[key]]))
    extra = {k: n for k, n in dst_canon.items() if k not in src_canon}
    return passes, lora_modules, extra, problems


def _module_checks(lora_modules: dict[str, tuple[str, str]], src: _Adapter, dst: _Adapter,
                   rules: TargetRules | None) -> tuple[list[ExpertCheck], list[PassCheck], list[str]]:
    """Other LoRA (attention, router), delta and scaling kept: (a delta check of each module whose scaling changed,
    pass-through checks of the others' factors, the factors missing)."""
    checks: list[ExpertCheck] = []
    passes: list[PassCheck] = []
    problems: list[str] = []
    for _key, (sm, dm) in sorted(lora_modules.items()):
        check, found = _module_check(sm, dm, src.table, dst.table, src.cfg, dst.cfg, rules, dst.storage.display())
        problems += found
        if check is not None:
            checks.append(check)
            continue
        for n, dn in ((f"{sm}.lora_{f}.weight", f"{dm}.lora_{f}.weight") for f in "AB"):
            if n in src.table.tensors and dn in dst.table.tensors:
                passes.append(PassCheck(src.table.tensors[n], dst.table.tensors[dn]))
    return checks, passes, problems


def _zero_pairs(extra: dict[str, str], dst: _Adapter) -> list[ExpertCheck]:
    """Checks that each LoRA pair among `extra` (the destination's tensors the source lacks) is exactly zero (a
    zero pair a target needs, e.g. SGLang's v_proj next to q_proj); the pairs' names are taken out of `extra`."""
    checks: list[ExpertCheck] = []
    zero_modules = sorted({n.split(".lora_", 1)[0] for n in extra.values()
                           if n.endswith((".lora_A.weight", ".lora_B.weight"))})
    for dm in zero_modules:
        an, bn = f"{dm}.lora_A.weight", f"{dm}.lora_B.weight"
        if an not in dst.table.tensors or bn not in dst.table.tensors:
            continue
        extra.pop(dst.names.key(an), None)
        extra.pop(dst.names.key(bn), None)
        ca, cb = Cut(dst.table.tensors[an], "whole", 1), Cut(dst.table.tensors[bn], "whole", 1)
        zero_side = LoraSide((RoleLora("lora", (ca,), (cb,), (1.0,), (bn,), zero="zero"),))
        absent = LoraSide((RoleLora("lora", (), (), (1.0,), (bn,), zero="absent"),))
        checks.append(ExpertCheck(_module(dm), 1, absent, zero_side, exact=True))
    return checks


def _config_problems(src_cfg: dict[str, Any], dst_cfg: dict[str, Any], dst: Store) -> list[str]:
    """The adapter_config.json fields a conversion has no reason to change (not REWRITTEN) that it changed."""
    return [f"{dst.display(ADAPTER_CONFIG)}: {key} is {dst_cfg.get(key)!r}, the source has {src_cfg.get(key)!r}"
            for key in sorted((set(src_cfg) | set(dst_cfg)) - REWRITTEN) if src_cfg.get(key) != dst_cfg.get(key)]


def _headline(src: _Adapter, dst: _Adapter, layers: int) -> str:
    """The relation's one-line summary: the layouts on each side, `layers` checked, E and the tensor counts."""
    patterns = sorted({g.pattern for g in src.groups}) or ["none"]
    out_patterns = sorted({g.pattern for g in dst.groups}) or ["none"]
    return (f"adapter {'/'.join(patterns)} -> {'/'.join(out_patterns)}: {layers} expert layer(s) x "
            f"E={src.groups[0].num_experts if src.groups else 0}; {len(src.table.tensors)} source tensors -> "
            f"{len(dst.table.tensors)} destination tensors; per-expert deltas B_e @ A_e * scaling compared")
