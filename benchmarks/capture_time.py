"""Capture and optimize time of every class in the support matrix (one device).

    python benchmarks/capture_time.py --out benchmarks/results

For each transformer class the matrix runs (``tests/model_matrix.py``: every class a video
pipeline of the installed diffusers uses, plus the image DiTs), at its tiny configuration and
at sizes other than its config's defaults: ``vdopt.optimize`` and the first call, split into
torch.export (``Plan.capture_s``) and analysis + passes (``Plan.passes_s``) as ``opt.report()``
gives them, then a second call with the same shapes, which must reuse the plan (checked: a
recapture is an error, not a timing). A second (warm) eager call is timed beside it for scale.

Writes ``capture_time.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import harness  # noqa: E402
import model_matrix as mm  # noqa: E402

log = logging.getLogger("vdopt.benchmarks.capture_time")


def measure(name: str, seed: int = 0) -> dict[str, Any]:
    import vdopt

    model = mm.build_model(name, seed=seed)
    args, kwargs = mm.make_inputs(name, model, 1, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        model(*args, **kwargs)  # warm: the eager time is a second call, like the vdopt one it sits beside
        start = time.perf_counter()
        model(*args, **kwargs)
        eager_s = time.perf_counter() - start
        opt = vdopt.optimize(model)
        start = time.perf_counter()
        opt(*args, **kwargs)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        opt(*args, **kwargs)
        second_s = time.perf_counter() - start
    if len(opt.plans) != 1:
        raise RuntimeError(f"{name}: the second call with the same shapes captured again ({len(opt.plans)} plans)")
    plan = opt.plans[0]
    return {"model": name, "capture_s": round(plan.capture_s, 3), "passes_s": round(plan.passes_s, 3),
            "first_call_s": round(first_s, 3), "second_call_s": round(second_s, 4), "eager_call_s": round(eager_s, 4),
            "sites": len(plan.sites)}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Capture and optimize time per model (one device, tiny configurations)", "",
        f"{report['device']}; {report['date']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), "",
        "| model | torch.export s | analysis + passes s | first call s | second call s | eager (warm) call s | sites |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['capture_s']:.2f} | {r['passes_s']:.2f} | {r['first_call_s']:.2f} | "
                     f"{r['second_call_s']:.4f} | {r['eager_call_s']:.4f} | {r['sites']} |")
    lines += ["", "- first call: capture + analysis and passes + the call itself; the second call reuses the plan "
              "(a recapture would be an error).", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    rows = [r for r in report["rows"] if "error" not in r]
    if not rows:
        return
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(rows) + 1.2))
    names = [r["model"].replace("Transformer", "").replace("Model", "") for r in rows]
    capture = [r["capture_s"] for r in rows]
    passes = [r["passes_s"] for r in rows]
    ax.barh(names, capture, label="torch.export")
    ax.barh(names, passes, left=capture, label="analysis + passes")
    ax.set_xlabel("seconds (first call, one device, tiny config)")
    ax.tick_params(axis="y", labelsize=6)
    ax.legend(fontsize=7)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    harness.configure_logging()
    rows = []
    for _, name in mm.matrix_classes():
        if mm.expected(name, "single") is not None:
            continue  # a class the matrix cannot call yet (its xfail reason is in the table)
        try:
            rows.append(measure(name))
        except Exception as exc:  # one model's failure is recorded; the rest still run
            rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        log.info("%s", rows[-1])
    report = {**harness.stamp("cpu"), "rows": rows}
    harness.write_results(args.out, "capture_time", report, markdown=markdown(report), plot=plot)
    return report


if __name__ == "__main__":
    main()
