"""``LoadedModel``: a loaded artifact that behaves like the saved model (call, reset, report)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from vdopt.artifacts.errors import ArtifactError
from vdopt.artifacts.signature import bind_saved_call, explain_mismatch, signature_record


class _Config(dict):
    """The wrapped model's ``config`` as saved: item and attribute access (like diffusers')."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LoadedModel(torch.nn.Module):
    """A loaded artifact: the saved model's call signature, output structure and step behaviour."""

    def __init__(
        self,
        *,
        root: Path,
        manifest: dict[str, Any],
        mesh: Any,
        plans: list[Any],
        weights: dict[str, torch.Tensor],
        device: torch.device,
        startup_s: float,
    ) -> None:
        super().__init__()
        self.root = root
        self.manifest = manifest
        self.mesh = mesh
        self.plans = plans
        """``LoadedPlan`` per saved input signature."""
        # The packages hold pointers into these tensors (user-managed constants): keep them.
        self._weights = weights
        self._device = device
        self.startup_s = startup_s
        """Seconds ``vdopt.load`` took (checks, weights, packages)."""
        saved_config = manifest.get("config")
        self.config = _Config(saved_config) if saved_config is not None else None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        floats = [t.dtype for t in self._weights.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bind_saved_call(self.manifest["call"], args, kwargs)
        plan = self._plan_for(inputs)
        # Below autograd, not just no_grad: AOTInductor runs with the GIL held, and the functional
        # collectives' autograd kernels are Python, so their tensors get Python objects. A gloo
        # worker thread dropping such a tensor then waits for the GIL while this thread waits
        # for that worker inside the package: a deadlock (seen on 2 gloo ranks, torch 2.13).
        with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
            return plan.program(inputs)

    def _plan_for(self, inputs: dict[str, Any]) -> Any:
        from vdopt.runtime.executable import input_key

        got = signature_record(input_key(inputs))
        for plan in self.plans:
            if plan.inputs == got:
                return plan
        closest = self.plans[0]
        saved = "; ".join(p.signature for p in self.plans)
        raise ArtifactError(
            f"artifact {self.root} was not compiled for these inputs: {explain_mismatch(inputs, got, closest.inputs)}. "
            f"AOT artifacts are specialized to the inputs they were saved with ({saved}): call the optimized "
            "model with these inputs too before opt.save (one plan is saved per input signature), or re-run "
            "`vdopt compile` with these shapes"
        )

    def reset(self) -> None:
        """Start a new generation: clears step state (PAB caches, call counters)."""
        for plan in self.plans:
            plan.program.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str, *args: Any, **kwargs: Any):
        """Accepted for diffusers pipelines; step state is keyed by timestep and call order."""
        yield

    def report(self) -> str:
        m = self.manifest
        degrees = ", ".join(f"{a}={d}" for a, d in m["mesh"]["degrees"].items())
        lines = [
            f"vdopt artifact {self.root}: {m['model']} on Mesh({degrees}), {m['device']['type']} "
            f"({m['device']['name']}), saved {m['created']} with torch {m['versions']['torch']}",
            f"start-up {self.startup_s:.2f} s",
        ]
        for i, plan in enumerate(self.plans, 1):
            lines.append(f"\n== signature {i} ==\ninputs: {plan.signature}")
            lines.append(f"variants: {', '.join(plan.variants)}")
            lines.extend(f"{k}: {v}" for k, v in plan.program.summary().items())
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"path={self.root}, model={self.manifest['model']}, plans={len(self.plans)}"
