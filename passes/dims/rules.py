"""The op table of the dimension core: how each ATen op maps its input dims to its output dims.

Every pass that follows one dim through a graph asks the same question of each op: sequence
parallel and DSP follow the split tokens or frames, PipeFusion the patched axis, the temporal
layout pass the token grid. The table (``rules()``) answers it once, as data: per op (or op family) a
``DimOp`` that says how the dims move (kept, reordered, merged and split, cut, joined,
reduced, broadcast) and the names of the arguments that hold dims or sizes. Each consumer
decides only what is specific to it (gather, raise, slice a side input), per ``DimOp``.

``dim_map`` turns a node into the answer for its first tensor input: where each of its dims
lands in the output, and which dims the op mixes values along (such a dim cannot be cut).
Reshapes that merge and split dims are left to the consumers' own models of a dim
(``sharded_shape.map_reshape``, PipeFusion's ``PatchDim``), which track more than a position.

An op missing from the table is treated as pointwise when torch tags it so; otherwise
``op_rule`` returns None and the consumer takes its safe path (gather, or refuse to patch).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

aten = torch.ops.aten


FLEX_ATTENTION = torch.ops.higher_order.flex_attention
"""flex attention, kept out of the table: a higher-order op whose ``score_mod``/``mask_mod``
subgraphs and block mask index full-length positions, so no generic dim rule fits it
(sequence parallel has its own, ``ShardPropagator.rule_flex_attention``)."""


class DimOp(enum.Enum):
    """How an op moves the dims of its tensor inputs to its output."""

    IDENTITY = "identity"
    """Output dims are the first input's (casts, copies, dropout, ``*_like``)."""
    POINTWISE = "pointwise"
    """Every tensor operand broadcasts (right-aligned) to the output."""
    RESHAPE = "reshape"
    """Dims merged and split in row-major order (view, flatten, unflatten, (un)squeeze)."""
    PERMUTE = "permute"
    """Dims reordered."""
    EXPAND = "expand"
    """Size-1 dims broadcast to the sizes argument; new leading dims prepended."""
    SLICE = "slice"
    """A range of one dim."""
    SELECT = "select"
    """One index of a dim, which is removed (``unbind``: every index, one output each)."""
    SPLIT = "split"
    """One dim cut into consecutive pieces, one output each."""
    CAT = "cat"
    """Tensors joined along an existing dim."""
    STACK = "stack"
    """Tensors joined along a new dim."""
    REDUCE = "reduce"
    """Values reduced along dims, which are removed or kept with size 1."""
    NORMALIZE = "normalize"
    """Values mixed along the trailing ``normalized_shape`` dims; shape kept (layer/RMS norm)."""
    ALONG = "along"
    """Values mixed along one dim; shape kept (softmax, cumsum; sort: values and indices)."""
    TAKE_ALONG = "take_along"
    """Values picked along one dim at an index tensor's positions (``gather``); every other dim
    elementwise between the input and the index (whose shape the output has)."""
    INDEX = "index"
    """Positions picked along one dim by one index tensor (``x[:, idx]``, ``index_select``): that
    dim replaced by the index's dims, the others kept."""
    LOOKUP = "lookup"
    """Rows of a table picked by an index tensor (``embedding``): the index's dims, then a row."""
    OUTER = "outer"
    """The outer product of two vectors: the first one's dim, then the second one's."""
    REPEAT = "repeat"
    """The tensor tiled ``repeats`` times per dim (leading ``repeats`` entries add new dims)."""
    LINEAR = "linear"
    """The last dim contracted with a weight (``linear``); the other dims kept."""
    MATMUL = "matmul"
    """The left operand's last dim contracted with the right operand; batch dims broadcast."""
    PER_SAMPLE = "per_sample"
    """Dim 0 kept, every other dim mixed (convolution, group norm, resampling, pooling)."""
    EINSUM = "einsum"
    """Dims named by the equation's letters."""
    REPEAT_INTERLEAVE = "repeat_interleave"
    """Each entry of one dim repeated in place."""
    PAD = "pad"
    """Trailing dims grown by constant padding (pairs from the last dim backwards)."""
    ATTENTION = "attention"
    """Batch and head dims kept; queries attend over the key dim (SDPA, ``vdopt::attention``)."""
    NEW = "new"
    """A fresh tensor whose shape is an argument (``new_zeros``): no input dim reaches it."""
    METADATA = "metadata"
    """Checks metadata only (``_assert_tensor_metadata``); returns nothing."""
    GETITEM = "getitem"
    """One output of a multi-output node."""
    CARRY = "carry"
    """Each output is the input at its position (PipeFusion's stage marker)."""
    COMPLEX_VIEW = "complex_view"
    """The last dim packed into complex numbers or unpacked (``view_as_complex`` of ``(..., 2)``,
    ``view_as_real``: complex RoPE); the other dims kept."""
    COLLECTIVE = "collective"
    """A functional collective: exchanges or gathers along dim 0 (``all_reduce`` and
    ``wait_tensor`` keep dims)."""


