"""Cost a candidate mesh from captures of the model with few blocks (``repeats``).

``Costing`` captures the largest copy once and cuts the smaller ones out of its graph
(``repeats.drop_blocks``), each shared by all candidates; the fake values its rewrites
propagate are shared too (``graph_utils.sharing_values``: the same op on the same shapes
recurs in every copy and candidate), and the graphs are never compiled to Python
(``graph_utils.read_only``). Without PipeFusion a candidate is built and costed on the copies
with 1 and 2 repeated blocks and extrapolated to all ``L``. With PipeFusion over ``P``
stages the stage split of the whole model is computed first (the same balance of block
FLOPs ``StageSplit`` runs, over ``L`` copies of the block), giving ``c_s`` blocks to stage
``s``; the pipeline is then built on copies with ``P' = min(P, 3)`` stages of 1 and of 2
blocks each (a first, a middle and a last stage: every middle stage of the whole model is
built like the middle one), and each stage's figures are extrapolated to its ``c_s``.
Where that does not apply (no repeated blocks, a stage cut inside a group of blocks that
repeat together, a copy whose stages split differently) the whole model is captured and
built, as without ``repeats``.

Exact: seconds (to float rounding), bytes, collectives, FLOPs, weights, stale K/V, and the
activation peak without PipeFusion. Approximate: the activation peak of a PipeFusion stage,
extrapolated linearly per graph from 1 and 2 blocks, while the true peak moves between
blocks as the stage's per-block inputs die and its merged K/V outputs pile up (within 8%
on the tests' models); it only decides which meshes ``memory_gb`` rejects. The stage split
of a model whose repeated group holds several blocks (spatial and temporal) is balanced on
the captured block FLOPs, before the mesh's rewrites (``StageSplit`` balances after them).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Any

import torch

from vdopt.capture import capture
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.passes.graph_utils import read_only, sharing_values
from vdopt.passes.pipefusion.stage_split import balance_stages, find_blocks
from vdopt.planning.call_cost import CallCost, call_cost, pab_share, pipeline_cost, stage_figures
from vdopt.planning.devices import DeviceSpec, LinkSpec
from vdopt.planning.rank_graphs import CapturedModel, captured_model, copy_graph, rank_graphs
from vdopt.planning.repeats import RepeatedBlocks, drop_blocks, find_repeated_blocks, truncated

log = logging.getLogger(__name__)

MIDDLE_STAGES = 3
"""Stages of the PipeFusion copies: the first, one middle stage (every middle stage is alike)
and the last."""


class Costing:
    """Captures of one model call, and the cost of any candidate from them.

    With ``reuse``, the largest copy any candidate of up to ``stages`` PipeFusion stages
    needs (2 blocks; with PipeFusion, 2 per stage of ``min(stages, 3)``) is captured once and
    every smaller copy is cut out of its graph (``repeats.drop_blocks``; captured where that
    does not apply). ``counts`` tallies the work done (``capture <k>`` per capture with ``k``
    repeated blocks, ``capture all``, ``cut <k>`` per copy cut out of the largest, ``build``
    per candidate graph set built), for the report and the tests.
    """

    def __init__(self, model: torch.nn.Module, inputs: dict[str, Any], *, reuse: bool = True, stages: int = 1) -> None:
        self.model = model
        self.inputs = inputs
        self.reuse = reuse
        self.repeated: RepeatedBlocks | None = find_repeated_blocks(model) if reuse else None
        self.counts: collections.Counter[str] = collections.Counter()
        self._captures: dict[int | None, CapturedModel] = {}
        self._largest = 2 * min(stages, MIDDLE_STAGES) if stages > 1 else 2
        self._raw: torch.fx.GraphModule | None = None  # the largest copy as captured, never rewritten
        self._values: dict = {}  # fake values shared by every build (``graph_utils.sharing_values``);
        # not without ``reuse``, which stays the plain reference the fast plan is checked against

    def _key(self, keep: int | None) -> int | None:
        return None if keep is None or self.repeated is None or keep >= self.repeated.length else keep

    def capture(self, keep: int | None = None) -> CapturedModel:
        """The capture with ``keep`` repeated blocks (``None``: the whole model)."""
        keep = self._key(keep)
        if keep not in self._captures:
            self._captures[keep] = captured_model(self._graph(keep))
        return self._captures[keep]

    def _graph(self, keep: int | None) -> torch.fx.GraphModule:
        """The graph of the copy with ``keep`` blocks, to rewrite: cut out of the largest copy's."""
        largest = self._key(self._largest)
        smaller = keep is not None and (largest is None or keep < largest)
        if self.repeated is None or not (smaller or keep == largest):
            return self._capture(keep)
        if self._raw is None:
            self._raw = self._capture(largest)
        if keep == largest:
            return copy_graph(self._raw)
        cut = drop_blocks(self._raw, self.repeated.length if largest is None else largest, keep)
        if cut is None:
            return self._capture(keep)
        self.counts[f"cut {keep}"] += 1
        return cut

    def _capture(self, keep: int | None) -> torch.fx.GraphModule:
        self.counts["capture all" if keep is None else f"capture {keep}"] += 1
        model = self.model if keep is None else truncated(self.model, self.repeated, keep)
        return read_only(capture(model, self.inputs))

    @property
    def analysis(self) -> CapturedModel:
        """The capture the candidates are checked against (sites, token grid)."""
        return self.capture(1 if self.repeated is not None else None)

    def blocks(self) -> int:
        """Transformer blocks of the whole model."""
        if self.repeated is None:
            return len(find_blocks(self.capture().gm.graph))
        one, two = (len(find_blocks(self.capture(k).gm.graph)) for k in (1, 2))
        return one + (self.repeated.length - 1) * (two - one)

    def _build(self, captured: CapturedModel, degrees: dict[str, int], pab, pipefusion):
        self.counts["build"] += 1
        with sharing_values(self._values) if self.reuse else contextlib.nullcontext():
            return rank_graphs(captured, degrees, pab=pab, pipefusion=pipefusion, costing_only=self.reuse)

    def cost(self, degrees: dict[str, int], device: DeviceSpec, link: LinkSpec, *, pab: PABConfig | None = None,
             pipefusion: PipeFusionConfig | None = None) -> CallCost:
        """The predicted call of ``degrees`` (a pass refusing the mesh raises as in ``rank_graphs``)."""
        if self.repeated is not None:
            if degrees["pipefusion"] == 1:
                one, two = (self._full_call(self.capture(k), degrees, device, link, pab, pipefusion) for k in (1, 2))
                return one.linear(two, self.repeated.length)
            cost = self._pipeline_call(degrees, device, link, pab, pipefusion)
            if cost is not None:
                return cost
        return self._full_call(self.capture(), degrees, device, link, pab, pipefusion)

    def _full_call(self, captured, degrees, device, link, pab, pipefusion) -> CallCost:
        graphs = self._build(captured, degrees, pab, pipefusion)
        return call_cost(graphs, device, link, sites=captured.sites, pab=pab)

    def _pipeline_call(self, degrees, device, link, pab, pipefusion) -> CallCost | None:
        """PipeFusion from copies with 1 and 2 blocks per stage, or ``None`` where that does not apply."""
        length = self.repeated.length
        stages = degrees["pipefusion"]
        few = min(stages, MIDDLE_STAGES)
        per_unit = [b.flops for b in find_blocks(self.capture(1).gm.graph)]
        if len(find_blocks(self.capture(2).gm.graph)) != 2 * len(per_unit) or 2 * few > length:
            return None  # blocks outside the repeated lists, or too few to copy
        unit = len(per_unit)
        ranges = balance_stages([float(f) for f in per_unit] * length, stages)
        if any(r.start % unit or len(r) % unit for r in ranges):
            log.debug("pipefusion=%d cuts inside a group of repeated blocks: costing the whole model", stages)
            return None
        counts = [len(r) // unit for r in ranges]
        figures = []
        for per_stage in (1, 2):
            captured = self.capture(few * per_stage)
            graphs = self._build(captured, {**degrees, "pipefusion": few}, pab, pipefusion)
            if [len(sg.figures["stage_blocks"][sg.stage]) for sg in graphs.stages] != [unit * per_stage] * few:
                return None
            figures.append(stage_figures(graphs, device, link, pab_share(pab, captured.sites)))
        one, two = figures

        def like(s: int) -> int:  # the stage of the copy built like stage s of the whole model
            return 0 if s == 0 else few - 1 if s == stages - 1 else 1

        return pipeline_cost([one[like(s)].linear(two[like(s)], counts[s]) for s in range(stages)], link)
