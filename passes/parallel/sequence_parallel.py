"""Sequence parallelism: split the video tokens over the ulysses x ring (or dsp) ranks.

The token stream is split right where the patch embedding forms it and stays split through
every block (``ShardPropagator``); it is gathered where a reshape cuts the split tokens apart
(the unpatchify before the output). Where the patch embedding is a convolution, the token grid
(T, H, W) read off it says where the stream starts and which factor to split (S or T*H*W).
Otherwise (a linear embedding of patchified tokens, packed latents, pre-patchified inputs) the
start is found from the attention sites' Q/K/V shape flow (``analysis/tokens.py``): Ulysses,
Ring and USP need only the token dim; DSP needs the grid and says so. At each self-attention
over split tokens:

* Ulysses (``passes/ulysses.py``): all-to-all sequence <-> heads around the attention;
* Ring (``passes/ring.py``): K/V blocks passed around the ring, merged by log-sum-exp;
* USP: both, Ulysses on the inner (fastest) axis, Ring over what is left;
* flex attention (``passes/flex.py``): head-parallel under Ulysses (and USP's Ulysses axis), its
  mask and score modifications given global head indices; gathered before it under Ring;
* DSP (``passes/dsp.py``): spatial-temporal models keep the frames split in spatial blocks and
  the spatial tokens split in temporal blocks, switching with one all-to-all per block.

On spatial-temporal models Ulysses and Ring split the spatial tokens S, so temporal attention
(within a patch position) needs no communication; on full-attention models they split all
video tokens. Cross-attention to text runs on the local queries. Uneven sizes give some ranks
one more token (or head); all-to-all splits follow, so results stay exact without masks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.fx

from vdopt import meta
from vdopt.collectives import comm_stats, per_purpose_notes, records
from vdopt.passes.analysis.attention import SDPA, depends_on_latent, module_path
from vdopt.passes.analysis.grid import grid_shape
from vdopt.passes.analysis.sites import VideoLayout
from vdopt.passes.analysis.tokens import find_token_origin
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.dims.propagation import ShardPropagator
from vdopt.passes.dims.rules import FLEX_ATTENTION, DimOp, op_rule, permutation, shape_of
from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape, Split, map_reshape
from vdopt.passes.graph_utils import eliminate_dead_code
from vdopt.passes.parallel.dsp import WANT, first_split, plan_blocks, require_grid, switch_axis_hook
from vdopt.passes.parallel.flex import flex_attention
from vdopt.passes.parallel.ring import ring_attention
from vdopt.passes.parallel.skiparse import skiparse_strides, token_split, token_unit
from vdopt.passes.parallel.ulysses import ulysses_attention

_FOLLOW = {DimOp.RESHAPE, DimOp.PERMUTE, DimOp.IDENTITY}
"""Kinds of ops the token stream is followed through from the patch embedding."""


def _token_dims(layout: ShardedShape) -> list[Dim] | None:
    """(B, T*S, C) or (B*T, S, C) with S = H*W as one factor, or None (size-1 factors are absent)."""
    labels = [[f.label for f in d.factors] for d in layout.dims]
    if len(labels) != 3 or labels[2] != ["C"] or not labels[1]:
        return None
    spatial = [lab for lab in labels[1] if lab in ("H", "W")]
    lead = labels[1][: len(labels[1]) - len(spatial)]
    if spatial != ["H", "W"][2 - len(spatial):] and spatial != ["H", "W"][: len(spatial)]:
        return None
    if labels[1][len(lead):] != spatial or lead not in ([], ["T"]) or any(lab not in ("B", "T") for lab in labels[0]):
        return None
    if "T" in labels[0] and "T" in lead:
        return None
    f = layout.dims[1].factors
    s = math.prod(x.size for x in f[len(lead):])
    tokens = f[: len(lead)] + ((Factor("S", s),) if s > 1 else ())
    return [layout.dims[0], Dim(tokens), Dim.plain(layout.dims[2].size)]


def find_token_stream(graph: torch.fx.Graph, grid: VideoLayout) -> tuple[torch.fx.Node, list[Dim]] | None:
    """The first node holding the grid's tokens as (B, T*S, C) or (B*T, S, C).

    Starts where analysis read the grid off (``grid_shape``: the patch embedding convolution,
    the reshape merging a patchified latent, or flat token inputs viewed as T x H x W) and
    follows it through reshapes and transposes, keeping track of which dims hold batch,
    frames, rows, columns and channels, so a hidden size that happens to equal the token
    count cannot be mistaken for it. Returns the node and its dims labelled ``B``, ``T``,
    ``S`` (size-1 factors left out).
    """
    try:
        source, start = grid_shape(graph, grid)
    except ValueError:  # the grid's source is not in this graph as analysis saw it
        return None
    dims = _token_dims(start)
    if dims is not None:
        return source, dims
    layouts = {source: start}
    for n in graph.nodes:
        rule = op_rule(n.target) if n.op == "call_function" else None
        out = shape_of(n)
        if rule is None or rule.kind not in _FOLLOW or out is None or n.args[0] not in layouts:
            continue
        lay = layouts[n.args[0]]
        new = lay.permute(permutation(n)) if rule.kind is DimOp.PERMUTE else map_reshape(lay, out)
        if new is None:
            continue
        layouts[n] = new
        dims = _token_dims(new)
        if dims is not None:
            return n, dims
    return None


def _local_attention(prop: ShardPropagator, node: torch.fx.Node, purpose: str):
    layout = prop.local_sdpa(node)
    prop.emit.revalue(node)
    return node, layout, layout


def attend(prop: ShardPropagator, node: torch.fx.Node, purpose: str):
    """Attention over split tokens: Ulysses over each non-ring axis (innermost first), then Ring."""
    q = prop.sdpa_inputs(node)[0]
    lq = prop.layout(q)
    if lq is None or not lq.dims[2].sharded:
        return _local_attention(prop, node, purpose)
    split = next(f.split for f in lq.dims[2].factors if f.split is not None)
    if split.axes[-1].axis == "ring":
        return ring_attention(prop, node, purpose)
    return ulysses_attention(prop, node, purpose, inner=attend)


def _flex_purpose(node: torch.fx.Node) -> str:
    return module_path(node) or node.name


def seq_attention(prop: ShardPropagator, node: torch.fx.Node):
    if node.target is FLEX_ATTENTION:
        return flex_attention(prop, node, _flex_purpose(node))
    site = node.meta.get(meta.SITE)
    purpose = site.name if site is not None else node.name
    users = list(node.users)
    result, layout, node_layout = attend(prop, node, purpose)
    if result is not node:
        for u in users:
            u.replace_input_with(node, result)
        prop.layouts[result] = layout
    return node_layout


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceParallel:
    """Split the video tokens over the ring/ulysses (or dsp) axes of the mesh; see the module doc."""

    name: ClassVar[str] = "sequence_parallel"
    tier: ClassVar[str] = "exact"

    def split_factor(self, ctx: PassContext, spatial_temporal: bool) -> str:
        if ctx.mesh.dsp > 1:
            return first_split(ctx.sites)
        return "S" if spatial_temporal else "TS"

    def validate(self, ctx: PassContext, label: str, size: int, spatial_temporal: bool) -> None:
        mesh = ctx.mesh
        degree = mesh.sequence_degree
        grid = ctx.layout
        sizes = {"T": grid.frames, "S": grid.spatial_tokens} if mesh.dsp > 1 else {label: size}
        for name, n in sizes.items():
            if n < degree:
                raise ValueError(
                    f"Mesh({mesh.describe()}): {n} {'frames' if name == 'T' else 'tokens'} cannot be split over "
                    f"{degree} ranks; use a sequence degree (ulysses*ring*dsp) of at most {n}"
                )
        if mesh.ulysses > 1:
            attended = {"S": ("spatial", "full", "joint_text"), "TS": ("full", "joint_text")}[label]
            few = [s for s in ctx.sites if s.kind in attended and s.heads < mesh.ulysses]
            if few:
                raise ValueError(
                    f"Mesh({mesh.describe()}): Ulysses splits attention heads, but site {few[0].name} has "
                    f"{few[0].heads} heads; use ulysses<={few[0].heads} (and ring for the rest)"
                )

    def token_dim_from_graph(self, gm: torch.fx.GraphModule, ctx: PassContext) -> tuple[torch.fx.Node, list[Dim]]:
        """Where the tokens are created, found from the attention's Q/K/V shape flow (any patch
        embedding: conv, linear on patchified tokens, packed latents, pre-patchified inputs)."""
        mesh = ctx.mesh
        from_latent = depends_on_latent(gm.graph)
        sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (SDPA, FLEX_ATTENTION)
                 and n.args[0] in from_latent and getattr(n.meta.get(meta.SITE), "kind", "full") not in ("cross", "text")]
        origin = find_token_origin(sdpas, from_latent)
        if origin is None:
            raise ValueError(
                f"Mesh({mesh.describe()}): sequence parallelism found no self-attention over tokens computed "
                "from the latent input; run this model with cfg parallelism only, or on one device"
            )
        self.validate(ctx, "TS", origin.size, False)
        dims = [Dim.plain(n) for n in shape_of(origin.node)]
        dims[origin.dim] = Dim((Factor("TS", origin.size),))
        return origin.node, dims

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        mesh = ctx.mesh
        groups = mesh.axis_groups(ctx.device)
        spatial_temporal = any(s.kind == "temporal" for s in ctx.sites) and any(s.kind == "spatial" for s in ctx.sites)
        if mesh.dsp > 1:
            require_grid(gm.graph, ctx.layout, mesh)
        if mesh.dsp > 1 and not spatial_temporal:
            raise ValueError(
                f"Mesh({mesh.describe()}): DSP needs a spatial-temporal model (separate spatial and "
                "temporal attention); this model attends over all tokens at once: use ulysses and/or ring"
            )
        found = None
        if ctx.layout is not None:
            label = self.split_factor(ctx, spatial_temporal)
            grid = ctx.layout
            self.validate(ctx, label, {"S": grid.spatial_tokens, "TS": grid.tokens, "T": grid.frames}[label], spatial_temporal)
            found = find_token_stream(gm.graph, grid)
            if found is None and mesh.dsp > 1:
                raise ValueError(
                    f"Mesh({mesh.describe()}): found no token stream of shape (B, T*H*W, C) or (B*T, H*W, C) "
                    f"after the patch embedding (grid {ctx.layout}), which DSP needs: use ulysses and/or ring"
                )
        if found is not None:
            point, dims = found
            if label == "TS":
                tokens = dims[1].body
                dims[1] = Dim((Factor("TS", tokens),))
        else:
            label = "TS"
            point, dims = self.token_dim_from_graph(gm, ctx)
        where = next((i, d.find(label)) for i, d in enumerate(dims) if d.find(label) is not None)
        factor = dims[where[0]].factors[where[1]]
        axes = tuple(groups[a] for a in ("ring", "ulysses", "dsp") if a in groups)
        # Skiparse: chunks of whole k*k runs, so each rank's groups stay on it through the regroup
        unit = token_unit(ctx.sites, ctx.layout) if label == "TS" else 1
        dims[where[0]] = dims[where[0]].with_factor(where[1], Factor(label, factor.size, token_split(factor.size, axes, unit)))
        hook = None
        if mesh.dsp > 1:
            plan, purposes = plan_blocks(ctx.sites)
            hook = switch_axis_hook(plan, purposes)
        prop = ShardPropagator(gm, created_by=self.name, seq_attention=seq_attention, before_node=hook)
        flex = [_flex_purpose(n) for n in gm.graph.find_nodes(op="call_function", target=FLEX_ATTENTION)]
        prop.shard(point, ShardedShape(tuple(dims)))
        prop.run()
        eliminate_dead_code(gm.graph)
        comms = records(n for n in gm.graph.nodes if n.meta.get(meta.CREATED_BY) == self.name)
        notes = per_purpose_notes(comms)
        per_site = {}
        skiparse = skiparse_strides(ctx.sites, ctx.layout)
        for s in ctx.sites:
            how = prop.notes.get(s.name)
            if how is None:
                if mesh.dsp > 1 and s.kind in WANT:
                    how = f"dsp ({WANT[s.kind]} split)"
                elif s.kind == "cross":
                    how = "local (queries split)"
                elif s.kind == "text":
                    how = "replicated"
                else:
                    how = "local (split tokens in batch)"
            per_site[s.name] = how + (f": {notes[s.name]}" if s.name in notes else "")
            if s.name in skiparse:
                per_site[s.name] += f" (skiparse k={skiparse[s.name]})"
        stats = {
            "split": f"{label}{factor.size}/{'x'.join(a.axis for a in axes)}",
            **comm_stats(comms),
            "gathers": prop.counts["gathers"],
            "localized": prop.counts["localized"],
            "per_site": per_site,
        }
        if flex:  # not attention sites (those are SDPA): how each ran, and why gathered
            stats["flex_attention"] = {p: prop.notes.get(p, "gathered") + (f": {notes[p]}" if p in notes else "")
                                       for p in flex}
        return PassResult(gm=gm, modified=True, stats=stats)
