"""Find the regions Pyramid Attention Broadcast may reuse: the pure find step of PAB.

A *region* is the part of the graph that computes one broadcastable value: an attention
module's output (its input norms, Q/K/V projections, q/k norms, SDPA, output projection, and
any collectives sequence parallel put inside it) or, with MLP broadcast, a feed-forward
module's output. A region is found from the final per-rank graph, after every other pass,
by module scope (``nn_module_stack``, which ``insert_call(like=...)`` copies onto new nodes):
its outputs are the nodes in the module's scope that something outside the scope reads.
That is what diffusers' PAB hook caches too (the attention module's return value).

Attention without an SDPA node (linear attention: ``Q (K^T V)``, Sana; flex attention,
AnyFlow's causal self-attention) has no attention site; its module is found from the graph
instead: the innermost module whose scope holds a matmul or einsum of two activations (or a
flex attention of its q and k), each computed inside that module from its own projections
(q/k/v). A feed-forward has projections but multiplies no two activations.
Such a module is broadcast only when its class is an attention class (``Attention`` in the
name of the class or a base): diffusers' hook goes by class, and structure alone would
also take token mixers it leaves alone (SanaWM's gated delta net).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections import Counter
from collections.abc import Collection

import torch
import torch.fx

from vdopt import meta
from vdopt.passes.analysis.attention import depends_on_latent
from vdopt.passes.analysis.sites import AttentionSite
from vdopt.passes.dims.rules import FLEX_ATTENTION
from vdopt.passes.graph_utils import ancestors

log = logging.getLogger(__name__)

aten = torch.ops.aten

PAB_KIND_OF_SITE: dict[str, str] = {
    "spatial": "spatial",
    "full": "spatial",
    "joint_text": "spatial",
    "temporal": "temporal",
    "cross": "cross",
}
"""PAB kind (schedule group) of each attention site kind. ``full`` and ``joint_text``
self-attention follow the spatial settings; ``text`` self-attention is never broadcast."""

PAB_KINDS: tuple[str, ...] = ("spatial", "temporal", "cross", "mlp")
"""Every PAB kind, in report order."""

LINEARS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
PROJECTIONS = {aten.linear.default, aten.addmm.default}
"""Ops that project activations with a weight (q/k/v projections)."""
CONTRACTIONS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default, FLEX_ATTENTION}
"""Ops that may multiply two activations (scores, ``K^T V``; flex attention's ``Q K^T``)."""



@dataclasses.dataclass(frozen=True, kw_only=True)
class PABRegion:
    """One broadcastable region of the graph."""

    name: str
    """The module path (an attention site's name, or the feed-forward module's path)."""
    kind: str
    """PAB kind: ``spatial``, ``temporal``, ``cross`` or ``mlp``."""
    site_kind: str
    """The analysis kind of the site (``full``, ``joint_text``, ...), or ``mlp``."""
    outputs: tuple[str, ...]
    """Names of the nodes whose values are cached (the module's return values)."""
    scope_nodes: int
    """Number of nodes in the module's scope (for the report)."""

    def cache_keys(self) -> tuple[str, ...]:
        """Stable keys of this region's cached values: ``<name>:<index>``."""
        return tuple(f"{self.name}:{i}" for i in range(len(self.outputs)))


def _stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """``[(key, path), ...]`` outermost first; keys tell repeated calls of a module apart."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, value[0]) for key, value in stack.items()]


def _scopes(graph: torch.fx.Graph) -> tuple[dict[str, list[torch.fx.Node]], dict[str, list[str]]]:
    """Nodes per module-call key, and the keys per module path."""
    nodes: dict[str, list[torch.fx.Node]] = {}
    keys: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        for key, path in _stack(n):
            if key not in nodes:
                nodes[key] = []
                keys.setdefault(path, []).append(key)
            nodes[key].append(n)
    return nodes, keys


def _unscoped_pass_node(node: torch.fx.Node) -> bool:
    """A node a vdopt pass inserted without module scope (no ``like=``), e.g. a collective."""
    return meta.CREATED_BY in node.meta and not node.meta.get("nn_module_stack")


def region_outputs(scope: list[torch.fx.Node], side_outputs: Collection[torch.fx.Node] = ()) -> list[torch.fx.Node]:
    """Nodes of ``scope`` read from outside it (or by the graph output), in graph order.

    A pass may insert nodes inside a module's computation without giving them its scope
    (an all-to-all between the projections and SDPA). Their inputs then look like outputs;
    such a node is internal when it feeds only unscoped pass nodes and is an ancestor of a
    real output, so it is not cached.

    ``side_outputs`` are values the graph returns besides the model's outputs (PipeFusion's
    fresh K/V): being returned does not make one of them a region output, so a reused region
    still computes it rather than replaying a cached copy.
    """
    inside = set(scope)
    side = set(side_outputs)

    def outside_users(n: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in n.users if u not in inside and not (u.op == "output" and n in side)]

    candidates = [n for n in scope if outside_users(n) and isinstance(n.meta.get("val"), torch.Tensor)]

    def leaks_only(n: torch.fx.Node) -> bool:
        return all(_unscoped_pass_node(u) for u in outside_users(n))

    real = [n for n in candidates if not leaks_only(n)]
    upstream = ancestors(real) - set(real)
    return [n for n in candidates if not (leaks_only(n) and n in upstream)]


def _is_attention(node: torch.fx.Node) -> bool:
    return meta.SITE in node.meta or node.target is aten.scaled_dot_product_attention.default


def find_attention_regions(
    graph: torch.fx.Graph, sites: tuple[AttentionSite, ...], side_outputs: Collection[torch.fx.Node] = ()
) -> tuple[list[PABRegion], dict[str, str]]:
    """One region per broadcastable attention site; ``skipped`` says why a site has none."""
    scopes, keys_of_path = _scopes(graph)
    by_module: dict[str, list[AttentionSite]] = {}
    for site in sites:
        if site.kind in PAB_KIND_OF_SITE:
            by_module.setdefault(site.name.split("#")[0], []).append(site)
    regions: list[PABRegion] = []
    skipped: dict[str, str] = {}
    nodes_by_name = {n.name: n for n in graph.nodes}
    # A graph rebuilt from another (PipeFusion's patch graphs) keeps the site tag, not the name.
    nodes_by_site = {n.meta[meta.SITE].name: n for n in graph.nodes if meta.SITE in n.meta}
    for path, module_sites in by_module.items():
        site = module_sites[0]
        kinds = {PAB_KIND_OF_SITE[s.kind] for s in module_sites}
        keys = keys_of_path.get(path, [])
        if len(kinds) > 1:
            skipped[site.name] = "module mixes attention kinds"
            continue
        if len(keys) > 1:
            skipped[site.name] = "module is called more than once per step"
            continue
        if keys:
            scope = scopes[keys[0]]
        else:
            # No module scope (a functional attention call): cache the attention op alone.
            node = nodes_by_site.get(site.name, nodes_by_name.get(site.node))
            if node is None:
                skipped[site.name] = "attention node not found in the final graph"
                continue
            scope = [node]
        if not any(_is_attention(n) for n in scope):
            skipped[site.name] = "module scope holds no attention node"
            continue
        outputs = region_outputs(scope, side_outputs)
        if not outputs:
            skipped[site.name] = "module output not found"
            continue
        regions.append(
            PABRegion(
                name=path,
                kind=kinds.pop(),
                site_kind=site.kind,
                outputs=tuple(n.name for n in outputs),
                scope_nodes=len(scope),
            )
        )
    return regions, skipped


def _projections_reaching(node: torch.fx.Node, scope: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Projections of ``scope`` that ``node`` is computed from, walking back inside the scope
    (and through pass nodes without scope, a collective) and not past a projection."""
    found, seen, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n.op != "call_function" or not (n in scope or _unscoped_pass_node(n)):
            continue
        seen.add(n)
        if n.target in PROJECTIONS:
            found.add(n)
            continue
        stack.extend(n.all_input_nodes)
    return found


