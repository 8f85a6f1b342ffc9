"""Find attention sites and classify them from the graph's structure.

A site's kind comes from three structural facts, none of them module names:

* where its K/V come from: the projections feeding q and k are found by walking back from
  the SDPA node; if k's projections read another token stream than q's, it is ``cross``;
* its sequence length against the video token grid (``VideoLayout``, found by ``grid.py``):
  ``T*H*W`` is ``full``, ``H*W`` with batch ``B*T`` is ``spatial``,
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
from vdopt.passes.analysis.grid import derive_layout
from vdopt.passes.analysis.latent import depends_on_latent, text_lengths
from vdopt.passes.analysis.latent import shape as _shape
from vdopt.passes.analysis.sites import AttentionSite, Kind, VideoLayout

log = logging.getLogger(__name__)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# Nodes that project tokens into q/k/v: the walk back from an SDPA input stops here.
_PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
# The outermost ``name.<index>`` of a path: ``transformer_blocks.0`` in
# ``transformer_blocks.0.attn1.to_out.0`` (the ``to_out.0`` index is not a block).
_BLOCK_RE = re.compile(r"^(.*?\.\d+)(\.|$)")


def find_attention_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is SDPA]


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
