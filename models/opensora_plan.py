"""Open-Sora-Plan v1.3 denoiser (OpenSoraT2V_v1_3), written in plain PyTorch for vdopt.

Follows PKU-YuanGroup/Open-Sora-Plan ``opensora/models/diffusion/opensora_v1_3``
(OpenSoraT2V_v1_3-2B/122): ``num_layers`` blocks of full 3D self-attention over all T*H*W
video tokens with 3D RoPE on q/k, un-normalized cross-attention to mT5-XXL caption tokens,
and an adaLN-single modulated GELU-tanh feed-forward; PixArt-style final layer.

Differences from the original:
- Skiparse (the ``sparse1d`` strided token regrouping the released checkpoint uses in
  layers 2..29) is omitted: every layer attends densely over all tokens. Parameters are
  unchanged (Skiparse has none); outputs differ from the released model only in that the
  dense layers see more keys.
- Attention is ``F.scaled_dot_product_attention`` on (B, N, S, D) tensors; padded caption
  tokens are masked with a boolean key padding mask rather than a -10000 bias.
- Token-level video masks, sequence parallelism and NPU paths are left out.

Token layout: (B, T*H*W, C), frame-major then row-major, like the patch embedding emits.

Legend: B batch, T latent frames, H/W latent patches, S tokens, N heads, D head dim,
C channels (hidden size), L text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from .opensora import CaptionMLP, TimestepEmbedder, modulate

__all__ = [
    "OpenSoraPlanT2V",
    "OpenSoraPlanConfig",
    "OPENSORA_PLAN_CONFIGS",
    "latent_size",
    "create",
    "example_inputs",
]


@dataclass(frozen=True, kw_only=True)
class OpenSoraPlanConfig:
    """Hyper-parameters of an Open-Sora-Plan v1.3 denoiser."""

    num_layers: int = 32
    """Transformer blocks, each self-attention + cross-attention + feed-forward."""
    num_attention_heads: int = 24
    """Attention heads N."""
    attention_head_dim: int = 96
    """Head dim D; a multiple of 6 so that it splits into three even RoPE parts (t, h, w)."""
    in_channels: int = 8
    """Latent channels of the WF-VAE."""
    out_channels: int = 8
    """Predicted channels."""
    patch_size: int = 2
    """Spatial patch size."""
    patch_size_t: int = 1
    """Temporal patch size (the released model uses 1)."""
    caption_channels: int = 4096
    """Width of the text-encoder (mT5-XXL) features."""
    model_max_length: int = 512
    """Caption tokens the text encoder produces."""
    ff_mult: int = 4
    """Feed-forward hidden width as a multiple of the hidden size."""
    norm_eps: float = 1e-6
    """Epsilon of the (affine-free) layer norms."""
    rope_theta: float = 10000.0
    """Base of the 3D rotary embedding."""
    interpolation_scale_thw: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """RoPE position divisors along (t, h, w)."""
    frequency_embedding_size: int = 256
    """Width of the sinusoidal timestep features."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


OPENSORA_PLAN_CONFIGS: dict[str, OpenSoraPlanConfig] = {
    # OpenSoraT2V_v1_3-2B/122 (LanguageBind/Open-Sora-Plan-v1.3.0, any93x640x640).
    "full": OpenSoraPlanConfig(),
    "tiny": OpenSoraPlanConfig(
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=24,
        caption_channels=32,
        model_max_length=10,
        frequency_embedding_size=64,
    ),
}


# ----------------------------------------------------------------------------- RoPE


