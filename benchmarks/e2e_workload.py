"""The end-to-end benchmark's workload: the model, its inputs and one generation.

The loop is WanPipeline's: the timesteps of diffusers' ``UniPCMultistepScheduler`` (flow
prediction, shift 3.0, as Wan2.1 ships it), per step a cond and an uncond call (each inside
``cache_context("cond"/"uncond")``), classifier-free guidance 5.0, ``scheduler.step``.
Every worker process of ``e2e.py`` builds the same seeded model and inputs from one
``BenchConfig``.

``--model`` picks the family (``FAMILIES``): Wan2.1 (the default), Latte-1 or CogVideoX,
each a diffusers model at its published configuration shrunk to a mid size for the CPU.
Every family runs the same loop (Latte's learned-sigma channels are dropped from its
prediction), so each method makes the same calls with the same inputs as eager.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import harness

METHODS = ("diffusers_eager", "diffusers_compile", "diffusers_pab", "vdopt_eager", "vdopt", "vdopt_pab",
           "vdopt_pab_triton")
"""The single-process methods, in table order."""

MID_WAN = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, ffn_dim=512, text_dim=256, freq_dim=256)
"""Overrides of Wan2.1-1.3B's config for the CPU default: every switch of the published
config (rotary 3D attention, qk RMS norm, cross-attention norm) at 4 layers of width 128."""

MID = {
    "wan": MID_WAN,
    "latte": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
                  caption_channels=256),
    "cogvideox": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, time_embed_dim=128,
                      text_embed_dim=256),
}
"""Per family, the overrides of its published config (``vdopt.models.diffusers_models``) for
the CPU size: width 128 (4 heads x 32), 256-dim text embeddings, ``--layers`` blocks."""

FAMILIES = {
    "wan": "Wan2.1-T2V-1.3B (WanTransformer3DModel: full 3D attention, text by cross-attention)",
    "latte": "Latte-1 (LatteTransformer3DModel: alternating spatial and temporal blocks)",
    "cogvideox": "CogVideoX-2B (CogVideoXTransformer3DModel: text tokens joined into 3D attention)",
}
"""``--model`` choices: the zoo family and the published checkpoint its full config mirrors."""

PAB_WAN = dict(spatial_range=2, temporal_range=None, cross_range=6,
               spatial_window=(100, 800), cross_window=(100, 800))
"""PAB for Wan2.1 as the diffusers-hook baseline runs it: spatial attention recomputed every
2nd call and cross-attention every 6th while the timestep is inside (100, 800)."""

PAB_SETTINGS = {"wan": PAB_WAN, "cogvideox": PAB_WAN,
                "latte": dict(PAB_WAN, temporal_range=4, temporal_window=(100, 800))}
"""PAB per family: Wan's, plus temporal attention every 4th call where the model has it."""


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
    model: str = "wan"
    """The model family (``FAMILIES``)."""
    clock: str = "wall"
    """What a generation's seconds are: ``wall`` time, or ``cpu``, this process's CPU time
    (with one thread, robust to other processes on a shared machine; a mesh always uses wall)."""

    @property
    def name(self) -> str:
        if self.full:
            return f"{_FULL_NAMES[self.model]}_{self.frames}x{self.height}x{self.width}"
        return f"{self.model}-mid{self.layers}_{self.frames}x{self.height}x{self.width}"


_FULL_NAMES = {"wan": "wan1.3b", "latte": "latte1", "cogvideox": "cogvideox2b"}


def family_config(cfg: BenchConfig) -> dict[str, Any]:
    """The diffusers config of ``cfg.model``: published, or shrunk to the mid size."""
    from vdopt.models import diffusers_models as zoo

    if cfg.model not in FAMILIES:
        raise ValueError(f"--model {cfg.model!r}: choose one of {', '.join(FAMILIES)}")
    config = dict(getattr(zoo, f"{cfg.model.upper()}_CONFIGS")["full"])
    if not cfg.full:
        config.update(MID[cfg.model], num_layers=cfg.layers)
    T, H, W = latent_size(cfg)
    if cfg.model == "latte":  # a temporal position table of exactly T frames
        config.update(video_length=T, sample_size=max(H, W))
    elif cfg.model == "cogvideox":  # its sin-cos table is built for these sizes and text length
        config.update(sample_frames=(T - 1) * config["temporal_compression_ratio"] + 1, sample_height=H,
                      sample_width=W, max_text_seq_length=cfg.text_len)
    return config


