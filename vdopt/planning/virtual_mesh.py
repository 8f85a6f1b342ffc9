"""``PlanningMesh``: a mesh whose process groups are names only, for planning.

Passes read a mesh's ``axis_groups`` for the group name each collective node carries and for
this rank's coordinate along each axis; they never talk to the group. So the planner builds
a rank's rewritten graph with names that no process group backs: no ``init_process_group``,
no fake backend, and a user's own default group (under torchrun) is left alone. The graphs
are for reading (shapes, FLOPs, collective bytes), never for running.
"""

from __future__ import annotations

import dataclasses

import torch

from vdopt.mesh import AXES, AxisGroup, Mesh

GROUP_PREFIX = "vdopt-planning:"
"""Group names of planning graphs start with this, so no such graph is mistaken for a runnable one."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanningMesh(Mesh):
    """The degrees of a candidate mesh, seen from one rank, without any process group."""

    rank: int = 0
    """The global rank whose graph the passes build (its coordinate along every axis)."""

    def __post_init__(self) -> None:
        # Mesh's own checks minus the world size and the process group set-up.
        self.check_degrees()
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside Mesh({self.describe()}) of {self.size} ranks")

    def ensure_process_group(self, device: torch.device | None = None) -> None:
        return None

    def axis_groups(self, device: torch.device) -> dict[str, AxisGroup]:
        coords = self.coordinates(self.rank)
        return {
            axis: AxisGroup(axis=axis, group_name=f"{GROUP_PREFIX}{axis}", size=getattr(self, axis), rank=coords[axis])
            for axis in AXES
            if getattr(self, axis) > 1
        }
