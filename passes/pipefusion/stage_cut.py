"""Cut one rank's pipeline stage out of a graph marked by ``StageSplit`` (PipeFusion).

Rank k of the pipefusion group keeps stage k only: its blocks' parameters, the prologue its
stage needs, and on the last rank the epilogue. The find step (``find_stage_cut``) reads the
markers back, picks the axis of the token grid the latent is patched along (H, else T,
else W: the first with at least M entries that the patch inference can follow into every
stage), and sorts the nodes into this stage's per-call setup, its per-patch body and the
epilogue. The rewrite extracts them as standalone graphs:

* ``prepare(*flat_inputs) -> prepared``: the prologue and the stage's per-call setup;
* the body (the pass's ``gm``): ``body(*received, *prepared) -> sent``, on the whole latent;
* ``post(*stage_outputs, *prepared_for_post) -> flat outputs`` on the last stage only.

The cut is exact: running prepare, the stages' bodies in order, and post is the model.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any, Callable, ClassVar

import torch
import torch.fx
from torch.utils import _pytree as pytree

from vdopt.config import PipeFusionConfig
from vdopt.passes.analysis.attention import depends_on_latent
from vdopt.passes.analysis.grid import find_grid, grid_shape
from vdopt.passes.analysis.sites import VideoLayout
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.graph_utils import eliminate_dead_code, graph_module_like
from vdopt.passes.pipefusion.patches import PatchDim, PatchDims, PatchError, infer_patch_dims
from vdopt.passes.pipefusion.stage_split import POST, PRE, StageLayout, extract_graph, is_stage_boundary, split_stages

aten = torch.ops.aten
PATCH_AXES = ("H", "T", "W")
"""Axes of the token grid the latent may be patched along, in order of preference."""


def patch_sizes(extent: int, patches: int) -> list[int]:
    """Near-equal patch lengths (the first ``extent % patches`` get one more)."""
    base, extra = divmod(extent, patches)
    return [base + (i < extra) for i in range(patches)]


def candidate_axes(layout: VideoLayout, patches: int, axis: str | None = None) -> list[tuple[str, int]]:
    """Axes the latent may be patched along (the requested one, or all long enough), with extents."""
    extents = {"T": layout.frames, "H": layout.height, "W": layout.width}
    if axis is not None:
        if extents[axis] < patches:
            raise ValueError(
                f"PipeFusionConfig(patches={patches}, axis={axis!r}): the token grid has only {extents[axis]} "
                f"entries along {axis} (T={layout.frames} H={layout.height} W={layout.width}); use fewer patches "
                "or another axis"
            )
        return [(axis, extents[axis])]
    found = [(a, extents[a]) for a in PATCH_AXES if extents[a] >= patches]
    if not found:
        raise ValueError(
            f"PipeFusionConfig(patches={patches}) needs an axis of the token grid with at least {patches} "
            f"entries, but the grid is T={layout.frames} H={layout.height} W={layout.width}: use patches <= "
            f"{max(extents.values())}"
        )
    return found


def patch_source(graph: torch.fx.Graph, layout: VideoLayout, axis: str) -> tuple[torch.fx.Node, PatchDim]:
    """Where the latent's token grid is first held (``analysis/grid.py``) and how it holds
    ``axis``: a convolution's own dim, or flat tokens viewed as ``T x H x W`` (a patch along H
    is then ``outer=T, inner=W`` of the token dim, sliced exactly by the dims core)."""
    try:
        node, dims = grid_shape(graph, layout)
    except ValueError as e:
        raise PatchError(f"PipeFusion cannot locate the token grid: {e}") from None
    where = dims.find(axis)
    if where is None:
        raise PatchError(f"PipeFusion: {node.name} does not hold the {axis} axis of the token grid")
    d, j = where
    factors = dims.dims[d].factors
    outer = math.prod(f.size for f in factors[:j])
    inner = math.prod(f.size for f in factors[j + 1:])
    return node, PatchDim(dim=d, outer=outer, inner=inner)


def locate_patch_axis(
    graph: torch.fx.Graph, layout: VideoLayout, candidates: Sequence[tuple[str, int]], body: set[str],
    carried: Sequence[Sequence[torch.fx.Node]],
) -> tuple[str, int, PatchDims]:
    """The first candidate axis the patch inference can follow from the patch embedding into
    every stage: each group of ``carried`` activations must hold it. (Sequence parallelism
    may already split one axis across ranks in a way a patch cannot cut again.)"""
    failures = []
    for axis, extent in candidates:
        try:
            node, source = patch_source(graph, layout, axis)
            pdims = infer_patch_dims(graph, extent=extent, sources={node.name: source}, body=body)
        except PatchError as e:
            failures.append(f"along {axis}: {e}")
            continue
        missing = [group for group in carried if not any(isinstance(pdims.of(a.name), PatchDim) for a in group)]
        if not missing:
            return axis, extent, pdims
        where = f"; first lost at {pdims.lost[0]}" if pdims.lost else ""
        failures.append(f"along {axis}: the activations {[a.name for a in missing[0]]} do not hold it{where}")
    raise ValueError("PipeFusion cannot cut the latent into patches " + "; ".join(failures))


def _closure(graph: torch.fx.Graph, sources: set[torch.fx.Node]) -> set[torch.fx.Node]:
    reached = set(sources)
    for n in graph.nodes:
        if any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached


def stage_param_bytes(gm: torch.fx.GraphModule, split: StageLayout) -> list[int]:
    """Bytes of parameters each stage's blocks read (prologue and epilogue excluded)."""
    totals: list[dict[int, int]] = [{} for _ in range(split.stages)]
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        stages = {split.roles[u.name] for u in n.users if isinstance(split.roles.get(u.name), int)}
        value = operator.attrgetter(n.target)(gm)
        if isinstance(value, torch.Tensor):
            for s in stages:
                totals[s][value.data_ptr()] = value.numel() * value.element_size()
    return [sum(t.values()) for t in totals]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageNodes:
    """The find step's answer: which nodes of the marked graph go where."""

    split: StageLayout
    """The markers read back: roles, blocks and boundaries."""
    axis: str
    """Axis of the token grid the latent is patched along."""
    extent: int
    """Its full extent."""
    pdims: PatchDims
    """Where every value holds the patched axis."""
    prepare: tuple[torch.fx.Node, ...]
    """Prologue and this stage's per-call setup."""
    prepare_outputs: tuple[torch.fx.Node, ...]
    """What ``prepare`` returns: the body's external inputs, then those only ``post`` reads."""
    body: tuple[torch.fx.Node, ...]
    """The stage's per-patch computation."""
    received: tuple[torch.fx.Node, ...]
    """Activations received from the previous stage (the body's first inputs)."""
    externals: tuple[torch.fx.Node, ...]
    """Other body inputs (computed by ``prepare``)."""
    sent: tuple[torch.fx.Node, ...]
    """The body's outputs: sent to the next stage, or handed to ``post``."""
    last: bool
    """Whether this is the last stage (which runs the epilogue)."""
    post: tuple[torch.fx.Node, ...]
    """Epilogue nodes (last stage only)."""
    post_prepared: tuple[torch.fx.Node, ...]
    """Values of ``prepare`` only ``post`` reads."""


