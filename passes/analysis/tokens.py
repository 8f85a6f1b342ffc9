"""Where each attention's token dim is created: the sequence dim found from the Q/K/V shape flow.

Sequence parallelism (Ulysses, Ring, USP) only needs to know which dim of which node holds
the latent's tokens before the first block: it shards that dim there and the sharding
propagator carries it to every attention. That node is found by walking *back* from each
self-attention's query sequence dim (dim 2 of SDPA's ``(B, N, L, D)`` query) through the op
table of the dimension core (``dims/rules.py``), dim by dim:

* permutes, complex views (RoPE), elementwise ops (every operand whose aligned dim has the same size), norms,
  linears and matmuls (the left operand), slices and splits keep the dim: follow it;
* a concatenation along the dim (text tokens joined to video tokens) follows the operands
  computed from the latent: the text rows stay replicated;
* an attention output's sequence dim is its query's (SDPA's, and flex attention's);
* a reshape follows the dim when one input dim maps onto it whole; when it *merges* input
  dims into it (``flatten`` of the ``(T, H, W)`` grid of a patch embedding, of any kind),
  the walk stops there and the merged sizes are the grid factors;
* anything else (a placeholder: pre-patchified tokens or packed latents; an op without a
  rule) stops the walk: the token dim is created there.

Only stops computed from the video latent count (RoPE tables and text are replicated inputs
of the same ops). The origin shared by the self-attention sites is the token stream.

Legend: B batch, N heads, L sequence, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import guard_or_true, statically_known_true

from vdopt.passes.dims.rules import FLEX_ATTENTION, DimOp, dim_args, dim_map, op_rule, permutation, shape_of

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@dataclasses.dataclass(frozen=True)
class TokenOrigin:
    """Where the latent's token dim is created."""

    node: torch.fx.Node
    """The node whose dim ``dim`` holds the tokens (a placeholder, a patch embedding's flatten, ...)."""
    dim: int
    """The token dim of ``node``."""
    size: int
    """Number of tokens."""
    grid: tuple[int, ...] = ()
    """The sizes merged into the token dim where it was created by a reshape (e.g. ``(T, H, W)``),
    size-1 entries left out; empty when the tokens arrive already flat."""


def _reshape_source(node: torch.fx.Node, dim: int) -> tuple[int | None, tuple[int, ...]]:
    """For output ``dim`` of a reshape: the input dim holding it whole (or None), and when the
    dim merges several input dims, their sizes."""
    x = node.args[0]
    ins, out = shape_of(x), shape_of(node)
    if ins is None or out is None:
        return None, ()
    # size-oblivious where a size comes from tensor values (u0): equal only if equal for every
    # value; an unknown order taken as "the size is large" (guard_or_true), as torch does
    after = math.prod(out[dim + 1:])
    for i in range(len(ins)):
        if not statically_known_true(math.prod(ins[i + 1:]) == after):
            continue
        # input dims i0..i multiply to out[dim]: merged (or one dim kept whole)
        acc, j = 1, i
        while j >= 0 and guard_or_true(acc < out[dim]):
            acc *= ins[j]
            j -= 1
        if not statically_known_true(acc == out[dim]):
            continue
        merged = tuple(s for s in ins[j + 1: i + 1] if guard_or_true(s != 1))
        if len(merged) <= 1:
            k = next((m for m in range(j + 1, i + 1) if statically_known_true(ins[m] == out[dim])), None)
            return k, ()
        return None, merged
    return None, ()


def _back(node: torch.fx.Node, dim: int, from_latent: set[torch.fx.Node]) -> list[tuple[torch.fx.Node, int]] | None:
    """The (input, dim) pairs that output ``dim`` of ``node`` comes from; None: created here."""
    if node.op != "call_function":
        return None
    if node.target is SDPA:
        return [(node.args[0], dim)] if dim == 2 else None
    rule = op_rule(node.target)
    if rule is None:
        return None
    size = shape_of(node)[dim] if shape_of(node) is not None else None
    kind = rule.kind
    if kind is DimOp.GETITEM:
        parent, _ = node.args
        if parent.op == "call_function" and parent.target is FLEX_ATTENTION:  # output, log-sum-exp, max
            return [(parent.args[0], dim)] if dim == 2 else None
        prule = op_rule(parent.target) if parent.op == "call_function" else None
        if prule is not None and prule.kind is DimOp.SPLIT:
            return [(parent.args[0], dim)]
        if prule is not None and prule.kind is DimOp.SELECT and parent.target is not aten.select.int:
            (d,) = dim_args(parent)
            return [(parent.args[0], dim + (dim >= d))]
        return None
    if kind is DimOp.PERMUTE:
        return [(node.args[0], permutation(node)[dim])]
    if kind is DimOp.RESHAPE:
        src, _ = _reshape_source(node, dim)
        return [(node.args[0], src)] if src is not None else None
    if kind is DimOp.CAT:
        (d,) = dim_args(node)
        xs = [x for x in node.args[0] if isinstance(x, torch.fx.Node)]
        if d == dim:
            return [(x, dim) for x in xs if x in from_latent] or None
        return [(x, dim) for x in xs]
    if kind is DimOp.POINTWISE:
        out_rank = len(shape_of(node))
        found = []
        for a in node.all_input_nodes:
            s = shape_of(a)
            if s is None:
                continue
            e = dim - (out_rank - len(s))
            if e >= 0 and s[e] == size:
                found.append((a, e))
        return found or None
    dm = dim_map(node)
    if dm is None:
        return None
    for i, o in enumerate(dm.out):
        if o == dim and i not in dm.mixed:
            x = node.args[0]
            x = x[0] if isinstance(x, (list, tuple)) else x
            return [(x, i)] if isinstance(x, torch.fx.Node) else None
    return None


