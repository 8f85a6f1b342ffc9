"""Where vdopt falls back to gathering: per matrix model and strategy, each op whose rule could
not keep its inputs split.

An exact rewrite gathers a split tensor before any op it has no rule for: always exact, but that
op (and what follows until the tensor is split again) then runs on the whole tensor on every
rank. This lists every such fallback, with its reason, from the dimension core's debug log
while ``vdopt.optimize`` builds each cell of the model matrix (``tests/model_matrix.py``) on 2
gloo ranks (nothing is called). A reshape that cuts a split token factor into the token grid
is counted apart as ``final``: un-patchify at the model's end, whose output has to be whole
anyway (a model that reshapes its tokens into the grid mid-model, such as SanaWM's recurrence,
is counted there too).

    python benchmarks/fallbacks.py --out benchmarks/results
    python benchmarks/fallbacks.py --baseline old/fallbacks.json --out benchmarks/results

``--baseline`` takes the JSON of an earlier commit's run and shows its counts beside these.
Writes ``fallbacks.json`` (every reason, the commit measured), ``fallbacks.md`` and
``fallbacks.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import harness  # noqa: E402

STRATEGIES = {"ulysses2": ({"ulysses": 2}, 1), "ring2": ({"ring": 2}, 1), "cfg2": ({"cfg": 2}, 2)}
"""Strategy -> (mesh degrees, batch of the call)."""
FINAL = re.compile(r": reshape \((?:[^()]*[ ,*])?(?:T|S|TS)\d+/[^()]*\) -> [^;]* cuts a split factor")
"""The reason a reshape that cuts a split token factor (T, S, TS) gives: un-patchify at the
model's end, whose output has to be whole anyway."""


class _Reasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("gather before "):
            self.reasons.append(message.removeprefix("gather before "))


def _on_ranks(rank: int, world: int, names: list[str]) -> dict:
    import torch

    import model_matrix as mm
    import vdopt

    warnings.filterwarnings("ignore")
    handler = _Reasons()
    log = logging.getLogger("vdopt.passes.dims.propagation")
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    cells = {}
    for name in names:
        for strategy, (degrees, batch) in STRATEGIES.items():
            handler.reasons.clear()
            model = mm.build_model(name, seed=0)
            args, kwargs = mm.make_inputs(name, model, batch, torch.Generator().manual_seed(1))
            try:
                vdopt.optimize(model, vdopt.Mesh(**degrees), example_inputs=(args, kwargs))
                error = None
            except Exception as exc:  # recorded: a cell that does not build has no fallbacks to count
                error = f"{type(exc).__name__}: {exc}"[:300]
            cells[f"{name} {strategy}"] = {"reasons": list(handler.reasons), "error": error}
    return cells


def _commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def _markdown(report: dict) -> str:
    base = report.get("baseline")
    lines = [f"Fallbacks to a gather while building each matrix cell on 2 gloo ranks (commit {report['commit']}, "
             f"{report['date']}); `final`: reshapes of the split tokens into their grid (un-patchify), counted apart"
             + (f"; `a -> b`: commit {base['commit']} -> this one" if base else "") + ".", "",
             "| model | " + " | ".join(STRATEGIES) + " |", "|---|" + "---|" * len(STRATEGIES)]
    models = list(dict.fromkeys(c["model"] for c in report["cells"]))
    by_key = {(c["model"], c["strategy"]): c for c in report["cells"]}
    for m in models:
        row = []
        for s in STRATEGIES:
            c = by_key[(m, s)]
            before = f"{base['counts'][f'{m} {s}']} -> " if base and f"{m} {s}" in base["counts"] else ""
            row.append("error" if c["error"] else f"{before}{len(c['fallbacks'])} (+{c['final']} final)")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    total = f"{base['total']} -> {report['total']}" if base else report["total"]
    lines += ["", f"Total fallbacks (not final): {total}.", "", "Reasons:", ""]
    for c in report["cells"]:
        for reason in c["fallbacks"]:
            lines.append(f"- {c['model']} {c['strategy']}: {reason}")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    plt = harness.pyplot()
    models = list(dict.fromkeys(c["model"] for c in report["cells"]))
    series = {s: [next(len(c["fallbacks"]) for c in report["cells"] if c["model"] == m and c["strategy"] == s)
                  for m in models] for s in STRATEGIES}
    fig, ax = plt.subplots(figsize=(10, 3.5))
    harness.grouped_bars(ax, [m.replace("Transformer", "").replace("3DModel", "").replace("2DModel", "") for m in models],
                         series, rotation=60, fontsize=6)
    ax.set_ylabel("gathers before an op (not final)")
    ax.legend(fontsize=7)
    ax.set_title(f"vdopt fallbacks per matrix cell, 2 gloo ranks (commit {report['commit']})", fontsize=9)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_out_argument(parser)
    parser.add_argument("--baseline", type=Path, help="fallbacks.json of an earlier commit, shown beside")
    args = parser.parse_args(argv)
    harness.configure_logging()
    import model_matrix as mm
    from vdopt.runtime.local_ranks import run_local_ranks

    names = [n for _, n in mm.matrix_classes()]
    cells = run_local_ranks(2, _on_ranks, names, backend="gloo", timeout=1800)[0]
    report = {**harness.stamp("cpu"), "commit": _commit(), "cells": []}
    for key, got in cells.items():
        model, strategy = key.rsplit(" ", 1)
        final = [r for r in got["reasons"] if FINAL.search(r)]
        report["cells"].append({"model": model, "strategy": strategy, "error": got["error"], "final": len(final),
                                "fallbacks": [r for r in got["reasons"] if not FINAL.search(r)]})
    report["total"] = sum(len(c["fallbacks"]) for c in report["cells"])
    if args.baseline is not None:
        old = json.loads(args.baseline.read_text())
        report["baseline"] = {"commit": old["commit"], "date": old["date"], "total": old["total"],
                              "counts": {f"{c['model']} {c['strategy']}": len(c["fallbacks"]) for c in old["cells"]}}
    harness.write_results(args.out, "fallbacks", report, markdown=_markdown(report), plot=_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
