"""The automatic parallel planner: ``vdopt.plan`` ranks every mesh by predicted time per call.

Files: ``devices`` (rows of ``hardware.json`` and calibration files), ``virtual_mesh`` (a mesh
without process groups), ``candidates`` (enumeration and static checks), ``rank_graphs``
(rank 0's rewritten graphs per candidate), ``repeats`` (identical blocks, found by structure),
``costing`` (a candidate costed from copies with 1 and 2 blocks), ``cost_model`` (seconds and bytes of a graph),
``call_cost`` (one call: PipeFusion's schedule, PAB's reuse), ``plan`` (``plan``, ``Plan``),
``calibrate`` (measures this machine's row), ``auto`` (``optimize(model, mesh="auto")``).
"""

from vdopt.planning.devices import DeviceSpec, LinkSpec, get_device, get_link
from vdopt.planning.plan import Candidate, Plan, plan

__all__ = ["Candidate", "DeviceSpec", "LinkSpec", "Plan", "get_device", "get_link", "plan"]
