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
from vdopt.runtime.executable import Executable

KERNEL_CHOICES = ("auto", "triton", "sdpa")


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
) -> OptimizedModel:
    """Compile ``model`` for ``mesh`` and return a drop-in replacement.

    Args:
        model: a diffusers transformer or any ``nn.Module`` torch.export can capture.
        mesh: parallel degrees, as a ``Mesh`` or a string like ``"ulysses=2,cfg=2"``;
            ``None`` means one device.
        pab: Pyramid Attention Broadcast settings, or ``None`` for none.
        pipefusion: PipeFusion settings (needs ``mesh.pipefusion > 1``).
        kernels: ``"auto"`` lowers an attention site to vdopt's Triton kernels on CUDA only,
            and only where the kernel is measured faster than SDPA for that site's inputs
            (timed once per signature and device, cached in ``~/.cache/vdopt``);
            ``"triton"`` lowers every supported site, ``"sdpa"`` none.
        example_inputs: ``(args, kwargs)`` to capture now instead of at the first call.
        disable_passes: names of passes to skip (see ``opt.report()``).
        compile: run the rewritten graphs through Inductor (``torch.compile``); ``None``
            compiles on CUDA only, ``False`` never, ``True`` also on the CPU.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"vdopt.optimize needs a torch.nn.Module, got {type(model).__name__}")
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}: choose one of {KERNEL_CHOICES}")
    if pab is not None and not isinstance(pab, PABConfig):
        raise TypeError(f"pab must be a vdopt.PABConfig or None, got {type(pab).__name__}")
    mesh = as_mesh(mesh) or Mesh()
    if pipefusion is not None and mesh.pipefusion == 1:
        raise ValueError(f"pipefusion={pipefusion} needs a mesh with pipefusion > 1 (got Mesh({mesh.describe()}))")
    should_compile(compile, "cpu")  # rejects a non-bool now rather than at the first call
    options = PipelineOptions(mesh=mesh, pab=pab, pipefusion=pipefusion, kernels=kernels, compile=compile)
    opt = OptimizedModel(model, mesh, options=options, disable_passes=disable_passes)
    if example_inputs is not None:
        args, kwargs = example_inputs
        opt._plan_for(bind_call(model, tuple(args), dict(kwargs)))
    return opt


def inspect(model: torch.nn.Module, *args: Any, **kwargs: Any) -> list[AttentionSite]:
    """The attention sites of ``model(*args, **kwargs)``: name, kind, block, heads, lengths."""
    gm = capture(model, bind_call(model, args, kwargs))
    sites, _ = analyze(gm)
    return list(sites)
