"""The support matrix (model class x strategy): the README table, with the suite's outcomes.

The table is rendered from the declarations of ``tests/model_matrix.py`` (which the suite
checks cell by cell, strict xfails included), so it cannot drift from the tests. With
``--run`` the matrix tests run too (``pytest tests/test_matrix.py -k test_cell``) and the
JSON records each cell's observed outcome and duration next to its declaration; a cell
whose outcome disagrees with its declaration is listed under ``mismatches`` (the run exits 1).

    python benchmarks/support_matrix.py --out benchmarks/results          # table only (seconds)
    python benchmarks/support_matrix.py --run --out benchmarks/results    # + the suite's cells

Writes ``support_matrix.json``, ``support_matrix.md`` (the README block) and
``support_matrix.png`` (the matrix as a grid).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402

STATUS_COLOR = {"pass": 2, "xfail": 0, "not run": 1}


def run_suite() -> tuple[dict[tuple[str, str], dict], float]:
    """Observed outcome per (class, strategy) from one pytest run of the matrix cells."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "matrix.xml"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_matrix.py",
                        "-k", "test_cell", f"--junitxml={xml}"], cwd=ROOT, check=False)
        seconds = time.perf_counter() - start
        observed = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            cell = case.get("name").split("[", 1)[1].rstrip("]")
            model, strategy = cell.rsplit("-", 1)
            children = {c.tag for c in case}
            if "failure" in children or "error" in children:
                outcome = "failed"
            elif "skipped" in children:
                msg = next(c for c in case if c.tag == "skipped").get("type", "")
                outcome = "xfailed" if "xfail" in msg else "skipped"
            else:
                outcome = "passed"
            observed[(model, strategy)] = {"outcome": outcome, "seconds": float(case.get("time", 0.0))}
    return observed, seconds


def agrees(declared: str, outcome: str) -> bool:
    return {"pass": "passed", "xfail": "xfailed", "not run": "skipped"}[declared] == outcome


def plot(report: dict, path: Path) -> None:
    plt = harness.pyplot()
    import numpy as np

    models = list(dict.fromkeys(c["model"] for c in report["cells"]))
    strategies = list(dict.fromkeys(c["strategy"] for c in report["cells"]))
    grid = np.zeros((len(models), len(strategies)))
    for c in report["cells"]:
        grid[models.index(c["model"]), strategies.index(c["strategy"])] = STATUS_COLOR[c["status"]]
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(models) + 1.2))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=2, aspect="auto")
    ax.set_xticks(range(len(strategies)), strategies, rotation=30, fontsize=7)
    ax.set_yticks(range(len(models)), models, fontsize=6)
    ax.set_title("vdopt support matrix (green: passes, yellow: not run, red: xfail)", fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_out_argument(parser)
    parser.add_argument("--run", action="store_true", help="also run the matrix tests and record their outcomes")
    args = parser.parse_args(argv)
    harness.configure_logging()
    import model_matrix as mm

    cells = mm.cells()
    report = {**harness.stamp("cpu"), "strategies": list(mm.STRATEGIES), "cells": cells}
    mismatches = []
    if args.run:
        observed, seconds = run_suite()
        report["suite_seconds"] = round(seconds, 1)
        for c in cells:
            got = observed.get((c["model"], c["strategy"]), {"outcome": "missing", "seconds": 0.0})
            c.update(observed=got["outcome"], seconds=round(got["seconds"], 2))
            if not agrees(c["status"], got["outcome"]):
                mismatches.append(f"{c['model']}-{c['strategy']}: declared {c['status']}, got {got['outcome']}")
        report["mismatches"] = mismatches
    harness.write_results(args.out, "support_matrix", report, markdown=mm.support_table(), plot=plot)
    for m in mismatches:
        harness.log.error("mismatch: %s", m)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
