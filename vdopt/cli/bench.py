"""``vdopt bench``: the end-to-end benchmark (``benchmarks/e2e.py`` of the source checkout).

By default a few minutes on the CPU at a mid-size Wan configuration; ``--quick`` is a smoke
run of under a minute; ``--full`` runs Wan2.1-T2V-1.3B at 81x480x832 in bfloat16 on a GPU.
Results go to ``--out`` (default ``./vdopt-results`` in the current directory), never to the
committed ``benchmarks/results/`` unless named. Every option of ``benchmarks/e2e.py`` is
accepted; ``vdopt bench --help`` lists them. The benchmark modules import torch only when
they run, so registering the command stays cheap.
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
        saved_path = list(sys.path)
        try:
            spec.loader.exec_module(module)
        finally:
            # e2e.py puts benchmarks/ first on sys.path to import its siblings; they are
            # loaded now, so the folder's generic module names stop shadowing anything else.
            sys.path[:] = saved_path
    return module


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end denoising benchmark: diffusers and vdopt side by side (--quick: under a minute)",
                       description="End-to-end denoising benchmark: diffusers and vdopt methods side by side, each in "
                                   "its own process; writes JSON, a Markdown table and a plot to --out.")
    try:
        module = harness()
    except ValueError as e:
        p.set_defaults(func=functools.partial(_missing, e))
        return
    module.add_arguments(p)
    p.set_defaults(func=functools.partial(_run, module))


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    report = module.run(args)
    if report.get("written_to"):
        print(f"wrote {report['written_to']}.json (and .md, .png)")
    return 0


def _missing(error: ValueError, args: argparse.Namespace) -> int:
    raise error
