"""Sequence-parallel training: run a rewritten graph with autograd, gradients as on one device.

What a rank computes, and why its gradients come out right:

* Every rank receives the full inputs and returns the full outputs, as in inference, and the
  caller computes **the same loss on every rank** from those full outputs, then calls
  ``backward()``. Every collective in the graph has its exact adjoint as its backward
  (all-gather <-> reduce-scatter, all-to-all <-> the reverse all-to-all, ring attention's
  K/V pass <-> a second ring pass that carries dK/dV back to their owners), so the backward
  pass of the P ranks together differentiates the sum of their P identical losses: the sum over
  ranks of each rank's parameter gradient is P times the single-device gradient.
* So each parameter's gradient is summed over the ranks and divided by P once it is complete
  (``_AverageGradients``, one all-reduce of all gradients together at the end of the
  backward pass). Afterwards ``p.grad`` on every rank equals the single-device gradient, and
  an optimizer stepping on every rank keeps the replicas identical; no DDP wrapper is needed
  (do not add one: it would average a second time).
* The parameters are the model's own (``torch.export`` keeps them by reference), reached
  through ``torch.func.functional_call`` so the averaging sits between them and the graph
  without touching the model.
* ``checkpoint_blocks``: each transformer block's nodes (the blocks that hold an attention
  site, as analysis tagged them) run under non-reentrant ``torch.utils.checkpoint``: their
  activations are recomputed in the backward pass, collectives included (every rank
  recomputes the same blocks in the same order, so the collectives still pair up).

Gradients of the inputs are not averaged: each rank's input gradient is its own share.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from vdopt import meta
from vdopt.runtime.failures import Step, graph_step


class _AverageGradients(torch.autograd.Function):
    """Identity on the parameters; in backward, their gradients averaged over all ranks."""

    @staticmethod
    def forward(ctx, world: int, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.world = world
        ctx.set_materialize_grads(False)
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        # Every rank runs the same graph, so the same parameters have gradients everywhere.
        present = [g for g in grads if g is not None]
        if ctx.world > 1 and present:
            flat = torch.cat([g.reshape(-1).float() for g in present])
            dist.all_reduce(flat)
            flat /= ctx.world
            out, offset = [], 0
            for g in grads:
                if g is None:
                    out.append(None)
                    continue
                out.append(flat[offset: offset + g.numel()].view_as(g).to(g.dtype))
                offset += g.numel()
            grads = tuple(out)
        return (None, *grads)


@dataclasses.dataclass
class _Segment:
    """Consecutive nodes of one block (or of none), run together."""

    block: str | None
    nodes: list[torch.fx.Node]
    inputs: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    outputs: list[torch.fx.Node] = dataclasses.field(default_factory=list)


def segments(graph: torch.fx.Graph, blocks: frozenset[str]) -> list[_Segment]:
    """The graph's computing nodes cut where the block changes; blocks outside ``blocks`` count
    as none. Each segment lists the values it reads from before and the values read after it."""
    out: list[_Segment] = []
    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        block = n.meta.get(meta.BLOCK)
        block = block if block in blocks else None
        if not out or out[-1].block != block:
            out.append(_Segment(block, []))
        out[-1].nodes.append(n)
    for seg in out:
        inside = set(seg.nodes)
        seg.inputs = list(dict.fromkeys(a for n in seg.nodes for a in n.all_input_nodes if a not in inside))
        seg.outputs = [n for n in seg.nodes if any(u not in inside for u in n.users)]
    return out


class GraphRunner(torch.nn.Module):
    """Runs ``gm`` on flat inputs node by node, block segments optionally checkpointed."""

    def __init__(self, gm: torch.fx.GraphModule, checkpoint_blocks: frozenset[str]) -> None:
        super().__init__()
        self.gm = gm
        self.segments = segments(gm.graph, checkpoint_blocks)
        self.checkpointed = checkpoint_blocks
        nodes = list(gm.graph.nodes)
        self._placeholders = [n for n in nodes if n.op == "placeholder"]
        self._attrs = [n for n in nodes if n.op == "get_attr"]
        self._output = nodes[-1]
        # after which segment each value is read for the last time (to free it early)
        last: dict[torch.fx.Node, int] = {}
        for i, seg in enumerate(self.segments):
            for a in seg.inputs:
                last[a] = i
        self._free_after = [[a for a, i in last.items() if i == k] for k in range(len(self.segments))]
        self._keep = set(self._output.all_input_nodes)

    def _run_segment(self, seg: _Segment, *values: Any) -> tuple[Any, ...]:
        interp = torch.fx.Interpreter(self.gm, garbage_collect_values=False)
        interp.env = dict(zip(seg.inputs, values))
        for n in seg.nodes:
            interp.env[n] = interp.run_node(n)
        return tuple(interp.env[o] for o in seg.outputs)

    def forward(self, *flat: Any) -> Any:
        env: dict[torch.fx.Node, Any] = dict(zip(self._placeholders, flat))
        for n in self._attrs:
            target = self.gm
            for part in str(n.target).split("."):
                target = getattr(target, part)
            env[n] = target
        for k, seg in enumerate(self.segments):
            values = [env[a] for a in seg.inputs]
            if seg.block is not None and torch.is_grad_enabled():
                outs = checkpoint(self._run_segment, seg, *values, use_reentrant=False)
            else:
                outs = self._run_segment(seg, *values)
            env.update(zip(seg.outputs, outs))
            for a in self._free_after[k]:
                if a not in self._keep and a.op != "get_attr":
                    env.pop(a, None)
        return torch.fx.node.map_arg(self._output.args[0], env.__getitem__)


class TrainingProgram:
    """The program of ``optimize(..., training=True)``: one graph run with autograd."""

    def __init__(self, gm: torch.fx.GraphModule, *, world: int, checkpoint_blocks: frozenset[str] = frozenset()) -> None:
        """``world``: ranks that hold a replica of the parameters (the mesh size);
        ``checkpoint_blocks``: blocks whose activations are recomputed in backward."""
        self.gm = gm
        self.world = world
        self.runner = GraphRunner(gm, checkpoint_blocks)
        self.step: Step = graph_step("graph main (training)", gm)
        """What the program runs (for errors raised during a call)."""
        self._params = [(f"gm.{name}", p) for name, p in gm.named_parameters() if p.requires_grad]

    def __call__(self, inputs: dict[str, Any]) -> Any:
        flat = tree_flatten_spec(((), inputs), self.gm._in_spec)
        names = [name for name, _ in self._params]
        tensors = [p for _, p in self._params]
        if torch.is_grad_enabled() and tensors:
            tensors = _AverageGradients.apply(self.world, *tensors)
        out = torch.func.functional_call(self.runner, dict(zip(names, tensors)), tuple(flat), strict=False)
        return pytree.tree_unflatten(list(out) if isinstance(out, (list, tuple)) else [out], self.gm._out_spec)

    def reset(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {"training": True, "checkpointed blocks": len(self.runner.checkpointed)}


def training_program(gm: torch.fx.GraphModule, ctx, *, checkpoint_blocks: bool) -> TrainingProgram:
    """The training program of a rewritten graph; blocks are those that hold an attention site."""
    blocks = frozenset(s.block for s in ctx.sites if s.block is not None) if checkpoint_blocks else frozenset()
    return TrainingProgram(gm, world=ctx.mesh.size, checkpoint_blocks=blocks)
