"""The emitter of the dimension core: the nodes a pass inserts when a dim is cut or resized.

Every node it creates carries ``meta["val"]`` (fake propagation in the graph's fake mode,
found once) and ``meta[CREATED_BY]`` (``graph_utils.insert_call``). Beyond single calls it
knows the rewrites every consumer of the op table needs:

* ``take``: one chunk of a dim laid out as ``[pre | factor x factor x ... | post]`` (a rank's
  shard of split tokens, a PipeFusion patch of one grid axis), replicated rows kept;
* ``resized``: a view, reshape, expand or unflatten with its literal sizes recomputed for a
  new output shape (export bakes concrete sizes into them);
* shorthands for slices, reshapes, permutes and cats that skip no-ops, and the functional
  collectives sequence parallelism inserts (with their ``CommRecord``): all-to-all, all-gather,
  and all-reduce of the partial results of a reduction over split rows.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx

from vdopt import meta
from vdopt.collectives import ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, WAIT, CommRecord, all_reduce_bytes
from vdopt.mesh import AxisGroup
from vdopt.passes.dims.rules import DimOp, op_rule, size_value, with_arg
from vdopt.passes.graph_utils import fake_mode_of, insert_call, propagate_value

aten = torch.ops.aten
_SQUEEZES = {aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims}


def resized(target: Any, args: Sequence, kwargs: dict, out_shape: Sequence[int]) -> tuple[Any, tuple, dict]:
    """``(target, args, kwargs)`` of a reshape-like call made to produce ``out_shape``.

    Views and reshapes become ``reshape`` (a chunk of a tensor may not be viewable the way the
    whole was); ``squeeze`` too, because a dim may be 1 in the chunk but not in the whole, and
    must be squeezed exactly where the whole was. ``unflatten`` and ``expand`` keep their op
    with their sizes recomputed (``expand`` keeps its ``-1`` entries). Other ops are returned
    unchanged: their output shape follows from their inputs.
    """
    rule = op_rule(target)
    out_shape = [int(s) for s in out_shape]
    if rule is None:
        return target, tuple(args), dict(kwargs)
    if target in _SQUEEZES or rule.kind is DimOp.RESHAPE and rule.sizes in ("size", "shape"):
        return aten.reshape.default, (args[0], out_shape), {}
    if target is aten.unflatten.int:
        dim = args[1] % (len(out_shape) - len(args[2]) + 1)
        return target, *with_arg(target, args, kwargs, "sizes", out_shape[dim: dim + len(args[2])])
    if rule.kind is DimOp.EXPAND:
        old = list(args[1])
        sizes = [-1 if s == -1 else n for s, n in zip(old, out_shape)]
        return target, *with_arg(target, args, kwargs, "size", sizes)
    return target, tuple(args), dict(kwargs)


@contextlib.contextmanager
def fake_only(fake_mode) -> Iterator[None]:
    """Within: ``fake_mode`` computes fake values only. A capture of data-dependent code may
    leave the graph's mode propagating real tensors too; a pass must never run real ops (a
    collective would really communicate, at rewrite time, and fail torch's mutation check)."""
    real = getattr(fake_mode, "propagate_real_tensors", False)
    fake_mode.propagate_real_tensors = False
    try:
        yield
    finally:
        fake_mode.propagate_real_tensors = real


