"""PipeFusion: displaced patch pipeline parallelism over the ``pipefusion`` mesh axis.

The graph, marked by ``passes/stage_split.py``, is cut into stages of consecutive blocks; rank
k of the pipefusion group keeps stage k only (its blocks' parameters, the prologue its stage
needs, and on the last rank the epilogue). The latent tokens are split into M patches along
one axis of the token grid (H, else T, else W: the first with at least M entries).

Per call (one denoising step, or one call slot of a step, e.g. cond and uncond):

* *exact* (the first ``warmup_steps`` steps): each stage runs on the whole latent, receives
  the activations from the previous stage, sends its own to the next, and fills its K/V
  cache (the K/V of every self-attention whose keys span the patched axis) with fresh values;
* *pipelined* (afterwards): patch i goes through the stages one after another, so stage k
  works on patch i while stage k+1 works on patch i-1. At each such attention the patch's
  fresh K/V replace its slot in the cache, and the patch attends to the cache: fresh K/V for
  patches already processed in this step, one-step-stale K/V for the others (xDiT's
  PipeFusion). Attention over an axis the patch keeps whole (Latte's temporal attention when
  patching along H) stays exact. Activations move between stages with ``isend``/``irecv``
  on the pipefusion group.

The last stage reassembles the patches, runs the epilogue and broadcasts the output, so every
rank returns the full output. Each rank keeps the K/V cache of its own layers only.

With PAB (``vdopt.runtime.pab``), each stage graph (the exact one, and each patch's) is specialized per
pattern of reused kinds, as the single-device graph is. A call takes one decision (from its
timestep and call slot, so the same on every rank) for every stage graph it runs; caches are
kept per call slot and per stage graph, so a patch replays its own rows. A reused attention
site with stale K/V still computes its K/V projections, since PipeFusion's K/V cache takes
them: that cache then holds this step's K/V as without PAB, and only the query, the attention
and the output projection are skipped.

What is approximate: pipelined calls (by design). What is not done: the pipeline is filled
and drained within each call (the scheduler step between calls is outside the model), so
there is a bubble of (N-1)/(M+N-1) per call, unlike xDiT which keeps the pipeline full across
steps.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.fx._pytree as fx_pytree
from torch.utils import _pytree as pytree

from vdopt import meta
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.runtime.pab import (
    GraphVariants,
    PABState,
    SlotState,
    StepTracker,
    find_graph_regions,
    read_timestep,
)
from vdopt.passes.analysis.attention import depends_on_latent
from vdopt.passes.base import PassContext
from vdopt.passes.pipefusion.patches import (
    PatchDim,
    PatchDims,
    PatchError,
    PatchGraph,
    infer_patch_dims,
    rewrite_for_patch,
    write_patch,
)
from vdopt.passes.pipefusion.stage_split import (
    POST,
    PRE,
    extract_graph,
    is_stage_boundary,
    parameter_bytes,
    split_stages,
)

log = logging.getLogger(__name__)

aten = torch.ops.aten
_CONVS = {aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
PATCH_AXES = ("H", "T", "W")
"""Axes of the token grid the latent may be patched along, in order of preference."""


def patch_sizes(extent: int, patches: int) -> list[int]:
    """Near-equal patch lengths (the first ``extent % patches`` get one more)."""
    base, extra = divmod(extent, patches)
    return [base + (i < extra) for i in range(patches)]


def candidate_axes(layout, patches: int, axis: str | None = None) -> list[tuple[str, int]]:
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


def patch_source(graph: torch.fx.Graph, layout, axis: str) -> tuple[torch.fx.Node, PatchDim]:
    """The patch embedding convolution and where its output holds ``axis``."""
    from_latent = depends_on_latent(graph)
    conv = next((n for n in graph.nodes if n.op == "call_function" and n.target in _CONVS and n in from_latent), None)
    if conv is None:
        raise ValueError("PipeFusion needs the latent's patch embedding convolution to locate the token grid; none found")
    shape = tuple(conv.meta["val"].shape)
    if len(shape) == 5:  # (B, C, T, H, W)
        pd = PatchDim(dim={"T": 2, "H": 3, "W": 4}[axis])
    elif len(shape) == 4:  # (B*T, C, H, W); B may be this rank's part of the batch (CFG parallel)
        pd = PatchDim(dim={"T": 0, "H": 2, "W": 3}[axis], outer=shape[0] // layout.frames if axis == "T" else 1)
    else:
        raise ValueError(f"PipeFusion: unexpected patch embedding output shape {shape}")
    return conv, pd


def locate_patch_axis(
    graph: torch.fx.Graph, layout, candidates: Sequence[tuple[str, int]], body: set[str],
    carried: Sequence[Sequence[torch.fx.Node]],
) -> tuple[str, int, PatchDims]:
    """The first candidate axis the patch inference can follow from the patch embedding into
    every stage: each group of ``carried`` activations must hold it. (Sequence parallelism
    may already split one axis across ranks in a way a patch cannot cut again.)"""
    failures = []
    for axis, extent in candidates:
        try:
            conv, source = patch_source(graph, layout, axis)
            pdims = infer_patch_dims(graph, extent=extent, sources={conv.name: source}, body=body)
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


@dataclasses.dataclass(kw_only=True)
class StageGraphs:
    """What one rank runs."""

    stage: int
    """This rank's stage."""
    prepare: torch.fx.GraphModule
    """``prepare(*flat_inputs) -> prepared``: the prologue and this stage's per-call setup."""
    exact: PatchGraph
    """The stage on the whole latent; returns its fresh K/V after its outputs."""
    patches: list[PatchGraph]
    """The stage for patch i, with K/V cache inputs and merged K/V outputs."""
    received: int
    """Number of activations received from the previous stage (first inputs)."""
    post: torch.fx.GraphModule | None
    """Last stage only: ``post(*stage_outputs, *prepared_for_post) -> flat outputs``."""
    post_prepared: int
    """Number of trailing prepared values that feed ``post`` only."""


