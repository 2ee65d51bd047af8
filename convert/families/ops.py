"""The ops that build one expert's slice of a fused tensor from its per-expert parts, and back.

A fused tensor of a family is described as a pipeline of ops applied to the list of its
parts (one per-expert tensor per role, in nn.Linear [out, in] form): `transpose` acts on
every tensor of the list, `concat` and `interleave` join the list into one tensor, `chunk`
and `deinterleave` cut one tensor into several. Each op has an inverse and a shape rule,
so the same description reads a fused slice back into its parts and tells the shapes on
either side from metadata alone. Dims count within one expert's slice (the fused tensor's
dim 0, the expert, is not counted): transformers' `Concatenate(dim=1)` after
`MergeModulelist(dim=0)` is `concat` on dim 0 here.

`split` cuts one non-expert tensor into parts of unequal sizes (a family file's `splits`, e.g. a
fused `query_key_value` into q/k/v): its `sizes` are config keys (or whole numbers) the parts'
sizes along `dim` are proportional to, bound to numbers from a checkpoint's config.json by `bind`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from convert.errors import ConversionError

Shape = tuple[int, ...]
Array = Any  # a torch.Tensor or a numpy.ndarray
# The ops apply to torch tensors or numpy arrays alike (the merge computes in numpy): `_is_numpy` picks the
# library of the two calls that differ (joining and cutting); views, transposes and reshapes are common to both.


def _is_numpy(t: Array) -> bool:
    return type(t).__module__ == "numpy"


def _join(tensors: Sequence[Array], axis: int, stack: bool) -> Array:
    """`tensors` concatenated (or, with `stack`, stacked) along `axis`, by their own library."""
    if _is_numpy(tensors[0]):
        import numpy as np

        return (np.stack if stack else np.concatenate)(list(tensors), axis=axis)
    import torch

    return (torch.stack if stack else torch.cat)(list(tensors), dim=axis)


def _cut(t: Array, sizes: Sequence[int], axis: int) -> list[Array]:
    """Views of `t` cut along `axis` into parts of `sizes`."""
    if _is_numpy(t):
        import numpy as np

        return np.split(t, np.cumsum(sizes)[:-1].tolist(), axis=axis)
    return list(t.split(list(sizes), dim=axis))


def _axis(dim: int, ndim: int, what: str) -> int:
    axis = dim + ndim if dim < 0 else dim
    if not 0 <= axis < ndim:
        raise ConversionError(f"{what}: dim {dim} is out of range for a {ndim}-D tensor")
    return axis


def _same(shapes: Sequence[Shape], what: str) -> Shape:
    if len(set(shapes)) != 1:
        raise ConversionError(f"{what}: parts must have one shape, got {[list(s) for s in shapes]}")
    return shapes[0]


class Op(ABC):
    """One step of a pipeline: a list of tensors in, a list of tensors out."""

    name: ClassVar[str]

    @abstractmethod
    def arity(self, n_in: int) -> int:
        """How many tensors come out when `n_in` go in (raises ConversionError when `n_in` is not allowed)."""

    @abstractmethod
    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        """The shapes out, from the shapes in."""

    @abstractmethod
    def apply(self, tensors: Sequence[Array]) -> list[Array]:
        """The tensors out, from the tensors in."""

    @abstractmethod
    def inverse(self, n_in: int) -> Op:
        """The op that undoes this one when it took `n_in` tensors."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The op as a family file writes it."""


@dataclass(frozen=True)
class Transpose(Op):
    """Swap two dims of every tensor of the list."""

    dims: tuple[int, int] = (0, 1)
    name: ClassVar[str] = "transpose"

    def arity(self, n_in: int) -> int:
        return n_in

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        out = []
        for s in shapes:
            a, b = (_axis(d, len(s), "transpose") for d in self.dims)
            t = list(s)
            t[a], t[b] = t[b], t[a]
            out.append(tuple(t))
        return out

    def apply(self, tensors: Sequence[Array]) -> list[Array]:
        return [t.swapaxes(*self.dims) for t in tensors]

    def inverse(self, n_in: int) -> Op:
        return self

    def to_json(self) -> dict[str, Any]:
        return {"op": self.name, "dims": list(self.dims)}


