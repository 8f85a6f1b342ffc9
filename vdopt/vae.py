"""``vdopt.optimize_vae``: a VAE whose decode and encode run patch-parallel over every rank.

The VAE's ``decode`` (and ``encode``) is captured per input signature, rewritten by the
``patch_parallel`` pass (``passes/patch_parallel``: the image's height cut over the ranks,
convolution halos and norm statistics exchanged) and run on every rank; every rank returns
the full output, equal to the unoptimized VAE's. No per-class code: any VAE whose decode
``torch.export`` can capture is handled the same way. The user's VAE is never modified.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from vdopt.capture import capture
from vdopt.mesh import AxisGroup, Mesh, as_mesh
from vdopt.passes.base import PassContext
from vdopt.passes.patch_parallel.rewrite import PatchParallel
from vdopt.passes.runner import run_passes
from vdopt.runtime.report import render_report
from vdopt.runtime.executable import GraphProgram, describe_inputs, input_key, model_device
from vdopt.runtime.plan import Plan

log = logging.getLogger(__name__)

SPLITS = ("height",)


class _Decode(torch.nn.Module):
    """``vae.decode(...)``'s sample, for capture (the VAE is a submodule, not changed)."""

    def __init__(self, vae: torch.nn.Module, constants: dict[str, Any]) -> None:
        super().__init__()
        self.vae = vae
        self.constants = constants

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(**tensors, **self.constants, return_dict=False)[0]


class _Encode(torch.nn.Module):
    """``vae.encode(...)``'s latent distribution as its parameters tensor, for capture."""

    def __init__(self, vae: torch.nn.Module, constants: dict[str, Any], on_type: Callable[[type], None]) -> None:
        super().__init__()
        self.vae = vae
        self.constants = constants
        # Told the type of encode's first output when it wraps a parameters tensor (the
        # distribution), so calls rebuild the same object. A callback, because export
        # restores module attributes assigned while tracing.
        self.on_type = on_type

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(**tensors, **self.constants, return_dict=False)[0]
        if isinstance(getattr(out, "parameters", None), torch.Tensor):
            self.on_type(type(out))
            return out.parameters
        return out


class PatchParallelVAE:
    """Drop-in for a diffusers VAE: ``decode`` / ``encode`` with the VAE's signatures and
    outputs, computed patch-parallel; any other attribute is the VAE's."""

    def __init__(self, vae: torch.nn.Module, mesh: Mesh | str | None = None, *, split: str = "height") -> None:
        if split not in SPLITS:
            raise ValueError(f"optimize_vae(split={split!r}): only {', '.join(map(repr, SPLITS))} is supported")
        mesh = as_mesh(mesh) or Mesh()
        self.__dict__.update(_vae=vae, mesh=mesh, split=split, _plans={}, _result_types={})

    # -- the VAE's API ------------------------------------------------------------------
    def decode(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        sample = self._run("decode", args, kwargs)
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)

    def encode(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        params = self._run("encode", args, kwargs)
        result_type = self._result_types.get("encode")
        latent = result_type(params) if result_type is not None else params
        if not return_dict:
            return (latent,)
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        return AutoencoderKLOutput(latent_dist=latent)

    # -- plans --------------------------------------------------------------------------
    def _run(self, method: str, args: tuple, kwargs: dict) -> torch.Tensor:
        sig = inspect.signature(getattr(self._vae, method))
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self._vae).__name__}.{method}{sig}: {e}") from None
        arguments = {k: v for k, v in bound.arguments.items() if k != "return_dict"}
        tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
        constants = {k: v for k, v in arguments.items() if not isinstance(v, torch.Tensor)}
        key = (method, input_key(arguments))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build(method, tensors, constants)
            self._plans[key] = plan
        with torch.no_grad():
            return plan.program(tensors)

    def _group(self) -> AxisGroup:
        """Every rank of the mesh shares one image, whatever its degrees name."""
        self.mesh.ensure_process_group(model_device(self._vae))
        return AxisGroup(axis="world", group_name=dist.group.WORLD.group_name,
                         size=dist.get_world_size(), rank=dist.get_rank())

    def _build(self, method: str, tensors: dict, constants: dict) -> Plan:
        seen: list[type] = []
        wrapper = _Decode(self._vae, constants) if method == "decode" else _Encode(self._vae, constants, seen.append)
        start = time.perf_counter()
        gm = capture(wrapper, tensors)
        capture_s = time.perf_counter() - start
        if method == "encode":
            self._result_types[method] = seen[0] if seen else None
        records = []
        if self.mesh.size > 1:
            ctx = PassContext(mesh=self.mesh, device=model_device(self._vae))
            gm, records = run_passes(gm, ctx, [PatchParallel(group=self._group())])
        return Plan(
            signature=f"{method}({describe_inputs({**tensors, **constants})})",
            layout=None,
            sites=(),
            passes=records,
            capture_s=capture_s,
            passes_s=time.perf_counter() - start - capture_s,
            program=GraphProgram(gm),
        )

    # -- introspection ------------------------------------------------------------------
    @property
    def plans(self) -> list[Plan]:
        """The plans built so far, one per method and input signature."""
        return list(self._plans.values())

    def report(self) -> str:
        return render_report(f"{type(self._vae).__name__} (patch parallel)", self.mesh, self.plans)

    @property
    def dtype(self) -> torch.dtype:
        return self._vae.dtype

    @property
    def device(self) -> torch.device:
        return self._vae.device

    @property
    def config(self) -> Any:
        return self._vae.config

    def __getattr__(self, name: str) -> Any:
        # only reached for names not defined here: the VAE's own attributes and methods
        return getattr(self.__dict__["_vae"], name)

    def __repr__(self) -> str:
        return f"PatchParallelVAE({type(self._vae).__name__}, mesh=({self.mesh.describe()}), plans={len(self._plans)})"


def optimize_vae(vae: torch.nn.Module, mesh: Mesh | str | None = None, *, split: str = "height") -> PatchParallelVAE:
    """``vae`` with ``decode`` and ``encode`` run patch-parallel over every rank of ``mesh``.

    ``mesh=None`` is one device (the captured graph, unchanged). Any mesh uses all its ranks
    for the image, whatever degrees it names. ``split="height"`` cuts the image's rows.
    """
    return PatchParallelVAE(vae, mesh, split=split)