def build_stage_graphs(
    gm: torch.fx.GraphModule, ctx: PassContext, config: PipeFusionConfig, stage: int
) -> tuple[StageGraphs, dict[str, Any]]:
    """Cut ``gm`` (marked by StageSplit) into the graphs of ``stage``; also returns report figures."""
    graph = gm.graph
    layout = ctx.layout
    if layout is None:
        raise ValueError("PipeFusion needs the latent's token grid, which analysis could not derive for this model")
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
    sizes = patch_sizes(extent, config.patches)
    for b in split.boundaries:  # what a stage sends patch-wise, the next must expect patch-wise
        for sent_name, received_name in zip(b.sent, b.received):
            if pdims.of(sent_name) != pdims.dims.get(received_name):
                raise PatchError(
                    f"PipeFusion: {sent_name} crosses into stage {b.stage} as {pdims.of(sent_name)} but is read "
                    f"there as {pdims.dims.get(received_name)}"
                )

    def role_nodes(pred) -> list[torch.fx.Node]:
        return [n for n in graph.nodes if n.op == "call_function" and not is_stage_boundary(n) and pred(n)]

    body_nodes = role_nodes(lambda n: n.name in body and roles[n.name] == stage)
    setup_nodes = role_nodes(lambda n: roles[n.name] == stage and n.name not in body and n not in received_nodes)
    post_nodes = role_nodes(lambda n: roles[n.name] == POST)
    pre_nodes = role_nodes(lambda n: roles[n.name] == PRE)
    last = stage == split.stages - 1

    received = [nodes[name] for name in split.boundaries[stage - 1].received] if stage > 0 else []
    output_node = next(iter(reversed(graph.nodes)))
    if last:
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
        post_inputs, post_pre = [], []

    body_set = set(body_nodes)
    externals: list[torch.fx.Node] = []
    for n in body_nodes:
        for a in n.all_input_nodes:
            if a not in body_set and a not in received and a not in externals and a.op != "get_attr":
                externals.append(a)
    for a in sent:  # values sent on unchanged (computed in setup or the prologue)
        if a not in body_set and a not in received and a not in externals:
            externals.append(a)

    placeholders = list(graph.find_nodes(op="placeholder"))
    prepare = extract_graph(gm, pre_nodes + setup_nodes, placeholders, externals + post_pre)
    body_gm = extract_graph(gm, body_nodes, received + externals, sent)
    patched_inputs = {n.name for n in received}
    exact = rewrite_for_patch(body_gm, pdims, start=0, length=extent, patched_inputs=patched_inputs, merge_kv=False)
    patches = []
    start = 0
    for length in sizes:
        patches.append(
            rewrite_for_patch(body_gm, pdims, start=start, length=length, patched_inputs=patched_inputs, merge_kv=True)
        )
        start += length
    post = None
    if last:
        # post(*stage outputs, *prologue values it reads)
        post_graph = torch.fx.Graph()
        env = {}
        for a in sent + post_pre:
            p = post_graph.placeholder(a.name)
            p.meta = dict(a.meta)
            env[a] = p
        for n in post_nodes:
            if n.target is aten._assert_tensor_metadata.default:
                continue
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = post_graph.node_copy(a)
            env[n] = post_graph.node_copy(n, lambda a: env[a])
        flat_out = pytree.tree_map_only(torch.fx.Node, lambda a: env[a], output_node.args[0])
        post_graph.output(tuple(flat_out))
        post_graph.eliminate_dead_code()
        post = torch.fx.GraphModule(gm, post_graph)

    stage_graphs = StageGraphs(
        stage=stage, prepare=prepare, exact=exact, patches=patches, received=len(received),
        post=post, post_prepared=len(post_pre),
    )
    figures = {
        "axis": axis, "extent": extent, "sizes": sizes,
        "stale_sites": [nodes[s].meta[meta.SITE].name if meta.SITE in nodes[s].meta else s for s in exact.cache_sites],
        "stage_blocks": split.blocks,
        "stage_param_bytes": _stage_param_bytes(gm, split),
        "sent_dims": [pdims.of(a.name) for a in sent],
    }
    return stage_graphs, figures


