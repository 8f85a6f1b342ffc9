"""Drop ops that do nothing at run time: export's metadata asserts and identity conversions.

torch.export keeps every ``.to(dtype)``, ``.type_as``, eval-mode ``dropout`` and friends of
the model code, plus an ``_assert_tensor_metadata`` check per conversion. When the fake
values show the op returns its input (same dtype, device, layout, shape and strides), eager
PyTorch returns the input itself or a view with its metadata, so removing the node is exact;
the uncompiled executable then spends no Python or dispatcher time on it.

What is dropped, by rule (everything else stays, e.g. ``copy_``, ``_to_copy`` and
``to(copy=True)``):

- ``_assert_tensor_metadata``: checks export inserts; they have no users.
- ``to.*`` / ``type_as``: when ATen would alias (``to_will_alias``): same dtype, device and
  layout, ``copy=False``, ``memory_format`` unset or ``preserve_format``.
- ``dropout`` (and the ``feature_``/``alpha_`` variants): when ``p == 0`` or ``train`` is false.
- ``expand``/``expand_as``: to the input's own shape (a view with the input's strides).
- ``contiguous``: when the input is already contiguous in that memory format.
- ``clone``: only when the clone is provably unobservable: same strides as its input, and
  neither the clone's nor the input's alias class is written in place, reaches the graph
  output (for the clone) or starts at a graph input (whose real strides export does not fix).

Casts, dropouts and expands that pass these checks always alias their input at run time, so
they are dropped even when their result is mutated later: eager PyTorch mutates the input
through them too. ``contiguous`` aliases only when the real input has the traced strides, so
it gets the same alias checks as ``clone``. Shapes and strides must be static ints.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from typing import Any, ClassVar

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from vdopt.passes.base import PassContext, PassResult

aten = torch.ops.aten

_ASSERTS = {aten._assert_tensor_metadata.default}
_TO = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default}
_DROPOUTS = {
    aten.dropout.default,
    aten.feature_dropout.default,
    aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
}
_EXPANDS = {aten.expand.default, aten.expand_as.default}
_CONTIGUOUS = {aten.contiguous.default}
_CLONES = {aten.clone.default}
_RETURNS_INPUT = _TO | _DROPOUTS | _EXPANDS | _CONTIGUOUS
"""Ops that return their input (or a view of it) when they are no-ops; not all say so in
their schema (``type_as`` and ``dropout`` are composite and unannotated)."""
_CANDIDATES = _ASSERTS | _TO | _DROPOUTS | _EXPANDS | _CONTIGUOUS | _CLONES


def _is(node: Any, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _arg(node: torch.fx.Node, name: str) -> Any:
    """Argument ``name`` of an ATen call, positional or keyword, else its schema default."""
    schema = node.target._schema
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if not a.kwarg_only and i < len(node.args):
                return node.args[i]
            if name in node.kwargs:
                return node.kwargs[name]
            return a.default_value if a.has_default_value() else None
    raise KeyError(f"{schema.name} has no argument {name!r}")


def _tensor_val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _static(values) -> tuple[int, ...] | None:
    """The sizes/strides as plain ints, or None when any is symbolic."""
    out = tuple(values)
    return out if all(type(v) is int for v in out) else None


def _same_tensor_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, device, layout, and the same static shape and strides."""
    if (a.dtype, a.device, a.layout) != (b.dtype, b.device, b.layout) or a.layout != torch.strided:
        return False
    shape_a, shape_b = _static(a.shape), _static(b.shape)
    stride_a, stride_b = _static(a.stride()), _static(b.stride())
    return None not in (shape_a, stride_a) and (shape_a, stride_a) == (shape_b, stride_b)


