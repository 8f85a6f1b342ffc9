"""The patch-parallel pass: every rank computes its slab of rows of the image.

``find_cut_input`` picks the input whose height is cut (the first image- or video-shaped
input; height is its second-to-last dim) and ``find_spatial_sites`` the ops that mix rows
(convolutions, padding, norms, resampling, attention). The rewrite then builds each rank's
graph node by node, following the cut axis through every op with the dimension core's op
table (``dims.rules``): ops that keep rows apart run on the slab unchanged (with their literal
sizes recomputed), the ops of ``spatial_ops`` exchange exactly the rows they need, and any
other op that mixes rows gets its inputs gathered whole (correct for ops nobody wrote a rule
for, at the cost of memory), with its output cut again where it meets the slab. Outputs are
gathered, so every rank returns the full image like the unoptimized model.

Caches of chunked causal decoders (the cached last frames of each causal convolution) are
values of the unrolled graph like any other, so they hold the rank's rows only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
from typing import Any, ClassVar

import torch
import torch.fx
from torch.utils import _pytree as pytree

from vdopt.collectives import comm_stats, communication
from vdopt.mesh import AxisGroup
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.dims.emit import Emitter, resized
from vdopt.passes.dims.rules import DimOp, dim_map, first_input, op_rule, shape_of
from vdopt.passes.graph_utils import eliminate_dead_code, fake_mode_of
from vdopt.passes.patch_parallel import exchange, spatial_ops
from vdopt.passes.patch_parallel.slab import Slab, balanced_bounds, check_nonempty, reshape_slab

aten = torch.ops.aten
log = logging.getLogger(__name__)

SPATIAL_OPS = {
    aten.conv1d.default: ("conv", spatial_ops.convolution),
    aten.conv2d.default: ("conv", spatial_ops.convolution),
    aten.conv3d.default: ("conv", spatial_ops.convolution),
    aten.pad.default: ("pad", spatial_ops.padding),
    aten.constant_pad_nd.default: ("pad", spatial_ops.padding),
    aten.group_norm.default: ("norm", spatial_ops.group_norm),
    aten.upsample_nearest1d.vec: ("resample", spatial_ops.nearest),
    aten.upsample_nearest2d.vec: ("resample", spatial_ops.nearest),
    aten.upsample_nearest3d.vec: ("resample", spatial_ops.nearest),
    aten._upsample_nearest_exact1d.vec: ("resample", spatial_ops.nearest),
    aten._upsample_nearest_exact2d.vec: ("resample", spatial_ops.nearest),
    aten._upsample_nearest_exact3d.vec: ("resample", spatial_ops.nearest),
    aten.scaled_dot_product_attention.default: ("attention", spatial_ops.attention),
}
"""Ops with a row-exchanging rewrite, and the kind each is counted as."""


@dataclasses.dataclass(frozen=True)
class SpatialSite:
    node: torch.fx.Node
    """An op that mixes values across rows."""
    kind: str
    """``conv``, ``pad``, ``norm``, ``resample`` or ``attention``."""


def find_cut_input(graph: torch.fx.Graph) -> tuple[torch.fx.Node, int]:
    """The input whose height is cut, and that dim: the first input of rank 4 or more."""
    for node in graph.nodes:
        if node.op == "placeholder" and len(shape_of(node) or ()) >= 4:
            return node, len(shape_of(node)) - 2
    raise ValueError("patch parallel needs an image or video input (rank 4 or 5, height second to last)")


def find_spatial_sites(graph: torch.fx.Graph) -> list[SpatialSite]:
    """The ops of ``graph`` that ``spatial_ops`` rewrites, in graph order."""
    return [SpatialSite(node=n, kind=SPATIAL_OPS[n.target][0])
            for n in graph.nodes if n.op == "call_function" and n.target in SPATIAL_OPS]


def _tensor_nodes(args: Any) -> list[torch.fx.Node]:
    return [a for a in pytree.tree_leaves(args)
            if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]


class _Rewriter:
    """Builds one rank's graph from the original, node by node (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, group: AxisGroup, name: str) -> None:
        self.old = gm.graph
        self.graph = torch.fx.Graph()
        self.graph._codegen = copy.deepcopy(self.old._codegen)
        self.em = Emitter(self.graph, name, fake_mode=fake_mode_of(self.old))
        self.group = group
        self.env: dict[torch.fx.Node, Any] = {}
        self.slabs: dict[torch.fx.Node, Any] = {}
        self.whole: dict[torch.fx.Node, torch.fx.Node] = {}
        self.counts: dict[str, int] = {"gathered_ops": 0}

    # -- values -------------------------------------------------------------------------
    def slab_of(self, node: Any) -> Slab | None:
        slab = self.slabs.get(node) if isinstance(node, torch.fx.Node) else None
        return slab if isinstance(slab, Slab) else None

    def value(self, node: torch.fx.Node) -> torch.fx.Node:
        return self.env[node]

    def map_args(self, args: Any) -> Any:
        return torch.fx.node.map_arg(args, lambda n: self.env[n])

    def full(self, node: torch.fx.Node) -> torch.fx.Node:
        """``node``'s whole tensor (gathered once, where it is cut)."""
        slab = self.slab_of(node)
        if slab is None:
            return self.env[node]
        if node not in self.whole:
            self.whole[node] = exchange.gather(self.em, self.env[node], slab, self.group, f"gather {node.name}")
        return self.whole[node]

    def aligned(self, node: torch.fx.Node, dim: int, slab: Slab) -> torch.fx.Node | None:
        """``node`` cut like ``slab`` at its ``dim`` (None: it cannot be)."""
        own = self.slab_of(node)
        if own is not None and own.dim == dim and own.same_rows(slab):
            return self.env[node]
        size = shape_of(node)[dim]
        if size == 1 and own is None:
            return self.env[node]
        if size != slab.outer * slab.size * slab.inner:
            return None
        return exchange.take(self.em, self.full(node), slab.moved(dim))

    # -- the walk -------------------------------------------------------------------------
    def run(self, cut: torch.fx.Node, dim: int, bounds: tuple[int, ...]) -> torch.fx.GraphModule:
        for node in self.old.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.target)
                new.meta = dict(node.meta)
                self.env[node] = new
                if node is cut:
                    slab = Slab(dim=dim, outer=1, inner=1, bounds=bounds, rank=self.group.rank)
                    self.whole[node] = new
                    self.env[node] = exchange.take(self.em, new, slab)
                    self.slabs[node] = slab
            elif node.op == "get_attr":
                new = self.graph.get_attr(node.target)
                new.meta = dict(node.meta)
                self.env[node] = new
            elif node.op == "call_module":  # export's input guards: they check the whole inputs
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), self.full)
                new = self.graph.call_module(node.target, args, kwargs)
                new.meta = dict(node.meta)
                self.env[node] = new
            elif node.op == "output":
                out = torch.fx.node.map_arg(node.args[0], self.full)
                self.graph.output(out).meta = dict(node.meta)
            else:
                self.call(node)
        return self.graph

    def call(self, node: torch.fx.Node) -> None:
        cut = [a for a in _tensor_nodes((node.args, node.kwargs)) if self.slab_of(a) is not None]
        if node.target is operator.getitem and isinstance(self.slabs.get(node.args[0]), list):
            self.slabs[node] = self.slabs[node.args[0]][node.args[1]]
            self.env[node] = self.em.copy(node, operator.getitem, (self.env[node.args[0]], node.args[1]), {})
            return
        if not cut:
            self.env[node] = self.em.copy(node, node.target, self.map_args(node.args), self.map_args(node.kwargs))
            self.slabs[node] = None
            return
        if node.target is aten._assert_tensor_metadata.default:
            self.env[node] = None  # checks the whole tensor's metadata; a slab differs
            return
        rule = op_rule(node.target)
        if rule is not None and rule.kind is DimOp.NEW:  # reads only the dtype and device
            self.env[node] = self.em.copy(node, node.target, self.map_args(node.args), self.map_args(node.kwargs))
            self.slabs[node] = None
            return
        result = None
        if node.target in SPATIAL_OPS and self.slab_of(node.args[0]) is not None:
            result = SPATIAL_OPS[node.target][1](self, node)
            if result is not None:
                self.counts[SPATIAL_OPS[node.target][0]] = self.counts.get(SPATIAL_OPS[node.target][0], 0) + 1
        if result is None:
            result = self.keep_rows(node)
        if result is None:
            self.gather_all(node)
            return
        new, slab = result
        self.env[node] = new
        val = node.meta["val"]
        self.slabs[node] = [slab] * len(val) if isinstance(val, (list, tuple)) else slab
        self.check_shape(node, new, slab)

    def check_shape(self, node: torch.fx.Node, new: torch.fx.Node, slab: Slab) -> None:
        vals = node.meta["val"], new.meta["val"]
        pairs = zip(*vals) if isinstance(vals[0], (list, tuple)) else [vals]
        for old, local in pairs:
            want = slab.local_shape(old.shape)
            assert list(local.shape) == want, (node.format_node(), list(local.shape), want)

    def gather_all(self, node: torch.fx.Node) -> None:
        """Run ``node`` on whole tensors: for ops that mix rows without a rule."""
        self.counts["gathered_ops"] += 1
        log.debug("patch parallel: %s mixes rows without a rule: its inputs are gathered", node.format_node())
        mapping = {a: self.full(a) for a in _tensor_nodes((node.args, node.kwargs))}
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: mapping.get(n, self.env[n]))
        self.env[node] = self.em.copy(node, node.target, args[0], args[1])
        self.slabs[node] = None

    def keep_rows(self, node: torch.fx.Node) -> tuple[torch.fx.Node, Slab] | None:
        """Ops that keep rows apart: the slab moves with the op's dim map."""
        target = node.target
        rule = op_rule(target)
        x = first_input(node)
        slab = self.slab_of(x)
        if rule is None or slab is None:
            return self.movedim(node)
        if rule.kind is DimOp.RESHAPE and target not in (aten.unsqueeze.default, aten.squeeze.dim,
                                                          aten.squeeze.dims, aten.squeeze.default):
            out = reshape_slab(slab, shape_of(x), shape_of(node))
            if out is None:
                return None
            args = self.map_args(node.args)
            target, args, kwargs = resized(target, args, self.map_args(node.kwargs), out.local_shape(shape_of(node)))
            return self.em.copy(node, target, args, kwargs), out
        dm = dim_map(node)
        if dm is None or slab.dim in dm.mixed or dm.out[slab.dim] is None or dm.cut == slab.dim:
            return None
        out = slab.moved(dm.out[slab.dim])
        out_rank = len(shape_of(node) if isinstance(node.meta["val"], torch.Tensor) else shape_of(x))
        mapping: dict[torch.fx.Node, torch.fx.Node] = {}
        for a in _tensor_nodes((node.args, node.kwargs)):
            if a is x:
                continue
            if rule.kind in (DimOp.POINTWISE, DimOp.CAT, DimOp.STACK):
                dim = out.dim - (out_rank - len(shape_of(a))) if rule.kind is DimOp.POINTWISE else slab.dim
                if dim < 0:
                    continue
                local = self.aligned(a, dim, out)
                if local is None:
                    return None
                mapping[a] = local
            elif self.slab_of(a) is not None:
                mapping[a] = self.full(a)
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: mapping.get(n, self.env[n]))
        if rule.kind is DimOp.EXPAND:
            target, args, kwargs = resized(target, args, kwargs, out.local_shape(shape_of(node)))
        return self.em.copy(node, target, tuple(args), kwargs), out

    def movedim(self, node: torch.fx.Node) -> tuple[torch.fx.Node, Slab] | None:
        if node.target is not aten.movedim.int:
            return None
        x = node.args[0]
        rank = len(shape_of(x))
        order = list(range(rank))
        order.insert(node.args[2] % rank, order.pop(node.args[1] % rank))
        new = self.em.copy(node, node.target, self.map_args(node.args), self.map_args(node.kwargs))
        return new, self.slab_of(x).moved(order.index(self.slab_of(x).dim))


