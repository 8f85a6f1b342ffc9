"""Ulysses sequence parallelism at one attention site: all-to-all between sequence and heads.

Tokens are split along the sequence; before self-attention, one all-to-all per q/k/v turns
"all heads, my tokens" into "my heads, all tokens", attention runs on whole sequences, and one
all-to-all turns the output back (4 all-to-alls per site). Head counts that do not divide the
degree give some ranks one more head (the all-to-all splits are uneven, so the result is
exact without padding). Replicated text rows of a joint text+video sequence are cut to this
rank's heads locally on the way in, and gathered over heads on the way out (one all-gather),
so every rank attends to each text key exactly once per head.

Legend: B batch, N heads, L sequence, D head dim.
"""

from __future__ import annotations

from typing import Callable

import torch.fx

from vdopt.passes.dims.propagation import NeedGather, ShardPropagator
from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape

Attend = Callable[[ShardPropagator, torch.fx.Node, str], tuple[torch.fx.Node, ShardedShape, ShardedShape]]
"""``attend(prop, sdpa_node, purpose) -> (result node, its layout, the SDPA node's own layout)``."""


def sequence_factor(layout: ShardedShape) -> int:
    """Index of the split factor in the sequence dim (2) of a (B, N, L, D) layout."""
    split = [j for j, f in enumerate(layout.dims[2].factors) if f.split is not None]
    if len(split) != 1:
        raise NeedGather("sequence dim has no single split factor")
    return split[0]


def with_head_factor(layout: ShardedShape) -> ShardedShape:
    """``layout`` with its heads dim (1) as one factor ``N`` (the factor the all-to-all splits)."""
    d = layout.dims[1]
    if d.sharded or d.joint:
        raise NeedGather("heads already split")
    return layout.with_dim(1, Dim((Factor("N", d.size),)))


def ulysses_attention(prop: ShardPropagator, node: torch.fx.Node, purpose: str, inner: Attend) -> tuple[torch.fx.Node, ShardedShape, ShardedShape]:
    """Rewrite SDPA ``node`` whose q/k/v are split along the sequence (innermost axis not ring).

    Returns the node that holds the attention output (split like q), its layout, and the
    layout of the SDPA node itself (heads split).
    ``inner`` attends once q/k/v hold all the tokens of this axis (ring, or local attention).
    """
    q, k, v, mask = prop.sdpa_inputs(node)
    lays = [prop.layout(t) for t in (q, k, v)]
    if any(lay is None for lay in lays) or len({lay.dims[2].placement() for lay in lays}) != 1:
        raise NeedGather("q, k and v are split differently along the sequence")
    j = sequence_factor(lays[0])
    seq_split = lays[0].dims[2].factors[j].split
    moved = []
    for t, lay in zip((q, k, v), lays):
        new, _ = prop.reshard(t, with_head_factor(lay), src=(2, j), dst=(1, 0), purpose=purpose)
        moved.append(new)
    prop.set_sdpa_inputs(node, *moved, mask)
    result, layout, node_layout = inner(prop, node, purpose)
    # the output goes back to "all heads, my tokens" right after the attention
    with prop.graph.inserting_before(result.next):
        out, out_layout = prop.reshard(result, layout, src=(1, 0), dst=(2, j), purpose=purpose, y_split=seq_split)
    prop.notes[purpose] = "ulysses" + (f"+{prop.notes[purpose]}" if purpose in prop.notes else "")
    return out, out_layout, node_layout
