"""What is built per input signature: the ``Plan``, and the ``Program`` protocol that runs it."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from vdopt.guards import Guards
from vdopt.passes.analysis.sites import AttentionSite, VideoLayout
from vdopt.passes.runner import PassRecord
from vdopt.runtime.failures import Step


class Program(Protocol):
    """Runs one call of a captured signature; holds step state across calls."""

    step: Step
    """What the program runs now (read when a collective fails during a call)."""

    def __call__(self, inputs: dict[str, Any]) -> Any: ...

    def reset(self) -> None: ...

    def summary(self) -> dict[str, Any]:
        """Figures for the report (e.g. PAB compute/reuse counts)."""
        ...


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
    """What each pass did, on the main graph and on the graphs features derive from it."""
    capture_s: float
    """Seconds spent in torch.export."""
    passes_s: float
    """Seconds spent in analysis and passes."""
    program: Program
    """Runs the calls."""
    guards: Guards | None = None
    """Data-dependent values the graphs are specialized on; ``None``: valid for every call of
    the signature. A plan whose guards fail for a call is not run: the model is captured again."""
