"""The video token grid (T, H, W): one place that finds it, for every pass that needs it.

Ulysses, Ring and USP need only the token dim (``tokens.py``). DSP (frames vs spatial tokens)
and PipeFusion (patches along T, H or W) need the factorization of the tokens into frames,
rows and columns. It is read, in this order, off:

1. the patch embedding convolution computed from the latent: ``(B, C, T, H, W)`` or
   ``(B*T, C, H, W)``;
2. the reshape that creates the token dim by merging the patchified latent's ``(T, H, W)``
   (patchify by reshape/permute then a linear, as in Cosmos or Kandinsky 5);
3. for tokens that arrive already flat (packed latents, pre-patchified inputs): a position
   table (RoPE grid) computed inside ``forward`` whose reshape merges three sizes into a dim
   of exactly the token count;
4. else the call's integer arguments: three of them, in call order, whose product is the
   token count (LTX-Video's ``num_frames``, ``height``, ``width``).

Only shapes and values count, never module, class or argument names. A step that finds more
than one factorization does not guess: the grid is then unknown, and ``GridFinding.note``
says what was found, for the error of the strategy that needs it.

``grid_shape`` labels the dims of the node the grid is read off (``B``, ``C``, ``T``, ``H``,
``W``), so the sharding and patch passes start from the same place through the dims core.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.fx

from vdopt.passes.analysis.latent import depends_on_latent, latent_placeholder, shape, text_lengths
from vdopt.passes.analysis.sites import VideoLayout
from vdopt.passes.analysis.tokens import _reshape_source, stream_origin
from vdopt.passes.dims.rules import DimOp, op_rule
from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CONVS = {aten.conv2d.default, aten.conv3d.default, aten.convolution.default}


@dataclasses.dataclass(frozen=True)
class GridFinding:
    """What the grid search found."""

    layout: VideoLayout | None
    """The grid, or None when it could not be found (or was ambiguous)."""
    note: str
    """How it was found, or why not (what the candidates were): for logs and errors."""


def _first_conv(graph: torch.fx.Graph, from_latent: set[torch.fx.Node]) -> torch.fx.Node | None:
    return next((n for n in graph.nodes if n.op == "call_function" and n.target in CONVS and n in from_latent), None)


def _conv_grid(conv: torch.fx.Node, batch: int) -> tuple[int, int, int] | None:
    out = shape(conv)
    if out is not None and len(out) == 5:  # conv3d: (B, C, T, H, W)
        return out[2], out[3], out[4]
    if out is not None and len(out) == 4 and out[0] % batch == 0:  # conv2d over frames: (B*T, C, H, W)
        return out[0] // batch, out[2], out[3]
    return None


def _as_thw(sizes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """Merged sizes (size-1 entries left out) as (T, H, W): two sizes are one frame's rows and columns."""
    if len(sizes) == 3:
        return sizes
    if len(sizes) == 2:
        return (1, *sizes)
    return None


def _table_grids(graph: torch.fx.Graph, from_latent: set[torch.fx.Node], tokens: int) -> dict[tuple[int, int, int], str]:
    """Factorizations of ``tokens`` merged by reshapes of values not computed from the latent
    (position tables built for the call's size), with the node that merges each."""
    found: dict[tuple[int, int, int], str] = {}
    for n in graph.nodes:
        rule = op_rule(n.target) if n.op == "call_function" else None
        if rule is None or rule.kind is not DimOp.RESHAPE or n in from_latent:
            continue
        out = shape(n)
        for d, size in enumerate(out or ()):
            if not isinstance(size, int) or size != tokens:
                continue
            grid = _as_thw(_reshape_source(n, d)[1])
            if grid is not None:
                found.setdefault(grid, n.name)
    return found


def _int_argument_grids(graph: torch.fx.Graph, tokens: int) -> dict[tuple[int, int, int], str]:
    """Three integer arguments of the call, in call order, whose product is ``tokens``."""
    ints = [(n.name, n.meta["val"]) for n in graph.find_nodes(op="placeholder")
            if type(n.meta.get("val")) is int]
    found: dict[tuple[int, int, int], str] = {}
    for triple in itertools.combinations(ints, 3):
        sizes = tuple(v for _, v in triple)
        if all(v >= 1 for v in sizes) and math.prod(sizes) == tokens:
            found.setdefault(sizes, ", ".join(f"{name}={v}" for name, v in triple))
    return found


