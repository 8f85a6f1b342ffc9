"""Every graph one PipeFusion rank runs, made by the pass runner from the marked graph.

``StageCut`` extracts the rank's stage (prepare, body, post); ``PatchRewrite`` makes from the
body the graph on the whole latent (returning fresh K/V) and one graph per patch (merging
stale K/V); with PAB, ``PABSpecialize`` makes each of those graphs' variants. Each run is
recorded under the graph it made (``stage 1``, ``exact``, ``patch 0``, ``patch 0 reuse_cross``).
Disabling ``pipefusion_patches`` leaves the body alone: every call then runs exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx

from vdopt import meta
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.passes.base import PassContext
from vdopt.passes.pab.variants import PABGraphs, specialize_graphs
from vdopt.passes.pipefusion.patch_rewrite import PatchRewrite
from vdopt.passes.pipefusion.patches import PatchGraph
from vdopt.passes.pipefusion.stage_cut import StageCut, patch_sizes, stage_param_bytes
from vdopt.passes.runner import PassRecord, run_pass

EXACT_GRAPH = "exact"
"""Key of the stage graph on the whole latent (patch graphs: ``patch_key(i)``)."""


def patch_key(i: int) -> str:
    return f"patch {i}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageGraphs:
    """What one rank runs."""

    stage: int
    """This rank's stage."""
    prepare: torch.fx.GraphModule
    """``prepare(*flat_inputs) -> prepared``: the prologue and this stage's per-call setup."""
    exact: PatchGraph | None
    """The stage on the whole latent; returns its fresh K/V after its outputs (``None`` when
    built for costing only)."""
    patches: tuple[PatchGraph, ...]
    """The stage for patch i, with K/V cache inputs and merged K/V outputs (none when the
    patch rewrite is disabled: every call is then exact). Built for costing only, patches of
    one length share one graph."""
    received: int
    """Number of activations received from the previous stage (first inputs)."""
    post: torch.fx.GraphModule | None
    """Last stage only: ``post(*stage_outputs, *prepared_for_post) -> flat outputs``."""
    post_prepared: int
    """Number of trailing prepared values that feed ``post`` only."""
    figures: dict[str, Any]
    """For the report and tests: ``axis``, ``extent``, ``sizes``, ``stale_sites``,
    ``stage_blocks``, ``stage_param_bytes``, ``sent_dims``."""

    def by_key(self) -> dict[str, PatchGraph]:
        """The stage graphs PAB applies to, by key (``EXACT_GRAPH``, ``patch_key(i)``)."""
        return {EXACT_GRAPH: self.exact, **{patch_key(i): pg for i, pg in enumerate(self.patches)}}


def _unrewritten(body: torch.fx.GraphModule, cut_output_dims: Sequence[Any]) -> PatchGraph:
    """The body as the graph on the whole latent when the patch rewrite is disabled."""
    shapes = tuple(
        tuple(p.meta["val"].shape) if isinstance(p.meta.get("val"), torch.Tensor) else None
        for p in body.graph.find_nodes(op="placeholder")
    )
    return PatchGraph(gm=body, cache_sites=(), input_shapes=shapes, output_dims=tuple(cut_output_dims))


def build_stage_graphs(
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    config: PipeFusionConfig,
    stage: int,
    *,
    disabled: Collection[str] = (),
    after: Sequence[str] = (),
    costing_only: bool = False,
) -> tuple[StageGraphs, list[PassRecord]]:
    """Cut ``stage`` out of ``gm`` (marked by ``StageSplit``) and rewrite it per patch.

    ``costing_only`` (the planner: graphs read, never run) rewrites one graph per distinct
    patch length, shared by the patches of that length (they differ only in where the patch
    starts, so they cost the same), and no graph on the whole latent (the patch graphs hold
    the same weights and return the merged K/V at its size).
    """
    result, record = run_pass(StageCut(config=config, stage=stage), gm, ctx, after=after, graph=f"stage {stage}")
    records = [record]
    ran = [*after, StageCut.name]
    cut, body = result.cut, result.gm
    sizes = patch_sizes(cut.extent, config.patches)
    patched = frozenset(n.name for n in cut.received)
    if PatchRewrite.name in disabled:
        exact = _unrewritten(body, [cut.pdims.of(a.name) for a in cut.sent])
        patches: list[PatchGraph] = []
    else:
        def rewrite(start: int, length: int, merge_kv: bool, label: str) -> PatchGraph:
            rewrite_pass = PatchRewrite(
                pdims=cut.pdims, start=start, length=length, patched_inputs=patched, merge_kv=merge_kv
            )
            patch_result, patch_record = run_pass(rewrite_pass, body, ctx, after=ran, graph=label)
            records.append(patch_record)
            return patch_result.patch

        exact = None if costing_only else rewrite(0, cut.extent, False, EXACT_GRAPH)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        by_length: dict[int, PatchGraph] = {}
        patches = []
        for i, (s, n) in enumerate(zip(starts, sizes)):
            if not costing_only or n not in by_length:
                by_length[n] = rewrite(s, n, True, patch_key(i))
            patches.append(by_length[n])
    nodes = {n.name: n for n in gm.graph.nodes}
    figures = {
        "axis": cut.axis, "extent": cut.extent, "sizes": sizes,
        "stale_sites": [
            nodes[s].meta[meta.SITE].name if meta.SITE in nodes[s].meta else s
            for s in (exact or patches[0]).cache_sites
        ],
        "stage_blocks": cut.split.blocks,
        "stage_param_bytes": stage_param_bytes(gm, cut.split),
        "sent_dims": [cut.pdims.of(a.name) for a in cut.sent],
    }
    graphs = StageGraphs(
        stage=stage, prepare=result.prepare, exact=exact, patches=tuple(patches), received=len(cut.received),
        post=result.post, post_prepared=len(cut.post_prepared), figures=figures,
    )
    return graphs, records


def kv_outputs(pg: PatchGraph) -> list[torch.fx.Node]:
    """The K/V values ``pg`` returns after its stage outputs (two per stale site)."""
    out_node = next(n for n in reversed(pg.gm.graph.nodes) if n.op == "output")
    values = list(out_node.args[0])
    return values[len(values) - 2 * len(pg.cache_sites):]


def specialize_stage_graphs(
    graphs: StageGraphs, ctx: PassContext, config: PABConfig, *, after: Sequence[str] = ()
) -> PABGraphs:
    """PAB variants of every stage graph of ``graphs``. Sites of other stages are absent here
    by design, not left out: regions and the report cover this stage's only."""
    present = {n.meta[meta.SITE].name for n in graphs.exact.gm.graph.nodes if meta.SITE in n.meta}
    stage_ctx = dataclasses.replace(ctx, sites=tuple(s for s in ctx.sites if s.name in present))
    by_key = graphs.by_key()
    return specialize_graphs(
        {key: pg.gm for key, pg in by_key.items()}, stage_ctx, config,
        # the K/V each graph returns for PipeFusion's cache are computed, never replayed
        side_outputs={key: kv_outputs(pg) for key, pg in by_key.items()},
        after=after,
    )
