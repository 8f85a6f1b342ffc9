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
from types import ModuleType

from vdopt.cli.benchmark_source import bind_benchmark


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end denoising benchmark: diffusers and vdopt side by side (--quick: under a minute)",
                       description="End-to-end denoising benchmark: diffusers and vdopt methods side by side, each in "
                                   "its own process; writes JSON, a Markdown table and a plot to --out.")
    bind_benchmark(p, "e2e", "vdopt bench", _run)


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    report = module.run(args)
    if report.get("written_to"):
        print(f"wrote {report['written_to']}.json (and .md, .png)")
    return 0
