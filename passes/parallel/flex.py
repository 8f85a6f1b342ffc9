"""flex attention under sequence parallelism: head-parallel (Ulysses) where valid, else gathered.

``torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options,
score_mod_other_buffers, mask_mod_other_buffers)`` modifies scores with a ``score_mod``
subgraph ``(score, b, h, q_idx, kv_idx, *buffers)`` and skips blocks by a block mask (sequence
lengths, ``(B, H, ...)`` block tensors, block sizes, and a ``mask_mod`` subgraph
``(b, h, q_idx, kv_idx, *buffers)``), all indexing full-length positions. After Ulysses'
all-to-all every rank holds the whole sequence, in global order (replicated rows, such as a
model's own padding to the block size, where they were), for its own heads, so flex
attention runs there with:

* block mask tensors with head dim 1 (broadcast) as they are; one entry per head cut to this
  rank's heads;
* ``score_mod`` and ``mask_mod`` as they are when their ``h`` argument is unused; else a copy
  of the subgraph that adds this rank's first head to ``h``, so it sees global head indices
  (and reads captured per-head buffers, which stay whole, at the right rows);
* captured buffers and block mask tensors computed from split tokens gathered first: they
  index full-length positions.

Uneven token or head counts give uneven all-to-all splits; no rank ever holds padding, so the
masks need no change. Under USP the Ulysses axis is all-to-all'd and the rest of the split
(ring) gathered before, and cut again after.

Grouped-query heads split too when both head counts divide over the ranks (each rank's query
heads keep the K/V head their group shares).

Otherwise (a block mask with another head count, grouped-query heads that do not divide, fewer
heads than ranks, a ``score_mod`` that is not a captured subgraph, and ring attention, which
would need the mask and score modifications cut per K/V block) the tokens are gathered before
it as for any op without a rule: exact; the reason is noted per attention in the pass's stats
(``flex_attention=``, in ``opt.report()``).

Legend: B batch, N heads, L sequence, D head dim.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from vdopt.passes.dims.propagation import NeedGather, ShardPropagator
from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape
from vdopt.passes.parallel.ulysses import sequence_factor, with_head_factor

_SCORE_MOD_HEAD = 2
"""Position of ``h`` among ``score_mod``'s placeholders (score, b, h, q_idx, kv_idx, buffers)."""
_MASK_MOD_HEAD = 1
"""Position of ``h`` among ``mask_mod``'s placeholders (b, h, q_idx, kv_idx, buffers)."""


def _subgraph(gm: torch.fx.GraphModule, mod: object) -> torch.fx.GraphModule | None:
    if isinstance(mod, torch.fx.Node) and mod.op == "get_attr":
        sub = operator.attrgetter(mod.target)(gm)
        return sub if isinstance(sub, torch.fx.GraphModule) else None
    return None


def reads_head(gm: torch.fx.GraphModule, mod: object, head: int) -> bool:
    """Whether subgraph ``mod`` (a ``get_attr`` node of ``gm``, or None) uses its head-index
    placeholder; raises ``NeedGather`` for anything that is not a captured subgraph."""
    if mod is None:
        return False
    sub = _subgraph(gm, mod)
    if sub is None:
        raise NeedGather("score_mod or mask_mod is not a captured subgraph")
    placeholders = list(sub.graph.find_nodes(op="placeholder"))
    if len(placeholders) <= head:
        raise NeedGather("score_mod or mask_mod without a head-index argument")
    return bool(placeholders[head].users)


def with_head_offset(prop: ShardPropagator, mod: torch.fx.Node, head: int, offset: int) -> torch.fx.Node:
    """A copy of subgraph ``mod`` that sees global head indices: its ``h`` placeholder (position
    ``head``) plus ``offset``, this rank's first head; a ``get_attr`` of it before the node."""
    sub = _subgraph(prop.gm, mod)
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(sub.graph, {}))
    h = list(graph.find_nodes(op="placeholder"))[head]
    with graph.inserting_after(h):
        shifted = graph.call_function(torch.ops.aten.add.Tensor, (h, offset))
    shifted.meta = dict(h.meta)  # the same 0-d integer tensor
    h.replace_all_uses_with(shifted, delete_user_cb=lambda u: u is not shifted)
    name, i = f"{mod.target}_heads_from_{offset}", 0
    while hasattr(prop.gm, name + (f"_{i}" if i else "")):
        i += 1
    name += f"_{i}" if i else ""
    setattr(prop.gm, name, torch.fx.GraphModule(sub, graph))
    with prop.graph.inserting_before(mod):
        attr = prop.graph.get_attr(name)
    attr.meta = {k: v for k, v in mod.meta.items() if k != "val"}
    return attr


def _head_dependent(prop: ShardPropagator, node: torch.fx.Node, heads: int) -> tuple[bool, bool]:
    """Whether ``score_mod`` and ``mask_mod`` read the head index; raises ``NeedGather`` for a
    block mask whose head dim is neither 1 (broadcast) nor one entry per head."""
    _, _, _, score_mod, block_mask = node.args[:5]
    for t in block_mask[:-1]:
        if isinstance(t, torch.fx.Node) and prop.global_shape(t)[1] not in (1, heads):
            raise NeedGather(f"block mask with {prop.global_shape(t)[1]} heads for {heads}")
    return reads_head(prop.gm, score_mod, _SCORE_MOD_HEAD), reads_head(prop.gm, block_mask[-1], _MASK_MOD_HEAD)