def origins_from(starts: list[tuple[torch.fx.Node, int]], from_latent: set[torch.fx.Node]) -> list[TokenOrigin]:
    """Where the given (node, dim)s are created, among nodes computed from the latent."""
    found: dict[tuple[torch.fx.Node, int], TokenOrigin] = {}
    seen: set[tuple[torch.fx.Node, int]] = set()
    stack = list(starts)
    while stack:
        node, dim = stack.pop()
        if (node, dim) in seen or node not in from_latent:
            continue
        seen.add((node, dim))
        srcs = _back(node, dim, from_latent)
        if srcs:
            stack.extend(srcs)
            continue
        grid = ()
        if _is_reshape(node):
            grid = _reshape_source(node, dim)[1]
        found[(node, dim)] = TokenOrigin(node=node, dim=dim, size=shape_of(node)[dim], grid=grid)
    return list(found.values())


def origins_of(sdpa: torch.fx.Node, from_latent: set[torch.fx.Node]) -> list[TokenOrigin]:
    """Where the query sequence dim of ``sdpa`` is created, among nodes computed from the latent."""
    return origins_from([(sdpa.args[0], 2)], from_latent)


def _is_reshape(node: torch.fx.Node) -> bool:
    rule = op_rule(node.target) if node.op == "call_function" else None
    return rule is not None and rule.kind is DimOp.RESHAPE


def _containing_input_dim(node: torch.fx.Node, dim: int) -> int | None:
    """For output ``dim`` of a reshape that *splits* an input dim (``(B, T*S, C) -> (B*T, S, C)``):
    the input dim it is cut from."""
    ins, out = shape_of(node.args[0]), shape_of(node)
    if ins is None or out is None or not all(isinstance(s, int) for s in (*ins, *out)):
        return None  # data-dependent sizes: left where they are (no guard on them)
    stride, span = math.prod(out[dim + 1:]), math.prod(out[dim:])
    for i in range(len(ins)):
        in_stride = math.prod(ins[i + 1:])
        if ins[i] > out[dim] and in_stride <= stride and stride % in_stride == 0 and in_stride * ins[i] >= span:
            return i
    return None


def stream_origin(sdpas: list[torch.fx.Node], from_latent: set[torch.fx.Node]) -> TokenOrigin | None:
    """Where the latent's whole token stream is created: the attention sites' origins, followed
    back through reshapes that cut the stream apart (spatial attention's ``(B*T, H*W)``, temporal
    attention's ``(B*H*W, T)``) to the dim they are cut from; the longest such origin."""
    found: dict[tuple[torch.fx.Node, int], TokenOrigin] = {}
    for s in sdpas:
        todo = origins_of(s, from_latent)
        while todo:
            o = todo.pop()
            src = _containing_input_dim(o.node, o.dim) if _is_reshape(o.node) and not o.grid else None
            if src is None:
                found.setdefault((o.node, o.dim), o)
            else:
                todo.extend(origins_from([(o.node.args[0], src)], from_latent))
    if not found:
        return None
    order = {n: i for i, n in enumerate(sdpas[0].graph.nodes)}
    return max(found.values(), key=lambda o: (o.size if isinstance(o.size, int) else -1, -order[o.node]))


def find_token_origin(sdpas: list[torch.fx.Node], from_latent: set[torch.fx.Node]) -> TokenOrigin | None:
    """The origin most self-attention sites in ``sdpas`` share (earliest in graph order on a tie)."""
    order = {n: i for i, n in enumerate(sdpas[0].graph.nodes)} if sdpas else {}
    votes: Counter = Counter()
    by_key: dict[tuple[torch.fx.Node, int], TokenOrigin] = {}
    for s in sdpas:
        for o in origins_of(s, from_latent):
            votes[(o.node, o.dim)] += 1
            by_key[(o.node, o.dim)] = o
    if not votes:
        return None
    best = max(votes.items(), key=lambda kv: (kv[1], -order[kv[0][0]]))[0]
    return by_key[best]
