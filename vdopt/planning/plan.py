"""``vdopt.plan``: rank every mesh for a world size by predicted time per denoiser call.

For each assignment of the degrees (``candidates``) the passes ``optimize`` would run build
rank 0's graphs without a process group (``rank_graphs``), and the cost model predicts one
call's seconds and each rank's peak memory from them (``call_cost``). Identical blocks are
costed once (``costing``: copies of the model with 1 and 2 of them, extrapolated). The model may live on
the ``meta`` device and inputs may be shapes: nothing is allocated or run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch

from vdopt.capture import bind_call
from vdopt.collectives import format_bytes
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.mesh import AXES, parse_degrees
from vdopt.passes.runner import PassError
from vdopt.planning.call_cost import CallCost
from vdopt.planning.candidates import candidates, describe
from vdopt.planning.devices import DeviceSpec, LinkSpec, get_device, get_link
from vdopt.planning.costing import Costing
from vdopt.progress import progress

log = logging.getLogger(__name__)

GB = 1e9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One assignment of the degrees, evaluated (or excluded, with the reason)."""

    degrees: dict[str, int]
    """Degree of every axis (``vdopt.Mesh(**degrees)`` builds it)."""
    seconds: float | None
    """Predicted seconds per denoiser call (``None`` when excluded before costing)."""
    peak_memory_gb: float | None
    """Predicted peak memory of the fullest rank, GB (1e9 bytes)."""
    dominant: str | None
    """The largest cost of the call (``attention``, ``matmul``, ``communication``, ...)."""
    reason: str | None = None
    """Why it cannot be used (excluded, or over ``memory_gb``), or ``None``."""
    cost: CallCost | None = None
    """The full prediction (breakdown, bytes, memory parts)."""

    @property
    def name(self) -> str:
        return describe(self.degrees)

    @property
    def feasible(self) -> bool:
        return self.reason is None and self.seconds is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """The ranking of every mesh for one model call, world size, device and link."""

    degrees: dict[str, int]
    """The chosen assignment (``vdopt.Mesh(**plan.degrees)``)."""
    candidates: tuple[Candidate, ...]
    """Every costed assignment, best first (those over ``memory_gb`` after the others)."""
    excluded: tuple[Candidate, ...]
    """Assignments the model cannot take, each with its reason."""
    world_size: int
    """Ranks planned for."""
    device: DeviceSpec
    """The device row used."""
    link: LinkSpec
    """The link row used."""
    memory_gb: float | None
    """The memory limit per rank, GB, or ``None`` (the device's memory)."""
    model: str
    """The model's class name and input signature."""
    seconds: float
    """Seconds spent planning."""
    work: dict[str, int] = dataclasses.field(default_factory=dict)
    """What planning did (``Costing.counts``): captures and copies cut out of a capture, by
    repeated blocks kept; graph builds."""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    @property
    def runner_up(self) -> Candidate | None:
        feasible = [c for c in self.candidates if c.feasible]
        return feasible[1] if len(feasible) > 1 else None

    def table(self) -> str:
        """Every candidate, ranked, as a text table (excluded ones last, with reasons)."""
        from vdopt.runtime.report import table

        rows = []
        for i, c in enumerate(self.candidates, 1):
            cost = c.cost
            rows.append([i if c.feasible else "-", c.name, f"{c.seconds * 1e3:.4g}", f"{c.peak_memory_gb:.3g}",
                         format_bytes(cost.comm_bytes), c.dominant, _short(c.reason or "")])
        for c in self.excluded:
            rows.append(["x", c.name, "-", "-", "-", "-", _short(c.reason)])
        return table(rows, ["rank", "mesh", "ms/call", "peak GB", "sent/call", "dominant", "note"])

    def __str__(self) -> str:
        limit = f"{self.memory_gb:g} GB" if self.memory_gb is not None else f"{self.device.memory_gb:g} GB (device)"
        lines = [f"vdopt plan: {self.model} on {self.world_size} x {self.device.name}, {self.link.name}; "
                 f"memory limit {limit}; {len(self.candidates)} meshes costed, {len(self.excluded)} excluded "
                 f"({self.seconds:.1f} s)"]
        top = [c for c in self.candidates if c.feasible][:3]
        for i, c in enumerate(top, 1):
            parts = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in sorted(c.cost.breakdown.items(), key=lambda kv: -kv[1])
                              if v > 0.005 * c.seconds)
            versus = f", {c.seconds / top[0].seconds:.2f}x the best" if i > 1 else ""
            lines.append(f"  {i}. {c.name}: {c.seconds * 1e3:.4g} ms per call{versus}; peak {c.peak_memory_gb:.3g} GB; "
                         f"mostly {c.dominant} ({parts} ms); sends {format_bytes(c.cost.comm_bytes)}")
        return "\n".join(lines)


NOTE_CHARS = 110
"""Characters of a reason shown in the table (``Candidate.reason`` has it whole)."""


def _short(text: str) -> str:
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 3] + "..."


def _shape_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Shapes (``torch.Size``) given as inputs become meta tensors of the model's dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def one(value: Any) -> Any:
        if isinstance(value, torch.Size):
            return torch.empty(value, device="meta", dtype=dtype)
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        return value

    return {k: one(v) for k, v in inputs.items()}


def _degrees(mesh: str | dict[str, int]) -> dict[str, int]:
    given = parse_degrees(mesh) if isinstance(mesh, str) else dict(mesh)
    unknown = set(given) - set(AXES)
    if unknown:
        raise ValueError(f"meshes: unknown axes {sorted(unknown)}; axes: {', '.join(AXES)}")
    return {a: given.get(a, 1) for a in AXES}