@dataclasses.dataclass(frozen=True)
class OpRule:
    """What the table records per op; argument names are the op schema's."""

    kind: DimOp
    """How the op moves dims."""
    dims: tuple[str, ...] = ()
    """Arguments holding a dim or a list of dims (read with the schema's defaults)."""
    dims_of_output: bool = False
    """The dims count in the output's rank (``stack``, ``unsqueeze``), not the input's."""
    sizes: str | None = None
    """The argument holding a shape, or sizes along the op's dim: what changes when a dim is
    resized (a sharded dim's local size, a patch's length)."""
    operands: int | None = None
    """How many leading arguments the output depends on elementwise (None: every tensor
    argument); ``type_as`` reads only a dtype from its second."""
    inplace: bool = False
    """Writes into its first argument."""


def _rule_table() -> dict[Any, OpRule]:
    import vdopt.ops  # noqa: F401  registers the vdopt ops named below

    vdopt_ops = torch.ops.vdopt
    c10d = torch.ops._c10d_functional
    R = OpRule
    reshape = {
        aten.view.default: R(DimOp.RESHAPE, sizes="size"),
        aten.reshape.default: R(DimOp.RESHAPE, sizes="shape"),
        aten._unsafe_view.default: R(DimOp.RESHAPE, sizes="size"),
        aten.flatten.using_ints: R(DimOp.RESHAPE, dims=("start_dim", "end_dim")),
        aten.unflatten.int: R(DimOp.RESHAPE, dims=("dim",), sizes="sizes"),
        aten.unsqueeze.default: R(DimOp.RESHAPE, dims=("dim",), dims_of_output=True),
        aten.squeeze.dim: R(DimOp.RESHAPE, dims=("dim",)),
        aten.squeeze.dims: R(DimOp.RESHAPE, dims=("dim",)),
        aten.squeeze.default: R(DimOp.RESHAPE),
    }
    identity = [
        aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default,
        aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
        aten.lift_fresh_copy.default, aten.dropout.default, aten.native_dropout.default,
        aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
        aten.rand_like.default, aten.randn_like.default, aten.fill_.Scalar,
    ]
    reduce = [aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
              aten.var.correction, aten.std.correction, aten.linalg_vector_norm.default]
    along = [aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
             aten.cumsum.default, aten.cumsum_.default, aten.sort.default, aten.sort.stable,
             aten.argsort.default, aten.argsort.stable, aten.flip.default]
    per_sample = [
        aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
        aten.conv_transpose2d.input, aten.conv_transpose3d.input, aten.group_norm.default,
        aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec, aten.upsample_bilinear2d.vec,
        aten.upsample_trilinear3d.vec, aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    ]
    return {
        **reshape,
        **{op: R(DimOp.IDENTITY) for op in identity},
        aten.type_as.default: R(DimOp.IDENTITY, operands=1),
        aten.copy_.default: R(DimOp.POINTWISE, operands=2, inplace=True),
        aten.fill_.Tensor: R(DimOp.POINTWISE, inplace=True),  # a 0-d value tensor
        # pointwise, whether or not this torch version tags them so
        aten.view_as_complex.default: R(DimOp.COMPLEX_VIEW),
        aten.view_as_real.default: R(DimOp.COMPLEX_VIEW),
        aten.masked_fill.Scalar: R(DimOp.POINTWISE),
        aten.masked_fill.Tensor: R(DimOp.POINTWISE),
        aten.where.self: R(DimOp.POINTWISE),
        **{op: R(DimOp.POINTWISE) for op in (aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor)},
        aten.expand_as.default: R(DimOp.POINTWISE),  # broadcast to the other's shape
        aten.permute.default: R(DimOp.PERMUTE, dims=("dims",)),
        aten.transpose.int: R(DimOp.PERMUTE, dims=("dim0", "dim1")),
        aten.t.default: R(DimOp.PERMUTE),
        aten.expand.default: R(DimOp.EXPAND, sizes="size"),
        aten.slice.Tensor: R(DimOp.SLICE, dims=("dim",)),
        aten.narrow.default: R(DimOp.SLICE, dims=("dim",)),  # rewritten to the slice of its rows
        aten.select.int: R(DimOp.SELECT, dims=("dim",)),
        aten.unbind.int: R(DimOp.SELECT, dims=("dim",)),
        aten.split.Tensor: R(DimOp.SPLIT, dims=("dim",), sizes="split_size"),
        aten.split_with_sizes.default: R(DimOp.SPLIT, dims=("dim",), sizes="split_sizes"),
        aten.chunk.default: R(DimOp.SPLIT, dims=("dim",)),
        aten.cat.default: R(DimOp.CAT, dims=("dim",)),
        aten.concat.default: R(DimOp.CAT, dims=("dim",)),
        aten.concatenate.default: R(DimOp.CAT, dims=("dim",)),
        aten.stack.default: R(DimOp.STACK, dims=("dim",), dims_of_output=True),
        **{op: R(DimOp.REDUCE, dims=("dim",)) for op in reduce},
        aten.sum.default: R(DimOp.REDUCE),  # over every dim
        aten.mean.default: R(DimOp.REDUCE),
        aten.layer_norm.default: R(DimOp.NORMALIZE, sizes="normalized_shape"),
        aten.rms_norm.default: R(DimOp.NORMALIZE, sizes="normalized_shape"),
        **{op: R(DimOp.ALONG, dims=("dims",) if op is aten.flip.default else ("dim",)) for op in along},
        aten.gather.default: R(DimOp.TAKE_ALONG, dims=("dim",)),
        aten.index.Tensor: R(DimOp.INDEX),
        aten.embedding.default: R(DimOp.LOOKUP),
        aten.outer.default: R(DimOp.OUTER),
        aten.repeat.default: R(DimOp.REPEAT, sizes="repeats"),
        aten.index_select.default: R(DimOp.INDEX, dims=("dim",)),
        aten.linear.default: R(DimOp.LINEAR),
        aten.matmul.default: R(DimOp.MATMUL),
        aten.mm.default: R(DimOp.MATMUL),
        aten.bmm.default: R(DimOp.MATMUL),
        **{op: R(DimOp.PER_SAMPLE) for op in per_sample},
        aten.einsum.default: R(DimOp.EINSUM),
        aten.repeat_interleave.self_int: R(DimOp.REPEAT_INTERLEAVE, dims=("dim",), sizes="output_size"),
        aten.constant_pad_nd.default: R(DimOp.PAD, sizes="pad"),
        aten.pad.default: R(DimOp.PAD, sizes="pad"),  # F.pad as exported; rule_pad checks the mode
        aten.scaled_dot_product_attention.default: R(DimOp.ATTENTION),
        vdopt_ops.attention.default: R(DimOp.ATTENTION),
        **{op: R(DimOp.NEW, sizes="size") for op in (aten.new_zeros.default, aten.new_ones.default,
                                                      aten.new_empty.default, aten.new_full.default)},
        aten._assert_tensor_metadata.default: R(DimOp.METADATA),
        operator.getitem: R(DimOp.GETITEM),
        vdopt_ops.stage_boundary.default: R(DimOp.CARRY),
        c10d.all_to_all_single.default: R(DimOp.COLLECTIVE),
        c10d.all_gather_into_tensor.default: R(DimOp.COLLECTIVE),
        c10d.all_reduce.default: R(DimOp.COLLECTIVE),
        c10d.wait_tensor.default: R(DimOp.COLLECTIVE),
    }


