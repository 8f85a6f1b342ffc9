"""Split a graph into pipeline stages at transformer-block boundaries (PipeFusion).

A *block* is the outermost ``name.<index>`` module (a ``ModuleList`` entry such as
``transformer_blocks.3`` or ``temporal_transformer_blocks.3``) holding nodes computed from the
video latent, read off ``nn_module_stack``; blocks are ordered by their first node. Their cost
is estimated from the graph's meta shapes (FLOPs) or measured by running the graph once on
random inputs, and the blocks are cut into contiguous stages that minimize the largest stage
cost.

``StageSplit`` (the pass) marks each cut with ``vdopt::stage_boundary``: the activations that
cross it go through the marker and every later use reads the marker's outputs. The graph still
runs as one graph (the markers copy), so the pass is exact.

``split_stages`` reads the markers back and gives every node a role: ``PRE`` (prologue:
embeddings and everything else that needs no block output), a stage index, or ``POST``
(epilogue: after the last block, e.g. the final norm, projection and unpatchify).
``extract_graph`` cuts a role's nodes out as a ``GraphModule`` that holds only the
parameters those nodes read, which is how each rank keeps only its stage's weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import re
import time
from typing import ClassVar, Iterable, Literal, Sequence

import torch
import torch.fx

from vdopt import meta
from vdopt.passes.analysis.attention import depends_on_latent
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.graph_utils import eliminate_dead_code, graph_module_like, insert_call

log = logging.getLogger(__name__)

aten = torch.ops.aten

PRE = "pre"
"""Role of prologue nodes (no block output needed; placeholders and parameters too)."""
POST = "post"
"""Role of epilogue nodes (after the last block)."""

Role = int | str

_INDEXED_MODULE = re.compile(r"^(.*\.)?\d+$")


def stage_boundary_op():
    import vdopt.ops  # noqa: F401  (registers the op)

    return torch.ops.vdopt.stage_boundary.default


def is_stage_boundary(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is stage_boundary_op()


# -- blocks ------------------------------------------------------------------------------------


def outer_block(node: torch.fx.Node) -> str | None:
    """The outermost ``name.<index>`` module containing ``node`` (``transformer_blocks.3``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in stack.values():
        path = re.sub(r"^L\['self'\]\.?", "", path)
        if path and _INDEXED_MODULE.match(path):
            return path
    return None


def node_flops(node: torch.fx.Node) -> int:
    """Estimated floating point operations of one node, from its meta shapes.

    Matmuls and attention count 2 flops per multiply-add; every other op one per output
    element (they are memory bound, so this only keeps them from counting as free).
    """
    if node.op != "call_function":
        return 0
    out = node.meta.get("val")
    numel = out.numel() if isinstance(out, torch.Tensor) else 0

    def shape(i: int) -> tuple[int, ...]:
        arg = node.args[i]
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        return tuple(val.shape) if isinstance(val, torch.Tensor) else ()

    target = node.target
    if target in (aten.linear.default,):
        return 2 * numel * shape(1)[-1]
    if target in (aten.mm.default, aten.bmm.default, aten.matmul.default):
        return 2 * numel * shape(0)[-1]
    if target in (aten.addmm.default, aten.baddbmm.default):
        return 2 * numel * shape(1)[-1]
    if target in (aten.convolution.default, aten.conv2d.default, aten.conv3d.default):
        weight = shape(1)
        return 2 * numel * math.prod(weight[1:])
    if str(target) in ("aten.scaled_dot_product_attention.default", "vdopt.attention.default"):
        q, k = shape(0), shape(1)
        if q and k:
            # QK^T and PV: 2 * 2 * (batch x heads) * Sq * Skv * D
            return 4 * math.prod(q[:-1]) * k[-2] * q[-1]
    return numel


@dataclasses.dataclass(frozen=True, kw_only=True)
class Block:
    """One transformer block of the graph."""

    name: str
    """Module path (``transformer_blocks.3``)."""
    nodes: tuple[str, ...]
    """Names of the block's nodes, in graph order."""
    flops: int
    """Estimated FLOPs of one call."""


def find_blocks(graph: torch.fx.Graph) -> list[Block]:
    """The blocks of the graph in order: outermost indexed modules reading the latent."""
    from_latent = depends_on_latent(graph)
    members: dict[str, list[torch.fx.Node]] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        block = outer_block(n)
        if block is not None:
            members.setdefault(block, []).append(n)
    blocks = [
        Block(name=name, nodes=tuple(n.name for n in nodes), flops=sum(node_flops(n) for n in nodes))
        for name, nodes in members.items()
        # text-only blocks (e.g. a text refiner) are prologue, not pipeline blocks
        if any(n in from_latent for n in nodes)
    ]
    return blocks


def measure_block_seconds(gm: torch.fx.GraphModule, blocks: Sequence[Block], repeats: int = 2) -> list[float]:
    """Wall time of each block's nodes, running the graph on random inputs of its shapes."""
    block_of = {name: i for i, b in enumerate(blocks) for name in b.nodes}
    seconds = [0.0] * len(blocks)

    class Timer(torch.fx.Interpreter):
        def run_node(self, n):
            start = time.perf_counter()
            out = super().run_node(n)
            i = block_of.get(n.name)
            if i is not None:
                seconds[i] += time.perf_counter() - start
            return out

    args = []
    for p in gm.graph.find_nodes(op="placeholder"):
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor):
            if val.is_floating_point():
                args.append(torch.randn(val.shape, dtype=val.dtype, device=val.device))
            else:
                args.append(torch.ones(val.shape, dtype=val.dtype, device=val.device))
        else:
            args.append(val)
    with torch.no_grad():
        for _ in range(repeats):
            Timer(gm).run(*args)
    return seconds


