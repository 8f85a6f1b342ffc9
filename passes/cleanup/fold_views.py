"""Fold chains of layout ops: view/reshape of a view/reshape, permute of a permute.

Export leaves many of these around attention (heads split, transposed, merged back).
Folding them is exact: no value changes, fewer nodes for every later pass to look through.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.graph_utils import eliminate_dead_code, insert_call

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_PERMUTES = {aten.permute.default}


def _is(node, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def find_identity_views(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Reshapes to the input's own shape and permutes by the identity order."""
    found = []
    for n in graph.nodes:
        if _is(n, _RESHAPES) and _shape(n) == _shape(n.args[0]):
            found.append(n)
        elif _is(n, _PERMUTES) and list(n.args[1]) == list(range(len(n.args[1]))):
            found.append(n)
    return found


def find_view_chains(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Reshapes of reshapes and permutes of permutes (the outer node of each pair)."""
    return [
        n
        for n in graph.nodes
        if (_is(n, _RESHAPES) and _is(n.args[0], _RESHAPES))
        or (_is(n, _PERMUTES) and _is(n.args[0], _PERMUTES))
    ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FoldViews:
    """Remove identity reshapes/permutes and fold chains of them into one op."""

    name: ClassVar[str] = "fold_views"
    tier: ClassVar[str] = "exact"

    def rewrite_identity(self, node: torch.fx.Node) -> None:
        node.replace_all_uses_with(node.args[0])

    def rewrite_chain(self, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        inner = node.args[0]
        with graph.inserting_before(node):
            if node.target in _PERMUTES:
                order = [inner.args[1][i] for i in node.args[1]]
                new = insert_call(graph, aten.permute.default, (inner.args[0], order), created_by=self.name, like=node)
            else:
                # reshape, not view: the folded op must also accept inputs the first view copied
                new = insert_call(graph, aten.reshape.default, (inner.args[0], list(_shape(node))), created_by=self.name, like=node)
        node.replace_all_uses_with(new)

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        chains = find_view_chains(graph)
        for node in chains:
            self.rewrite_chain(graph, node)
        eliminate_dead_code(graph)
        identities = find_identity_views(graph)
        for node in identities:
            self.rewrite_identity(node)
        eliminate_dead_code(graph)
        stats = {"folded_chains": len(chains), "removed_identities": len(identities)}
        return PassResult(gm=gm, modified=bool(chains or identities), stats=stats)
