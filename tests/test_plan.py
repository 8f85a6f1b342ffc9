"""The parallel planner: enumeration, meta-device planning, memory limits, bytes, mesh="auto", CLI.

References: the enumeration against a brute-force product over the axes; the planner's
collective bytes against those read from the graph a real 2-rank gloo ``optimize`` built;
``mesh="auto"``'s output against the eager model on the same inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.distributed as dist

from multirank import run_on_ranks

AXES = ("cfg", "pipefusion", "ring", "ulysses", "dsp")


def _captured(name: str, size: str = "tiny", **shape):
    from vdopt.capture import bind_call
    from vdopt.models import build
    from vdopt.passes.pipefusion.stage_split import find_blocks
    from vdopt.planning.rank_graphs import capture_model

    model, args, kwargs = build(name, size, device="meta", **shape)
    captured = capture_model(model, bind_call(model, args, kwargs))
    return captured, len(find_blocks(captured.gm.graph))


@pytest.mark.parametrize("world", [1, 4, 6, 8])
def test_every_divisor_assignment_is_enumerated(world):
    from vdopt.planning.candidates import assignments

    found = [tuple(d[a] for a in AXES) for d in assignments(world)]
    expected = [c for c in itertools.product(range(1, world + 1), repeat=5) if math.prod(c) == world]
    assert sorted(found) == sorted(expected)
    assert len(found) == len(set(found))
    assert all(list(d) == list(AXES) for d in assignments(world))


def test_invalid_assignments_are_excluded_with_reasons():
    from vdopt.planning.candidates import candidates, describe

    # Wan tiny: 2 heads, full attention, batch 1, 2 blocks
    captured, blocks = _captured("wan")
    reasons = {describe(a.degrees): a.reason for a in candidates(4, captured.sites, captured.layout, blocks)}
    assert "does not divide the 2 heads" in reasons["ulysses=4"]
    assert "batch 2" in reasons["cfg=2,ring=2"]
    assert "spatial and temporal" in reasons["dsp=4"]
    assert "at most 2" in reasons["cfg=4"]
    assert "block per stage" in reasons["pipefusion=4"]
    assert reasons["ring=4"] is None and reasons["ring=2,ulysses=2"] is None
    # with the cond/uncond pair in one call, cfg=2 is allowed
    pair = dataclasses.replace(captured.layout, batch=2)
    reasons2 = {describe(a.degrees): a.reason for a in candidates(4, captured.sites, pair, blocks)}
    assert reasons2["cfg=2,ring=2"] is None


def test_full_size_model_plans_on_meta_without_process_group():
    import vdopt
    from vdopt.models import build

    model, args, kwargs = build("wan", "full", device="meta", dtype=torch.bfloat16)
    # PipeFusion's stage and patch graphs of the 30-block model take long to build: two meshes
    plan = vdopt.plan(model, 2, *args, device="h100", link="nvlink", meshes=["ulysses=2", {"ring": 2}], **kwargs)
    assert not dist.is_initialized()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert list(plan.degrees) == list(AXES) and math.prod(plan.degrees.values()) == 2
    assert plan.degrees == plan.candidates[0].degrees
    names = {c.name for c in plan.candidates}
    assert names == {"ulysses=2", "ring=2"}
    seconds = [c.seconds for c in plan.candidates]
    assert seconds == sorted(seconds) and all(s > 0 for s in seconds)
    for c in plan.candidates:
        assert math.prod(c.degrees.values()) == 2
        assert c.dominant in c.cost.breakdown
        assert c.cost.breakdown[c.dominant] == max(c.cost.breakdown.values())
        # Wan2.1-1.3B in bf16: about 2.8 GB of weights on every rank without PipeFusion
        assert 1.0 < c.peak_memory_gb < 80
    assert math.isclose(sum(plan.candidates[0].cost.breakdown.values()), plan.candidates[0].seconds, rel_tol=1e-9)
    excluded = {c.name: c.reason for c in plan.excluded}
    assert "batch 2" in excluded["cfg=2"] and "spatial and temporal" in excluded["dsp=2"]
    assert excluded["pipefusion=2"] == "not asked for (meshes=)"
    assert all(c.reason for c in plan.excluded)
    text = str(plan)
    assert "1. " in text and "ms per call" in text
    assert vdopt.Mesh(**{a: 1 for a in AXES}).size == 1  # the dict form builds a Mesh


def test_memory_limit_rejects_with_reason():
    import vdopt
    from vdopt.models import build

    model, args, kwargs = build("wan", "tiny", device="meta")
    free = vdopt.plan(model, 2, *args, device="h100", link="nvlink", **kwargs)
    peaks = sorted(c.peak_memory_gb for c in free.candidates)
    limit = (peaks[0] + peaks[-1]) / 2
    assert peaks[0] < limit < peaks[-1]
    limited = vdopt.plan(model, 2, *args, device="h100", link="nvlink", memory_gb=limit, **kwargs)
    over = [c for c in limited.candidates if c.peak_memory_gb > limit]
    assert over and all(not c.feasible and "GB per rank" in c.reason for c in over)
    assert limited.best.peak_memory_gb <= limit and limited.best.feasible
    with pytest.raises(ValueError, match="no mesh of 2 ranks fits"):
        vdopt.plan(model, 2, *args, device="h100", link="nvlink", memory_gb=peaks[0] / 2, **kwargs)


def test_shapes_as_inputs_plan_like_tensors_and_pab_lowers_attention_cost():
    import vdopt
    from vdopt.models import build

    model, args, kwargs = build("wan", "tiny", device="meta")
    shapes = {k: (v.shape if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    by_tensor = vdopt.plan(model, 2, *args, device="a100", link="pcie", meshes=["ring=2", "ulysses=2"], **kwargs)
    by_shape = vdopt.plan(model, 2, args[0].shape, device="a100", link="pcie", meshes=["ring=2", "ulysses=2"], **shapes)
    assert [c.name for c in by_shape.candidates] == [c.name for c in by_tensor.candidates]
    assert [c.seconds for c in by_shape.candidates] == pytest.approx([c.seconds for c in by_tensor.candidates])
    # PAB: reused attention (and its collectives) cost less per call on average; nothing else changes
    with_pab = vdopt.plan(model, 2, *args, device="a100", link="pcie", meshes=["ring=2", "ulysses=2"],
                          pab=vdopt.PABConfig(), **kwargs)
    base = {c.name: c.cost for c in by_tensor.candidates}
    for c in with_pab.candidates:
        assert c.cost.breakdown["attention"] < base[c.name].breakdown["attention"]
        assert c.cost.breakdown["matmul"] == pytest.approx(base[c.name].breakdown["matmul"])


def _auto_and_bytes(rank, world):
    import vdopt
    from vdopt.collectives import communication
    from vdopt.models import build

    model, args, kwargs = build("wan", "tiny")
    with torch.no_grad():
        expected = model(*args, **kwargs)[0]
    auto = vdopt.optimize(model, mesh="auto", compile=False)
    out = auto(*args, **kwargs)[0]
    report = auto.report()
    chosen = auto.plan.best.name
    graphs = {chosen: auto.optimized.plans[0].program}
    other = "ring=2" if chosen != "ring=2" else "ulysses=2"
    graphs[other] = vdopt.optimize(model, other, compile=False, example_inputs=(args, kwargs)).plans[0].program
    measured = {}
    for name, program in graphs.items():
        gm = getattr(program, "gm", None)
        if gm is not None:  # PipeFusion's program holds stage graphs: compared via the other mesh
            measured[name] = sum(c.bytes for c in communication(getattr(gm, "gm", gm)))
    planned = {c.name: c.cost.comm_bytes for c in auto.plan.candidates}
    return {"err": ((out - expected).abs().max() / expected.abs().max()).item(), "report": report,
            "chosen": chosen, "measured": measured, "planned": planned}


def test_auto_mesh_on_two_gloo_ranks_matches_eager_and_planned_bytes_match_the_graph():
    results = run_on_ranks(2, _auto_and_bytes, timeout=600)
    assert results[0]["chosen"] == results[1]["chosen"]  # every rank plans alike
    for r in results:
        assert r["err"] < 1e-5, r
        assert 'mesh="auto": chose' in r["report"] and "runner-up:" in r["report"]
    planned = results[0]["planned"]  # the plan each rank made, with no process group involved
    assert results[0]["measured"]
    for name, sent in results[0]["measured"].items():
        assert sent > 0 and planned[name] == sent, (name, planned[name], sent)


def test_cli_prints_the_ranked_table(capsys, tmp_path):
    import json

    from vdopt.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "latte", "--size", "tiny", "--world", "2", "--device", "l40", "--link", "pcie",
                 "--dtype", "float32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank  mesh" in text and "ms/call" in text and "best: vdopt.Mesh(" in text
    data = json.loads(out.read_text())
    assert data["candidates"] and data["degrees"] == data["candidates"][0]["degrees"]
    # Latte is spatial-temporal: DSP is costed
    assert any(c["degrees"]["dsp"] == 2 for c in data["candidates"])
    # the default batch is a CFG step's cond/uncond pair: cfg=2 is costed
    assert any(c["degrees"]["cfg"] == 2 for c in data["candidates"])
    assert main(["plan", "latte", "--size", "tiny", "--world", "2", "--device", "nope"]) == 1
    assert "unknown device 'nope'" in capsys.readouterr().err


def _wan_meta(layers: int):
    from diffusers import WanTransformer3DModel
    from vdopt.models.diffusers_models import WAN_CONFIGS

    with torch.device("meta"):
        model = WanTransformer3DModel(**{**WAN_CONFIGS["tiny"], "num_layers": layers}).eval()
    inputs = {"hidden_states": torch.Size((2, 4, 5, 16, 16)), "encoder_hidden_states": torch.Size((2, 8, 32)),
              "timestep": torch.full((2,), 999.0, device="meta")}
    return model, inputs


def test_repeated_blocks_are_found_by_structure_and_cut_without_touching_the_model():
    from diffusers import LatteTransformer3DModel
    from vdopt.models.diffusers_models import LATTE_CONFIGS
    from vdopt.planning.repeats import find_repeated_blocks, truncated

    with torch.device("meta"):
        latte = LatteTransformer3DModel(**{**LATTE_CONFIGS["tiny"], "num_layers": 4}).eval()
    found = find_repeated_blocks(latte)
    # the spatial and the temporal blocks run together (zip): both lists, cut together
    assert set(found.paths) == {"transformer_blocks", "temporal_transformer_blocks"} and found.length == 4
    short = truncated(latte, found, 1)
    assert len(short.transformer_blocks) == len(short.temporal_transformer_blocks) == 1
    assert len(latte.transformer_blocks) == 4 and short.transformer_blocks[0] is latte.transformer_blocks[0]
    wan, _ = _wan_meta(4)
    assert find_repeated_blocks(wan).paths == ("blocks",)


def test_planner_costs_identical_blocks_once_and_predicts_as_the_whole_model():
    """Reference: the same plan with ``reuse_blocks=False``, which captures and rewrites all 6
    blocks for every mesh (the planner before block reuse)."""
    import vdopt

    model, inputs = _wan_meta(6)
    slow = vdopt.plan(model, 2, device="h100", link="nvlink", reuse_blocks=False, **inputs)
    fast = vdopt.plan(model, 2, device="h100", link="nvlink", **inputs)
    # the work: copies with 1 and 2 blocks (2 and 4 for PipeFusion's 2 stages), shared by every
    # mesh; only the largest is captured, the others are cut out of its graph; the 6-block
    # model is never captured
    assert slow.work == {"capture all": 1, "build": 4}
    assert fast.work == {"capture 4": 1, "cut 1": 1, "cut 2": 1, "build": 8}, fast.work
    assert [c.name for c in fast.candidates] == [c.name for c in slow.candidates]
    assert {c.name for c in fast.candidates} == {"cfg=2", "ulysses=2", "ring=2", "pipefusion=2"}
    assert [(c.name, c.reason) for c in fast.excluded] == [(c.name, c.reason) for c in slow.excluded]
    for f, s in zip(fast.candidates, slow.candidates):
        assert f.seconds == pytest.approx(s.seconds, rel=1e-12)
        assert f.cost.breakdown == pytest.approx(s.cost.breakdown, rel=1e-12)
        exact = ("comm_bytes", "collectives", "flops", "weight_bytes", "kv_cache_bytes")
        assert {k: getattr(f.cost, k) for k in exact} == {k: getattr(s.cost, k) for k in exact}, f.name
        if f.degrees["pipefusion"] == 1:
            assert f.cost.activation_bytes == s.cost.activation_bytes
        else:  # a stage's activation peak is extrapolated per graph: approximate (see costing.py)
            assert f.cost.activation_bytes == pytest.approx(s.cost.activation_bytes, rel=0.1)
