"""``vdopt.Mesh``: the named parallel degrees and the process groups behind them."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import math
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Outermost to innermost: the innermost axes get neighbouring ranks (the fastest links), so
# Ulysses' all-to-alls stay on NVLink while CFG and pipeline traffic may cross nodes.
AXES = ("cfg", "pipefusion", "ring", "ulysses", "dsp")


@dataclasses.dataclass(frozen=True)
class AxisGroup:
    """This rank's process group along one mesh axis."""

    axis: str
    """Mesh axis name (``"ulysses"``, ...)."""
    group_name: str
    """Name of the process group, as functional collectives and ``vdopt::`` ops take it."""
    size: int
    """Ranks along the axis (the axis degree)."""
    rank: int
    """This rank's coordinate along the axis (its rank within the group)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mesh:
    """Parallel degrees over the ranks of the default process group.

    The product of the degrees must equal the world size. Creating a mesh with a product
    above 1 initializes the default process group from torchrun's environment if none is
    (gloo for CPU tensors, and NCCL for CUDA ones where CUDA is available).
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
    _groups: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    # Process groups of this mesh, created once on first use (see ``axis_groups``).

    def __post_init__(self) -> None:
        self.check_degrees()
        world = self.world_size_available()
        if world != self.size:
            raise ValueError(
                f"Mesh({self.describe()}) needs {self.size} ranks (the product of the degrees) but the "
                f"world size is {world}: change the degrees so their product is {world}, or launch "
                f"with torchrun --nproc-per-node {self.size}"
            )
        # Set up now, so dist.get_rank() works right after building a mesh (a script decides
        # what rank 0 prints or writes before the first model call).
        self.ensure_process_group()

    def check_degrees(self) -> None:
        """Raise ``ValueError`` for degrees no mesh can have (whatever the world size)."""
        for axis in AXES:
            degree = getattr(self, axis)
            if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
                raise ValueError(f"Mesh degree {axis}={degree!r} must be a positive int ({self.describe()})")
        if self.cfg > 2:
            raise ValueError(f"Mesh cfg={self.cfg}: CFG parallel splits a cond/uncond pair, use cfg=1 or 2 ({self.describe()})")
        if self.dsp > 1 and (self.ulysses > 1 or self.ring > 1):
            raise ValueError(f"DSP replaces Ulysses/Ring on spatial-temporal models; use dsp alone ({self.describe()})")

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
        return int(os.environ.get("WORLD_SIZE", "1"))

    def ensure_process_group(self, device: torch.device | None = None) -> None:
        """Initialize the default process group from torchrun's environment when needed.

        Backend: gloo for CPU tensors, NCCL for CUDA ones; ``device=None`` (the mesh does not
        know the model's device yet) takes both where CUDA is available.
        """
        if self.size == 1 or dist.is_initialized():
            return
        if "MASTER_ADDR" not in os.environ:
            raise ValueError(
                f"Mesh({self.describe()}) needs {self.size} ranks but no process group is initialized "
                "and no torchrun environment is set: launch with torchrun, or call "
                "torch.distributed.init_process_group first"
            )
        if device is None:
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        else:
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s))

    def coordinates(self, rank: int) -> dict[str, int]:
        """Coordinates of a global rank: row-major over ``AXES`` (the last axis varies fastest)."""
        coords = {}
        for axis in reversed(AXES):
            degree = getattr(self, axis)
            coords[axis] = rank % degree
            rank //= degree
        return {axis: coords[axis] for axis in AXES}

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for axis in AXES:
            rank = rank * getattr(self, axis) + coords.get(axis, 0)
        return rank

    def axis_groups(self, device: torch.device) -> dict[str, AxisGroup]:
        """This rank's process group along every axis of degree > 1, created once per mesh.

        Every rank creates every group, axis by axis in ``AXES`` order and within an axis in
        rank order, so group names are the same on every rank and in every process that
        builds the same mesh first (AOTInductor bakes the names into its packages). Groups
        get ``timeout_s``: a collective whose peer died fails after that long instead of
        hanging.
        """
        if self.size == 1:
            return {}
        key = device.type
        if key not in self._groups:
            self.ensure_process_group(device)
            world = dist.get_world_size()
            if world != self.size:
                raise ValueError(
                    f"Mesh({self.describe()}) needs {self.size} ranks but the process group has {world}: "
                    f"change the degrees so their product is {world}"
                )
            me = dist.get_rank()
            timeout = datetime.timedelta(seconds=self.timeout_s)
            groups: dict[str, AxisGroup] = {}
            for axis in AXES:
                degree = getattr(self, axis)
                if degree == 1:
                    continue
                others = [a for a in AXES if a != axis]
                for fixed in itertools.product(*(range(getattr(self, a)) for a in others)):
                    coords = dict(zip(others, fixed))
                    ranks = [self.rank_of({**coords, axis: i}) for i in range(degree)]
                    group = dist.new_group(ranks, timeout=timeout)
                    if me in ranks:
                        groups[axis] = AxisGroup(axis=axis, group_name=group.group_name, size=degree,
                                                 rank=ranks.index(me))
            log.debug("mesh %s: rank %d groups %s", self.describe(), me, groups)
            self._groups[key] = groups
        return self._groups[key]

    def device_mesh(self, device: torch.device):
        """A ``DeviceMesh`` with one named dim per axis of degree > 1 (fixed order), for user code.

        It creates process groups of its own; vdopt's passes use ``axis_groups`` (which carry
        the mesh timeout), so graphs never depend on this.
        """
        from torch.distributed.device_mesh import init_device_mesh

        self.ensure_process_group(device)
        names = tuple(axis for axis in AXES if getattr(self, axis) > 1)
        if not names:
            return None
        shape = tuple(getattr(self, axis) for axis in names)
        return init_device_mesh(device.type, shape, mesh_dim_names=names)