def _is_attention_class(recorded: object) -> bool:
    """Whether the module class ``nn_module_stack`` records (a class or its qualified name) or
    one of its bases is named as an attention class; a class not loaded goes by its own name."""
    cls = recorded
    if not isinstance(cls, type):
        module, _, name = str(recorded).rpartition(".")
        cls = getattr(sys.modules.get(module), name, None)
    names = [c.__name__ for c in cls.__mro__] if isinstance(cls, type) else [str(recorded).rpartition(".")[2]]
    return any("Attention" in n for n in names)


def _contraction_operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    operands = node.args[1] if node.target is aten.einsum.default else node.args[:2]
    return [a for a in operands if isinstance(a, torch.fx.Node)]


def find_linear_attention_regions(
    graph: torch.fx.Graph, side_outputs: Collection[torch.fx.Node] = ()
) -> list[PABRegion]:
    """Attention modules without an attention node (see the module docstring): self-attention
    (``full``, PAB's spatial kind) when every projection reads the latent's token stream,
    else ``cross``."""
    scopes, keys_of_path = _scopes(graph)
    found: dict[str, tuple[str, set[torch.fx.Node]]] = {}
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in CONTRACTIONS:
            continue
        operands = _contraction_operands(n)
        stack = n.meta.get("nn_module_stack") or {}
        for key, (path, cls) in reversed(list(stack.items())):  # innermost module first
            if not _is_attention_class(cls):
                continue
            scope = set(scopes[key])
            reached = [_projections_reaching(a, scope) for a in operands]
            if len(reached) >= 2 and all(reached):
                _, projections = found.setdefault(key, (path, set()))
                projections.update(*reached)
                break
    from_latent = depends_on_latent(graph)
    regions = []
    for key, (path, projections) in found.items():
        scope = scopes[key]
        if any(_is_attention(n) for n in scope) or len(keys_of_path[path]) > 1:
            continue  # an SDPA site's module (regions of its own), or called more than once per step
        if any(other != key and path.startswith(p + ".") for other, (p, _) in found.items()):
            continue  # inside another such module: the outer one is the attention module
        outputs = region_outputs(scope, side_outputs)
        if not outputs:
            continue
        streams = {p.args[0] for p in projections}
        self_attention = len(streams) == 1 or all(s in from_latent for s in streams)
        regions.append(PABRegion(name=path, kind="spatial" if self_attention else "cross",
                                 site_kind="full" if self_attention else "cross",
                                 outputs=tuple(o.name for o in outputs), scope_nodes=len(scope)))
    return regions


