"""The planner's cost model on known inputs: the calibration's fits, one attention node's
cost under a row's own shape curve, and a PipeFusion call from known stage figures.

No timing: every figure is computed from given numbers (measurements are the benchmark's,
benchmarks/plan_validation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from vdopt.planning.calibrate import fit_attention, link_from_samples, median_row
from vdopt.planning.call_cost import StageFigures, pipeline_cost
from vdopt.planning.cost_model import ATTENTION_HALF_KV, GraphCost, attention_efficiency, graph_cost
from vdopt.planning.devices import DeviceSpec, LinkSpec, as_row, get_device

aten = torch.ops.aten


def _device(**overrides) -> DeviceSpec:
    row = dict(key="test", name="test", memory_gb=1.0, peak_tflops={"float32": 1.0}, matmul_tflops={"float32": 1.0},
               attention_tflops={"float32": 1.0}, memory_bandwidth_gbps=1000.0, op_overhead_us=0.0)
    return DeviceSpec(**{**row, **overrides})


LINK = LinkSpec(key="test", name="test", bandwidth_gbps=1.0, latency_us=100.0, sources={})


@pytest.mark.parametrize("half", [0.0, 70.0, 1024.0, 5000.0])
def test_fit_attention_recovers_the_curve(half):
    rate, dim = 2.0e11, 64
    points = [(kv, rate * attention_efficiency(kv, dim, half)) for kv in (256, 1024)]
    fitted_rate, fitted_half = fit_attention(*points, dim)
    assert fitted_half == pytest.approx(half, abs=1e-6)
    assert fitted_rate == pytest.approx(rate, rel=1e-9)


def test_fit_attention_without_loss_at_short_keys():
    # a kernel as fast at short keys as at long ones (or faster, within noise): no loss
    rate, half = fit_attention((256, 1.1e11), (1024, 1.0e11), 128)
    assert half == 0.0
    assert rate == pytest.approx(1.0e11 / attention_efficiency(1024, 128, 0.0))


def _sdpa_graph(batch: int, heads: int, seq: int, dim: int) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    q.meta["val"] = torch.empty(batch, heads, seq, dim, device="meta")
    out = graph.call_function(aten.scaled_dot_product_attention.default, (q, q, q))
    out.meta["val"] = torch.empty(batch, heads, seq, dim, device="meta")
    graph.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("half", [None, 0.0, 64.0])
def test_attention_cost_uses_the_rows_shape_curve(half):
    gm = _sdpa_graph(2, 4, 320, 32)
    device = _device(attention_half_kv=half)
    cost = graph_cost(gm, device, LINK, {})
    flops = 4 * 2 * 4 * 320 * 320 * 32
    efficiency = attention_efficiency(320, 32, half)
    assert cost.attention_s == pytest.approx(flops / (1e12 * efficiency), rel=1e-12)
    assert cost.flops == flops
    if half is None:  # the built-in rows keep the GPU kernels' curve
        assert efficiency == attention_efficiency(320, 32, ATTENTION_HALF_KV)


def test_builtin_rows_have_no_half_kv_of_their_own():
    # the GPU rows are sourced data: the default curve applies to them unchanged
    assert get_device("h100").attention_half_kv is None


def test_link_from_samples():
    small = {"bytes_sent": 1024, "seconds": 110e-6}
    large = {"bytes_sent": 1024 + 10**7, "seconds": 110e-6 + 10e-3}
    link = link_from_samples({"small": small, "large": large}, name="x", how="test")
    assert link.bandwidth_gbps == pytest.approx(1.0)
    assert link.latency_us == pytest.approx(110 - 1024 / 1e9 * 1e6)


def test_median_row_over_ranks():
    rows = [as_row(_device(memory_bandwidth_gbps=bw, matmul_tflops={"float32": mm}, attention_half_kv=h,
                           sources={"memory_bandwidth_gbps": "s"}))
            for bw, mm, h in ((10.0, 0.1, 50.0), (30.0, 0.3, 70.0), (20.0, 0.2, 60.0))]
    row = median_row(rows)
    assert row["memory_bandwidth_gbps"] == 20.0
    assert row["matmul_tflops"] == {"float32": 0.2}
    assert row["attention_half_kv"] == 60.0
    assert "median over 3 ranks" in row["sources"]["memory_bandwidth_gbps"]
    DeviceSpec(key="calibrated", **row)  # still a row


def _stage(patch_s: float, prepare_s: float, post_s: float | None, hand_over: int, out: int) -> StageFigures:
    return StageFigures(patch=GraphCost(matmul_s=patch_s), prepare=GraphCost(matmul_s=prepare_s),
                        post=None if post_s is None else GraphCost(matmul_s=post_s), patches=4,
                        hand_over_bytes=hand_over, output_bytes=out, weight_bytes=0, activation_bytes=0,
                        kv_cache_bytes=0)


def test_pipeline_call_fills_and_drains_once_per_call():
    # stages of 1.0 s and 0.5 s per patch, 4 patches: the slowest stage's 4 patches, the other's once
    stages = [_stage(1.0, 0.2, None, 10**9, 0), _stage(0.5, 0.1, 0.3, 0, 2 * 10**9)]
    cost = pipeline_cost(stages, LINK)
    latency = 100e-6
    hand_over = latency + 1.0  # one boundary: 1 GB at 1 GB/s
    broadcast = latency + 2.0
    assert cost.seconds == pytest.approx(4 * 1.0 + 0.5 + 0.2 + 0.3 + hand_over + broadcast)
    assert cost.breakdown["pipeline fill/drain"] == pytest.approx(0.5 + 0.2 + 0.3)
    assert math.fsum(cost.breakdown.values()) == pytest.approx(cost.seconds)
