"""Sharding propagation: rewrite the graph downstream of a sharded activation to run on chunks.

Export bakes concrete sizes into ``view``/``reshape``/``expand``/``split`` arguments, so
sharding a tensor means following it through the graph. ``ShardPropagator`` visits nodes in
order and gives every node computed from a sharded value a ``ShardedShape`` (``dims/sharded_shape.py``);
how each op moves dims comes from the op table (``dims/rules.py``):

* ops that act elementwise or along unsharded dims keep the sharding; their size arguments
  are rewritten to local sizes, and replicated operands they combine with (position tables,
  RoPE, masks) are *localized*: sliced to this rank's chunk;
* ``scaled_dot_product_attention`` is local when only batch/head dims or the query rows are
  sharded (cross-attention to text stays on the query shard); self-attention over a sharded
  sequence goes to the ``seq_attention`` callback (Ulysses, Ring);
* a sum, mean, max or min over a split dim, and a matmul or einsum contracting one (the
  ``K^T V`` of linear attention), runs on each rank's own rows: a partial result, completed
  by an all-reduce over the split's mesh axes, after which the result is replicated along
  that dim (ops reading it per token, ``Q (K^T V)``, stay split);
* anything else (a reshape that cuts a sharded factor, such as unpatchify, or an op without
  a rule) first *gathers* its sharded inputs. Gathering is always exact, so an unknown op
  costs speed, never correctness.

Collectives it inserts are functional collectives with a ``CommRecord`` in their meta.
The node's ``meta["val"]`` is recomputed (fake propagation) for every rewritten node and
checked against its layout's local shape.

Legend: B batch, N heads, L sequence, D head dim.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from vdopt.mesh import AxisGroup
from vdopt.passes.dims.emit import Emitter, resized
from vdopt.passes.dims.flex_local import split_batch_flex_attention
from vdopt.passes.dims.need_gather import NeedGather
from vdopt.passes.dims.rules import (FLEX_ATTENTION, DimOp, arg, dim_args, dim_map, op_rule, permutation, shape_of,
                                     with_arg)
from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape, Split, map_reshape
from vdopt.passes.dims.split_chunks import join_chunks, pad_end, slice_rows

log = logging.getLogger(__name__)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_PARTIAL_OPS = {aten.sum.dim_IntList: "sum", aten.sum.default: "sum", aten.mean.dim: "sum", aten.mean.default: "sum",
                aten.amax.default: "max", aten.amin.default: "min"}
"""Reductions a rank can run on its own rows of a split dim, and how the ranks' partial results
combine (``all_reduce``'s op; a mean is a sum divided by the global count)."""
_MEAN_AS_SUM = {aten.mean.dim: aten.sum.dim_IntList, aten.mean.default: aten.sum.default}


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _expanded(dims: Sequence[Dim], shape: Sequence[int], which: Sequence[int]) -> tuple[list[int], dict[int, int]]:
    """Local shape with the dims in ``which`` expanded into one axis per factor.

    Returns the expanded shape and, per expanded dim, the index of its first axis.
    """
    out, first = [], {}
    for i, size in enumerate(shape):
        if i in which:
            first[i] = len(out)
            out.extend(f.local for f in dims[i].factors)
            if not dims[i].factors:
                out.append(1)
        else:
            out.append(size)
    return out, first


def _merge_factors(expanded: Sequence[int], shape: Sequence[int], dims: Sequence[Dim],
                   first: dict[int, int]) -> list[int]:
    """Undo ``_expanded``: the shape with each expanded dim's axes (now resized) multiplied back."""
    merged = []
    for i, size in enumerate(shape):
        if i in first:
            n = len(dims[i].factors) or 1
            merged.append(math.prod(expanded[first[i]: first[i] + n]))
        else:
            merged.append(size)
    return merged


class ShardPropagator:
    """Propagates layouts through a graph; see the module docstring.

    ``seq_attention(prop, node)`` rewrites an SDPA node whose q/k/v are sharded along the
    sequence and returns the node's layout. ``before_node(prop, node)`` may reshard a node's
    inputs before its rule runs (DSP).
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        *,
        created_by: str,
        seq_attention: Callable[["ShardPropagator", torch.fx.Node], ShardedShape] | None = None,
        before_node: Callable[["ShardPropagator", torch.fx.Node], None] | None = None,
    ) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.emit = Emitter(self.graph, created_by)
        self.seq_attention = seq_attention
        self.before_node = before_node
        self.layouts: dict[torch.fx.Node, Any] = {}
        self.counts: Counter = Counter()
        self.notes: dict[str, str] = {}
        """Per attention site: the strategy applied (for the report)."""
        self.gather_reasons: list[str] = []
        self._localized: dict[tuple, torch.fx.Node] = {}
        self._gathered: dict[torch.fx.Node, torch.fx.Node] = {}
        self._resharded: dict[tuple, tuple[torch.fx.Node, ShardedShape]] = {}

    # -- layouts ---------------------------------------------------------------------------
    def layout(self, a: Any) -> ShardedShape | None:
        lay = self.layouts.get(a) if isinstance(a, torch.fx.Node) else None
        return lay if isinstance(lay, ShardedShape) else None

    def is_sharded(self, a: Any) -> bool:
        lay = self.layouts.get(a) if isinstance(a, torch.fx.Node) else None
        if isinstance(lay, ShardedShape):
            return True
        if isinstance(lay, (tuple, list)):
            return any(x is not None for x in lay)
        return False

    @staticmethod
    def _finish(layout: ShardedShape | None) -> ShardedShape | None:
        return layout if layout is not None and layout.sharded_dims else None

    def global_shape(self, a: torch.fx.Node) -> tuple[int, ...]:
        lay = self.layout(a)
        return lay.shape if lay is not None else tuple(int(s) for s in a.meta["val"].shape)

    # -- sharding a replicated node ---------------------------------------------------------
    def shard(self, node: torch.fx.Node, layout: ShardedShape, *, skip: Callable[[torch.fx.Node], bool] = lambda u: False) -> torch.fx.Node:
        """Replace the uses of replicated ``node`` (except those ``skip`` says) by its local chunk."""
        users = [u for u in node.users if not skip(u)]
        if not users:
            return node
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        first = min(users, key=order.__getitem__)
        with self.graph.inserting_before(first):
            local = self.localize(node, [(i, d) for i, d in enumerate(layout.dims) if d.sharded])
        for u in users:
            u.replace_input_with(node, local)
        self.layouts[local] = layout
        return local

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "output":
                self._gather_args(node, "output")
            elif node.op == "call_function":
                if any(self.is_sharded(a) for a in node.all_input_nodes):
                    self.visit(node)
            elif any(self.is_sharded(a) for a in node.all_input_nodes):
                self._gather_args(node, f"{node.op} {node.target}")

    def visit(self, node: torch.fx.Node) -> None:
        if self.before_node is not None:
            self.before_node(self, node)
        try:
            with self.graph.inserting_before(node):
                layout = self.rule(node)
        except NeedGather as why:
            reason = f"{node.name} ({node.target}): {why}"
            log.debug("gather before %s; split inputs: %s", reason, ", ".join(
                f"{a.name} {lay.describe()}" for a in node.all_input_nodes if (lay := self.layout(a)) is not None))
            self.gather_reasons.append(reason)
            self._gather_args(node, f"gather before {node.name}")
            return
        if node.target is SDPA and not node.users:
            self.graph.erase_node(node)  # replaced by another attention node (ring)
            return
        self.emit.revalue(node)
        self.layouts[node] = layout
        self._check(node, layout)

    def _check(self, node: torch.fx.Node, layout: Any) -> None:
        val = node.meta.get("val")
        if isinstance(layout, ShardedShape):
            assert isinstance(val, torch.Tensor) and tuple(val.shape) == layout.local_shape, (
                f"{node.name}: local shape {tuple(val.shape) if isinstance(val, torch.Tensor) else val} "
                f"!= layout {layout.describe()} -> {layout.local_shape}"
            )
        elif isinstance(layout, (tuple, list)):
            for v, lay in zip(val, layout):
                if lay is not None:
                    assert tuple(v.shape) == lay.local_shape, f"{node.name}: {tuple(v.shape)} != {lay.local_shape}"

    def _gather_args(self, node: torch.fx.Node, purpose: str) -> None:
        def swap(a):
            if isinstance(a, torch.fx.Node) and self.is_sharded(a):
                with self.graph.inserting_before(node):
                    return self.gather(a, purpose)
            return a

        node.args = pytree.tree_map_only(torch.fx.Node, swap, node.args)
        node.kwargs = pytree.tree_map_only(torch.fx.Node, swap, node.kwargs)
        if node.op == "call_function":
            self.emit.revalue(node)
        self.layouts.pop(node, None)

    # -- collectives and slicing -------------------------------------------------------------
    def localize(self, x: torch.fx.Node, dims: Sequence[tuple[int, Dim]]) -> torch.fx.Node:
        """This rank's chunk of replicated ``x``: each ``(value dim, Dim)`` cut like ``Dim``."""
        dims = [(e, d) for e, d in dims if d.sharded]
        if not dims:
            return x
        key = (x, tuple((e, d.placement(), d.size) for e, d in dims))
        if key in self._localized:
            return self._localized[key]
        out = x
        for e, d in dims:
            out = self._localize_dim(out, e, d)
        self.counts["localized"] += 1
        self._localized[key] = out
        return out

    def _localize_dim(self, x: torch.fx.Node, e: int, d: Dim) -> torch.fx.Node:
        shape = self.emit.shape(x)
        assert shape[e] == d.size, f"localize: dim {e} of {x.name} is {shape[e]}, expected {d.size}"
        chunks = {j: (f.split.offset, f.split.length) for j, f in enumerate(d.factors) if f.split is not None}
        return self.emit.take(x, e, pre=d.pre, factors=[f.size for f in d.factors], chunks=chunks, post=d.post)

    def gather(self, x: torch.fx.Node, purpose: str) -> torch.fx.Node:
        """The full (replicated) value of sharded ``x``."""
        if x in self._gathered:
            return self._gathered[x]
        layout = self.layout(x)
        assert layout is not None, f"gather of {x.name} without a layout"
        out = x
        for i in layout.sharded_dims:
            d = layout.dims[i]
            for j, f in enumerate(d.factors):
                if f.split is not None:
                    out = self._gather_factor(out, i, layout.dims[i], j, len(f.split.axes), purpose)
                    layout = layout.with_dim(i, layout.dims[i].with_factor(j, Factor(f.label, f.size)))
        self.counts["gathers"] += 1
        self._gathered[x] = out
        return out

    def _gather_factor(self, x: torch.fx.Node, e: int, d: Dim, j: int, n_axes: int, purpose: str) -> torch.fx.Node:
        """Gather factor ``j`` of dim ``e`` over the innermost ``n_axes`` axes of its split."""
        em = self.emit
        f = d.factors[j]
        split = f.split
        shape = em.shape(x)
        body = em.slice(x, e, d.pre, d.pre + d.local_body)
        locals_ = [g.local for g in d.factors]
        body = em.reshape(body, shape[:e] + tuple(locals_) + shape[e + 1:])
        y = em.movedim(body, e + j, 0)
        # the chunks this gather collects: those that differ from ours in the gathered axes
        gathered_axes = split.axes[len(split.axes) - n_axes:]
        outer_coords = {}
        members = []
        for idx in range(math.prod(a.size for a in gathered_axes)):
            coords, rest = {}, idx
            for a in reversed(gathered_axes):
                coords[a.axis] = rest % a.size
                rest //= a.size
            members.append(split.index_with({**outer_coords, **coords}))
        lengths = [split.sizes[m] for m in members]
        longest = max(lengths)
        y = em.pad_dim0(y, longest - split.length)
        for group in reversed(gathered_axes):
            y = em.all_gather(y, group, purpose)
        if len(set(lengths)) > 1:
            y = em.cat([em.slice(y, 0, i * longest, i * longest + n) for i, n in enumerate(lengths)], 0)
        new_len = sum(lengths)
        y = em.movedim(y, 0, e + j)
        locals_[j] = new_len
        merged = math.prod(locals_)
        y = em.reshape(y, shape[:e] + (merged,) + shape[e + 1:])
        parts = [em.slice(x, e, 0, d.pre)] if d.pre else []
        parts.append(y)
        if d.post:
            parts.append(em.slice(x, e, d.pre + d.local_body, shape[e]))
        return em.cat(parts, e)

    def reshard(self, x: torch.fx.Node, layout: ShardedShape, src: tuple[int, int], dst: tuple[int, int],
                purpose: str, y_split: Split | None = None) -> tuple[torch.fx.Node, ShardedShape]:
        """All-to-all over the innermost axis of factor ``src``'s split, moving that axis to ``dst``.

        ``src``/``dst`` are (dim, factor index). Afterwards ``src`` keeps the outer axes of its
        split (or none) and ``dst`` is split as ``y_split``: by default balanced over the
        axis; when ``dst`` is already split over outer axes, ``y_split`` must extend them by
        the axis. Replicated rows (pre/post) of the dim holding one of the two factors are cut
        locally (going to ``dst``) or gathered (coming from ``src``) instead of moved.
        """
        key = (x, layout.placement(), src, dst)
        if key in self._resharded:
            return self._resharded[key]
        em = self.emit
        (ds, fs), (dt, ft) = src, dst
        X, Y = layout.dims[ds].factors[fs], layout.dims[dt].factors[ft]
        assert X.split is not None, f"reshard from unsplit factor {X}"
        group = X.split.axes[-1]
        if y_split is None:
            assert Y.split is None, f"reshard to split factor {Y} needs its target split"
            if Y.size < group.size:
                raise ValueError(
                    f"cannot split {Y.size} {Y.label!r} over the {group.size} ranks of mesh axis "
                    f"{group.axis!r}: use {group.axis}={Y.size} or less"
                )
            y_split = Split.balanced(Y.size, (group,))
        assert y_split.axes[-1] == group and y_split.axes[:-1] == (Y.split.axes if Y.split else ()), (
            f"reshard: target split {y_split.describe()} does not extend {Y}")
        x_split = X.split
        new_layout = layout.with_dim(ds, layout.dims[ds].with_factor(fs, Factor(X.label, X.size, x_split.coarsen())))
        new_layout = new_layout.with_dim(dt, new_layout.dims[dt].with_factor(ft, Factor(Y.label, Y.size, y_split)))
        joint = [i for i in {ds, dt} if layout.dims[i].joint]
        assert len(joint) <= 1 and not (joint and ds == dt), "reshard: replicated rows on both dims"
        shape = em.shape(x)
        body = x
        if joint:
            d = layout.dims[joint[0]]
            body = em.slice(x, joint[0], d.pre, d.pre + d.local_body)
        body_dims = tuple(Dim(dd.factors) for dd in layout.dims)
        x_sizes = [x_split.sizes[x_split.index_with({group.axis: j})] for j in range(group.size)]
        y_sizes = [y_split.sizes[y_split.index_with({group.axis: j})] for j in range(group.size)]
        out = self._all_to_all_body(body, body_dims, ds, fs, dt, ft, x_sizes, y_sizes, group, purpose)
        if joint:
            e = joint[0]
            d = layout.dims[e]
            rows = ([em.slice(x, e, 0, d.pre)] if d.pre else []) + (
                [em.slice(x, e, d.pre + d.local_body, shape[e])] if d.post else [])
            fixed = []
            for r in rows:
                if e == ds:  # rows hold all of Y: keep only our chunk of it
                    fixed.append(self._localize_dim(r, dt, new_layout.dims[dt]))
                else:  # rows are split along X like the body: collect the other ranks' chunks
                    fixed.append(self._gather_factor(r, ds, layout.dims[ds], fs, 1, purpose))
            pre = fixed[:1] if d.pre else []
            post = fixed[len(pre):]
            out = em.cat(pre + [out] + post, e)
        self.layouts[out] = new_layout
        assert em.shape(out) == new_layout.local_shape, (em.shape(out), new_layout.describe())
        self._resharded[key] = (out, new_layout)
        return out, new_layout

    def _all_to_all_body(self, x, dims, ds, fs, dt, ft, x_sizes: list[int], y_sizes: list[int],
                         group: AxisGroup, purpose: str) -> torch.fx.Node:
        """The a2a itself on a tensor without replicated rows: peer j gets our X chunk, its Y chunk."""
        em = self.emit
        shape = em.shape(x)
        exp, first = _expanded(dims, shape, sorted({ds, dt}))
        ax, ay = first[ds] + fs, first[dt] + ft
        assert exp[ay] == sum(y_sizes) and exp[ax] == x_sizes[group.rank], (exp, ax, ay, x_sizes, y_sizes)
        xe = em.reshape(x, exp)
        me = group.rank
        if len(set(x_sizes)) == 1 and len(set(y_sizes)) == 1:
            return self._all_to_all_even(xe, exp, ax, ay, shape, dims, first, group, purpose)
        pieces, in_splits, off = [], [], 0
        for j in range(group.size):
            piece = em.slice(xe, ay, off, off + y_sizes[j])
            off += y_sizes[j]
            pieces.append(em.reshape(piece, [-1]))
            in_splits.append(math.prod(exp) // exp[ay] * y_sizes[j])
        flat = em.cat(pieces, 0)  # contiguous: a fresh tensor
        recv_shapes, out_splits = [], []
        for j in range(group.size):
            s = list(exp)
            s[ax], s[ay] = x_sizes[j], y_sizes[me]
            recv_shapes.append(s)
            out_splits.append(math.prod(s))
        got = em.all_to_all(flat, out_splits, in_splits, group, purpose)
        chunks, off = [], 0
        for s, n in zip(recv_shapes, out_splits):
            chunks.append(em.reshape(em.slice(got, 0, off, off + n), s))
            off += n
        ye = em.cat(chunks, ax)
        final = list(exp)
        final[ax], final[ay] = sum(x_sizes), y_sizes[me]
        return em.reshape(ye, _merge_factors(final, shape, dims, first))

    def _all_to_all_even(self, xe, exp, ax, ay, shape, dims, first, group: AxisGroup, purpose: str):
        """The same all-to-all when every chunk has the same size: one permute each way."""
        em = self.emit
        g = group.size
        # (.., Y, ..) -> (.., g, y, ..) -> (g, .., y, ..): peer j's piece is row j
        split_y = exp[:ay] + [g, exp[ay] // g] + exp[ay + 1:]
        send = em.movedim(em.reshape(xe, split_y), ay, 0)
        flat = em.reshape(em.contiguous(send), [-1])
        n = math.prod(exp) // g
        got = em.all_to_all(flat, [n] * g, [n] * g, group, purpose)
        recv = [g] + exp[:ay] + [exp[ay] // g] + exp[ay + 1:]
        got = em.reshape(got, recv)
        # row j holds peer j's X chunk: put the peer axis right before X and merge the two
        ye = em.movedim(got, 0, ax)
        final = list(exp)
        final[ay] = exp[ay] // g
        final[ax] = exp[ax] * g
        return em.reshape(ye, _merge_factors(final, shape, dims, first))

    # -- partial results over split rows ----------------------------------------------------
    def _partial_axes(self, split: Sequence[Dim], out_layout: ShardedShape | None) -> tuple[AxisGroup, ...]:
        """The mesh axes over which the ranks hold disjoint rows of the reduced dims ``split``:
        reducing its own rows gives each rank a partial result, completed by an all-reduce
        over these axes. Each row is held by exactly one rank of them (uneven chunks hold no
        padding), so the all-reduce counts each once."""
        axes: list[AxisGroup] = []
        for d in split:
            if d.joint:
                raise NeedGather("reduces a split dim with replicated rows (each rank would count them)")
            for f in d.factors:
                if f.split is not None:
                    axes.extend(a for a in f.split.axes if a not in axes)
        kept = {a.axis for _, _, f in out_layout.sharded_factors() for a in f.split.axes} if out_layout else set()
        if kept & {a.axis for a in axes}:
            raise NeedGather("the reduced dim and a kept dim are split over the same mesh axis")
        return tuple(axes)

    def complete_partial(self, node: torch.fx.Node, axes: Sequence[AxisGroup], op: str,
                         layout: ShardedShape | None, *, divisor: int | None = None) -> torch.fx.Node:
        """``node`` (rewritten) computes this rank's partial result: its users now read the
        all-reduce over ``axes`` (then ``/ divisor``), which has ``layout``."""
        self.emit.revalue(node)
        users = list(node.users)
        stack = node.meta.get("nn_module_stack")
        purpose = f"partial {list(stack.values())[-1][0] if stack else node.name}"
        with self.graph.inserting_before(node.next):
            out = node
            for group in axes:
                out = self.emit.all_reduce(out, group, op, purpose)
            if divisor is not None:
                out = self.emit.call(aten.div.Tensor, (out, divisor))
        for u in users:
            u.replace_input_with(node, out)
        if layout is not None:
            self.layouts[out] = layout
        self.counts["all_reduces"] += 1
        return out

    # -- rules -------------------------------------------------------------------------------
    def rule(self, node: torch.fx.Node) -> Any:
        """The node's output sharding (a tuple for several outputs); rewrites its sizes to local."""
        if node.target is FLEX_ATTENTION:
            return self.rule_flex_attention(node)
        rule = op_rule(node.target)
        handler = self._RULES.get(rule.kind) if rule is not None else None
        if handler is None:
            raise NeedGather("no sharding rule for this op")
        if rule.kind is DimOp.POINTWISE and rule.inplace:
            return self.rule_inplace(node)
        return handler(self, node)

    def _out_shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return tuple(int(s) for s in node.meta["val"].shape)

    def _merge_dims(self, out_shape, layouts: Sequence[ShardedShape]) -> ShardedShape:
        """Output dims from broadcast-aligned input layouts; split dims must agree."""
        dims = []
        for i, size in enumerate(out_shape):
            # a size-1 dim broadcasts, unless split (a batch of 1 held by one rank, split_chunks.py)
            cands = [lay.dims[i] for lay in layouts if lay.dims[i].size == size and (size != 1 or lay.dims[i].sharded)]
            sharded = [c for c in cands if c.sharded]
            if sharded:
                if any(c.placement() != sharded[0].placement() for c in sharded):
                    raise NeedGather(f"inputs are split differently along dim {i}")
                dims.append(sharded[0])
            elif cands and cands[0].factors:
                dims.append(cands[0])
            else:
                dims.append(Dim.plain(size))
        return ShardedShape(tuple(dims))

    def _localize_operands(self, node: torch.fx.Node, layout: ShardedShape, skip: Sequence[torch.fx.Node] = ()) -> None:
        """Localize every replicated tensor operand of ``node`` that broadcasts against ``layout``."""
        nd = len(layout.dims)

        def fix(a):
            if not _is_tensor_node(a) or self.is_sharded(a) or a in skip:
                return a
            shape = tuple(int(s) for s in a.meta["val"].shape)
            if len(shape) > nd:
                return a
            offset = nd - len(shape)
            need = [(e, layout.dims[e + offset]) for e in range(len(shape))
                    if layout.dims[e + offset].sharded and shape[e] == layout.dims[e + offset].size]
            return self.localize(a, need) if need else a

        node.args = pytree.tree_map_only(torch.fx.Node, fix, node.args)
        node.kwargs = pytree.tree_map_only(torch.fx.Node, fix, node.kwargs)

    def _sharded_tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        leaves = pytree.tree_leaves((node.args, node.kwargs))
        return [a for a in leaves if isinstance(a, torch.fx.Node) and self.is_sharded(a)]

    def rule_getitem(self, node: torch.fx.Node) -> ShardedShape | None:
        parent, idx = node.args
        lays = self.layouts.get(parent)
        return lays[idx] if isinstance(lays, (tuple, list)) else None

    def rule_carry(self, node: torch.fx.Node) -> tuple:
        # PipeFusion's stage marker copies its inputs: each output keeps its input's sharding
        return tuple(self.layout(v) for v in node.args[0])

    def rule_metadata(self, node: torch.fx.Node) -> None:
        # the recorded sizes and strides are the whole tensor's; the local chunk has its own
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "stride")}
        return None

    def rule_new_tensor(self, node: torch.fx.Node) -> None:
        return None  # its shape is a literal argument: a replicated tensor

    def rule_pointwise(self, node: torch.fx.Node) -> ShardedShape | None:
        out = self._out_shape(node)
        lays = [self.layout(a).aligned(len(out)) for a in self._sharded_tensor_args(node)]
        layout = self._merge_dims(out, lays)
        self._localize_operands(node, layout)
        return self._finish(layout)

    def rule_inplace(self, node: torch.fx.Node) -> ShardedShape | None:
        if not self.is_sharded(node.args[0]):
            raise NeedGather("in-place update of a replicated tensor")
        return self.rule_pointwise(node)

    def rule_same_layout(self, node: torch.fx.Node) -> Any:
        x = node.args[0]
        if not self.is_sharded(x):
            return None  # e.g. type_as(replicated, sharded): the sharded one only gives a dtype
        if isinstance(node.meta["val"], (tuple, list)):  # native_dropout: output and mask
            return tuple(self.layout(x) for _ in node.meta["val"])
        return self.layout(x)

    def rule_reshape(self, node: torch.fx.Node) -> ShardedShape | None:
        x = node.args[0]
        layout = self.layout(x)
        out = self._out_shape(node)
        if math.prod(layout.shape) == 0:  # no values: every rank's (empty) result is the whole one
            node.target, node.args, node.kwargs = resized(node.target, node.args, node.kwargs, out)
            return None
        new = map_reshape(layout, out)
        if new is None:
            raise NeedGather(f"reshape {layout.describe()} -> {list(out)} cuts a split factor")
        node.target, node.args, node.kwargs = resized(node.target, node.args, node.kwargs, new.local_shape)
        return self._finish(new)

    def rule_complex_view(self, node: torch.fx.Node) -> ShardedShape | None:
        layout = self.layout(node.args[0])
        if node.target is aten.view_as_complex.default:
            if layout.dims[-1].sharded:
                raise NeedGather("packs a split dim into complex numbers")
            return self._finish(ShardedShape(layout.dims[:-1]))
        return ShardedShape(layout.dims + (Dim.plain(2),))

    def rule_permute(self, node: torch.fx.Node) -> ShardedShape | None:
        return self.layout(node.args[0]).permute(permutation(node))

    def rule_expand(self, node: torch.fx.Node) -> ShardedShape | None:
        sizes = list(node.args[1])
        aligned = self.layout(node.args[0]).aligned(len(sizes))
        dims = tuple(d if s in (-1, d.size) else Dim.plain(s) for s, d in zip(sizes, aligned.dims))
        layout = ShardedShape(dims)
        node.target, node.args, node.kwargs = resized(node.target, node.args, node.kwargs, layout.local_shape)
        return layout

    def rule_slice(self, node: torch.fx.Node) -> ShardedShape | None:
        x = node.args[0]
        layout = self.layout(x)
        (dim,) = dim_args(node)
        d = layout.dims[dim]
        if node.target is aten.narrow.default:  # (x, dim, start, length): rows [start, start + length)
            start, length = arg(node, "start"), arg(node, "length")
            if not (isinstance(start, int) and isinstance(length, int)):
                raise NeedGather("slice bounds computed at run time (a data-dependent length)")
            start = start + d.size if start < 0 else start
            node.target, node.args, node.kwargs = aten.slice.Tensor, (x, dim, start, start + length), {}
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if not all(b is None or isinstance(b, int) for b in (start, end, step)):
            raise NeedGather("slice bounds computed at run time (a data-dependent length)")
        size = d.size
        s = 0 if start is None else (start + size if start < 0 else start)
        e = size if end is None else (end + size if end < 0 else end)
        s, e = max(0, min(s, size)), max(0, min(e, size))
        out_size = int(self._out_shape(node)[dim])
        if not d.sharded:
            new = d if (s, e, step) == (0, size, 1) else Dim.plain(out_size)
            return self._finish(layout.with_dim(dim, new))
        if step != 1:
            raise NeedGather("strided slice of a split dim")
        if (s, e) == (0, size):
            return layout
        kept = slice_rows(d, s, e)  # each rank keeps its own rows in the range
        if kept is None:
            raise NeedGather("slice of part of a split dim")
        new, local_start, local_end = kept
        node.args = (x, dim, local_start, local_end) + tuple(node.args[5:])
        return self._finish(layout.with_dim(dim, new))

    def rule_select(self, node: torch.fx.Node) -> Any:
        layout = self.layout(node.args[0])
        dm = dim_map(node)
        if any(layout.dims[d].sharded for d in dm.mixed):
            raise NeedGather("select/unbind along a split dim")
        rest = ShardedShape(tuple(d for d, to in zip(layout.dims, dm.out) if to is not None))
        if node.target is aten.select.int:
            return self._finish(rest)
        return tuple(self._finish(rest) for _ in node.meta["val"])

    def rule_split(self, node: torch.fx.Node) -> Any:
        x = node.args[0]
        layout = self.layout(x)
        (dim,) = dim_args(node)
        d = layout.dims[dim]
        sizes = [int(v.shape[dim]) for v in node.meta["val"]]
        if not d.sharded:
            return tuple(self._finish(layout.with_dim(dim, Dim.plain(s))) for s in sizes)
        starts = [0, *itertools.accumulate(sizes)][:-1]
        kept = [slice_rows(d, s, s + n) for s, n in zip(starts, sizes)]
        if any(k is None for k in kept):
            raise NeedGather("split of a split dim")
        node.target = aten.split_with_sizes.default
        node.args = (x, [end - start for _, start, end in kept], dim)
        node.kwargs = {}
        return tuple(self._finish(layout.with_dim(dim, new)) for new, _, _ in kept)

    def rule_cat(self, node: torch.fx.Node) -> ShardedShape | None:
        xs = list(node.args[0])
        out = self._out_shape(node)
        (dim,) = dim_args(node)
        sharded = [x for x in xs if self.is_sharded(x)]
        along = [x for x in sharded if self.layout(x).dims[dim].sharded]
        others = [self.layout(x).with_dim(dim, Dim.plain(out[dim])) for x in sharded]
        if not along:
            layout = self._merge_dims(out, others)
            self._localize_operands(node, layout)
            return self._finish(layout)
        if len(along) > 1:
            joined = join_chunks([self.layout(x).dims[dim] for x in along]) if len(along) == len(xs) else None
            if joined is None:
                raise NeedGather("concatenation of two split tensors along their split dim")
            layout = self._merge_dims(out, others).with_dim(dim, joined)
            self._localize_operands(node, layout)
            return layout
        k = xs.index(along[0])
        dk = self.layout(along[0]).dims[dim]
        before = sum(self.global_shape(x)[dim] for x in xs[:k])
        after = sum(self.global_shape(x)[dim] for x in xs[k + 1:])
        joint = Dim(dk.factors, pre=dk.pre + before, post=dk.post + after)
        layout = self._merge_dims(out, [lay for lay in others]).with_dim(dim, joint)
        # replicated pieces keep their rows along the cat dim; other dims are localized
        self._localize_operands(node, layout.with_dim(dim, Dim.plain(out[dim])))
        return layout

    def rule_stack(self, node: torch.fx.Node) -> ShardedShape | None:
        xs = list(node.args[0])
        out = self._out_shape(node)
        (dim,) = dim_args(node)
        lays = []
        for x in xs:
            if self.is_sharded(x):
                lay = self.layout(x)
                lays.append(ShardedShape(lay.dims[:dim] + (Dim.plain(out[dim]),) + lay.dims[dim:]))
        layout = self._merge_dims(out, lays)
        in_layout = ShardedShape(layout.dims[:dim] + layout.dims[dim + 1:])
        self._localize_operands(node, in_layout)
        return layout

    def rule_mix_within(self, node: torch.fx.Node) -> Any:
        """Norms, softmax, sort: values mix along some dims, the shape stays (for every output)."""
        layout = self.layout(node.args[0])
        if any(layout.dims[i].sharded for i in dim_map(node).mixed):
            raise NeedGather("normalizes over a split dim")
        for a in pytree.tree_leaves((node.args[1:], node.kwargs)):
            if isinstance(a, torch.fx.Node) and self.is_sharded(a):
                raise NeedGather("weight is sharded")
        val = node.meta.get("val")
        return tuple(layout for _ in val) if isinstance(val, (tuple, list)) else layout

    def rule_take_along(self, node: torch.fx.Node) -> ShardedShape | None:
        """``gather``: the input's and index's other dims pair up elementwise, so they may be split
        alike (where both have the output's size); the dim picked along must be whole."""
        (dim,) = dim_args(node)
        out = self._out_shape(node)
        operands = (node.args[0], arg(node, "index"))
        lays = [self.layout(a) for a in operands if self.is_sharded(a)]
        if any(lay.dims[dim].sharded for lay in lays):
            raise NeedGather("picks along a split dim")
        layout = self._merge_dims(out, lays)
        split = {d for lay in lays for d in lay.sharded_dims}
        if any(self.global_shape(a)[d] != out[d] for a in operands for d in split):
            raise NeedGather("the index covers only part of the input along a split dim")
        self._localize_operands(node, layout)
        return self._finish(layout)

    def rule_index(self, node: torch.fx.Node) -> ShardedShape | None:
        """One replicated index tensor picks along one dim (``x[:, idx]``, ``index_select``): the
        other dims keep their split; the picked dim must be whole."""
        x = node.args[0]
        if node.target is aten.index_select.default:
            (dim,), index = dim_args(node), arg(node, "index")
        else:
            picks = [(i, t) for i, t in enumerate(node.args[1]) if t is not None]
            if len(picks) != 1:
                raise NeedGather("indexing by several tensors")
            (dim, index), = picks
        layout = self.layout(x)
        if layout is None or self.is_sharded(index):
            raise NeedGather("split index tensor")
        if index.meta["val"].dtype is torch.bool:
            raise NeedGather("boolean mask index")
        if layout.dims[dim].sharded:
            raise NeedGather("picks along a split dim")
        out = shape_of(node)  # the picked count may be unbacked (an index from nonzero)
        picked = out[dim:len(out) - (len(layout.dims) - dim - 1)]
        return self._finish(ShardedShape(layout.dims[:dim] + tuple(Dim.plain(n) for n in picked) + layout.dims[dim + 1:]))

    def rule_lookup(self, node: torch.fx.Node) -> ShardedShape | None:
        weight, indices = node.args[:2]
        if self.is_sharded(weight):
            raise NeedGather("split embedding table")
        return self._finish(ShardedShape(self.layout(indices).dims + (Dim.plain(self._out_shape(node)[-1]),)))

    def rule_outer(self, node: torch.fx.Node) -> ShardedShape | None:
        dims = tuple(self.layout(v).dims[0] if self.is_sharded(v) else Dim.plain(n)
                     for v, n in zip(node.args[:2], self._out_shape(node)))
        axes = [a.axis for d in dims for f in d.factors if f.split is not None for a in f.split.axes]
        if len(axes) != len(set(axes)):
            raise NeedGather("both vectors split over one mesh axis")
        return ShardedShape(dims)

    def rule_repeat(self, node: torch.fx.Node) -> ShardedShape | None:
        repeats = list(arg(node, "repeats"))
        layout = self.layout(node.args[0])
        new = len(repeats) - len(layout.dims)
        if any(d.sharded and r != 1 for d, r in zip(layout.dims, repeats[new:])):
            raise NeedGather("tiles a split dim")
        out = self._out_shape(node)
        dims = tuple(Dim.plain(n) for n in out[:new]) + tuple(
            d if r == 1 else Dim.plain(n) for d, r, n in zip(layout.dims, repeats[new:], out[new:]))
        return self._finish(ShardedShape(dims))

    def rule_reduction(self, node: torch.fx.Node) -> ShardedShape | None:
        layout = self.layout(node.args[0])
        dm = dim_map(node)
        new = [Dim() if i in dm.mixed else d for i, (d, to) in enumerate(zip(layout.dims, dm.out)) if to is not None]
        out_layout = self._finish(ShardedShape(tuple(new)))
        split = [layout.dims[i] for i in sorted(dm.mixed) if layout.dims[i].sharded]
        if not split:
            return out_layout
        op = _PARTIAL_OPS.get(node.target)
        if op is None:
            raise NeedGather("reduction over a split dim that is not a sum, mean, max or min")
        axes = self._partial_axes(split, out_layout)
        divisor = None
        if node.target in _MEAN_AS_SUM:  # local sums, all-reduced, over the global count
            divisor = math.prod(layout.dims[i].size for i in dm.mixed)
            node.target = _MEAN_AS_SUM[node.target]
        self.complete_partial(node, axes, op, out_layout, divisor=divisor)
        return out_layout

    def rule_linear(self, node: torch.fx.Node) -> ShardedShape | None:
        x = node.args[0]
        if any(self.is_sharded(a) for a in node.args[1:]) or not self.is_sharded(x):
            raise NeedGather("sharded weight")
        layout = self.layout(x)
        if any(layout.dims[i].sharded for i in dim_map(node).mixed):
            raise NeedGather("contracts a split dim")
        return layout.with_dim(len(layout.dims) - 1, Dim.plain(self._out_shape(node)[-1]))

    def rule_per_sample(self, node: torch.fx.Node) -> ShardedShape | None:
        x = node.args[0]
        layout = self.layout(x)
        others = [a for a in pytree.tree_leaves((node.args[1:], node.kwargs)) if self.is_sharded(a)]
        if layout is None or others or any(layout.dims[i].sharded for i in dim_map(node).mixed):
            raise NeedGather("mixes values across a split non-batch dim")
        out = self._out_shape(node)
        return ShardedShape((layout.dims[0],) + tuple(Dim.plain(n) for n in out[1:]))

    def rule_matmul(self, node: torch.fx.Node) -> ShardedShape | None:
        """``a @ b`` with either operand split along any dim. Split rows of ``a`` or columns
        of ``b`` stay split in the output; a split contracted dim (``K^T V`` over split
        tokens) gives a partial product, all-reduced. A replicated operand is cut to match."""
        a, b = node.args[0], node.args[1]
        sa, sb = self.global_shape(a), self.global_shape(b)
        if len(sa) < 2 or len(sb) < 2:
            raise NeedGather("matrix-vector product")
        la = self.layout(a) or ShardedShape(tuple(Dim.plain(n) for n in sa))
        lb = self.layout(b) or ShardedShape(tuple(Dim.plain(n) for n in sb))
        out = self._out_shape(node)
        nb = len(out) - 2
        batch = self._merge_dims(out[:-2], [ShardedShape(lx.dims[:-2]).aligned(nb) for lx in (la, lb)])
        ka, kb = la.dims[-1], lb.dims[-2]
        if ka.sharded and kb.sharded and ka.placement() != kb.placement():
            raise NeedGather("operands split differently along the contracted dim")
        k = ka if ka.sharded else kb
        layout = self._finish(ShardedShape(batch.dims + (la.dims[-2], lb.dims[-1])))
        axes = self._partial_axes([k], layout) if k.sharded else ()
        if layout is not None:
            split_axes = [a.axis for _, _, f in layout.sharded_factors() for a in f.split.axes]
            if len(split_axes) != len(set(split_axes)):
                raise NeedGather("two output dims split over one mesh axis")
        new = []
        for x, lx, matrix in ((a, la, (la.dims[-2], k)), (b, lb, (k, lb.dims[-1]))):
            want = batch.dims[nb - (len(lx.dims) - 2):] + matrix  # batch dims broadcast right-aligned
            need = [(e, w) for e, (w, own) in enumerate(zip(want, lx.dims))
                    if w.sharded and not own.sharded and own.size == w.size and own.size != 1]
            new.append(self.localize(x, need) if need else x)
        node.args = tuple(new) + tuple(node.args[2:])
        if axes:
            self.complete_partial(node, axes, "sum", layout)
        return layout

    def rule_einsum(self, node: torch.fx.Node) -> ShardedShape | None:
        eq, operands = node.args[0], list(node.args[1])
        if "..." in eq or "->" not in eq:
            raise NeedGather("implicit einsum")
        ins, out_letters = eq.replace(" ", "").split("->")
        in_letters = ins.split(",")
        letter_dim: dict[str, Dim] = {}
        for letters, x in zip(in_letters, operands):
            lay = self.layout(x)
            if lay is None:
                continue
            for ch, d in zip(letters, lay.dims):
                if d.sharded:
                    if ch in letter_dim and letter_dim[ch].placement() != d.placement():
                        raise NeedGather("einsum operands split differently")
                    letter_dim[ch] = d
        new_ops = []
        for letters, x in zip(in_letters, operands):
            if self.is_sharded(x):
                lay = self.layout(x)
                if any(letter_dim.get(ch) is not None and d.placement() != letter_dim[ch].placement()
                       for ch, d in zip(letters, lay.dims)):
                    raise NeedGather("einsum operand not split on a shared letter")
                new_ops.append(x)
                continue
            shape = tuple(int(s) for s in x.meta["val"].shape)
            need = [(e, letter_dim[ch]) for e, ch in enumerate(letters) if ch in letter_dim and shape[e] != 1]
            new_ops.append(self.localize(x, need))
        out = self._out_shape(node)
        dims = tuple(letter_dim.get(ch, Dim.plain(out[i])) for i, ch in enumerate(out_letters))
        layout = self._finish(ShardedShape(dims))
        contracted = [d for ch, d in letter_dim.items() if ch not in out_letters]
        axes = self._partial_axes(contracted, layout) if contracted else ()
        node.args = (eq, new_ops)
        if axes:  # a sum over split rows: partial on each rank
            self.complete_partial(node, axes, "sum", layout)
        return layout

    def rule_repeat_interleave(self, node: torch.fx.Node) -> ShardedShape | None:
        x = node.args[0]
        layout = self.layout(x)
        repeats = node.args[1]
        dims = dim_args(node)
        if dims is None:
            raise NeedGather("repeat_interleave of a flattened tensor")
        (dim,) = dims
        d = layout.dims[dim]
        out = self._out_shape(node)
        if not d.sharded:
            new = Dim.plain(out[dim])
        elif d.joint:
            raise NeedGather("repeat_interleave of a joint dim")
        else:
            new = Dim(d.factors + ((Factor("?", repeats),) if repeats != 1 else ()))
        layout = layout.with_dim(dim, new)
        if arg(node, "output_size") is not None:
            node.args, node.kwargs = with_arg(node.target, node.args, node.kwargs, "output_size", layout.local_shape[dim])
        return layout

    def rule_pad(self, node: torch.fx.Node) -> ShardedShape | None:
        layout = self.layout(node.args[0])
        pad = node.args[1]
        nd = len(layout.dims)
        out = self._out_shape(node)
        dims = list(layout.dims)
        for k in range(len(pad) // 2):
            i = nd - 1 - k
            if pad[2 * k] or pad[2 * k + 1]:
                if dims[i].sharded:
                    constant = node.target is not aten.pad.default or arg(node, "mode") in (None, "constant")
                    padded = pad_end(dims[i], pad[2 * k], pad[2 * k + 1]) if constant else None  # the last chunk grows
                    if padded is None:
                        raise NeedGather("pads a split dim")
                    dims[i], local = padded
                    pad = list(pad)
                    pad[2 * k + 1] = local
                    node.args = (node.args[0], pad) + tuple(node.args[2:])
                    continue
                dims[i] = Dim.plain(out[i])
        return ShardedShape(tuple(dims))

    # -- attention ---------------------------------------------------------------------------
    @staticmethod
    def sdpa_inputs(node: torch.fx.Node) -> tuple:
        names = ("query", "key", "value", "attn_mask")
        args = list(node.args) + [None] * 4
        return tuple(node.kwargs.get(n, args[i]) for i, n in enumerate(names))

    def set_sdpa_inputs(self, node: torch.fx.Node, q, k, v, mask) -> None:
        args = list(node.args)
        args[0:3] = [q, k, v]
        if len(args) > 3 or mask is not None:
            if "attn_mask" in node.kwargs:
                node.kwargs = {**node.kwargs, "attn_mask": mask}
            else:
                args = args + [None] * (4 - len(args))
                args[3] = mask
        node.args = tuple(args)

    def rule_sdpa(self, node: torch.fx.Node) -> ShardedShape | None:
        if node.target is not SDPA:
            raise NeedGather("no sharding rule for vdopt's attention (sequence parallel runs before lowering)")
        q, k, v, mask = self.sdpa_inputs(node)
        lk, lv = self.layout(k), self.layout(v)
        kv_seq = any(lay is not None and lay.dims[2].sharded for lay in (lk, lv))
        if kv_seq:
            lq = self.layout(q)
            if self.seq_attention is None or lq is None or not lq.dims[2].sharded:
                raise NeedGather("keys split along the sequence but queries are not")
            return self.seq_attention(self, node)
        return self.local_sdpa(node)

    def rule_flex_attention(self, node: torch.fx.Node) -> tuple:
        """flex attention's mask and score modifications index whole sequences: with the
        sequence split only the ``seq_attention`` callback can keep it sharded (head-parallel,
        Ulysses); with the batch split each rank attends its own samples (``flex_local.py``)."""
        lq = self.layout(node.args[0])
        if lq is not None and lq.dims[2].sharded:
            if self.seq_attention is None:
                raise NeedGather("flex_attention runs on whole sequences")
            return self.seq_attention(self, node)
        return split_batch_flex_attention(self, node)

    def gather_factor(self, x: torch.fx.Node, layout: ShardedShape, dim: int, j: int,
                      purpose: str) -> tuple[torch.fx.Node, ShardedShape]:
        """``x`` with factor ``j`` of ``dim`` gathered over every axis of its split (others kept)."""
        f = layout.dims[dim].factors[j]
        out = self._gather_factor(x, dim, layout.dims[dim], j, len(f.split.axes), purpose)
        new = layout.with_dim(dim, layout.dims[dim].with_factor(j, Factor(f.label, f.size)))
        self.layouts[out] = new
        self.counts["gathers"] += 1
        return out, new

    def local_sdpa(self, node: torch.fx.Node) -> ShardedShape | None:
        """SDPA whose keys are whole on every rank: only batch, heads or query rows are split."""
        q, k, v, mask = self.sdpa_inputs(node)
        if self.is_sharded(mask) and self.layout(mask).aligned(4).dims[3].sharded:
            raise NeedGather("mask split along the keys")
        if node.kwargs.get("enable_gqa") and any(self.layout(t) is not None and self.layout(t).dims[1].sharded for t in (q, k, v)):
            raise NeedGather("grouped-query attention with split heads")
        lays = {t: self.layout(t) for t in (q, k, v) if self.layout(t) is not None}
        for t, lay in lays.items():
            if lay.dims[3].sharded or (t is not q and lay.dims[2].sharded):
                raise NeedGather("split head dim")
        out = self._out_shape(node)
        batch_heads = self._merge_dims(out[:2], [ShardedShape(lay.dims[:2]) for lay in lays.values()])
        lq = self.layout(q)
        q_rows = lq.dims[2] if lq is not None else Dim.plain(out[2])
        layout = ShardedShape(batch_heads.dims + (q_rows, Dim.plain(out[3])))
        new = []
        for t in (q, k, v):
            if self.is_sharded(t):
                new.append(t)
                continue
            shape = self.emit.shape(t)
            rows = (q_rows,) if t is q else (Dim.plain(shape[2]),)
            want = batch_heads.dims + rows
            need = [(e, want[e]) for e in range(3) if want[e].sharded and shape[e] == want[e].size]
            new.append(self.localize(t, need))
        if mask is not None and not self.is_sharded(mask):
            mshape = self.emit.shape(mask)
            want = ShardedShape(layout.dims[:3] + (Dim.plain(1),)).dims[4 - len(mshape):]
            need = [(e, want[e]) for e in range(len(mshape)) if want[e].sharded and mshape[e] == want[e].size and mshape[e] != 1]
            mask = self.localize(mask, need)
        self.set_sdpa_inputs(node, *new, mask)
        return self._finish(layout)

    _RULES: dict[DimOp, Callable[["ShardPropagator", torch.fx.Node], Any]] = {
        DimOp.GETITEM: rule_getitem, DimOp.CARRY: rule_carry, DimOp.ATTENTION: rule_sdpa,
        DimOp.RESHAPE: rule_reshape, DimOp.PERMUTE: rule_permute, DimOp.EXPAND: rule_expand,
        DimOp.SLICE: rule_slice, DimOp.SELECT: rule_select, DimOp.SPLIT: rule_split, DimOp.CAT: rule_cat,
        DimOp.STACK: rule_stack, DimOp.NORMALIZE: rule_mix_within, DimOp.ALONG: rule_mix_within,
        DimOp.TAKE_ALONG: rule_take_along, DimOp.INDEX: rule_index, DimOp.LOOKUP: rule_lookup,
        DimOp.OUTER: rule_outer, DimOp.REPEAT: rule_repeat,
        DimOp.REDUCE: rule_reduction, DimOp.LINEAR: rule_linear, DimOp.PER_SAMPLE: rule_per_sample,
        DimOp.MATMUL: rule_matmul, DimOp.EINSUM: rule_einsum, DimOp.REPEAT_INTERLEAVE: rule_repeat_interleave,
        DimOp.PAD: rule_pad, DimOp.METADATA: rule_metadata, DimOp.NEW: rule_new_tensor,
        DimOp.COMPLEX_VIEW: rule_complex_view,
        DimOp.IDENTITY: rule_same_layout, DimOp.POINTWISE: rule_pointwise,
    }
    """What this pass does per kind of op; kinds missing here (collectives) are gathered first."""