@dataclass(frozen=True)
class Concat(Op):
    """Join the list into one tensor along `dim` (parts of one shape, one after another)."""

    dim: int = 0
    name: ClassVar[str] = "concat"

    def arity(self, n_in: int) -> int:
        return 1

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        s = list(_same(shapes, "concat"))
        s[_axis(self.dim, len(s), "concat")] *= len(shapes)
        return [tuple(s)]

    def apply(self, tensors: Sequence[Array]) -> list[Array]:
        return [_join(tensors, self.dim, stack=False)]

    def inverse(self, n_in: int) -> Op:
        return Chunk(self.dim, n_in)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.name, "dim": self.dim}


@dataclass(frozen=True)
class Interleave(Op):
    """Join the list into one tensor along `dim`, element by element: part j at positions j, j+k, j+2k, ..."""

    dim: int = -1
    name: ClassVar[str] = "interleave"

    def arity(self, n_in: int) -> int:
        return 1

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        s = list(_same(shapes, "interleave"))
        s[_axis(self.dim, len(s), "interleave")] *= len(shapes)
        return [tuple(s)]

    def apply(self, tensors: Sequence[Array]) -> list[Array]:
        shape = tuple(tensors[0].shape)
        axis = _axis(self.dim, len(shape), "interleave")
        joined = _join(tensors, axis + 1, stack=True)
        return [joined.reshape(*shape[:axis], shape[axis] * len(tensors), *shape[axis + 1 :])]

    def inverse(self, n_in: int) -> Op:
        return Deinterleave(self.dim, n_in)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.name, "dim": self.dim}


