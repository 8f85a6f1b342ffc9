"""User-facing configuration dataclasses."""

from __future__ import annotations

import dataclasses
import math


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
            if value is not None and (not _is_int(value) or value < 1):
                raise _field_error("PABConfig", field, value, "a positive int (recompute every this many calls) or None (never reuse)")
        for field in ("spatial_window", "temporal_window", "cross_window", "mlp_window"):
            # Frozen: normalize a list to a tuple through object.__setattr__ (keeps the config hashable).
            object.__setattr__(self, field, _window("PABConfig", field, getattr(self, field)))


TIMESTEP_RANGE = (0.0, 1000.0)
"""Timesteps a PAB window may span: diffusers' schedulers (DDPM/DDIM/UniPC, flow matching
with ``num_train_timesteps=1000``) pass timesteps in [0, 1000]."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field_error(cls: str, field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{cls}.{field}={value!r}: must be {allowed}")


def _window(cls: str, field: str, value: object) -> tuple[float, float]:
    """``value`` as a ``(low, high)`` pair of timesteps, or a ValueError naming ``field``."""
    low_t, high_t = TIMESTEP_RANGE
    allowed = f"a pair (low, high) of numbers with {low_t:g} <= low <= high <= {high_t:g} (timesteps)"
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _field_error(cls, field, value, allowed)
    low, high = value
    if not (_is_number(low) and _is_number(high) and low_t <= low <= high <= high_t):
        raise _field_error(cls, field, value, allowed)
    return (low, high)


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
        if not _is_int(self.patches) or self.patches < 1:
            raise _field_error("PipeFusionConfig", "patches", self.patches, "a positive int (patches the latent is split into)")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise _field_error("PipeFusionConfig", "warmup_steps", self.warmup_steps, "an int >= 0 (exact steps before stale K/V is used)")
        if self.axis not in (None, "T", "H", "W"):
            raise _field_error("PipeFusionConfig", "axis", self.axis, "'T', 'H', 'W' or None (the first axis with enough entries)")
        if self.balance not in ("flops", "measured"):
            raise _field_error("PipeFusionConfig", "balance", self.balance, "'flops' or 'measured'")
