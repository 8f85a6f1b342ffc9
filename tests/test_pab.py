"""Pyramid Attention Broadcast: the rule, equality with diffusers' hook, real dead code.

References: diffusers' own ``PyramidAttentionBroadcastHook`` (driven through
``apply_pyramid_attention_broadcast`` on a copy of the same model), and for the
separate-cond/uncond-calls case, one hooked copy per call stream (what per-call state means).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
from diffusers.hooks import HookRegistry
from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastHook
from vdopt.models import build
from vdopt.models.pab_defaults import default_pab_config
from vdopt.passes.pab.regions import count_compute
from vdopt.passes.pab.schedule import KindRule, PABSchedule
from vdopt.passes.pab.specialize import PABSpecialize

import vdopt
from vdopt.capture import bind_call
from vdopt.runtime.pab import PABProgram, StepTracker, read_timestep

RTOL = 1e-5
# A 12-step linear 999 -> 0 schedule: steps 3..9 are inside the (100, 800) windows.
TIMESTEPS = [float(t) for t in torch.linspace(999, 0, 12).round()]
LATTE_CONFIG = vdopt.PABConfig(spatial_range=2, temporal_range=4, cross_range=6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def latte(rng: torch.Generator, batch: int):
    """Tiny diffusers Latte (2 spatial + 2 temporal blocks) and fresh random inputs."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    model, args, kwargs = build("latte", "tiny", batch=batch, seed=seed)
    inputs = bind_call(model, args, kwargs)
    x = torch.randn(inputs["hidden_states"].shape, generator=rng)
    text = torch.randn(inputs["encoder_hidden_states"].shape, generator=rng)
    return model, x, text


def diffusers_pab(model: torch.nn.Module, config: vdopt.PABConfig, clock: dict) -> torch.nn.Module:
    """A copy of ``model`` with diffusers' PAB hook, temporal blocks named explicitly
    (diffusers' default spatial identifiers would also match ``temporal_transformer_blocks``)."""
    hooked = copy.deepcopy(model)
    apply_pyramid_attention_broadcast(
        hooked,
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=config.spatial_range,
            temporal_attention_block_skip_range=config.temporal_range,
            cross_attention_block_skip_range=config.cross_range,
            spatial_attention_timestep_skip_range=config.spatial_window,
            temporal_attention_timestep_skip_range=config.temporal_window,
            cross_attention_timestep_skip_range=config.cross_window,
            spatial_attention_block_identifiers=(r"^transformer_blocks\.",),
            temporal_attention_block_identifiers=(r"^temporal_transformer_blocks\.",),
            cross_attention_block_identifiers=(r"^transformer_blocks\.",),
            current_timestep_callback=lambda: clock["t"],
        ),
    )
    return hooked