def evaluate(
    costing: Costing,
    degrees: dict[str, int],
    device: DeviceSpec,
    link: LinkSpec,
    *,
    pab: PABConfig | None = None,
    pipefusion: PipeFusionConfig | None = None,
    memory_gb: float | None = None,
) -> Candidate:
    """Build and cost one assignment (a pass refusing it becomes the candidate's reason)."""
    try:
        cost = costing.cost(degrees, device, link, pab=pab, pipefusion=pipefusion)
    except (ValueError, PassError) as e:  # the mesh cannot be built for this model: a reason, not a crash
        return Candidate(degrees=degrees, seconds=None, peak_memory_gb=None, dominant=None, reason=str(e).split("\n")[0])
    limit = memory_gb if memory_gb is not None else device.memory_gb
    peak = cost.peak_memory_bytes / GB
    reason = None
    if peak > limit:
        reason = (f"needs {peak:.1f} GB per rank (weights {cost.weight_bytes / GB:.1f}, activations "
                  f"{cost.activation_bytes / GB:.1f}, stale K/V {cost.kv_cache_bytes / GB:.1f}) > {limit:g} GB")
    return Candidate(degrees=degrees, seconds=cost.seconds, peak_memory_gb=peak, dominant=cost.dominant,
                     reason=reason, cost=cost)


def plan(
    model: torch.nn.Module,
    world_size: int,
    *args: Any,
    device: str | Path | DeviceSpec = "h100",
    link: str | Path | LinkSpec = "nvlink",
    memory_gb: float | None = None,
    pab: PABConfig | None = None,
    pipefusion: PipeFusionConfig | None = None,
    meshes: Iterable[str | dict[str, int]] | None = None,
    reuse_blocks: bool = True,
    **kwargs: Any,
) -> Plan:
    """Rank every mesh of ``world_size`` ranks for ``model(*args, **kwargs)``.

    Args:
        model: the denoiser; on the ``meta`` device it costs no memory (no weight is read).
        world_size: ranks to plan for.
        args, kwargs: one call's inputs; tensors (``meta`` ones are fine) or ``torch.Size``
            shapes (which become meta tensors of the model's floating dtype).
        device: a row of ``vdopt/planning/hardware.json`` (``h100``, ``h200``, ``a100``,
            ``l40``, ``l20``, ``h20``, ...) or a file written by ``vdopt calibrate``.
        link: ``nvlink``, ``pcie``, ``infiniband``, ``ethernet``, ... or a calibration file.
        memory_gb: memory per rank; meshes that need more are ranked after the others
            with the reason. Default: the device's memory.
        pab: cost calls with Pyramid Attention Broadcast's reuse.
        pipefusion: PipeFusion settings for meshes with ``pipefusion > 1`` (default 2 patches).
        meshes: cost only these assignments (``"ulysses=2,ring=2"`` strings or degree
            dicts); the others are listed in ``Plan.excluded`` as not asked for.
        reuse_blocks: cost identical transformer blocks once (from copies of the model with
            1 and 2 of them, cut out of one capture) and extrapolate to all
            (``vdopt.planning.repeats``); ``False`` captures and rewrites the whole model for
            every mesh, sharing nothing between meshes (slow; same predictions).

    Needs no process group: collectives are named, never run. Raises ``ValueError`` when no
    mesh fits, naming why each was excluded.
    """
    start = time.perf_counter()
    device_spec, link_spec = get_device(device), get_link(link)
    inputs = _shape_inputs(model, bind_call(model, args, kwargs))
    costing = Costing(model, inputs, reuse=reuse_blocks, stages=world_size)
    captured = costing.analysis
    assigned = candidates(world_size, captured.sites, captured.layout, costing.blocks())
    if meshes is not None:
        wanted = [_degrees(m) for m in meshes]
        wrong = [describe(w) for w in wanted if math.prod(w.values()) != world_size]
        if wrong:
            raise ValueError(f"meshes {wrong}: the degrees of each must multiply to world_size={world_size}")
        assigned = [a if a.degrees in wanted else dataclasses.replace(a, reason=a.reason or "not asked for (meshes=)")
                    for a in assigned]
    costed, excluded = [], []
    todo = [a for a in assigned if a.reason is None]
    with progress(len(todo), f"vdopt plan {type(model).__name__} x{world_size}") as bar:
        for a in assigned:
            if a.reason is not None:
                excluded.append(Candidate(degrees=a.degrees, seconds=None, peak_memory_gb=None, dominant=None,
                                          reason=a.reason))
                continue
            bar.set_postfix_str(describe(a.degrees))
            c = evaluate(costing, a.degrees, device_spec, link_spec, pab=pab, pipefusion=pipefusion,
                         memory_gb=memory_gb)
            (costed if c.seconds is not None else excluded).append(c)
            bar.update(1)
    costed.sort(key=lambda c: (not c.feasible, c.seconds))
    if not costed or not costed[0].feasible:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in [*costed, *excluded])
        raise ValueError(f"no mesh of {world_size} ranks fits {type(model).__name__} on {device_spec.name}: {reasons}")
    layout = captured.layout
    shape = f" (grid {layout.frames}x{layout.height}x{layout.width}, batch {layout.batch})" if layout is not None else ""
    return Plan(degrees=dict(costed[0].degrees), candidates=tuple(costed), excluded=tuple(excluded),
                world_size=world_size, device=device_spec, link=link_spec, memory_gb=memory_gb,
                model=f"{type(model).__name__}{shape}", seconds=time.perf_counter() - start,
                work=dict(costing.counts))
