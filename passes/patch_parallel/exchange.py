"""The nodes that move rows of a cut axis between ranks (functional collectives).

* ``halo``: the rows ``[start, stop)`` a rank needs, from whichever ranks hold them, with one
  ``all_to_all_single`` whose splits are the exact row counts (zero for ranks that send
  nothing), so only neighbour rows travel;
* ``gather``: the whole axis on every rank (``all_gather`` of slabs padded to the longest);
* ``take``: a rank's own rows of a tensor every rank holds whole.

Every decision that shapes a collective is made from the partition, which all ranks know,
never from this rank's rows alone, so every rank emits the same collectives in the same order.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx

from vdopt.mesh import AxisGroup
from vdopt.passes.dims.emit import Emitter
from vdopt.passes.patch_parallel.slab import Slab

aten = torch.ops.aten



def _rows_first(em: Emitter, x: torch.fx.Node, slab: Slab) -> torch.fx.Node:
    """``x`` with the cut axis as dim 0 (its ``outer`` and ``inner`` factors split off)."""
    shape = list(em.shape(x))
    d = slab.dim
    split = shape[:d] + [slab.outer, shape[d] // (slab.outer * slab.inner), slab.inner] + shape[d + 1:]
    x = em.reshape(x, [s for i, s in enumerate(split) if i not in (d, d + 2) or s != 1])
    return em.movedim(x, d + (slab.outer != 1), 0)


def _rows_back(em: Emitter, rows: torch.fx.Node, slab: Slab, shape: list[int]) -> torch.fx.Node:
    """Inverse of ``_rows_first`` for a tensor whose dim ``slab.dim`` has ``shape``'s size."""
    d = slab.dim
    x = em.movedim(rows, 0, d + (slab.outer != 1))
    return em.reshape(x, shape)


def gather(em: Emitter, x: torch.fx.Node, slab: Slab, group: AxisGroup, purpose: str) -> torch.fx.Node:
    """The whole tensor on every rank, from each rank's slab ``x``."""
    shape = list(em.shape(x))
    full = list(shape)
    full[slab.dim] = slab.outer * slab.size * slab.inner
    rows = _rows_first(em, x, slab)
    longest = max(slab.length(r) for r in range(slab.ranks))
    padded = em.pad_dim0(rows, longest - slab.length())
    gathered = em.all_gather(padded, group, purpose)
    parts = [em.slice(gathered, 0, r * longest, r * longest + slab.length(r)) for r in range(slab.ranks)]
    whole = em.cat(parts, 0) if slab.ranks > 1 else parts[0]
    return _rows_back(em, whole, slab, full)


def take(em: Emitter, x: torch.fx.Node, slab: Slab) -> torch.fx.Node:
    """This rank's rows of ``x``, which holds the whole axis at ``slab.dim``."""
    start, _ = slab.rows()
    return em.take(x, slab.dim, pre=0, factors=(slab.outer, slab.size, slab.inner),
                   chunks={1: (start, slab.length())}, post=0)


def halo(em: Emitter, x: torch.fx.Node, slab: Slab, needed: Callable[[int], tuple[int, int]],
         group: AxisGroup, purpose: str) -> torch.fx.Node:
    """Rows ``needed(rank)`` of a pure slab ``x``, with zero rows where they fall outside the
    axis (a convolution's zero padding at the image's borders).

    ``needed`` gives every rank's row range, so each rank knows what it sends to whom. The
    result is one concatenation along the cut dim (a view of ``x`` when nothing moves).
    """
    assert slab.pure, slab
    R, me, d = slab.ranks, slab.rank, slab.dim

    def clipped(r: int) -> tuple[int, int]:
        start, stop = needed(r)
        return max(0, start), min(slab.size, stop)

    def overlap(q: int, r: int) -> tuple[int, int]:
        """Rows rank ``q`` holds that rank ``r`` needs (empty for ``q == r``: kept locally)."""
        if q == r:
            return 0, 0
        (a, b), (lo, hi) = clipped(r), slab.rows(q)
        return max(a, lo), max(max(a, lo), min(b, hi))

    want, (lo, hi) = needed(me), slab.rows()
    a, b = clipped(me)
    mine = em.slice(x, d, max(a, lo) - lo, max(max(a, lo), min(b, hi)) - lo)
    parts = [mine]
    if any(overlap(q, r)[1] > overlap(q, r)[0] for q in range(R) for r in range(R)):
        sends = [overlap(me, r) for r in range(R)]
        recvs = [overlap(q, me) for q in range(R)]
        # all_to_all_single splits dim 0: the rows go first, flat, so splits count elements
        pieces = [em.movedim(em.slice(x, d, s - lo, e - lo), d, 0) for s, e in sends if e > s]
        row_shape = [n for i, n in enumerate(em.shape(x)) if i != d]
        row = math.prod(row_shape)
        payload = em.cat(pieces, 0) if pieces else em.movedim(em.slice(x, d, 0, 0), d, 0)
        flat = em.reshape(em.contiguous(payload), [-1])
        got = em.all_to_all(flat, [(e - s) * row for s, e in recvs], [(e - s) * row for s, e in sends],
                            group, purpose)
        got = em.reshape(got, [-1, *row_shape])
        before = sum(e - s for q, (s, e) in enumerate(recvs) if q < me)
        total = sum(e - s for s, e in recvs)
        parts = [em.movedim(em.slice(got, 0, 0, before), 0, d), mine,
                 em.movedim(em.slice(got, 0, before, total), 0, d)]
    zeros = [max(0, -want[0]), max(0, want[1] - slab.size)]
    for i, n in enumerate(zeros):
        if n:
            shape = list(em.shape(x))
            shape[d] = n
            zero = em.call(aten.new_zeros.default, (x, shape))
            parts = [zero, *parts] if i == 0 else [*parts, zero]
    parts = [p for p in parts if em.shape(p)[d] > 0]
    out = parts[0] if len(parts) == 1 else em.cat(parts, d)
    assert em.shape(out)[d] == want[1] - want[0], (em.shape(out), want)
    return out
