"""Helpers every rewrite pass uses to create nodes that carry correct metadata."""

from __future__ import annotations

import contextlib
import contextvars
import operator
import warnings
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from vdopt import meta

# Deep-copying an exported graph copies the pytree specs of its call convention, which rebuilds
# each leaf through ``LeafSpec.__new__``; torch 2.13 marks that deprecated, so every deepcopy of
# any exported graph (Inductor's own, before it compiles, included) prints this FutureWarning
# from torch's code. vdopt never touches ``LeafSpec``.
_TORCH_LEAFSPEC_DEEPCOPY_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextlib.contextmanager
def copying_exported_graphs():
    """Ignore torch's own deprecation warning of a deep copy of an exported graph (only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_LEAFSPEC_DEEPCOPY_WARNING, category=FutureWarning)
        yield


def read_only(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` as a graph that is read, not run: its Python code is generated on first use.

    Every pass recompiles the graph it rewrote (``runner``), which generates and compiles
    its Python code: most of a rewrite's time on a small graph. The planner only reads its
    graphs (shapes and targets), so it builds them as torch's ``_LazyGraphModule``, whose
    ``recompile`` only marks the code stale; calling the module or reading ``code`` still
    generates it. Deep copies and ``graph_module_like`` keep the kind."""
    return _LazyGraphModule.from_graphmodule(gm)


