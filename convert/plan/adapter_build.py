"""What every adapter layout's split and fuse planning shares (convert.plan.adapter_<layout>): the Builder that
collects output tensors, pieces and output modules' scales, and the names of per-expert and fused outputs.

Output key names come from the family tables (configs/families/*.json) and the target's naming (KeyNames); this
module names no model and no layout.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from convert.errors import ConversionError
from convert.families import Family
from convert.formats.adapter_dir import is_lora, lora_module
from convert.formats.adapter_layouts import (
    ExpertLoraGroup,
    LoraFactor,
    lora_roles,
    lora_tensors,
    module_key,
    output_role,
)
from convert.formats.adapter_source import AdapterSource
from convert.formats.checkpoint import TensorRef
from convert.formats.safetensors import DTYPE_SIZES, numel
from convert.plan.adapter_names import MODEL, KeyNames, expert_prefix
from convert.plan.adapter_scaling import OutputModule, Scale, scale_for_rank, source_scale
from convert.plan.adapter_transforms import ZeroFill
from convert.plan.base import Piece, Read, TargetTensor, Write, copy_pieces, target_dtype
from convert.targets.rules import TargetRules


def family_prefix(family: Family, group_prefix: str, where: str, names: KeyNames | None = None) -> str:
    """The family template `{prefix}` (model naming) of an expert-LoRA group whose module path before `.experts`
    is `group_prefix` (in the source's naming, `names.source`; model naming when `names` is None)."""
    prefix = expert_prefix(family, names or KeyNames(family, MODEL, MODEL), group_prefix)
    if prefix is not None:
        return prefix
    containers = {t[: t.index(".experts")] for t in family.per_expert.values()}
    containers |= {t.template[: t.template.index(".experts")] for ts in family.fused.values() for t in ts}
    raise ConversionError(
        f"{where}: expert LoRA module {group_prefix}.experts does not fit the {family.name} family's names "
        f"(expected one of {sorted(c.replace('{prefix}', '<layer>') + '.experts' for c in containers)})"
    )


def per_expert_module(family: Family, prefix: str, role: str, e: int) -> str:
    """The per-expert module name of `role` of expert `e` in model naming (e.g. `...experts.3.gate_proj`)."""
    template = family.expert_templates[role]
    return template[: -len(".weight")].format(prefix=prefix, e=e)


def proj_name(family: Family, role: str, names: KeyNames | None = None) -> str:
    """The per-expert projection leaf name of `role` (gate_proj, w1, ...) under `names`' target naming
    (checkpoint naming when None)."""
    if names is None:
        return family.per_expert[role].rsplit(".", 2)[-2]
    return names.out_module(per_expert_module(family, "P", role, 0)).rsplit(".", 1)[-1]


def expert_leaf_renames(family: Family | None, rules: TargetRules) -> tuple[tuple[str, str], ...]:
    """(family leaf, target leaf) of the per-expert projections `rules` names otherwise than the family
    (rules.expert_names[0] "canonical" or "w123"); empty for "checkpoint" or an unknown family."""
    if family is None:
        return ()
    out: dict[str, str] = {}
    for role in lora_roles(family):
        new = rules.expert_leaf(role)
        if new is None:
            continue
        for template in (family.per_expert[role], family.expert_templates[role]):
            old = template.rsplit(".", 2)[-2]
            if old != new:
                out[old] = new
    return tuple(out.items())


def fused_wrappers(family: Family, roles: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    """(roles, `P.experts.<param>` template) of the family's fused parameters that hold `roles`, in declaration order."""
    return [(parts, f"{family.experts_path}.{leaf}") for parts, leaf, _ in lora_tensors(family) if set(parts) & set(roles)]


def input_roles(family: Family) -> tuple[str, ...]:
    """The family's roles that map hidden -> intermediate (every role but the output one), in order."""
    return tuple(r for r in lora_roles(family) if r != output_role(family))


def missing_roles(family: Family, g: ExpertLoraGroup) -> list[tuple[str, tuple[int, int]]]:
    """(role, (out, in)) of the family's LoRA roles that layer `g` has no LoRA for, with their shapes.

    An input projection has the shape of the layer's other input projections, or the transpose of
    its output projection; the output projection the transpose of an input one (as detection checked).
    """
    out = []
    for role in lora_roles(family):
        if role in g.roles:
            continue
        if role == output_role(family):
            dims = tuple(reversed(g.dims_of(next(r for r in g.roles if r != role))))
        else:
            same = [r for r in g.roles if r != output_role(family)]
            dims = g.dims_of(same[0]) if same else tuple(reversed(g.dims_of(output_role(family))))
        out.append((role, (int(dims[0]), int(dims[1]))))
    return out


def general_keys(name: str, tail: str) -> tuple[str, ...]:
    """Pattern keys naming module `name` (without base_model.model.): every layer's `tail`, then exactly it."""
    return (tail, re.escape(name))


def module_tail(module: str) -> str:
    """A pattern key naming every layer's (and expert's) module of the same kind as `module`."""
    m = re.search(r"\.experts\.\d+\.([^.]+)$", module)
    if m:
        return r"experts\.\d+\." + re.escape(m[1])
    return re.escape(".".join(module.split(".")[-2:]))


def block_read(ref: TensorRef, index: int, block_elems: int) -> Read:
    """Block `index` of `block_elems` elements of a tensor (its dim-0 slice when blocks are slices)."""
    item = ref.info.itemsize
    start = ref.info.start + index * block_elems * item
    return Read(ref.file, start, start + block_elems * item, ref.info.dtype)


class Builder:
    """Collects targets, pieces and the output modules' scales of one plan.

    `names` renames source keys to the target's naming; `b_tensors` lists each output module's
    lora_B tensors (what a rescale multiplies), `expert_modules` the modules of expert LoRA.
    """

    def __init__(self, src: AdapterSource, dtype: str | None, chunk: int, names: KeyNames | None = None) -> None:
        self.src, self.dtype, self.chunk = src, dtype, chunk
        self.names = names or KeyNames(None, MODEL, MODEL)
        self.where = src.display()
        self.targets: list[TargetTensor] = []
        self.pieces: list[Piece] = []
        self.modules: dict[str, OutputModule] = {}
        self.kept: set[str] = set()
        self.b_tensors: dict[str, list[str]] = {}
        self.expert_modules: set[str] = set()
        self.renamed: dict[str, str] = {}  # source module -> output module, of modules copied under a new name

    def ref(self, f: LoraFactor) -> TensorRef:
        return self.src.tensors[f.name]

    def out_dtype(self, f: LoraFactor) -> str:
        return target_dtype(f.dtype, self.dtype)

    def target(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.targets.append(TargetTensor(name, dtype, tuple(shape)))

    def module(self, name: str, scale: Scale, tail: str, b_names: tuple[str, ...] = (), expert: bool = True) -> None:
        key = module_key(name)
        old = self.modules.get(key)
        if old is not None and old.scale != scale:
            raise ConversionError(f"{self.where}: output module {key!r} would need two scalings {old.scale} and {scale}")
        self.modules[key] = OutputModule(key, scale, general_keys(key, tail))
        self.b_tensors.setdefault(key, []).extend(b_names)
        if expert:
            self.expert_modules.add(key)

    def passthrough(self, names: list[str], expert_of: dict[str, int] | None = None) -> None:
        """Copy (or cast) tensors `names` whole under the target's names; `expert_of` marks expert tensors."""
        for name in names:
            out = self.names.key(name)
            t, p = copy_pieces(self.src.tensors[name], out, self.dtype, self.chunk, (expert_of or {}).get(name))
            self.targets.append(t)
            self.pieces += p
            if not is_lora(name):
                continue
            src_mod, out_mod = module_key(lora_module(name)), module_key(lora_module(out))
            is_b = ".lora_B" in out[len(lora_module(out)):] or ".lora_embedding_B" in out[len(lora_module(out)):]
            if out_mod == src_mod:
                self.kept.add(out_mod)
                self.b_tensors.setdefault(out_mod, [])
            else:
                self.renamed[src_mod] = out_mod
                scale = source_scale(self.src.config, src_mod)
                self.module(out_mod, scale, module_tail(out_mod), expert=expert_of is not None and name in expert_of)
            if is_b:
                self.b_tensors[out_mod].append(out)
            if expert_of is not None and name in expert_of:
                self.expert_modules.add(out_mod)

    def zero_pair(self, module: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...], dtype: str, scale: Scale,
                  tail: str, expert: int | None, expert_module: bool = True) -> None:
        """A LoRA pair of zeros (delta exactly 0) for output module `module`, written without reading the source
        (`expert_module`: a module of expert LoRA)."""
        for which, shape in (("A", shape_a), ("B", shape_b)):
            name = f"{module}.lora_{which}.weight"
            self.target(name, dtype, shape)
            self.zeros(name, numel(shape) * DTYPE_SIZES[dtype], dtype, expert)
        self.module(module, scale, tail, (f"{module}.lora_B.weight",), expert=expert_module)

    def zeros(self, name: str, nbytes: int, dtype: str, expert: int | None) -> None:
        """Pieces writing `nbytes` zero bytes of tensor `name`, at most one chunk each."""
        step = max(DTYPE_SIZES[dtype], self.chunk - self.chunk % DTYPE_SIZES[dtype])
        for lo in range(0, max(nbytes, 1), step):
            hi = min(nbytes, lo + step)
            self.pieces.append(Piece((), (Write(name, lo, hi, dtype),), ZeroFill((hi - lo,)), expert))

    def check_unique(self) -> None:
        seen: set[str] = set()
        for t in self.targets:
            if t.name in seen:
                raise ConversionError(f"{self.where}: output tensor {t.name!r} would be written twice")
            seen.add(t.name)


def zero_scale(config: dict[str, Any], r0: int) -> Scale:
    """The (r, alpha) of a zero pair of rank r0: the global scaling at that rank (no pattern key when r0 == r)."""
    return scale_for_rank(config, (int(config.get("r", 8)), config.get("lora_alpha", 8)), r0)


def zero_rank(rules: TargetRules, g: ExpertLoraGroup, config: dict[str, Any]) -> int:
    """The rank of a zero pair in layer `g`: adapter_config's r where the target needs every pair at r (fixed_rank),
    else rules.zero_rank ("layer": the layer's rank)."""
    if rules.fixed_rank:
        return int(config.get("r", 8))
    return g.rank if rules.zero_rank == "layer" else int(rules.zero_rank)


def zero_per_expert(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, rules: TargetRules) -> None:
    """Zero pairs for every expert of the roles layer `g` lacks (rules.all_roles)."""
    r0 = zero_rank(rules, g, b.src.config)
    dt = b.out_dtype(g.factors[0])
    for role, (out, inn) in missing_roles(family, g):
        for e in range(g.experts_of(role)):
            module = b.names.out_module(per_expert_module(family, prefix, role, e))
            tail = r"experts\.\d+\." + re.escape(module.rsplit(".", 1)[-1])
            b.zero_pair(module, (r0, inn), (out, r0), dt, zero_scale(b.src.config, r0), tail, e)


def split_scale(b: Builder, g: ExpertLoraGroup, src_key: str, role: str) -> Scale:
    return scale_for_rank(b.src.config, source_scale(b.src.config, src_key), g.rank_of(role))


def expert_outputs(
    b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, role: str, e: int, src_key: str, dtypes: tuple[str, str]
) -> tuple[str, str]:
    """Register expert e's `role` lora_A and lora_B targets; returns their names."""
    module = b.names.out_module(per_expert_module(family, prefix, role, e))
    out, inn = g.dims_of(role)
    r = g.rank_of(role)
    b.target(module + ".lora_A.weight", dtypes[0], (r, inn))
    b.target(module + ".lora_B.weight", dtypes[1], (out, r))
    tail = r"experts\.\d+\." + re.escape(module.rsplit(".", 1)[-1])
    b.module(module, split_scale(b, g, src_key, role), tail, (module + ".lora_B.weight",))
    return module + ".lora_A.weight", module + ".lora_B.weight"


def group_scale(b: Builder, g: ExpertLoraGroup, family: Family, prefix: str, roles: tuple[str, ...]) -> Scale:
    """The one (r, alpha) of every expert of `roles` in the per-expert source; refuses if they differ."""
    scales = {
        source_scale(b.src.config, module_key(lora_module(g.factor((role,), "A", e).name)))
        for role in roles for e in range(g.experts_of(role))
    }
    ranks = {g.rank_of(role) for role in roles}
    if len(scales) != 1 or len(ranks) != 1:
        raise ConversionError(
            f"{b.where}: layer {g.prefix}: {'/'.join(roles)} LoRA of its experts have different ranks or alphas "
            f"({sorted(scales)}, ranks {sorted(ranks)}); one fused factor needs one"
        )
    return scales.pop()


def identical(src: AdapterSource, refs: list[TensorRef]) -> int | None:
    """Index of the first tensor whose bytes differ from refs[0]'s, or None when all are identical."""
    def data(ref: TensorRef) -> bytes:
        return src.storage.read_range(ref.file, ref.info.start, ref.info.end)

    first = data(refs[0])
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, blob in enumerate(pool.map(data, refs[1:]), start=1):
            if blob != first:
                return i
    return None


def pairs_identical(src: AdapterSource, pairs: list[tuple[TensorRef, TensorRef]]) -> bool:
    """True when the two tensors of every pair hold the same bytes."""
    def same(pair: tuple[TensorRef, TensorRef]) -> bool:
        a, c = pair
        if (a.info.shape, a.info.dtype) != (c.info.shape, c.info.dtype):
            return False
        return src.storage.read_range(a.file, a.info.start, a.info.end) == src.storage.read_range(c.file, c.info.start, c.info.end)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return all(pool.map(same, pairs))
