"""Find attention sites and classify them from the graph's structure.

A site's kind comes from three structural facts, none of them module names:

* where its K/V come from: the projections feeding q and k are found by walking back from
  the SDPA node; if k's projections read another token stream than q's, it is ``cross``;
* its sequence length against the video token grid (``VideoLayout``, read off the patch
  embedding convolution): ``T*H*W`` is ``full``, ``H*W`` with batch ``B*T`` is ``spatial``,
  ``T`` with batch ``B*H*W`` is ``temporal``;
* text tokens concatenated into the sequence (``T*H*W + text``) make it ``joint_text``;
  queries that do not depend on the latent at all (a text refiner) make it ``text``.

Module paths (``nn_module_stack``) only name sites and blocks, and break a tie between
spatial and temporal when ``T == H*W``.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.fx

from vdopt import meta
from vdopt.passes.analysis.sites import AttentionSite, Kind, VideoLayout

log = logging.getLogger(__name__)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# Nodes that project tokens into q/k/v: the walk back from an SDPA input stops here.
_PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_CONVS = {aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
# The outermost ``name.<index>`` of a path: ``transformer_blocks.0`` in
# ``transformer_blocks.0.attn1.to_out.0`` (the ``to_out.0`` index is not a block).
_BLOCK_RE = re.compile(r"^(.*?\.\d+)(\.|$)")


def find_attention_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is SDPA]


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def projections_feeding(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Projection nodes reached walking back from ``node`` (not past any projection)."""
    found: dict[torch.fx.Node, None] = {}
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in _PROJECTIONS and n is not node:
            found[n] = None
            continue
        stack.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return list(found)


def _token_stream(projection: torch.fx.Node) -> torch.fx.Node:
    return projection.args[0]


def module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # export prefixes paths with "L['self']." in some versions; keep the plain dotted path
    return re.sub(r"^L\['self'\]\.?", "", path) or None


def block_of(node: torch.fx.Node) -> str | None:
    """The outermost ``name.<index>`` module (a ModuleList entry) that contains the node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in reversed(list(stack.values())):
        m = _BLOCK_RE.match(re.sub(r"^L\['self'\]\.?", "", path))
        if m:
            return m.group(1)
    return None


def _output_shapes(graph: torch.fx.Graph) -> set[tuple[int, ...]]:
    out = next(iter(graph.find_nodes(op="output")), None)
    if out is None:
        return set()
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args) if isinstance(a, torch.fx.Node)]
    return {s for s in (_shape(a) for a in leaves) if s is not None}


def _latent_placeholder(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The video latent: the largest 4-D or 5-D floating point input; without one (packed
    latents, pre-patchified tokens), the floating point input shaped like an output (a
    denoiser predicts its latent's shape), else the largest 3-D one."""
    floats = [n for n in graph.find_nodes(op="placeholder")
              if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()]
    grids = [n for n in floats if n.meta["val"].dim() in (4, 5)]
    if grids:
        return max(grids, key=lambda n: n.meta["val"].numel())
    outputs = _output_shapes(graph)
    same = [n for n in floats if _shape(n) in outputs]
    tokens = same or [n for n in floats if n.meta["val"].dim() == 3]
    return max(tokens, key=lambda n: n.meta["val"].numel()) if tokens else None


def text_lengths(graph: torch.fx.Graph) -> set[int]:
    """Sequence lengths of 3-D floating point inputs: candidate text token counts."""
    lengths = set()
    for n in graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() == 3:
            lengths.add(int(val.shape[1]))
    return lengths


