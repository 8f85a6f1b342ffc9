"""Padding and trimming the end of a split dim without gathering it.

A Skiparse block pads its token sequence with zeros to a multiple of k*k and trims the padding
off its output. When the tokens are split over ranks in contiguous chunks, both touch the
last chunk only: the last rank pads (or trims) locally, the other ranks do nothing, and the
split's last chunk grows (or shrinks). Both rules apply to a dim that is one split factor
with no replicated rows; anything else is left to the caller (which gathers).
"""

from __future__ import annotations

import dataclasses

from vdopt.passes.dims.sharded_shape import Dim, Factor, Split


def _single_split(d: Dim) -> Factor | None:
    if d.joint or len(d.factors) != 1 or d.factors[0].split is None:
        return None
    return d.factors[0]


def _with_last(f: Factor, delta: int) -> Dim:
    sizes = f.split.sizes[:-1] + (f.split.sizes[-1] + delta,)
    return Dim((Factor(f.label, f.size + delta, dataclasses.replace(f.split, sizes=sizes)),))


def _is_last(split: Split) -> bool:
    return split.index == split.degree - 1


def pad_end(d: Dim, before: int, after: int) -> tuple[Dim, int] | None:
    """``(new dim, this rank's padding after its chunk)`` for zero-padding ``after`` rows at
    the end of split dim ``d``; None where that is not a change of the last chunk alone."""
    f = _single_split(d)
    if f is None or before != 0 or after <= 0:
        return None
    return _with_last(f, after), (after if _is_last(f.split) else 0)


def trim_end(d: Dim, start: int, end: int) -> tuple[Dim, int] | None:
    """``(new dim, this rank's local end)`` for keeping rows ``[start, end)`` of split dim
    ``d`` when that only cuts rows off the end of the last chunk (at least one row stays)."""
    f = _single_split(d)
    if f is None or start != 0 or not 0 < f.size - end < f.split.sizes[-1]:
        return None
    cut = f.size - end
    return _with_last(f, -cut), f.split.length - (cut if _is_last(f.split) else 0)
