"""Rewrites of the ops that mix rows of the cut axis, each on a rank's slab.

Each function takes the rewriter (``rewrite._Rewriter``) and the original node and returns
``(new node, slab of its output)``, or None to leave the node to the generic path (which
gathers the whole axis where an op mixes rows it does not know).

* convolution: a halo of the rows its windows read from neighbours, zero rows at the image
  borders exactly like its padding (which is then dropped along the cut axis);
* explicit padding (constant, replicate, reflect): applied only by the ranks at the borders;
* group norm: sums per group on each rank, summed over ranks in rank order (the same on every
  rank), two passes (mean, then squared deviations) in float32;
* nearest resampling by an integer factor: each rank resamples its rows;
* attention over tokens that include the cut axis: queries stay local; keys and values (and a
  mask's key columns) are gathered, a mask's query rows taken locally.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from vdopt.passes.dims.rules import arg, shape_of
from vdopt.passes.patch_parallel import exchange
from vdopt.passes.patch_parallel.slab import Slab, Window, check_nonempty

if TYPE_CHECKING:
    from vdopt.passes.patch_parallel.rewrite import _Rewriter

aten = torch.ops.aten
Result = tuple[torch.fx.Node, Slab] | None


def _per_dim(value: Any, n: int) -> list[int]:
    value = [value] if isinstance(value, int) else list(value)
    return value * n if len(value) == 1 else value


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return f"{node.name} ({path})" if path else node.name


def convolution(rw: "_Rewriter", node: torch.fx.Node) -> Result:
    x = node.args[0]
    slab = rw.slab_of(x)
    if slab.dim < 2 or slab.outer != 1:
        return None
    slab = slab.flattened()
    spatial = len(shape_of(x)) - 2
    j = slab.dim - 2
    weight = shape_of(node.args[1])
    stride = _per_dim(arg(node, "stride"), spatial)
    padding = arg(node, "padding")
    if isinstance(padding, str):
        return None
    padding = _per_dim(padding, spatial)
    dilation = _per_dim(arg(node, "dilation"), spatial)
    win = Window(kernel=weight[slab.dim], stride=stride[j], padding=padding[j], dilation=dilation[j])
    out_size = shape_of(node)[slab.dim]
    out_bounds = win.out_bounds(slab.bounds, out_size)
    check_nonempty(out_bounds, f"convolution {_where(node)}")
    needed = lambda r: win.needed((out_bounds[r], out_bounds[r + 1]))  # noqa: E731
    em = rw.em
    rows = exchange.halo(em, rw.value(x), slab, needed, rw.group, f"halo {_where(node)}")
    padding[j] = 0  # the halo holds the zero rows at the image's borders
    args = [rw.value(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
    args[0] = rows
    if len(args) > 4:
        args[4] = padding
    kwargs = dict(node.kwargs)
    if len(node.args) <= 4:
        kwargs["padding"] = padding
    new = em.copy(node, node.target, tuple(args), kwargs)
    return new, Slab(dim=slab.dim, outer=1, inner=1, bounds=out_bounds, rank=slab.rank)


_PAD_MODES = ("constant", "replicate", "reflect")


def padding(rw: "_Rewriter", node: torch.fx.Node) -> Result:
    """``aten.pad`` / ``aten.constant_pad_nd``: the border ranks pad the image's borders."""
    x = node.args[0]
    slab = rw.slab_of(x)
    pads = list(node.args[1])
    pair = len(shape_of(x)) - 1 - slab.dim
    mode = arg(node, "mode") if node.target is aten.pad.default else "constant"
    if 2 * pair + 1 >= len(pads) or pads[2 * pair] == pads[2 * pair + 1] == 0:
        args = (rw.value(x), pads, *node.args[2:])
        return rw.em.copy(node, node.target, args, dict(node.kwargs)), slab  # rows unchanged
    top, bottom = pads[2 * pair], pads[2 * pair + 1]
    if mode not in _PAD_MODES or slab.outer != 1 or top < 0 or bottom < 0:
        return None
    slab = slab.flattened()
    first, last = slab.rank == 0, slab.rank == slab.ranks - 1
    if mode == "reflect" and (slab.length(0) <= top or slab.length(slab.ranks - 1) <= bottom):
        return None
    pads[2 * pair] = top if first else 0
    pads[2 * pair + 1] = bottom if last else 0
    new = rw.em.copy(node, node.target, (rw.value(x), pads, *node.args[2:]), dict(node.kwargs))
    bounds = (0, *(b + top for b in slab.bounds[1:-1]), slab.size + top + bottom)
    return new, Slab(dim=slab.dim, outer=1, inner=1, bounds=bounds, rank=slab.rank)


