"""``vdopt.optimize(pipe, mesh)`` on whole diffusers pipelines, against the unoptimized pipeline.

Tiny random Wan (2.1 and 2.2), CogVideoX, HunyuanVideo and LTX-Video pipelines built offline
(``vdopt.models.pipelines``, after diffusers' own test fixtures), unchanged diffusers code:
one device in this process, and two real gloo ranks (one process group for every case).
Wan and HunyuanVideo call the denoiser separately for cond and uncond, so ``cfg=2`` pairs
their calls (``vdopt.runtime.cfg_pairing``); CogVideoX and LTX-Video batch both halves, so
``cfg=2`` splits the batch. Ulysses inside a pipeline (``cfg=2, ulysses=2`` on 4 ranks) and
the patch-parallel VAE's decode end to end are checked by ``vdopt demo`` (tests/test_cli.py)
and ``vdopt generate`` under torchrun (tests/test_generate.py).
"""

from __future__ import annotations

import pytest
import torch

import vdopt
from multirank import run_on_ranks
from vdopt.models.pipelines import TINY_CALLS, build_tiny_pipeline

PROMPT = "a cat walking in the snow"
NEGATIVE = "blurry low quality"


def generate(pipe, name: str, *, steps: int = 3, output_type: str = "pt", seed: int = 0) -> torch.Tensor:
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, output_type=output_type,
               generator=torch.Generator().manual_seed(seed), **TINY_CALLS[name]).frames
    return out


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuanvideo", "ltx"])
def test_one_device_pipeline_matches_the_unoptimized_one(name, vdopt_seed):
    pipe = build_tiny_pipeline(name)
    reference = generate(pipe, name, seed=vdopt_seed)
    text_encoder, transformer = pipe.text_encoder, pipe.transformer
    assert vdopt.optimize(pipe) is pipe  # the same pipeline object, components replaced
    assert pipe.transformer is not transformer and pipe.text_encoder is text_encoder
    video = generate(pipe, name, seed=vdopt_seed)
    torch.testing.assert_close(video, reference, rtol=1e-5, atol=1e-5)
    report = vdopt.report(pipe)
    assert f"transformer: optimized (OptimizedModel of {type(transformer).__name__}" in report
    assert f"text_encoder: left in place ({type(text_encoder).__name__})" in report
    assert "== transformer ==" in report and "attention sites:" in report


def test_optimize_refuses_what_it_cannot_optimize():
    pipe = build_tiny_pipeline("wan")
    vae = pipe.vae
    # pipelines call decode()/encode(), never forward(): an autoencoder goes to the patch-parallel VAE
    assert isinstance(vdopt.optimize(vae), vdopt.PatchParallelVAE)
    with pytest.raises(ValueError, match="pab and pipefusion apply to denoisers"):
        vdopt.optimize(vae, pab=vdopt.PABConfig())
    with pytest.raises(TypeError, match="a torch.nn.Module or a diffusers DiffusionPipeline"):
        vdopt.optimize(object())
    text_only = type(pipe)(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=None, vae=None,
                           scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="has no denoiser vdopt can optimize"):
        vdopt.optimize(text_only)


# -- two gloo ranks ------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pipeline_case(name: str, mesh, *, steps: int, seed: int, keep: dict | None = None) -> dict:
    """Latents of two generations against the unoptimized pipeline's (the VAE's decode, patch
    parallel on several ranks, is checked end to end by the demo and ``vdopt generate`` tests)."""
    pipe = build_tiny_pipeline(name)
    reference = generate(pipe, name, steps=steps, output_type="latent", seed=seed)
    vae, transformer = pipe.vae, pipe.transformer
    vdopt.optimize(pipe, mesh)
    first = generate(pipe, name, steps=steps, output_type="latent", seed=seed)
    again = generate(pipe, name, steps=steps, output_type="latent", seed=seed)  # a second generation
    denoisers = {n: c for n, c in pipe.components.items() if n.startswith("transformer") and c is not None}
    if keep is not None:
        keep.update(model=transformer, optimized=pipe.transformer)
    return {
        "err": max(_rel(first, reference), _rel(again, reference)),
        "stats": {n: dict(vars(c.stats)) for n, c in denoisers.items() if hasattr(c, "stats")},
        "differing": {n: c.report().splitlines()[1] for n, c in denoisers.items() if hasattr(c, "stats")},
        "vae_replaced": pipe.vae is not vae,
        "report": vdopt.report(pipe),
    }


def _miss_case(model, opt, seed: int) -> dict:
    """The uncond arguments change in the third step: the speculated result is not used.

    ``opt`` is the Wan case's optimized transformer (already captured for these shapes); its
    first call here has a higher timestep than its last one: a new generation."""
    before = dict(vars(opt.stats))
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3, 2, 2, generator=g)
    cond, uncond, other = (torch.randn(1, 16, 32, generator=g) for _ in range(3))
    errors = []
    for step, t in enumerate((900.0, 600.0, 300.0, 100.0)):
        timestep = torch.tensor([t])
        negative = other if step >= 2 else uncond
        for text in (cond, negative):
            with torch.no_grad():
                expected = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                 attention_kwargs=None, return_dict=False)[0]
            got = opt(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, attention_kwargs=None,
                      return_dict=False)[0]
            errors.append(_rel(got, expected))
        latents = latents - 0.1 * got
    return {"err": max(errors), "stats": {k: v - before[k] for k, v in vars(opt.stats).items()}}


