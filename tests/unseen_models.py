"""Tiny diffusers models that vdopt has no rule or zoo entry for (HunyuanVideo, PixArt)."""

from __future__ import annotations

import torch


def hunyuan_video(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    ).eval()
    mask = torch.ones(1, 7)
    mask[:, 5:] = 0  # two padded text tokens: the key-padding mask must keep them out
    kwargs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 12), timestep=torch.tensor([700]),
        encoder_hidden_states=torch.randn(1, 7, 16), encoder_attention_mask=mask,
        pooled_projections=torch.randn(1, 8), guidance=torch.tensor([3500.0]), return_dict=False,
    )
    return model, (), kwargs


def pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=16,
    ).eval()
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
        timestep=torch.tensor([400, 400]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return model, (), kwargs
