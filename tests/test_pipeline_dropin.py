"""``pipe.transformer = vdopt.optimize(pipe.transformer)`` inside an unchanged diffusers pipeline."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import vdopt
from vdopt.models import build


def generate(transformer, prompt_embeds, negative_embeds):
    # No tokenizer/text encoder/VAE: embeddings in, latents out, as the zoo has no weights.
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
        num_frames=9, height=64, width=96, num_inference_steps=3, guidance_scale=5.0,
        output_type="latent", generator=torch.Generator().manual_seed(0),
    ).frames


def test_wan_pipeline_with_optimized_transformer_matches_eager():
    model, _, kwargs = build("wan", "tiny")
    embeds = [torch.randn_like(kwargs["encoder_hidden_states"]) for _ in range(2)]
    reference = generate(model, *embeds)
    opt = vdopt.optimize(model)
    latents = generate(opt, *embeds)
    # cond and uncond calls share one signature: captured once
    assert len(opt.plans) == 1
    torch.testing.assert_close(latents, reference, rtol=1e-5, atol=1e-6)