def find_feedforward_regions(graph: torch.fx.Graph, side_outputs: Collection[torch.fx.Node] = ()) -> list[PABRegion]:
    """Feed-forward modules inside transformer blocks: the outermost module in a block with
    two or more projections and no attention, and a single output."""
    scopes, _ = _scopes(graph)
    blocks = {n.meta[meta.BLOCK] for n in graph.nodes if meta.BLOCK in n.meta}

    def qualifies(key: str, path: str) -> bool:
        scope = scopes[key]
        in_block = any(path.startswith(b + ".") for b in blocks)
        linears = sum(n.target in LINEARS for n in scope)
        return in_block and linears >= 2 and not any(_is_attention(n) for n in scope)

    chosen: dict[str, str] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        stack = _stack(n)
        for i, (key, path) in enumerate(stack):
            if key in chosen or not qualifies(key, path):
                continue
            if any(qualifies(k, p) for k, p in stack[:i]):
                continue
            chosen[key] = path
            break
    regions = []
    for key, path in chosen.items():
        outputs = region_outputs(scopes[key], side_outputs)
        if len(outputs) != 1:
            log.info("PAB: feed-forward module %s has %d outputs; not broadcast", path, len(outputs))
            continue
        regions.append(
            PABRegion(name=path, kind="mlp", site_kind="mlp", outputs=(outputs[0].name,), scope_nodes=len(scopes[key]))
        )
    return regions


def find_pab_regions(
    graph: torch.fx.Graph,
    sites: tuple[AttentionSite, ...],
    *,
    mlp: bool = False,
    side_outputs: Collection[torch.fx.Node] = (),
) -> tuple[list[PABRegion], dict[str, str]]:
    """Broadcastable regions of the final graph (attention sites, attention modules without an
    attention node, and feed-forwards if ``mlp``),
    and the sites left out with the reason. ``side_outputs``: see ``region_outputs``."""
    regions, skipped = find_attention_regions(graph, sites, side_outputs)
    regions += find_linear_attention_regions(graph, side_outputs)
    if mlp:
        attention = {r.name for r in regions}
        regions += [r for r in find_feedforward_regions(graph, side_outputs) if r.name not in attention]
    return regions, skipped



def count_compute(graph: torch.fx.Graph) -> Counter:
    """Projections, attention ops and collectives in ``graph`` (what a reused region drops)."""
    counts: Counter = Counter()
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in LINEARS:
            counts["linear"] += 1
        elif _is_attention(n) or n.target is FLEX_ATTENTION:
            counts["attention"] += 1
        elif getattr(n.target, "namespace", None) in ("_c10d_functional", "c10d_functional"):
            counts["collective"] += 1
    return counts
