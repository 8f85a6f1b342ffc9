"""Rewritten graphs for meshes larger than the CI machine, on a fake process group.

A fake process group runs no collective, so nothing here executes the graphs: these tests
check structure (all-to-alls per site, where the stream is split and gathered) and the
ValueErrors for degrees a model cannot take. Everything runs in one spawned process, so the
fake group never touches the test session.
"""

from __future__ import annotations

import traceback

import pytest
import torch

from vdopt.runtime.local_ranks import run_local_ranks


def _structure_checks() -> dict:
    """Run in a fresh process; returns {check name: result or error text}."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import vdopt
    from vdopt.collectives import communication
    from vdopt.models import build

    out = {}

    def optimized(world, rank, name, degrees, **shape):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        model, args, kwargs = build(name, "tiny", batch=2 if degrees.get("cfg", 1) > 1 else 1, **shape)
        opt = vdopt.optimize(model, vdopt.Mesh(**degrees), example_inputs=(args, kwargs))
        gm = opt.plans[0].program.gm
        return opt, getattr(gm, "gm", gm)

    def attempt(key, fn):
        try:
            out[key] = fn()
        except Exception as e:  # the test asserts on the type and message
            out[key] = f"{type(e).__name__}: {e}" if isinstance(e, ValueError) else traceback.format_exc()

    def per_site(world, rank, name, degrees, **shape):
        opt, gm = optimized(world, rank, name, degrees, **shape)
        kinds = {s.name: s.kind for s in opt.plans[0].sites}
        counts: dict = {}
        for c in communication(gm):
            counts.setdefault(c.purpose, []).append(c.kind)
        return {"kinds": kinds, "counts": counts}

    attempt("opensora-ulysses4", lambda: per_site(4, 3, "opensora", {"ulysses": 4}))
    attempt("opensora_plan-ulysses2-ring4", lambda: per_site(8, 5, "opensora_plan", {"ulysses": 2, "ring": 4}))
    attempt("latte-ulysses4", lambda: per_site(4, 0, "latte", {"ulysses": 4}))
    attempt("wan-dsp2", lambda: per_site(2, 0, "wan", {"dsp": 2}))
    attempt("wan-ring2-one-token", lambda: per_site(2, 1, "wan", {"ring": 2}, frames=1, height=16, width=16))

    def cfg_with_batch_one():
        dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        model, args, kwargs = build("wan", "tiny", batch=1)
        vdopt.optimize(model, vdopt.Mesh(cfg=2), example_inputs=(args, kwargs))

    attempt("wan-cfg2-batch1", cfg_with_batch_one)

    def packed_latents(degrees):
        """Flux: packed latents, linear patch embedding, no token grid to read off a conv."""
        import model_matrix

        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        model = model_matrix.build_model("FluxTransformer2DModel")
        args, kwargs = model_matrix.make_inputs("FluxTransformer2DModel", model, 1, torch.Generator().manual_seed(0))
        vdopt.optimize(model, vdopt.Mesh(**degrees), example_inputs=(args, kwargs))

    attempt("flux-dsp2", lambda: packed_latents({"dsp": 2}))
    attempt("flux-pipefusion2", lambda: packed_latents({"pipefusion": 2}))
    return out


def _child(rank: int, world_size: int) -> dict:
    return _structure_checks()


@pytest.fixture(scope="module")
def checks() -> dict:
    # no process group from the launcher: the checks set up their own fake ones
    return run_local_ranks(1, _child, group=False, timeout=300)[0]


def _site_counts(result: dict) -> dict:
    return {s: sorted(k) for s, k in result["counts"].items() if s in result["kinds"]}


def test_ulysses_4_puts_four_all_to_alls_around_each_spatial_attention(checks):
    got = checks["opensora-ulysses4"]
    assert isinstance(got, dict), got
    spatial = [s for s, k in got["kinds"].items() if k == "spatial"]
    assert _site_counts(got) == {s: ["all_to_all"] * 4 for s in spatial}  # temporal and cross: none
    others = [k for s, kinds in got["counts"].items() if s not in got["kinds"] for k in kinds]
    assert others == ["all_gather"]  # the tokens are gathered once, before the unpatchify


def test_usp_on_eight_ranks_runs_ulysses_then_ring_at_each_full_attention(checks):
    got = checks["opensora_plan-ulysses2-ring4"]
    assert isinstance(got, dict), got
    full = [s for s, k in got["kinds"].items() if k == "full"]
    assert _site_counts(got) == {s: ["all_to_all"] * 4 + ["p2p"] for s in full}


@pytest.mark.parametrize(
    "key, message",
    [
        ("latte-ulysses4", r"ValueError: pass 'sequence_parallel': Mesh\(cfg=1, pipefusion=1, ring=1, ulysses=4, dsp=1\): Ulysses splits attention heads.*2 heads; use ulysses<=2"),
        ("wan-dsp2", r"ValueError: .*Mesh\(.*dsp=2\): DSP needs a spatial-temporal model"),
        ("wan-cfg2-batch1", r"ValueError: .*Mesh\(cfg=2.*this call has batch 1.*use cfg=1"),
        ("wan-ring2-one-token", r"ValueError: .*1 tokens cannot be split over 2 ranks"),
        ("flux-dsp2", r"ValueError: .*dsp=2\): DSP .* needs the frame/height/width grid .*use ulysses and/or ring"),
        ("flux-pipefusion2", r"ValueError: .*PipeFusion .* needs the token grid.*use ulysses and/or ring"),
    ],
)
def test_degrees_the_model_cannot_take_are_value_errors(checks, key, message):
    import re

    assert isinstance(checks[key], str) and re.match(message, checks[key]), checks[key]