class Emitter:
    """Creates ``call_function`` nodes at the graph's insert point (see the module docstring)."""

    def __init__(self, graph: torch.fx.Graph, created_by: str, *, fake_mode=None) -> None:
        self.graph = graph
        self.created_by = created_by
        """The pass name recorded on every node created."""
        self.fake_mode = fake_mode or fake_mode_of(graph)
        """The fake mode values are propagated in: ``graph``'s own, unless ``graph`` is a new
        graph being built from another one (then the other's)."""

    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *,
             like: torch.fx.Node | None = None) -> torch.fx.Node:
        with fake_only(self.fake_mode):
            return insert_call(self.graph, target, tuple(args), kwargs, created_by=self.created_by,
                               like=like, fake_mode=self.fake_mode)

    def copy(self, old: torch.fx.Node, target: Callable, args: tuple, kwargs: dict) -> torch.fx.Node:
        """A node standing for ``old`` with new arguments: ``old``'s metadata, a fresh ``val``."""
        node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta = {k: v for k, v in old.meta.items() if k != "val"}
        node.meta["val"] = self.value(target, tuple(args), kwargs)
        return node

    def value(self, target: Callable, args: tuple, kwargs: dict) -> Any:
        with fake_only(self.fake_mode):
            return propagate_value(self.graph, target, args, kwargs, fake_mode=self.fake_mode)

    def revalue(self, node: torch.fx.Node) -> None:
        """Recompute ``node``'s ``val`` after its arguments were rewritten in place."""
        node.meta["val"] = self.value(node.target, node.args, node.kwargs)

    def placeholder_value(self, like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """A fake tensor of ``like``'s dtype and device with ``shape``."""
        with self.fake_mode:
            return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)

    # -- shorthands (all shapes are the values' own: ints, a SymInt for an unbacked size) ------
    @staticmethod
    def shape(x: torch.fx.Node) -> tuple[int, ...]:
        return tuple(size_value(s) for s in x.meta["val"].shape)

    def slice(self, x: torch.fx.Node, dim: int, start: int, end: int) -> torch.fx.Node:
        if start == 0 and end >= self.shape(x)[dim]:
            return x
        return self.call(aten.slice.Tensor, (x, dim, start, end))

    def reshape(self, x: torch.fx.Node, shape: Sequence[int]) -> torch.fx.Node:
        if tuple(shape) == self.shape(x):
            return x
        return self.call(aten.reshape.default, (x, list(shape)))

    def permute(self, x: torch.fx.Node, order: Sequence[int]) -> torch.fx.Node:
        if list(order) == list(range(len(order))):
            return x
        return self.call(aten.permute.default, (x, list(order)))

    def movedim(self, x: torch.fx.Node, src: int, dst: int) -> torch.fx.Node:
        order = list(range(len(self.shape(x))))
        order.insert(dst, order.pop(src))
        return self.permute(x, order)

    def cat(self, xs: Sequence[torch.fx.Node], dim: int) -> torch.fx.Node:
        xs = [x for x in xs if self.shape(x)[dim] > 0] or list(xs[:1])  # all empty: the empty result
        return xs[0] if len(xs) == 1 else self.call(aten.cat.default, (list(xs), dim))

    def contiguous(self, x: torch.fx.Node) -> torch.fx.Node:
        return self.call(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})

    def pad_dim0(self, x: torch.fx.Node, extra: int) -> torch.fx.Node:
        if extra == 0:
            return x
        return self.call(aten.constant_pad_nd.default, (x, [0, 0] * (len(self.shape(x)) - 1) + [0, extra], 0.0))

    # -- cutting a dim -------------------------------------------------------------------------
    def take(self, x: torch.fx.Node, dim: int, *, pre: int, factors: Sequence[int],
             chunks: dict[int, tuple[int, int]], post: int) -> torch.fx.Node:
        """The part of ``x`` whose dim ``dim``, laid out as ``[pre | factors (row-major) | post]``,
        keeps only ``chunks[j] = (start, length)`` of each factor ``j`` named; the ``pre`` and
        ``post`` rows are kept whole."""
        shape = self.shape(x)
        body_size = math.prod(factors)
        assert shape[dim] == pre + body_size + post, (shape, dim, pre, factors, post)
        body = self.slice(x, dim, pre, pre + body_size)
        body = self.reshape(body, shape[:dim] + tuple(factors) + shape[dim + 1:])
        local = list(factors)
        for j, (start, length) in sorted(chunks.items()):
            body = self.slice(body, dim + j, start, start + length)
            local[j] = length
        body = self.reshape(body, shape[:dim] + (math.prod(local),) + shape[dim + 1:])
        parts = [self.slice(x, dim, 0, pre)] if pre else []
        parts.append(body)
        if post:
            parts.append(self.slice(x, dim, pre + body_size, shape[dim]))
        return self.cat(parts, dim)

    # -- collectives ---------------------------------------------------------------------------
    def all_to_all(self, flat: torch.fx.Node, out_splits: list[int], in_splits: list[int],
                   group: AxisGroup, purpose: str) -> torch.fx.Node:
        a2a = self.call(ALL_TO_ALL, (flat, list(out_splits), list(in_splits), group.group_name))
        itemsize = flat.meta["val"].dtype.itemsize
        sent = sum(s for j, s in enumerate(in_splits) if j != group.rank) * itemsize
        a2a.meta[meta.COMM] = CommRecord(kind="all_to_all", bytes=sent, purpose=purpose, axis=group.axis)
        return self.call(WAIT, (a2a,))

    def all_gather(self, x: torch.fx.Node, group: AxisGroup, purpose: str) -> torch.fx.Node:
        """Concatenation along dim 0 of ``x`` from every rank of ``group``, in group rank order."""
        x = self.contiguous(x)
        gathered = self.call(ALL_GATHER, (x, group.size, group.group_name))
        val = x.meta["val"]
        sent = val.numel() * val.dtype.itemsize * (group.size - 1)
        gathered.meta[meta.COMM] = CommRecord(kind="all_gather", bytes=sent, purpose=purpose, axis=group.axis)
        return self.call(WAIT, (gathered,))

    def all_reduce(self, x: torch.fx.Node, group: AxisGroup, op: str, purpose: str) -> torch.fx.Node:
        """The elementwise ``op`` (``sum``, ``max``, ``min``) of ``x`` over the ranks of ``group``."""
        reduced = self.call(ALL_REDUCE, (self.contiguous(x), op, group.group_name))
        val = x.meta["val"]
        sent = all_reduce_bytes(val.numel() * val.dtype.itemsize, group.size)
        reduced.meta[meta.COMM] = CommRecord(kind="all_reduce", bytes=sent, purpose=purpose, axis=group.axis)
        return self.call(WAIT, (reduced,))
