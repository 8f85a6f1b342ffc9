"""Running a rewritten graph: eagerly with no per-call overhead, or through Inductor.

``compile_graph(gm, device)`` returns a callable with the graph's own call convention. The
default (``enabled=None``) compiles on CUDA only: on the CPU, Inductor's C++ kernels take
longer to build than the few steps of a test run save. ``vdopt.optimize(..., compile=False)``
opts out everywhere, ``compile=True`` opts in on the CPU too.

Uncompiled, a graph runs as an ``EagerGraph``: the same ATen ops as the model's own eager
forward, without what a ``GraphModule`` call adds on top of them (each parameter fetched
through ``nn.Module.__getattr__`` of every module on its path, the export module's input
check hooks and the pytree flattening its codegen does). On a small model those were about
a fifth of the call.

Compilation happens on the first call of each graph (the inputs of that call are the example
inputs) and is reused by every later call; its time is measured, shown with a progress bar
and reported by ``compile_summary``.
"""

from __future__ import annotations

import logging
import operator
import time
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
from torch.utils import _pytree as pytree

from vdopt.progress import progress

log = logging.getLogger(__name__)


def should_compile(enabled: bool | None, device: torch.device | str) -> bool:
    """Resolve the ``compile`` option: ``None`` means compile on CUDA only."""
    if enabled is None:
        return torch.device(device).type == "cuda"
    if not isinstance(enabled, bool):
        raise ValueError(f"compile={enabled!r}: use True, False or None (None = compile on CUDA only)")
    return enabled