def _align(graph: torch.fx.Graph, cut: torch.fx.Node, dim: int) -> int:
    """Rows per partition unit: the model's spatial compression when the output is smaller
    (an encoder), so slabs of the input map to whole latent rows."""
    size = shape_of(cut)[dim]
    outs = [o for o in _tensor_nodes(next(n for n in graph.nodes if n.op == "output").args)
            if len(shape_of(o)) >= 2]
    if not outs:
        return 1
    out = shape_of(outs[0])[-2]
    return size // out if out < size and size % out == 0 else 1


@dataclasses.dataclass(frozen=True)
class PatchParallel:
    """Cut the image's height over every rank of ``group``; exchange only the rows needed."""

    name: ClassVar[str] = "patch_parallel"
    tier: ClassVar[str] = "exact"
    group: AxisGroup
    """The ranks that share the image (all ranks of the mesh)."""

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cut, dim = find_cut_input(gm.graph)
        sites = find_spatial_sites(gm.graph)
        size = shape_of(cut)[dim]
        bounds = balanced_bounds(size, self.group.size, align=_align(gm.graph, cut, dim))
        check_nonempty(bounds, f"input {cut.name} (height, dim {dim})")
        rewriter = _Rewriter(gm, self.group, self.name)
        graph = rewriter.run(cut, dim, bounds)
        new = torch.fx.GraphModule(gm, graph)
        eliminate_dead_code(new.graph)
        stats = {"sites": len(sites), **rewriter.counts, **comm_stats(communication(new)),
                 "rows": "/".join(str(b - a) for a, b in zip(bounds, bounds[1:]))}
        return PassResult(gm=new, modified=True, stats=stats)
