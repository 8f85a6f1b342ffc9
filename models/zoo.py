"""Model zoo registry: named denoisers, their sizes, and ready-to-call example inputs.

``build(name, size)`` returns ``(model, args, kwargs)`` such that ``model(*args, **kwargs)``
runs one denoiser forward. Shapes are given in pixel space (frames, height, width of the
video) and converted per model with its VAE factors, so one request means the same video
for every model. The timestep is always the keyword argument ``timestep``, shape (batch,).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from . import diffusers_models, opensora, opensora_plan

__all__ = ["VideoShape", "ModelSpec", "build", "get_spec", "list_models", "num_tokens"]

# Value of the example timestep: mid-schedule, so no branch sees a degenerate t = 0.
EXAMPLE_TIMESTEP = 500.0


@dataclass(frozen=True, kw_only=True)
class VideoShape:
    """Pixel-space size of one denoiser call."""

    frames: int
    """Video frames before VAE compression."""
    height: int
    """Video height in pixels."""
    width: int
    """Video width in pixels."""
    text_len: int
    """Text-encoder tokens per prompt."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One zoo entry: how to size, build and feed a denoiser."""

    name: str
    """Registry key, e.g. ``"wan"``."""
    description: str
    """What the entry is, including which published checkpoint "full" mirrors."""
    attention: str
    """Self-attention layout: ``"spatial_temporal"`` (separate spatial and temporal blocks),
    ``"full"`` (3D over all video tokens, text via cross-attention) or ``"joint_text"``
    (text tokens concatenated into 3D self-attention)."""
    patch_size: tuple[int, int, int]
    """Latent patch size (t, h, w); latent sizes must be divisible by it."""
    default_shapes: Mapping[str, VideoShape]
    """Default pixel-space shape per size name; its keys are the sizes the entry offers."""
    latent_size: Callable[[int, int, int], tuple[int, int, int]]
    """Pixel (frames, height, width) -> latent (T, H, W) with the model's VAE factors."""
    create: Callable[..., nn.Module]
    """``create(size, *, latent, text_len) -> module`` on the current default device."""
    example_inputs: Callable[..., tuple[tuple, dict]]
    """``example_inputs(model, *, batch, latent, text_len, randn, timestep, text_mask)``."""
    supports_text_mask: bool = False
    """Whether the forward takes ``encoder_attention_mask`` (B, L), 1 = keep."""

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(self.default_shapes)

    def patch_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (T, H, W) after VAE and patchify; raises ValueError if it does not divide."""
        latent = self.latent_size(frames, height, width)
        if min(latent) < 1 or any(n % p for n, p in zip(latent, self.patch_size, strict=True)):
            raise ValueError(
                f"{self.name}: video {frames}x{height}x{width} gives latent {latent}, which "
                f"must be positive and divisible by the patch size {self.patch_size}"
            )
        return tuple(n // p for n, p in zip(latent, self.patch_size, strict=True))


def _shapes(tiny: VideoShape, full: VideoShape) -> Mapping[str, VideoShape]:
    return MappingProxyType({"tiny": tiny, "full": full})


# Tiny defaults give T = 3 latent frames and a 4x6 patch grid (S = 24) with 10 text
# tokens: T, S and L all differ, so a wrong axis in a rewrite shows up as a shape error.
_TINY_4X = VideoShape(frames=9, height=64, width=96, text_len=10)

_REGISTRY: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec(
                name="latte",
                description="Latte-1 text-to-video (diffusers LatteTransformer3DModel)",
                attention="spatial_temporal",
                patch_size=(1, 2, 2),
                default_shapes=_shapes(
                    VideoShape(frames=3, height=64, width=96, text_len=10),
                    VideoShape(frames=16, height=512, width=512, text_len=120),
                ),
                latent_size=diffusers_models.latte_latent_size,
                create=diffusers_models.latte_create,
                example_inputs=diffusers_models.latte_inputs,
            ),
            ModelSpec(
                name="cogvideox",
                description="CogVideoX-2B (diffusers CogVideoXTransformer3DModel)",
                attention="joint_text",
                patch_size=(1, 2, 2),
                default_shapes=_shapes(
                    _TINY_4X, VideoShape(frames=49, height=480, width=720, text_len=226)
                ),
                latent_size=diffusers_models.cogvideox_latent_size,
                create=diffusers_models.cogvideox_create,
                example_inputs=diffusers_models.cogvideox_inputs,
            ),
            ModelSpec(
                name="wan",
                description="Wan2.1-T2V-1.3B (diffusers WanTransformer3DModel)",
                attention="full",
                patch_size=(1, 2, 2),
                default_shapes=_shapes(
                    _TINY_4X, VideoShape(frames=81, height=480, width=832, text_len=512)
                ),
                latent_size=diffusers_models.wan_latent_size,
                create=diffusers_models.wan_create,
                example_inputs=diffusers_models.wan_inputs,
            ),
            ModelSpec(
                name="opensora",
                description="Open-Sora 1.2 STDiT3-XL/2 (vdopt's own implementation)",
                attention="spatial_temporal",
                patch_size=(1, 2, 2),
                default_shapes=_shapes(
                    _TINY_4X, VideoShape(frames=102, height=480, width=848, text_len=300)
                ),
                latent_size=opensora.latent_size,
                create=opensora.create,
                example_inputs=opensora.example_inputs,
                supports_text_mask=True,
            ),
            ModelSpec(
                name="opensora_plan",
                description="Open-Sora-Plan v1.3 OpenSoraT2V-2B/122 (vdopt's own implementation)",
                attention="full",
                patch_size=(1, 2, 2),
                default_shapes=_shapes(
                    _TINY_4X, VideoShape(frames=93, height=352, width=640, text_len=512)
                ),
                latent_size=opensora_plan.latent_size,
                create=opensora_plan.create,
                example_inputs=opensora_plan.example_inputs,
                supports_text_mask=True,
            ),
        )
    }
)


def list_models() -> list[str]:
    """Names accepted by ``build``."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def build(
    name: str,
    size: str = "tiny",
    *,
    batch: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    text_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    text_mask: bool = False,
) -> tuple[nn.Module, tuple, dict]:
    """Build zoo model ``name`` at ``size`` with seeded random weights and example inputs.

    Shapes default to ``get_spec(name).default_shapes[size]``; ``batch`` defaults to 1
    (2 is a batched CFG pair). ``text_mask=True`` adds an ``encoder_attention_mask``
    (B, L), 1 = keep, that pads out a different number of trailing tokens of each prompt
    (models with ``supports_text_mask`` only). ``device="meta"`` allocates nothing (for
    counting parameters). Weights are created on the CPU and moved, so they do not depend
    on ``device``; the global RNG state is left untouched. Returns ``(model, args, kwargs)``
    with the model in eval mode; ``model(*args, **kwargs)`` returns a 1-tuple ``(sample,)``.
    """
    spec = get_spec(name)
    if size not in spec.default_shapes:
        raise ValueError(f"{name}: unknown size {size!r}; known: {', '.join(spec.sizes)}")
    default = spec.default_shapes[size]
    batch = 1 if batch is None else batch
    frames = default.frames if frames is None else frames
    height = default.height if height is None else height
    width = default.width if width is None else width
    text_len = default.text_len if text_len is None else text_len
    for arg, value in (
        ("batch", batch),
        ("frames", frames),
        ("height", height),
        ("width", width),
        ("text_len", text_len),
    ):
        if value < 1:
            raise ValueError(f"{name}: {arg} must be positive, got {value}")
    if text_mask and not spec.supports_text_mask:
        raise ValueError(f"{name}: the model takes no text mask (text_mask=True)")
    spec.patch_grid(frames, height, width)  # validates divisibility
    latent = spec.latent_size(frames, height, width)
    device = torch.device(device)
    meta = device.type == "meta"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta" if meta else "cpu"):
            model = spec.create(size, latent=latent, text_len=text_len)
    _cast_floating(model, dtype)
    model = model.to(device).eval()

    generator = torch.Generator().manual_seed(seed + 1)

    def randn(*shape: int) -> torch.Tensor:
        if meta:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    timestep = torch.full((batch,), EXAMPLE_TIMESTEP, device=device)
    mask = None
    if text_mask:
        # Sample b drops its last (b + 1) * step tokens: every prompt is padded, each by a
        # different amount, and each keeps more than half of its tokens.
        step = max(1, text_len // (2 * batch + 2))
        keep = [max(1, text_len - (b + 1) * step) for b in range(batch)]
        mask = (torch.arange(text_len)[None, :] < torch.tensor(keep)[:, None]).to(torch.int64)
        mask = mask.to(device)
    args, kwargs = spec.example_inputs(
        model,
        batch=batch,
        latent=latent,
        text_len=text_len,
        randn=randn,
        timestep=timestep,
        text_mask=mask,
    )
    return model, args, kwargs


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to ``dtype`` like diffusers' ``from_pretrained``.

    Tensors under a module named in ``_keep_in_fp32_modules`` stay float32 (Wan keeps its
    norms, time embedder and modulation tables there); ``model.to(dtype)`` would cast them
    and diffusers warns about exactly that.
    """
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for module_name, module in model.named_modules():
        # Replace the tensors rather than assign ``.data``: a buffer that is a view (diffusers'
        # positional tables are ``unsqueeze`` views) would keep its float32 base, which
        # torch.export refuses ("torch.float32 != torch.bfloat16").
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                full_name = f"{module_name}.{name}" if module_name else name
                target = torch.float32 if any(k in full_name.split(".") for k in keep) else dtype
                if tensor.dtype == target:
                    continue
                cast = tensor.detach().to(target).clone()
                table[name] = nn.Parameter(cast, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else cast


def num_tokens(name: str, frames: int, height: int, width: int) -> int:
    """Video tokens (T*H*W after patchify) of a pixel-space shape."""
    return math.prod(get_spec(name).patch_grid(frames, height, width))
