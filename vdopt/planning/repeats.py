"""Identical transformer blocks, found by structure: plan with a few, extrapolate to all.

A DiT is mostly ``L`` copies of one block (or of one group of blocks, such as a spatial and
a temporal block run in turn). Every rewrite the planner costs treats each copy alike, so
the cost of a call is linear in ``L``: ``cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1))``
for every additive figure (seconds by cause, bytes sent, collectives, FLOPs, weights, stale
K/V), and the activation peak of two copies is that of ``L``. So the planner captures and
rewrites copies of the model that hold 1 and 2 blocks (and, for PipeFusion, 1 and 2 per
stage) instead of the whole model, which is what makes planning a full-size model take
seconds.

The repeated blocks are found by structure, never by name: ``nn.ModuleList`` s whose
entries all have the same class, the same parameter and buffer shapes and dtypes, and the
same plain settings (ints, floats, strings, flags) in every submodule. Lists of the same
length are assumed to be run together (``zip``) and are cut together. The copies are new
module objects sharing the user's submodules and weights; the user's model is not changed.

Capturing costs about a second per copy whatever its size, so only the largest copy is
captured and the smaller ones are cut out of its graph (``drop_blocks``): the graph of a copy
with ``k`` of ``K`` repeated groups is that of ``K`` without groups ``k-1 .. K-2``, the last
group reading what group ``k-1`` reads. That holds where the captured graph repeats node for
node from group to group, which ``drop_blocks`` checks; where it does not (a long skip
between blocks, blocks not contiguous) the copy is captured.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Hashable

import torch
import torch.fx
from torch.utils import _pytree as pytree

from vdopt.passes.graph_utils import copying_exported_graphs, graph_module_like, is_impure
from vdopt.passes.pipefusion.stage_split import find_blocks

MIN_REPEATS = 3
"""Fewest entries a list must have to be worth cutting (2 copies are built anyway)."""

_PLAIN = (bool, int, float, str, type(None))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RepeatedBlocks:
    """The lists of identical blocks of a model that are cut together."""

    paths: tuple[str, ...]
    """Module paths of the ``nn.ModuleList`` s (``blocks``; or ``transformer_blocks`` and
    ``temporal_transformer_blocks``)."""
    length: int
    """Entries of each list (``L``)."""


def _settings(value) -> Hashable:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return tuple(value)
    if isinstance(value, torch.dtype):
        return str(value)
    return None


def block_signature(module: torch.nn.Module) -> Hashable:
    """What must match for two blocks to compute alike: classes, tensor shapes, plain settings."""
    parts = []
    for name, sub in module.named_modules():
        plain = tuple(sorted((k, _settings(v)) for k, v in vars(sub).items()
                             if not k.startswith("_") and _settings(v) is not None))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in [*sub.named_parameters(recurse=False),
                                                                 *sub.named_buffers(recurse=False)] if t is not None)
        parts.append((name, type(sub).__qualname__, plain, tensors))
    return tuple(parts)


def find_repeated_blocks(model: torch.nn.Module) -> RepeatedBlocks | None:
    """The lists of identical blocks holding the most parameters (``None`` if there are none)."""
    found: dict[int, list[tuple[str, int]]] = {}
    taken: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < MIN_REPEATS:
            continue
        if any(path.startswith(t + ".") for t in taken):
            continue  # a list inside a block is part of that block
        first = block_signature(module[0])
        if all(block_signature(m) == first for m in list(module)[1:]):
            taken.append(path)
            size = sum(p.numel() for p in module.parameters())
            found.setdefault(len(module), []).append((path, size))
    if not found:
        return None
    length, lists = max(found.items(), key=lambda kv: sum(s for _, s in kv[1]))
    return RepeatedBlocks(paths=tuple(p for p, _ in lists), length=length)


def truncated(model: torch.nn.Module, repeated: RepeatedBlocks, keep: int) -> torch.nn.Module:
    """A copy of ``model`` whose repeated lists hold their first ``keep`` blocks.

    Only the modules on the way to the lists are new (shallow) objects; every other
    submodule, parameter and buffer is the user's own, shared.
    """
    assert 1 <= keep <= repeated.length, (keep, repeated.length)

    def clone(module: torch.nn.Module) -> torch.nn.Module:
        new = copy.copy(module)
        new._modules = dict(module._modules)
        return new

    root = clone(model)
    for path in repeated.paths:
        *parents, leaf = path.split(".")
        owner = root
        for name in parents:
            child = clone(owner._modules[name])
            owner._modules[name] = child
            owner = child
        owner._modules[leaf] = torch.nn.ModuleList(list(owner._modules[leaf])[:keep])
    return root


def linear(one: float, two: float, count: int) -> float:
    """A figure of ``count`` blocks from its values with 1 and 2 blocks."""
    return one + (count - 1) * (two - one)


def drop_blocks(gm: torch.fx.GraphModule, groups: int, keep: int) -> torch.fx.GraphModule | None:
    """The graph of the copy with ``keep`` repeated groups, cut out of ``gm``, the capture of the
    copy with ``groups`` of them (``None`` where ``gm`` does not repeat node for node).

    Group ``i`` spans the nodes from its first block's first node to the next group's (the
    glue between blocks included). Groups ``keep-1 .. groups-2`` are removed; the last group
    and the epilogue stay, the last group reading, argument for argument, what the removed
    group ``keep-1`` read (group ``keep-2``'s values, or the prologue's). Checked first: every
    group but the first has the same nodes as the last, each reading the same prologue node
    or the node at the same place in a group as many groups back.
    """
    assert 1 <= keep < groups, (keep, groups)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    blocks = find_blocks(gm.graph)
    if not blocks or len(blocks) % groups:
        return None
    unit = len(blocks) // groups
    starts = [min(pos[by_name[name]] for b in blocks[g * unit:(g + 1) * unit] for name in b.nodes)
              for g in range(groups)]
    length = starts[1] - starts[0]
    if any(b - a != length for a, b in zip(starts, starts[1:])) or starts[-1] + length > len(nodes):
        return None

    def group_of(i: int) -> int:  # -1: prologue; groups - 1: the last group and the epilogue
        return -1 if i < starts[0] else min((i - starts[0]) // length, groups - 1)

    def signature(n: torch.fx.Node) -> tuple:
        """``n`` as seen from its group: target and, per argument, prologue node (a weight: its
        name less the block index) or (groups back, place)."""
        g = group_of(pos[n])

        def arg(a):
            if not isinstance(a, torch.fx.Node):
                return repr(a)
            h = group_of(pos[a])
            if h >= 0:
                return g - h, (pos[a] - starts[0]) - h * length
            return re.sub(r"\d+", "#", str(a.target)) if a.op == "get_attr" else a.name  # a group's own weights

        target = n.target if n.op == "call_function" else n.op
        return target, tuple(arg(a) for a in pytree.tree_leaves((n.args, n.kwargs), is_leaf=lambda x: x is None))

    last = [signature(nodes[starts[-1] + j]) for j in range(length)]
    if any([signature(nodes[starts[g] + j]) for j in range(length)] != last for g in range(1, groups - 1)):
        return None
    if [(t, len(a)) for t, a in map(signature, nodes[starts[0]:starts[0] + length])] != [(t, len(a)) for t, a in last]:
        return None  # the first group reads the prologue where the others read the group before
    removed = set(nodes[starts[keep - 1]:starts[-1]])
    graph = torch.fx.Graph(owning_module=gm)  # until the new module owns it (DCE looks up called modules)
    with copying_exported_graphs():
        graph._codegen = copy.deepcopy(gm.graph._codegen)  # the call convention (pytree specs)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, n in enumerate(nodes):
        if n in removed:
            continue
        if starts[-1] <= i < starts[-1] + length:  # the last group: reads what group keep-1 read
            template = nodes[starts[keep - 1] + i - starts[-1]]
            own, read = (pytree.tree_leaves((x.args, x.kwargs), is_leaf=lambda v: v is None) for x in (n, template))
            pairs = {(a, b) for a, b in zip(own, read) if isinstance(a, torch.fx.Node) and a in removed}
            swap = dict(pairs)
            if len(swap) != len(pairs) or any(not isinstance(b, torch.fx.Node) or b in removed for b in swap.values()):
                return None
            env[n] = graph.node_copy(n, lambda a: env[swap.get(a, a)])
            # named after the block it stands for (attention sites, stage blocks), as a capture would
            env[n].meta.update({k: v for k, v in template.meta.items() if k not in ("val", "tensor_meta")})
        elif any(a in removed for a in n.all_input_nodes):
            return None  # the epilogue reads a removed group
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    for n in reversed(nodes):  # what only the removed groups read (their weights); dead code stays as captured
        if n in env and n.users and not env[n].users and not is_impure(env[n]):
            graph.erase_node(env[n])
    out = graph_module_like(gm, graph)
    return out if len(find_blocks(out.graph)) == keep * unit else None
