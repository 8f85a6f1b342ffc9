"""Compiled execution: run a rewritten graph through Inductor (``torch.compile``).

``compile_graph(gm, device)`` returns a callable with the graph's own call convention. The
default (``enabled=None``) compiles on CUDA only: on the CPU, Inductor's C++ kernels take
longer to build than the few steps of a test run save. ``vdopt.optimize(..., compile=False)``
opts out everywhere, ``compile=True`` opts in on the CPU too.

Compilation happens on the first call of each graph (the inputs of that call are the example
inputs) and is reused by every later call; its time is measured, shown with a progress bar
and reported by ``compile_summary``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import torch

from vdopt.progress import progress

log = logging.getLogger(__name__)


def should_compile(enabled: bool | None, device: torch.device | str) -> bool:
    """Resolve the ``compile`` option: ``None`` means compile on CUDA only."""
    if enabled is None:
        return torch.device(device).type == "cuda"
    if not isinstance(enabled, bool):
        raise ValueError(f"compile={enabled!r}: use True, False or None (None = compile on CUDA only)")
    return enabled


class CompiledGraph:
    """A graph compiled by Inductor on its first call, then reused.

    The call convention is the graph's: a graph with pytree codegen (``ep.module()``) is
    called like the model, a flat graph with its flat inputs.
    """

    def __init__(self, gm: torch.fx.GraphModule, device: torch.device, name: str = "graph") -> None:
        self.gm = gm
        """The graph before compilation (what ``opt.save`` exports)."""
        self.device = torch.device(device)
        self.name = name
        self.compile_s: float | None = None
        """Seconds the first call took (tracing, Inductor codegen, kernel builds, one run)."""
        # fullgraph: a vdopt graph is already one ATen graph, a graph break would be a bug.
        # dynamic=False: a plan is specialized to one input signature anyway.
        self._compiled = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compile_s is not None:
            return self._compiled(*args, **kwargs)
        start = time.perf_counter()
        with progress(1, f"vdopt compile {self.name}") as bar:
            out = self._compiled(*args, **kwargs)
            bar.update(1)
        self.compile_s = time.perf_counter() - start
        log.info("compiled %s with Inductor in %.1f s", self.name, self.compile_s)
        return out

    def __repr__(self) -> str:
        state = "not compiled yet" if self.compile_s is None else f"compiled in {self.compile_s:.1f} s"
        return f"CompiledGraph({self.name}, {self.device}, {state})"


def compile_graph(
    gm: torch.fx.GraphModule,
    device: torch.device | str,
    *,
    enabled: bool | None = None,
    name: str = "graph",
) -> Callable[..., Any]:
    """``gm`` compiled with Inductor when ``should_compile(enabled, device)``, else ``gm``.

    The result has ``gm``'s call convention; ``original_graph(result)`` gives ``gm`` back.
    """
    if not should_compile(enabled, device):
        return gm
    return CompiledGraph(gm, torch.device(device), name=name)


def original_graph(runner: Callable[..., Any]) -> Any:
    """The graph behind a runner made by ``compile_graph`` (the runner itself otherwise)."""
    return runner.gm if isinstance(runner, CompiledGraph) else runner


def compile_summary(runners: Iterable[Callable[..., Any]]) -> dict[str, str]:
    """Report line for the compiled runners among ``runners`` (empty when none is)."""
    compiled = [r for r in runners if isinstance(r, CompiledGraph)]
    if not compiled:
        return {}
    done = [r for r in compiled if r.compile_s is not None]
    parts = [f"{r.name} {r.compile_s:.1f} s" for r in done]
    pending = len(compiled) - len(done)
    if pending:
        parts.append(f"{pending} not called yet")
    total = sum(r.compile_s for r in done)
    return {"compiled": f"Inductor, first calls {total:.1f} s (" + ", ".join(parts) + ")"}
