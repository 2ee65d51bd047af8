"""What a correct adapter conversion must satisfy: every expert's LoRA delta is unchanged.

For each MoE layer, each side's expert LoRA is recognised with convert.formats.adapter_layouts
(`detect_expert_lora`: per-expert, peft target_parameters, shared 3-D, grouped), but the
meaning of the factors is re-derived here from FORMATS.md, independently of the converter's
transforms: expert e's A_e [r, in] and B_e [out, r] are cut out of whichever tensors hold
them, and delta_e = B_e @ A_e * scaling, with the scaling each side's own adapter_config.json
gives the module (r and lora_alpha through rank_pattern/alpha_pattern, use_rslora). Deltas
are compared in float64: to ~1e-12 where the factors' dtypes agree (bytes moved), to the
narrower dtype's precision where a cast happened. Every other tensor must pass through
(attention and router LoRA with an unchanged scaling, modules_to_save), adapter_config.json
must keep every field the conversion has no reason to change, each side's ranks must agree
with its config, and other files must be copied.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import torch

from convert.formats.adapter_layouts import PEFT_PREFIX, ExpertLoraGroup, detect_expert_lora, fused_order
from convert.errors import ConversionError
from convert.families import Family, find_family, load_families
from convert.formats.safetensors import TensorInfo
from convert.io.storage import Storage
from convert.verify.checks import ExpertCheck, PassCheck, read_stored
from convert.verify.tables import DTYPES, Stored, Table, read_table, to_tensor

from convert.verify.relation import CannotVerify, Relation, VerifyOptions, compare_files, copied_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INDEX = "adapter_model.safetensors.index.json"
# adapter_config.json fields a layout conversion rewrites; every other field must survive unchanged
REWRITTEN = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "target_parameters"}
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


def _module(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass(frozen=True)
class Cut:
    """How to get one expert's factor (A as [r, in], B as [out, r]) out of a stored tensor.

    kind: "whole" (the tensor is the factor), "rows" (peft lora_A [E*r, in]: rows [e*r, (e+1)*r)),
    "index" (3-D [E|1, ...]: x[e], or x[0] when `shared`; transposed when `transpose`, for grouped
    NeMo factors), "expert_minor" (peft lora_B [out, r*E]: B.view(out, r, E)[:, :, e]).
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


def _whole(storage: Storage, t: Stored) -> torch.Tensor:
    """A whole factor tensor, kept while consecutive experts of one layer need it (one at a time)."""
    key = (storage.url, t.file, t.name)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = to_tensor(read_stored(storage, t), t.dtype, t.shape)
    return _CACHE[key]


def cut_factor(storage: Storage, cut: Cut, e: int) -> torch.Tensor:
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
        x = x.T if cut.transpose else x
    else:
        whole = _whole(storage, t)
        x = whole.reshape(whole.shape[0], whole.shape[1] // cut.num_experts, cut.num_experts)[:, :, e]
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

    def cuts(self, e: int) -> tuple[Cut, Cut]:
        return self.a[e if len(self.a) > 1 else 0], self.b[e if len(self.b) > 1 else 0]


@dataclass(frozen=True)
class LoraSide:
    """One side of one layer's expert LoRA: loads expert e's delta of every role (float64)."""

    roles: tuple[RoleLora, ...]

    def load(self, storage: Storage, e: int) -> dict[str, tuple[torch.Tensor, str]]:
        out = {}
        for rl in self.roles:
            if e >= len(rl.scaling):  # a role held by fewer experts than the layer's largest count
                continue
            ca, cb = rl.cuts(e)
            a, b = cut_factor(storage, ca, e), cut_factor(storage, cb, e)
            out[rl.role] = ((b.double() @ a.double()) * rl.scaling[e], rl.modules[e])
        return out

    def expert_bytes(self, e: int) -> int:
        return sum(c.nbytes() for rl in self.roles if e < len(rl.scaling) for c in rl.cuts(e))


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
    group: ExpertLoraGroup, table: Table, config: dict[str, Any], family: Family | None, where: str
) -> tuple[LoraSide, list[str]]:
    """The cuts and scalings of one side of one layer, and where its ranks disagree with its config."""
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
            scales = [module_scale(config, m) for m in modules]
            bad = next((e for e in range(E) if fa[e].shape[0] != scales[e][0]), None)
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
        split = dict(part=part, parts=k, order=order or "concat")
        if group.pattern == "peft_target_parameters":
            param = next(p for roles_, p in group.target_param if role in roles_)
            module = _module(f"{group.prefix}.experts.{param}")
            r_tensor = a.shape[0] // E
            cut_a, cut_b = Cut(a, "rows", E), Cut(b, "expert_minor", E, **split)
        elif group.pattern == "shared_w123":  # A [1|E, r, in], B [E|1, out, r]
            module = _module(fa1.name.rsplit(".lora_A", 1)[0])
            r_tensor = a.shape[1]
            cut_a = Cut(a, "index", E, shared=a.shape[0] == 1)
            cut_b = Cut(b, "index", E, shared=b.shape[0] == 1)
        else:  # grouped, x @ A @ B: A [E, in, r], B [E, r, out]
            module = _module(f"{group.prefix}.experts")
            r_tensor = a.shape[2]
            cut_a, cut_b = Cut(a, "index", E, transpose=True), Cut(b, "index", E, transpose=True, **split)
        r, _, scale = module_scale(config, module)
        if r != r_tensor:
            problems.append(f"{where}: tensor {fa1.name!r} holds rank {r_tensor} per expert, but "
                            f"adapter_config.json gives {module} r={r}")
        roles.append(RoleLora(role, (cut_a,), (cut_b,), (scale,) * E, (fb1.name,) * E))
    return LoraSide(tuple(roles)), problems


