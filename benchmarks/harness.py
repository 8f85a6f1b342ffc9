"""What every benchmark shares: where results go, timing rounds, the stamp, writing results.

* Output: ``--out DIR``; by default ``./vdopt-results`` in the current directory (see
  ``default_results_dir``), never the committed ``benchmarks/results/`` of the checkout:
  a benchmark run must not overwrite the published figures of a clone. To refresh those,
  pass ``--out benchmarks/results`` explicitly.
* Timing: ``timed`` turns a function into one that returns its own seconds;
  ``warm_up`` runs each method once untimed; ``timing_rounds`` times every method
  ``repeats`` times, round by round (each method once per round) so that load from other
  processes on a shared machine hits all methods alike; ``summary`` gives best / median.
* Stamp: ``stamp(device)`` is the date (UTC), the device and the versions that every
  result file carries.
* Writing: ``write_results`` writes ``<stem>.json`` and, when given, ``<stem>.md`` and the
  plot ``<stem>.png`` (matplotlib, Agg backend via ``pyplot()``).

Benchmarks put this folder on ``sys.path`` and ``import harness``; nothing here imports
torch at module level, so ``vdopt bench --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("vdopt.benchmarks")

COMMITTED_RESULTS = Path(__file__).resolve().parent / "results"
"""The published results of the repository (written only when ``--out`` names it)."""

DEFAULT_RESULTS_DIRNAME = "vdopt-results"
"""Default output: this folder in the current directory."""


def default_results_dir() -> Path:
    """``./vdopt-results`` (in the current directory, where the user launched the run)."""
    return Path.cwd() / DEFAULT_RESULTS_DIRNAME


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where the results go (default ``./vdopt-results``)."""
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"results directory (default: ./{DEFAULT_RESULTS_DIRNAME} in the current directory; "
             "pass benchmarks/results to refresh the committed results of a checkout)",
    )


def results_dir(out: Path | None) -> Path:
    """The ``--out`` value, or the default; created."""
    path = Path(out) if out is not None else default_results_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def configure_logging() -> None:
    """INFO lines from the benchmarks (also under the CLI, whose root logger shows warnings)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)


# -- timing ----------------------------------------------------------------------------------

def sync(device: str) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so a clock reads finished work."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], *, device: str = "cpu", clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """``fn`` as a function returning the seconds one call took (``clock``; synced on CUDA)."""

    def run() -> float:
        sync(device)
        start = clock()
        fn()
        sync(device)
        return clock() - start

    return run


def warm_up(runs: Mapping[str, Callable[[], Any]], *, times: int = 1,
            on_error: Callable[[str, Exception], None] | None = None) -> dict[str, Any]:
    """Run each method ``times`` times, untimed, one method at a time; the last results.

    A method that raises is reported to ``on_error`` (and left out of the result) when it
    is given, else the error propagates.
    """
    results: dict[str, Any] = {}
    for name, run in runs.items():
        try:
            for _ in range(times):
                results[name] = run()
        except Exception as error:  # noqa: BLE001  one failed method is a row, not the end of the run
            if on_error is None:
                raise
            on_error(name, error)
    return results


def timing_rounds(runs: Mapping[str, Callable[[], float]], *, repeats: int, interleave: bool = True,
                  on_error: Callable[[str, Exception], None] | None = None,
                  on_time: Callable[[int, str, float], None] | None = None) -> dict[str, list[float]]:
    """Seconds of ``repeats`` runs of each method (each ``run()`` returns its own seconds).

    Interleaved: round by round, every method once per round; otherwise one method's
    repeats after another's. A method that raises goes to ``on_error`` and runs no more.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    failed: set[str] = set()

    def one(round_: int, name: str) -> None:
        try:
            seconds = runs[name]()
        except Exception as error:  # noqa: BLE001
            if on_error is None:
                raise
            failed.add(name)
            on_error(name, error)
            return
        times[name].append(seconds)
        if on_time is not None:
            on_time(round_, name, seconds)

    if interleave:
        for round_ in range(repeats):
            for name in runs:
                if name not in failed:
                    one(round_, name)
    else:
        for name in runs:
            for round_ in range(repeats):
                if name not in failed:
                    one(round_, name)
    return {name: t for name, t in times.items() if name not in failed}


def summary(times: list[float]) -> dict[str, Any]:
    """Best (the least disturbed run), median and every time."""
    return {"seconds": min(times), "seconds_median": statistics.median(times), "seconds_all": list(times)}


def median_seconds(fn: Callable[[], Any], *, calls: int, device: str = "cpu",
                   before_each: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``calls`` calls of ``fn`` after one untimed call."""
    fn()
    clock = timed(fn, device=device)
    samples = []
    for _ in range(calls):
        if before_each is not None:
            before_each()
        samples.append(clock())
    return statistics.median(samples)


# -- the stamp -------------------------------------------------------------------------------

def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's architecture and core count."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def versions() -> dict[str, str | None]:
    """torch, triton (None without it), diffusers, vdopt and Python versions."""
    import diffusers
    import torch

    import vdopt

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
            "vdopt": vdopt.__version__, "python": platform.python_version()}


def stamp(device: str) -> dict[str, Any]:
    """``date``, ``device`` and ``versions``: what every result file records."""
    return {"date": utc_now(), "device": device_name(device), "versions": versions()}


# -- results ---------------------------------------------------------------------------------

def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int = 110) -> None:
    """Lay out, write and close ``fig`` (closed figures do not pile up over a long run)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def grouped_bars(ax, labels: list[str], series: Mapping[str, list[float]], **tick_options: Any) -> None:
    """One group of bars per label, one bar per series in each group, ticks at the groups' centres."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, **tick_options)


def write_results(out: Path, stem: str, report: dict[str, Any], *, markdown: str | None = None,
                  plot: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    """``out/<stem>.json`` (+ ``.md``, + ``.png``); returns ``out/<stem>`` (no suffix)."""
    out = results_dir(out)
    path = out / stem
    path.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    written = [".json"]
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown)
        written.append(".md")
    if plot is not None:
        plot(report, path.with_suffix(".png"))
        if path.with_suffix(".png").exists():  # a plot with nothing to draw writes no file
            written.append(".png")
    log.info("wrote %s{%s}", path, ",".join(written))
    return path


# -- small shared pieces ---------------------------------------------------------------------

def relative_error(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parse_meshes(text: str) -> list[dict[str, int]]:
    """``"ulysses=2;ring=2,ulysses=2"`` -> a list of degree dicts (``vdopt.mesh`` syntax)."""
    from vdopt.mesh import parse_degrees

    return [parse_degrees(item) for item in (m.strip() for m in text.split(";")) if item]