def rope_3d_tables(
    T: int, H: int, W: int, head_dim: int, theta: float, interp: tuple[float, float, float], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (T*H*W, head_dim): the head dim is split in three, one part per axis.

    Each part uses half-split RoPE (rotate_half), as Open-Sora-Plan's RoPE3D.
    """
    part = head_dim // 3
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, part, 2, dtype=torch.float32, device=device) / part)
    )
    t_pos = torch.arange(T, dtype=torch.float32, device=device) / interp[0]
    h_pos = torch.arange(H, dtype=torch.float32, device=device) / interp[1]
    w_pos = torch.arange(W, dtype=torch.float32, device=device) / interp[2]

    def angles(pos: torch.Tensor) -> torch.Tensor:
        a = pos[:, None] * inv_freq[None]
        return torch.cat([a, a], dim=-1)  # (len, part)

    a_t = angles(t_pos)[:, None, None, :].expand(T, H, W, part)
    a_h = angles(h_pos)[None, :, None, :].expand(T, H, W, part)
    a_w = angles(w_pos)[None, None, :, :].expand(T, H, W, part)
    a = torch.cat([a_t, a_h, a_w], dim=-1).reshape(T * H * W, 3 * part)
    return a.cos(), a.sin()


def apply_rope_3d(x_BNSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation within each of the three parts of the head dim."""
    parts = x_BNSD.unflatten(-1, (3, 2, -1))  # (..., axis, half, part/2)
    rotated = torch.stack((-parts[..., 1, :], parts[..., 0, :]), dim=-2).flatten(-3)
    return x_BNSD * cos.to(x_BNSD.dtype) + rotated * sin.to(x_BNSD.dtype)


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """diffusers-style attention (to_q/to_k/to_v/to_out) through SDPA."""

    def __init__(self, cfg: OpenSoraPlanConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.to_q = nn.Linear(C, C)
        self.to_k = nn.Linear(C, C)
        self.to_v = nn.Linear(C, C)
        self.to_out = nn.Linear(C, C)

    def forward(
        self,
        x_BSC: torch.Tensor,
        context_BLC: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S, C = x_BSC.shape
        ctx = x_BSC if context_BLC is None else context_BLC
        L = ctx.shape[1]
        q_BNSD = self.to_q(x_BSC).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BNLD = self.to_k(ctx).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        v_BNLD = self.to_v(ctx).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q_BNSD = apply_rope_3d(q_BNSD, *rope)
            k_BNLD = apply_rope_3d(k_BNLD, *rope)
        out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNLD, v_BNLD, attn_mask=attn_mask)
        return self.to_out(out_BNSD.transpose(1, 2).reshape(B, S, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: OpenSoraPlanConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.proj_in = nn.Linear(C, cfg.ff_mult * C)
        self.act = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(cfg.ff_mult * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.act(self.proj_in(x)))


class OpenSoraPlanBlock(nn.Module):
    """Full 3D self-attention, cross-attention (no pre-norm, as released), feed-forward."""

    def __init__(self, cfg: OpenSoraPlanConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn1 = Attention(cfg)
        self.attn2 = Attention(cfg)
        self.norm2 = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ff = FeedForward(cfg)
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    def forward(
        self,
        x: torch.Tensor,
        y_BLC: torch.Tensor,
        t_mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keep_B11L: torch.Tensor | None,
    ) -> torch.Tensor:
        B, _, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(B, 6, C)
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn1(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + self.attn2(x, y_BLC, attn_mask=keep_B11L)
        return x + gate_mlp * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))


# ----------------------------------------------------------------------------- model


class OpenSoraPlanT2V(nn.Module):
    """Open-Sora-Plan v1.3 text-to-video denoiser with a diffusers-style forward."""

    def __init__(self, config: OpenSoraPlanConfig) -> None:
        super().__init__()
        if config.attention_head_dim % 6:
            raise ValueError(
                f"attention_head_dim={config.attention_head_dim} must be a multiple of 6 "
                "(three even RoPE parts)"
            )
        self.config = config
        C = config.hidden_size
        p, pt = config.patch_size, config.patch_size_t

        self.caption_projection = CaptionMLP(config.caption_channels, C)
        # The released model patchifies frame by frame with a 2D conv (patch_size_t = 1).
        self.patch_embed = nn.Conv3d(
            config.in_channels, C, kernel_size=(pt, p, p), stride=(pt, p, p)
        )
        self.t_embedder = TimestepEmbedder(C, config.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.transformer_blocks = nn.ModuleList(
            [OpenSoraPlanBlock(config) for _ in range(config.num_layers)]
        )
        self.norm_out = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(2, C) / C**0.5)
        self.proj_out = nn.Linear(C, pt * p * p * config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Denoise latents ``hidden_states`` (B, C_in, T, H, W).

        ``timestep`` (B,) or scalar; ``encoder_hidden_states`` (B, L, caption_channels);
        ``encoder_attention_mask`` (B, L), 1 = keep. Returns (B, C_out, T, H, W).
        """
        cfg = self.config
        dtype = self.dtype
        B, _, Tx, Hx, Wx = hidden_states.shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        if Tx % pt or Hx % p or Wx % p:
            raise ValueError(f"latent size {(Tx, Hx, Wx)} is not divisible by patch {(pt, p, p)}")
        T, H, W = Tx // pt, Hx // p, Wx // p

        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        t = self.t_embedder(timestep)  # adaLN-single: one embedding for all blocks
        t_mod = self.t_block(t)

        y = encoder_hidden_states
        if y.ndim == 4:  # Open-Sora-Plan passes (B, 1, L, C)
            y = y.squeeze(1)
        y_BLC = self.caption_projection(y.to(dtype))
        keep_B11L = None
        if encoder_attention_mask is not None:
            mask = encoder_attention_mask
            if mask.ndim == 3:  # (B, 1, L)
                mask = mask.squeeze(1)
            keep_B11L = (mask > 0)[:, None, None, :]

        x = self.patch_embed(hidden_states.to(dtype)).flatten(2).transpose(1, 2)  # (B, T*H*W, C)
        rope = rope_3d_tables(
            T, H, W, cfg.attention_head_dim, cfg.rope_theta, cfg.interpolation_scale_thw, x.device
        )
        for block in self.transformer_blocks:
            x = block(x, y_BLC, t_mod, rope, keep_B11L)

        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))
        out = x.view(B, T, H, W, pt, p, p, cfg.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, cfg.out_channels, T * pt, H * p, W * p)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


# ----------------------------------------------------------------------------- zoo hooks


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixel video -> latent (T, H, W) of WF-VAE 4x8x8 (first frame encoded alone)."""
    return (frames - 1) // 4 + 1, height // 8, width // 8


def create(size: str, *, latent: tuple[int, int, int], text_len: int) -> OpenSoraPlanT2V:
    """Build the model for a named size; sizes do not depend on the input shape."""
    del latent, text_len
    return OpenSoraPlanT2V(OPENSORA_PLAN_CONFIGS[size])


def example_inputs(
    model: OpenSoraPlanT2V,
    *,
    batch: int,
    latent: tuple[int, int, int],
    text_len: int,
    randn,
    timestep: torch.Tensor,
    text_mask: torch.Tensor | None,
) -> tuple[tuple, dict]:
    cfg = model.config
    kwargs = {
        "timestep": timestep,
        "encoder_hidden_states": randn(batch, text_len, cfg.caption_channels),
        "return_dict": False,
    }
    if text_mask is not None:
        kwargs["encoder_attention_mask"] = text_mask
    return (randn(batch, cfg.in_channels, *latent),), kwargs
