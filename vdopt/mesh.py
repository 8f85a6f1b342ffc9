"""``vdopt.Mesh``: the named parallel degrees and the process groups behind them."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Outermost to innermost: the innermost axes get neighbouring ranks (the fastest links), so
# Ulysses' all-to-alls stay on NVLink while CFG and pipeline traffic may cross nodes.
AXES = ("cfg", "pipefusion", "ring", "ulysses", "dsp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mesh:
    """Parallel degrees over the ranks of the default process group.

    The product of the degrees must equal the world size. Creating a mesh with a product
    above 1 initializes the default process group from torchrun's environment if needed
    (NCCL on CUDA, gloo on CPU).
    """

    cfg: int = 1
    """Split the cond/uncond batch of classifier-free guidance over this many ranks (1 or 2)."""
    pipefusion: int = 1
    """Pipeline stages (PipeFusion)."""
    ulysses: int = 1
    """Ulysses sequence parallel degree (all-to-all head <-> sequence)."""
    ring: int = 1
    """Ring attention degree (K/V passed around the ring)."""
    dsp: int = 1
    """Dynamic sequence parallel degree for spatial-temporal models."""
    timeout_s: float = 300.0
    """Collective timeout: a dead rank becomes an error on the others after this long."""

    def __post_init__(self) -> None:
        for axis in AXES:
            degree = getattr(self, axis)
            if not isinstance(degree, int) or degree < 1:
                raise ValueError(f"Mesh degree {axis}={degree!r} must be a positive int ({self.describe()})")
        if self.cfg > 2:
            raise ValueError(f"Mesh cfg={self.cfg}: CFG parallel splits a cond/uncond pair, use cfg=1 or 2 ({self.describe()})")
        if self.dsp > 1 and (self.ulysses > 1 or self.ring > 1):
            raise ValueError(f"DSP replaces Ulysses/Ring on spatial-temporal models; use dsp alone ({self.describe()})")
        world = self.world_size_available()
        if world != self.size:
            raise ValueError(
                f"Mesh({self.describe()}) needs {self.size} ranks (the product of the degrees) but the "
                f"world size is {world}: change the degrees so their product is {world}, or launch "
                f"with torchrun --nproc-per-node {self.size}"
            )

    @property
    def size(self) -> int:
        return math.prod(getattr(self, axis) for axis in AXES)

    @property
    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def sequence_degree(self) -> int:
        """How many ranks share one sequence (Ulysses x Ring, or DSP)."""
        return self.ulysses * self.ring * self.dsp

    def describe(self) -> str:
        return ", ".join(f"{axis}={getattr(self, axis)}" for axis in AXES)

    @staticmethod
    def world_size_available() -> int:
        """World size of the initialized default group, or from torchrun's env; else 1."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return int(os.environ.get("WORLD_SIZE", 1))

    def ensure_process_group(self, device: torch.device) -> None:
        """Initialize the default process group from torchrun's environment when needed."""
        if self.size == 1 or dist.is_initialized():
            return
        if "MASTER_ADDR" not in os.environ:
            raise ValueError(
                f"Mesh({self.describe()}) needs {self.size} ranks but no process group is initialized "
                "and no torchrun environment is set: launch with torchrun, or call "
                "torch.distributed.init_process_group first"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s))

    def device_mesh(self, device: torch.device):
        """The ``DeviceMesh`` with one named dim per axis of degree > 1 (fixed order)."""
        from torch.distributed.device_mesh import init_device_mesh

        self.ensure_process_group(device)
        names = tuple(axis for axis in AXES if getattr(self, axis) > 1)
        if not names:
            return None
        shape = tuple(getattr(self, axis) for axis in names)
        return init_device_mesh(device.type, shape, mesh_dim_names=names)