def find_stage_cut(gm: torch.fx.GraphModule, layout: VideoLayout | None, config: PipeFusionConfig, stage: int) -> StageNodes:
    """Where each node of the marked graph ``gm`` goes for ``stage`` (pure: ``gm`` is unchanged)."""
    graph = gm.graph
    if layout is None:
        raise ValueError(
            "PipeFusion splits the latent into patches along a frame/height/width axis, so it needs the "
            f"token grid, which could not be found: {find_grid(graph).note}; use ulysses and/or ring instead "
            "of pipefusion, which need only the token dim"
        )
    split = split_stages(gm)
    roles = split.roles
    nodes = {n.name: n for n in graph.nodes}
    markers = [n for n in graph.nodes if is_stage_boundary(n)]
    received_nodes = {u for m in markers for u in m.users}
    per_patch = _closure(graph, depends_on_latent(graph) | received_nodes)
    body = {
        n.name for n in graph.nodes
        if n.op == "call_function" and isinstance(roles[n.name], int) and n in per_patch
        and not is_stage_boundary(n) and n not in received_nodes
    }
    # the activations each boundary carries, and what the last stage hands the epilogue
    carried = [[nodes[name] for name in b.sent] for b in split.boundaries]
    epilogue_inputs = {
        a for n in graph.nodes if roles[n.name] == POST for a in n.all_input_nodes
        if roles.get(a.name) == split.stages - 1
    }
    carried.append(sorted(epilogue_inputs, key=lambda a: a.name))
    axis, extent, pdims = locate_patch_axis(graph, layout, candidate_axes(layout, config.patches, config.axis), body, carried)
    for b in split.boundaries:  # what a stage sends patch-wise, the next must expect patch-wise
        for sent_name, received_name in zip(b.sent, b.received):
            if pdims.of(sent_name) != pdims.dims.get(received_name):
                raise PatchError(
                    f"PipeFusion: {sent_name} crosses into stage {b.stage} as {pdims.of(sent_name)} but is read "
                    f"there as {pdims.dims.get(received_name)}"
                )

    def role_nodes(pred: Callable[[torch.fx.Node], bool]) -> list[torch.fx.Node]:
        return [n for n in graph.nodes if n.op == "call_function" and not is_stage_boundary(n) and pred(n)]

    body_nodes = role_nodes(lambda n: n.name in body and roles[n.name] == stage)
    setup_nodes = role_nodes(lambda n: roles[n.name] == stage and n.name not in body and n not in received_nodes)
    post_nodes = role_nodes(lambda n: roles[n.name] == POST)
    pre_nodes = role_nodes(lambda n: roles[n.name] == PRE)
    last = stage == split.stages - 1

    received = [nodes[name] for name in split.boundaries[stage - 1].received] if stage > 0 else []
    if last:
        output_node = next(iter(reversed(graph.nodes)))
        post_set = set(post_nodes)
        post_inputs: list[torch.fx.Node] = []
        for n in post_nodes + [output_node]:
            for a in n.all_input_nodes:
                if a not in post_set and a not in post_inputs and a.op != "get_attr":
                    post_inputs.append(a)
        sent = [a for a in post_inputs if roles[a.name] == stage]
        post_pre = [a for a in post_inputs if roles[a.name] != stage]
    else:
        sent = [nodes[name] for name in split.boundaries[stage].sent]
        post_nodes, post_pre = [], []

    body_set = set(body_nodes)
    externals: list[torch.fx.Node] = []
    for n in body_nodes:
        for a in n.all_input_nodes:
            if a not in body_set and a not in received and a not in externals and a.op != "get_attr":
                externals.append(a)
    for a in sent:  # values sent on unchanged (computed in setup or the prologue)
        if a not in body_set and a not in received and a not in externals:
            externals.append(a)
    return StageNodes(
        split=split, axis=axis, extent=extent, pdims=pdims,
        prepare=tuple(pre_nodes + setup_nodes), prepare_outputs=tuple(externals + post_pre),
        body=tuple(body_nodes), received=tuple(received), externals=tuple(externals), sent=tuple(sent),
        last=last, post=tuple(post_nodes), post_prepared=tuple(post_pre),
    )