def _describe(grids: dict[tuple[int, int, int], str]) -> str:
    return "; ".join(f"T={t} H={h} W={w} ({where})" for (t, h, w), where in grids.items())


def find_grid(graph: torch.fx.Graph) -> GridFinding:
    """The latent's token grid (see the module doc), or why it cannot be told."""
    latent = latent_placeholder(graph)
    if latent is None:
        return GridFinding(None, "no floating point latent input")
    batch = shape(latent)[0]
    lengths = text_lengths(graph)
    text_len = max(lengths) if lengths else None

    def layout(grid: tuple[int, int, int], source: torch.fx.Node, dim: int | None, how: str) -> GridFinding:
        t, h, w = grid
        return GridFinding(
            VideoLayout(batch=batch, frames=t, height=h, width=w, text_len=text_len, source=source.name, source_dim=dim),
            f"T={t} H={h} W={w} from {how}",
        )

    from_latent = depends_on_latent(graph)
    conv = _first_conv(graph, from_latent)
    if conv is not None:
        grid = _conv_grid(conv, batch)
        if grid is not None:
            return layout(grid, conv, None, f"the patch embedding convolution {conv.name}")
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target is SDPA and n.args[0] in from_latent]
    origin = stream_origin(sdpas, from_latent)
    if origin is None:
        return GridFinding(None, "no attention over tokens computed from the latent")
    where = f"the {origin.size} tokens created at {origin.node.name} (dim {origin.dim})"
    if not isinstance(origin.size, int):
        return GridFinding(None, f"{where}: a data-dependent count has no fixed frames x height x width")
    merged = _as_thw(origin.grid)
    if merged is not None:
        return layout(merged, origin.node, origin.dim, f"the reshape {origin.node.name} that merges the patchified latent")
    ambiguous = []
    for what, grids in (("position tables", _table_grids(graph, from_latent, origin.size)),
                        ("integer arguments", _int_argument_grids(graph, origin.size))):
        if len(grids) == 1:
            (grid, by), = grids.items()
            return layout(grid, origin.node, origin.dim, f"{what} ({by}) for {where}")
        if grids:
            ambiguous.append(f"{what} give several: {_describe(grids)}")
    if ambiguous:
        return GridFinding(None, f"{where} factor ambiguously into frames x height x width: " + "; ".join(ambiguous))
    return GridFinding(
        None,
        f"{where} arrive flat, and no convolution, patchify reshape, position table or three integer "
        "arguments of the call factor them into frames x height x width",
    )


def derive_layout(graph: torch.fx.Graph) -> VideoLayout | None:
    """The latent's token grid, or None (see ``find_grid``)."""
    return find_grid(graph).layout


def grid_shape(graph: torch.fx.Graph, layout: VideoLayout) -> tuple[torch.fx.Node, ShardedShape]:
    """The node the grid was read off and its dims as factors: ``(B, C, T, H, W)``,
    ``(B*T, C, H, W)`` for a convolution, else ``(B, T*H*W, C)``-like with the token dim as
    ``T, H, W`` (size-1 factors left out, other dims plain)."""
    node = next((n for n in graph.nodes if n.name == layout.source), None)
    out = shape(node) if node is not None else None
    if out is None:
        raise ValueError(f"the token grid's source {layout.source} is not in this graph")
    T, H, W = layout.frames, layout.height, layout.width

    def dim(*pairs) -> Dim:
        return Dim(tuple(Factor(label, n) for label, n in pairs if n > 1))

    if layout.source_dim is None:
        if len(out) == 5 and out[2:] == (T, H, W):
            return node, ShardedShape((dim(("B", out[0])), dim(("C", out[1])), dim(("T", T)), dim(("H", H)), dim(("W", W))))
        if len(out) == 4 and out[0] % T == 0 and out[2:] == (H, W):
            return node, ShardedShape((dim(("B", out[0] // T), ("T", T)), dim(("C", out[1])), dim(("H", H)), dim(("W", W))))
        raise ValueError(f"the patch embedding output {node.name} {out} does not hold the grid T={T} H={H} W={W}")
    d = layout.source_dim
    if out[d] != T * H * W:
        raise ValueError(f"dim {d} of {node.name} {out} does not hold the {T}x{H}x{W} token grid")
    labels = {0: "B", len(out) - 1: "C"}
    dims = [dim((labels.get(i, "?"), n)) for i, n in enumerate(out)]
    dims[d] = dim(("T", T), ("H", H), ("W", W))
    return node, ShardedShape(tuple(dims))
