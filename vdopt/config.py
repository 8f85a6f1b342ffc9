"""User-facing configuration dataclasses."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class PABConfig:
    """Pyramid Attention Broadcast: reuse attention outputs across denoising steps.

    On the i-th call since ``reset()`` with timestep t, a site computes when i == 0, or t is
    not strictly inside its kind's window, or i % range == 0; otherwise it reuses the output
    cached at its last computation (the rule of diffusers' PyramidAttentionBroadcastHook).
    ``full`` and ``joint_text`` self-attention follow the spatial settings.
    """

    spatial_range: int | None = 2
    """Recompute spatial (and full / joint_text) attention every this many calls; None disables."""
    temporal_range: int | None = 4
    """Recompute temporal attention every this many calls; None disables."""
    cross_range: int | None = 6
    """Recompute cross-attention every this many calls; None disables."""
    spatial_window: tuple[float, float] = (100, 800)
    """Timesteps strictly inside this open interval may reuse spatial attention."""
    temporal_window: tuple[float, float] = (100, 800)
    """Timesteps strictly inside this open interval may reuse temporal attention."""
    cross_window: tuple[float, float] = (100, 800)
    """Timesteps strictly inside this open interval may reuse cross-attention."""
    mlp_range: int | None = None
    """Optionally also reuse the feed-forward output every this many calls (VideoSys' MLP broadcast)."""
    mlp_window: tuple[float, float] = (100, 800)
    """Timesteps strictly inside this open interval may reuse the feed-forward output."""

    def to_diffusers(self, current_timestep_callback, **block_identifiers):
        """The same schedule as diffusers' ``PyramidAttentionBroadcastConfig`` (to run its hook).

        ``block_identifiers`` are passed on (e.g. ``spatial_attention_block_identifiers``).
        diffusers' PAB has no feed-forward broadcast, so ``mlp_range`` must be None.
        """
        from diffusers import PyramidAttentionBroadcastConfig

        if self.mlp_range is not None:
            raise ValueError("diffusers' PyramidAttentionBroadcastConfig has no MLP broadcast: set mlp_range=None")
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial_range,
            temporal_attention_block_skip_range=self.temporal_range,
            cross_attention_block_skip_range=self.cross_range,
            spatial_attention_timestep_skip_range=self.spatial_window,
            temporal_attention_timestep_skip_range=self.temporal_window,
            cross_attention_timestep_skip_range=self.cross_window,
            current_timestep_callback=current_timestep_callback,
            **block_identifiers,
        )

    def __post_init__(self) -> None:
        for field in ("spatial_range", "temporal_range", "cross_range", "mlp_range"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"PABConfig.{field} must be a positive int or None, got {value!r}")
        for field in ("spatial_window", "temporal_window", "cross_window", "mlp_window"):
            low, high = getattr(self, field)
            if low > high:
                raise ValueError(f"PABConfig.{field} must be (low, high) with low <= high")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipeFusionConfig:
    """PipeFusion: layers split into pipeline stages, the latent into patches."""

    patches: int = 2
    """Number of patches the latent tokens are split into (M)."""
    warmup_steps: int = 1
    """Steps run with fresh K/V of every patch (exact) before stale K/V is used."""
    axis: str | None = None
    """Token grid axis the patches cut (``"T"``, ``"H"`` or ``"W"``); None: H, else T, else W,
    the first with at least ``patches`` entries."""
    balance: str = "flops"
    """How stages are balanced: ``"flops"`` (estimated from the graph's shapes) or
    ``"measured"`` (each block timed once on random inputs while compiling)."""

    def __post_init__(self) -> None:
        if self.patches < 1 or self.warmup_steps < 0:
            raise ValueError("PipeFusionConfig needs patches >= 1 and warmup_steps >= 0")
        if self.axis not in (None, "T", "H", "W"):
            raise ValueError(f"PipeFusionConfig.axis={self.axis!r}: choose 'T', 'H', 'W' or None")
        if self.balance not in ("flops", "measured"):
            raise ValueError(f"PipeFusionConfig.balance={self.balance!r}: choose 'flops' or 'measured'")
