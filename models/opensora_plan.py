"""Open-Sora-Plan v1.3 denoiser (OpenSoraT2V_v1_3), written in plain PyTorch for vdopt.

Follows PKU-YuanGroup/Open-Sora-Plan ``opensora/models/diffusion/opensora_v1_3``
(OpenSoraT2V_v1_3-2B/122): ``num_layers`` blocks of full 3D self-attention over all T*H*W
video tokens with 3D RoPE on q/k, un-normalized cross-attention to mT5-XXL caption tokens,
and an adaLN-single modulated GELU-tanh feed-forward; PixArt-style final layer.

Skiparse (``sparse1d``, ``sparse_n`` = k): in blocks 2..29 (upstream hard-codes
``1 < i < 30``, i.e. all but the first two and last two of the 32 released blocks) both
attentions run on a regrouped token sequence, padded with zeros to a multiple of k*k:
even blocks take a *single skip*, every k-th token into one of k groups
(``(g k) b d -> g (k b) d``), odd blocks a *group skip*, runs of k tokens every k*k
(``(n m k) b d -> (n k) (m b) d``). The k groups become batch entries (sample-major,
where upstream is group-major: same result, see ``skiparse_regroup``), so each query
attends to 1/k of the keys; padded keys are masked. Cross-attention regroups its queries
the same way and repeats the caption keys k times (a pure permutation there: every query
still sees all caption tokens). See ``skiparse_regroup`` for the index maps.

Differences from the original:
- Attention is ``F.scaled_dot_product_attention`` on (B, N, S, D) tensors; padded caption
  tokens and Skiparse padding are masked with boolean key masks rather than -10000 /
  -9980 biases (identical in float32: ``exp`` of either bias underflows to 0).
- Token-level video masks (the released pipeline passes all ones), sequence parallelism
  and NPU paths are left out.

Token layout: (B, T*H*W, C), frame-major then row-major, like the patch embedding emits.

Legend: B batch, T latent frames, H/W latent patches, S tokens, N heads, D head dim,
C channels (hidden size), L text tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from .opensora import CaptionMLP, TimestepEmbedder, modulate

__all__ = [
    "OpenSoraPlanT2V",
    "OpenSoraPlanConfig",
    "Skiparse",
    "SKIPARSE_BLOCKS",
    "skiparse_regroup",
    "skiparse_ungroup",
    "skiparse_key_mask",
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
    sparse1d: bool = True
    """Skiparse in blocks ``SKIPARSE_BLOCKS`` (upstream key ``sparse1d``; the released
    checkpoints are trained with it on, upstream's class default is off)."""
    sparse_n: int = 4
    """Skiparse stride k (upstream key ``sparse_n``): each query sees 1/k of the keys."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def skiparse(self, block: int) -> Skiparse | None:
        """How block ``block`` regroups its tokens; ``None`` for dense attention.

        Mirrors ``OpenSoraT2V_v1_3._init_patched_inputs`` (``sparse1d=... if i > 1 and
        i < 30``, ``sparse_group=i % 2 == 1``), ``opensora_v1_3/modeling_opensora.py``.
        """
        if not self.sparse1d or block not in SKIPARSE_BLOCKS:
            return None
        return Skiparse(k=self.sparse_n, group=block % 2 == 1)


SKIPARSE_BLOCKS = range(2, 30)
"""Block indices that run Skiparse when ``sparse1d`` is on. Upstream hard-codes these
absolute indices (not "all but the last two"), so a model of another depth keeps them."""


@dataclass(frozen=True, kw_only=True)
class Skiparse:
    """Token regrouping of one Skiparse block."""

    k: int
    """Stride (``sparse_n``): the number of groups, each attended to separately."""
    group: bool
    """Group skip (runs of k tokens every k*k) rather than single skip (every k-th token)."""

    def padding(self, tokens: int) -> int:
        """Zero tokens appended so that the sequence is a multiple of k*k."""
        return -tokens % (self.k * self.k)


OPENSORA_PLAN_CONFIGS: dict[str, OpenSoraPlanConfig] = {
    # OpenSoraT2V_v1_3-2B/122 (LanguageBind/Open-Sora-Plan-v1.3.0, any93x640x640).
    "full": OpenSoraPlanConfig(),
    "tiny": OpenSoraPlanConfig(
        num_attention_heads=4,
        attention_head_dim=24,
        caption_channels=32,
        model_max_length=10,
        frequency_embedding_size=64,
        # Two dense blocks (Skiparse starts at block 2): the zoo's tiny model is dense, and the
        # Skiparse tests (tests/test_skiparse.py, tests/test_training.py) build the sparse
        # variant, TINY_SKIPARSE below, which sequence parallelism keeps split through its
        # regroups (vdopt.passes.parallel.skiparse).
        num_layers=2,
        sparse1d=False,
    ),
}

TINY_SKIPARSE = dataclasses.replace(OPENSORA_PLAN_CONFIGS["tiny"], num_layers=4, sparse1d=True, sparse_n=2)
"""The tiny config with both Skiparse modes: blocks 0 and 1 dense, 2 single skip, 3 group
skip. k = 2 (upstream's class default) divides the 72-token tiny grid without padding; a
45-token grid pads 3."""


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


# ----------------------------------------------------------------------------- Skiparse


def skiparse_regroup(x_BNSD: torch.Tensor, mode: Skiparse) -> torch.Tensor:
    """(B, N, S, D) -> (B*k, N, S/k, D): the k Skiparse groups become batch entries.

    ``S`` must be a multiple of k*k (see ``Skiparse.padding``). Index maps, with the new
    batch index ``b*k + j``:

    - single skip, token ``g*k + j`` -> group j, position g
      (upstream ``'(g k) b d -> g (k b) d'``);
    - group skip, token ``(n*k + j)*k + i`` -> group j, position ``n*k + i``
      (upstream ``'(n m k) b d -> (n k) (m b) d'`` with m = k).

    Mirrors ``OpenSoraAttnProcessor2_0._sparse_1d`` (``opensora_v1_3/modules.py``), on
    batch-first tensors, with one deliberate difference: upstream orders the new batch
    group-major, ``(k b)``; here it is sample-major, ``(b k)``. The batch holds independent
    attention problems, so the order changes no result, and keeping the sample index
    outermost lets a split of the batch (CFG parallel) pass through the regroup without
    gathering. Also regroups masks: any (B, N, S, D)-shaped tensor works.
    """
    B, N, S, D = x_BNSD.shape
    k = mode.k
    if mode.group:
        x = x_BNSD.reshape(B, N, S // (k * k), k, k, D).permute(0, 3, 1, 2, 4, 5)
    else:
        x = x_BNSD.reshape(B, N, S // k, k, D).permute(0, 3, 1, 2, 4)
    return x.reshape(B * k, N, S // k, D)


def skiparse_ungroup(x_GNSD: torch.Tensor, mode: Skiparse) -> torch.Tensor:
    """Inverse of ``skiparse_regroup``: (B*k, N, S/k, D) -> (B, N, S, D).

    Mirrors ``OpenSoraAttnProcessor2_0._reverse_sparse_1d`` (without the un-padding slice,
    which the caller does).
    """
    Bk, N, G, D = x_GNSD.shape
    k = mode.k
    B = Bk // k
    if mode.group:
        x = x_GNSD.reshape(B, k, N, G // k, k, D).permute(0, 2, 3, 1, 4, 5)
    else:
        x = x_GNSD.reshape(B, k, N, G, D).permute(0, 2, 3, 1, 4)
    return x.reshape(B, N, G * k, D)


def skiparse_key_mask(
    batch: int, tokens: int, mode: Skiparse, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B*k, 1, 1, S_pad/k) mask of the real (not padding) keys of a regrouped
    self-attention, or ``None`` when nothing is padded.

    Upstream pads its video bias mask with -9980 and regroups it the same way as the
    tokens (``Attention.prepare_sparse_mask``); the released pipeline's video mask is all
    ones, so only the padding is ever masked. Built from ``arange`` so that export traces
    it for any (static) size.
    """
    pad = mode.padding(tokens)
    if pad == 0:
        return None
    keep_11S1 = (torch.arange(tokens + pad, device=device) < tokens).view(1, 1, -1, 1)
    keep_k11G = skiparse_regroup(keep_11S1, mode).transpose(2, 3)
    # Batch entries are b*k + j: every sample has the same k group masks.
    return keep_k11G.repeat(batch, 1, 1, 1)


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """diffusers-style attention (to_q/to_k/to_v/to_out) through SDPA, optionally Skiparse.

    With ``skiparse`` set, q (and for self-attention k and v) are zero-padded to a multiple
    of k*k and regrouped after RoPE, as ``OpenSoraAttnProcessor2_0.__call__``; for
    cross-attention the caption keys, values and mask are repeated k times instead
    (``_sparse_1d_kv``). The output is ungrouped and un-padded before ``to_out``.
    """

    def __init__(self, cfg: OpenSoraPlanConfig, skiparse: Skiparse | None = None) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.skiparse = skiparse
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
        """``attn_mask`` is a boolean key mask, 1 = attend: (B, 1, 1, L) for cross-attention
        (repeated here under Skiparse), and for Skiparse self-attention the regrouped
        padding mask of ``skiparse_key_mask``, made once per forward by the model."""
        B, S, C = x_BSC.shape
        ctx = x_BSC if context_BLC is None else context_BLC
        L = ctx.shape[1]
        q_BNSD = self.to_q(x_BSC).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BNLD = self.to_k(ctx).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        v_BNLD = self.to_v(ctx).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q_BNSD = apply_rope_3d(q_BNSD, *rope)
            k_BNLD = apply_rope_3d(k_BNLD, *rope)
        mode = self.skiparse
        if mode is not None:
            # No pad node when S already divides: a zero pad is still an op the
            # parallel passes would have to see through.
            pad = (0, 0, 0, mode.padding(S))
            q_BNSD = skiparse_regroup(F.pad(q_BNSD, pad) if any(pad) else q_BNSD, mode)
            if context_BLC is None:
                k_BNLD = skiparse_regroup(F.pad(k_BNLD, pad) if any(pad) else k_BNLD, mode)
                v_BNLD = skiparse_regroup(F.pad(v_BNLD, pad) if any(pad) else v_BNLD, mode)
            else:
                # (B, ...) -> (B*k, ...): each sample's caption for each of its groups.
                k_BNLD = k_BNLD.repeat_interleave(mode.k, dim=0)
                v_BNLD = v_BNLD.repeat_interleave(mode.k, dim=0)
                if attn_mask is not None:
                    attn_mask = attn_mask.repeat_interleave(mode.k, dim=0)
        out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNLD, v_BNLD, attn_mask=attn_mask)
        if mode is not None:
            out_BNSD = skiparse_ungroup(out_BNSD, mode)[:, :, :S]
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
    """3D self-attention, cross-attention (no pre-norm, as released), feed-forward.

    ``skiparse`` (from ``OpenSoraPlanConfig.skiparse(index)``) applies to both attentions,
    as upstream's ``BasicTransformerBlock`` passes the same sparse settings to attn1/attn2.
    """

    def __init__(self, cfg: OpenSoraPlanConfig, skiparse: Skiparse | None = None) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn1 = Attention(cfg, skiparse)
        self.attn2 = Attention(cfg, skiparse)
        self.norm2 = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ff = FeedForward(cfg)
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    @property
    def skiparse(self) -> Skiparse | None:
        return self.attn1.skiparse

    def forward(
        self,
        x: torch.Tensor,
        y_BLC: torch.Tensor,
        t_mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keep_B11L: torch.Tensor | None,
        self_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``self_mask``: the Skiparse padding mask of this block's mode (or ``None``)."""
        B, _, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(B, 6, C)
        ).chunk(6, dim=1)
        attn = self.attn1(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope, attn_mask=self_mask)
        x = x + gate_msa * attn
        x = x + self.attn2(x, y_BLC, attn_mask=keep_B11L)
        return x + gate_mlp * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))


