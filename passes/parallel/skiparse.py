"""Skiparse sites (Open-Sora-Plan v1.3) under sequence parallelism: found from their shapes.

A Skiparse block pads the video tokens to a multiple of k*k, regroups them into k groups
(every k-th token, or runs of k tokens every k*k) and folds the groups into the batch, so its
attention sites read ``batch * k`` sequences of ``ceil(tokens / k^2) * k`` tokens. That is how
they are recognized here, from the sites analysis found and the token grid: no module names.

The regroup is a reshape and a permute of the token dim. When each rank's contiguous chunk of
tokens is a whole number of k*k runs, every group's tokens stay on their rank and the
regrouped sequence is split in contiguous chunks again (the dims core keeps the split through
the reshape, ``dims/sharded_shape._outer_part``); attention over it then runs like any
other (Ulysses all-to-alls, Ring). So the token split is chosen in multiples of k*k
(``token_split``): uneven by at most k*k tokens, the padding landing on the last rank only
(``dims/split_chunks.py``). Where there are too few k*k runs to give every rank one, the split
stays balanced and the regroup gathers the tokens first: exact, only slower.

PipeFusion splits the latent into patches and runs each patch's tokens through the blocks on
their own: a Skiparse regroup of a patch is not the regroup of the whole sequence, so
``check_pipefusion`` refuses the combination.
"""

from __future__ import annotations

import math
from typing import Sequence

from vdopt.mesh import AxisGroup, Mesh
from vdopt.passes.analysis.sites import AttentionSite, VideoLayout
from vdopt.passes.dims.sharded_shape import Split


def skiparse_strides(sites: Sequence[AttentionSite], layout: VideoLayout | None) -> dict[str, int]:
    """``{site name: k}`` of the sites that attend over a Skiparse regroup of the video tokens."""
    if layout is None:
        return {}
    # A block that attends over frames or over a frame's tokens (Latte, STDiT) folds a grid
    # axis into the batch: its cross-attention has the same shapes as a Skiparse site.
    factorized = {s.block for s in sites if s.kind in ("spatial", "temporal")}
    found = {}
    for s in sites:
        if s.kind not in ("full", "cross") or s.batch % layout.batch or s.block in factorized:
            continue
        k = s.batch // layout.batch
        padded = s.q_len * k
        if k > 1 and padded % (k * k) == 0 and 0 <= padded - layout.tokens < k * k:
            found[s.name] = k
    return found


def token_unit(sites: Sequence[AttentionSite], layout: VideoLayout | None) -> int:
    """Tokens each rank's chunk must be a multiple of for every Skiparse regroup to stay local."""
    return math.lcm(1, *(k * k for k in skiparse_strides(sites, layout).values()))


def token_split(size: int, axes: Sequence[AxisGroup], unit: int) -> Split:
    """Contiguous chunks of ``size`` tokens in multiples of ``unit`` (the last one takes the
    remainder), as even as that allows; balanced when there are fewer units than ranks."""
    degree = math.prod(a.size for a in axes)
    units = -(-size // unit)
    if unit == 1 or units < degree:
        return Split.balanced(size, axes)
    base, extra = divmod(units, degree)
    sizes = [(base + (i < extra)) * unit for i in range(degree)]
    sizes[-1] -= sum(sizes) - size
    if sizes[-1] < 1:
        return Split.balanced(size, axes)
    return Split(axes=tuple(axes), sizes=tuple(sizes))


def check_pipefusion(sites: Sequence[AttentionSite], layout: VideoLayout | None, mesh: Mesh) -> None:
    """Refuse PipeFusion on a model with Skiparse blocks (see the module docstring)."""
    strides = skiparse_strides(sites, layout)
    if mesh.pipefusion > 1 and strides:
        name, k = next(iter(strides.items()))
        raise ValueError(
            f"Mesh({mesh.describe()}): PipeFusion cannot run Skiparse attention ({name}, k={k}, and "
            f"{len(strides) - 1} more sites): a Skiparse regroup of one patch's tokens is not the regroup "
            "of the whole sequence. Use ulysses and/or ring (exact through Skiparse), or build the model "
            "with sparse1d=False"
        )
