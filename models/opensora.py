"""Open-Sora 1.2 STDiT3 denoiser, written in plain PyTorch for vdopt.

Follows hpcaitech/Open-Sora ``opensora/models/stdit/stdit3.py`` (STDiT3-XL/2): ``depth``
spatial blocks and ``depth`` temporal blocks, run alternately (spatial i, then temporal i).
Each block is adaLN-single modulated self-attention (qk RMSNorm; RoPE over frames in the
temporal blocks), cross-attention to the T5 caption tokens, and a GELU-tanh MLP.

Differences from the original, all numerically neutral for inference:
- Attention is ``F.scaled_dot_product_attention`` on (B, N, S, D) tensors, never
  flash-attn/xformers, so that vdopt's capture sees one SDPA node per attention site.
- Cross-attention keeps the batch dimension and masks padded caption tokens with a boolean
  key padding mask, instead of packing all captions into one sequence with a block-diagonal
  xformers mask.
- Training-only parts (caption dropout, ``x_mask`` frame conditioning, sequence parallelism,
  gradient checkpointing) are left out. Weights are random; the original zero-initializes
  some temporal projections, which would make tests blind to those branches.

Token layout: (B, T*S, C) with S = H*W. A spatial block attends within a frame,
(B*T, S, C); a temporal block attends within a patch position, (B*S, T, C).

Legend: B batch, T latent frames, H/W latent patches, S tokens, N heads, D head dim,
C channels (hidden size), L text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

__all__ = [
    "STDiT3",
    "STDiT3Config",
    "STDIT3_CONFIGS",
    "latent_size",
    "create",
    "example_inputs",
]


@dataclass(frozen=True, kw_only=True)
class STDiT3Config:
    """Hyper-parameters of an STDiT3 denoiser."""

    depth: int = 28
    """Number of spatial blocks; there are as many temporal blocks."""
    hidden_size: int = 1152
    """Channel width C of the token stream."""
    num_heads: int = 16
    """Attention heads N; the head dim is hidden_size // num_heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of hidden_size."""
    in_channels: int = 4
    """Latent channels of the VAE."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size (t, h, w) of the 3D patch embedding."""
    pred_sigma: bool = True
    """Learn-sigma output: the model predicts 2 * in_channels channels."""
    caption_channels: int = 4096
    """Width of the text-encoder (T5-XXL) features."""
    model_max_length: int = 300
    """Caption tokens the text encoder produces; size of the null-caption buffer."""
    qk_norm: bool = True
    """RMSNorm on queries and keys of the self-attentions."""
    input_sq_size: int = 512
    """Reference resolution (pixels) for scaling the 2D position embedding."""
    vae_spatial_factor: int = 8
    """Pixels per latent cell; recovers the pixel resolution for the position embedding."""
    frequency_embedding_size: int = 256
    """Width of the sinusoidal timestep and fps features."""
    default_fps: float = 24.0
    """Frame rate fed to the fps embedder when the caller passes none."""
    rope_theta: float = 10000.0
    """Base of the temporal rotary embedding."""
    eps: float = 1e-6
    """Epsilon of the layer norms and RMS norms."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def num_layers(self) -> int:
        """Total blocks (spatial + temporal)."""
        return 2 * self.depth


STDIT3_CONFIGS: dict[str, STDiT3Config] = {
    # STDiT3-XL/2 as released with Open-Sora 1.2 (hpcai-tech/OpenSora-STDiT-v3).
    "full": STDiT3Config(),
    "tiny": STDiT3Config(
        depth=2,
        hidden_size=64,
        num_heads=4,
        caption_channels=32,
        model_max_length=10,
        frequency_embedding_size=64,
    ),
}


# ----------------------------------------------------------------------------- helpers


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of a (B,) tensor, computed in float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar per sample -> sinusoidal features -> MLP (DiT/PixArt timestep embedder)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class CaptionMLP(nn.Module):
    """Text-encoder features -> hidden size (Linear, GELU-tanh, Linear)."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(y)))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_1d_interleaved(
    length: int, dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, dim) for interleaved-pair RoPE (rotary_embedding_torch)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of the last dim; positions run along dim -2."""
    x_pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sincos_pos_embed_2d(
    dim: int, h: int, w: int, scale: float, base_size: int, device: torch.device
) -> torch.Tensor:
    """(1, h*w, dim) sin-cos embedding: first half encodes the column, second the row."""
    half = dim // 2
    inv_freq = 1.0 / (
        10000 ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half)
    )
    rows = torch.arange(h, dtype=torch.float32, device=device) / scale * (base_size / h)
    cols = torch.arange(w, dtype=torch.float32, device=device) / scale * (base_size / w)
    row_hw = rows[:, None].expand(h, w).reshape(-1)
    col_hw = cols[None, :].expand(h, w).reshape(-1)

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * inv_freq[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([embed(col_hw), embed(row_hw)], dim=-1)[None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional qk RMSNorm and interleaved RoPE."""

    def __init__(self, cfg: STDiT3Config, *, rope: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.rope = rope
        self.rope_theta = cfg.rope_theta
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x_BSC: torch.Tensor) -> torch.Tensor:
        B, S, C = x_BSC.shape
        qkv = self.qkv(x_BSC).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BNSD, k_BNSD, v_BNSD = qkv.unbind(0)
        # Norm before RoPE, as in STDiT3 (the "legacy" order is the other one).
        q_BNSD, k_BNSD = self.q_norm(q_BNSD), self.k_norm(k_BNSD)
        if self.rope:
            cos, sin = rope_1d_interleaved(S, self.head_dim, self.rope_theta, x_BSC.device)
            q_BNSD = apply_rope_interleaved(q_BNSD, cos, sin)
            k_BNSD = apply_rope_interleaved(k_BNSD, cos, sin)
        out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD)
        return self.proj(out_BNSD.transpose(1, 2).reshape(B, S, C))


