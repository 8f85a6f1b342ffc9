"""The public entry points: ``optimize`` and ``inspect``, and the object ``optimize`` returns."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

from vdopt.capture import bind_call, capture
from vdopt.compile import should_compile
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.mesh import Mesh, as_mesh
from vdopt.passes.analysis.attention import analyze
from vdopt.passes.analysis.sites import AttentionSite
from vdopt.passes.order import PipelineOptions
from vdopt.artifacts import save
from vdopt.passes.parallel.cfg_parallel import CFGParallel
from vdopt.pipelines import is_autoencoder, is_pipeline, optimize_pipeline, report_pipeline
from vdopt.planning.auto import AutoPlanned
from vdopt.runtime.cfg_pairing import CFGPairing
from vdopt.runtime.executable import Executable
from vdopt.vae import optimize_vae

KERNEL_CHOICES = ("auto", "triton", "sdpa", "fp8")


class OptimizedModel(Executable):
    """What ``vdopt.optimize`` returns: the executable, plus writing it out as artifacts."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write AOTInductor artifacts (a package per rank and variant, and ``manifest.json``).

        Call it on every rank, after at least one call (artifacts are compiled for the input
        shapes seen). ``vdopt.load(path)`` runs them without the model's code.
        """
        return save(self, path)


def optimize(
    model: torch.nn.Module,
    mesh: Mesh | str | None = None,
    *,
    pab: PABConfig | None = None,
    pipefusion: PipeFusionConfig | None = None,
    kernels: str = "auto",
    example_inputs: tuple[tuple, dict] | None = None,
    disable_passes: Iterable[str] = (),
    compile: bool | None = None,
    training: bool = False,
    checkpoint_blocks: bool = False,
) -> OptimizedModel:
    """Compile ``model`` for ``mesh`` and return a drop-in replacement.

    Args:
        model: a diffusers transformer or any ``nn.Module`` torch.export can capture.
        mesh: parallel degrees, as a ``Mesh`` or a string like ``"ulysses=2,cfg=2"``;
            ``None`` means one device; ``"auto"`` plans the mesh for this world size and
            device (``vdopt.plan``) at the first call (or now, with ``example_inputs``).
        pab: Pyramid Attention Broadcast settings, or ``None`` for none.
        pipefusion: PipeFusion settings (needs ``mesh.pipefusion > 1``).
        kernels: ``"auto"`` lowers an attention site to vdopt's Triton kernels on CUDA only,
            and only where the kernel is measured faster than SDPA for that site's inputs
            (timed once per signature and device, cached in ``~/.cache/vdopt``);
            ``"triton"`` lowers every supported site, ``"sdpa"`` none. ``"fp8"`` (approximate,
            opt-in) lowers every supported site to an fp8 kernel (Q, K, V in e4m3 with
            per-block scales, SageAttention's scheme); it needs compute capability 8.9+
            (L4/L40, H100/H200) and raises a ValueError elsewhere.
        example_inputs: ``(args, kwargs)`` to capture now instead of at the first call.
        disable_passes: names of passes to skip (see ``opt.report()``).
        compile: run the rewritten graphs through Inductor (``torch.compile``); ``None``
            compiles on CUDA only, ``False`` never, ``True`` also on the CPU.
        training: return a module whose outputs support ``backward()``. Every rank computes
            the same loss on the full outputs; after ``backward()`` every rank's parameter
            gradients equal the single-device gradients (averaged over the mesh inside the
            backward pass: do not wrap in DDP). Exact strategies only: PAB, PipeFusion and
            ``kernels="triton"`` are refused. Graphs run eagerly (``compile`` is ignored).
        checkpoint_blocks: with ``training``, recompute each transformer block's
            activations in the backward pass instead of keeping them.
    """
    if is_pipeline(model):
        if example_inputs is not None:
            raise ValueError("example_inputs is for one module; a pipeline's denoisers are captured at their first call")
        options = dict(pab=pab, pipefusion=pipefusion, kernels=kernels, disable_passes=tuple(disable_passes),
                       compile=compile, training=training, checkpoint_blocks=checkpoint_blocks)
        if mesh != "auto":
            mesh = as_mesh(mesh)  # one Mesh (one set of process groups) for every component
        return optimize_pipeline(model, optimize_denoiser=lambda module: optimize_denoiser(module, mesh, options))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"vdopt.optimize needs a torch.nn.Module or a diffusers DiffusionPipeline, got {type(model).__name__}"
        )
    if is_autoencoder(model):
        if pab is not None or pipefusion is not None:
            raise ValueError(f"pab and pipefusion apply to denoisers; {type(model).__name__} is an autoencoder (a VAE)")
        # pipelines call a VAE's decode/encode, never forward: wrapping forward would optimize nothing
        return optimize_vae(model, mesh)
    if isinstance(mesh, str) and mesh == "auto":  # plan for this world size and device, then optimize
        options = dict(pab=pab, kernels=kernels, example_inputs=example_inputs, disable_passes=tuple(disable_passes),
                       compile=compile, training=training, checkpoint_blocks=checkpoint_blocks)
        return AutoPlanned(model, lambda degrees: optimize(
            model, Mesh(**degrees), pipefusion=pipefusion if degrees["pipefusion"] > 1 else None, **options),
            pab=pab, pipefusion=pipefusion, example_inputs=example_inputs)
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}: choose one of {KERNEL_CHOICES}")
    if pab is not None and not isinstance(pab, PABConfig):
        raise TypeError(f"pab must be a vdopt.PABConfig or None, got {type(pab).__name__}")
    mesh = as_mesh(mesh) or Mesh()
    if pipefusion is not None and mesh.pipefusion == 1:
        raise ValueError(f"pipefusion={pipefusion} needs a mesh with pipefusion > 1 (got Mesh({mesh.describe()}))")
    should_compile(compile, "cpu")  # rejects a non-bool now rather than at the first call
    options = PipelineOptions(mesh=mesh, pab=pab, pipefusion=pipefusion, kernels=kernels, compile=compile,
                              training=training, checkpoint_blocks=checkpoint_blocks)
    opt = OptimizedModel(model, mesh, options=options, disable_passes=disable_passes)
    if example_inputs is not None:
        args, kwargs = example_inputs
        opt._plan_for(bind_call(model, tuple(args), dict(kwargs)))
    return opt


def optimize_denoiser(model: torch.nn.Module, mesh: Mesh | str | None, options: dict) -> torch.nn.Module:
    """A denoiser as ``vdopt.optimize(pipe, ...)`` makes it (``options``: ``optimize``'s keywords).

    With ``cfg=2`` it is a ``CFGPairing``: calls that batch cond and uncond are split over the
    cfg axis, and a pipeline's separate cond and uncond calls are paired.
    """
    split = optimize(model, mesh, **options)
    if not isinstance(getattr(split, "mesh", None), Mesh) or split.mesh.cfg == 1:
        return split  # one device, no cfg axis, or mesh="auto" (its mesh is chosen at the first call)
    disabled = (*options["disable_passes"], CFGParallel.name)
    whole = optimize(model, split.mesh, **{**options, "disable_passes": disabled})
    return CFGPairing(split, whole, split.mesh)


def report(obj: Any) -> str:
    """The plan of what ``vdopt.optimize`` returned: a model's, or every component of a pipeline."""
    if is_pipeline(obj):
        return report_pipeline(obj)
    if callable(getattr(obj, "report", None)):
        return obj.report()
    raise TypeError(f"vdopt.report needs what vdopt.optimize returned (a module or a pipeline), got {type(obj).__name__}")


def inspect(model: torch.nn.Module, *args: Any, **kwargs: Any) -> list[AttentionSite]:
    """The attention sites of ``model(*args, **kwargs)``: name, kind, block, heads, lengths."""
    gm = capture(model, bind_call(model, args, kwargs))
    sites, _ = analyze(gm)
    return list(sites)
