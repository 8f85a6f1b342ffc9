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
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Hashable

import torch

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
