"""Capture a model call as an ATen graph with ``torch.export`` (SDPA kept as one node)."""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be exported; the message names the module and the cause."""


def bind_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map a call to ``{parameter name: value}`` so positional and keyword calls agree.

    Defaults are left out: a call that omits an argument and one that passes its default
    capture the same graph because export specializes on the value either way.
    """
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(model).__name__}.forward{sig}: {e}") from None
    arguments = dict(bound.arguments)
    # Fold **kwargs catch-alls (diffusers models take **kwargs) into the top level.
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _module_names_by_id(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): (name or type(model).__name__) for name, m in model.named_modules()}


def _innermost_module(tb: types.TracebackType | None, names: dict[int, str]) -> str | None:
    """The deepest frame of the traceback that runs a submodule's method."""
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = f"{names[id(owner)]} ({type(owner).__name__}, {tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return found


def export_model(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` on keyword inputs, with errors that name the module.

    The exported program is not decomposed further: the training IR keeps
    ``aten.scaled_dot_product_attention`` as one node, which every attention pass relies on
    (the default decomposition table would lower it to matmuls).
    """
    try:
        with torch.no_grad():
            return torch.export.export(model, (), kwargs, strict=False)
    except Exception as e:  # export raises many types; all become one clear error
        where = _innermost_module(e.__traceback__, _module_names_by_id(model))
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        location = f"in module {where}" if where else f"in {type(model).__name__}"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} {location}: "
            f"{type(e).__name__}: {cause}\n{_advice(e)}"
        ) from e


def _advice(error: Exception) -> str:
    text = f"{type(error).__name__} {error}".lower()
    if "data-dependent" in text or "data dependent" in text or "guardondatadependent" in text:
        return (
            "vdopt needs a model torch.export can trace: remove data-dependent Python control "
            "flow (branches on tensor values, .item()) from that module's forward."
        )
    return (
        "The model failed while being traced with these inputs: check that they are what the "
        "model expects (shapes, dtypes, devices), e.g. by calling the model eagerly."
    )


def capture(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """The model call as a ``GraphModule`` with the model's call signature (pytree in/out)."""
    ep = export_model(model, kwargs)
    gm = ep.module()
    log.debug("captured %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm
