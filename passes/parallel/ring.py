"""Ring attention at one attention site: K/V blocks passed rank to rank, merged by log-sum-exp.

The SDPA node becomes one ``vdopt::ring_attention`` node (see ``vdopt/ring_attention.py``):
queries stay on their rank; each K/V block travels once around the ring group. Replicated
text keys of a joint text+video sequence are passed as fixed keys, attended once before the
ring, so each text key is seen exactly once per query; replicated text queries are computed
by every rank (their output stays replicated). Masks are cut to the local queries and to
each K/V block's keys.

Legend: B batch, N heads, L sequence, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from vdopt import meta
from vdopt.collectives import CommRecord
from vdopt.passes.dims.propagation import NeedGather, ShardPropagator
from vdopt.passes.dims.sharded_shape import Dim, ShardedShape
from vdopt.passes.parallel.ulysses import sequence_factor
from vdopt.ring_attention import ring_bytes_sent

def _ring_op():
    import vdopt.ops  # noqa: F401  (registers vdopt::ring_attention)

    return torch.ops.vdopt.ring_attention.default


def _body_and_fixed(prop: ShardPropagator, x: torch.fx.Node, d: Dim, dim: int):
    em = prop.emit
    body = em.slice(x, dim, d.pre, d.pre + d.local_body)
    rows = []
    if d.pre:
        rows.append(em.slice(x, dim, 0, d.pre))
    if d.post:
        rows.append(em.slice(x, dim, d.pre + d.local_body, d.local_size))
    return body, (em.cat(rows, dim) if rows else None)


def ring_attention(prop: ShardPropagator, node: torch.fx.Node, purpose: str) -> tuple[torch.fx.Node, ShardedShape, ShardedShape]:
    """Replace SDPA ``node`` (q/k/v split along the sequence over the ring axis) by ring attention."""
    q, k, v, mask = prop.sdpa_inputs(node)
    lq, lk, lv = (prop.layout(t) for t in (q, k, v))
    if lk is None or lv is None or not (lq.dims[2].placement() == lk.dims[2].placement() == lv.dims[2].placement()):
        raise NeedGather("q, k and v are split differently along the sequence")
    if lq.dims[:2] != lk.dims[:2] or lk.dims[:2] != lv.dims[:2]:
        raise NeedGather("q, k and v are split differently along batch or heads")
    args = list(node.args) + [None] * 8
    dropout = node.kwargs.get("dropout_p", args[4]) or 0.0
    causal = node.kwargs.get("is_causal", args[5]) or False
    if dropout or causal or node.kwargs.get("enable_gqa"):
        raise NeedGather("ring attention supports neither dropout, causal masks nor GQA")
    j = sequence_factor(lq)
    dq = lq.dims[2]
    split = dq.factors[j].split
    if len(split.axes) != 1:
        raise NeedGather("ring attention needs the sequence split over the ring axis only")
    group = split.axes[0]
    rest = math.prod(f.size for i, f in enumerate(dq.factors) if i != j)
    block_lens = [n * rest for n in split.sizes]
    em = prop.emit
    scale = node.kwargs.get("scale")  # keyword-only in SDPA's schema
    if scale is None:
        scale = 1.0 / math.sqrt(em.shape(q)[-1])
    kb, kf = _body_and_fixed(prop, k, dq, 2)
    vb, vf = _body_and_fixed(prop, v, dq, 2)
    mb = mf = None
    if mask is not None:
        if prop.is_sharded(mask):
            raise NeedGather("mask computed from split values")
        mshape = em.shape(mask)
        want = ShardedShape(lq.dims[:3] + (Dim.plain(1),)).dims[4 - len(mshape):]
        need = [(e, want[e]) for e in range(len(mshape) - 1) if want[e].sharded and mshape[e] == want[e].size and mshape[e] != 1]
        mask = prop.localize(mask, need)
        if mshape[-1] == 1:
            mb = mf = mask
        else:
            if len(dq.factors) != 1:
                raise NeedGather("mask over keys of an interleaved split")
            kdim = len(mshape) - 1
            mb = em.slice(mask, kdim, dq.pre, dq.pre + dq.body)
            rows = ([em.slice(mask, kdim, 0, dq.pre)] if dq.pre else []) + (
                [em.slice(mask, kdim, dq.pre + dq.body, dq.size)] if dq.post else [])
            mf = em.cat(rows, kdim) if rows else None
    ring = em.call(_ring_op(), (q, kb, vb, kf, vf, mb, mf, block_lens, float(scale), group.group_name), like=node)
    if meta.SITE in node.meta:
        ring.meta[meta.SITE] = node.meta[meta.SITE]
    kval, vval = kb.meta["val"], vb.meta["val"]
    key_bytes = (kval.numel() // max(1, kval.shape[-2]) * kval.dtype.itemsize
                 + vval.numel() // max(1, vval.shape[-2]) * vval.dtype.itemsize)
    ring.meta[meta.COMM] = CommRecord(kind="p2p", bytes=ring_bytes_sent(block_lens, group.rank, key_bytes),
                                      purpose=purpose, axis=group.axis)
    out_layout = ShardedShape(lq.dims[:3] + (Dim.plain(em.shape(v)[-1]),))
    prop.layouts[ring] = out_layout
    prop.notes[purpose] = "ring"
    return ring, out_layout, out_layout
