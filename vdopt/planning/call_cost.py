"""Predicted seconds and peak memory of one denoiser call on one rank of a candidate mesh.

Without PipeFusion a call runs rank 0's rewritten graph once (``cost_model.graph_cost``).
With PipeFusion (N stages, M patches) each call fills and drains the pipeline (see
``vdopt.runtime.pipefusion``): patch i passes the stages in order while stage k works on
patch i-1, so a call takes M times the slowest stage's patch time plus every other stage's
patch time once, plus one hand-over per stage boundary on the critical path (the others
overlap with compute), the prologue, the epilogue and the broadcast of the output.
Predicted for pipelined calls (after the warm-up steps, which run every patch fresh) made
step by step, ``opt(...)`` once per denoising step: the fill and drain are paid on every
call, and that is what ``benchmarks/plan_validation.py`` measures. ``opt.denoise(...)``
keeps the pipeline full across steps (as xDiT times it): a step there takes about the M
patches of the slowest stage, without the "pipeline fill/drain" part of the breakdown
(paid once per generation).

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
from vdopt.planning.repeats import linear

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

    def linear(self, two: CallCost, count: int) -> CallCost:
        """The call with ``count`` repeated blocks, from this one (1 block) and ``two`` (2
        blocks): additive figures grow linearly (``repeats``), the activation peak is ``two``'s."""
        def num(a: int, b: int) -> int:
            return round(linear(a, b, count))

        return CallCost(
            seconds=linear(self.seconds, two.seconds, count),
            breakdown={k: linear(v, two.breakdown[k], count) for k, v in self.breakdown.items()},
            comm_bytes=num(self.comm_bytes, two.comm_bytes), collectives=num(self.collectives, two.collectives),
            flops=num(self.flops, two.flops), weight_bytes=num(self.weight_bytes, two.weight_bytes),
            activation_bytes=max(self.activation_bytes, two.activation_bytes),
            kv_cache_bytes=num(self.kv_cache_bytes, two.kv_cache_bytes),
        )


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
    return pipeline_cost(stage_figures(graphs, device, link, share), link)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageFigures:
    """What one PipeFusion stage costs, the figures ``pipeline_cost`` combines."""

    patch: GraphCost
    """One patch through the stage (the mean over its patches)."""
    prepare: GraphCost
    """The prologue and the stage's per-call setup."""
    post: GraphCost | None
    """The epilogue (last stage only)."""
    patches: int
    """Patches per call."""
    hand_over_bytes: int
    """Bytes of the activations one patch sends to the next stage (the largest patch)."""
    output_bytes: int
    """Bytes of the call's outputs (last stage only, else 0): broadcast to every rank."""
    weight_bytes: int
    """Weights the stage's graphs hold."""
    activation_bytes: int
    """Peak activations of the stage's graphs."""
    kv_cache_bytes: int
    """The stage's stale K/V buffers."""

    def linear(self, two: StageFigures, count: int) -> StageFigures:
        """The figures of the stage with ``count`` repeated blocks, from this one (1 block) and
        ``two`` (2 blocks): every figure grows linearly, each graph's activation peak too (the
        per-call setup of every block of the stage is alive until the stage's patches have
        run); the stage's peak is the largest of its graphs'."""
        def cost(a: GraphCost | None, b: GraphCost | None) -> GraphCost | None:
            if a is None:
                return None
            out = GraphCost()
            out.add(a)
            out.add(b, count - 1)
            out.add(a, -(count - 1))
            out.activation_peak_bytes = num(a.activation_peak_bytes, b.activation_peak_bytes)
            return out

        def num(a: int, b: int) -> int:
            return round(linear(a, b, count))

        patch, prepare, post = cost(self.patch, two.patch), cost(self.prepare, two.prepare), cost(self.post, two.post)
        return StageFigures(
            patch=patch, prepare=prepare, post=post,
            patches=self.patches, hand_over_bytes=two.hand_over_bytes, output_bytes=two.output_bytes,
            weight_bytes=num(self.weight_bytes, two.weight_bytes),
            activation_bytes=max(g.activation_peak_bytes for g in (patch, prepare, post) if g is not None),
            kv_cache_bytes=num(self.kv_cache_bytes, two.kv_cache_bytes),
        )