def _stage_param_bytes(gm: torch.fx.GraphModule, split) -> list[int]:
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


@dataclasses.dataclass
class _Slot:
    """K/V caches of one call slot (cond, uncond, ...)."""

    kv: list[torch.Tensor] | None = None


EXACT_GRAPH = "exact"
"""PAB's key of the stage graph on the whole latent (patch graphs: ``patch_key(i)``)."""


def patch_key(i: int) -> str:
    return f"patch {i}"


@dataclasses.dataclass(kw_only=True)
class StagePAB:
    """PAB over one rank's stage graphs: the shared decision and caches, and the variants of
    each stage graph by key (``EXACT_GRAPH``, ``patch_key(i)``)."""

    state: PABState
    variants: dict[str, GraphVariants]

    @classmethod
    def build(cls, graphs: StageGraphs, ctx: PassContext, config: PABConfig) -> StagePAB:
        stage_graphs = {EXACT_GRAPH: graphs.exact, **{patch_key(i): pg for i, pg in enumerate(graphs.patches)}}
        # Sites of other stages are absent here by design, not left out: report this stage's only.
        present = {n.meta[meta.SITE].name for n in graphs.exact.gm.graph.nodes if meta.SITE in n.meta}
        schedule, regions, skipped = find_graph_regions(
            {key: pg.gm for key, pg in stage_graphs.items()}, config,
            tuple(s for s in ctx.sites if s.name in present),
            # the K/V each graph returns for PipeFusion's cache are computed, never replayed
            side_outputs={key: kv_outputs(pg) for key, pg in stage_graphs.items()},
        )
        variants = {
            # uncompiled, like the stage graphs without PAB
            key: GraphVariants(pg.gm, ctx, regions[key], frozenset(schedule.rules), compile=False)
            for key, pg in stage_graphs.items()
        }
        return cls(state=PABState(schedule, regions, skipped), variants=variants)

    def summary(self) -> dict[str, Any]:
        lines = {
            "pab stage graphs": f"{len(self.variants)} ({', '.join(self.variants)}); regions and counts of this "
            "stage, caches per call slot and stage graph",
        }
        lines.update(self.state.summary(v for graph in self.variants.values() for v in graph.built.values()))
        return lines


