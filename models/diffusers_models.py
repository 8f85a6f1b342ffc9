"""Builders for the diffusers video transformers in the zoo: Latte, CogVideoX, Wan.

"full" configurations are the published ``transformer/config.json`` of maxin-cn/Latte-1,
THUDM/CogVideoX-2b and Wan-AI/Wan2.1-T2V-1.3B-Diffusers. "tiny" configurations keep every
architectural switch of the full one and shrink only widths, depths and text features.

A few config values only size buffers that must match the input shape (no parameters
depend on them): Latte's ``video_length`` (temporal position table) and CogVideoX's
``sample_*`` / ``max_text_seq_length`` (joint position table). They are set from the
requested shape, which for the default "full" shapes gives exactly the published values.

Each model has three hooks used by the zoo: ``<name>_latent_size`` (pixel video -> latent
T, H, W), ``<name>_create`` (size name + shapes -> module) and ``<name>_inputs`` (example
call arguments).

Legend: B batch, T latent frames, H/W latent height/width, L text tokens.
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel, WanTransformer3DModel

__all__ = [
    "LATTE_CONFIGS",
    "COGVIDEOX_CONFIGS",
    "WAN_CONFIGS",
    "latte_latent_size",
    "latte_create",
    "latte_inputs",
    "cogvideox_latent_size",
    "cogvideox_create",
    "cogvideox_inputs",
    "wan_latent_size",
    "wan_create",
    "wan_inputs",
]


# ----------------------------------------------------------------------------- Latte

LATTE_CONFIGS: dict[str, dict] = {
    # maxin-cn/Latte-1 transformer/config.json (video_length is the class default, 16).
    "full": dict(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        cross_attention_dim=1152,
        attention_bias=True,
        sample_size=64,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=4096,
        video_length=16,
    ),
}
# The same architecture, shrunk.
LATTE_CONFIGS["tiny"] = dict(
    LATTE_CONFIGS["full"],
    num_attention_heads=2,
    attention_head_dim=32,
    num_layers=2,
    cross_attention_dim=64,
    sample_size=8,
    caption_channels=32,
    video_length=3,
)


def latte_latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """SD VAE: every frame encoded alone, 8x spatial."""
    return frames, height // 8, width // 8


def latte_create(
    size: str, *, latent: tuple[int, int, int], text_len: int
) -> LatteTransformer3DModel:
    del text_len
    # Latte adds a fixed-length temporal position table: it must match the frame count.
    return LatteTransformer3DModel(**{**LATTE_CONFIGS[size], "video_length": latent[0]})


def latte_inputs(
    model: LatteTransformer3DModel,
    *,
    batch: int,
    latent: tuple[int, int, int],
    text_len: int,
    randn,
    timestep: torch.Tensor,
    text_mask: torch.Tensor | None,
) -> tuple[tuple, dict]:
    if text_mask is not None:
        raise ValueError("latte: diffusers' LatteTransformer3DModel does not apply a text mask")
    cfg = model.config
    kwargs = {
        "timestep": timestep,
        "encoder_hidden_states": randn(batch, text_len, cfg.caption_channels),
        "return_dict": False,
    }
    return (randn(batch, cfg.in_channels, *latent),), kwargs


# ----------------------------------------------------------------------------- CogVideoX

COGVIDEOX_CONFIGS: dict[str, dict] = {
    # THUDM/CogVideoX-2b transformer/config.json.
    "full": dict(
        num_attention_heads=30,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        flip_sin_to_cos=True,
        freq_shift=0,
        time_embed_dim=512,
        text_embed_dim=4096,
        num_layers=30,
        dropout=0.0,
        attention_bias=True,
        sample_width=90,
        sample_height=60,
        sample_frames=49,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        norm_elementwise_affine=True,
        norm_eps=1e-5,
        spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0,
        use_rotary_positional_embeddings=False,
        use_learned_positional_embeddings=False,
    ),
}
# The same architecture, shrunk.
COGVIDEOX_CONFIGS["tiny"] = dict(
    COGVIDEOX_CONFIGS["full"],
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    time_embed_dim=32,
    text_embed_dim=32,
    num_layers=2,
    sample_width=12,
    sample_height=8,
    sample_frames=9,
    max_text_seq_length=10,
)


def cogvideox_latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """CogVideoX VAE: 4x temporal with the first frame alone, 8x spatial."""
    return (frames - 1) // 4 + 1, height // 8, width // 8


def cogvideox_create(
    size: str, *, latent: tuple[int, int, int], text_len: int
) -> CogVideoXTransformer3DModel:
    T, H, W = latent
    cfg = COGVIDEOX_CONFIGS[size]
    # The joint (text + video) sin-cos table is built for these sizes; matching them keeps
    # the forward on the precomputed buffer, and the text length must match in any case.
    shape_cfg = dict(
        sample_frames=(T - 1) * cfg["temporal_compression_ratio"] + 1,
        sample_height=H,
        sample_width=W,
        max_text_seq_length=text_len,
    )
    return CogVideoXTransformer3DModel(**{**cfg, **shape_cfg})


def cogvideox_inputs(
    model: CogVideoXTransformer3DModel,
    *,
    batch: int,
    latent: tuple[int, int, int],
    text_len: int,
    randn,
    timestep: torch.Tensor,
    text_mask: torch.Tensor | None,
) -> tuple[tuple, dict]:
    if text_mask is not None:
        raise ValueError("cogvideox: CogVideoXTransformer3DModel takes no text mask")
    cfg = model.config
    T, H, W = latent
    kwargs = {
        "timestep": timestep,
        "encoder_hidden_states": randn(batch, text_len, cfg.text_embed_dim),
        "return_dict": False,
    }
    # CogVideoX latents are frame-major: (B, T, C, H, W).
    return (randn(batch, T, cfg.in_channels, H, W),), kwargs


# ----------------------------------------------------------------------------- Wan

WAN_CONFIGS: dict[str, dict] = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json.
    "full": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    ),
}
# The same architecture, shrunk.
WAN_CONFIGS["tiny"] = dict(
    WAN_CONFIGS["full"],
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=128,
    num_layers=2,
)


def wan_latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Wan VAE: 4x temporal with the first frame alone, 8x spatial."""
    return (frames - 1) // 4 + 1, height // 8, width // 8


def wan_create(size: str, *, latent: tuple[int, int, int], text_len: int) -> WanTransformer3DModel:
    del text_len
    if max(latent) > WAN_CONFIGS[size]["rope_max_seq_len"]:
        raise ValueError(f"wan: latent size {latent} exceeds rope_max_seq_len")
    return WanTransformer3DModel(**WAN_CONFIGS[size])


def wan_inputs(
    model: WanTransformer3DModel,
    *,
    batch: int,
    latent: tuple[int, int, int],
    text_len: int,
    randn,
    timestep: torch.Tensor,
    text_mask: torch.Tensor | None,
) -> tuple[tuple, dict]:
    if text_mask is not None:
        raise ValueError("wan: WanTransformer3DModel takes no text mask (pad with zeros instead)")
    cfg = model.config
    kwargs = {
        "timestep": timestep,
        "encoder_hidden_states": randn(batch, text_len, cfg.text_dim),
        "return_dict": False,
    }
    return (randn(batch, cfg.in_channels, *latent),), kwargs