class AliasClasses:
    """Union-find over graph values that may share storage, with what each class touches.

    A class is ``written`` if an in-place/out op or an op of unknown effect (a call_module, a
    higher-order op) takes one of its values, ``is_input`` if it holds a placeholder, and
    ``is_output`` if one of its values is returned.
    """

    def __init__(self, graph: torch.fx.Graph) -> None:
        self._parent: dict[torch.fx.Node, torch.fx.Node] = {}
        written: list[torch.fx.Node] = []
        inputs: list[torch.fx.Node] = []
        outputs: list[torch.fx.Node] = []
        for n in graph.nodes:
            tensors = [a for a in pytree.tree_leaves((n.args, n.kwargs)) if _tensor_arg(a)]
            if n.op == "placeholder":
                inputs.append(n)
            elif n.op == "output":
                outputs.extend(tensors)
            elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
                for value, alias_info in _annotated_args(n):
                    for v in pytree.tree_leaves(value):
                        if _tensor_arg(v):
                            self.union(n, v)  # views and in-place ops return their input's storage
                            if alias_info.is_write:
                                written.append(v)
                if n.target in _RETURNS_INPUT and _tensor_arg(n.args[0]):
                    self.union(n, n.args[0])  # may return the input without saying so (type_as)
            elif n.op == "call_function" and n.target is operator.getitem:
                if isinstance(n.args[0], torch.fx.Node):
                    self.union(n, n.args[0])  # an element of a multi-output op: share its class
            elif n.op in ("call_function", "call_method", "call_module"):
                for v in tensors:  # unknown effect: may alias and may write every tensor it takes
                    self.union(n, v)
                    written.append(v)
        by_storage: dict[StorageWeakRef, torch.fx.Node] = {}
        for n in graph.nodes:  # values whose fake tensors share storage alias at run time too
            val = _tensor_val(n)
            if val is None or n.op == "output":
                continue
            try:
                key = StorageWeakRef(val.untyped_storage())
            except (NotImplementedError, RuntimeError):
                continue
            if key in by_storage:
                self.union(n, by_storage[key])
            else:
                by_storage[key] = n
        self._written = {self.find(n) for n in written}
        self._inputs = {self.find(n) for n in inputs}
        self._outputs = {self.find(n) for n in outputs}

    def find(self, node: torch.fx.Node) -> torch.fx.Node:
        root = node
        while self._parent.get(root, root) is not root:
            root = self._parent[root]
        while node is not root:  # path compression
            parent = self._parent[node]
            self._parent[node] = root
            node = parent
        return root

    def union(self, a: torch.fx.Node, b: torch.fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[ra] = rb

    def written(self, node: torch.fx.Node) -> bool:
        return self.find(node) in self._written

    def is_input(self, node: torch.fx.Node) -> bool:
        return self.find(node) in self._inputs

    def is_output(self, node: torch.fx.Node) -> bool:
        return self.find(node) in self._outputs


def _annotated_args(node: torch.fx.Node):
    """``(value, alias_info)`` of the arguments an ATen op's schema marks as aliased."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.alias_info is not None:
            yield (node.args[i] if not a.kwarg_only and i < len(node.args) else node.kwargs.get(a.name)), a.alias_info


def _tensor_arg(value: Any) -> bool:
    return isinstance(value, torch.fx.Node) and _tensor_val(value) is not None


def _to_aliases(node: torch.fx.Node, src: torch.Tensor, out: torch.Tensor) -> bool:
    """ATen's ``to_will_alias``: same dtype/device/layout, no copy, memory format preserved."""
    if node.target is not aten.type_as.default:
        if _arg(node, "copy"):
            return False
        if _arg(node, "memory_format") not in (None, torch.preserve_format):
            return False
        if node.target is aten.to.dtype_layout and _arg(node, "pin_memory"):
            return False
    return _same_tensor_meta(src, out)


def _drop_is_unobservable(node: torch.fx.Node, aliases: AliasClasses) -> bool:
    """For ops that copy at run time: nothing can tell the copy from its input."""
    src = node.args[0]
    return not (
        aliases.written(src) or aliases.written(node)
        or aliases.is_input(src) or aliases.is_input(node)
        or aliases.is_output(node)
    )


def is_noop(node: torch.fx.Node, aliases: AliasClasses) -> bool:
    """Whether removing ``node`` (and using its input instead) is exact."""
    if not _is(node, _CANDIDATES):
        return False
    if node.target in _ASSERTS:
        return not node.users
    src, out = _tensor_val(node.args[0]), _tensor_val(node)
    if src is None or out is None or not _same_tensor_meta(src, out):
        return False
    if node.target in _TO:
        return _to_aliases(node, src, out)
    if node.target in _DROPOUTS:
        return _arg(node, "p") == 0 or not _arg(node, "train")
    if node.target in _EXPANDS:
        return True  # same shape and strides: a view that is the input
    if node.target in _CONTIGUOUS:
        # the schema default is an enum int; an explicit one comes as torch.memory_format
        memory_format = node.kwargs.get("memory_format", torch.contiguous_format)
        return src.is_contiguous(memory_format=memory_format) and _drop_is_unobservable(node, aliases)
    if node.target in _CLONES:
        return _drop_is_unobservable(node, aliases)  # a copy with the input's own strides
    return False


def find_noops(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The nodes that do nothing at run time, in graph order."""
    aliases = AliasClasses(graph)
    return [n for n in graph.nodes if is_noop(n, aliases)]


def _kind(node: torch.fx.Node) -> str:
    return node.target.overloadpacket.__name__


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropNoOps:
    """Remove metadata asserts and identity conversions, dropouts, expands and copies."""

    name: ClassVar[str] = "drop_noops"
    tier: ClassVar[str] = "exact"

    def rewrite(self, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        if node.users:
            node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        noops = find_noops(graph)
        for node in noops:
            self.rewrite(graph, node)
        stats = dict(sorted(Counter(_kind(n) for n in noops).items()))
        return PassResult(gm=gm, modified=bool(noops), stats=stats)
