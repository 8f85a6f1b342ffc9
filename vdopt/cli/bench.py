"""``vdopt bench``: the end-to-end benchmark (``benchmarks/e2e.py`` of the source checkout).

By default a few minutes on the CPU at a mid-size Wan configuration; ``--full`` runs the
ANCHORS.md configuration (Wan2.1-1.3B, 81x480x832, bf16) on a GPU. Every option of
``benchmarks/e2e.py`` is accepted; ``vdopt bench --help`` lists them. The harness module
imports torch only when it runs, so registering the command stays cheap.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def harness() -> ModuleType:
    """``benchmarks/e2e.py`` of the checkout vdopt runs from."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e.py"
    if not path.is_file():
        raise ValueError(
            f"vdopt bench runs the harness of a source checkout ({path} is missing): "
            "install vdopt from its repository (pip install -e .) to benchmark"
        )
    spec = importlib.util.spec_from_file_location("vdopt_benchmarks_e2e", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return module


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end denoising benchmark: diffusers vs vdopt side by side")
    try:
        module = harness()
    except ValueError as e:
        p.set_defaults(func=functools.partial(_missing, e))
        return
    module.add_arguments(p)
    p.set_defaults(func=functools.partial(_run, module))


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    module.run(args)
    return 0


def _missing(error: ValueError, args: argparse.Namespace) -> int:
    raise error