# ----------------------------------------------------------------------------- model


class OpenSoraPlanT2V(nn.Module):
    """Open-Sora-Plan v1.3 text-to-video denoiser with a diffusers-style forward.

    Module names differ from upstream's; ``vdopt.models.load_upstream`` maps released
    checkpoints onto them.
    """

    def __init__(self, config: OpenSoraPlanConfig) -> None:
        super().__init__()
        if config.attention_head_dim % 6:
            raise ValueError(
                f"attention_head_dim={config.attention_head_dim} must be a multiple of 6 "
                "(three even RoPE parts)"
            )
        if config.sparse1d and config.sparse_n < 1:
            raise ValueError(f"sparse_n={config.sparse_n} must be at least 1 with sparse1d")
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
            [OpenSoraPlanBlock(config, config.skiparse(i)) for i in range(config.num_layers)]
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
        # One padding mask per Skiparse mode, shared by its blocks (as upstream's
        # prepare_sparse_mask runs once per forward).
        self_masks: dict[Skiparse, torch.Tensor | None] = {}
        for block in self.transformer_blocks:
            mode = block.skiparse
            if mode is not None and mode not in self_masks:
                self_masks[mode] = skiparse_key_mask(B, T * H * W, mode, x.device)
            x = block(x, y_BLC, t_mod, rope, keep_B11L, self_masks.get(mode))

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
