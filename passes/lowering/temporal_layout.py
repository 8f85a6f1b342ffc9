"""Run temporal blocks in the latent's own token layout, so their permutes disappear.

Legend: B batch, T frames, HW spatial positions, C channels, N heads, D head dim,
P = B*HW temporal sequences.

Video DiTs with separate temporal attention (Latte, Open-Sora, Open-Sora-Plan) turn the latent
``(B, T, HW, C)`` into ``P`` sequences of ``T`` tokens before each temporal block and back after
it::

    x = x.reshape(B, T, HW, C).permute(0, 2, 1, 3).reshape(B * HW, T, C)   # entry: a copy
    ... norms, linears, temporal attention (B*HW, N, T, D), MLP ...        # all per token
    x = x.reshape(B, HW, T, C).permute(0, 2, 1, 3).reshape(B * T, HW, C)   # exit: a copy

Everything in between works per token (linear, norms, elementwise ops), per head on the last
dims (q/k norms, rotary embeddings: unflatten/select/unbind/stack/flatten of D), splits and
merges heads (separate or fused QKV projections), or is the attention; and the temporal kernel
reads a ``(B, HW, N, T, D)`` strided view of the unpermuted projections in place
(``kernels/temporal_attention.py``). So the region can run on
``(B, T, HW, C)`` tensors: the entry becomes the latent itself, per-token ops run unchanged,
operands that broadcast over the sequences (adaLN shift/scale per sequence, a positional
embedding or rotary table per frame) are re-viewed to match, the heads are split as a 5-D view, and the exit
is the region's last tensor, with no copy either side.

A region is rewritten only when every use of every tensor in it is understood (a per-token op,
the head split and merge around ``vdopt::attention``, or the exit pattern) and it contains an
attention: anything else (an all-to-all, the LSE output, an op not listed) leaves the region
as it is, counted in the stats as ``kept_<op>``. It runs after ``sdpa_to_triton``: SDPA cannot
take the 5-D view, only vdopt's kernels can.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter
from typing import Any, ClassVar

import torch
import torch.fx
from torch.utils import _pytree as pytree
from vdopt import meta
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.dims.emit import Emitter
from vdopt.passes.dims.rules import (
    DimOp, OpRule, arg, dim_args, dim_map, dim_rank, first_input, op_rule, permutation, with_arg,
)
from vdopt.passes.graph_utils import refresh_values

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SWAP_1_2 = (0, 2, 1, 3)
_PACKED_TO_SEQS = (2, 0, 3, 1, 4)
_TRAILING = {DimOp.LINEAR, DimOp.NORMALIZE, DimOp.REDUCE, DimOp.ALONG, DimOp.RESHAPE, DimOp.SELECT,
             DimOp.SLICE, DimOp.STACK, DimOp.CAT}
"""Kinds of ops that run unchanged on the region's layout when every dim they touch comes after
the grid (rotary embeddings' unflatten/unbind/stack/flatten of D, norms, projections); their
dim arguments are rewritten to count from the end."""

# Roles of the region's nodes: what the old tensor is and what replaces it.
TOKENS = "tokens"  # (P, T, C) -> (B, T, HW, C)
HEADS = "heads"  # (P, T, N, D) -> (B, T, HW, N, D)
SEQS = "seqs"  # (P, N, T, D) -> (B, HW, N, T, D), the attention operands and output
PACKED = "packed"  # fused projection split, (P, T, 3, N, D) -> (B, T, HW, 3, N, D)
PACKED_SEQS = "packed_seqs"  # (3, P, N, T, D) -> (3, B, HW, N, T, D)
UNBOUND = "unbound"  # unbind of PACKED_SEQS; its items are SEQS
UNBOUND_OF = {role: f"unbound_{role}" for role in (TOKENS, HEADS, SEQS)}  # unbind of a trailing dim
ATTENTION = "attention"  # vdopt::attention on SEQS operands -> the same op on the 5-D views
BY_POSITION = "by_position"  # (B, HW, T, C), the first half of the exit -> nothing
EXIT = "exit"  # (B, T, HW, C) -> the region's own tensor; uses are rewired, no node


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """The latent's token grid around one temporal region."""

    batch: int
    """B."""
    frames: int
    """T, the temporal sequence length."""
    positions: int
    """HW, the number of temporal sequences per batch entry."""

    @property
    def sequences(self) -> int:
        return self.batch * self.positions


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemporalRegion:
    """The nodes between one temporal entry and its exits, with their roles."""

    entry: torch.fx.Node
    """The ``(P, T, C)`` reshape of the permuted latent."""
    latent: torch.fx.Node
    """The ``(B, T, HW, C)`` tensor the entry permutes: the region starts from it."""
    layout: TokenLayout
    """B, T and HW."""
    roles: dict[torch.fx.Node, str]
    """Every node of the region (entry first, graph order) and its role."""
    reason: str | None
    """Why the region is left as it is; None when it is rewritten."""

    @property
    def attentions(self) -> int:
        return sum(role == ATTENTION for role in self.roles.values())


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _rule(node: Any) -> OpRule | None:
    return op_rule(node.target) if isinstance(node, torch.fx.Node) and node.op == "call_function" else None


def _kind(node: Any) -> DimOp | None:
    rule = _rule(node)
    return rule.kind if rule is not None else None


def _is_reshape(node: Any) -> bool:
    """A view or reshape to a literal shape (not flatten, unflatten or (un)squeeze)."""
    rule = _rule(node)
    return rule is not None and rule.kind is DimOp.RESHAPE and rule.sizes in ("size", "shape")


def _permutation(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The permutation a permute/transpose node applies, or None for other nodes."""
    return tuple(permutation(node)) if _kind(node) is DimOp.PERMUTE else None


def _entry_layout(node: torch.fx.Node) -> tuple[torch.fx.Node, TokenLayout] | None:
    """``(latent, layout)`` when ``node`` is ``reshape(swap12(latent (B, T, HW, C)), (B*HW, T, C))``."""
    if not _is_reshape(node):
        return None
    swapped = node.args[0]
    if _kind(swapped) is not DimOp.PERMUTE:
        return None
    latent, shape, out = swapped.args[0], _shape(swapped.args[0]), _shape(node)
    if shape is None or len(shape) != 4 or out is None or _permutation(swapped) != _SWAP_1_2:
        return None
    batch, frames, positions, channels = shape
    if out != (batch * positions, frames, channels):
        return None
    return latent, TokenLayout(batch, frames, positions)


_GRID = {TOKENS: 2, HEADS: 2, SEQS: 3}
"""Roles per-element ops may act on, with their leading "grid" dims (P and T, plus N for SEQS);
the dims after them (C, or N and D) are the same in both layouts."""
_FRAME_DIM = {TOKENS: 1, HEADS: 1, SEQS: 2}


def _padded(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (1,) * (rank - len(shape)) + shape


def _side_fits(node: Any, role: str, rank: int, layout: TokenLayout) -> bool:
    """An operand outside the region that broadcasts against a rank-``rank`` ``role`` tensor
    along P and T as a whole."""
    shape = _shape(node)
    if shape is None:
        return not isinstance(node, torch.fx.Node)  # Python scalars
    if len(shape) > rank:
        return False
    padded = _padded(shape, rank)
    return padded[0] in (1, layout.sequences) and padded[_FRAME_DIM[role]] in (1, layout.frames)


def _side_order(role: str, rank: int) -> list[int] | None:
    """How a side re-viewed as ``(B or 1, HW or 1, *rest)`` is permuted into ``role``'s layout."""
    return None if role == SEQS else [0, 2, 1, *range(3, rank + 1)]


def _touched_dims(node: torch.fx.Node) -> set[int] | None:
    """The dims a trailing-kind op names, mixes or removes (None: all of them)."""
    named = dim_args(node)
    if named is None:
        return None
    mapping = dim_map(node)
    touched = set(named)
    if mapping is not None:
        touched |= set(mapping.mixed) | {d for d, to in enumerate(mapping.out) if to is None}
    return touched


def _dims_from_end(node: torch.fx.Node, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with the op's dim arguments counted from the end (the region's layout
    has one more leading dim, so dims after the grid keep their negative index)."""
    rule = op_rule(node.target)
    rank = dim_rank(node, rule)
    for name in rule.dims:
        value = arg(node, name)
        from_end = [d % rank - rank for d in value] if isinstance(value, (list, tuple)) else value % rank - rank
        args, kwargs = with_arg(node.target, args, kwargs, name, from_end)
    return args, kwargs


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    flat = pytree.tree_leaves((node.args, node.kwargs))
    return [a for a in flat if isinstance(a, torch.fx.Node)]


def _role(node: torch.fx.Node, roles: dict[torch.fx.Node, str], layout: TokenLayout) -> str | None:
    """The role of a node that reads the region, or None when it cannot be moved."""
    if node.op != "call_function":
        return None
    source = roles.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
    out = _shape(node)
    p, t = layout.sequences, layout.frames
    if _is_reshape(node) and source is not None and out is not None:
        if len(_shape(node.args[0])) != {TOKENS: 3, HEADS: 4}.get(source):
            return None
        if source == TOKENS and len(out) == 4 and out[:2] == (p, t):
            return HEADS
        if source == TOKENS and len(out) == 5 and out[:3] == (p, t, 3):
            return PACKED
        if source == TOKENS and len(out) == 4 and out[:3] == (layout.batch, layout.positions, t):
            return BY_POSITION
        if source == HEADS and len(out) == 3 and out[:2] == (p, t):
            return TOKENS
        return None
    if _permutation(node) == _SWAP_1_2:
        return {HEADS: SEQS, SEQS: HEADS, BY_POSITION: EXIT}.get(source)
    if _permutation(node) == _PACKED_TO_SEQS:
        return PACKED_SEQS if source == PACKED else None
    if node.target == aten.unbind.int:
        dim = node.args[1] if len(node.args) > 1 else 0
        if source == PACKED_SEQS:
            return UNBOUND if dim == 0 else None
        rank = len(_shape(node.args[0]) or ())
        return UNBOUND_OF[source] if source in UNBOUND_OF and dim % rank >= _GRID[source] else None
    if node.target == torch.ops.vdopt.attention.default:
        q, k, v, _scale, *mask = node.args
        has_mask = bool(mask) and mask[0] is not None
        return ATTENTION if not has_mask and all(roles.get(x) == SEQS for x in (q, k, v)) else None
    if node.target == operator.getitem:
        if source in UNBOUND_OF.values():
            return next(role for role, unbound in UNBOUND_OF.items() if unbound == source)
        return SEQS if (source == ATTENTION and node.args[1] == 0) or source == UNBOUND else None
    return _elementwise_role(node, roles, layout)


def _elementwise_role(node: torch.fx.Node, roles: dict[torch.fx.Node, str], layout: TokenLayout) -> str | None:
    """Per-token / per-head ops: the role of their region operand, kept, or None."""
    operands = _tensor_args(node)
    found = {roles[a] for a in operands if a in roles}
    role = found.pop() if len(found) == 1 else None
    out, first = _shape(node), _shape(first_input(node))
    rule = _rule(node)
    if rule is None or role not in _GRID or out is None or first is None or len(out) <= _GRID[role]:
        return None
    if rule.kind is DimOp.POINTWISE:  # every operand a region tensor or a side that broadcasts
        ok = not rule.inplace and all(
            roles.get(a) == role or (a not in roles and a in node.args and _side_fits(a, role, len(out), layout))
            for a in operands)
        return role if ok else None
    if rule.kind is DimOp.CAT or rule.kind is DimOp.STACK:
        inputs = node.args[0]
        if not (all(roles.get(a) == role for a in inputs) and len(operands) == len(inputs)):
            return None
    elif roles.get(node.args[0]) != role or any(a in roles for a in operands[1:]):
        return None  # the region tensor must be the op's input, not a weight
    if rule.kind is DimOp.IDENTITY:
        return role
    if rule.kind not in _TRAILING or rule.kind is DimOp.RESHAPE and not rule.dims:
        return None
    touched = _touched_dims(node)
    return role if touched is not None and all(d >= _GRID[role] for d in touched) else None


def _describe(node: torch.fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return target.split(".")[0] if node.op == "call_function" else node.op


def temporal_region(entry: torch.fx.Node) -> TemporalRegion | None:
    """The region ``entry`` starts, with the decision, or None if it is no temporal entry."""
    found = _entry_layout(entry)
    if found is None:
        return None
    latent, layout = found
    roles: dict[torch.fx.Node, str] = {entry: TOKENS}
    reason = None
    node = entry.next
    while node.op != "root":  # the rest of the graph, in order
        if any(roles.get(a, EXIT) != EXIT for a in _tensor_args(node)):
            role = _role(node, roles, layout)
            if role is None:
                reason = _describe(node)
                break
            roles[node] = role
        node = node.next
    if reason is None and ATTENTION not in roles.values():
        reason = "no_attention"
    return TemporalRegion(entry=entry, latent=latent, layout=layout, roles=roles, reason=reason)


def find_temporal_regions(graph: torch.fx.Graph) -> list[TemporalRegion]:
    """Every temporal entry and the region it starts, with the decision (pure: no rewrite)."""
    return [region for node in graph.nodes if (region := temporal_region(node)) is not None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemporalLayout:
    """Fold the permutes around temporal blocks into the attention kernel's strided reads.

    Runs when the graph's attention was lowered to vdopt's kernels (``sdpa_to_triton``).
    """

    name: ClassVar[str] = "temporal_layout"
    tier: ClassVar[str] = "exact"

    def enabled(self, ctx: PassContext) -> bool:
        from vdopt.passes.lowering.sdpa_to_triton import SdpaToTriton

        return SdpaToTriton().enabled(ctx)

    def rewrite(self, graph: torch.fx.Graph, region: TemporalRegion) -> set[torch.fx.Node]:
        """Rewrite ``region``; returns the nodes outside it that now read its tensors (their
        recorded values have stale strides until ``refresh_values``)."""
        b, hw = region.layout.batch, region.layout.positions
        new: dict[torch.fx.Node, torch.fx.Node] = {region.entry: region.latent}
        rewired: set[torch.fx.Node] = set()  # read the exit, now read the region's own tensor

        em = Emitter(graph, self.name)

        def call(target, args, like, kwargs=None):
            return em.call(target, args, kwargs, like=like)

        def side(operand: Any, role: str, rank: int, like: torch.fx.Node) -> Any:
            """An operand, in the region's layout: mapped, or re-viewed to broadcast like it."""
            shape = _shape(operand)
            if operand in new or shape is None:
                return new.get(operand, operand)
            padded = _padded(shape, rank)
            grid = [b, hw] if padded[0] == b * hw else [1, 1]
            viewed = call(aten.reshape.default, (operand, [*grid, *padded[1:]]), like)
            order = _side_order(role, rank)
            return viewed if order is None else call(aten.permute.default, (viewed, order), like)

        for node, role in list(region.roles.items())[1:]:
            with graph.inserting_before(node):
                source = new.get(node.args[0])
                if role == EXIT:
                    rewired.update(node.users)
                    node.replace_all_uses_with(source)
                elif role == BY_POSITION:
                    new[node] = source
                elif role == ATTENTION:
                    q, k, v, scale, *_ = node.args
                    attention = call(node.target, (new[q], new[k], new[v], scale, None), node)
                    if meta.SITE in node.meta:
                        attention.meta[meta.SITE] = node.meta[meta.SITE]
                    new[node] = attention
                elif node.target == operator.getitem:  # attention output or unbound q/k/v
                    new[node] = call(operator.getitem, (source, node.args[1]), node)
                elif node.target == aten.unbind.int:  # the packed q/k/v, or a trailing dim
                    dim = node.args[1] if len(node.args) > 1 else 0
                    rank = len(_shape(node.args[0]))
                    new[node] = call(aten.unbind.int, (source, 0 if role == UNBOUND else dim % rank - rank), node)
                elif _is_reshape(node) or _kind(node) is DimOp.PERMUTE:
                    new[node] = call(*self._relayout(node, role, source, region.layout), node)
                else:  # per-token or per-head op: same op, operands re-viewed, dims counted from the end
                    if _kind(node) is DimOp.POINTWISE:
                        rank = len(_shape(node))
                        args = tuple(side(a, role, rank, node) if isinstance(a, torch.fx.Node) else a for a in node.args)
                    else:  # the region tensor(s) mapped; weights as they are
                        args = tuple(pytree.tree_map_only(torch.fx.Node, lambda a: new.get(a, a), node.args))
                    args, kwargs = _dims_from_end(node, args, dict(node.kwargs))
                    new[node] = call(node.target, args, node, kwargs)
        for node in reversed(region.roles):
            assert not node.users, f"{node} still has users after the temporal rewrite"
            graph.erase_node(node)
        return rewired

    @staticmethod
    def _relayout(node: torch.fx.Node, role: str, source: torch.fx.Node, layout: TokenLayout) -> tuple:
        """``(target, args)`` of the view that gives ``node``'s role in the region's layout."""
        b, t, hw = layout.batch, layout.frames, layout.positions
        shape = _shape(node)
        if role == HEADS and _is_reshape(node):  # split: (B, T, HW, N, D)
            return aten.reshape.default, (source, [b, t, hw, *shape[2:]])
        if role == PACKED:  # (B, T, HW, 3, N, D)
            return aten.reshape.default, (source, [b, t, hw, *shape[2:]])
        if role == TOKENS:  # heads merged: (B, T, HW, C)
            return aten.reshape.default, (source, [b, t, hw, shape[-1]])
        order = {HEADS: [0, 3, 1, 2, 4], SEQS: [0, 2, 3, 1, 4], PACKED_SEQS: [3, 0, 2, 4, 1, 5]}[role]
        return aten.permute.default, (source, order)

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if not self.enabled(ctx):
            return PassResult(gm=gm, modified=False, stats={})
        import vdopt.ops  # noqa: F401  registers torch.ops.vdopt.attention, which regions contain

        folded, kept = [], Counter()
        erased: set[torch.fx.Node] = set()
        rewired: set[torch.fx.Node] = set()
        for planned in find_temporal_regions(gm.graph):
            # Regions can touch (one's exit is the next one's entry): plan again on the current graph.
            region = None if planned.entry in erased else temporal_region(planned.entry)
            if region is None:  # absorbed by a region rewritten before it
                continue
            if region.reason is not None:
                kept[region.reason] += 1
                continue
            rewired |= self.rewrite(gm.graph, region)
            erased.update(region.roles)
            folded.append(region)
        refresh_values(gm.graph, rewired)  # once: planning reads shapes only, which never change
        if kept:
            log.info("temporal_layout kept %d region(s) permuted: %s", sum(kept.values()), dict(kept))
        stats = {
            "regions": len(folded),
            "attention_sites": sum(r.attentions for r in folded),
            **{f"kept_{reason}": n for reason, n in sorted(kept.items())},
        }
        return PassResult(gm=gm, modified=bool(folded), stats=stats)

