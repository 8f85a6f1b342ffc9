"""What a program consists of when saved (kind, step data, graphs) and how it is rebuilt."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import torch

from vdopt.artifacts.errors import ArtifactError

PLAIN_PROGRAM = "graph"
"""Program kind of a plain ``GraphProgram``: one variant, ``main``."""


def program_parts(program: Any) -> tuple[str, dict[str, Any], dict[str, torch.fx.GraphModule]]:
    """``(kind, step data, graphs by variant name)`` of a program, for saving.

    A plain ``GraphProgram`` is kind ``"graph"`` with one variant, ``main``. Any other program
    takes part by implementing ``variants() -> {name: GraphModule}``, ``schedule_spec() ->
    JSON data`` and a classmethod ``from_spec(spec, runners)`` that rebuilds it over loaded
    runners with the graphs' call convention (``vdopt.runtime.pab.PABProgram`` does).
    """
    from vdopt.compile import original_graph
    from vdopt.runtime.executable import GraphProgram

    if isinstance(program, GraphProgram):
        return PLAIN_PROGRAM, {}, {"main": original_graph(program.gm)}
    cls = type(program)
    missing = [m for m in ("variants", "schedule_spec", "from_spec") if not hasattr(cls, m)]
    if missing:
        raise ArtifactError(
            f"{cls.__name__} cannot be saved as AOT artifacts yet (it lacks {', '.join(missing)}); "
            "run it with vdopt.optimize in the process instead"
        )
    graphs = {name: original_graph(gm) for name, gm in program.variants().items()}
    return f"{cls.__module__}:{cls.__qualname__}", program.schedule_spec(), graphs


def rebuild_program(kind: str, spec: Mapping[str, Any], runners: Mapping[str, Callable]) -> Any:
    """The program of a saved plan over loaded runners (inverse of ``program_parts``)."""
    from vdopt.runtime.executable import GraphProgram

    if kind == PLAIN_PROGRAM:
        return GraphProgram(runners["main"])
    module, _, qualname = kind.partition(":")
    if not module.startswith("vdopt.") or not qualname:
        raise ArtifactError(f"unknown program kind {kind!r} in the manifest")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls.from_spec(spec, runners)
