"""PAB inside PipeFusion, on 2 real gloo ranks.

Each stage graph (the whole-latent one and each patch's) runs as PAB variants; one decision per
call holds for every stage graph and every rank, and caches are kept per call slot and per
stage graph. Reference: single-device ``vdopt.optimize(model, pab=...)`` on the same calls.

With warmup covering every step PipeFusion is exact, so every output equals the reference and
the region calls summed over the stages equal the single-device counts. With warmup 1 the
pipelined steps use stale K/V (PipeFusion's approximation), and the first pipelined call of a
slot has no patch caches yet, so it computes what the reference reuses. Against the reference
(PAB on one device) each call's output stays within ``STALE_STEP_BOUND`` (measured up to 5e-3)
and the final latent within ``STALE_LATENT_BOUND`` (measured 2e-4..4e-4), the bounds of
PipeFusion without PAB.
"""

from __future__ import annotations

import torch
from multirank import run_on_ranks
from test_pipefusion import (
    MEASURABLY_DIFFERENT,
    STALE_LATENT_BOUND,
    STALE_STEP_BOUND,
    fresh_inputs,
    rel_err,
)

import vdopt
from vdopt.config import PipeFusionConfig

RTOL = 1e-5
TIMESTEPS = [float(t) for t in torch.linspace(999, 0, 8).round()]
"""999, 856, 713, 571, 428, 285, 143, 0: the second step is outside the default window."""
CONFIG = vdopt.PABConfig(spatial_range=2, temporal_range=3, cross_range=4, mlp_range=2, spatial_window=(100, 900))
"""Spatial's window holds the second step, so the reference reuses spatial attention there."""
CASES = {"latte": 2, "wan": 1}
"""Model -> calls per step (Latte: cond then uncond, two call slots; Wan: one)."""


def _denoise(opt, inputs: dict, slots: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every call's output, and the final latent, of an Euler loop with CFG over ``slots`` calls."""
    x = inputs["hidden_states"]
    texts = [inputs["encoder_hidden_states"] * (1 - 0.5 * s) for s in range(slots)]
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            step = [
                opt(**{**inputs, "hidden_states": x, "encoder_hidden_states": text,
                       "timestep": torch.full_like(inputs["timestep"], t)})[0]
                for text in texts
            ]
            outs += step
            guided = step[-1] + 2.0 * (step[0] - step[-1])
            x = x - 0.08 * guided[:, : x.shape[1]]
    return outs, x


def _counts(program) -> dict:
    return {k: dict(v) for k, v in program.counts.items()}


def _single_device(seed: int) -> dict:
    results = {}
    for name, slots in CASES.items():
        model, inputs = fresh_inputs(name, seed)
        opt = vdopt.optimize(model, pab=CONFIG)
        outs, latent = _denoise(opt, inputs, slots)
        regions = sum(r.kind == "spatial" for r in opt.plans[0].program.regions)
        results[name] = {"outs": outs, "latent": latent, "counts": _counts(opt.plans[0].program), "regions": regions}
    return results


def _on_rank(rank: int, world: int, seed: int, reference: dict) -> dict:
    results = {}
    for name, slots in CASES.items():
        model, inputs = fresh_inputs(name, seed)
        ref = reference[name]
        for warmup in (len(TIMESTEPS), 1):
            opt = vdopt.optimize(
                model, vdopt.Mesh(pipefusion=world), pab=CONFIG,
                pipefusion=PipeFusionConfig(patches=2, warmup_steps=warmup),
            )
            outs, latent = _denoise(opt, inputs, slots)
            program = opt.plans[0].program
            results[(name, warmup)] = {
                "errs": [rel_err(a, b) for a, b in zip(outs, ref["outs"])],
                "latent_err": ((latent - ref["latent"]).norm() / ref["latent"].norm()).item(),
                "counts": _counts(program.pab.state),
                "variant_calls": dict(program.pab.state.variant_calls),
                "calls": dict(program.counts),
                "report": opt.report(),
            }
    return results


def test_pab_inside_pipefusion_on_gloo_ranks(rng_inputs):
    seed = int(torch.randint(0, 2**31 - 100, (1,), generator=rng_inputs))
    reference = _single_device(seed)
    per_rank = run_on_ranks(2, _on_rank, seed, reference)
    for name, slots in CASES.items():
        ref = reference[name]
        calls = slots * len(TIMESTEPS)
        for warmup in (len(TIMESTEPS), 1):
            results = [r[(name, warmup)] for r in per_rank]
            where = f"{name} warmup {warmup}"
            # one decision per call on every rank
            assert results[0]["variant_calls"] == results[1]["variant_calls"], where
            # each stage counts its own regions: the sum over the stages is the whole model's
            summed = {
                kind: {how: sum(r["counts"][kind][how] for r in results) for how in ("computed", "reused")}
                for kind in ref["counts"]
            }
            for r in results:
                assert "pipefusion calls: " in r["report"] and "pab spatial: " in r["report"], where
                assert "pab cache held: " in r["report"], where
            if warmup == len(TIMESTEPS):
                for r in results:
                    assert r["calls"] == {"exact": calls, "pipelined": 0}, where
                    assert len(r["errs"]) == calls and max(r["errs"]) <= RTOL, (where, r["errs"])
                assert summed == ref["counts"], where
                assert all(ref["counts"][k]["reused"] > 0 for k in ("spatial", "cross", "mlp")), ref["counts"]
            else:
                for r in results:
                    assert r["calls"] == {"exact": slots, "pipelined": calls - slots}, where
                    assert max(r["errs"][:slots]) <= RTOL, (where, r["errs"])  # warmup: exact
                    assert max(r["errs"]) <= STALE_STEP_BOUND, (where, r["errs"])
                    assert MEASURABLY_DIFFERENT < r["latent_err"] <= STALE_LATENT_BOUND, (where, r["latent_err"])
                # The second call of each slot is its first pipelined one: no patch cache yet, so
                # it computes the spatial attention the reference reuses there (t = 856, inside
                # only spatial's window). Every other decision is the reference's.
                expected = {k: dict(v) for k, v in ref["counts"].items()}
                moved = slots * ref["regions"]
                expected["spatial"] = {"computed": expected["spatial"]["computed"] + moved,
                                       "reused": expected["spatial"]["reused"] - moved}
                assert summed == expected, where
                assert all(summed[k]["reused"] > 0 for k in ("spatial", "cross", "mlp")), (where, summed)