def group_norm(rw: "_Rewriter", node: torch.fx.Node) -> Result:
    x = node.args[0]
    slab = rw.slab_of(x)
    if slab.dim < 2:
        return None
    em = rw.em
    groups = arg(node, "num_groups")
    weight, bias, eps = arg(node, "weight"), arg(node, "bias"), arg(node, "eps")
    global_shape = shape_of(x)
    n, c = global_shape[:2]
    count = (c // groups) * math.prod(global_shape[2:])
    local = rw.value(x)
    dtype = local.meta["val"].dtype
    xf = local if dtype == torch.float32 else em.call(aten.to.dtype, (local, torch.float32))
    local_shape = em.shape(local)
    g = em.reshape(xf, [n, groups, (c // groups) * math.prod(local_shape[2:])])
    purpose = f"group norm {_where(node)}"

    def total(t: torch.fx.Node) -> torch.fx.Node:
        every = em.all_gather(t, rw.group, purpose)  # [ranks * n, groups]
        every = em.reshape(every, [slab.ranks, n, groups])
        return em.call(aten.sum.dim_IntList, (every, [0]))

    mean = em.call(aten.div.Tensor, (total(em.call(aten.sum.dim_IntList, (g, [-1]))), count))
    centred = em.call(aten.sub.Tensor, (g, em.call(aten.unsqueeze.default, (mean, -1))))
    squares = em.call(aten.sum.dim_IntList, (em.call(aten.mul.Tensor, (centred, centred)), [-1]))
    var = em.call(aten.div.Tensor, (total(squares), count))
    rstd = em.call(aten.rsqrt.default, (em.call(aten.add.Tensor, (var, eps)),))
    y = em.call(aten.mul.Tensor, (centred, em.call(aten.unsqueeze.default, (rstd, -1))))
    y = em.reshape(y, local_shape)
    if dtype != torch.float32:
        y = em.call(aten.to.dtype, (y, dtype))
    per_channel = [1, c] + [1] * (len(local_shape) - 2)
    if weight is not None:
        y = em.call(aten.mul.Tensor, (y, em.reshape(rw.value(weight), per_channel)))
    if bias is not None:
        y = em.call(aten.add.Tensor, (y, em.reshape(rw.value(bias), per_channel)))
    y.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return y, slab


def nearest(rw: "_Rewriter", node: torch.fx.Node) -> Result:
    """Nearest resampling by an integer factor along the cut axis: rows stay on their rank."""
    x = node.args[0]
    slab = rw.slab_of(x)
    if slab.dim < 2 or slab.outer != 1:
        return None
    slab = slab.flattened()
    size, out = shape_of(x)[slab.dim], shape_of(node)[slab.dim]
    if out % size:
        return None
    factor = out // size
    bounds = tuple(b * factor for b in slab.bounds)
    result = Slab(dim=slab.dim, outer=1, inner=1, bounds=bounds, rank=slab.rank)
    args = [rw.value(x), *node.args[1:]]
    output_size = arg(node, "output_size")
    if output_size is not None:
        output_size = list(output_size)
        output_size[slab.dim - 2] = result.length()
        args[1] = output_size
    new = rw.em.copy(node, node.target, tuple(args), dict(node.kwargs))
    return new, result


def attention(rw: "_Rewriter", node: torch.fx.Node) -> Result:
    """SDPA whose query tokens include the cut axis: local queries, gathered keys and values."""
    q, k, v = node.args[:3]
    slab = rw.slab_of(q)
    rank = len(shape_of(q))
    if slab is None or slab.dim != rank - 2 or arg(node, "is_causal"):
        return None
    mask = arg(node, "attn_mask")
    args = [rw.value(q), rw.full(k), rw.full(v)]
    if mask is not None:
        m = rw.full(mask)
        mshape = shape_of(mask)
        if len(mshape) >= 2 and mshape[-2] != 1:
            m = exchange.take(rw.em, m, slab.moved(len(mshape) - 2))
        args.append(m)
    args += [rw.value(a) if isinstance(a, torch.fx.Node) else a for a in node.args[4:]]
    kwargs = {key: (rw.value(val) if isinstance(val, torch.fx.Node) else val) for key, val in node.kwargs.items()}
    if mask is not None and "attn_mask" in kwargs:
        kwargs["attn_mask"] = args.pop(3)
    new = rw.em.copy(node, node.target, tuple(args), kwargs)
    return new, slab
