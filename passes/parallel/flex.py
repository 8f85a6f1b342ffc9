"""flex attention under sequence parallelism: head-parallel (Ulysses) where valid, else gathered.

flex attention's ``score_mod`` and block mask index full-length positions. After Ulysses'
all-to-all every rank holds the whole sequence, in global order (replicated rows, such as a
model's own padding to the block size, where they were), for its own heads, so flex attention
runs there as on any split of the heads (and of the batch, under CFG parallel):
``dims/flex_local.py`` cuts the block mask to this rank's heads, gives ``score_mod`` and
``mask_mod`` global head indices where they read them, and gathers buffers and block mask
tensors computed from split tokens first.

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

from vdopt.passes.dims.flex_local import MASK_MOD_INDEX, SCORE_MOD_INDEX, local_flex_attention, reads_index
from vdopt.passes.dims.propagation import NeedGather, ShardPropagator
from vdopt.passes.dims.sharded_shape import Factor, ShardedShape
from vdopt.passes.parallel.ulysses import sequence_factor, with_head_factor

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
    q, k, v = node.args[:3]
    lays = [prop.layout(t) for t in (q, k, v)]
    if any(lay is None for lay in lays) or len({lay.dims[2].placement() for lay in lays}) != 1:
        raise NeedGather("q, k and v are split differently along the sequence")
    if len({lay.dims[0].placement() for lay in lays}) != 1 or any(lay.dims[3].sharded for lay in lays):
        raise NeedGather("batch split differently, or head dim split")
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
    # checked before any collective is emitted
    for t in node.args[4][:-1]:
        if isinstance(t, torch.fx.Node) and prop.global_shape(t)[1] not in (1, n_heads):
            raise NeedGather(f"block mask with {prop.global_shape(t)[1]} heads for {n_heads}")
    reads_index(prop.gm, node.args[3], SCORE_MOD_INDEX[1])
    reads_index(prop.gm, node.args[4][-1], MASK_MOD_INDEX[1])

    moved = [prop.reshard(t, with_head_factor(lay), src=(2, j), dst=(1, 0), purpose=purpose) for t, lay in zip((q, k, v), lays)]
    rest = moved[0][1].dims[2].factors[j].split  # USP: the tokens are still split over ring
    if rest is not None:
        moved = [prop.gather_factor(t, lay, 2, j, purpose) for t, lay in moved]
    (out, per_row, _), reads = local_flex_attention(prop, node, *(t for t, _ in moved), purpose=purpose)
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
    prop.notes[purpose] = ("ulysses (head-parallel flex_attention" + (f"; {', '.join(reads)} given global indices"
                           if reads else "") + ")" + (f", {rest.describe()} gathered" if rest else ""))
    return out, per_row, per_row
