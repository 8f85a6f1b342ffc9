"""``vdopt.report(pipe)``: what ``vdopt.optimize(pipe, ...)`` made of each component."""

from __future__ import annotations

from typing import Any

from vdopt.pipelines.components import AUTOENCODER, DENOISER, classify


def _optimized(component: Any) -> bool:
    return type(component).__module__.startswith("vdopt.")


def _describe(name: str, component: Any, kind: str) -> str:
    cls = type(component).__name__
    if _optimized(component):
        model = component.__dict__.get("_model")
        wrapped = f" of {type(model).__name__}" if model is not None else ""
        mesh = getattr(component, "mesh", None)
        where = f", Mesh({mesh.describe()})" if mesh is not None else ""
        return f"{name}: optimized ({cls}{wrapped}{where})"
    if kind == AUTOENCODER:
        return f"{name}: left in place ({cls}; one device, or no patch-parallel VAE in this vdopt build)"
    if kind == DENOISER:
        return f"{name}: not optimized ({cls})"
    return f"{name}: left in place ({cls})"


def report_pipeline(pipe: Any) -> str:
    """One line per component, then the plan of every optimized component."""
    kinds = classify(pipe)
    components = {name: getattr(pipe, name) for name in kinds}
    lines = [f"vdopt plan for {type(pipe).__name__}:"]
    lines += ["  " + _describe(name, c, kinds[name]) for name, c in components.items()]
    for name, component in components.items():
        if _optimized(component) and callable(getattr(component, "report", None)):
            lines += ["", f"== {name} ==", component.report()]
    return "\n".join(lines)
