"""Collective failures during a call: say where in vdopt they happened and whom they waited for.

gloo's own message names a socket or a timeout, not the mesh axis or the peer ranks, nor
which of the plan's graphs was running. Each program records the ``Step`` it is running; the
executable catches a failed collective at its call boundary and raises ``CollectiveError``
naming the call, the step and the mesh groups with their ranks, chained to the original.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.fx

from vdopt.mesh import Mesh

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "vdopt")
# gloo raises plain RuntimeErrors for lost peers and timeouts; these are their telltales.
_GLOO_MARKERS = ("gloo", "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out")


class CollectiveError(RuntimeError):
    """A collective failed or timed out during a call; the message says where and on which ranks."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step:
    """What a program is running: a graph, or a point-to-point transfer between stages."""

    what: str
    """For the message: ``graph main``, ``PAB variant reuse_cross``, ``PipeFusion stage 1 ...``."""
    groups: tuple[str, ...] = ()
    """Process-group names the step may wait on (those its collectives name)."""


def collective_groups(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """Process-group names the collectives of ``gm`` take, in first-use order."""
    names: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", None) in _COLLECTIVE_NAMESPACES:
            for a in (*n.args, *n.kwargs.values()):
                if isinstance(a, str):
                    names.setdefault(a, None)
    return tuple(names)


def graph_step(what: str, gm: torch.fx.GraphModule) -> Step:
    """The step of running ``gm`` (its collectives' groups found once, here)."""
    return Step(what=what, groups=collective_groups(gm))


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a collective (a lost peer, a timeout) rather than the model."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _GLOO_MARKERS)


def describe_groups(mesh: Mesh, device: torch.device, names: Iterable[str]) -> str:
    """``ulysses group (ranks [0, 1])``, ... for the mesh groups among ``names`` (all when none is)."""
    groups = mesh.axis_groups(device)
    names = set(names)
    me = mesh.coordinates(dist.get_rank())
    parts = []
    for axis, group in groups.items():
        if names and group.group_name not in names:
            continue
        ranks = [mesh.rank_of({**me, axis: i}) for i in range(group.size)]
        parts.append(f"{axis} group (ranks {ranks})")
    return ", ".join(parts) or "no mesh group"


def collective_error(
    error: BaseException, *, mesh: Mesh, device: torch.device, call: str, step: Step
) -> CollectiveError:
    """The error to raise for ``error``, raised by a collective while ``step`` of ``call`` ran."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    waited = describe_groups(mesh, device, step.groups)
    return CollectiveError(
        f"vdopt: a collective failed on rank {rank} during {call}, in {step.what}, waiting on the "
        f"{waited} of Mesh({mesh.describe()}): {type(error).__name__}: {error}"
    )