def wan_config(cfg: BenchConfig) -> dict[str, Any]:
    return family_config(dataclasses.replace(cfg, model="wan"))


def latent_size(cfg: BenchConfig) -> tuple[int, int, int]:
    """Latent (T, H, W) of the video with the family's VAE factors."""
    from vdopt.models.zoo import get_spec

    return get_spec(cfg.model).latent_size(cfg.frames, cfg.height, cfg.width)


def tokens_per_call(cfg: BenchConfig) -> int:
    """Video tokens of one call (patches of 1x2x2 in every family here)."""
    T, H, W = latent_size(cfg)
    return T * (H // 2) * (W // 2)


def make_inputs(cfg: BenchConfig):
    """``(latents, prompt_embeds, negative_embeds)``, seeded, on ``cfg.device``."""
    import torch

    config = family_config(cfg)
    text_dim = config.get("text_dim") or config.get("caption_channels") or config["text_embed_dim"]
    dtype = getattr(torch, cfg.dtype)
    T, H, W = latent_size(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    # CogVideoX latents are frame-major (B, T, C, H, W); the others (B, C, T, H, W)
    shape = (1, T, config["in_channels"], H, W) if cfg.model == "cogvideox" else (1, config["in_channels"], T, H, W)
    latents = torch.randn(*shape, generator=g).to(cfg.device)
    prompt = torch.randn(1, cfg.text_len, text_dim, generator=g).to(cfg.device, dtype)
    negative = torch.randn(1, cfg.text_len, text_dim, generator=g).to(cfg.device, dtype)
    return latents, prompt, negative


def build(cfg: BenchConfig):
    """``(model, latents, prompt_embeds, negative_embeds)``, seeded, on ``cfg.device``."""
    import diffusers
    import torch

    cls = {"wan": diffusers.WanTransformer3DModel, "latte": diffusers.LatteTransformer3DModel,
           "cogvideox": diffusers.CogVideoXTransformer3DModel}[cfg.model]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = cls(**family_config(cfg))  # created on the CPU: same weights on every device
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
    """One generation: ``(wall seconds, CPU seconds of this process, final latents)``.

    ``on_first`` runs after the first output.
    """
    import torch

    sched = scheduler()
    sched.set_timesteps(cfg.steps, device=latents.device)
    x = latents.clone()
    dtype = prompt.dtype
    channels = 2 if cfg.model == "cogvideox" else 1  # the latent's channel dim

    def predict(prompt_embeds):
        out = fn(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        return out.narrow(channels, 0, x.shape[channels])  # Latte: drop the learned-sigma channels

    harness.sync(cfg.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for t in sched.timesteps:
            clock["t"] = int(t)
            ts = t.expand(x.shape[0])
            with _context(fn, "cond"):
                cond = predict(prompt)
            on_first()
            if cfg.guidance > 1.0:
                with _context(fn, "uncond"):
                    uncond = predict(negative)
                cond = uncond + cfg.guidance * (cond - uncond)
            x = sched.step(cond.float(), t, x, return_dict=False)[0]
    harness.sync(cfg.device)
    return time.perf_counter() - start, time.process_time() - start_cpu, x


def pab_settings(cfg: BenchConfig) -> dict[str, Any]:
    """The PAB ranges and windows of ``cfg.model`` (``PAB_SETTINGS``)."""
    return PAB_SETTINGS[cfg.model]


def pab_config(cfg: BenchConfig):
    import vdopt

    return vdopt.PABConfig(**pab_settings(cfg))


def diffusers_pab(model, cfg: BenchConfig, clock: dict):
    """``model`` with diffusers' PAB hook (in place) and the hook registry's reset."""
    from diffusers import apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    identifiers = {}
    if cfg.model == "latte":  # diffusers' default spatial identifiers also match the temporal blocks
        identifiers = {
            "spatial_attention_block_identifiers": (r"^transformer_blocks\.",),
            "temporal_attention_block_identifiers": (r"^temporal_transformer_blocks\.",),
            "cross_attention_block_identifiers": (r"^transformer_blocks\.",),
        }
    apply_pyramid_attention_broadcast(model, pab_config(cfg).to_diffusers(lambda: clock["t"], **identifiers))
    return model, lambda: HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
