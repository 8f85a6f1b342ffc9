"""Loading a benchmark script of the source checkout, for the commands that run one.

The benchmarks live in ``benchmarks/`` next to the package, not inside it: ``vdopt bench``
and ``vdopt gpu-check`` run the scripts of the checkout vdopt was installed from (editable).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str, command: str) -> ModuleType:
    """``benchmarks/<name>.py``, loaded once; ``ValueError`` (naming ``command``) without a checkout."""
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        raise ValueError(
            f"{command} runs the benchmarks of a source checkout ({path} is missing): "
            "install vdopt from its repository (pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location(f"vdopt_benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        saved_path = list(sys.path)
        try:
            spec.loader.exec_module(module)
        finally:
            # The scripts put benchmarks/ first on sys.path to import their siblings; they are
            # loaded now, so the folder's generic module names stop shadowing anything else.
            sys.path[:] = saved_path
    return module


def bind_benchmark(
    parser: argparse.ArgumentParser,
    name: str,
    command: str,
    run: Callable[[ModuleType, argparse.Namespace], int],
) -> None:
    """Give ``parser`` the options of ``benchmarks/<name>.py`` and run it with ``run(module, args)``.

    Without a checkout the command still registers (``vdopt --help`` works) and fails with
    the loading error when it is run.
    """
    try:
        module = load_benchmark(name, command)
    except ValueError as e:
        parser.set_defaults(func=functools.partial(_raise, e))
        return
    module.add_arguments(parser)
    parser.set_defaults(func=functools.partial(run, module))


def _raise(error: ValueError, args: argparse.Namespace) -> int:
    raise error
