"""PAB under Ulysses sequence parallel, on 2 real gloo ranks: equal to PAB on one device.

Each rank caches its own shard of every region output; decisions depend only on the timestep
and the call index, so all ranks run the same variant, and a reused site's all-to-alls are
dead code in it (the ranks drop the same collectives, so they stay matched).
"""

from __future__ import annotations

import torch
from multirank import run_on_ranks
from vdopt.models import build

import vdopt
from vdopt import meta
from vdopt.capture import bind_call

RTOL = 1e-5
TIMESTEPS = [float(t) for t in torch.linspace(999, 0, 12).round()]
CONFIG = vdopt.PABConfig(spatial_range=2, temporal_range=4, cross_range=6)
MODEL = "latte"


def _inputs(seed: int):
    model, args, kwargs = build(MODEL, "tiny", batch=2, seed=seed)
    inputs = bind_call(model, args, kwargs)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(inputs["hidden_states"].shape, generator=g)
    text = torch.randn(inputs["encoder_hidden_states"].shape, generator=g)
    return model, x, text


def _run(mesh: vdopt.Mesh | None, seed: int):
    model, x, text = _inputs(seed)
    opt = vdopt.optimize(model, mesh, pab=CONFIG)
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            (out,) = opt(x, timestep=torch.full((2,), t), encoder_hidden_states=text, return_dict=False)
            outs.append(out)
            x = x - 0.05 * out.narrow(1, 0, x.shape[1])
    program = opt.plans[0].program
    # The attention site each collective serves (sequence parallel tags them), per variant.
    served = {
        name: sorted(n.meta[meta.COMM].purpose for n in gm.graph.nodes if meta.COMM in n.meta)
        for name, gm in program.variants().items()
    }
    regions = {r.name: (r.kind, len(r.outputs)) for r in program.regions}
    counts = {k: dict(v) for k, v in program.counts.items()}
    return outs, counts, served, regions, program.cache_bytes()


def _pab_on_rank(rank: int, world_size: int, seed: int, reference: list[torch.Tensor]):
    """Runs PAB under Ulysses; returns plain data (tensors do not outlive the worker)."""
    outs, *rest = _run(vdopt.Mesh(ulysses=world_size), seed)
    errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(outs, reference)]
    return errors, *rest


def test_pab_ulysses2_equals_one_device(rng_inputs):
    seed = int(torch.randint(0, 2**31 - 100, (1,), generator=rng_inputs))
    single_outs, single_counts, _, single_regions, single_bytes = _run(None, seed)
    ranks = run_on_ranks(2, _pab_on_rank, seed, single_outs)
    for rank, (errors, counts, served, regions, cache_bytes) in enumerate(ranks):
        assert len(errors) == len(TIMESTEPS)
        for step, err in enumerate(errors):
            assert err <= RTOL, f"rank {rank} step {step}: {err:.2e}"
        assert counts == single_counts
        # Same regions, one cached output each (not the tensors around the all-to-alls),
        # and each rank holds its shard: half the single-device cache.
        assert regions == single_regions and all(n == 1 for _, n in regions.values())
        assert 2 * cache_bytes == single_bytes
        # A reused site's collectives are gone from its variant; every other one is there.
        assert any(served["compute_all"])
        for name, sites in served.items():
            reused = {site for site, (kind, _) in regions.items() if kind in name.split("_")[1:]}
            assert sites == [s for s in served["compute_all"] if s not in reused], name
    assert ranks[0][2] == ranks[1][2]
