"""The pass contract: ``pass(gm, ctx) -> PassResult``.

A pass is a frozen dataclass whose fields are its options (bound when the pipeline is built)
with two class attributes, ``name`` and ``tier``. Calling it rewrites ``gm`` in place and
returns a ``PassResult``. Inside, a pass is a pure ``find_*(graph) -> list[...]`` step and a
``rewrite`` step, so the matching is testable on its own.

Tiers: ``exact`` passes keep the numerics (bitwise or reduction order only); ``approx`` passes
change them (PAB, PipeFusion) and only run when the user asks for them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch

if TYPE_CHECKING:
    from vdopt.mesh import Mesh
    from vdopt.passes.analysis.sites import AttentionSite, VideoLayout

Tier = Literal["exact", "approx"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassContext:
    """What every pass may read. Passes never mutate it."""

    mesh: "Mesh"
    """The device mesh the graph is rewritten for (all degrees 1 on one device)."""
    device: torch.device
    """Device the executable runs on."""
    sites: tuple["AttentionSite", ...] = ()
    """Attention sites found by analysis, in graph order."""
    layout: "VideoLayout | None" = None
    """Token layout of the video latent, when analysis could derive it."""
    kernels: str = "auto"
    """``"auto"`` (Triton on CUDA only, where measured faster), ``"triton"`` (force), ``"fp8"`` (the
    approximate fp8 Triton kernel, Hopper-class GPUs) or ``"sdpa"`` (never lower)."""


@dataclasses.dataclass(kw_only=True)
class PassResult:
    gm: torch.fx.GraphModule
    """The rewritten module (usually the one passed in)."""
    modified: bool
    """Whether the graph changed."""
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Rewrite counts and other figures for the report (e.g. ``{"all_to_all": 12}``)."""


class GraphPass(Protocol):
    name: ClassVar[str]
    tier: ClassVar[Tier]

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult: ...
