"""Run-time guards of a graph specialized on data-dependent values.

A model that branches on a tensor's value (``if x.sum() > 0``) or takes sizes from tensor
values (``mask.nonzero()``, ``n = mask.sum().item()``) is captured for the values of the call
that captured it (``vdopt.capture``): each such value becomes a constant of the graph, and
export records the assumption as an ``aten._assert_scalar`` node (``Eq(u0, 4)``).

``split_guards`` takes those assertions out of the graph and returns them as ``Guards``: a
small graph, the slice of the captured graph that computes the asserted conditions from the
call's inputs. The executable evaluates it on the full inputs before running a plan (every
rank gets the same inputs, so every rank decides the same), and captures again when a guard
fails, like ``torch.compile``. The graph handed to analysis and the passes is then free of
assertion nodes.

A graph captured with symbolic sizes (``capture_guarded(symbolic=True)``) keeps its
data-dependent sizes as unbacked symbols; its assertions are the decisions the trace took
with this call's values (``Ne(u0, 0)``: the selection was not empty), so the same ``Guards``
check a plan that serves every length they allow. ``Guards.symbols`` names those sizes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from vdopt.passes.graph_utils import ancestors

log = logging.getLogger(__name__)

aten = torch.ops.aten

# Nodes that only state facts about data-dependent values; they compute nothing the call needs.
_ASSERTIONS = {aten._assert_scalar.default}
_RANGE_FACTS = {aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default}


@dataclasses.dataclass(frozen=True)
class Guards:
    """The conditions a plan was specialized on, checked on each call's inputs."""

    gm: torch.fx.GraphModule
    """Takes the call's inputs (the captured graph's signature); returns one bool per condition."""
    conditions: tuple[str, ...]
    """Each condition as export states it (``Eq(u0, 4)``), for the report and errors."""
    symbols: tuple[str, ...] = ()
    """The data-dependent sizes the graph keeps symbolic, each with the op and model line that
    makes it; empty when every size is specialized to the capturing call's values."""
    why_specialized: str | None = None
    """Why the graph was specialized although symbolic sizes were asked for (the step that
    needed a concrete value, and of what); ``None`` if it was not asked or not needed."""

    def hold(self, inputs: dict[str, Any]) -> bool:
        """Whether the plan's specialization is valid for this call."""
        with torch.no_grad():
            values = self.gm(**inputs)
        return all(bool(v) for v in values)

    def describe(self) -> str:
        # export states ``u0 >= 4`` and ``u0 <= 4`` beside ``Eq(u0, 4)``: the equalities say it all
        decisive = [c for c in self.conditions if c.startswith(("Eq(", "Ne("))]
        return ", ".join(decisive or self.conditions)

    def report_line(self) -> str:
        """What the plan keeps symbolic or is specialized on, for ``opt.report()``."""
        checked = "checked on every call; captured again when they fail"
        if self.symbols:
            valid = f"; valid while {self.describe()}" if self.conditions else ""
            return f"symbolic sizes kept: {', '.join(self.symbols)}{valid} ({checked})"
        why = f"; {self.why_specialized}" if self.why_specialized else ""
        return f"specialized on data-dependent values: {self.describe()} ({checked}{why})"


def _condition_text(node: torch.fx.Node) -> str:
    """``Eq(u0, 4)`` out of export's message ``Runtime assertion failed for expression Eq(u0, 4) on node 'eq'``."""
    message = node.args[1] if len(node.args) > 1 else ""
    text = str(message)
    start = text.find("expression ")
    if start >= 0:
        text = text[start + len("expression "):]
        end = text.rfind(" on node")
        text = text[:end] if end >= 0 else text
    return text or node.args[0].name


def _guard_graph(gm: torch.fx.GraphModule, conditions: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """The slice of ``gm`` that computes ``conditions``, with ``gm``'s call signature."""
    needed = ancestors(conditions)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        # every placeholder stays: the pytree code of the signature binds all of them
        if n.op == "placeholder" or n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[c] for c in conditions))
    codegen = gm.graph._codegen
    if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):
        info = codegen.pytree_info
        out_spec = pytree.tree_flatten(tuple(range(len(conditions))))[1]
        graph._codegen = torch.fx.graph._PyTreeCodeGen(
            torch.fx.graph._PyTreeInfo(info.orig_args, info.in_spec, out_spec)
        )
    # GraphModule(root, graph) refers to root's parameters and buffers; it copies none.
    return torch.fx.GraphModule(gm, graph, class_name="Guards")


def _erase_with_dead_inputs(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase ``nodes``, then every call that fed only them (not a whole-graph DCE, which
    could drop export's own input-guard call)."""
    candidates: list[torch.fx.Node] = []
    erased: set[torch.fx.Node] = set()
    for n in nodes:
        candidates.extend(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
    while candidates:
        n = candidates.pop()
        if n not in erased and n.op == "call_function" and not n.users:
            candidates.extend(n.all_input_nodes)
            graph.erase_node(n)
            erased.add(n)


def split_guards(
    gm: torch.fx.GraphModule, *, symbols: tuple[str, ...] = (), why_specialized: str | None = None
) -> Guards | None:
    """Move the data-dependent assertions of ``gm`` into ``Guards`` (in place); ``None`` if
    there are none and ``gm`` keeps no symbolic size (``symbols``, named in the report).

    The nodes that computed only the assertions become dead and are removed, so passes never
    see ``_local_scalar_dense``-only chains or symbolic comparisons.
    """
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ASSERTIONS]
    if not asserts and not symbols:
        return None
    conditions = [a.args[0] for a in asserts]
    texts = tuple(dict.fromkeys(_condition_text(a) for a in asserts))
    guards = Guards(gm=_guard_graph(gm, conditions), conditions=texts, symbols=symbols,
                    why_specialized=why_specialized)
    if not symbols:
        facts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _RANGE_FACTS]
        _erase_with_dead_inputs(gm.graph, asserts + facts)
        gm.recompile()
    # else the graph keeps them: a compiler tracing it again (Inductor) needs the facts
    # (``Ne(u0, 0)``) to take the decisions the capture took; they cost a scalar check
    log.debug("graph specialized on %d data-dependent condition(s): %s", len(texts), guards.describe())
    return guards
