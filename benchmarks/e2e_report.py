"""The end-to-end benchmark's report: derived figures, the JSON, the table and the plot."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import harness
from e2e_workload import FAMILIES, MID, BenchConfig, pab_settings, scheduler, tokens_per_call


def assemble(cfg: BenchConfig, results: dict[str, dict[str, Any]], latents: dict, interleave: bool) -> dict[str, Any]:
    """The report: the stamp, the configuration, the schedule and each method's figures.

    Derived per method: seconds per step, warm-up (first generation minus the best one),
    speed-up over ``diffusers_eager`` and the final latent's error against it.
    """
    eager = results.get("diffusers_eager", {}).get("seconds")
    reference = latents.get("diffusers_eager")
    for name, r in results.items():
        if "skipped" in r:
            continue
        r["seconds_per_step"] = r["seconds"] / cfg.steps
        r["warmup_s"] = r["first_generation_s"] - r["seconds"]
        if eager:
            r["speedup_vs_diffusers_eager"] = eager / r["seconds"]
        baseline = BASELINES.get(name)
        if baseline and results.get(baseline, {}).get("seconds"):
            r[f"speedup_vs_{baseline}"] = results[baseline]["seconds"] / r["seconds"]
        if reference is not None and name in latents:
            r["final_latent_rel_err_vs_eager"] = harness.relative_error(latents[name], reference)
    sched = scheduler()
    sched.set_timesteps(cfg.steps)
    return {
        "benchmark": "e2e",
        **harness.stamp(cfg.device),
        "config": dataclasses.asdict(cfg),
        "model": (f"{FAMILIES[cfg.model]}, published config (random weights)" if cfg.full
                  else f"{FAMILIES[cfg.model]} architecture, mid-size {MID[cfg.model] | {'num_layers': cfg.layers}}"),
        "tokens_per_call": tokens_per_call(cfg),
        "schedule": f"UniPCMultistepScheduler (flow, shift 3.0), {cfg.steps} steps, "
                    + (f"CFG {cfg.guidance} as separate cond/uncond calls" if cfg.guidance > 1 else "no CFG"),
        "timesteps": [int(t) for t in sched.timesteps],
        "pab": pab_settings(cfg),
        "clock": "CPU time of each worker process (one thread; mesh rows: wall)" if cfg.clock == "cpu" else "wall",
        "threads": cfg.threads or os.cpu_count(),
        "timing": "interleaved rounds (every method once per round), best of " + str(cfg.repeats)
                  if interleave else f"one method at a time, best of {cfg.repeats}",
        "methods": results,
    }


BASELINES = {"vdopt_eager": "diffusers_eager", "vdopt": "diffusers_compile", "vdopt_pab": "diffusers_pab"}
"""What each vdopt method replaces: the same execution (eager, Inductor, PAB) without vdopt."""


# -- output ----------------------------------------------------------------------------------

def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"# End-to-end denoising: {report['model']}",
        "",
        f"{report['device']}; {cfg['dtype']}; video {cfg['frames']}x{cfg['height']}x{cfg['width']} "
        f"({report['tokens_per_call']} tokens per call, {cfg['text_len']} text tokens); {report['schedule']}; "
        f"PAB {_pab_text(report['pab'])}. {report['date']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        "| method | s / generation | ms / step | vs diffusers eager | vs what it replaces | warm-up s | first output s | peak memory | latent rel. err vs eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | | | | |")
            continue
        speed = f"{r['speedup_vs_diffusers_eager']:.2f}x" if "speedup_vs_diffusers_eager" in r else "-"
        baseline = BASELINES.get(name)
        versus = f"{r[f'speedup_vs_{baseline}']:.2f}x {baseline}" if f"speedup_vs_{baseline}" in r else "-"
        err = f"{r['final_latent_rel_err_vs_eager']:.1e}" if "final_latent_rel_err_vs_eager" in r else "-"
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {1e3 * r['seconds_per_step']:.1f} | {speed} | {versus} | {r['warmup_s']:.1f} | "
            f"{r['time_to_first_output_s']:.1f} | {_mib(r.get('peak_memory_bytes'))} | {err} |"
        )
    art = report["methods"].get("vdopt_artifact", {})
    notes = [
        "",
        f"- s / generation ({report.get('clock', 'wall')}): {report['timing']}, after a warm-up generation; a step is "
        + ("one cond and one uncond call." if cfg["guidance"] > 1 else "one call."),
        "- warm-up: first generation minus the best one (capture, compilation, first-call costs). "
        "first output: seconds from the worker's process start to the first model output "
        "(imports, model construction, capture or compilation or artifact loading).",
        "- peak memory: " + ("CUDA max_memory_allocated." if cfg["device"].startswith("cuda")
                             else "peak resident set of the worker process (weights, activations, Python and torch)."),
        "- the vdopt rows run the rewritten graphs (per rank, per PAB variant) through Inductor, as "
        "diffusers_compile does, except vdopt_eager (no compilation, beside diffusers_eager); vdopt_artifact "
        "runs AOTInductor packages of the same graphs. vs what it replaces: vdopt_eager against diffusers_eager, "
        "vdopt against diffusers_compile, vdopt_pab against diffusers_pab.",
    ]
    if "aot_compile_s" in art:
        notes.append(
            f"- vdopt_artifact: AOTInductor artifacts of `{art['artifact_of']}` ({', '.join(art['variants'])}; "
            f"{_mib(art['artifact_bytes'])}) compiled in {art['aot_compile_s']:.1f} s by opt.save; in a fresh process "
            f"vdopt.load took {art['load_s']:.2f} s and the first output came {art['time_to_first_output_s']:.1f} s "
            "after process start."
        )
    meshes = [n for n, r in report["methods"].items() if n.startswith("vdopt_mesh") and "skipped" not in r]
    if meshes and not cfg["device"].startswith("cuda"):
        notes.append(
            "- mesh rows run gloo ranks as processes on the same CPU cores (threads divided among the ranks): "
            "they check that sequence parallelism runs end to end, not how it scales; benchmarks/scaling.py projects scaling."
        )
    return "\n".join(lines + notes) + "\n"


def _pab_text(pab: dict[str, Any]) -> str:
    """``spatial every 2, cross every 6 over (100, 800)`` from a PAB setting."""
    kinds = [k for k in ("spatial", "temporal", "cross") if pab.get(f"{k}_range")]
    parts = [f"{k} every {pab[f'{k}_range']} over {tuple(pab.get(f'{k}_window', (100, 800)))}" for k in kinds]
    return ", ".join(parts) or "off"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    rows = [(n, r) for n, r in report["methods"].items() if "skipped" not in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    colors = ["#888888" if n.startswith("diffusers") else "#2f5fb3" for n, _ in rows]
    bars = ax.bar([n for n, _ in rows], [r["seconds"] for _, r in rows], color=colors)
    for bar, (_, r) in zip(bars, rows):
        if "speedup_vs_diffusers_eager" in r:
            ax.annotate(f"{r['speedup_vs_diffusers_eager']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"seconds per {report['config']['steps']}-step generation")
    ax.set_title(f"{report['model'][:60]}\n{report['device']}, {report['config']['dtype']}, {report['date'][:10]}", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right", fontsize=8)
    harness.save_figure(fig, path, dpi=120)


def stem(report: dict[str, Any]) -> str:
    """``e2e_<config>_<cpu|cuda>``: the file name of a report, without suffix."""
    device = "cuda" if report["config"]["device"].startswith("cuda") else "cpu"
    return f"e2e_{BenchConfig(**report['config']).name}_{device}"


def write(report: dict[str, Any], out: Path | None) -> Path:
    """``<out>/<stem>.{json,md,png}``; returns the path without suffix."""
    return harness.write_results(out, stem(report), report, markdown=markdown(report), plot=plot)