def _infos(table: Table) -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, t.dtype, t.shape, t.start, t.end) for n, t in table.tensors.items()}


def _factor_eps(table: Table, group: ExpertLoraGroup) -> float:
    return max(torch.finfo(DTYPES[table.tensors[n].dtype][0]).eps for n in group.tensors)


def _read_config(storage: Storage, where: str) -> dict[str, Any]:
    try:
        cfg = storage.read_json(ADAPTER_CONFIG)
    except OSError as exc:
        raise ConversionError(f"{storage.display(ADAPTER_CONFIG)}: cannot be read ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ConversionError(f"{storage.display(ADAPTER_CONFIG)}: not a JSON object")
    return cfg


def load_base_config(path: str | None, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The --base-config file (a config.json path or URL), or None."""
    if not path:
        return None
    parent, name = posixpath.split(path.rstrip("/"))
    store = Storage(parent or ".", storage_options)
    try:
        cfg = store.read_json(name)
    except OSError as exc:
        raise ConversionError(f"--base-config {path}: cannot be read ({exc})") from exc
    finally:
        store.close()
    return cfg if isinstance(cfg, dict) else None


def adapter_relation(src: Storage, dst: Storage, opts: VerifyOptions) -> Relation:
    """The checks proving `dst` is a conversion of the adapter `src` (see the module docstring)."""

    base = load_base_config(opts.base_config, opts.storage_options)
    src_table, bad = read_table(src, ADAPTER_INDEX, require_index=False, single_name=ADAPTER_WEIGHTS, strict=False)
    if bad:
        raise CannotVerify(f"the source adapter is not valid: {bad[0]}")
    if not src_table.tensors:
        raise CannotVerify(f"{src.display()}: the source adapter holds no tensors")
    src_cfg = _read_config(src, src.display())
    dst_files, _ = dst.list_dir()
    problems: list[str] = []
    if ADAPTER_CONFIG not in dst_files:
        raise CannotVerify(f"{dst.display(ADAPTER_CONFIG)}: missing (an adapter output without it is incomplete)")
    dst_cfg = _read_config(dst, dst.display())
    require_index = ADAPTER_INDEX in dst_files or ADAPTER_WEIGHTS not in dst_files
    dst_table, found = read_table(dst, ADAPTER_INDEX, require_index=require_index, single_name=ADAPTER_WEIGHTS,
                                  strict=True)
    problems += found
    try:
        src_groups, src_other = detect_expert_lora(_infos(src_table), src_cfg, base, src.display())
    except ConversionError as exc:
        raise CannotVerify(str(exc)) from exc
    try:
        dst_groups, dst_other = detect_expert_lora(_infos(dst_table), dst_cfg, base, dst.display())
    except ConversionError as exc:
        return Relation("adapter", "adapter (destination unreadable as expert LoRA)", [], [], problems + [str(exc)],
                        len(src_table.tensors), len(dst_table.tensors), len(dst_table.shards))

    experts: list[ExpertCheck] = []
    src_by = {layer_key(g.prefix, _family(g, base)): g for g in src_groups}
    dst_by = {layer_key(g.prefix, _family(g, base)): g for g in dst_groups}
    for layer in sorted(set(src_by) | set(dst_by)):
        a, b = src_by.get(layer), dst_by.get(layer)
        if b is None:
            problems.append(f"{dst.display()}: the expert LoRA of {layer} (e.g. {a.tensors[0]!r}) is missing")  # type: ignore[union-attr]
            continue
        if a is None:
            problems.append(f"{dst.display()}: expert LoRA of {layer} (e.g. {b.tensors[0]!r}) is not in the source")
            continue
        if a.num_experts != b.num_experts or set(a.roles) != set(b.roles) or a.slots != b.slots:
            problems.append(f"{dst.display()}: layer {layer} has LoRA for {b.num_experts} experts, roles "
                            f"{list(b.roles)}; the source has {a.num_experts}, {list(a.roles)}")
            continue
        try:
            side_a, pa = lora_side(a, src_table, src_cfg, _family(a, base), src.display())
            side_b, pb = lora_side(b, dst_table, dst_cfg, _family(b, base), dst.display())
        except ConversionError as exc:
            raise CannotVerify(str(exc)) from exc
        if pa:
            raise CannotVerify(f"the source adapter disagrees with its own config: {pa[0]}")
        problems += pb
        same = {src_table.tensors[n].dtype for n in a.tensors} == {dst_table.tensors[n].dtype for n in b.tensors}
        eps = SAME_BYTES_RTOL if same else 4 * max(_factor_eps(src_table, a), _factor_eps(dst_table, b))
        rank = max(a.rank, b.rank)
        experts.append(ExpertCheck(layer, a.slots, side_a, side_b, exact=False, rtol=eps,
                                   rel_atol=eps * math.sqrt(rank + 1)))

    passes = []
    dst_set = set(dst_other)
    lora_modules = set()
    for name in src_other:
        if name not in dst_set:
            problems.append(f"{dst.display()}: tensor {name!r} of the source is not in the destination")
            continue
        passes.append(PassCheck(src_table.tensors[name], dst_table.tensors[name]))
        if ".lora_" in name:
            lora_modules.add(_module(name.split(".lora_", 1)[0]))
    for module in sorted(lora_modules):  # pass-through LoRA (attention, router) must keep its rank and scaling
        a_scale, b_scale = module_scale(src_cfg, module)[::2], module_scale(dst_cfg, module)[::2]
        if a_scale != b_scale:
            problems.append(f"{dst.display(ADAPTER_CONFIG)}: module {module} (r, scaling) is {b_scale}, "
                            f"the source has {a_scale}")
    for name in sorted(dst_set - set(src_other)):
        problems.append(f"{dst.display()}: tensor {name!r} is not in the source")
    for key in sorted((set(src_cfg) | set(dst_cfg)) - REWRITTEN):
        if src_cfg.get(key) != dst_cfg.get(key):
            problems.append(f"{dst.display(ADAPTER_CONFIG)}: {key} is {dst_cfg.get(key)!r}, the source has "
                            f"{src_cfg.get(key)!r}")
    files = [f for f in copied_files(src_table, ADAPTER_INDEX) if f != ADAPTER_CONFIG]
    problems += compare_files(src, dst, files)
    patterns = sorted({g.pattern for g in src_groups}) or ["none"]
    out_patterns = sorted({g.pattern for g in dst_groups}) or ["none"]
    headline = (f"adapter {'/'.join(patterns)} -> {'/'.join(out_patterns)}: {len(experts)} expert layer(s) x "
                f"E={src_groups[0].num_experts if src_groups else 0}; {len(src_table.tensors)} source tensors -> "
                f"{len(dst_table.tensors)} destination tensors; per-expert deltas B_e @ A_e * scaling compared")
    return Relation("adapter", headline, experts, passes, problems, len(src_table.tensors), len(dst_table.tensors),
                    len(dst_table.shards))