@dataclass(frozen=True)
class Chunk(Op):
    """Cut one tensor into `parts` equal pieces along `dim` (the inverse of concat)."""

    dim: int = 0
    parts: int = 2
    name: ClassVar[str] = "chunk"

    def arity(self, n_in: int) -> int:
        if n_in != 1:
            raise ConversionError(f"chunk takes one tensor, got {n_in}")
        return self.parts

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        (s,) = shapes
        t = list(s)
        axis = _axis(self.dim, len(t), "chunk")
        if t[axis] % self.parts:
            raise ConversionError(f"chunk: dim {self.dim} of {list(s)} does not split into {self.parts} equal parts")
        t[axis] //= self.parts
        return [tuple(t)] * self.parts

    def apply(self, tensors: Sequence[Array]) -> list[Array]:
        t = tensors[0]
        axis = _axis(self.dim, t.ndim, "chunk")
        return _cut(t, [t.shape[axis] // self.parts] * self.parts, axis)

    def inverse(self, n_in: int) -> Op:
        return Concat(self.dim)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.name, "dim": self.dim, "parts": self.parts}


@dataclass(frozen=True)
class Deinterleave(Op):
    """Cut one tensor into `parts` along `dim`, piece j taking positions j, j+k, ... (the inverse of interleave)."""

    dim: int = -1
    parts: int = 2
    name: ClassVar[str] = "deinterleave"

    def arity(self, n_in: int) -> int:
        if n_in != 1:
            raise ConversionError(f"deinterleave takes one tensor, got {n_in}")
        return self.parts

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        return Chunk(self.dim, self.parts).shapes(shapes)

    def apply(self, tensors: Sequence[Array]) -> list[Array]:
        t = tensors[0]
        shape = tuple(t.shape)
        axis = _axis(self.dim, len(shape), "deinterleave")
        grouped = t.reshape(*shape[:axis], shape[axis] // self.parts, self.parts, *shape[axis + 1 :])
        lead = (slice(None),) * (axis + 1)
        return [grouped[lead + (j,)] for j in range(self.parts)]

    def inverse(self, n_in: int) -> Op:
        return Interleave(self.dim)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.name, "dim": self.dim, "parts": self.parts}


def config_value(config: dict[str, Any], key: str, where: str) -> int:
    """A positive whole number `key` of config.json contents `config` (or of its `text_config`); raises naming `where`."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and key in cfg:
            value = cfg[key]
            if type(value) is not int or value < 1:
                raise ConversionError(f"{where}: {key!r} is {value!r}; expected a whole number >= 1")
            return value
    raise ConversionError(f"{where}: has no {key!r}")


@dataclass(frozen=True)
class Split(Op):
    """Cut one tensor along `dim` into one part per entry of `sizes`, part j holding a share of the tensor
    proportional to sizes[j] (the tensor's size along `dim` divided by their sum, times sizes[j]).

    `sizes` entries are whole numbers or config keys (e.g. q/k/v rows in proportion to
    ["num_attention_heads", "num_key_value_heads", "num_key_value_heads"]); `bind` gives the numbers.
    The inverse is a concat along `dim`.
    """

    dim: int = 0
    sizes: tuple[int | str, ...] = ()
    name: ClassVar[str] = "split"

    def bind(self, config: dict[str, Any], where: str) -> Split:
        """This split with every config key of `sizes` replaced by its value in `config` (config.json contents)."""
        return Split(self.dim, tuple(s if isinstance(s, int) else config_value(config, s, where) for s in self.sizes))

    def part_sizes(self, total: int) -> list[int]:
        """Each part's size along `dim` when the tensor's is `total` (raises when the shares do not divide it)."""
        keys = [s for s in self.sizes if not isinstance(s, int)]
        if keys:
            raise ConversionError(f"split: sizes {keys} are config keys not yet bound to numbers")
        shares = [s for s in self.sizes if isinstance(s, int)]  # all of them, now
        unit, rest = divmod(total, sum(shares))
        if rest or unit < 1:
            raise ConversionError(f"split: size {total} along dim {self.dim} is not a multiple of {sum(shares)} "
                                  f"(the sum of the parts' shares {list(self.sizes)})")
        return [unit * int(s) for s in shares]

    def arity(self, n_in: int) -> int:
        if n_in != 1:
            raise ConversionError(f"split takes one tensor, got {n_in}")
        return len(self.sizes)

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        (s,) = shapes
        axis = _axis(self.dim, len(s), "split")
        out = []
        for size in self.part_sizes(s[axis]):
            t = list(s)
            t[axis] = size
            out.append(tuple(t))
        return out

    def apply(self, tensors: Sequence[Array]) -> list[Array]:
        t = tensors[0]
        axis = _axis(self.dim, t.ndim, "split")
        return _cut(t, self.part_sizes(t.shape[axis]), axis)

    def inverse(self, n_in: int) -> Op:
        return Concat(self.dim)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.name, "dim": self.dim, "sizes": list(self.sizes)}


OPS: dict[str, type[Op]] = {cls.name: cls for cls in (Transpose, Concat, Interleave, Chunk, Deinterleave, Split)}
# The keys each op takes in a family file (besides "op").
OP_KEYS: dict[str, tuple[str, ...]] = {
    "transpose": ("dims",), "concat": ("dim",), "interleave": ("dim",), "chunk": ("dim", "parts"),
    "deinterleave": ("dim", "parts"), "split": ("dim", "sizes"),
}
_CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def op_from_json(obj: dict[str, Any], where: str) -> Op:
    """An op from its family-file form, e.g. {"op": "concat", "dim": 0}; `where` names the place for errors."""
    kind = obj.get("op")
    if kind not in OPS:
        raise ConversionError(f"{where}: unknown op {kind!r} (known: {sorted(OPS)})")
    extra = sorted(set(obj) - {"op", *OP_KEYS[kind]})
    if extra:
        raise ConversionError(f"{where}: op {kind!r} takes no key {extra[0]!r} (it takes {list(OP_KEYS[kind])})")
    if kind == "transpose":
        dims = obj.get("dims", [0, 1])
        if not (isinstance(dims, list) and len(dims) == 2 and all(type(d) is int for d in dims)) or dims[0] == dims[1]:
            raise ConversionError(f"{where}: transpose 'dims' must be two different ints, got {dims!r}")
        return Transpose((dims[0], dims[1]))
    dim = obj.get("dim", 0 if kind in ("concat", "chunk", "split") else -1)
    if type(dim) is not int:
        raise ConversionError(f"{where}: op {kind!r} 'dim' must be an int, got {dim!r}")
    if kind == "split":
        sizes = obj.get("sizes")
        if not isinstance(sizes, list) or len(sizes) < 2 or not all(
                (type(v) is int and v > 0) or (isinstance(v, str) and _CONFIG_KEY.match(v)) for v in sizes):
            raise ConversionError(f"{where}: split 'sizes' must list two or more parts' shares, each a whole number "
                                  f">= 1 or a config key, got {sizes!r}")
        return Split(dim, tuple(sizes))
    if kind in ("chunk", "deinterleave"):
        parts = obj.get("parts", 2)
        if type(parts) is not int or parts < 1:
            raise ConversionError(f"{where}: op {kind!r} 'parts' must be a positive int, got {parts!r}")
        return OPS[kind](dim, parts)  # type: ignore[call-arg]  # Chunk/Deinterleave(dim, parts); Op takes none
    return OPS[kind](dim)  # type: ignore[call-arg]  # Concat/Interleave(dim)


@dataclass(frozen=True)
class Pipeline:
    """Ops that turn `n_parts` per-expert tensors into one expert's slice of a fused tensor (or, with `n_out`,
    one tensor into `n_out`: a family file's `splits`)."""

    ops: tuple[Op, ...]
    n_parts: int
    n_out: int = 1

    def __post_init__(self) -> None:
        n = self.n_parts
        for op in self.ops:
            n = op.arity(n)
        if n != self.n_out:
            raise ConversionError(
                f"ops {[op.to_json() for op in self.ops]} leave {n} tensors from {self.n_parts} part(s); "
                + ("a fused tensor is built from its parts into exactly one tensor" if self.n_out == 1
                   else f"expected {self.n_out}")
            )

    def inverse_ops(self) -> list[Op]:
        """The ops that take one fused slice back to the parts, in order."""
        counts = [self.n_parts]
        for op in self.ops:
            counts.append(op.arity(counts[-1]))
        return [op.inverse(n_in) for op, n_in in zip(reversed(self.ops), reversed(counts[:-1]))]

    def slice_shape(self, part_shape: Shape) -> Shape:
        """The shape of one expert's fused slice whose parts each have `part_shape`."""
        shapes: list[Shape] = [part_shape] * self.n_parts
        for op in self.ops:
            shapes = op.shapes(shapes)
        return shapes[0]

    def part_shapes(self, slice_shape: Shape) -> list[Shape]:
        """The shape of each part, from the shape of one expert's fused slice (inverse of slice_shape)."""
        shapes: list[Shape] = [slice_shape]
        for op in self.inverse_ops():
            shapes = op.shapes(shapes)
        return shapes

    def fuse(self, parts: Sequence[Array]) -> Array:
        """One expert's fused slice from its parts."""
        tensors = list(parts)
        for op in self.ops:
            tensors = op.apply(tensors)
        return tensors[0]

    def split(self, fused: Array) -> list[Array]:
        """The parts of one expert, from its fused slice (views where the ops allow)."""
        tensors = [fused]
        for op in self.inverse_ops():
            tensors = op.apply(tensors)
        return tensors

    @property
    def is_byte_copy(self) -> bool:
        """True when the slice is the parts' bytes one after another (no op, or concat on dim 0)."""
        if not self.ops:
            return True
        return len(self.ops) == 1 and isinstance(self.ops[0], Concat) and self.ops[0].dim == 0

    def to_json(self) -> list[dict[str, Any]]:
        """The ops as a family file writes them."""
        return [op.to_json() for op in self.ops]
