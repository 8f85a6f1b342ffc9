"""flex attention on a split batch or split heads: each rank attends its own samples and heads.

``torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options,
score_mod_other_buffers, mask_mod_other_buffers)`` modifies scores with a ``score_mod``
subgraph ``(score, b, h, q_idx, kv_idx, *buffers)`` and skips blocks by a block mask (sequence
lengths, ``(B, H, ...)`` block tensors, block sizes, and a ``mask_mod`` subgraph
``(b, h, q_idx, kv_idx, *buffers)``), all indexing whole tensors. With q, k and v split along
the batch (CFG parallel) and/or the heads (after Ulysses' all-to-all, ``parallel/flex.py``)
and whole along the sequence, a rank runs flex attention on its part with:

* block mask tensors with batch or head dim 1 (broadcast) as they are; those with one entry per
  sample or head cut to this rank's (kept where they were computed split that way already);
* ``score_mod`` and ``mask_mod`` as they are when they do not read the index of a split dim;
  else a copy of the subgraph that adds this rank's first sample or head to ``b`` or ``h``, so
  it sees global indices (and reads captured per-sample or per-head buffers, which stay whole,
  at the right rows);
* captured buffers gathered first where they were computed from split values.

A split that is not one contiguous chunk of the dim (a dim of several factors with an inner one
split) has no single first index: ``NeedGather``.

Legend: B batch, N heads, L sequence, D head dim.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx

from vdopt.passes.dims.need_gather import NeedGather
from vdopt.passes.dims.sharded_shape import Dim, ShardedShape

if TYPE_CHECKING:
    from vdopt.passes.dims.propagation import ShardPropagator

SCORE_MOD_INDEX = {0: 1, 1: 2}
"""Split dim of q (0 batch, 1 heads) -> position of its index among ``score_mod``'s placeholders."""
MASK_MOD_INDEX = {0: 0, 1: 1}
"""Split dim of q (0 batch, 1 heads) -> position of its index among ``mask_mod``'s placeholders."""
_INDEX_NAME = {0: "sample", 1: "head"}


def _subgraph(gm: torch.fx.GraphModule, mod: object) -> torch.fx.GraphModule | None:
    if isinstance(mod, torch.fx.Node) and mod.op == "get_attr":
        sub = operator.attrgetter(mod.target)(gm)
        return sub if isinstance(sub, torch.fx.GraphModule) else None
    return None


def reads_index(gm: torch.fx.GraphModule, mod: object, position: int) -> bool:
    """Whether subgraph ``mod`` (a ``get_attr`` node of ``gm``, or None) uses its placeholder
    at ``position``; raises ``NeedGather`` for anything that is not a captured subgraph."""
    if mod is None:
        return False
    sub = _subgraph(gm, mod)
    if sub is None:
        raise NeedGather("score_mod or mask_mod is not a captured subgraph")
    placeholders = list(sub.graph.find_nodes(op="placeholder"))
    if len(placeholders) <= position:
        raise NeedGather("score_mod or mask_mod without batch and head index arguments")
    return bool(placeholders[position].users)


def with_index_offsets(prop: "ShardPropagator", mod: torch.fx.Node, offsets: dict[int, int]) -> torch.fx.Node:
    """A copy of subgraph ``mod`` whose placeholders at the positions of ``offsets`` see global
    indices (plus this rank's first sample or head); a ``get_attr`` of it before the node."""
    sub = _subgraph(prop.gm, mod)
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(sub.graph, {}))
    placeholders = list(graph.find_nodes(op="placeholder"))
    for position, offset in offsets.items():
        index = placeholders[position]
        with graph.inserting_after(index):
            shifted = graph.call_function(torch.ops.aten.add.Tensor, (index, offset))
        shifted.meta = dict(index.meta)  # the same 0-d integer tensor
        index.replace_all_uses_with(shifted, delete_user_cb=lambda u, s=shifted: u is not s)
    name = f"{mod.target}_from_" + "_".join(str(o) for o in offsets.values())
    unique, i = name, 0
    while hasattr(prop.gm, unique):
        i += 1
        unique = f"{name}_{i}"
    setattr(prop.gm, unique, torch.fx.GraphModule(sub, graph))
    with prop.graph.inserting_before(mod):
        attr = prop.graph.get_attr(unique)
    attr.meta = {k: v for k, v in mod.meta.items() if k != "val"}
    return attr


