"""``vdopt.optimize(pipe, mesh, ...)``: optimize a diffusers pipeline's components in place.

Every denoiser is replaced by what ``optimize_denoiser`` returns (the api layer passes
``vdopt.optimize`` for one module, or, with ``cfg=2``, a ``CFGPairing`` that also serves
pipelines calling the denoiser separately for cond and uncond). Autoencoders are replaced by
``vdopt.vae.optimize_vae`` (patch parallel) when the mesh has more than one rank. Text encoders, tokenizers
and the scheduler stay. The pipeline object itself is returned, its components replaced
(``pipe.transformer = ...`` as a user would): its code is not changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vdopt.mesh import Mesh
from vdopt.pipelines.components import AUTOENCODER, DENOISER, classify
from vdopt.vae import optimize_vae


def optimize_pipeline(pipe: Any, *, optimize_denoiser: Callable[[torch.nn.Module], torch.nn.Module]) -> Any:
    """Replace ``pipe``'s denoisers and VAE with optimized ones; returns ``pipe``.

    The VAE gets the mesh the denoisers were optimized for (``optimize_denoiser`` resolves it).
    """
    kinds = classify(pipe)
    denoisers = [name for name, kind in kinds.items() if kind == DENOISER]
    if not denoisers:
        found = ", ".join(f"{n} ({type(getattr(pipe, n)).__name__})" for n in kinds) or "none"
        raise ValueError(
            f"{type(pipe).__name__} has no denoiser vdopt can optimize (a diffusers transformer or UNet "
            f"component); its components: {found}. Optimize the denoiser module itself with vdopt.optimize(module)"
        )
    for name in denoisers:
        setattr(pipe, name, optimize_denoiser(getattr(pipe, name)))
    mesh = getattr(getattr(pipe, denoisers[0]), "mesh", None)
    # one device: nothing to split; mesh="auto" (no Mesh yet, chosen at the first call): the VAE stays
    if isinstance(mesh, Mesh) and mesh.size > 1:
        for name, kind in kinds.items():
            if kind == AUTOENCODER:
                setattr(pipe, name, optimize_vae(getattr(pipe, name), mesh))
    return pipe