class CrossAttention(nn.Module):
    """Video tokens attend to caption tokens; padded caption keys are masked out."""

    def __init__(self, cfg: STDiT3Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q_linear = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv_linear = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x_BSC: torch.Tensor, y_BLC: torch.Tensor, keep_B11L: torch.Tensor | None
    ) -> torch.Tensor:
        B, S, C = x_BSC.shape
        L = y_BLC.shape[1]
        q_BNSD = self.q_linear(x_BSC).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        kv = (
            self.kv_linear(y_BLC)
            .view(B, L, 2, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        k_BNLD, v_BNLD = kv.unbind(0)
        out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNLD, v_BNLD, attn_mask=keep_B11L)
        return self.proj(out_BNSD.transpose(1, 2).reshape(B, S, C))


class Mlp(nn.Module):
    def __init__(self, cfg: STDiT3Config) -> None:
        super().__init__()
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.hidden_size, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class STDiT3Block(nn.Module):
    """One spatial or temporal STDiT3 block on the (B, T*S, C) token stream."""

    def __init__(self, cfg: STDiT3Config, *, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, elementwise_affine=False)
        # RoPE only along time: spatial positions come from the 2D sin-cos embedding.
        self.attn = SelfAttention(cfg, rope=temporal)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, elementwise_affine=False)
        self.mlp = Mlp(cfg)
        self.scale_shift_table = nn.Parameter(
            torch.randn(6, cfg.hidden_size) / cfg.hidden_size**0.5
        )

    def forward(
        self,
        x: torch.Tensor,
        y_BLC: torch.Tensor,
        t_mlp: torch.Tensor,
        keep_B11L: torch.Tensor | None,
        T: int,
        S: int,
    ) -> torch.Tensor:
        B, _, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mlp.reshape(B, 6, C)
        ).chunk(6, dim=1)

        x_m = modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:
            x_m = x_m.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
            x_m = self.attn(x_m)
            x_m = x_m.view(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
        else:
            x_m = self.attn(x_m.reshape(B * T, S, C)).view(B, T * S, C)
        x = x + gate_msa * x_m

        x = x + self.cross_attn(x, y_BLC, keep_B11L)

        x_m = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(x_m)


class T2IFinalLayer(nn.Module):
    """PixArt final layer: adaLN-single modulated norm, then a linear to patch pixels."""

    def __init__(self, cfg: STDiT3Config) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, elementwise_affine=False)
        self.linear = nn.Linear(cfg.hidden_size, math.prod(cfg.patch_size) * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(
            torch.randn(2, cfg.hidden_size) / cfg.hidden_size**0.5
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- model


class STDiT3(nn.Module):
    """Open-Sora 1.2 spatial-temporal DiT denoiser with a diffusers-style forward."""

    def __init__(self, config: STDiT3Config) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads or config.head_dim % 2:
            raise ValueError(
                f"hidden_size={config.hidden_size} must split into num_heads={config.num_heads} "
                "heads of even size (RoPE rotates pairs)"
            )
        if config.hidden_size % 4:
            raise ValueError(
                f"hidden_size={config.hidden_size} must be divisible by 4 (2D sin-cos)"
            )
        self.config = config
        C = config.hidden_size

        self.x_embedder = nn.Conv3d(
            config.in_channels, C, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.t_embedder = TimestepEmbedder(C, config.frequency_embedding_size)
        self.fps_embedder = TimestepEmbedder(C, config.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionMLP(config.caption_channels, C)
        # Learned "empty caption" used by pipelines for the unconditional CFG branch.
        self.register_buffer(
            "y_embedding",
            torch.randn(config.model_max_length, config.caption_channels)
            / config.caption_channels**0.5,
        )
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(config, temporal=False) for _ in range(config.depth)]
        )
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(config, temporal=True) for _ in range(config.depth)]
        )
        self.final_layer = T2IFinalLayer(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and sigma) for latents ``hidden_states`` of shape (B, C_in, T, H, W).

        ``timestep`` (B,) or scalar; ``encoder_hidden_states`` (B, L, caption_channels);
        ``encoder_attention_mask`` (B, L), 1 = keep; ``fps`` (B,) or scalar, default
        ``config.default_fps``. Returns (B, C_out, T, H, W).
        """
        cfg = self.config
        dtype = self.dtype
        B, _, Tx, Hx, Wx = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        if Tx % pt or Hx % ph or Wx % pw:
            raise ValueError(
                f"latent size {(Tx, Hx, Wx)} is not divisible by patch {cfg.patch_size}"
            )
        T, H, W = Tx // pt, Hx // ph, Wx // pw
        S = H * W

        # Timestep (+ fps) conditioning, shared by every block.
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if fps is None:
            fps = torch.full((B,), cfg.default_fps, device=hidden_states.device)
        elif fps.ndim == 0:
            fps = fps.expand(B)
        t = self.t_embedder(timestep) + self.fps_embedder(fps)
        t_mlp = self.t_block(t)

        # Caption tokens.
        y = encoder_hidden_states
        if y.ndim == 4:  # Open-Sora passes (B, 1, L, C)
            y = y.squeeze(1)
        y_BLC = self.y_embedder(y.to(dtype))
        keep_B11L = None
        if encoder_attention_mask is not None:
            keep_B11L = (encoder_attention_mask > 0)[:, None, None, :]

        # Patch embedding + 2D position embedding (scaled to the pixel resolution).
        x = self.x_embedder(hidden_states.to(dtype)).flatten(2).transpose(1, 2)  # (B, T*S, C)
        scale = (
            math.sqrt(Hx * cfg.vae_spatial_factor * Wx * cfg.vae_spatial_factor) / cfg.input_sq_size
        )
        pos = sincos_pos_embed_2d(cfg.hidden_size, H, W, scale, round(S**0.5), x.device)
        x = (x.view(B, T, S, -1) + pos.to(dtype)[:, None]).view(B, T * S, -1)

        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = spatial(x, y_BLC, t_mlp, keep_B11L, T, S)
            x = temporal(x, y_BLC, t_mlp, keep_B11L, T, S)

        x = self.final_layer(x, t)
        # Open-Sora returns float32 whatever the compute dtype.
        out = self.unpatchify(x, T, H, W).float()
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def unpatchify(self, x: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
        """(B, T*H*W, pt*ph*pw*C_out) -> (B, C_out, T*pt, H*ph, W*pw)."""
        pt, ph, pw = self.config.patch_size
        c_out = self.config.out_channels
        B = x.shape[0]
        x = x.view(B, T, H, W, pt, ph, pw, c_out)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, c_out, T * pt, H * ph, W * pw)


# ----------------------------------------------------------------------------- zoo hooks


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixel video -> latent (T, H, W) of the Open-Sora 1.2 VAE.

    Spatial 8x (SDXL VAE); temporal 4x applied per chunk of 17 frames (5 latent frames
    per chunk), the last partial chunk padded up to a multiple of 4.
    """
    chunk, chunk_latent = 17, 5
    full_chunks, rest = divmod(frames, chunk)
    return full_chunks * chunk_latent + math.ceil(rest / 4), height // 8, width // 8


def create(size: str, *, latent: tuple[int, int, int], text_len: int) -> STDiT3:
    """Build the model for a named size; sizes do not depend on the input shape."""
    del latent, text_len  # STDiT3 works at any resolution and caption length.
    return STDiT3(STDIT3_CONFIGS[size])


def example_inputs(
    model: STDiT3,
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