def parse_degrees(text: str) -> dict[str, int]:
    """``"ulysses=2,cfg=2"`` -> ``{"ulysses": 2, "cfg": 2}`` (the syntax of the CLI's ``--mesh``).

    Pairs are ``axis=degree`` separated by commas; spaces are ignored. Only the syntax is
    checked here: whether the degrees fit the world size is ``Mesh``'s check.
    """
    if not isinstance(text, str):
        raise TypeError(f"a mesh spec is a string like 'ulysses=2,cfg=2', got {type(text).__name__}")
    usage = f"write axis=degree pairs separated by commas, e.g. 'ulysses=2,cfg=2'; axes: {', '.join(AXES)}"
    degrees: dict[str, int] = {}
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ValueError(f"mesh spec {text!r} is empty: {usage}")
    for part in parts:
        axis, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"mesh spec {text!r}: {part!r} is not axis=degree; {usage}")
        if axis not in AXES:
            raise ValueError(f"mesh spec {text!r}: unknown axis {axis!r}; {usage}")
        if axis in degrees:
            raise ValueError(f"mesh spec {text!r}: axis {axis!r} is given twice")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh spec {text!r}: the degree of {axis} must be a positive integer, got {value!r}")
        degrees[axis] = int(value)
    return degrees


def as_mesh(value: Mesh | str | None) -> Mesh | None:
    """A ``Mesh`` from what a user may pass as ``mesh``: None, a Mesh, or a spec string.

    ``None`` stays ``None`` (one device); a ``Mesh`` is returned as is; a string such as
    ``"ulysses=2,cfg=2"`` is parsed by ``parse_degrees`` and becomes ``Mesh(ulysses=2, cfg=2)``
    (which checks the product against the world size). Anything else is a ``TypeError``.
    """
    if value is None or isinstance(value, Mesh):
        return value
    if isinstance(value, str):
        return Mesh(**parse_degrees(value))
    raise TypeError(
        f"mesh must be a vdopt.Mesh, a string like 'ulysses=2,cfg=2', or None (one device); "
        f"got {type(value).__name__} {value!r:.80}"
    )