class EagerGraph:
    """``gm`` run eagerly as a plain function of its inputs and its constants, bound once.

    The call convention is the graph's (like ``CompiledGraph``). Every ``get_attr`` becomes
    a trailing input whose value (the parameter, buffer or constant ``gm`` holds) is looked
    up once here, so a call runs only the graph's ops. The graph is read once: a graph
    changed after this is built is not seen (programs never change theirs).
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        """The graph (what ``opt.save`` exports)."""
        graph = torch.fx.Graph()
        value_map: dict[torch.fx.Node, torch.fx.Node] = {}
        output = graph.graph_copy(gm.graph, value_map)
        graph.output(output)
        for node in list(graph.find_nodes(op="call_module", target=GUARDS_FN)):
            if not node.users:
                graph.erase_node(node)
        constants: list[Any] = []
        inputs = list(graph.find_nodes(op="placeholder"))

        def bind(value: Any, name: str) -> torch.fx.Node:
            """A new trailing input of the graph, ``value`` on every call."""
            if inputs:
                where = graph.inserting_after(inputs[-1])
            else:
                where = graph.inserting_before(next(iter(graph.nodes)))
            with where:
                inputs.append(graph.placeholder(f"_{name}_{len(constants)}"))
            constants.append(value)
            return inputs[-1]

        for node in [n for n in graph.nodes if n.op in ("get_attr", "call_module")]:
            value = bind(operator.attrgetter(node.target)(gm), "const")
            value.meta = dict(node.meta)
            if node.op == "call_module":
                with graph.inserting_before(node):
                    value = graph.call_function(_call_module, (value, *node.args), node.kwargs)
                value.meta = node.meta
            node.replace_all_uses_with(value)
            graph.erase_node(node)
        # Each ATen op is called through its C++ entry point (``OpOverload._op``, bound once
        # like the parameters) rather than ``OpOverload.__call__``, a Python frame that only
        # forwards to it: about a microsecond per op, a tenth of a small model's call.
        ops: dict[torch._ops.OpOverload, torch.fx.Node] = {}
        for node in [n for n in graph.nodes if n.op == "call_function"]:
            if type(node.target) is torch._ops.OpOverload:
                if node.target not in ops:
                    ops[node.target] = bind(node.target._op, "op")
                node.args = (ops[node.target], *node.args)
                node.target = operator.call
        self._constants = tuple(constants)
        flat = torch.fx.GraphModule(torch.nn.Module(), graph, class_name="EagerGraph")
        # the generated function itself: no nn.Module __call__ (hooks) around it
        self._forward = flat.forward
        info = getattr(gm.graph._codegen, "pytree_info", None)
        self._in_spec = info.in_spec if info is not None else None
        self._out_spec = info.out_spec if info is not None else None
        self._keys = kwargs_leaf_names(self._in_spec)
        self._flat_output = is_flat_tuple(self._out_spec)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._in_spec is None:
            if kwargs:  # a flat graph called by argument names: GraphModule's own binding
                return self.gm(*args, **kwargs)
            return self._forward(*args, *self._constants)
        if self._keys is not None and not args:
            leaves = [kwargs[k] for k in self._keys]
        else:
            leaves = fx_pytree.tree_flatten_spec((list(args), kwargs), self._in_spec)
        out = self._forward(*leaves, *self._constants)
        if self._flat_output:
            return tuple(out)
        return pytree.tree_unflatten(list(out), self._out_spec)

    def __repr__(self) -> str:
        return f"EagerGraph({len(self.gm.graph.nodes)} nodes, {len(self._constants)} constants)"


GUARDS_FN = "_guards_fn"
"""The submodule ``ExportedProgram.module()`` calls first to check the input shapes against
those it was exported for. ``EagerGraph`` leaves the call out: every graph of a plan runs
only on calls of the input signature it was captured for (``Executable`` keys plans by
shapes, dtypes and non-tensor values)."""


def _call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def kwargs_leaf_names(spec: pytree.TreeSpec | None) -> tuple[str, ...] | None:
    """The keyword names of a ``((), {name: leaf, ...})`` input spec; None for other specs."""
    if spec is None or spec.type is not tuple or spec.num_children != 2:
        return None
    args, kwargs = spec.children()
    if args.num_children != 0 or kwargs.type is not dict or not all(c.is_leaf() for c in kwargs.children()):
        return None
    return tuple(kwargs.context)


def is_flat_tuple(spec: pytree.TreeSpec | None) -> bool:
    """Whether an output spec is a plain tuple of leaves."""
    return spec is not None and spec.type is tuple and all(c.is_leaf() for c in spec.children())


class CompiledGraph:
    """A graph compiled by Inductor on its first call, then reused.

    The call convention is the graph's: a graph with pytree codegen (``ep.module()``) is
    called like the model, a flat graph with its flat inputs.
    """

    def __init__(self, gm: torch.fx.GraphModule, device: torch.device, name: str = "graph") -> None:
        self.gm = gm
        """The graph before compilation (what ``opt.save`` exports)."""
        self.device = torch.device(device)
        self.name = name
        self.compile_s: float | None = None
        """Seconds the first call took (tracing, Inductor codegen, kernel builds, one run)."""
        # fullgraph: a vdopt graph is already one ATen graph, a graph break would be a bug.
        # dynamic=False: a plan is specialized to one input signature anyway.
        self._compiled = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compile_s is not None:
            return self._compiled(*args, **kwargs)
        start = time.perf_counter()
        with progress(1, f"vdopt compile {self.name}") as bar:
            out = self._compiled(*args, **kwargs)
            bar.update(1)
        self.compile_s = time.perf_counter() - start
        log.info("compiled %s with Inductor in %.1f s", self.name, self.compile_s)
        return out

    def __repr__(self) -> str:
        state = "not compiled yet" if self.compile_s is None else f"compiled in {self.compile_s:.1f} s"
        return f"CompiledGraph({self.name}, {self.device}, {state})"


def compile_graph(
    gm: torch.fx.GraphModule,
    device: torch.device | str,
    *,
    enabled: bool | None = None,
    name: str = "graph",
) -> Callable[..., Any]:
    """``gm`` compiled with Inductor when ``should_compile(enabled, device)``, else run eagerly
    (``EagerGraph``).

    The result has ``gm``'s call convention; ``original_graph(result)`` gives ``gm`` back.
    """
    if not should_compile(enabled, device):
        return EagerGraph(gm)
    return CompiledGraph(gm, torch.device(device), name=name)


def original_graph(runner: Callable[..., Any]) -> Any:
    """The graph behind a runner made by ``compile_graph`` (the runner itself otherwise)."""
    return runner.gm if isinstance(runner, (CompiledGraph, EagerGraph)) else runner


def compile_summary(runners: Iterable[Callable[..., Any]]) -> dict[str, str]:
    """Report line for the compiled runners among ``runners`` (empty when none is)."""
    compiled = [r for r in runners if isinstance(r, CompiledGraph)]
    if not compiled:
        return {}
    done = [r for r in compiled if r.compile_s is not None]
    parts = [f"{r.name} {r.compile_s:.1f} s" for r in done]
    pending = len(compiled) - len(done)
    if pending:
        parts.append(f"{pending} not called yet")
    total = sum(r.compile_s for r in done)
    return {"compiled": f"Inductor, first calls {total:.1f} s (" + ", ".join(parts) + ")"}
