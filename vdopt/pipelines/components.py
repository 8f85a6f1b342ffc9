"""What each component of a diffusers pipeline is, for optimizing: denoiser, autoencoder, other.

Found from the components' classes, not from a list of names per pipeline: a denoiser is a
diffusers model from ``diffusers.models.transformers`` or ``diffusers.models.unets`` (so Wan
2.2's ``transformer_2`` is one, and a ControlNet or image encoder is not); an autoencoder is a
module with ``encode`` and ``decode``, which pipelines call instead of ``forward``; anything
else (text encoders, tokenizers, schedulers) is left in place.
"""

from __future__ import annotations

from typing import Any

import torch

DENOISER = "denoiser"
AUTOENCODER = "autoencoder"
OTHER = "other"

DENOISER_PACKAGES = ("diffusers.models.transformers", "diffusers.models.unets")
"""Where diffusers keeps the model classes a pipeline's denoising loop calls."""


def is_pipeline(obj: Any) -> bool:
    """A diffusers ``DiffusionPipeline`` (diffusers is imported only if already loaded)."""
    import sys

    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(obj, diffusers.DiffusionPipeline)


def is_autoencoder(module: Any) -> bool:
    """A module whose callers use ``encode``/``decode`` rather than ``forward`` (a VAE)."""
    return (isinstance(module, torch.nn.Module) and callable(getattr(type(module), "encode", None))
            and callable(getattr(type(module), "decode", None)))


def is_denoiser(module: Any) -> bool:
    from diffusers import ModelMixin

    return (isinstance(module, ModelMixin) and not is_autoencoder(module)
            and type(module).__module__.startswith(DENOISER_PACKAGES))


def classify(pipe: Any) -> dict[str, str]:
    """``{component name: DENOISER | AUTOENCODER | OTHER}`` for every component that is set."""
    kinds = {}
    for name, component in pipe.components.items():
        if component is None:
            continue
        if is_denoiser(component):
            kinds[name] = DENOISER
        elif is_autoencoder(component):
            kinds[name] = AUTOENCODER
        else:
            kinds[name] = OTHER
    return kinds