@functools.cache
def rules() -> dict[Any, OpRule]:
    """The table, built on first use (it names ops that importing ``vdopt.ops`` registers)."""
    return _rule_table()


_POINTWISE = OpRule(DimOp.POINTWISE)
_POINTWISE_INPLACE = OpRule(DimOp.POINTWISE, inplace=True)


def op_rule(target: Any) -> OpRule | None:
    """The rule for ``target``: from the table, else pointwise when torch tags the op so."""
    rule = rules().get(target)
    if rule is not None:
        return rule
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return _POINTWISE_INPLACE if target._schema.name.endswith("_") else _POINTWISE
    return None


# -- reading a node's arguments ---------------------------------------------------------------


def shape_of(x: Any) -> tuple[int | torch.SymInt, ...] | None:
    """The shape of a node's tensor value, or None: ints, and a ``SymInt`` for a size taken
    from tensor values (unbacked, ``u0``) in a graph captured with symbolic sizes."""
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return tuple(size_value(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def size_value(size: int | torch.SymInt) -> int | torch.SymInt:
    """``int(size)``, or ``size`` itself when it has no value until run time (unbacked): code
    that compares it must do so size-obliviously (``statically_known_true``) or fail, and a
    failure makes the executable specialize the plan on the call's values."""
    if isinstance(size, torch.SymInt) and not size.node.has_hint():
        try:
            return int(size)  # a size the capture pinned (``Eq(u0, 4)``)
        except GuardOnDataDependentSymNode:
            return size
    return int(size)


def first_input(node: torch.fx.Node) -> Any:
    """The op's (first) tensor input: ``args[0]``, or the first of a list (cat, stack)."""
    first = node.args[0]
    return first[0] if isinstance(first, (list, tuple)) and first else first


def arg_position(target: Any, name: str) -> int | None:
    """Position of argument ``name`` in ``target``'s schema, or None when keyword-only."""
    for i, a in enumerate(target._schema.arguments):
        if a.name == name:
            return None if a.kwarg_only else i
    raise KeyError(f"{target} has no argument {name!r}")


def arg(node: torch.fx.Node, name: str) -> Any:
    """Argument ``name`` of ``node`` as passed, or the schema's default."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if not a.kwarg_only and i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else None)
    raise KeyError(f"{node.target} has no argument {name!r}")


def with_arg(target: Any, args: tuple | list, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with argument ``name`` set to ``value`` where the call passes it."""
    pos = arg_position(target, name)
    if pos is not None and (pos < len(args) or name not in kwargs):
        args = list(args) + [None] * (pos + 1 - len(args))
        args[pos] = value
        return tuple(args), dict(kwargs)
    return tuple(args), {**kwargs, name: value}


def dim_rank(node: torch.fx.Node, rule: OpRule | None = None) -> int:
    """The rank the op's dim arguments count in."""
    rule = rule or op_rule(node.target)
    return len(shape_of(node) if rule.dims_of_output else shape_of(first_input(node)))


def dim_args(node: torch.fx.Node) -> list[int] | None:
    """The dims the op's dim arguments name, non-negative, in argument order (a list argument
    contributes all its dims); None when a dims argument is absent or empty (reduce over all)."""
    rule = op_rule(node.target)
    if rule.kind is DimOp.PERMUTE and not rule.dims:  # t()
        return [0, 1]
    if rule.kind is DimOp.REDUCE and not rule.dims:  # sum(), mean(): every dim
        return None
    rank = dim_rank(node, rule)
    out = []
    for name in rule.dims:
        value = arg(node, name)
        if value is None or value == []:
            return None
        out.extend(d % rank if rank else d for d in ([value] if isinstance(value, int) else value))
    return out


def permutation(node: torch.fx.Node) -> list[int]:
    """Output dim ``i`` is input dim ``permutation(node)[i]`` (permute, transpose, t)."""
    rank = len(shape_of(node.args[0]))
    if node.target is aten.permute.default:
        return dim_args(node)
    order = list(range(rank))
    if rank >= 2:
        a, b = dim_args(node)
        order[a], order[b] = order[b], order[a]
    return order


def keepdim(node: torch.fx.Node) -> bool:
    """Whether a reduction keeps its reduced dims (size 1)."""
    has = any(a.name == "keepdim" for a in node.target._schema.arguments)
    return bool(arg(node, "keepdim")) if has else False


@dataclasses.dataclass(frozen=True)
class DimMap:
    """Where the dims of a node's first tensor input go in its (first) output."""

    out: tuple[int | None, ...]
    """Per input dim, the output dim holding it (None: removed, by a select or a reduction)."""
    mixed: frozenset[int]
    """Input dims the op combines values along (reduced, normalized, contracted, selected):
    a dim that is cut (sharded, patched) must not be one of them."""
    cut: int | None = None
    """The dim a slice, split or cat cuts or joins: it keeps its position but not its size."""


def dim_map(node: torch.fx.Node) -> DimMap | None:
    """Where each dim of ``node``'s first tensor input lands in its output, or None for ops
    that merge or split dims (reshapes), join several inputs dim by dim (einsum, attention)
    or carry no dims (collectives, ``getitem``): consumers handle those themselves."""
    rule = op_rule(node.target)
    if rule is None:
        return None
    x = first_input(node)
    in_shape, out_shape = shape_of(x), shape_of(node)
    if in_shape is None:
        return None
    rank = len(in_shape)
    keep = tuple(range(rank))
    kind = rule.kind
    if kind in (DimOp.IDENTITY, DimOp.POINTWISE, DimOp.EXPAND):
        shift = len(out_shape) - rank if out_shape is not None else 0
        return DimMap(tuple(d + shift for d in keep), frozenset())
    if kind is DimOp.PERMUTE:
        order = permutation(node)
        return DimMap(tuple(order.index(d) for d in keep), frozenset())
    if kind is DimOp.RESHAPE and node.target is aten.unsqueeze.default:
        new = dim_args(node)[0]
        return DimMap(tuple(d + (d >= new) for d in keep), frozenset())
    if kind is DimOp.RESHAPE and node.target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        named = range(rank) if node.target is aten.squeeze.default else dim_args(node)
        gone = {d for d in named if in_shape[d] == 1}
        return DimMap(tuple(None if d in gone else d - sum(g < d for g in gone) for d in keep), frozenset())
    if kind is DimOp.SELECT:
        (dim,) = dim_args(node)
        return DimMap(tuple(None if d == dim else d - (d > dim) for d in keep), frozenset({dim}))
    if kind is DimOp.STACK:
        (new,) = dim_args(node)
        return DimMap(tuple(d + (d >= new) for d in keep), frozenset())
    if kind in (DimOp.SLICE, DimOp.SPLIT, DimOp.CAT):
        (dim,) = dim_args(node)
        return DimMap(keep, frozenset(), cut=dim)
    if kind is DimOp.REDUCE:
        dims = dim_args(node)
        reduced = set(keep if dims is None else dims)
        if keepdim(node):
            return DimMap(keep, frozenset(reduced))
        return DimMap(tuple(None if d in reduced else d - sum(r < d for r in reduced) for d in keep),
                      frozenset(reduced))
    if kind is DimOp.NORMALIZE:
        return DimMap(keep, frozenset(range(rank - len(arg(node, rule.sizes)), rank)))
    if kind is DimOp.ALONG:
        return DimMap(keep, frozenset(dim_args(node)))
    if kind is DimOp.LINEAR:
        return DimMap(keep, frozenset({rank - 1}))
    if kind is DimOp.MATMUL:
        shift = len(out_shape) - rank
        return DimMap(tuple(d + shift for d in keep), frozenset({rank - 1}))
    if kind is DimOp.REPEAT:  # a tiled dim mixes copies of every row; leading repeats add dims
        repeats = list(arg(node, rule.sizes))
        shift = len(repeats) - rank
        return DimMap(tuple(d + shift for d in keep), frozenset(d for d in keep if repeats[d + shift] != 1))
    if kind is DimOp.PER_SAMPLE:
        return DimMap(keep, frozenset(range(1, rank)))
    if kind is DimOp.COMPLEX_VIEW:
        if node.target is aten.view_as_complex.default:  # (..., 2) -> (...): the pair dim goes
            return DimMap(keep[:-1] + (None,), frozenset({rank - 1}))
        return DimMap(keep, frozenset())  # a new trailing dim of 2
    return None
