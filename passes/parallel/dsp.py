"""DSP (dynamic sequence parallelism) for spatial-temporal models: switch the split axis.

Spatial attention attends within a frame and temporal attention within a patch position, so
neither needs to see the other axis whole. DSP keeps the frames T split while spatial blocks
run and the spatial tokens S split while temporal blocks run; one all-to-all on the block's
input switches T <-> S, only where the attended axis changes (no head split). Per pair of
blocks that is two all-to-alls of the token stream, where Ulysses needs four (q, k, v, out)
around every spatial attention: half the bytes, as the DSP paper (Zhao et al., 2024) claims.

``plan_blocks`` decides the split per block from the attention sites; ``switch_axis_hook``
gives the ``ShardPropagator`` hook that inserts the all-to-alls. The frames and spatial tokens
come from the token grid analysis found (``analysis/grid.py``): a patch embedding convolution,
a patchify reshape, or flat tokens (packed latents) viewed as ``(T, H*W)`` through the dims
core; ``require_grid`` refuses a model whose grid could not be told, saying what was found.
"""

from __future__ import annotations

import torch.fx

from vdopt import meta
from vdopt.mesh import Mesh
from vdopt.passes.analysis.grid import find_grid
from vdopt.passes.analysis.sites import AttentionSite, VideoLayout
from vdopt.passes.dims.propagation import ShardPropagator

WANT = {"spatial": "T", "temporal": "S"}
"""Which factor stays split while attention of each kind runs: the one it does not attend over."""


def require_grid(graph: torch.fx.Graph, layout: VideoLayout | None, mesh: Mesh) -> VideoLayout:
    """The token grid, or a ``ValueError`` that says what analysis found instead."""
    if layout is not None:
        return layout
    raise ValueError(
        f"Mesh({mesh.describe()}): DSP switches between the frames and the spatial tokens, so it needs "
        f"the frame/height/width grid of the video tokens, which could not be found: {find_grid(graph).note}; "
        "use ulysses and/or ring, which need only the token dim"
    )


def plan_blocks(sites: tuple[AttentionSite, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """Per block, the factor kept split inside it, and the site that names its switch.

    Blocks with both spatial and temporal self-attention get no entry: their sites switch
    around the attention itself (like Ulysses, over the dsp axis).
    """
    wants: dict[str, set[str]] = {}
    names: dict[str, str] = {}
    for s in sites:
        if s.block is not None and s.kind in WANT:
            wants.setdefault(s.block, set()).add(WANT[s.kind])
            names.setdefault(s.block, s.name)
    plan = {b: w.pop() for b, w in wants.items() if len(w) == 1}
    return plan, {b: names[b] for b in plan}


def first_split(sites: tuple[AttentionSite, ...]) -> str:
    """The factor to split first: the one the first spatial/temporal site does not attend over."""
    for s in sites:
        if s.kind in WANT:
            return WANT[s.kind]
    raise ValueError("DSP needs spatial and temporal attention sites")


def switch_axis_hook(plan: dict[str, str], purposes: dict[str, str]):
    """A ``before_node`` hook: inputs entering a planned block split on the wrong factor are switched."""

    def before_node(prop: ShardPropagator, node: torch.fx.Node) -> None:
        block = node.meta.get(meta.BLOCK)
        want = plan.get(block)
        if want is None:
            return
        for a in list(node.all_input_nodes):
            lay = prop.layout(a)
            if lay is None:
                continue
            split = lay.sharded_factors()
            if any(f.label == want for _, _, f in split):
                continue
            src = next(((i, j) for i, j, f in split if f.label in WANT.values()), None)
            dst = lay.find(want)
            if src is None or dst is None:
                continue
            with prop.graph.inserting_before(node):
                new, _ = prop.reshard(a, lay, src, dst, purpose=purposes[block])
            node.replace_input_with(a, new)

    return before_node
