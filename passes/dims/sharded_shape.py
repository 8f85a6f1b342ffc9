"""Sharded shapes: which logical factors make up each dim of a tensor, and which are split over ranks.

Every tensor computed from a sharded activation carries a ``ShardedShape``: one ``Dim`` per tensor
dim. A dim is the row-major product of ``Factor``s, optionally with replicated rows before
(``pre``) and after (``post``) the product: the text tokens of a joint text+video sequence.
A factor with a ``Split`` is cut into contiguous chunks over the ranks of one or more mesh
axes; on each rank the dim then holds only that rank's chunk of the factor, so the local size
of a dim is ``pre + prod(local factor sizes) + post``.

Labels name the factors the passes care about: ``B`` batch, ``T`` latent frames, ``S``
spatial tokens (H*W), ``TS`` all video tokens, ``N`` heads. ``?`` is anything else.
Size-1 factors are never stored, so a dim of size 1 has no factors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from torch.fx.experimental.symbolic_shapes import statically_known_true

from vdopt.mesh import AxisGroup


@dataclasses.dataclass(frozen=True)
class Split:
    """A factor cut into contiguous chunks over the ranks of ``axes`` (outer to inner)."""

    axes: tuple[AxisGroup, ...]
    """Mesh axes the factor is split over; the chunk index is row-major over their ranks."""
    sizes: tuple[int, ...]
    """Chunk length per chunk index (uneven sizes allowed, each at least 1; a batch factor cut by
    a per-sample slice may hold 0 on some ranks, ``dims/split_chunks.py``)."""

    @staticmethod
    def balanced(size: int, axes: Sequence[AxisGroup]) -> "Split":
        """Chunks that differ by at most one; the first ``size % degree`` get the extra one."""
        degree = math.prod(a.size for a in axes)
        base, extra = divmod(size, degree)
        return Split(axes=tuple(axes), sizes=tuple(base + (i < extra) for i in range(degree)))

    @property
    def degree(self) -> int:
        return len(self.sizes)

    @property
    def index(self) -> int:
        """This rank's chunk index."""
        return self.index_with({})

    def index_with(self, coords: dict[str, int]) -> int:
        """Chunk index of the rank whose coordinates are ours except for ``coords``."""
        index = 0
        for a in self.axes:
            index = index * a.size + coords.get(a.axis, a.rank)
        return index

    @property
    def length(self) -> int:
        return self.sizes[self.index]

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.index])

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1

    def coarsen(self) -> "Split | None":
        """The split after gathering over the innermost axis (its chunks merged), or None."""
        if len(self.axes) == 1:
            return None
        inner = self.axes[-1].size
        sizes = tuple(sum(self.sizes[i : i + inner]) for i in range(0, len(self.sizes), inner))
        return Split(axes=self.axes[:-1], sizes=sizes)

    def describe(self) -> str:
        return "x".join(a.axis for a in self.axes)


@dataclasses.dataclass(frozen=True)
class Factor:
    label: str
    """``B``, ``T``, ``S``, ``TS``, ``N`` or ``?``."""
    size: int
    """Global size."""
    split: Split | None = None
    """How the factor is split over ranks, or None when every rank holds all of it."""

    @property
    def local(self) -> int:
        return self.split.length if self.split is not None else self.size


@dataclasses.dataclass(frozen=True)
class Dim:
    factors: tuple[Factor, ...] = ()
    """Row-major factors of the body (empty: a body of size 1)."""
    pre: int = 0
    """Replicated rows before the body (e.g. text tokens before video tokens)."""
    post: int = 0
    """Replicated rows after the body."""

    @staticmethod
    def plain(size: int, label: str = "?") -> "Dim":
        # an unbacked size (u0) is one factor even where it may be 1: size-oblivious
        return Dim(() if statically_known_true(size == 1) else (Factor(label, size),))

    @property
    def body(self) -> int:
        return math.prod(f.size for f in self.factors)

    @property
    def local_body(self) -> int:
        return math.prod(f.local for f in self.factors)

    @property
    def size(self) -> int:
        return self.pre + self.body + self.post

    @property
    def local_size(self) -> int:
        return self.pre + self.local_body + self.post

    @property
    def joint(self) -> bool:
        return bool(self.pre or self.post)

    @property
    def sharded(self) -> bool:
        return any(f.split is not None for f in self.factors)

    def placement(self) -> tuple:
        """What must agree between two dims for their local chunks to line up elementwise."""
        if not self.sharded:
            return ()
        out, before = [], 1
        for f in self.factors:
            if f.split is not None:
                out.append((before, f.size, f.split))
                before = 1
            else:
                before *= f.size
        return (self.pre, self.post, tuple(out), before)

    def find(self, label: str) -> int | None:
        for i, f in enumerate(self.factors):
            if f.label == label:
                return i
        return None

    def with_factor(self, index: int, factor: Factor) -> "Dim":
        factors = list(self.factors)
        factors[index] = factor
        return dataclasses.replace(self, factors=tuple(factors))


