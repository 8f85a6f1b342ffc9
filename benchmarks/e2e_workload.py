"""The end-to-end benchmark's workload: the model, its inputs and one generation.

The loop is WanPipeline's: the timesteps of diffusers' ``UniPCMultistepScheduler`` (flow
prediction, shift 3.0, as Wan2.1 ships it), per step a cond and an uncond call (each inside
``cache_context("cond"/"uncond")``), classifier-free guidance 5.0, ``scheduler.step``.
Every worker process of ``e2e.py`` builds the same seeded model and inputs from one
``BenchConfig``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import harness

METHODS = ("diffusers_eager", "diffusers_compile", "diffusers_pab", "vdopt", "vdopt_pab", "vdopt_pab_triton")
"""The single-process methods, in table order."""

MID_WAN = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, ffn_dim=512, text_dim=256, freq_dim=256)
"""Overrides of Wan2.1-1.3B's config for the CPU default: every switch of the published
config (rotary 3D attention, qk RMS norm, cross-attention norm) at 4 layers of width 128."""

PAB_WAN = dict(spatial_range=2, temporal_range=None, cross_range=6,
               spatial_window=(100, 800), cross_window=(100, 800))
"""PAB for Wan2.1 as the diffusers-hook baseline runs it: spatial attention recomputed every
2nd call and cross-attention every 6th while the timestep is inside (100, 800)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark run (every worker gets the same one)."""

    full: bool = False
    """Wan2.1-T2V-1.3B's published config instead of the mid-size one."""
    layers: int = 4
    """Transformer blocks of the mid-size config."""
    frames: int = 17
    """Video frames (pixel space; the Wan VAE makes (frames - 1) / 4 + 1 latent frames)."""
    height: int = 128
    """Video height in pixels (latent / 8, tokens / 16)."""
    width: int = 128
    """Video width in pixels."""
    text_len: int = 64
    """Prompt tokens."""
    steps: int = 50
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale; 1.0 makes one call per step."""
    repeats: int = 2
    """Timed generations per method after the warm-up one (the best is reported)."""
    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    dtype: str = "float32"
    """Weights and activations."""
    threads: int = 0
    """CPU threads per process (0: every core; divided among the ranks of a mesh)."""
    seed: int = 0
    """Weights and latents."""

    @property
    def name(self) -> str:
        if self.full:
            return f"wan1.3b_{self.frames}x{self.height}x{self.width}"
        return f"wan-mid{self.layers}_{self.frames}x{self.height}x{self.width}"


def wan_config(cfg: BenchConfig) -> dict[str, Any]:
    from vdopt.models.diffusers_models import WAN_CONFIGS

    config = dict(WAN_CONFIGS["full"])
    if not cfg.full:
        config.update(MID_WAN, num_layers=cfg.layers)
    return config


def make_inputs(cfg: BenchConfig):
    """``(latents, prompt_embeds, negative_embeds)``, seeded, on ``cfg.device``."""
    import torch

    from vdopt.models.diffusers_models import wan_latent_size

    config = wan_config(cfg)
    dtype = getattr(torch, cfg.dtype)
    T, H, W = wan_latent_size(cfg.frames, cfg.height, cfg.width)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    latents = torch.randn(1, config["in_channels"], T, H, W, generator=g).to(cfg.device)
    prompt = torch.randn(1, cfg.text_len, config["text_dim"], generator=g).to(cfg.device, dtype)
    negative = torch.randn(1, cfg.text_len, config["text_dim"], generator=g).to(cfg.device, dtype)
    return latents, prompt, negative


def build(cfg: BenchConfig):
    """``(model, latents, prompt_embeds, negative_embeds)``, seeded, on ``cfg.device``."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = WanTransformer3DModel(**wan_config(cfg))  # created on the CPU: same weights on every device
    model = model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)).eval()
    return (model, *make_inputs(cfg))


def scheduler():
    """Wan2.1's scheduler as diffusers ships it (flow prediction, shift 3.0 for 480p)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=3.0)


def _context(fn: Any, name: str):
    ctx = getattr(fn, "cache_context", None)
    return ctx(name) if ctx is not None else contextlib.nullcontext()


def generate(fn: Callable, cfg: BenchConfig, latents, prompt, negative, clock: dict, on_first: Callable[[], None]):
    """One generation: ``(seconds, final latents)``. ``on_first`` runs after the first output."""
    import torch

    sched = scheduler()
    sched.set_timesteps(cfg.steps, device=latents.device)
    x = latents.clone()
    dtype = prompt.dtype
    harness.sync(cfg.device)
    start = time.perf_counter()
    with torch.no_grad():
        for t in sched.timesteps:
            clock["t"] = int(t)
            ts = t.expand(x.shape[0])
            with _context(fn, "cond"):
                cond = fn(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=prompt, return_dict=False)[0]
            on_first()
            if cfg.guidance > 1.0:
                with _context(fn, "uncond"):
                    uncond = fn(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=negative, return_dict=False)[0]
                cond = uncond + cfg.guidance * (cond - uncond)
            x = sched.step(cond.float(), t, x, return_dict=False)[0]
    harness.sync(cfg.device)
    return time.perf_counter() - start, x


def pab_config():
    import vdopt

    return vdopt.PABConfig(**PAB_WAN)


def diffusers_pab(model, clock: dict):
    """``model`` with diffusers' PAB hook (in place) and the hook registry's reset."""
    from diffusers import apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    apply_pyramid_attention_broadcast(model, pab_config().to_diffusers(lambda: clock["t"]))
    return model, lambda: HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