def extract_post(gm: torch.fx.GraphModule, cut: StageNodes) -> torch.fx.GraphModule:
    """``post(*stage outputs, *prologue values it reads) -> flat outputs``."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for a in cut.sent + cut.post_prepared:
        p = graph.placeholder(a.name)
        p.meta = dict(a.meta)
        env[a] = p
    for n in cut.post:
        if n.target is aten._assert_tensor_metadata.default:
            continue
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = graph.node_copy(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    output_node = next(iter(reversed(gm.graph.nodes)))
    flat_out = pytree.tree_map_only(torch.fx.Node, lambda a: env[a], output_node.args[0])
    graph.output(tuple(flat_out))
    eliminate_dead_code(graph)
    return graph_module_like(gm, graph)


@dataclasses.dataclass(kw_only=True)
class StageCutResult(PassResult):
    """``gm`` is the stage's body on the whole latent; the other graphs come with it."""

    cut: StageNodes
    """What the find step decided (axis, patch dims, which values cross)."""
    prepare: torch.fx.GraphModule
    """``prepare(*flat_inputs) -> prepared``."""
    post: torch.fx.GraphModule | None
    """Last stage only: ``post(*stage_outputs, *prepared_for_post) -> flat outputs``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageCut:
    """Extract this rank's stage of a graph marked by ``StageSplit``."""

    name: ClassVar[str] = "pipefusion_stage_cut"
    tier: ClassVar[str] = "exact"

    config: PipeFusionConfig
    """Patches and patch axis (the cut keeps the values a patch needs whole or sliced)."""
    stage: int
    """The stage this rank runs."""

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> StageCutResult:
        cut = find_stage_cut(gm, ctx.layout, self.config, self.stage)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        prepare = extract_graph(gm, cut.prepare, placeholders, cut.prepare_outputs)
        body = extract_graph(gm, cut.body, cut.received + cut.externals, cut.sent)
        post = extract_post(gm, cut) if cut.last else None
        for side in (prepare, post):
            if side is not None:
                side.graph.lint()
        stats: dict[str, Any] = {
            "stage": f"{self.stage}/{cut.split.stages}",
            "axis": cut.axis,
            "blocks": len(cut.split.blocks[self.stage]),
            "received": len(cut.received),
            "sent": len(cut.sent),
        }
        return StageCutResult(gm=body, modified=True, stats=stats, cut=cut, prepare=prepare, post=post)
