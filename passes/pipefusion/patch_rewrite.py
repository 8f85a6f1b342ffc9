"""The pass that rewrites a stage body for one patch of the latent (PipeFusion).

The rewrite itself is ``rewrite_for_patch`` (``vdopt.passes.pipefusion.patches``); this pass
binds its options and gives it the pass protocol, so every patch graph is made by the runner
(checked, recorded, named on failure). With ``merge_kv`` each stale attention site reads
its K/V from a cache input merged with the patch's fresh K/V: what makes PipeFusion
approximate. Without it (the graph on the whole latent) the site returns its fresh K/V.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.pipefusion.patches import PatchDims, PatchGraph, rewrite_for_patch


@dataclasses.dataclass(kw_only=True)
class PatchResult(PassResult):
    """``gm`` is the patch graph; ``patch`` has its cache layout and output dims."""

    patch: PatchGraph
    """The rewritten graph with its stale sites and where its outputs hold the patched axis."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchRewrite:
    """Rewrite a stage body (from ``StageCut``) to compute the patch ``start:start+length``."""

    name: ClassVar[str] = "pipefusion_patches"
    tier: ClassVar[str] = "approx"

    pdims: PatchDims
    """Where every value holds the patched axis (``StageCut``'s find step)."""
    start: int
    """First entry of the patch along the patched axis."""
    length: int
    """Entries of the patch (the full extent: the graph on the whole latent)."""
    patched_inputs: frozenset[str]
    """Inputs that arrive cut to the patch (activations from the previous stage)."""
    merge_kv: bool
    """Stale sites merge the patch's K/V into a cache input (else they return their fresh K/V)."""

    def find_stale_sites(self, graph: torch.fx.Graph) -> list[torch.fx.Node]:
        """Attention nodes whose K/V span the patched axis (cached between patches)."""
        return [n for n in graph.nodes if n.name in self.pdims.stale]

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PatchResult:
        stale = self.find_stale_sites(gm.graph)
        patch = rewrite_for_patch(
            gm, self.pdims, start=self.start, length=self.length,
            patched_inputs=set(self.patched_inputs), merge_kv=self.merge_kv,
        )
        stats = {
            "patch": f"{self.start}:{self.start + self.length}",
            "stale_sites": len(stale),
            ("merged_kv" if self.merge_kv else "fresh_kv_outputs"): 2 * len(stale),
        }
        return PatchResult(gm=patch.gm, modified=True, stats=stats, patch=patch)