def _two_rank_cases(rank: int, world: int, seed: int) -> dict:
    cfg = vdopt.Mesh(cfg=2)
    wan: dict = {}
    cases = {
        # cond and uncond in separate calls: paired over the cfg axis
        "wan-cfg2": lambda: _pipeline_case("wan", cfg, steps=3, seed=seed, keep=wan),
        "hunyuanvideo-cfg2": lambda: _pipeline_case("hunyuanvideo", cfg, steps=3, seed=seed),
        "wan22-cfg2": lambda: _pipeline_case("wan22", cfg, steps=4, seed=seed),
        # cond and uncond batched in one call: the batch is split
        "cogvideox-cfg2": lambda: _pipeline_case("cogvideox", cfg, steps=2, seed=seed),
        "ltx-cfg2": lambda: _pipeline_case("ltx", cfg, steps=2, seed=seed),
        # packed latents (no patch-embedding convolution): the token dim comes from the graph
        "ltx-ulysses2": lambda: _pipeline_case("ltx", vdopt.Mesh(ulysses=2), steps=2, seed=seed),
        "ltx-ring2": lambda: _pipeline_case("ltx", vdopt.Mesh(ring=2), steps=2, seed=seed),
        "miss": lambda: _miss_case(wan["model"], wan["optimized"], seed),
    }
    return {key: case() for key, case in cases.items()}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    import random

    return run_on_ranks(2, _two_rank_cases, random.getrandbits(31), timeout=600)


def _case(two_ranks, key):
    return [ranks[key] for ranks in two_ranks]


@pytest.mark.parametrize("key", ["wan-cfg2", "hunyuanvideo-cfg2", "wan22-cfg2"])
def test_cfg2_pairs_separate_cond_and_uncond_calls_exactly(two_ranks, key):
    for got in _case(two_ranks, key):
        assert got["err"] <= 1e-5, got["err"]
        for name, stats in got["stats"].items():
            # per generation: the first step observed (its two calls run by one half each),
            # every later step paired; two generations
            assert stats["paired"] >= 2 and stats["misses"] == 0 and stats["split"] == 0, (name, stats)
        assert "transformer: optimized (CFGPairing of" in got["report"]


def test_pairing_finds_the_arguments_that_differ(two_ranks):
    (wan, *_), (hunyuan, *_) = _case(two_ranks, "wan-cfg2"), _case(two_ranks, "hunyuanvideo-cfg2")
    assert wan["differing"]["transformer"].endswith(": encoder_hidden_states")
    assert hunyuan["differing"]["transformer"].endswith(
        ": encoder_hidden_states, encoder_attention_mask, pooled_projections")
    (wan22, *_) = _case(two_ranks, "wan22-cfg2")
    assert set(wan22["stats"]) == {"transformer", "transformer_2"}  # Wan 2.2's second expert too


@pytest.mark.parametrize("key", ["cogvideox-cfg2", "ltx-cfg2"])
def test_cfg2_splits_a_batched_cond_uncond_call(two_ranks, key):
    for got in _case(two_ranks, key):
        assert got["err"] <= 1e-5, got["err"]
        stats = got["stats"]["transformer"]
        assert stats["split"] == 4 and stats["paired"] == stats["serial"] == 0, stats  # 2 steps x 2 generations


@pytest.mark.parametrize("key, collective", [("ltx-ulysses2", "ulysses: all_to_all"), ("ltx-ring2", "ring: p2p")])
def test_sequence_parallel_in_the_unchanged_ltx_pipeline(two_ranks, key, collective):
    for got in _case(two_ranks, key):
        assert got["err"] <= 1e-5, got["err"]
        assert collective in got["report"]  # the self-attention really is split, not gathered


def test_a_wrong_speculation_is_computed_again(two_ranks):
    for got in _case(two_ranks, "miss"):
        assert got["err"] <= 1e-5, got["err"]
        # step 2 paired; step 3's uncond call differs: one miss, then no pairing in that generation
        assert got["stats"]["paired"] == 2 and got["stats"]["misses"] == 1, got["stats"]


def test_the_vae_is_patch_parallel_on_several_ranks(two_ranks):
    for got in _case(two_ranks, "wan-cfg2"):
        assert got["vae_replaced"] and "vae: optimized (PatchParallelVAE" in got["report"]


def test_the_speculated_call_matches_only_what_it_was_computed_with(rng_inputs):
    from vdopt.runtime.cfg_pairing import learn_pairing, matches, speculate, versions

    def randn(*shape):
        return torch.randn(*shape, generator=rng_inputs)

    a = {"hidden_states": randn(1, 4, 2), "timestep": torch.tensor([500.0]), "encoder_hidden_states": randn(1, 3, 8),
         "return_dict": False}
    b = {**a, "encoder_hidden_states": randn(1, 3, 8)}
    pairing = learn_pairing(a, b)
    assert list(pairing.differing) == [2]  # the text embeddings' leaf
    step2 = {**a, "hidden_states": randn(1, 4, 2)}
    spec = speculate(pairing, step2)
    computed = versions(spec)
    assert spec["hidden_states"] is step2["hidden_states"] and spec["encoder_hidden_states"] is b["encoder_hidden_states"]
    real_b = {**step2, "encoder_hidden_states": b["encoder_hidden_states"]}
    assert matches(real_b, spec, computed)
    assert matches({**real_b, "encoder_hidden_states": b["encoder_hidden_states"].clone()}, spec, computed)  # equal
    assert not matches({**real_b, "encoder_hidden_states": randn(1, 3, 8)}, spec, computed)
    assert not matches({**real_b, "return_dict": True}, spec, computed)
    step2["hidden_states"].mul_(2)  # modified in place after B was computed: the same object, other values
    assert not matches(real_b, spec, computed)
    # different shapes between the two calls: B cannot be told from A
    assert learn_pairing(a, {**a, "encoder_hidden_states": randn(1, 5, 8)}) is None
