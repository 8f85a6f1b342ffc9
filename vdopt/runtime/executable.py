"""The executable ``optimize`` returns: capture per input signature, rewrite, run.

One ``Plan`` exists per input signature (shapes, dtypes and non-tensor arguments). A plan
holds the rewritten graph(s) inside a ``Program``; a program runs one call and keeps step
state (PAB caches, pipeline buffers) until ``reset()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from vdopt.capture import bind_call, capture
from vdopt.compile import compile_graph, compile_summary
from vdopt.mesh import Mesh
from vdopt.passes.analysis.attention import analyze
from vdopt.passes.analysis.sites import AttentionSite, VideoLayout
from vdopt.passes.base import PassContext
from vdopt.passes.order import PipelineOptions, build_pipeline
from vdopt.passes.runner import PassRecord, run_passes

log = logging.getLogger(__name__)


class Program(Protocol):
    """Runs one call of a captured signature; holds step state across calls."""

    def __call__(self, inputs: dict[str, Any]) -> Any: ...

    def reset(self) -> None: ...

    def summary(self) -> dict[str, Any]:
        """Figures for the report (e.g. PAB compute/reuse counts)."""
        ...


class GraphProgram:
    """The plain program: one rewritten graph run on every call."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm

    def __call__(self, inputs: dict[str, Any]) -> Any:
        return self.gm(**inputs)

    def reset(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return compile_summary([self.gm])


def build_program(gm: torch.fx.GraphModule, ctx: PassContext, options: PipelineOptions) -> Program:
    """The program that runs a rewritten graph: plain, or with step state (PAB, PipeFusion)."""
    if ctx.mesh.pipefusion > 1:
        # Cuts the marked graph into this rank's stage; PAB, if set, specializes the stage graphs.
        from vdopt.config import PipeFusionConfig
        from vdopt.runtime.pipefusion import PipeFusionProgram

        return PipeFusionProgram.from_graph(gm, ctx, options.pipefusion or PipeFusionConfig(), pab=options.pab)
    if options.pab is not None:
        # Specializes the final per-rank graph, after every pass.
        from vdopt.runtime.pab import PABProgram

        return PABProgram.from_graph(gm, ctx, options.pab, compile=options.compile)
    return GraphProgram(compile_graph(gm, ctx.device, enabled=options.compile, name="main"))


@dataclasses.dataclass(kw_only=True)
class Plan:
    """Everything built for one input signature."""

    signature: str
    """Human-readable input signature."""
    layout: VideoLayout | None
    """Token grid found by analysis."""
    sites: tuple[AttentionSite, ...]
    """Attention sites found by analysis."""
    passes: list[PassRecord]
    """What each pass did."""
    capture_s: float
    """Seconds spent in torch.export."""
    passes_s: float
    """Seconds spent in analysis and passes."""
    program: Program
    """Runs the calls."""


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type)
    try:
        hash(leaf)
        return ("const", type(leaf).__name__, leaf)
    except TypeError:
        return ("const", type(leaf).__name__, repr(leaf))


def input_key(inputs: dict[str, Any]) -> tuple:
    """Cache key of a call: structure, tensor shapes/dtypes/devices and non-tensor values."""
    leaves, spec = pytree.tree_flatten(inputs)
    return (str(spec), tuple(_leaf_key(x) for x in leaves))


def describe_inputs(inputs: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            return f"{dtype}{list(value.shape)}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in value.items()) + "}"
        return repr(value)

    return ", ".join(f"{name}={one(value)}" for name, value in inputs.items())


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    quiet = dist.is_initialized() and dist.get_rank() != 0
    # disable=None: bars on a terminal, silent in logs and CI
    return tqdm(total=total, desc=desc, leave=False, disable=True if quiet else None)


class OptimizedModel(torch.nn.Module):
    """Drop-in replacement for the model: same call signature, same output structure."""

    def __init__(
        self,
        model: torch.nn.Module,
        mesh: Mesh,
        *,
        options: PipelineOptions,
        disable_passes: Iterable[str] = (),
    ) -> None:
        super().__init__()
        # Held by plain reference, not as a submodule: vdopt never owns or changes the model.
        object.__setattr__(self, "_model", model)
        self.mesh = mesh
        self.options = options
        self.disable_passes = tuple(disable_passes)
        self._plans: dict[tuple, Plan] = {}
        self._model_name = type(model).__name__
        # Fail on bad options now rather than at the first call.
        build_pipeline(options)

    # -- the call ------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bind_call(self._model, args, kwargs)
        plan = self._plan_for(inputs)
        with torch.no_grad():
            return plan.program(inputs)

    def _plan_for(self, inputs: dict[str, Any]) -> Plan:
        key = input_key(inputs)
        plan = self._plans.get(key)
        if plan is None:
            if self._plans:
                log.info("new input signature for %s: capturing again", self._model_name)
            plan = self._build(inputs)
            self._plans[key] = plan
        return plan

    def _build(self, inputs: dict[str, Any]) -> Plan:
        device = model_device(self._model)
        passes = build_pipeline(self.options)
        with _progress(total=2 + len(passes), desc=f"vdopt {self._model_name}") as bar:
            bar.set_postfix_str("capture")
            start = time.perf_counter()
            gm = capture(self._model, inputs)
            capture_s = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix_str("analyze")
            sites, layout = analyze(gm)
            bar.update(1)
            ctx = PassContext(
                mesh=self.mesh, device=device, sites=sites, layout=layout, kernels=self.options.kernels
            )
            gm, records = run_passes(gm, ctx, passes, disabled=self.disable_passes, progress=bar)
        return Plan(
            signature=describe_inputs(inputs),
            layout=layout,
            sites=sites,
            passes=records,
            capture_s=capture_s,
            passes_s=time.perf_counter() - start - capture_s,
            program=build_program(gm, ctx, self.options),
        )

    # -- step state ----------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: clears step state (PAB caches, call counters)."""
        for plan in self._plans.values():
            plan.program.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str, **context: Any):
        """Accepted for diffusers pipelines that wrap each call in ``cache_context``.

        vdopt keys step state by the timestep and the call order within a step, so neither
        the name nor the step details (``step_index=``, ``sigma=``) are needed.
        """
        yield

    # -- introspection -------------------------------------------------------------------
    @property
    def plans(self) -> list[Plan]:
        """The plans built so far, one per input signature seen."""
        return list(self._plans.values())

    def report(self) -> str:
        from vdopt.report import render_report

        return render_report(self._model_name, self.mesh, self.plans)

    def save(self, path: str | os.PathLike) -> Path:
        """Write AOTInductor artifacts (a package per rank and variant, and ``manifest.json``).

        Call it on every rank, after at least one call (artifacts are compiled for the input
        shapes seen). ``vdopt.load(path)`` runs them without the model's code.
        """
        from vdopt.artifacts import save

        return save(self, path)

    def __getattr__(self, name: str) -> Any:
        # nn.Module resolves parameters/submodules first; anything else (config, dtype,
        # device, ...) is read from the wrapped model so pipelines keep working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def extra_repr(self) -> str:
        return f"model={self._model_name}, mesh=({self.mesh.describe()}), plans={len(self._plans)}"
