"""Slabs: a spatial axis cut into contiguous row ranges, one per rank, and their arithmetic.

A ``Slab`` describes a tensor dim that holds the cut axis ``H`` (any spatial axis of the
image, height here) as the row-major product ``outer x H x inner`` (a flattened ``T*H*W``
token dim is ``outer=T, inner=W``). ``bounds`` partitions the global rows of ``H``: rank ``r``
holds rows ``bounds[r]:bounds[r+1]``. Partitions may be uneven; every rank needs at least one
row. Everything here is arithmetic on sizes; ``exchange`` and ``spatial_ops`` emit nodes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


class SlabError(ValueError):
    """A slab would be empty (the image is too small for the number of ranks)."""


@dataclasses.dataclass(frozen=True)
class Slab:
    dim: int
    """The tensor dim that holds the cut axis."""
    outer: int
    """Product of the global sizes laid out before the cut axis within ``dim``."""
    inner: int
    """Product of the sizes laid out after it within ``dim``."""
    bounds: tuple[int, ...]
    """Rank ``r`` holds global rows ``bounds[r]:bounds[r+1]`` of the cut axis."""
    rank: int
    """This rank."""

    @property
    def size(self) -> int:
        """Global rows of the cut axis."""
        return self.bounds[-1]

    @property
    def ranks(self) -> int:
        return len(self.bounds) - 1

    def rows(self, r: int | None = None) -> tuple[int, int]:
        """``(start, stop)`` of rank ``r``'s rows (this rank's by default)."""
        r = self.rank if r is None else r
        return self.bounds[r], self.bounds[r + 1]

    def length(self, r: int | None = None) -> int:
        start, stop = self.rows(r)
        return stop - start

    @property
    def pure(self) -> bool:
        """The dim is the cut axis alone."""
        return self.outer == 1 and self.inner == 1

    def local_shape(self, global_shape: Sequence[int]) -> list[int]:
        shape = [int(s) for s in global_shape]
        shape[self.dim] = self.outer * self.length() * self.inner
        return shape

    def flattened(self) -> "Slab":
        """The same rows seen as a plain axis of ``H * inner`` rows (``outer`` must be 1)."""
        assert self.outer == 1, self
        return dataclasses.replace(self, inner=1, bounds=tuple(b * self.inner for b in self.bounds))

    def moved(self, dim: int, *, outer: int | None = None, inner: int | None = None) -> "Slab":
        return dataclasses.replace(
            self, dim=dim, outer=self.outer if outer is None else outer, inner=self.inner if inner is None else inner
        )

    def same_rows(self, other: "Slab") -> bool:
        return (self.outer, self.inner, self.bounds) == (other.outer, other.inner, other.bounds)


def balanced_bounds(size: int, ranks: int, *, align: int = 1) -> tuple[int, ...]:
    """Rows split as evenly as possible in units of ``align`` rows; the first ranks get the
    extra units, the last rank any rows left over below one unit."""
    units, rest = divmod(size, align)
    base, extra = divmod(units, ranks)
    bounds = [0]
    for r in range(ranks):
        bounds.append(bounds[-1] + (base + (r < extra)) * align)
    bounds[-1] += rest
    return tuple(bounds)


def check_nonempty(bounds: Sequence[int], what: str) -> None:
    """Every rank must hold a row; the error says how large the image must be."""
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(lengths) < 1:
        ranks = len(lengths)
        raise SlabError(
            f"{what}: {bounds[-1]} rows over {ranks} ranks leaves rank {lengths.index(min(lengths))} "
            f"without rows (rows per rank {lengths}); decode/encode a taller image (at least "
            f"{ranks} rows at this point of the network) or use fewer ranks"
        )


@dataclasses.dataclass(frozen=True)
class Window:
    """What a sliding-window op (convolution) reads along the cut axis."""

    kernel: int
    stride: int
    padding: int
    dilation: int

    @property
    def span(self) -> int:
        """Rows one output row reads."""
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.span) // self.stride + 1

    def out_bounds(self, bounds: Sequence[int], out_size: int) -> tuple[int, ...]:
        """Each output row goes to the rank holding the input row at its window's centre, so
        a same-size convolution keeps the partition (and halos go both ways)."""
        centre = self.dilation * (self.kernel - 1) // 2 - self.padding
        inner = [min(out_size, max(0, -((centre - b) // self.stride))) for b in bounds[1:-1]]
        return (0, *inner, out_size)

    def needed(self, out_rows: tuple[int, int]) -> tuple[int, int]:
        """Input rows ``[start, stop)`` (unclipped: rows outside ``[0, size)`` are padding)
        that output rows ``out_rows`` read."""
        start, stop = out_rows
        return start * self.stride - self.padding, (stop - 1) * self.stride - self.padding + self.span


def reshape_slab(slab: Slab, in_shape: Sequence[int], out_shape: Sequence[int]) -> Slab | None:
    """Where the cut axis lands when ``in_shape`` is reshaped (row-major) to ``out_shape``.

    The axis stays whole inside one output dim (dims merged around it), or its major part
    lands in one dim when it is split, provided every rank's rows split evenly. None when
    neither holds (the caller gathers).
    """
    row = slab.inner * math.prod(in_shape[slab.dim + 1:])  # flat stride of one row
    whole = row * slab.size
    for e, n in enumerate(out_shape):
        stride = math.prod(out_shape[e + 1:])
        span = stride * n
        if n == 1 or span < whole or span % whole:
            continue
        if stride <= row and row % stride == 0:
            inner = row // stride
            return dataclasses.replace(slab, dim=e, outer=n // (slab.size * inner), inner=inner)
        if row < stride < whole and stride % row == 0:
            q = stride // row
            if all(b % q == 0 for b in slab.bounds):
                return dataclasses.replace(slab, dim=e, outer=span // whole, inner=1,
                                           bounds=tuple(b // q for b in slab.bounds))
            return None
    return None