def first_index(d: Dim) -> int:
    """This rank's first global index along split dim ``d``, which must be one contiguous chunk."""
    split = [j for j, f in enumerate(d.factors) if f.split is not None]
    if d.joint or split != [0]:
        raise NeedGather("a split batch or head dim that is not one contiguous chunk")
    inner = 1
    for f in d.factors[1:]:
        inner *= f.size
    return d.factors[0].split.offset * inner


def local_flex_attention(prop: "ShardPropagator", node: torch.fx.Node, q: torch.fx.Node, k: torch.fx.Node,
                         v: torch.fx.Node, purpose: str) -> tuple[tuple[ShardedShape, ...], list[str]]:
    """Rewrite flex attention ``node`` to attend ``q``, ``k``, ``v``: split along the batch and/or
    heads (k and v consistently with q), whole along the sequence and head dim. Returns the
    layouts of its outputs (output, log-sum-exp, max) and the modifications given global
    indices, e.g. ``["score_mod (head)"]``. Raises ``NeedGather`` where not valid."""
    if len(node.args) != 9 or node.kwargs:
        raise NeedGather("flex_attention with an unknown signature")
    _, _, _, score_mod, block_mask, scale, options, score_buffers, mask_buffers = node.args
    lq = prop.layout(q)
    split = {i: lq.dims[i] for i in (0, 1) if lq.dims[i].sharded}
    starts = {i: first_index(d) for i, d in split.items()}

    def whole(x):
        return prop.gather(x, purpose) if isinstance(x, torch.fx.Node) and prop.is_sharded(x) else x

    def own_part(x):
        if not isinstance(x, torch.fx.Node):
            return x
        shape = prop.global_shape(x)
        for i, d in split.items():
            if shape[i] not in (1, d.size):
                raise NeedGather(f"block mask with {shape[i]} entries along dim {i} for {d.size}")
        cut = [(i, d) for i, d in split.items() if shape[i] == d.size]
        lay = prop.layout(x)
        if lay is not None and set(lay.sharded_dims) == {i for i, _ in cut} and all(
                lay.dims[i].placement() == d.placement() for i, d in cut):
            return x  # computed split like q already
        return prop.localize(whole(x), cut)

    reads, mods = [], {}
    for label, mod, where in (("score_mod", score_mod, SCORE_MOD_INDEX), ("mask_mod", block_mask[-1], MASK_MOD_INDEX)):
        read = [i for i in starts if reads_index(prop.gm, mod, where[i])]
        reads += [f"{label} ({_INDEX_NAME[i]})" for i in read]
        offsets = {where[i]: starts[i] for i in read if starts[i]}
        mods[label] = with_index_offsets(prop, mod, offsets) if offsets else mod
    block_mask = tuple(own_part(t) for t in block_mask[:-1]) + (mods["mask_mod"],)
    node.args = (q, k, v, mods["score_mod"], block_mask, scale, options,
                 tuple(whole(b) for b in score_buffers), tuple(whole(b) for b in mask_buffers))
    prop.emit.revalue(node)
    out = ShardedShape(lq.dims[:3] + (Dim.plain(prop.emit.shape(v)[-1]),))
    per_row = ShardedShape(lq.dims[:3])
    return (out, per_row, per_row), reads


def split_batch_flex_attention(prop: "ShardPropagator", node: torch.fx.Node) -> tuple[ShardedShape, ...]:
    """flex attention ``node`` whose q is split along the batch only (CFG parallel): attends this
    rank's samples; k and v computed whole are cut to them."""
    q, k, v = node.args[:3]
    lq = prop.layout(q)
    if lq is None or lq.sharded_dims != [0]:
        raise NeedGather("flex_attention runs on whole sequences and heads (split outside Ulysses)")
    kv = []
    for t in (k, v):
        lay = prop.layout(t)
        if lay is None:
            t = prop.localize(t, [(0, lq.dims[0])] if prop.global_shape(t)[0] == lq.dims[0].size else [])
        elif lay.sharded_dims != [0] or lay.dims[0].placement() != lq.dims[0].placement():
            raise NeedGather("k or v split unlike q")
        kv.append(t)
    layouts, _ = local_flex_attention(prop, node, q, *kv, purpose=f"flex_attention {node.name}")
    return layouts
