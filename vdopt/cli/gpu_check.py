"""``vdopt gpu-check``: the whole GPU check (``benchmarks/gpu_check.py`` of the source checkout).

On one H100 it runs the CUDA tests, times attention against SDPA's backends and runs
Wan2.1-T2V-1.3B end to end (diffusers eager, ``torch.compile``, diffusers' PAB hook, vdopt,
vdopt + PAB, an AOT artifact) within 8 minutes; ``--tiny`` rehearses every stage on the CPU.
Results go to ``--out`` (``gpu_check.json``, ``.png``, ``.txt``); the table is printed last.
Exit status 1 when a stage did not end ``ok``.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from vdopt.cli.benchmark_source import bind_benchmark


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-check", help="the GPU check: CUDA tests, attention timings, Wan2.1 end to end "
                                         "(8 minutes on an H100; --tiny: a CPU rehearsal)",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    bind_benchmark(p, "gpu_check", "vdopt gpu-check", _run)


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    if args.stage:
        raise ValueError("--stage is internal: the check starts its stage processes itself")
    return module.run_from_args(args)