def stage_figures(graphs: RankGraphs, device: DeviceSpec, link: LinkSpec,
                  share: Callable[[str], float] | None = None) -> list[StageFigures]:
    """The figures of every stage of a PipeFusion candidate."""
    degrees = graphs.degrees
    out = []
    patches_per_call = max(len(sg.patches) for sg in graphs.stages) or 1
    for sg in graphs.stages:
        patches = sg.patches or (sg.exact,)
        whole = sg.exact or patches[0]  # without the graph on the whole latent: a patch's weights and merged K/V
        mean = GraphCost()
        costs: dict[int, GraphCost] = {}  # patches of one length may share a graph
        for pg in patches:
            if id(pg) not in costs:
                costs[id(pg)] = graph_cost(pg.gm, device, link, degrees, computed=share)
            mean.add(costs[id(pg)], 1.0 / len(patches))
        prepare = graph_cost(sg.prepare, device, link, degrees, computed=share)
        post = graph_cost(sg.post, device, link, degrees, computed=share) if sg.post is not None else None
        gms = [sg.prepare, whole.gm] + ([sg.post] if sg.post is not None else [])
        act = max(prepare.activation_peak_bytes, mean.activation_peak_bytes,
                  post.activation_peak_bytes if post is not None else 0)
        out.append(StageFigures(
            patch=mean, prepare=prepare, post=post, patches=patches_per_call,
            hand_over_bytes=max(_stage_outputs_bytes(pg) for pg in patches),
            output_bytes=_output_bytes(sg.post) if sg.post is not None else 0,
            weight_bytes=weight_bytes(gms), activation_bytes=act,
            kv_cache_bytes=sum(tensor_bytes(n.meta.get("val")) for n in kv_outputs(whole)),
        ))
    return out


def pipeline_cost(stages: list[StageFigures], link: LinkSpec) -> CallCost:
    """One call through the pipeline of ``stages`` (see the module docstring)."""
    fixed = GraphCost()  # epilogue
    for st in stages:
        if st.post is not None:
            fixed.add(st.post)
    prologue = max(st.prepare.seconds for st in stages)  # stages run theirs at once: the slowest
    out_bytes = next((st.output_bytes for st in reversed(stages) if st.post is not None), 0)
    patches = stages[0].patches
    stage_s = [st.patch.seconds for st in stages]
    slowest = max(range(len(stage_s)), key=stage_s.__getitem__)
    bandwidth = link.bandwidth_gbps * 1e9
    latency = link.latency_us * 1e-6
    critical_hand_over = sum(latency + st.hand_over_bytes / bandwidth for st in stages[:-1])
    broadcast = latency + out_bytes / bandwidth
    total = patches * stage_s[slowest] + sum(stage_s) - stage_s[slowest] + critical_hand_over + prologue + fixed.seconds + broadcast
    breakdown = {k: v * patches for k, v in stages[slowest].patch.breakdown().items()}
    breakdown["communication"] += critical_hand_over + broadcast
    breakdown["pipeline fill/drain"] = sum(stage_s) - stage_s[slowest] + prologue + fixed.seconds
    stage0 = stages[0].patch
    fullest = max(stages, key=lambda st: st.weight_bytes + st.activation_bytes + st.kv_cache_bytes)
    comm = round(stage0.comm_bytes * patches + stages[0].hand_over_bytes * patches)
    return CallCost(seconds=total, breakdown=breakdown, comm_bytes=comm,
                    collectives=round(stage0.collectives * patches + patches), flops=round(stage0.flops * patches),
                    weight_bytes=fullest.weight_bytes, activation_bytes=fullest.activation_bytes,
                    kv_cache_bytes=fullest.kv_cache_bytes)
