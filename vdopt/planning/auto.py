"""``vdopt.optimize(model, mesh="auto")``: plan for this world size and device, then optimize.

Planning needs one call's inputs. With ``example_inputs`` it happens at once; otherwise the
returned module plans at its first call, from that call's inputs, builds the optimized model
for the best mesh and delegates every call to it. Every rank plans alike (same model,
inputs and rows), so every rank picks the same mesh without talking to the others.

The device row comes from ``$VDOPT_CALIBRATION`` (a file from ``vdopt calibrate``, used for
the link too) when set, else from the CUDA device's name (``DEVICE_ROWS``), else the
generic ``cpu`` row; the link from ``LINK_ROWS``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from vdopt.capture import bind_call
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.mesh import Mesh
from vdopt.planning.plan import Plan, plan

log = logging.getLogger(__name__)

CALIBRATION_ENV = "VDOPT_CALIBRATION"
"""Environment variable naming a ``vdopt calibrate`` file to plan with."""

DEVICE_ROWS = (("H100", "h100"), ("H200", "h200"), ("H800", "h800"), ("H20", "h20"), ("A100", "a100"),
               ("L40", "l40"), ("L20", "l20"))
"""Substring of ``torch.cuda.get_device_name()`` -> device row (first match wins)."""

LINK_ROWS = {"h100": "nvlink", "h200": "nvlink", "h20": "nvlink", "h800": "nvlink_h800", "a100": "nvlink3",
             "l40": "pcie", "l20": "pcie", "cpu": "gloo_local"}
"""Device row -> the link its usual multi-GPU servers have."""


def local_rows() -> tuple[str, str]:
    """``(device, link)`` rows for this machine."""
    calibration = os.environ.get(CALIBRATION_ENV)
    if calibration:
        return calibration, calibration
    device = "cpu"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        device = next((row for key, row in DEVICE_ROWS if key in name), "cpu")
        if device == "cpu":
            log.warning("no device row for %s: planning with the generic cpu row; run `vdopt calibrate --out FILE` "
                        "and set %s=FILE", name, CALIBRATION_ENV)
    return device, LINK_ROWS[device]


class AutoPlanned(torch.nn.Module):
    """Plans at its first call, then runs the model optimized for the best mesh.

    ``build(degrees)`` makes the optimized model (``vdopt.optimize`` with the user's options);
    it is passed in because the API sits above the planner.
    """

    def __init__(self, model: torch.nn.Module, build: Callable[[dict[str, int]], torch.nn.Module], *,
                 pab: PABConfig | None = None, pipefusion: PipeFusionConfig | None = None,
                 example_inputs: tuple[tuple, dict] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # held, never owned (as the executable does)
        self._build = build
        self._pab = pab
        self._pipefusion = pipefusion
        self.plan: Plan | None = None
        """The plan, once made."""
        self._optimized: torch.nn.Module | None = None
        if example_inputs is not None:
            args, kwargs = example_inputs
            self._plan_and_build(tuple(args), dict(kwargs))

    def _plan_and_build(self, args: tuple, kwargs: dict) -> None:
        device, link = local_rows()
        world = Mesh.world_size_available()
        inputs = bind_call(self._model, args, kwargs)
        self.plan = plan(self._model, world, device=device, link=link, pab=self._pab, pipefusion=self._pipefusion,
                         **inputs)
        log.info("mesh='auto': %s", self.plan)
        object.__setattr__(self, "_optimized", self._build(dict(self.plan.degrees)))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._optimized is None:
            self._plan_and_build(args, kwargs)
        return self._optimized(*args, **kwargs)

    @property
    def optimized(self) -> torch.nn.Module:
        """The optimized model for the chosen mesh (after planning)."""
        if self._optimized is None:
            raise RuntimeError('mesh="auto" plans at the first call (or with example_inputs): call the model first')
        return self._optimized

    def reset(self) -> None:
        if self._optimized is not None:
            self._optimized.reset()

    def report(self) -> str:
        if self.plan is None:
            return 'mesh="auto": not planned yet (plans at the first call)'
        chosen = self.plan.best
        runner = self.plan.runner_up
        lines = [f'mesh="auto": chose {chosen.name} ({chosen.seconds * 1e3:.1f} ms per call predicted, mostly {chosen.dominant})']
        if runner is not None:
            lines.append(f"runner-up: {runner.name} ({runner.seconds * 1e3:.1f} ms, "
                         f"{runner.seconds / chosen.seconds:.2f}x)")
        lines += [str(self.plan), "", self._optimized.report()]
        return "\n".join(lines)

    def __getattr__(self, name: str) -> Any:
        # save(), plans, mesh, ... of the optimized model; config, dtype, ... of the user's model
        try:
            return super().__getattr__(name)
        except AttributeError:
            for owner in (self.__dict__.get("_optimized"), self.__dict__.get("_model")):
                if owner is not None and hasattr(owner, name):
                    return getattr(owner, name)
            raise