def kv_outputs(pg: PatchGraph) -> list[torch.fx.Node]:
    """The K/V values ``pg`` returns after its stage outputs (two per stale site)."""
    out_node = next(n for n in reversed(pg.gm.graph.nodes) if n.op == "output")
    values = list(out_node.args[0])
    return values[len(values) - 2 * len(pg.cache_sites):]


class PipeFusionProgram:
    """Runs one rank's stage of the pipeline; see the module docstring."""

    def __init__(
        self,
        graphs: StageGraphs,
        *,
        config: PipeFusionConfig,
        group: dist.ProcessGroup | None,
        peers: Sequence[int],
        in_spec: Any,
        out_spec: Any,
        output_metas: Sequence[Any],
        figures: dict[str, Any],
        total_param_bytes: int,
        pab: StagePAB | None = None,
    ) -> None:
        self.graphs = graphs
        self.config = config
        self.group = group
        self.peers = list(peers)
        self.stage = graphs.stage
        self.stages = len(peers)
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.output_metas = list(output_metas)
        self.figures = figures
        self.total_param_bytes = total_param_bytes
        self.tracker = StepTracker()
        self.steps = 0
        self.slots: dict[int, _Slot] = {}
        self.counts = {"exact": 0, "pipelined": 0}
        self.pab = pab
        """PAB over the stage graphs, or None."""

    @classmethod
    def from_graph(
        cls, gm: torch.fx.GraphModule, ctx: PassContext, config: PipeFusionConfig, pab: PABConfig | None = None
    ) -> PipeFusionProgram:
        """This rank's stage of ``gm`` (marked by StageSplit), with PAB when ``pab`` is set."""
        mesh = ctx.mesh
        if mesh.pipefusion == 1:
            # one stage: the patches run one after another on this device (used by tests)
            group, peers, stage = None, [0], 0
        else:
            from torch.distributed.distributed_c10d import _resolve_process_group

            axis = mesh.axis_groups(ctx.device)["pipefusion"]
            group = _resolve_process_group(axis.group_name)
            me = mesh.coordinates(dist.get_rank())
            peers = [mesh.rank_of({**me, "pipefusion": i}) for i in range(axis.size)]
            stage = axis.rank
        graphs, figures = build_stage_graphs(gm, ctx, config, stage)
        info = getattr(gm.graph._codegen, "pytree_info", None)
        output_node = next(iter(reversed(gm.graph.nodes)))
        metas = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in output_node.args[0]]
        return cls(
            graphs, config=config, group=group, peers=peers,
            in_spec=info.in_spec if info else None, out_spec=info.out_spec if info else None,
            output_metas=metas, figures=figures, total_param_bytes=parameter_bytes(gm),
            pab=StagePAB.build(graphs, ctx, pab) if pab is not None else None,
        )

    # -- communication ---------------------------------------------------------------------
    def _irecv(self, shapes_dtypes: Sequence[tuple[tuple[int, ...], torch.dtype]], device) -> list[tuple[torch.Tensor, Any]]:
        src = self.peers[self.stage - 1]
        out = []
        for shape, dtype in shapes_dtypes:
            buf = torch.empty(shape, dtype=dtype, device=device)
            out.append((buf, dist.irecv(buf, src=src, group=self.group)))
        return out

    def _isend(self, tensors: Sequence[torch.Tensor], pending: list) -> None:
        dst = self.peers[self.stage + 1]
        for t in tensors:
            t = t.contiguous()
            pending.append((t, dist.isend(t, dst=dst, group=self.group)))

    def _broadcast_outputs(self, leaves: list[Any] | None, device) -> list[Any]:
        if self.stages == 1:
            return leaves
        src = self.peers[-1]
        result = []
        for i, fake in enumerate(self.output_metas):
            if not isinstance(fake, torch.Tensor):
                result.append(fake if leaves is None else leaves[i])
                continue
            if leaves is not None:
                t = leaves[i].contiguous()
            else:
                t = torch.empty(tuple(fake.shape), dtype=fake.dtype, device=device)
            dist.broadcast(t, src=src, group=self.group)
            result.append(t)
        return result

    # -- one call ----------------------------------------------------------------------------
    def __call__(self, inputs: dict[str, Any]) -> Any:
        if self.pab is not None:
            timestep = read_timestep(inputs)  # PAB needs it: a clear error when missing
        else:
            try:
                timestep = read_timestep(inputs)
            except ValueError:
                timestep = None
        if timestep is None:
            slot_index, new_generation = 0, False
            self.steps += 1
        else:
            slot_index, new_generation = self.tracker.advance(timestep)
            if new_generation:
                self.reset_state()
            if slot_index == 0:
                self.steps += 1
        slot = self.slots.setdefault(slot_index, _Slot())
        exact = self.steps <= self.config.warmup_steps or slot.kv is None
        if self.pab is None:
            return self.run(inputs, slot, exact=exact)
        graphs = [EXACT_GRAPH] if exact else [patch_key(i) for i in range(len(self.graphs.patches))]
        pab_slot, reuse = self.pab.state.decide(slot_index, timestep, graphs)
        out = self.run(inputs, slot, exact=exact, pab=(pab_slot, reuse))
        self.pab.state.finish(pab_slot, reuse, graphs)
        if not exact:  # a slot never runs exact again in this generation: free those caches
            pab_slot.cache.pop(EXACT_GRAPH, None)
        return out

    def run(
        self, inputs: dict[str, Any], slot: _Slot, *, exact: bool, pab: tuple[SlotState, frozenset[str]] | None = None
    ) -> Any:
        """One call: exact on the whole latent, or pipelined over the patches; with ``pab``
        (PAB's slot and reused kinds) the stage graphs run as PAB variants."""
        flat = list(fx_pytree.tree_flatten_spec(([], dict(inputs)), self.in_spec))
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))
        g = self.graphs
        prepared = list(g.prepare(*flat))
        post_prepared = prepared[len(prepared) - g.post_prepared :] if g.post_prepared else []
        body_prepared = prepared[: len(prepared) - g.post_prepared]
        first, last = self.stage == 0, self.stage == self.stages - 1
        pending: list = []
        if exact:
            self.counts["exact"] += 1
            graph = g.exact
            acts = []
            if not first:
                specs = self._recv_specs(graph)
                acts = [self._wait(b, w) for b, w in self._irecv(specs, device)]
            outs = self._run_stage_graph(EXACT_GRAPH, graph, pab, [*acts, *body_prepared])
            n_out = len(outs) - 2 * len(graph.cache_sites)
            slot.kv = [t.contiguous() for t in outs[n_out:]]
            stage_out = outs[:n_out]
            if not last:
                self._isend(stage_out, pending)
        else:
            self.counts["pipelined"] += 1
            received = []
            if not first:
                # post every receive now: patch i+1 arrives while patch i computes
                received = [self._irecv(self._recv_specs(pg), device) for pg in g.patches]
            assembled: list[Any] | None = None
            extent = self.figures["extent"]
            start = 0
            for i, pg in enumerate(g.patches):
                acts = [self._wait(b, w) for b, w in received[i]] if not first else []
                outs = self._run_stage_graph(patch_key(i), pg, pab, [*acts, *body_prepared, *slot.kv])
                n_out = len(outs) - 2 * len(pg.cache_sites)
                slot.kv = outs[n_out:]
                stage_out = outs[:n_out]
                length = self.figures["sizes"][i]
                if not last:
                    self._isend(stage_out, pending)
                else:
                    assembled = self._assemble(assembled, stage_out, pg.output_dims, g.exact, extent, start, length)
                start += length
            stage_out = assembled
        leaves = None
        if last:
            leaves = list(g.post(*stage_out, *post_prepared))
        for _, work in pending:
            work.wait()
        leaves = self._broadcast_outputs(leaves, device)
        if self.out_spec is not None:
            return pytree.tree_unflatten(leaves, self.out_spec)
        return tuple(leaves)

    def _run_stage_graph(
        self, key: str, pg: PatchGraph, pab: tuple[SlotState, frozenset[str]] | None, args: list[Any]
    ) -> list[Any]:
        """``pg``'s outputs and K/V, through its PAB variant when PAB decided this call."""
        if pab is None or self.pab is None:
            return list(pg.gm(*args))
        pab_slot, reuse = pab
        return list(self.pab.state.run(pab_slot, key, self.pab.variants[key](reuse), args))

    @staticmethod
    def _wait(buf: torch.Tensor, work) -> torch.Tensor:
        work.wait()
        return buf

    def _recv_specs(self, pg: PatchGraph) -> list[tuple[tuple[int, ...], torch.dtype]]:
        placeholders = list(pg.gm.graph.find_nodes(op="placeholder"))[: self.graphs.received]
        return [(tuple(p.meta["val"].shape), p.meta["val"].dtype) for p in placeholders]

    @staticmethod
    def _assemble(assembled, outs, dims, exact: PatchGraph, extent: int, start: int, length: int) -> list[Any]:
        """Write patch outputs into whole-latent buffers (unpatched outputs: the last patch's)."""
        if assembled is None:
            out_node = next(iter(reversed(exact.gm.graph.nodes)))
            assembled = []
            for a, pd in zip(out_node.args[0], dims):
                val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
                if isinstance(pd, PatchDim) and isinstance(val, torch.Tensor):
                    assembled.append(torch.empty(tuple(val.shape), dtype=val.dtype, device=outs[0].device))
                else:
                    assembled.append(None)
        for i, (value, pd) in enumerate(zip(outs, dims)):
            if isinstance(pd, PatchDim):
                write_patch(assembled[i], value, pd, extent, start, length)
            else:
                assembled[i] = value
        return assembled

    # -- state and report --------------------------------------------------------------------
    def reset_state(self) -> None:
        self.slots.clear()
        self.steps = 0
        if self.pab is not None:
            self.pab.state.reset()

    def reset(self) -> None:
        self.tracker.reset()
        self.reset_state()

    def param_bytes(self) -> int:
        """Bytes of parameters this rank's graphs hold."""
        g = self.graphs
        modules = [g.prepare, g.exact.gm] + [p.gm for p in g.patches] + ([g.post] if g.post is not None else [])
        seen = {}
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.slots.values() for t in (s.kv or []))

    def summary(self) -> dict[str, Any]:
        f = self.figures
        mib = 1 / 2**20
        stage_params = f["stage_param_bytes"]
        held = self.param_bytes()
        ranges = "; ".join(
            f"{k}: {blocks[0]}..{blocks[-1]} ({len(blocks)} blocks, {b * mib:.2f} MiB)" if blocks else f"{k}: -"
            for k, (blocks, b) in enumerate(zip(f["stage_blocks"], stage_params))
        )
        lines = {
            "pipefusion": (
                f"{self.stages} stages, this rank runs stage {self.stage}; {self.config.patches} patches along "
                f"{f['axis']} (sizes {f['sizes']}); warmup {self.config.warmup_steps} exact steps"
            ),
            "pipefusion stages": ranges,
            "pipefusion parameters": (
                f"this rank holds {held * mib:.2f} MiB of the model's {self.total_param_bytes * mib:.2f} MiB "
                f"({held / max(1, self.total_param_bytes):.0%})"
            ),
            "pipefusion stale K/V sites": f"{len(f['stale_sites'])} on this stage ({', '.join(f['stale_sites']) or '-'})",
            "pipefusion calls": f"exact {self.counts['exact']}, pipelined {self.counts['pipelined']}; "
            f"K/V cache {self.cache_bytes() * mib:.2f} MiB",
        }
        if self.pab is not None:
            lines.update(self.pab.summary())
        return lines
