"""Rewrite a graph captured on the whole latent so that it computes one patch of it (PipeFusion).

A *patch* is a range ``start:start+length`` of one axis of the latent token grid (T, H or W,
full extent E). ``infer_patch_dims`` finds, for every tensor of the graph, the dim that holds
that axis and how: the dim is laid out as ``[offset | outer x E x inner | tail]`` (row-major),
where ``offset``/``tail`` are tokens outside the grid (text tokens concatenated into joint
attention) and ``outer``/``inner`` the grid axes around the patched one (a ``PatchDim``). It
works from the patch embedding convolution forward, op by op, over shapes only (no module
names), and fails with the node's name on an op that mixes tokens in a way a patch cannot
follow (a reduction over tokens, a gather, a convolution).

``rewrite_for_patch`` then rebuilds the graph with every such dim resized from E to
``length``: literal shapes in reshapes, expands and splits are recomputed, and every node's
``meta["val"]`` is propagated again with fake tensors and checked against the expected shape.
Values computed outside the rewritten graph (prologue, per-stage setup) come in whole and are
sliced to the patch inside it. Self-attention whose keys hold the patched axis along the
sequence gets its K/V from ``vdopt::merge_patch_kv``: fresh for the patch, the rest from a
cache input (the stale K/V of PipeFusion), and returns the merged K/V as extra outputs.

Legend: B batch, N heads, S tokens, D head dim; E full extent of the patched axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from vdopt.passes.dims.emit import Emitter, resized
from vdopt.passes.dims.rules import DimOp, arg, dim_args, dim_map, op_rule, shape_of
from vdopt.passes.graph_utils import eliminate_dead_code, fake_mode_of, graph_module_like

aten = torch.ops.aten
CREATED_BY = "patch_shapes"


class PatchError(ValueError):
    """The graph mixes latent tokens in a way a patch cannot follow."""


@dataclasses.dataclass(frozen=True)
class PatchDim:
    """Where the patched axis lives in a tensor: dim ``dim`` = ``[offset | outer x E x inner | tail]``."""

    dim: int
    offset: int = 0
    outer: int = 1
    inner: int = 1
    tail: int = 0

    def size(self, extent: int) -> int:
        """Size of the dim when the patched axis has ``extent`` entries."""
        return self.offset + self.outer * extent * self.inner + self.tail

    def segment(self, extent: int) -> int:
        return self.outer * extent * self.inner

    def at(self, dim: int) -> "PatchDim":
        return dataclasses.replace(self, dim=dim)


Dims = PatchDim | None | tuple  # a tuple for ops returning several tensors


@dataclasses.dataclass(kw_only=True)
class PatchDims:
    """The result of ``infer_patch_dims``."""

    extent: int
    """E: the full extent of the patched axis."""
    dims: dict[str, Dims]
    """Node name -> where its value holds the patched axis (None: it does not)."""
    required: dict[str, PatchDim]
    """Values outside the body that body nodes read patch by patch (sliced when read)."""
    stale: dict[str, tuple[PatchDim, PatchDim]]
    """Attention nodes whose K and V hold the patched axis along the sequence: their K/V dims."""
    lost: list[str] = dataclasses.field(default_factory=list)
    """Outside the body: nodes where the axis could not be followed, and why."""

    def of(self, name: str) -> Dims:
        return self.required.get(name) or self.dims.get(name)


# -- shape helpers -----------------------------------------------------------------------------


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else x


def patch_shape(shape: Sequence[int], pd: PatchDim | None, extent: int, length: int) -> tuple[int, ...]:
    """``shape`` of a tensor with the patched axis at ``length`` instead of ``extent``."""
    shape = tuple(shape)
    if pd is None:
        return shape
    assert shape[pd.dim] == pd.size(extent), (shape, pd, extent)
    return shape[: pd.dim] + (pd.size(length),) + shape[pd.dim + 1 :]


def _reshape_dim(in_shape: Sequence[int], pd: PatchDim, out_shape: Sequence[int], extent: int) -> PatchDim:
    """Where the patched axis lands when ``in_shape`` is reshaped to ``out_shape``."""
    d = pd.dim
    if pd.offset or pd.tail:
        # a dim with text tokens must pass through untouched
        before = math.prod(in_shape[:d])
        for d2 in range(len(out_shape)):
            if math.prod(out_shape[:d2]) == before and out_shape[d2] == in_shape[d]:
                return pd.at(d2)
        raise PatchError(f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits a dim that mixes text and video tokens")
    stride = pd.inner * math.prod(in_shape[d + 1 :])  # flat stride of the patched axis
    block = stride * extent
    for d2 in range(len(out_shape)):
        if out_shape[d2] == 1:
            continue
        st = math.prod(out_shape[d2 + 1 :])
        span = st * out_shape[d2]
        if st <= stride and stride % st == 0 and span >= block and span % block == 0:
            return PatchDim(dim=d2, outer=span // block, inner=stride // st)
    raise PatchError(f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits the patched axis")


# -- inference rules: what a patch does per kind of op (``dims.rules``) -----------------------------

# rule(node, dims_of, extent) -> (output dims, [(input node, PatchDim it must have)])
Rule = Callable[[torch.fx.Node, Callable[[Any], Dims], int], tuple[Dims, list]]


def _broadcast(node: torch.fx.Node, operands: Iterable[Any], dims_of, out_shape: Sequence[int]) -> tuple[Dims, list]:
    """Operands broadcast (right-aligned) to ``out_shape``."""
    rank = len(out_shape)
    out: PatchDim | None = None
    operands = [x for x in operands if shape_of(x) is not None]
    for x in operands:
        pd = dims_of(x)
        if pd is None:
            continue
        cand = pd.at(pd.dim + rank - len(shape_of(x)))
        if out is not None and out != cand:
            raise PatchError(f"{node.name}: operands hold the patched axis in different places ({out} vs {cand})")
        out = cand
    if out is None:
        return None, []
    reqs = []
    for x in operands:
        if dims_of(x) is None and isinstance(x, torch.fx.Node):
            shape = shape_of(x)
            d = out.dim - (rank - len(shape))
            if d >= 0 and shape[d] != 1:
                reqs.append((x, out.at(d)))
    return out, reqs


def _rule_pointwise(node, dims_of, extent):
    rule = op_rule(node.target)
    operands = list(node.args) + list(node.kwargs.values())
    if rule.operands is not None:
        operands = list(node.args[: rule.operands])
    return _broadcast(node, operands, dims_of, shape_of(node))


def _rule_follow(node, dims_of, extent):
    """Ops that keep, move or drop whole dims (``dims.rules.dim_map``): the axis follows its dim."""
    kind = op_rule(node.target).kind
    if kind is DimOp.LINEAR and any(isinstance(w, torch.fx.Node) and dims_of(w) is not None for w in node.args[1:]):
        raise PatchError(f"{node.name}: weights hold the patched axis")
    if kind is DimOp.MATMUL and dims_of(node.args[1]) is not None:
        raise PatchError(f"{node.name}: matmul with the patched axis on the right operand")
    pd = dims_of(node.args[0])
    if pd is None:
        return None, []
    dm = dim_map(node)
    if pd.dim in dm.mixed:
        raise PatchError(f"{node.name} ({node.target}) reduces or mixes the patched axis")
    out = pd.at(dm.out[pd.dim])
    if isinstance(_val(node), (tuple, list)):  # unbind; native_dropout's output and mask
        return tuple(out for _ in _val(node)), []
    return out, []


def _rule_reshape(node, dims_of, extent):
    if dim_map(node) is not None:  # (un)squeeze: whole dims move
        return _rule_follow(node, dims_of, extent)
    x = node.args[0]
    pd = dims_of(x)
    if pd is None:
        return None, []
    return _reshape_dim(shape_of(x), pd, shape_of(node), extent), []


def _slice_args(node) -> tuple[int, int, int, int]:
    (dim,) = dim_args(node)
    size = shape_of(node.args[0])[dim]
    start, end, step = arg(node, "start") or 0, arg(node, "end"), arg(node, "step")
    end = size if end is None else end
    start = max(0, start + size if start < 0 else start)
    end = min(size, end + size if end < 0 else end)
    return dim, start, end, step


def _rule_slice(node, dims_of, extent):
    x = node.args[0]
    pd = dims_of(x)
    if pd is None:
        return None, []
    dim, start, end, step = _slice_args(node)
    if dim != pd.dim:
        return pd, []
    seg_lo, seg_hi = pd.offset, pd.offset + pd.segment(extent)
    if end <= seg_lo or start >= seg_hi:
        return None, []  # only text tokens (before or after the grid)
    if start <= seg_lo and end >= seg_hi and step == 1:
        return dataclasses.replace(pd, offset=seg_lo - start, tail=end - seg_hi), []
    row = extent * pd.inner  # one entry of ``outer``: a whole run of the patched axis
    if seg_lo <= start and end <= seg_hi and step == 1 and (start - seg_lo) % row == 0 and (end - seg_lo) % row == 0:
        # whole rows of the outer axes (a sequence-parallel rank's frames, say)
        return PatchDim(dim=pd.dim, outer=(end - start) // row, inner=pd.inner), []
    raise PatchError(f"{node.name}: slice {start}:{end}:{step} cuts into the patched axis")


def _rule_split(node, dims_of, extent):
    x = node.args[0]
    pd = dims_of(x)
    pieces = _val(node)
    if pd is None:
        return tuple(None for _ in pieces), []
    (d,) = dim_args(node)
    if d != pd.dim:
        return tuple(pd for _ in pieces), []
    if node.target is not aten.split_with_sizes.default:
        raise PatchError(f"{node.name}: {node.target} along the patched axis")
    out, pos = [], 0
    seg_lo, seg_hi = pd.offset, pd.offset + pd.segment(extent)
    for size in node.args[1]:
        lo, hi = pos, pos + size
        if hi <= seg_lo or lo >= seg_hi:
            out.append(None)
        elif lo <= seg_lo and hi >= seg_hi:
            out.append(dataclasses.replace(pd, offset=seg_lo - lo, tail=hi - seg_hi))
        else:
            raise PatchError(f"{node.name}: split cuts into the patched axis")
        pos = hi
    return tuple(out), []


def _rule_cat(node, dims_of, extent):
    """``cat`` and ``stack``."""
    tensors = [t for t in node.args[0] if shape_of(t) is not None and shape_of(t) != (0,)]
    (d,) = dim_args(node)
    annotated = [(i, dims_of(t)) for i, t in enumerate(tensors) if dims_of(t) is not None]
    if not annotated:
        return None, []
    first = annotated[0][1]
    if op_rule(node.target).kind is DimOp.STACK:
        out = first.at(dim_map(node).out[first.dim])
        reqs = [(t, first) for t in tensors if dims_of(t) is None and isinstance(t, torch.fx.Node)]
        if any(pd != first for _, pd in annotated):
            raise PatchError(f"{node.name}: stacked tensors hold the patched axis differently")
        return out, reqs
    if first.dim != d:
        if any(pd != first for _, pd in annotated):
            raise PatchError(f"{node.name}: concatenated tensors hold the patched axis differently")
        reqs = [
            (t, first) for t in tensors
            if dims_of(t) is None and isinstance(t, torch.fx.Node) and shape_of(t)[first.dim] != 1
        ]
        return first, reqs
    if len(annotated) > 1:
        raise PatchError(f"{node.name}: concatenates two tensors along the patched axis")
    i, pd = annotated[0]
    before = sum(shape_of(t)[d] for t in tensors[:i])
    after = sum(shape_of(t)[d] for t in tensors[i + 1 :])
    return dataclasses.replace(pd, offset=pd.offset + before, tail=pd.tail + after), []


def _attention_qkv(node):
    names = ("query", "key", "value")
    return [node.args[i] if len(node.args) > i else node.kwargs[names[i]] for i in range(3)]


def _rule_attention(node, dims_of, extent):
    q, k, v = _attention_qkv(node)
    qd, kd, vd = dims_of(q), dims_of(k), dims_of(v)
    rank = len(shape_of(q))
    seq = rank - 2
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if node.target is not aten.scaled_dot_product_attention.default:
        mask = node.args[4] if len(node.args) > 4 else node.kwargs.get("key_mask")
    reqs = []
    batch_dims = [pd for pd in (qd, kd, vd) if pd is not None and pd.dim < seq]
    if batch_dims:
        # the patched axis is part of the batch: attention is local to the patch
        ref = batch_dims[0]
        for x, pd in ((q, qd), (k, kd), (v, vd)):
            if pd is None:
                reqs.append((x, ref))
            elif pd != ref:
                raise PatchError(f"{node.name}: q/k/v hold the patched axis in different batch dims")
        out = ref
    else:
        if (kd is None) != (vd is None):
            raise PatchError(f"{node.name}: only one of K and V holds the patched axis")
        if qd is not None and qd.dim == rank - 1 or kd is not None and kd.dim != seq:
            raise PatchError(f"{node.name}: the patched axis is in the head dim")
        if kd is not None:
            causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 and node.target is aten.scaled_dot_product_attention.default else False)
            if causal:
                raise PatchError(f"{node.name}: causal attention over patches is not supported")
        out = qd
    if isinstance(mask, torch.fx.Node) and out is not None:
        # K/V stay whole (merged with the cache) or carry no patched axis, so the mask's key
        # dim stays whole too; its query (or batch) dim follows q
        ms = shape_of(mask)
        if node.target is aten.scaled_dot_product_attention.default:
            mask_dim = out.dim - (rank - len(ms))  # (..., Sq, Skv) broadcast against q
        else:
            mask_dim = out.dim if out.dim < rank - 3 else None  # key_mask (*batch, Skv)
        md = dims_of(mask)
        if md is not None and md.dim != mask_dim:
            raise PatchError(f"{node.name}: the attention mask holds the patched axis along the keys")
        if md is None and mask_dim is not None and mask_dim >= 0 and ms[mask_dim] != 1:
            reqs.append((mask, out.at(mask_dim)))
    if node.target is aten.scaled_dot_product_attention.default:
        return out, reqs
    lse = None if out is None else out  # lse (*batch, N, Sq) keeps q's leading dims
    return (out, lse), reqs


def _rule_ring_attention(node, dims_of, extent):
    """``vdopt::ring_attention(q, k, v, k_fixed, v_fixed, mask, mask_fixed, ...)`` (sequence
    parallel x PipeFusion): like self-attention, the patch's queries attend over this rank's
    K/V block merged with the cache (stale K/V), which the ring then passes around whole."""
    q, k, v = node.args[:3]
    qd, kd, vd = dims_of(q), dims_of(k), dims_of(v)
    seq = len(shape_of(q)) - 2
    if any(pd is not None and pd.dim != seq for pd in (qd, kd, vd)) or (kd is None) != (vd is None):
        raise PatchError(f"{node.name}: ring attention holds the patched axis outside the sequence")
    if any(isinstance(x, torch.fx.Node) for x in node.args[5:7]):
        raise PatchError(f"{node.name}: masked ring attention over patches is not supported")
    if any(dims_of(x) is not None for x in node.args[3:5] if isinstance(x, torch.fx.Node)):
        raise PatchError(f"{node.name}: the ring's fixed (text) K/V hold the patched axis")
    return qd, []


def _rule_collective(node, dims_of, extent):
    """Functional collectives: they exchange or gather along dim 0.

    Sequence parallelism's all-to-all sends a flat tensor in equal chunks, one per peer, the
    peer index outermost; the patched axis then sits inside every chunk the same way, so the
    chunk layout survives the exchange (the chunk sizes shrink with the patch).
    """
    pd = dims_of(node.args[0])
    if pd is None or pd.dim != 0 or node.target is torch.ops._c10d_functional.wait_tensor.default:
        return pd, []
    if pd.offset or pd.tail:
        raise PatchError(f"{node.name}: {node.target} of text and video tokens along the patched dim")
    if node.target is torch.ops._c10d_functional.all_gather_into_tensor.default:
        return dataclasses.replace(pd, outer=pd.outer * node.args[1]), []
    out_splits, in_splits = node.args[1], node.args[2]
    peers = len(in_splits)
    if len(set(out_splits) | set(in_splits)) != 1 or pd.outer % peers:
        raise PatchError(f"{node.name}: uneven all-to-all of the patched axis (splits {in_splits} -> {out_splits})")
    return pd, []


def _rule_stage_boundary(node, dims_of, extent):
    return tuple(dims_of(v) for v in node.args[0]), []


def _rule_getitem(node, dims_of, extent):
    container, index = node.args
    dims = dims_of(container)
    if dims is None:
        return None, []
    assert isinstance(dims, tuple), (node.name, dims)
    return dims[index], []


_RULES: dict[DimOp, Rule] = {
    DimOp.IDENTITY: _rule_follow, DimOp.POINTWISE: _rule_pointwise, DimOp.RESHAPE: _rule_reshape,
    DimOp.PERMUTE: _rule_follow, DimOp.EXPAND: _rule_follow, DimOp.SLICE: _rule_slice, DimOp.SELECT: _rule_follow,
    DimOp.SPLIT: _rule_split, DimOp.CAT: _rule_cat, DimOp.STACK: _rule_cat, DimOp.REDUCE: _rule_follow,
    DimOp.NORMALIZE: _rule_follow, DimOp.ALONG: _rule_follow, DimOp.LINEAR: _rule_follow, DimOp.MATMUL: _rule_follow,
    DimOp.ATTENTION: _rule_attention, DimOp.COLLECTIVE: _rule_collective, DimOp.CARRY: _rule_stage_boundary,
    DimOp.GETITEM: _rule_getitem,
}
"""What a patch does per kind of op; kinds missing here (convolutions, einsum, padding) mix the
tokens in ways a patch cannot follow."""


def _is_ring_attention(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and schema.name == "vdopt::ring_attention"


def _kind(node: torch.fx.Node) -> DimOp | None:
    if _is_ring_attention(node):
        return DimOp.ATTENTION  # has its own rule (``_rule_of``); K/V may be stale like SDPA's
    rule = op_rule(node.target) if node.op == "call_function" else None
    return rule.kind if rule is not None else None


def _rule_of(node: torch.fx.Node, kind: DimOp | None) -> Rule | None:
    if _is_ring_attention(node):
        return _rule_ring_attention
    return _RULES.get(kind)


def infer_patch_dims(
    graph: torch.fx.Graph,
    *,
    extent: int,
    sources: dict[str, PatchDim],
    body: set[str],
) -> PatchDims:
    """Where each value holds the patched axis, starting from ``sources``.

    Nodes in ``body`` (names) are the ones that will be rewritten: an op there that cannot
    follow the patch raises ``PatchError``, and a value from outside the body that a body op
    combines with patched tensors is recorded in ``required``. Outside the body the
    inference is lenient (an unknown op just yields None): it only has to locate the axis in
    the values the body reads.
    """
    dims: dict[str, Dims] = dict(sources)
    required: dict[str, PatchDim] = {}
    stale: dict[str, tuple[PatchDim, PatchDim]] = {}
    lost: list[str] = []
    # Values that differ from patch to patch (hold the patch, or were computed from one); a
    # tuple for stage markers, per carried value. The rest are the same whole-latent values
    # in every patch, so a body op may slice them even when the body computes them.
    variant: dict[str, Any] = {name: True for name in sources}

    def dims_of(x: Any) -> Dims:
        if not isinstance(x, torch.fx.Node):
            return None
        return required.get(x.name) or dims.get(x.name)

    def is_variant(x: torch.fx.Node) -> bool:
        return any(pytree.tree_leaves(variant.get(x.name, False))) or isinstance(dims_of(x), PatchDim)

    for n in graph.nodes:
        if n.name in dims:
            continue
        kind = _kind(n)
        if kind is DimOp.CARRY:
            variant[n.name] = tuple(is_variant(v) for v in n.args[0])
        elif kind is DimOp.GETITEM and isinstance(variant.get(n.args[0].name), tuple):
            variant[n.name] = variant[n.args[0].name][n.args[1]]
        else:
            variant[n.name] = any(is_variant(a) for a in n.all_input_nodes)
        if n.op != "call_function" or kind is DimOp.METADATA:
            dims[n.name] = None
            continue
        strict = n.name in body
        if all(dims_of(a) is None for a in n.all_input_nodes):
            dims[n.name] = None
            continue
        rule = _rule_of(n, kind)
        try:
            if rule is None:
                raise PatchError(f"{n.name}: no patch rule for {n.target}")
            out, reqs = rule(n, dims_of, extent)
        except PatchError as e:
            if strict:
                raise
            lost.append(str(e))
            dims[n.name] = None
            continue
        if strict:
            for x, pd in reqs:
                if is_variant(x):
                    raise PatchError(
                        f"{n.name} ({n.target}) combines the patch with {x.name}, which covers the whole latent "
                        "but changes from patch to patch"
                    )
                prev = dims_of(x)
                if prev is not None and prev != pd:
                    raise PatchError(f"{x.name} is read patch-wise in two layouts ({prev}, {pd})")
                required[x.name] = pd
            if kind is DimOp.ATTENTION:
                _, k, v = _attention_qkv(n)
                kd, vd = dims_of(k), dims_of(v)
                if kd is not None and kd.dim == len(shape_of(k)) - 2:
                    stale[n.name] = (kd, vd)
        dims[n.name] = out
    return PatchDims(extent=extent, dims=dims, required=required, stale=stale, lost=lost)


# -- the rewrite ---------------------------------------------------------------------------------


def slice_patch_nodes(em: Emitter, x: torch.fx.Node, pd: PatchDim, extent: int, start: int, length: int) -> torch.fx.Node:
    """Nodes computing the patch ``start:start+length`` of ``x`` (whole latent) along ``pd``."""
    part = em.take(x, pd.dim, pre=pd.offset, factors=[pd.outer, extent, pd.inner], chunks={1: (start, length)},
                   post=pd.tail)
    if pd.offset or pd.tail:
        return part
    # contiguous, so later views of the patch behave as on the whole latent
    return em.contiguous(part)


def slice_patch(x: torch.Tensor, pd: PatchDim | None, extent: int, start: int, length: int) -> torch.Tensor:
    """The patch of a whole-latent tensor (eager, for the runtime)."""
    if pd is None:
        return x
    d, seg = pd.dim, pd.segment(extent)
    part = x.narrow(d, pd.offset, seg).unflatten(d, (pd.outer, extent, pd.inner)).narrow(d + 1, start, length)
    part = part.flatten(d, d + 2)
    if pd.offset or pd.tail:
        part = torch.cat([x.narrow(d, 0, pd.offset), part, x.narrow(d, x.size(d) - pd.tail, pd.tail)], d)
    return part


def write_patch(full: torch.Tensor, part: torch.Tensor, pd: PatchDim, extent: int, start: int, length: int) -> None:
    """Write the patch ``part`` into the whole-latent tensor ``full`` (in place; eager)."""
    d = pd.dim
    slot = full.narrow(d, pd.offset, pd.segment(extent)).unflatten(d, (pd.outer, extent, pd.inner))
    slot.narrow(d + 1, start, length).copy_(part.narrow(d, pd.offset, pd.segment(length)).unflatten(d, (pd.outer, length, pd.inner)))
    if pd.offset:
        full.narrow(d, 0, pd.offset).copy_(part.narrow(d, 0, pd.offset))
    if pd.tail:
        full.narrow(d, full.size(d) - pd.tail, pd.tail).copy_(part.narrow(d, part.size(d) - pd.tail, pd.tail))


def _position(p: int, pd: PatchDim, extent: int, length: int) -> int:
    """Index ``p`` of a dim laid out by ``pd`` once the patched axis has ``length`` entries."""
    lo, hi = pd.offset, pd.offset + pd.segment(extent)
    if p <= lo:
        return p
    if p >= hi:
        return p - pd.segment(extent) + pd.segment(length)
    row = extent * pd.inner
    if (p - lo) % row == 0:  # a boundary between outer rows
        return lo + (p - lo) // row * length * pd.inner
    raise PatchError(f"index {p} falls inside the patched axis")


def _new_args(old: torch.fx.Node, args: list, kwargs: dict, pdims: PatchDims, length: int) -> tuple[Any, list, dict]:
    """Target and literal arguments of ``old`` recomputed for the patch."""
    extent = pdims.extent
    target = old.target
    out = pdims.dims.get(old.name)
    x = old.args[0] if old.args else None
    in_pd = pdims.of(x.name) if isinstance(x, torch.fx.Node) else None
    kind = _kind(old)
    if kind in (DimOp.RESHAPE, DimOp.EXPAND) and isinstance(out, PatchDim):
        return resized(target, args, kwargs, patch_shape(shape_of(old), out, extent, length))
    if kind is DimOp.SLICE and in_pd is not None:
        dim, start, end, step = _slice_args(old)
        if dim == in_pd.dim:
            args = [args[0], dim, _position(start, in_pd, extent, length), _position(end, in_pd, extent, length), step]
            kwargs = {}
    elif target is aten.split_with_sizes.default and in_pd is not None:
        (dim,) = dim_args(old)
        if dim == in_pd.dim:
            sizes = list(old.args[1])
            for i, pd in enumerate(out):
                if pd is not None:
                    sizes[i] = sizes[i] - pd.segment(extent) + pd.segment(length)
            args[1] = sizes
    elif target is torch.ops._c10d_functional.all_to_all_single.default and in_pd is not None and in_pd.dim == 0:
        chunk = in_pd.segment(length) // len(old.args[2])
        args[1] = [chunk] * len(old.args[1])
        args[2] = [chunk] * len(old.args[2])
    return target, args, kwargs


def _expected(val: Any, pd: Dims, extent: int, length: int) -> Any:
    if isinstance(val, torch.Tensor):
        assert pd is None or isinstance(pd, PatchDim)
        return patch_shape(val.shape, pd, extent, length)
    if isinstance(val, (list, tuple)):
        pds = pd if isinstance(pd, tuple) else (None,) * len(val)
        return [_expected(v, p, extent, length) for v, p in zip(val, pds)]
    return None


def _actual(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    if isinstance(val, (list, tuple)):
        return [_actual(v) for v in val]
    return None


@dataclasses.dataclass(kw_only=True)
class PatchGraph:
    """A graph rewritten for one patch."""

    gm: torch.fx.GraphModule
    """``gm(*inputs, *kv_caches) -> (*outputs, *merged_kv)``."""
    cache_sites: tuple[str, ...]
    """Attention nodes with stale K/V, in cache order (K then V per site)."""
    input_shapes: tuple[tuple[int, ...] | None, ...]
    """Shape each input must have (None: not a tensor)."""
    output_dims: tuple[Dims, ...]
    """Where each output holds the patched axis."""


def _arrives_patched(name: str, pdims: PatchDims, patched_inputs: set[str]) -> bool:
    """Whether input ``name`` comes cut to the patch (an activation the previous stage sends
    patch by patch) rather than whole."""
    return name in patched_inputs and isinstance(pdims.dims.get(name), PatchDim)


def rewrite_for_patch(
    gm: torch.fx.GraphModule,
    pdims: PatchDims,
    *,
    start: int,
    length: int,
    patched_inputs: set[str],
    merge_kv: bool,
) -> PatchGraph:
    """``gm`` rewritten to compute the patch ``start:start+length``.

    ``patched_inputs`` are placeholders that arrive already cut to the patch (activations from
    the previous stage); every other placeholder arrives whole and is sliced here when the
    graph reads it patch-wise. With ``merge_kv`` each stale attention site takes its K/V
    from ``merge_patch_kv`` over a cache input; otherwise it takes the fresh K/V (the whole
    latent, when ``length`` is the full extent) and returns them.
    """
    import vdopt.ops  # noqa: F401

    extent = pdims.extent
    graph = torch.fx.Graph()
    em = Emitter(graph, CREATED_BY, fake_mode=fake_mode_of(gm.graph))
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    old_nodes = [n for n in gm.graph.nodes if _kind(n) is not DimOp.METADATA]
    stale_nodes = [n for n in old_nodes if n.name in pdims.stale]
    input_shapes = []
    # placeholders first: inputs, then one K and one V cache per stale site
    for n in old_nodes:
        if n.op != "placeholder":
            continue
        p = graph.placeholder(n.name)
        p.meta = {k: v for k, v in n.meta.items() if k != "val"}
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and _arrives_patched(n.name, pdims, patched_inputs):
            p.meta["val"] = em.placeholder_value(val, patch_shape(val.shape, pdims.dims[n.name], extent, length))
        else:
            p.meta["val"] = val
        input_shapes.append(tuple(p.meta["val"].shape) if isinstance(p.meta["val"], torch.Tensor) else None)
        env[n] = p
    caches = {}
    if merge_kv:
        for s in stale_nodes:
            _, k, v = _attention_qkv(s)
            for tag, x in (("k", k), ("v", v)):
                c = graph.placeholder(f"kv_cache_{s.name}_{tag}")
                c.meta["val"] = em.placeholder_value(x.meta["val"], x.meta["val"].shape)
                caches[(s.name, tag)] = c
    # whole-latent inputs read patch-wise are sliced once, right after the placeholders
    for n in old_nodes:
        if n.op == "placeholder" and not _arrives_patched(n.name, pdims, patched_inputs):
            pd = pdims.of(n.name)
            if isinstance(pd, PatchDim):
                env[n] = slice_patch_nodes(em, env[n], pd, extent, start, length)
    merged_outputs = []
    for n in old_nodes:
        if n.op == "placeholder":
            continue
        if n.op == "get_attr":
            new = graph.node_copy(n)
            pd = pdims.of(n.name)
            env[n] = slice_patch_nodes(em, new, pd, extent, start, length) if isinstance(pd, PatchDim) else new
            continue
        if n.op == "output":
            outs = pytree.tree_map_only(torch.fx.Node, lambda a: env[a], n.args[0])
            graph.output(tuple(outs) + tuple(merged_outputs))
            continue
        assert n.op == "call_function", (n.op, n.name)
        args = list(pytree.tree_map_only(torch.fx.Node, lambda a: env[a], n.args))
        kwargs = dict(pytree.tree_map_only(torch.fx.Node, lambda a: env[a], n.kwargs))
        target, args, kwargs = _new_args(n, args, kwargs, pdims, length)
        if n.name in pdims.stale:
            kd, vd = pdims.stale[n.name]
            names = ("key", "value")
            for i, (tag, pd) in enumerate((("k", kd), ("v", vd)), start=1):
                fresh = args[i] if len(args) > i else kwargs[names[i - 1]]
                if merge_kv:
                    merged = em.call(
                        torch.ops.vdopt.merge_patch_kv.default,
                        (fresh, caches[(n.name, tag)], pd.dim, pd.offset, pd.tail, pd.outer, pd.inner, start),
                    )
                else:
                    merged = fresh
                if len(args) > i:
                    args[i] = merged
                else:
                    kwargs[names[i - 1]] = merged
                merged_outputs.append(merged)
        new = em.copy(n, target, args, kwargs)
        expected = _expected(n.meta.get("val"), pdims.dims.get(n.name), extent, length)
        if _actual(new.meta["val"]) != expected:
            raise PatchError(
                f"{n.name} ({n.target}) has shape {_actual(new.meta['val'])} for the patch, expected {expected}"
            )
        if n.name in pdims.required:  # a whole-latent value computed here, read patch-wise
            new = slice_patch_nodes(em, new, pdims.required[n.name], extent, start, length)
        env[n] = new
    eliminate_dead_code(graph)
    out_node = next(iter(reversed(gm.graph.nodes)))
    output_dims = tuple(
        pdims.of(a.name) if isinstance(a, torch.fx.Node) else None for a in out_node.args[0]
    )
    return PatchGraph(
        gm=graph_module_like(gm, graph),
        cache_sites=tuple(s.name for s in stale_nodes),
        input_shapes=tuple(input_shapes),
        output_dims=output_dims,
    )