def derive_layout(graph: torch.fx.Graph) -> VideoLayout | None:
    """Token grid of the latent, read off the first (patch embedding) convolution."""
    latent = _latent_placeholder(graph)
    conv = next((n for n in graph.nodes if n.op == "call_function" and n.target in _CONVS), None)
    if latent is None or conv is None:
        return None
    batch = _shape(latent)[0]
    out = _shape(conv)
    if len(out) == 5:  # conv3d: (B, C, T, H, W)
        frames, height, width = out[2], out[3], out[4]
    elif len(out) == 4 and out[0] % batch == 0:  # conv2d over frames: (B*T, C, H, W)
        frames, height, width = out[0] // batch, out[2], out[3]
    else:
        return None
    lengths = text_lengths(graph)
    text_len = max(lengths) if lengths else None
    return VideoLayout(batch=batch, frames=frames, height=height, width=width, text_len=text_len)


def _self_attention_kind(
    node: torch.fx.Node, batch: int, q_len: int, layout: VideoLayout | None, texts: set[int]
) -> tuple[Kind, tuple[str, ...]]:
    if layout is None:
        return "full", ("T", "H", "W")
    grid = layout.tokens
    if q_len > grid and (q_len - grid) in texts:
        return "joint_text", ("text", "T", "H", "W")
    is_spatial = q_len == layout.spatial_tokens and batch == layout.batch * layout.frames
    is_temporal = q_len == layout.frames and batch == layout.batch * layout.spatial_tokens
    if is_spatial and is_temporal:  # T == H*W and B*T == B*H*W: only the module path can tell
        path = module_path(node) or ""
        return ("temporal", ("T",)) if "temp" in path.lower() else ("spatial", ("H", "W"))
    if q_len == grid and (layout.frames > 1 or not is_spatial):
        return "full", ("T", "H", "W")
    if is_spatial:
        return "spatial", ("H", "W")
    if is_temporal:
        return "temporal", ("T",)
    log.warning(
        "attention %s over %d tokens (batch %d) matches no axis of the %dx%dx%d token grid; "
        "treating it as full attention",
        node.name, q_len, batch, layout.frames, layout.height, layout.width,
    )
    return "full", ("T", "H", "W")


def depends_on_latent(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node computed from the video latent input."""
    latent = _latent_placeholder(graph)
    reached = {latent} if latent is not None else set()
    for n in graph.nodes:
        if any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached


def classify(
    node: torch.fx.Node, layout: VideoLayout | None, texts: set[int], from_latent: set[torch.fx.Node]
) -> AttentionSite:
    q, k = node.args[0], node.args[1]
    batch, heads, q_len, head_dim = _shape(q)
    kv_len = _shape(k)[2]
    q_streams = {_token_stream(p) for p in projections_feeding(q)}
    k_streams = {_token_stream(p) for p in projections_feeding(k)}
    if from_latent and q not in from_latent:
        kind, axes = "text", ("text",)
    elif q_streams and k_streams and not (k_streams & q_streams):
        kind, axes = "cross", ("text",)
    else:
        kind, axes = _self_attention_kind(node, batch, q_len, layout, texts)
    attn_mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return AttentionSite(
        name=module_path(node) or node.name,
        node=node.name,
        kind=kind,
        axes=axes,
        block=block_of(node),
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        q_len=q_len,
        kv_len=kv_len,
        has_mask=attn_mask is not None,
    )


def analyze(gm: torch.fx.GraphModule) -> tuple[tuple[AttentionSite, ...], VideoLayout | None]:
    """Tag every node with its block and every SDPA node with its site; return the sites."""
    graph = gm.graph
    for n in graph.nodes:
        block = block_of(n)
        if block is not None:
            n.meta[meta.BLOCK] = block
    layout = derive_layout(graph)
    texts = text_lengths(graph)
    from_latent = depends_on_latent(graph)
    sites = []
    names: dict[str, int] = {}
    for node in find_attention_nodes(graph):
        site = classify(node, layout, texts, from_latent)
        # Attention modules that call SDPA more than once get numbered names.
        count = names.get(site.name, 0)
        names[site.name] = count + 1
        if count:
            site = type(site)(**{**site.as_row(), "name": f"{site.name}#{count}"})
        node.meta[meta.SITE] = site
        sites.append(site)
    return tuple(sites), layout
