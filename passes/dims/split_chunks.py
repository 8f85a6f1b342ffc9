"""Slicing, padding and joining a split dim without gathering it: each rank edits its own chunk.

When a dim is split over ranks in contiguous chunks, some edits of it touch each chunk in
place:

* zero-padding its end (a Skiparse block pads its tokens to a multiple of k*k): the last rank
  pads locally, the last chunk grows;
* keeping rows ``[start, end)``: each rank keeps the part of its chunk inside the range (a
  Skiparse block trims its padding off the last chunk; a per-sample loop under CFG parallel,
  ``x[i:i + 1]``, keeps sample ``i`` on the rank that holds it and none elsewhere; a split of
  the tokens into consecutive parts), or, beside replicated rows, the split part whole or none
  of it (the video tokens of a text+video sequence, or its text);
* concatenating pieces whose chunks follow one another in rank order (that loop's
  ``cat(outputs)``): each rank concatenates its own.

A rank may hold no row of a batch factor (it runs the loop's other iterations on empty
tensors), never none of a token dim: attention and the collectives over tokens assume every
rank holds some. Cutting into a split part applies to a dim that is one split factor with no replicated rows;
anything else is left to the caller (which gathers).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from vdopt.passes.dims.sharded_shape import Dim, Factor

_MAY_BE_EMPTY = "B"
"""The factor label whose chunks may be empty on some ranks (the batch)."""


def _single_split(d: Dim) -> Factor | None:
    if d.joint or len(d.factors) != 1 or d.factors[0].split is None:
        return None
    return d.factors[0]


def _with_sizes(f: Factor, sizes: Sequence[int]) -> Dim | None:
    if 0 in sizes and f.label != _MAY_BE_EMPTY:
        return None
    return Dim((Factor(f.label, sum(sizes), dataclasses.replace(f.split, sizes=tuple(sizes))),))


def pad_end(d: Dim, before: int, after: int) -> tuple[Dim, int] | None:
    """``(new dim, this rank's padding after its chunk)`` for zero-padding ``after`` rows at
    the end of split dim ``d``; None where that is not a change of the last chunk alone."""
    f = _single_split(d)
    if f is None or before != 0 or after <= 0:
        return None
    last = f.split.index == f.split.degree - 1
    return _with_sizes(f, f.split.sizes[:-1] + (f.split.sizes[-1] + after,)), (after if last else 0)


def slice_chunks(d: Dim, start: int, end: int) -> tuple[Dim, int, int] | None:
    """``(new dim, this rank's local start, local end)`` for keeping rows ``[start, end)`` of
    split dim ``d``: each rank keeps the part of its chunk inside the range."""
    f = _single_split(d)
    if f is None or not 0 <= start < end <= f.size:
        return None
    offsets = [0, *itertools.accumulate(f.split.sizes)][:-1]
    sizes = [max(0, min(end, o + n) - max(start, o)) for o, n in zip(offsets, f.split.sizes)]
    new = _with_sizes(f, sizes)
    if new is None:
        return None
    c = f.split.index
    local_start = min(max(start - offsets[c], 0), f.split.sizes[c])
    return new, local_start, local_start + sizes[c]


def slice_rows(d: Dim, start: int, end: int) -> tuple[Dim, int, int] | None:
    """``(new dim, this rank's local start, local end)`` for keeping rows ``[start, end)`` of
    split dim ``d``, whose replicated rows (``pre``, ``post``: text beside video tokens) every
    rank holds: a range that keeps the split body whole or drops it, or a part of a dim without
    replicated rows (``slice_chunks``); else None."""
    if start >= end:
        return None
    lo, hi = d.pre, d.pre + d.body  # the body's global rows
    shift = d.body - d.local_body  # rows after the body sit this much earlier locally
    if end <= lo:
        return Dim.plain(end - start), start, end
    if start >= hi:
        return Dim.plain(end - start), start - shift, end - shift
    if start <= lo and end >= hi:
        return Dim(d.factors, pre=lo - start, post=end - hi), start, end - shift
    return None if d.joint else slice_chunks(d, start, end)


def join_chunks(dims: Sequence[Dim]) -> Dim | None:
    """The dim of the concatenation of split dims ``dims`` along themselves, where each rank
    concatenating its own chunks gives contiguous chunks in rank order; else None."""
    factors = [_single_split(d) for d in dims]
    if any(f is None for f in factors) or len({(f.label, f.split.axes) for f in factors}) != 1:
        return None
    blocks = [(j, c) for j, f in enumerate(factors) for c, n in enumerate(f.split.sizes) if n]
    if blocks != sorted(blocks, key=lambda b: (b[1], b[0])):
        return None  # a rank's pieces would not be one contiguous range of the result
    return _with_sizes(factors[0], [sum(f.split.sizes[c] for f in factors) for c in range(factors[0].split.degree)])
