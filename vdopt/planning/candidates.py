"""Every assignment of the mesh degrees for a world size, and which of them a model can take.

An assignment gives each axis of ``vdopt.mesh.AXES`` a degree; their product is the world
size. The checks here need only the capture's analysis (sites and token grid): CFG parallel
needs a batch of 2, DSP a spatial-temporal model and replaces Ulysses/Ring, Ulysses a head
count it divides, a sequence degree at most the tokens of the split axis, PipeFusion a
block per stage. A candidate that passes may still be refused by a pass while its graph is
built; the planner records that reason too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from vdopt.mesh import AXES
from vdopt.passes.analysis.sites import AttentionSite, VideoLayout


@dataclasses.dataclass(frozen=True, kw_only=True)
class Assignment:
    """One assignment of degrees, and why it cannot run (``None`` if it may)."""

    degrees: dict[str, int]
    """Degree of every axis in ``AXES``."""
    reason: str | None
    """Why the model cannot take it, or ``None``."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def assignments(world_size: int) -> list[dict[str, int]]:
    """Every map ``AXES -> degree`` whose product is ``world_size`` (in a fixed order)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    out = []
    for combo in itertools.product(divisors(world_size), repeat=len(AXES)):
        if math.prod(combo) == world_size:
            out.append(dict(zip(AXES, combo)))
    return out


def describe(degrees: dict[str, int]) -> str:
    """``ulysses=4,cfg=2`` (degrees above 1 only; ``single`` for one device), the ``--mesh`` syntax."""
    parts = [f"{a}={d}" for a, d in degrees.items() if d > 1]
    return ",".join(parts) or "single"


def why_not(
    degrees: dict[str, int], sites: tuple[AttentionSite, ...], layout: VideoLayout | None, blocks: int
) -> str | None:
    """Why a model with ``sites``, ``layout`` and ``blocks`` transformer blocks cannot take ``degrees``."""
    cfg, pipefusion, ulysses, ring, dsp = (degrees[a] for a in ("cfg", "pipefusion", "ulysses", "ring", "dsp"))
    if cfg > 2:
        return f"cfg={cfg}: CFG parallel splits a cond/uncond pair (at most 2)"
    batch = layout.batch if layout is not None else None
    if cfg == 2 and (batch is None or batch % 2):
        return (f"cfg=2 needs the cond/uncond pair (batch 2); this call has batch {batch} (plan a CFG step's "
                "pair with batch 2: vdopt.optimize(pipe) pairs a pipeline's separate cond and uncond calls)")
    if dsp > 1 and (ulysses > 1 or ring > 1):
        return "dsp replaces ulysses and ring: use it alone"
    kinds = {s.kind for s in sites}
    spatial_temporal = "temporal" in kinds and "spatial" in kinds
    if dsp > 1 and not spatial_temporal:
        return f"dsp={dsp} needs separate spatial and temporal attention; this model attends over all tokens at once"
    sequence = ulysses * ring * dsp
    if dsp > 1 and layout is None:
        # Ulysses and Ring find the token dim from the graph; only DSP needs the (T, H, W) grid
        return "dsp needs the video token grid (frames x height x width), which analysis did not find"
    if ulysses > 1:
        split = [s for s in sites if s.kind != "cross"] or list(sites)
        uneven = [s for s in split if s.heads % ulysses]
        if uneven:
            return (f"ulysses={ulysses} does not divide the {uneven[0].heads} heads of {uneven[0].name} "
                    "(it would pad heads: wasted work)")
    if sequence > 1 and layout is not None:
        tokens = layout.spatial_tokens if spatial_temporal else layout.tokens
        if spatial_temporal and dsp == 1:
            tokens = layout.spatial_tokens
        if sequence > tokens:
            return f"sequence degree {sequence} exceeds the {tokens} tokens it splits"
    if pipefusion > 1:
        if blocks < pipefusion:
            return f"pipefusion={pipefusion} needs at least one transformer block per stage; the model has {blocks}"
        if layout is None:
            return "pipefusion needs the video token grid to cut patches"
    return None


def candidates(
    world_size: int, sites: tuple[AttentionSite, ...], layout: VideoLayout | None, blocks: int
) -> list[Assignment]:
    """Every assignment for ``world_size`` with the reason it is excluded, if any."""
    return [Assignment(degrees=d, reason=why_not(d, sites, layout, blocks)) for d in assignments(world_size)]