def flex_attention(prop: ShardPropagator, node: torch.fx.Node, purpose: str) -> tuple[ShardedShape, ...]:
    """Rewrite flex attention ``node``, whose q/k/v are split along the sequence, to run on
    this rank's heads over the whole sequence; returns the layouts of its three outputs
    (output, log-sum-exp, max). Raises ``NeedGather`` (noted under ``purpose``) where not valid."""
    try:
        layouts = _head_parallel(prop, node, purpose)
    except NeedGather as why:
        prop.notes[purpose] = f"gathered: {why}"
        raise
    return layouts


def _head_parallel(prop: ShardPropagator, node: torch.fx.Node, purpose: str) -> tuple[ShardedShape, ...]:
    if len(node.args) != 9 or node.kwargs:
        raise NeedGather("flex_attention with an unknown signature")
    q, k, v, score_mod, block_mask, scale, options, score_buffers, mask_buffers = node.args
    lays = [prop.layout(t) for t in (q, k, v)]
    if any(lay is None for lay in lays) or len({lay.dims[2].placement() for lay in lays}) != 1:
        raise NeedGather("q, k and v are split differently along the sequence")
    if any(lay.dims[0].sharded or lay.dims[3].sharded for lay in lays):
        raise NeedGather("batch or head dim split")
    j = sequence_factor(lays[0])
    split = lays[0].dims[2].factors[j].split
    group = split.axes[-1]
    if group.axis != "ulysses":
        raise NeedGather(f"tokens split over {group.axis}: flex_attention runs head-parallel under Ulysses "
                         "only (ring attention would need its mask and score modifications cut per K/V block)")
    n_heads, kv_heads = lays[0].dims[1].size, {lay.dims[1].size for lay in lays[1:]}
    if len(kv_heads) != 1:
        raise NeedGather("k and v have different head counts")
    if n_heads < group.size:
        raise NeedGather(f"{n_heads} heads cannot be split over {group.size} ranks")
    if kv_heads != {n_heads} and (n_heads % group.size or kv_heads.pop() % group.size):
        # even chunks keep each rank's query heads with the k/v head their group shares
        raise NeedGather(f"grouped-query heads that do not divide over the {group.size} ranks")
    score_reads_head, mask_reads_head = _head_dependent(prop, node, n_heads)

    moved = [prop.reshard(t, with_head_factor(lay), src=(2, j), dst=(1, 0), purpose=purpose) for t, lay in zip((q, k, v), lays)]
    rest = moved[0][1].dims[2].factors[j].split  # USP: the tokens are still split over ring
    if rest is not None:
        moved = [prop.gather_factor(t, lay, 2, j, purpose) for t, lay in moved]
    lq = moved[0][1]

    def whole(x):  # indexed by full-length positions
        return prop.gather(x, purpose) if isinstance(x, torch.fx.Node) and prop.is_sharded(x) else x

    def own_heads(x):
        if not isinstance(x, torch.fx.Node):
            return x
        x = whole(x)
        return prop.localize(x, [(1, lq.dims[1])] if prop.emit.shape(x)[1] == n_heads else [])

    mask_mod = block_mask[-1]
    offset = lq.dims[1].factors[0].split.offset
    if offset and score_reads_head:
        score_mod = with_head_offset(prop, score_mod, _SCORE_MOD_HEAD, offset)
    if offset and mask_reads_head:
        mask_mod = with_head_offset(prop, mask_mod, _MASK_MOD_HEAD, offset)
    block_mask = tuple(own_heads(t) for t in block_mask[:-1]) + (mask_mod,)
    node.args = (*(t for t, _ in moved), score_mod, block_mask, scale, options,
                 tuple(whole(b) for b in score_buffers), tuple(whole(b) for b in mask_buffers))
    prop.emit.revalue(node)
    out = ShardedShape(lq.dims[:3] + (Dim.plain(prop.emit.shape(v)[-1]),))
    per_row = ShardedShape(lq.dims[:3])
    for u in list(node.users):
        if u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0:
            continue
        # the output goes back to "all heads, my tokens" right after the attention
        prop.emit.revalue(u)
        prop.layouts[u] = out
        users = list(u.users)
        with prop.graph.inserting_before(u.next):
            back, lay = u, out
            if rest is not None:
                f = out.dims[2].factors[j]
                lay = out.with_dim(2, out.dims[2].with_factor(j, Factor(f.label, f.size, rest)))
                back = prop.localize(u, [(2, lay.dims[2])])
                prop.layouts[back] = lay
            back, _ = prop.reshard(back, lay, src=(1, 0), dst=(2, j), purpose=purpose, y_split=split)
        for x in users:
            x.replace_input_with(u, back)
    reads = [m for m, r in (("score_mod", score_reads_head), ("mask_mod", mask_reads_head)) if r]
    prop.notes[purpose] = ("ulysses (head-parallel flex_attention" + (f"; {', '.join(reads)} given global head indices"
                           if reads else "") + ")" + (f", {rest.describe()} gathered" if rest else ""))
    return out, per_row, per_row