def reset_hooks(model: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()


def denoise(model, x, text, timesteps, clock=None) -> list[torch.Tensor]:
    """A toy sampler: one batched call per step, x updated from the prediction."""
    outs = []
    with torch.no_grad():
        for t in timesteps:
            if clock is not None:
                clock["t"] = t
            (out,) = model(x, timestep=torch.full((x.shape[0],), t), encoder_hidden_states=text, return_dict=False)
            outs.append(out)
            x = x - 0.05 * out.narrow(1, 0, x.shape[1])
    return outs


def expected_counts(config: vdopt.PABConfig, regions: dict[str, int], calls: list[tuple[int, float]]) -> dict:
    """Region calls per kind from the rule written out: (call index i, timestep t) per call."""
    settings = {
        "spatial": (config.spatial_range, config.spatial_window),
        "temporal": (config.temporal_range, config.temporal_window),
        "cross": (config.cross_range, config.cross_window),
    }
    counts = {k: {"computed": 0, "reused": 0} for k in regions}
    for i, t in calls:
        for kind, n in regions.items():
            r, (lo, hi) = settings[kind]
            reuse = r is not None and i > 0 and lo < t < hi and i % r != 0
            counts[kind]["reused" if reuse else "computed"] += n
    return counts


# -- the rule --------------------------------------------------------------------------------

class CountingModule(torch.nn.Module):
    """Counts how often its forward really runs (a hooked call may skip it)."""

    def __init__(self) -> None:
        super().__init__()
        self.computed = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.computed += 1
        return x + 1


def test_to_diffusers_gives_the_hook_the_same_schedule():
    """``PABConfig.to_diffusers`` (used by the benchmarks) against the mapping written out above."""
    config = vdopt.PABConfig(spatial_range=3, temporal_range=None, cross_range=5, cross_window=(50, 900))
    got = config.to_diffusers(lambda: 1.0, spatial_attention_block_identifiers=("^x",))
    assert got.spatial_attention_block_skip_range == 3 and got.temporal_attention_block_skip_range is None
    assert got.cross_attention_block_skip_range == 5 and got.cross_attention_timestep_skip_range == (50, 900)
    assert got.spatial_attention_timestep_skip_range == (100, 800) and got.spatial_attention_block_identifiers == ("^x",)
    assert got.current_timestep_callback() == 1.0
    with pytest.raises(ValueError, match="mlp_range=None"):
        vdopt.PABConfig(mlp_range=2).to_diffusers(lambda: 0.0)


def test_rule_matches_diffusers_hook():
    """KindRule decides exactly like diffusers' hook, call by call, over schedules that cross
    the window ends (including t equal to an end: outside, the window is open)."""
    clock = {"t": 0.0}
    for rng_range, window in [(2, (100, 800)), (3, (450, 930)), (6, (100, 850))]:
        module = CountingModule()
        hook = PyramidAttentionBroadcastHook(window, rng_range, lambda: clock["t"])
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, "pab")
        rule = KindRule(range=rng_range, window=tuple(float(w) for w in window))
        schedule = [999, 930, 900, 850, 800, 799, 700, 600, 500, 450, 449, 300, 200, 100, 99, 0]
        for i, t in enumerate(schedule):
            clock["t"] = t
            before = module.computed
            module(torch.randn(1))
            assert (module.computed > before) == rule.computes(i, t), (rng_range, window, i, t)


def test_schedule_patterns_are_exhaustive():
    config = vdopt.PABConfig(spatial_range=2, temporal_range=3, cross_range=5, cross_window=(50, 900))
    schedule = PABSchedule.from_config(config)
    patterns = set(schedule.patterns())
    seen = {schedule.reused(i, t) for i in range(61) for t in range(0, 1001, 5)}
    assert seen == patterns
    assert PABSchedule.from_config(vdopt.PABConfig(spatial_range=1, temporal_range=1, cross_range=None)).patterns() == [frozenset()]


def test_step_tracker_slots():
    tracker = StepTracker()
    seq = [(999, 0, True), (999, 1, False), (900, 0, False), (900, 1, False), (800, 0, False), (999, 0, True)]
    for t, slot, new in seq:
        assert tracker.advance(t) == (slot, new)
    assert read_timestep({"timestep": torch.tensor([[0.0, 700.0], [700.0, 700.0]])}) == 700.0
    with pytest.raises(ValueError, match="timestep"):
        read_timestep({"hidden_states": torch.ones(1)})


# -- equality with diffusers' hook -----------------------------------------------------------

def test_latte_batched_cfg_matches_diffusers_hook(rng_inputs):
    """Batched CFG (one call per step), two generations: every step matches diffusers' hook;
    compute/reuse counts match the rule; the second generation equals the first."""
    model, x, text = latte(rng_inputs, batch=2)
    clock = {"t": 0.0}
    reference = diffusers_pab(model, LATTE_CONFIG, clock)
    opt = vdopt.optimize(model, pab=LATTE_CONFIG)

    ref1 = denoise(reference, x, text, TIMESTEPS, clock)
    out1 = denoise(opt, x, text, TIMESTEPS)
    for step, (a, b) in enumerate(zip(out1, ref1)):
        assert rel_err(a, b) <= RTOL, f"step {step} (t={TIMESTEPS[step]}): {rel_err(a, b):.2e}"
    # Not vacuous: PAB changed the result against the model without it.
    plain = denoise(model, x, text, TIMESTEPS)
    assert max(rel_err(a, b) for a, b in zip(out1, plain)) > 1e-3

    program = opt.plans[0].program
    regions = {"spatial": 2, "temporal": 2, "cross": 2}
    assert {k: sum(r.kind == k for r in program.regions) for k in regions} == regions
    expected = expected_counts(LATTE_CONFIG, regions, list(enumerate(TIMESTEPS)))
    assert {k: program.counts[k] for k in regions} == expected
    assert expected["spatial"]["reused"] == 8 and expected["cross"]["reused"] == 12

    # Second generation: explicit reset on both sides; timestep going back up also resets.
    opt.reset()
    reset_hooks(reference)
    out2 = denoise(opt, x, text, TIMESTEPS)
    ref2 = denoise(reference, x, text, TIMESTEPS, clock)
    out3 = denoise(opt, x, text, TIMESTEPS)  # no reset(): detected from t going up
    for a, b, c, d in zip(out1, out2, out3, ref2):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert rel_err(b, d) <= RTOL

    report = opt.report()
    assert "pab spatial: 2 regions" in report and "reused 24" in report and "pab cache held" in report


