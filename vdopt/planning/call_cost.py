"""Predicted seconds and peak memory of one denoiser call on one rank of a candidate mesh.

Without PipeFusion a call runs rank 0's rewritten graph once (``cost_model.graph_cost``).
With PipeFusion (N stages, M patches) each call fills and drains the pipeline (see
``vdopt.runtime.pipefusion``): patch i passes the stages in order while stage k works on
patch i-1, so a call takes M times the slowest stage's patch time plus every other stage's
patch time once, plus one hand-over per stage boundary on the critical path (the others
overlap with compute), the prologue, the epilogue and the broadcast of the output.
Predicted for pipelined calls (after the warm-up steps, which run every patch fresh).

PAB (``PABConfig``): a site recomputes on 1 of ``range`` calls inside its timestep window
(the window's share of a 1000-step schedule), its collectives with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from vdopt.config import PABConfig
from vdopt.passes.analysis.sites import AttentionSite
from vdopt.passes.pipefusion.stage_graphs import kv_outputs
from vdopt.planning.cost_model import GraphCost, graph_cost, tensor_bytes, weight_bytes
from vdopt.planning.devices import DeviceSpec, LinkSpec
from vdopt.planning.rank_graphs import RankGraphs

SCHEDULE_STEPS = 1000
"""Timesteps of the training schedule PAB windows are stated in."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallCost:
    """One rank's predicted call."""

    seconds: float
    """Predicted seconds per denoiser call."""
    breakdown: dict[str, float]
    """Seconds by cause (matmul, attention, memory-bound ops, op overhead, communication;
    with PipeFusion the slowest stage's M patches, and "pipeline fill/drain": the other
    stages' patch once, prologue and epilogue); they add up to ``seconds``."""
    comm_bytes: int
    """Bytes rank 0 sends per call."""
    collectives: int
    """Collectives rank 0 runs per call."""
    flops: int
    """FLOPs rank 0 runs per call."""
    weight_bytes: int
    """Weights the rank's graphs hold (the fullest rank)."""
    activation_bytes: int
    """Peak activations (the fullest rank)."""
    kv_cache_bytes: int
    """PipeFusion's stale K/V buffers (the fullest rank; 0 without PipeFusion)."""

    @property
    def peak_memory_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.kv_cache_bytes

    @property
    def dominant(self) -> str:
        return max(self.breakdown, key=self.breakdown.get)


def pab_share(config: PABConfig | None, sites: tuple[AttentionSite, ...]) -> Callable[[str], float] | None:
    """Fraction of calls on which each site (by name) computes under ``config``."""
    if config is None:
        return None
    kind_of = {s.name: s.kind for s in sites}

    def settings(kind: str) -> tuple[int | None, tuple[float, float]]:
        if kind == "temporal":
            return config.temporal_range, config.temporal_window
        if kind == "cross":
            return config.cross_range, config.cross_window
        return config.spatial_range, config.spatial_window

    def share(site: str) -> float:
        kind = kind_of.get(site)
        if kind is None:
            return 1.0
        every, (low, high) = settings(kind)
        if every is None or every <= 1:
            return 1.0
        inside = max(0.0, min(high, SCHEDULE_STEPS) - max(low, 0.0)) / SCHEDULE_STEPS
        return 1.0 - inside * (1.0 - 1.0 / every)

    return share


def _stage_outputs_bytes(pg) -> int:
    out_node = next(n for n in reversed(pg.gm.graph.nodes) if n.op == "output")
    values = list(out_node.args[0])
    kept = values[: len(values) - 2 * len(pg.cache_sites)]
    return sum(tensor_bytes(v.meta.get("val")) for v in kept if isinstance(v, torch.fx.Node))


def _output_bytes(gm: torch.fx.GraphModule) -> int:
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return sum(tensor_bytes(a.meta.get("val")) for a in out_node.all_input_nodes)


def call_cost(
    graphs: RankGraphs, device: DeviceSpec, link: LinkSpec, *, sites: tuple[AttentionSite, ...] = (),
    pab: PABConfig | None = None,
) -> CallCost:
    share = pab_share(pab, sites)
    degrees = graphs.degrees
    if graphs.main is not None:
        cost = graph_cost(graphs.main, device, link, degrees, computed=share)
        return CallCost(seconds=cost.seconds, breakdown=cost.breakdown(), comm_bytes=cost.comm_bytes,
                        collectives=cost.collectives, flops=cost.flops, weight_bytes=weight_bytes([graphs.main]),
                        activation_bytes=cost.activation_peak_bytes, kv_cache_bytes=0)
    return _pipefusion_cost(graphs, device, link, degrees, share)


def _pipefusion_cost(graphs: RankGraphs, device, link, degrees, share) -> CallCost:
    per_stage: list[GraphCost] = []  # one patch of each stage (mean over patches)
    memory: list[tuple[int, int, int]] = []
    fixed = GraphCost()  # prologue (stages run theirs at once: the slowest), epilogue, broadcast
    prologue = 0.0
    hand_over = []
    out_bytes = 0
    for sg in graphs.stages:
        patches = sg.patches or (sg.exact,)
        mean = GraphCost()
        for pg in patches:
            mean.add(graph_cost(pg.gm, device, link, degrees, computed=share), 1.0 / len(patches))
        per_stage.append(mean)
        prepare = graph_cost(sg.prepare, device, link, degrees, computed=share)
        prologue = max(prologue, prepare.seconds)
        hand_over.append(max(_stage_outputs_bytes(pg) for pg in patches))
        kv = sum(tensor_bytes(n.meta.get("val")) for n in kv_outputs(sg.exact))
        gms = [sg.prepare, sg.exact.gm] + ([sg.post] if sg.post is not None else [])
        act = max(prepare.activation_peak_bytes, mean.activation_peak_bytes)
        if sg.post is not None:
            post = graph_cost(sg.post, device, link, degrees, computed=share)
            fixed.add(post)
            act = max(act, post.activation_peak_bytes)
            out_bytes = _output_bytes(sg.post)
        memory.append((weight_bytes(gms), act, kv))
    patches = max(len(sg.patches) for sg in graphs.stages) or 1
    stage_s = [c.seconds for c in per_stage]
    slowest = max(range(len(stage_s)), key=stage_s.__getitem__)
    bandwidth = link.bandwidth_gbps * 1e9
    latency = link.latency_us * 1e-6
    critical_hand_over = sum(latency + b / bandwidth for b in hand_over[:-1])
    broadcast = latency + out_bytes / bandwidth
    total = patches * stage_s[slowest] + sum(stage_s) - stage_s[slowest] + critical_hand_over + prologue + fixed.seconds + broadcast
    breakdown = {k: v * patches for k, v in per_stage[slowest].breakdown().items()}
    breakdown["communication"] += critical_hand_over + broadcast
    breakdown["pipeline fill/drain"] = sum(stage_s) - stage_s[slowest] + prologue + fixed.seconds
    stage0 = per_stage[0]
    fullest = max(memory, key=sum)
    comm = int(stage0.comm_bytes * patches + hand_over[0] * patches)
    return CallCost(seconds=total, breakdown=breakdown, comm_bytes=comm,
                    collectives=int(stage0.collectives * patches + patches), flops=int(stage0.flops * patches),
                    weight_bytes=fullest[0], activation_bytes=fullest[1], kv_cache_bytes=fullest[2])
