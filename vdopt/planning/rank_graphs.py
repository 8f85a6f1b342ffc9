"""The rewritten graphs one rank of a candidate mesh runs, built without a process group.

The model is captured once (on any device, ``meta`` included: only shapes are read) and
the passes ``optimize`` would run are run per candidate on a copy, over a ``PlanningMesh``
whose groups are names only. Mesh-independent passes at the head of the pipeline (view
folding, no-op removal) run once for all candidates. With PipeFusion, every stage's graphs
are cut (each rank runs one stage), as the runtime does it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch

from vdopt.capture import capture
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.passes.analysis.attention import analyze
from vdopt.passes.analysis.sites import AttentionSite, VideoLayout
from vdopt.passes.base import PassContext
from vdopt.passes.cleanup.drop_noops import DropNoOps
from vdopt.passes.cleanup.fold_views import FoldViews
from vdopt.passes.graph_utils import copying_exported_graphs, read_only
from vdopt.passes.order import PipelineOptions, build_pipeline
from vdopt.passes.parallel.skiparse import check_pipefusion
from vdopt.passes.pipefusion.stage_graphs import StageGraphs, build_stage_graphs
from vdopt.passes.runner import PassRecord, run_passes
from vdopt.planning.virtual_mesh import PlanningMesh

log = logging.getLogger(__name__)

SHARED_PASSES = (FoldViews.name, DropNoOps.name)
"""Passes at the head of every pipeline that do not depend on the mesh: run once."""

PLANNING_DEVICE = torch.device("meta")
"""Graphs are built for reading only; no pass may pick a device-specific rewrite."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapturedModel:
    """One capture of a model call, shared by every candidate."""

    gm: torch.fx.GraphModule
    """The captured graph after the mesh-independent passes."""
    sites: tuple[AttentionSite, ...]
    """Attention sites found by analysis."""
    layout: VideoLayout | None
    """The video token grid, when analysis found one."""
    records: tuple[PassRecord, ...]
    """What the shared passes did."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankGraphs:
    """What rank 0 of a candidate mesh runs per call."""

    degrees: dict[str, int]
    """The candidate's degrees over every axis."""
    main: torch.fx.GraphModule | None
    """The rewritten graph (``None`` with PipeFusion: see ``stages``)."""
    stages: tuple[StageGraphs, ...]
    """PipeFusion: the graphs of every stage (rank k of the pipefusion axis runs stage k)."""
    records: tuple[PassRecord, ...]
    """What every pass did."""


def capture_model(model: torch.nn.Module, inputs: dict[str, Any]) -> CapturedModel:
    """Capture ``model(**inputs)`` and run the mesh-independent passes once.

    The graph and every graph built from it are read-only (``graph_utils.read_only``): the
    planner never runs them, so no pass generates their Python code."""
    return captured_model(read_only(capture(model, inputs)))


def captured_model(gm: torch.fx.GraphModule) -> CapturedModel:
    """Analysis and the mesh-independent passes of a captured graph (rewritten in place)."""
    sites, layout = analyze(gm)
    options = PipelineOptions(mesh=PlanningMesh(), kernels="sdpa", compile=False)
    shared = [p for p in build_pipeline(options) if p.name in SHARED_PASSES]
    ctx = PassContext(mesh=options.mesh, device=PLANNING_DEVICE, sites=sites, layout=layout, kernels="sdpa")
    gm, records = run_passes(gm, ctx, shared)
    return CapturedModel(gm=gm, sites=sites, layout=layout, records=tuple(records))


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy to rewrite whose weights are shared with ``gm`` (never duplicated)."""
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    memo.update({id(v): v for v in vars(gm).values() if isinstance(v, torch.Tensor)})
    with copying_exported_graphs():
        return copy.deepcopy(gm, memo)


def rank_graphs(
    captured: CapturedModel,
    degrees: dict[str, int],
    *,
    pab: PABConfig | None = None,
    pipefusion: PipeFusionConfig | None = None,
    costing_only: bool = False,
) -> RankGraphs:
    """Rank 0's graphs for ``degrees`` (a pass's ``ValueError`` says why a mesh cannot work).

    ``costing_only``: PipeFusion stages get only the graphs the cost model reads
    (``build_stage_graphs``)."""
    mesh = PlanningMesh(**degrees)
    options = PipelineOptions(mesh=mesh, pab=pab, pipefusion=pipefusion, kernels="sdpa", compile=False)
    passes = [p for p in build_pipeline(options) if p.name not in SHARED_PASSES]
    ctx = PassContext(mesh=mesh, device=PLANNING_DEVICE, sites=captured.sites, layout=captured.layout, kernels="sdpa")
    gm, records = run_passes(copy_graph(captured.gm), ctx, passes)
    after = [*SHARED_PASSES, *(r.name for r in records)]
    records = [*captured.records, *records]
    if mesh.pipefusion == 1:
        return RankGraphs(degrees=mesh.degrees, main=gm, stages=(), records=tuple(records))
    check_pipefusion(captured.sites, captured.layout, mesh)  # what optimize refuses before building
    config = pipefusion or PipeFusionConfig()
    stages = []
    for stage in range(mesh.pipefusion):
        graphs, stage_records = build_stage_graphs(gm, ctx, config, stage, after=after, costing_only=costing_only)
        stages.append(graphs)
        records += stage_records
    return RankGraphs(degrees=mesh.degrees, main=None, stages=tuple(stages), records=tuple(records))