def graph_module_like(root: torch.fx.GraphModule, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """``GraphModule(root, graph)``, read-only (``read_only``) where ``root`` is."""
    cls = _LazyGraphModule if isinstance(root, _LazyGraphModule) else torch.fx.GraphModule
    return cls(root, graph)


def fake_value(node_or_value: Any) -> Any:
    """The ``meta["val"]`` of a node (fake tensor or constant), or the value itself.

    A ``get_attr`` of a non-tensor (the functions and their specs that export keeps for
    ``flat_apply``, e.g. flex attention's ``score_mod``/``mask_mod``) has no ``val``: it is
    the attribute itself."""
    if isinstance(node_or_value, torch.fx.Node):
        node = node_or_value
        if "val" not in node.meta and node.op == "get_attr" and node.graph.owning_module is not None:
            return operator.attrgetter(node.target)(node.graph.owning_module)
        return node.meta["val"]
    return node_or_value


def fake_mode_of(graph: torch.fx.Graph):
    """The fake tensor mode of the graph's recorded values."""
    vals = [n.meta.get("val") for n in graph.nodes]
    mode = detect_fake_mode(tuple(v for v in vals if isinstance(v, torch.Tensor)))
    assert mode is not None, "graph has no fake tensor metadata; was it captured by vdopt?"
    return mode


_SHARED_VALUES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vdopt_shared_values", default=None)


@contextlib.contextmanager
def sharing_values(shared: dict) -> Iterator[None]:
    """Within: ``propagate_value`` gives an op the value it gave before to the same op on
    arguments of the same metadata (shapes, strides, dtypes, constants): the same object,
    kept in ``shared`` (pass the same dict to share across scopes).

    A fake op costs 0.5 to 3 ms however small (torch's own cache of fake results still
    rebuilds them), and the planner propagates the same ops on the same shapes in every copy
    and candidate of a model; this is most of its time. Only where values are read for their
    metadata, never mutated nor compared by storage: the planner's candidate graphs, built in
    this scope (a ContextVar, so the scope is this thread's only). Mutating ops, symbolic
    sizes and tensors whose values are known (constants, real tensors) are never shared."""
    token = _SHARED_VALUES.set(shared)
    try:
        yield
    finally:
        _SHARED_VALUES.reset(token)


class _Unshared(Exception):
    pass


_CONSTANTS = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _metadata(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        # a real tensor, or a fake one carrying its constant's values: results may depend on them
        if not isinstance(value, FakeTensor) or value.constant is not None or value.layout is not torch.strided:
            raise _Unshared
        sizes = (*value.shape, *value.stride(), value.storage_offset())
        if not all(type(s) is int for s in sizes):
            raise _Unshared
        return type(value), sizes, value.dim(), value.dtype, value.device, value.layout, value.requires_grad
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_metadata(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((k, _metadata(v)) for k, v in value.items())
    if isinstance(value, _CONSTANTS):
        return type(value), value
    raise _Unshared


def propagate_value(graph: torch.fx.Graph, target: Callable, args: tuple, kwargs: dict, *, fake_mode=None) -> Any:
    """Run ``target`` on the fake values of its arguments to get the new node's ``val``.

    ``fake_mode`` is the graph's (``fake_mode_of``): callers creating many nodes pass it once
    found, since finding it scans the graph. See ``sharing_values`` for the planner's reuse.
    """
    fake_args, fake_kwargs = pytree.tree_map_only(torch.fx.Node, fake_value, (args, kwargs))
    mode = fake_mode or fake_mode_of(graph)
    shared, key = _SHARED_VALUES.get(), None
    if shared is not None and isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable:
        try:
            key = (mode, target, _metadata((fake_args, fake_kwargs)))
        except _Unshared:
            pass
        if key in shared:
            return shared[key]
    with mode:
        value = target(*fake_args, **fake_kwargs)
    if key is not None:
        try:
            _metadata(value)  # no symbolic size (a data-dependent one is new at every call)
            shared[key] = value
        except _Unshared:
            pass
    return value


def insert_call(
    graph: torch.fx.Graph,
    target: Callable,
    args: tuple,
    kwargs: dict | None = None,
    *,
    created_by: str,
    like: torch.fx.Node | None = None,
    fake_mode=None,
) -> torch.fx.Node:
    """Create ``call_function`` ``target(*args, **kwargs)`` at the graph's insert point.

    The node gets ``meta["val"]`` by fake propagation and ``meta[CREATED_BY]``; metadata that
    locates it in the model (``nn_module_stack``, block tag) is copied from ``like``. Passes
    that create many nodes use ``dims.emit.Emitter``, which builds on this.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = propagate_value(graph, target, args, kwargs, fake_mode=fake_mode)
    node.meta[meta.CREATED_BY] = created_by
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", meta.BLOCK):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def call_function_nodes(graph: torch.fx.Graph, *targets: Callable) -> list[torch.fx.Node]:
    """All ``call_function`` nodes whose target is one of ``targets``, in graph order."""
    wanted = set(targets)
    return [n for n in graph.nodes if n.op == "call_function" and n.target in wanted]


def refresh_values(graph: torch.fx.Graph, changed: set[torch.fx.Node]) -> None:
    """Recompute ``meta["val"]`` downstream of ``changed`` nodes whose inputs were rewired.

    A rewrite that hands a node an input with other strides leaves its recorded value stale;
    this walks forward in graph order and re-propagates every node that reads a changed node,
    stopping where the value comes out the same (shape, dtype and strides).
    """
    if not changed:
        return
    pending = set(changed)
    fake_mode = fake_mode_of(graph)
    for node in graph.nodes:
        if node.op != "call_function" or not (node in pending or any(a in pending for a in node.all_input_nodes)):
            continue
        old = node.meta.get("val")
        new = propagate_value(graph, node.target, node.args, node.kwargs, fake_mode=fake_mode)
        node.meta["val"] = new
        if _same_layout(old, new):
            pending.discard(node)
        else:
            pending.add(node)


def _same_layout(a: Any, b: Any) -> bool:
    leaves_a, leaves_b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(leaves_a) != len(leaves_b):
        return False
    return all(
        not isinstance(x, torch.Tensor)
        or (isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype and x.stride() == y.stride())
        for x, y in zip(leaves_a, leaves_b)
    )


def ancestors(nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """``nodes`` and every node they are computed from."""
    seen: set[torch.fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _functorch_levels() -> frozenset[Callable]:
    from torch._functorch import predispatch

    return frozenset(getattr(predispatch, f"_{kind}_{step}") for kind in ("vmap", "jvp")
                     for step in ("increment_nesting", "decrement_nesting"))


_LEVEL_CALLS = _functorch_levels()
"""functorch's level bookkeeping as export keeps it in the graph (``torch.vmap`` inside
``forward``, e.g. flex attention's ``create_block_mask``). Each call enters or leaves a level
whose number the later ``_add_batch_dim`` calls carry as a constant, so its result is unused,
yet removing it breaks them; torch.fx does not count these calls as side effects."""


def is_level_call(node: torch.fx.Node) -> bool:
    """A functorch level call (see ``_LEVEL_CALLS``): dead code elimination must keep it."""
    return node.op == "call_function" and node.target in _LEVEL_CALLS


def is_impure(node: torch.fx.Node) -> bool:
    """``node.is_impure()``, plus functorch's level calls."""
    return node.is_impure() or is_level_call(node)


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """``graph.eliminate_dead_code()`` that keeps functorch's level calls (see ``is_impure``)."""
    graph.eliminate_dead_code(is_impure_node=is_impure)
