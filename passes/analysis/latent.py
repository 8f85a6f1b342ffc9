"""Which input is the video latent, which nodes are computed from it, and the text lengths."""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from vdopt.passes.dims.rules import shape_of as shape


def _output_shapes(graph: torch.fx.Graph) -> list[tuple[int | torch.SymInt, ...]]:
    out = next(iter(graph.find_nodes(op="output")), None)
    if out is None:
        return []
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args) if isinstance(a, torch.fx.Node)]
    return [s for s in (shape(a) for a in leaves) if s is not None]


def _known_same(a: tuple | None, b: tuple) -> bool:
    # size-oblivious: a data-dependent size equals another only where that holds for every value
    return a is not None and len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def latent_placeholder(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The video latent: among the 4-D or 5-D floating point inputs (else the 3-D ones: packed
    latents, pre-patchified tokens), the one shaped like an output (a denoiser predicts its
    latent's shape; history or reference latents beside it may be larger), else the largest."""
    floats = [n for n in graph.find_nodes(op="placeholder")
              if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()]
    outputs = _output_shapes(graph)
    for rank in ((4, 5), (3,)):
        found = [n for n in floats if n.meta["val"].dim() in rank]
        same = [n for n in found if any(_known_same(shape(n), o) for o in outputs)]
        if same or found:
            return max(same or found, key=lambda n: n.meta["val"].numel())
    return None


def text_lengths(graph: torch.fx.Graph) -> set[int]:
    """Sequence lengths of 3-D floating point inputs other than the latent (packed latent
    tokens are 3-D too): candidate text token counts."""
    lengths = set()
    latent = latent_placeholder(graph)
    for n in graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if n is not latent and isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() == 3:
            lengths.add(int(val.shape[1]))
    return lengths


def depends_on_latent(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node computed from the video latent input."""
    latent = latent_placeholder(graph)
    reached = {latent} if latent is not None else set()
    for n in graph.nodes:
        if any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached
