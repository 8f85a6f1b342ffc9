"""Specialize a graph for Pyramid Attention Broadcast: reused regions become cache inputs.

A *variant* is the graph specialized for one pattern of reused PAB kinds (regions come from
``vdopt.passes.pab.regions``):

* every region of a reused kind reads its outputs from new cache inputs; everything that
  only fed those outputs (projections, norms, attention, all-to-alls) is then dead code and
  is removed, so the variant really skips it;
* every region of a cached kind that is computed also returns its outputs, so the runtime
  can refill its cache.

Calling convention of a variant (flat, so it exports as is): ``variant(*input_leaves,
*cache_inputs) -> (*output_leaves, *cache_outputs)`` where the leaves are the captured
graph's flattened inputs and outputs (``flat_copy`` drops the pytree codegen).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from vdopt import meta
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.graph_utils import ancestors, is_level_call
from vdopt.passes.pab.regions import PABRegion, count_compute

aten = torch.ops.aten

CACHE_INPUT_PREFIX = "pab_cache_"
"""Name prefix of the placeholders a variant reads cached region outputs from."""
CACHE_KEY = "vdopt.pab_cache_key"
"""Metadata of a cache placeholder: the cache key (``PABRegion.cache_keys``) it reads."""


def flat_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` called with flat leaves and returning a flat tuple.

    Parameters, buffers and submodules are shared with ``gm`` (not copied); node metadata is
    copied so later passes still see sites and module scopes.
    """
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    return torch.fx.GraphModule(gm, graph, class_name="PABVariant")


def _output_node(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _output_values(graph: torch.fx.Graph) -> list:
    value = _output_node(graph).args[0]
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _removable_side_effect(node: torch.fx.Node) -> bool:
    """Ops DCE keeps by default that a reused region may drop: its collectives (every rank
    takes the same decision, so they stay matched) and export's metadata asserts."""
    target = node.target
    if target is aten._assert_tensor_metadata.default:
        return True
    namespace = getattr(target, "namespace", None)
    return namespace in ("_c10d_functional", "c10d_functional")


def eliminate_dead_regions(graph: torch.fx.Graph, cone: set[torch.fx.Node]) -> None:
    """Dead-code elimination that also drops collectives and asserts left dangling in ``cone``."""
    # Asserts and other sinks hanging off the cone have no users: they belong to it too.
    extended = set(cone)
    for n in graph.nodes:
        if not n.users and n.op == "call_function" and n.all_input_nodes and all(a in cone for a in n.all_input_nodes):
            extended.add(n)

    def is_impure(n: torch.fx.Node) -> bool:
        if n in extended and n.op == "call_function" and _removable_side_effect(n):
            return False
        return n.is_impure(impure_random=False) or is_level_call(n)

    graph.eliminate_dead_code(is_impure_node=is_impure)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachePoint:
    """One region output a variant touches."""

    key: str
    """Cache key (``<region>:<index>``)."""
    node: torch.fx.Node
    """The node computing the region output."""
    reused: bool
    """True: replaced by a cache input; False: also returned to refill the cache."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PABSpecialize:
    """Specialize a flat graph (see ``flat_copy``) for one pattern of reused PAB kinds."""

    name: ClassVar[str] = "pab_specialize"
    tier: ClassVar[str] = "approx"

    regions: tuple[PABRegion, ...]
    """Broadcastable regions of the graph (``find_pab_regions``)."""
    reuse: frozenset[str]
    """PAB kinds whose regions read their cache in this variant."""
    cache: frozenset[str]
    """PAB kinds whose computed regions also return their outputs for the cache."""

    def cache_inputs(self) -> tuple[str, ...]:
        """Cache keys the variant takes, in argument order."""
        return tuple(k for r in self.regions if r.kind in self.reuse for k in r.cache_keys())

    def cache_outputs(self) -> tuple[str, ...]:
        """Cache keys the variant returns after the model outputs, in order."""
        return tuple(
            k for r in self.regions if r.kind in self.cache and r.kind not in self.reuse for k in r.cache_keys()
        )

    def find_cache_points(self, graph: torch.fx.Graph) -> list[CachePoint]:
        """The region outputs this variant reads from the cache, then those it returns for it."""
        nodes = {n.name: n for n in graph.nodes}
        reused = [
            CachePoint(key=key, node=nodes[out], reused=True)
            for r in self.regions if r.kind in self.reuse
            for key, out in zip(r.cache_keys(), r.outputs)
        ]
        refilled = [
            CachePoint(key=key, node=nodes[out], reused=False)
            for r in self.regions if r.kind in self.cache and r.kind not in self.reuse
            for key, out in zip(r.cache_keys(), r.outputs)
        ]
        return reused + refilled

    def rewrite(self, graph: torch.fx.Graph, points: list[CachePoint]) -> list[torch.fx.Node]:
        """Route reused outputs through new cache inputs and return the refilled ones after the
        graph's outputs; returns the replaced nodes (the cones to drop)."""
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
        replaced = []
        for i, point in enumerate(p for p in points if p.reused):
            with graph.inserting_after(last_placeholder):
                cache = graph.placeholder(f"{CACHE_INPUT_PREFIX}{i}")
            last_placeholder = cache
            cache.meta["val"] = point.node.meta["val"]
            cache.meta[meta.CREATED_BY] = self.name
            cache.meta[CACHE_KEY] = point.key
            point.node.replace_all_uses_with(cache)
            replaced.append(point.node)
        refilled = tuple(p.node for p in points if not p.reused)
        _output_node(graph).args = (tuple(_output_values(graph)) + refilled,)
        return replaced

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        assert type(graph._codegen) is torch.fx.graph.CodeGen, "PABSpecialize needs a flat graph (flat_copy)"
        before = count_compute(graph)
        n_before = len(graph.nodes)
        points = self.find_cache_points(graph)
        replaced = self.rewrite(graph, points)
        eliminate_dead_regions(graph, ancestors(replaced))
        after = count_compute(graph)
        stats = {
            "reused_regions": sum(r.kind in self.reuse for r in self.regions),
            "cache_inputs": len(replaced),
            "cache_outputs": len(points) - len(replaced),
            "removed_nodes": n_before + len(replaced) - len(graph.nodes),
            **{f"removed_{k}": before[k] - after[k] for k in ("linear", "attention", "collective") if before[k] != after[k]},
        }
        return PassResult(gm=gm, modified=bool(points), stats=stats)