def balance_stages(costs: Sequence[float], stages: int) -> list[range]:
    """Cut ``costs`` (in order) into ``stages`` contiguous non-empty ranges minimizing the
    largest range sum (exact dynamic program; ties go to the earliest cut)."""
    n = len(costs)
    assert 1 <= stages <= n, (stages, n)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max-cost splitting the first i blocks into s stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i] - 1e-12 * max(1.0, abs(value)):
                    best[s][i], cut[s][i] = value, j
    bounds = [n]
    for s in range(stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


@dataclasses.dataclass(frozen=True)
class StageMark:
    """``meta[STAGE_BOUNDARY]`` of a marker node: the stage it starts and that stage's blocks."""

    stage: int
    blocks: tuple[str, ...]


# -- roles -------------------------------------------------------------------------------------


def assign_roles(graph: torch.fx.Graph, block_stage: dict[str, int]) -> dict[torch.fx.Node, Role]:
    """Role of every node: ``PRE``, a stage index, or ``POST``.

    Block nodes take their block's stage. Other nodes computed from a block output are glue:
    before the last block node they run on the stage of their latest input, after it they
    are epilogue. Nodes that need no block output are prologue. A marker belongs to the stage
    it starts.
    """
    nodes = list(graph.nodes)
    last_block = max(
        (i for i, n in enumerate(nodes) if n.op == "call_function" and outer_block(n) in block_stage), default=-1
    )
    roles: dict[torch.fx.Node, Role] = {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "get_attr", "call_module"):
            roles[n] = PRE
            continue
        if n.op == "output":
            roles[n] = POST
            continue
        inputs = [roles[a] for a in n.all_input_nodes]
        stages = [r for r in inputs if isinstance(r, int)]
        if is_stage_boundary(n):
            roles[n] = n.meta[meta.STAGE_BOUNDARY].stage
            continue
        block = outer_block(n)
        if block in block_stage:
            stage = block_stage[block]
            if POST in inputs or (stages and max(stages) > stage):
                raise ValueError(
                    f"node {n.name} of block {block} (stage {stage}) reads a value of a later stage; "
                    "the blocks do not run in graph order, so they cannot be pipelined"
                )
            roles[n] = stage
        elif POST in inputs or (stages and i > last_block):
            roles[n] = POST
        elif stages:
            roles[n] = max(stages)
        else:
            roles[n] = PRE
    return roles


def _stable_toposort(graph: torch.fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the current order otherwise."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    if all(position[a] < position[n] for n in nodes for a in n.all_input_nodes):
        return
    import heapq

    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(position[n], n.name) for n in nodes if pending[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        n = by_name[name]
        order.append(n)
        for user in n.users:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, (position[user], user.name))
    assert len(order) == len(nodes), "graph has a cycle"
    cursor = nodes[0]
    for n in order[1:]:
        cursor.append(n)
        cursor = n


# -- the pass ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageSplit:
    """Mark pipeline stage boundaries between blocks, balanced by estimated or measured cost."""

    name: ClassVar[str] = "stage_split"
    tier: ClassVar[str] = "exact"

    stages: int
    """Number of pipeline stages (the mesh's pipefusion degree)."""
    balance: Literal["flops", "measured"] = "flops"
    """Cost model: FLOPs from meta shapes, or wall time measured on random inputs."""

    def plan(self, gm: torch.fx.GraphModule) -> tuple[list[Block], list[range], list[float]]:
        """The blocks, the block range of each stage, and each block's cost."""
        blocks = find_blocks(gm.graph)
        if len(blocks) < self.stages:
            raise ValueError(
                f"pipefusion={self.stages} needs at least {self.stages} transformer blocks, but the graph has "
                f"{len(blocks)} ({', '.join(b.name for b in blocks) or 'none'}): use pipefusion <= {max(1, len(blocks))}"
            )
        if self.balance == "measured":
            costs = measure_block_seconds(gm, blocks)
        elif self.balance == "flops":
            costs = [float(b.flops) for b in blocks]
        else:
            raise ValueError(f"balance={self.balance!r}: choose 'flops' or 'measured'")
        return blocks, balance_stages(costs, self.stages), costs

    def rewrite_boundary(self, graph: torch.fx.Graph, stage: int, block_stage: dict[str, int]) -> int:
        """Route every value crossing into ``stage`` through a new marker; returns their count."""
        roles = assign_roles(graph, block_stage)
        crossing = [
            n
            for n, role in roles.items()
            if isinstance(role, int) and role < stage and n.op != "output"
            and isinstance(n.meta.get("val"), torch.Tensor)
            and any(roles[u] == POST or (isinstance(roles[u], int) and roles[u] >= stage) for u in n.users)
        ]
        assert crossing, f"no activation crosses into stage {stage}"
        last = max(crossing, key=list(graph.nodes).index)
        with graph.inserting_after(last):
            marker = insert_call(graph, stage_boundary_op(), (crossing, stage), created_by=self.name)
        marker.meta[meta.STAGE_BOUNDARY] = StageMark(
            stage, tuple(b for b, s in block_stage.items() if s == stage)
        )
        outputs = []
        with graph.inserting_after(marker):
            for i, value in enumerate(crossing):
                out = graph.call_function(operator.getitem, (marker, i))
                out.meta["val"] = marker.meta["val"][i]
                out.meta[meta.CREATED_BY] = self.name
                outputs.append(out)
        for value, out in zip(crossing, outputs):
            value.replace_all_uses_with(
                out, delete_user_cb=lambda u: u is not marker and (roles.get(u) == POST or (isinstance(roles.get(u), int) and roles[u] >= stage))
            )
        _stable_toposort(graph)
        return len(crossing)

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.stages <= 1:
            return PassResult(gm=gm, modified=False, stats={})
        blocks, ranges, costs = self.plan(gm)
        block_stage = {blocks[i].name: s for s, r in enumerate(ranges) for i in r}
        crossing = [self.rewrite_boundary(gm.graph, s, block_stage) for s in range(1, self.stages)]
        total = sum(costs) or 1.0
        unit = "flops" if self.balance == "flops" else "time"
        stage_ranges = " ".join(
            f"{s}:[{blocks[r[0]].name}..{blocks[r[-1]].name}]={sum(costs[i] for i in r) / total:.0%}"
            for s, r in enumerate(ranges)
        )
        node_block = {name: b.name for b in blocks for name in b.nodes}
        per_site = {}
        for n in gm.graph.nodes:
            site = n.meta.get(meta.SITE)
            if site is not None and n.name in node_block:
                per_site[site.name] = f"stage {block_stage[node_block[n.name]]}"
        stats = {
            "stages": self.stages,
            "blocks": len(blocks),
            f"ranges({unit})": stage_ranges,
            "boundary_values": "/".join(str(c) for c in crossing),
            "per_site": per_site,
        }
        return PassResult(gm=gm, modified=True, stats=stats)


# -- reading the markers back ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Boundary:
    """One marker: the values leaving stage ``stage - 1`` and arriving in ``stage``."""

    stage: int
    """The stage this boundary starts."""
    sent: tuple[str, ...]
    """Node names of the values the previous stage sends (the marker's inputs)."""
    received: tuple[str, ...]
    """Node names of the same values in the receiving stage (the marker's outputs)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageLayout:
    """A marked graph cut into prologue, stages and epilogue."""

    stages: int
    """Number of stages."""
    roles: dict[str, Role]
    """Node name -> ``PRE``, stage index or ``POST``."""
    blocks: tuple[tuple[str, ...], ...]
    """Block names of each stage."""
    boundaries: tuple[Boundary, ...]
    """Boundary into stage 1, 2, ... (one fewer than stages)."""

    def nodes(self, graph: torch.fx.Graph, role: Role) -> list[torch.fx.Node]:
        return [
            n for n in graph.nodes
            if self.roles[n.name] == role and n.op == "call_function" and not is_stage_boundary(n)
        ]


def split_stages(gm: torch.fx.GraphModule) -> StageLayout:
    """Roles of the nodes of a graph marked by ``StageSplit``."""
    graph = gm.graph
    markers = [n for n in graph.nodes if is_stage_boundary(n)]
    stages = len(markers) + 1
    block_stage = {b.name: 0 for b in find_blocks(graph)}
    for m in markers:
        mark = m.meta[meta.STAGE_BOUNDARY]
        block_stage.update({b: mark.stage for b in mark.blocks})
    roles = assign_roles(graph, block_stage)
    boundaries = []
    for m in sorted(markers, key=lambda m: m.meta[meta.STAGE_BOUNDARY].stage):
        received = {u.args[1]: u.name for u in m.users}
        boundaries.append(
            Boundary(
                stage=m.meta[meta.STAGE_BOUNDARY].stage,
                sent=tuple(v.name for v in m.args[0]),
                received=tuple(received[i] for i in range(len(m.args[0]))),
            )
        )
    stage_blocks = tuple(tuple(b for b, s in block_stage.items() if s == k) for k in range(stages))
    return StageLayout(
        stages=stages,
        roles={n.name: r for n, r in roles.items()},
        blocks=stage_blocks,
        boundaries=tuple(boundaries),
    )


def extract_graph(
    gm: torch.fx.GraphModule,
    nodes: Iterable[torch.fx.Node],
    inputs: Sequence[torch.fx.Node],
    outputs: Sequence[torch.fx.Node],
) -> torch.fx.GraphModule:
    """``nodes`` as a standalone ``GraphModule(*inputs) -> tuple(outputs)``.

    Placeholders keep the input nodes' names and metadata; parameters read by ``nodes`` are
    carried over as ``get_attr`` (sharing storage with ``gm``), nothing else is. Export's
    dtype assertions are left out: as side effects they would keep their inputs (and those
    inputs' parameters) alive on ranks that need nothing else of them.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for value in inputs:
        p = graph.placeholder(value.name)
        p.meta = dict(value.meta)
        env[value] = p
    wanted = [n for n in nodes if n.target is not aten._assert_tensor_metadata.default]
    for n in wanted:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = graph.node_copy(a)
        missing = [a.name for a in n.all_input_nodes if a not in env]
        assert not missing, f"{n.name} reads {missing}, which are neither inputs nor extracted"
        env[n] = graph.node_copy(n, lambda a: env[a])
    for value in outputs:
        if value not in env and value.op == "get_attr":
            env[value] = graph.node_copy(value)
    graph.output(tuple(env[v] for v in outputs))
    eliminate_dead_code(graph)
    return graph_module_like(gm, graph)


def parameter_bytes(gm: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers a module holds."""
    seen = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    # get_attr tensors that are neither parameters nor buffers (constants)
    for value in vars(gm).values():
        if isinstance(value, torch.Tensor):
            seen.setdefault(value.data_ptr(), value.numel() * value.element_size())
    return sum(seen.values())