def test_cogvideox_joint_attention_two_outputs_match_diffusers_hook(rng_inputs):
    """CogVideoX's joint attention returns (video, text): both are cached, like the hook does."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng_inputs))
    model, args, kwargs = build("cogvideox", "tiny", batch=2, seed=seed)
    inputs = bind_call(model, args, kwargs)
    x = torch.randn(inputs["hidden_states"].shape, generator=rng_inputs)
    text = torch.randn(inputs["encoder_hidden_states"].shape, generator=rng_inputs)
    config = vdopt.PABConfig(spatial_range=2, temporal_range=None, cross_range=None, spatial_window=(100, 850))
    clock = {"t": 0.0}
    reference = copy.deepcopy(model)
    apply_pyramid_attention_broadcast(
        reference,
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 850),
            current_timestep_callback=lambda: clock["t"],
        ),
    )
    opt = vdopt.optimize(model, pab=config)
    timesteps = TIMESTEPS[:8]
    ref = denoise(reference, x, text, timesteps, clock)
    out = denoise(opt, x, text, timesteps)
    for step, (a, b) in enumerate(zip(out, ref)):
        assert rel_err(a, b) <= RTOL, f"step {step}: {rel_err(a, b):.2e}"
    program = opt.plans[0].program
    assert [len(r.outputs) for r in program.regions] == [2] * len(program.regions) != []
    assert program.counts["spatial"]["reused"] == 3 * len(program.regions)  # i = 3, 5, 7


def test_separate_cond_uncond_calls_keep_separate_state(rng_inputs):
    """Two calls per step (cond then uncond, as diffusers' Wan pipeline makes): each call
    stream has its own caches. Reference: one hooked copy per stream. diffusers' single hook
    shares one state between the streams, so it reuses cond outputs for uncond calls."""
    model, x, cond = latte(rng_inputs, batch=1)
    uncond = torch.randn(cond.shape, generator=rng_inputs)
    clock = {"t": 0.0}
    per_stream = {"cond": diffusers_pab(model, LATTE_CONFIG, clock), "uncond": diffusers_pab(model, LATTE_CONFIG, clock)}
    shared = diffusers_pab(model, LATTE_CONFIG, clock)
    opt = vdopt.optimize(model, pab=LATTE_CONFIG)

    def cfg_loop(cond_model, uncond_model, set_clock: bool):
        outs, z = [], x
        with torch.no_grad():
            for t in TIMESTEPS:
                clock["t"] = t
                ts = torch.full((1,), t)
                (c,) = cond_model(z, timestep=ts, encoder_hidden_states=cond, return_dict=False)
                (u,) = uncond_model(z, timestep=ts, encoder_hidden_states=uncond, return_dict=False)
                out = u + 4.0 * (c - u)
                outs.append(out)
                z = z - 0.05 * out.narrow(1, 0, z.shape[1])
        return outs

    ours = cfg_loop(opt, opt, False)
    reference = cfg_loop(per_stream["cond"], per_stream["uncond"], True)
    mixed = cfg_loop(shared, shared, True)
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert rel_err(a, b) <= RTOL, f"step {step}: {rel_err(a, b):.2e}"
    assert max(rel_err(a, b) for a, b in zip(mixed, reference)) > 1e-3
    program = opt.plans[0].program
    assert sorted(program.slots) == [0, 1]
    expected = expected_counts(LATTE_CONFIG, {"spatial": 2, "temporal": 2, "cross": 2},
                               [(i, t) for i, t in enumerate(TIMESTEPS) for _ in range(2)])
    assert {k: program.counts[k] for k in expected} == expected


# -- exactness where nothing is reused, and real dead code -----------------------------------

def test_ranges_of_one_equal_no_pab(rng_inputs):
    model, x, text = latte(rng_inputs, batch=2)
    ones = vdopt.PABConfig(spatial_range=1, temporal_range=1, cross_range=1, mlp_range=1)
    with_pab = denoise(vdopt.optimize(model, pab=ones), x, text, TIMESTEPS[:6])
    without = denoise(vdopt.optimize(model), x, text, TIMESTEPS[:6])
    for a, b in zip(with_pab, without):
        assert torch.equal(a, b)


def test_variants_drop_reused_regions(rng_inputs):
    """A reused site's projections and attention are absent from its variant graph, not
    just unused; counts are exact for tiny Latte (2 spatial, 2 temporal, 2 cross sites)."""
    model, x, text = latte(rng_inputs, batch=2)
    opt = vdopt.optimize(model, pab=LATTE_CONFIG)
    denoise(opt, x, text, TIMESTEPS[:1])
    program: PABProgram = opt.plans[0].program
    graphs = program.variants()
    assert sorted(graphs) == sorted(
        ["compute_all", "reuse_temporal", "reuse_cross", "reuse_temporal_cross", "reuse_spatial_temporal_cross"]
    )
    counts = {name: count_compute(gm.graph) for name, gm in graphs.items()}
    full = counts["compute_all"]
    assert full["attention"] == 6
    # Per attention site: to_q, to_k, to_v, to_out. Reusing every cross-attention also kills
    # the caption projection (2 linears) that only cross-attention reads.
    assert full["linear"] - counts["reuse_temporal"]["linear"] == 8
    assert full["linear"] - counts["reuse_cross"]["linear"] == 8 + 2
    assert full["linear"] - counts["reuse_spatial_temporal_cross"]["linear"] == 24 + 2
    assert counts["reuse_cross"]["attention"] == 4 and counts["reuse_spatial_temporal_cross"]["attention"] == 0
    spec = program.schedule_spec()
    assert spec["variants"]["reuse_cross"]["cache_inputs"] == [
        "transformer_blocks.0.attn2:0", "transformer_blocks.1.attn2:0"]
    assert len(spec["variants"]["compute_all"]["cache_outputs"]) == 6


def test_program_from_spec_runs_exported_variants(rng_inputs):
    """The export surface: a program rebuilt from ``schedule_spec()`` and per-variant
    runners (here the flat graphs themselves) reproduces the original program."""
    model, x, text = latte(rng_inputs, batch=2)
    opt = vdopt.optimize(model, pab=LATTE_CONFIG)
    out = denoise(opt, x, text, TIMESTEPS)
    program = opt.plans[0].program
    loaded = PABProgram.from_spec(program.schedule_spec(), program.variants())
    inputs = bind_call(model, (x,), {"timestep": None, "encoder_hidden_states": text, "return_dict": False})
    z = x
    for t, expected in zip(TIMESTEPS, out):
        (got,) = loaded({**inputs, "hidden_states": z, "timestep": torch.full((2,), t)})
        assert torch.equal(got, expected)
        z = z - 0.05 * got.narrow(1, 0, z.shape[1])


def test_mlp_broadcast_drops_feedforwards(rng_inputs):
    model, x, text = latte(rng_inputs, batch=2)
    config = vdopt.PABConfig(spatial_range=None, temporal_range=None, cross_range=None, mlp_range=2)
    opt = vdopt.optimize(model, pab=config)
    outs = denoise(opt, x, text, TIMESTEPS)
    program = opt.plans[0].program
    assert sorted(r.name for r in program.regions) == [
        "temporal_transformer_blocks.0.ff", "temporal_transformer_blocks.1.ff",
        "transformer_blocks.0.ff", "transformer_blocks.1.ff"]
    graphs = program.variants()
    assert sorted(graphs) == ["compute_all", "reuse_mlp"]
    assert count_compute(graphs["compute_all"].graph)["linear"] - count_compute(graphs["reuse_mlp"].graph)["linear"] == 8
    assert program.counts["mlp"] == expected_counts(
        vdopt.PABConfig(spatial_range=2), {"spatial": 4}, list(enumerate(TIMESTEPS)))["spatial"]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", ["wan", "opensora", "opensora_plan", "latte", "cogvideox"])
def test_zoo_models_get_regions_per_kind(name):
    """Every zoo model, with its default config: its sites map to PAB kinds (those the
    default enables) and the variant reusing everything has no attention left."""
    model, args, kwargs = build(name, "tiny", batch=1)
    config = default_pab_config(name)
    opt = vdopt.optimize(model, pab=config)
    with torch.no_grad():
        opt(*args, **kwargs)
    program = opt.plans[0].program
    kinds = {s.kind for s in opt.plans[0].sites}
    enabled = {k for k in ("spatial", "temporal", "cross") if getattr(config, f"{k}_range") not in (None, 1)}
    expected = {"full": "spatial", "spatial": "spatial", "temporal": "temporal", "cross": "cross", "joint_text": "spatial"}
    assert {r.kind for r in program.regions} == {expected[k] for k in kinds if k in expected} & enabled != set()
    assert not program.skipped
    graphs = program.variants()
    all_reused = max(program.schedule.patterns(), key=len)
    assert count_compute(graphs[f"reuse_{'_'.join(sorted(all_reused, key=['spatial', 'temporal', 'cross', 'mlp'].index))}"].graph)["attention"] == 0
    assert math.isfinite(float(opt(*args, **kwargs)[0].sum()))


def test_regions_survive_kernel_lowering():
    """With attention lowered to vdopt's kernel op (kernels="triton"), regions are still found
    (the pass keeps site tags and module scopes) and dropped. Structure only: nothing runs."""
    model, args, kwargs = build("wan", "tiny", batch=1)
    opt = vdopt.optimize(model, pab=default_pab_config("wan"), kernels="triton", example_inputs=(args, kwargs))
    program = opt.plans[0].program
    graphs = program.variants()
    assert sorted(graphs) == ["compute_all", "reuse_cross", "reuse_spatial_cross"]
    attention = {name: count_compute(gm.graph)["attention"] for name, gm in graphs.items()}
    assert attention == {"compute_all": 4, "reuse_cross": 2, "reuse_spatial_cross": 0}
    assert all(n.target is not torch.ops.aten.scaled_dot_product_attention.default
               for n in graphs["compute_all"].graph.nodes)


# -- through the pass runner -----------------------------------------------------------------

def test_variants_are_made_by_the_runner_reported_and_can_be_disabled(rng_inputs, monkeypatch):
    """Each variant is one ``pab_specialize`` run: recorded per variant graph in the plan and
    the report, skipped by name (then PAB is off: outputs equal the plain model's), and a
    failure is the runner's PassError naming the pass, the graph and the passes before it."""
    model, x, text = latte(rng_inputs, batch=2)
    opt = vdopt.optimize(model, pab=LATTE_CONFIG)
    denoise(opt, x, text, TIMESTEPS[:1])
    records = {r.graph: r for r in opt.plans[0].passes if r.name == "pab_specialize"}
    assert sorted(records) == sorted(
        ["compute_all", "reuse_temporal", "reuse_cross", "reuse_temporal_cross", "reuse_spatial_temporal_cross"]
    )
    assert all(r.tier == "approx" for r in records.values())
    # two cross-attention sites: two cache inputs, their attention ops and 4 + 4 + 2 linears gone
    assert records["reuse_cross"].stats["cache_inputs"] == 2
    assert records["reuse_cross"].stats["removed_attention"] == 2 and records["reuse_cross"].stats["removed_linear"] == 10
    assert records["compute_all"].stats["cache_outputs"] == 6
    report = opt.report()
    assert any(line.split()[:2] == ["pab_specialize", "reuse_cross"] and "cache_inputs=2" in line
               for line in report.splitlines()), report

    off = vdopt.optimize(model, pab=LATTE_CONFIG, disable_passes=["pab_specialize"])
    plain = vdopt.optimize(model)
    for a, b in zip(denoise(off, x, text, TIMESTEPS[:5]), denoise(plain, x, text, TIMESTEPS[:5])):
        assert torch.equal(a, b)
    assert "pab_specialize" not in [r.name for r in off.plans[0].passes]

    def boom(self, graph, points):
        raise RuntimeError("boom")

    monkeypatch.setattr(PABSpecialize, "rewrite", boom)
    with pytest.raises(
        vdopt.PassError,
        match=r"pass 'pab_specialize' \(approx\) on graph 'compute_all' failed after fold_views, drop_noops.*: RuntimeError: boom",
    ):
        denoise(vdopt.optimize(model, pab=LATTE_CONFIG), x, text, TIMESTEPS[:1])