@dataclasses.dataclass(frozen=True)
class ShardedShape:
    """The global shape of a tensor, dim by dim, with how each dim is split over ranks."""

    dims: tuple[Dim, ...]
    """One ``Dim`` per tensor dim."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(d.local_size for d in self.dims)

    @property
    def sharded_dims(self) -> list[int]:
        return [i for i, d in enumerate(self.dims) if d.sharded]

    def placement(self) -> tuple:
        return tuple(d.placement() for d in self.dims)

    def find(self, label: str) -> tuple[int, int] | None:
        """(dim, factor index) of the first factor with ``label``."""
        for i, d in enumerate(self.dims):
            j = d.find(label)
            if j is not None:
                return i, j
        return None

    def sharded_factors(self) -> list[tuple[int, int, Factor]]:
        return [(i, j, f) for i, d in enumerate(self.dims) for j, f in enumerate(d.factors) if f.split is not None]

    def with_dim(self, index: int, dim: Dim) -> "ShardedShape":
        dims = list(self.dims)
        dims[index] = dim
        return ShardedShape(tuple(dims))

    def permute(self, order: Sequence[int]) -> "ShardedShape":
        return ShardedShape(tuple(self.dims[i] for i in order))

    def aligned(self, ndim: int) -> "ShardedShape":
        """Broadcast-aligned to ``ndim`` dims (size-1 dims prepended)."""
        return ShardedShape((Dim(),) * (ndim - len(self.dims)) + self.dims)

    def describe(self) -> str:
        def one(d: Dim) -> str:
            body = "*".join(f"{f.label}{f.size}" + (f"/{f.split.describe()}" if f.split else "") for f in d.factors) or "1"
            return (f"{d.pre}+" if d.pre else "") + body + (f"+{d.post}" if d.post else "")

        return "(" + ", ".join(one(d) for d in self.dims) + ")"


def _outer_part(item: Factor, outer: int) -> Factor | None:
    """The outer ``outer`` rows of ``item`` cut as ``outer x (item.size // outer)``.

    A split factor can be cut so only where every chunk holds whole inner rows (a Skiparse
    regroup of tokens split in multiples of its k*k): the outer part keeps the split, with
    chunks ``inner`` times shorter, and the inner part is whole on every rank.
    """
    if item.split is None:
        return Factor("?", outer)
    inner = item.size // outer
    if any(n % inner for n in item.split.sizes):
        return None
    return Factor(item.label, outer, Split(item.split.axes, tuple(n // inner for n in item.split.sizes)))


def _merge_split_rows(factors: list[Factor]) -> tuple[Factor, ...]:
    """A split factor followed only by unsplit unlabelled factors is one split factor (each
    chunk times those rows is a contiguous chunk of the product), so an ungrouped Skiparse
    output lines up with the token stream it is added to."""
    split = [j for j, f in enumerate(factors) if f.split is not None]
    if len(split) != 1 or split[0] == len(factors) - 1 or any(f.label != "?" for f in factors[split[0] + 1:]):
        return tuple(factors)
    j = split[0]
    f, rows = factors[j], math.prod(g.size for g in factors[j + 1:])
    merged = Factor(f.label, f.size * rows, Split(f.split.axes, tuple(n * rows for n in f.split.sizes)))
    return tuple(factors[:j]) + (merged,)


def map_reshape(layout: ShardedShape, out_shape: Sequence[int]) -> ShardedShape | None:
    """The layout after reshaping a tensor of ``layout`` to global ``out_shape``.

    Factors are carried over in row-major order; a factor may be cut in two when an output dim
    needs part of it (the parts are labelled ``?``; a split factor only where its chunks hold
    whole inner rows, see ``_outer_part``). Returns None when the reshape would cut a split
    factor otherwise or a joint (pre/post) dim, or mixes dims in a way that does not follow
    factor boundaries: the caller must then gather first.
    """
    items: list[Factor | Dim] = []
    for d in layout.dims:
        if d.joint:
            items.append(d)
        else:
            items.extend(f for f in d.factors if f.size != 1)
    out: list[Dim] = []
    i = 0
    for size in out_shape:
        if size == 1:
            out.append(Dim())
            continue
        acc, factors = 1, []
        while acc < size:
            if i >= len(items):
                return None
            item = items[i]
            if isinstance(item, Dim):  # a joint dim only maps onto a dim of exactly its size
                if acc != 1 or item.size != size:
                    return None
                out.append(item)
                i += 1
                factors = None
                break
            if size % (acc * item.size) == 0:
                factors.append(item)
                acc *= item.size
                i += 1
                continue
            want = size // acc
            if size % acc or item.size % want:
                return None
            factors.append(_outer_part(item, want))
            if factors[-1] is None:
                return None
            items[i] = Factor("?", item.size // want)
            acc = size
        if factors is not None:
            out.append(Dim(_merge_split_rows(factors)))
    if i != len(items):
        return None
    return ShardedShape(tuple(out))
