"""The saved call: the model's parameters, each plan's input leaves, and how a call differs."""

from __future__ import annotations

import ast
import inspect as pyinspect
import re
from typing import Any, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree


class _SavedDefault:
    """Stands in for a parameter default: defaults are left out of bound calls (see ``bind_call``)."""

    def __repr__(self) -> str:
        return "<default>"


_HAS_DEFAULT = _SavedDefault()


def call_signature(model: torch.nn.Module) -> list[dict[str, Any]]:
    """``model.forward``'s parameters (name, kind, whether it has a default) for the manifest."""
    return [
        {"name": p.name, "kind": p.kind.name, "has_default": p.default is not pyinspect.Parameter.empty}
        for p in pyinspect.signature(model.forward).parameters.values()
    ]


def _signature_from(params: Sequence[Mapping[str, Any]]) -> pyinspect.Signature:
    return pyinspect.Signature([
        pyinspect.Parameter(
            p["name"], getattr(pyinspect.Parameter, p["kind"]),
            default=_HAS_DEFAULT if p["has_default"] else pyinspect.Parameter.empty,
        )
        for p in params
    ])


def bind_saved_call(params: Sequence[Mapping[str, Any]], args: tuple, kwargs: dict) -> dict[str, Any]:
    """``vdopt.capture.bind_call`` against a saved signature (no model object needed)."""
    sig = _signature_from(params)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"forward{sig}: {e}") from None
    arguments = dict(bound.arguments)
    for p in params:
        if p["kind"] == "VAR_KEYWORD" and p["name"] in arguments:
            arguments.update(arguments.pop(p["name"]))
    return arguments


def signature_record(key: tuple) -> dict[str, Any]:
    """JSON form of ``vdopt.runtime.executable.input_key``: the pytree structure and every leaf."""
    structure, leaf_keys = key
    leaves = []
    for leaf in leaf_keys:
        if leaf[0] == "tensor":
            _, shape, dtype, device = leaf
            leaves.append({"dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "device": device})
        else:
            leaves.append({"type": leaf[1], "value": repr(leaf[2])})
    return {"structure": structure, "leaves": leaves}


def _argument_names(structure: str) -> list[str] | None:
    """The argument names of a saved call, read from its input structure (``str(TreeSpec)``)."""
    match = re.match(r"TreeSpec\(dict, (\[[^\]]*\])", structure)
    try:
        return list(ast.literal_eval(match.group(1))) if match else None
    except (ValueError, SyntaxError):
        return None


def _leaf_text(leaf: Mapping[str, Any]) -> str:
    if "dtype" in leaf:
        return f"{leaf['dtype']}{leaf['shape']} on {leaf['device']}"
    return f"{leaf['type']} {leaf['value']}"


def explain_mismatch(inputs: Mapping[str, Any], got: Mapping[str, Any], saved: Mapping[str, Any]) -> str:
    """How a call's inputs differ from a saved plan's (``signature_record`` of each)."""
    from vdopt.runtime.executable import describe_inputs

    if got["structure"] != saved["structure"] or len(got["leaves"]) != len(saved["leaves"]):
        names = _argument_names(saved["structure"])
        if names is not None and list(inputs) != names:
            extra = [f"{k}={describe_inputs({k: inputs[k]}).partition('=')[2]}" for k in inputs if k not in names]
            missing = [k for k in names if k not in inputs]
            parts = ([f"passes {', '.join(extra)}, which the saved call did not"] if extra else []) + (
                [f"does not pass {', '.join(missing)}, which the saved call did"] if missing else [])
            if parts:
                return "this call " + " and ".join(parts)
        return f"got {describe_inputs(dict(inputs))}"
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(dict(inputs))[0]]
    lines = [
        f"input {path}: got {_leaf_text(g)}, saved for {_leaf_text(s)}"
        for path, g, s in zip(paths, got["leaves"], saved["leaves"])
        if g != s
    ]
    return "; ".join(lines[:4]) + ("; ..." if len(lines) > 4 else "")
