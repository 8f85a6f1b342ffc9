"""Accuracy of ``kernels="fp8"`` per model: one denoiser call and a few denoising steps.

    python benchmarks/fp8_accuracy.py --out benchmarks/results          # CPU: tiny Wan, CogVideoX, Latte
    python benchmarks/fp8_accuracy.py --device cuda --models wan --size full \\
        --frames 21 --height 240 --width 416                              # GPU: bf16 models

Per model (zoo models, seeded random weights), against the fp32 eager model as reference:

* ``bf16``: the model in bf16, eager: the error every bf16 deployment already accepts;
* ``fp8``: ``vdopt.optimize(model, kernels="fp8")``. On a GPU the model is in bf16 (so the
  figure is bf16's error plus fp8 attention's); on the CPU, under Triton's interpreter, the
  model stays in fp32 (the interpreter cannot run the exact kernel's bf16 products, which
  short sites use), so the figure is fp8 attention's error alone. ``fp8_vs_bf16`` compares
  the fp8 output with the bf16 one.

"steps" runs the same Euler loop for every variant: ``--steps`` steps on a linear 999 -> 0
schedule, the latent moved by the prediction (the prediction's first latent channels when a
model predicts more, e.g. Latte's learned variance), and compares the final latents.

Every figure is a relative L2 error, ``||x - ref|| / ||ref||``. The tiny models' sites are
long enough for the fp8 kernel (sites of at most 64 tokens without a mask stay exact):
Latte is run at 160 x 128 pixels (80 spatial tokens).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

log = logging.getLogger("vdopt.benchmarks.fp8_accuracy")

MODELS = ("wan", "cogvideox", "latte")
TINY_SHAPES = {"latte": {"height": 160, "width": 128}}
"""Shape overrides of the tiny models, so their self-attention takes the fp8 kernel."""


def euler(predict, x, steps: int):
    """The final latent of ``steps`` Euler steps from ``x`` on a linear 999 -> 0 schedule;
    ``predict(x, t)`` is the denoiser's prediction at timestep ``t`` (a float)."""
    import torch

    timesteps = torch.linspace(999.0, 0.0, steps + 1).tolist()
    with torch.no_grad():
        for t, t_next in zip(timesteps[:-1], timesteps[1:]):
            pred = predict(x, t)
            # Models that also predict a variance (Latte) return more channels: keep x's.
            pred = pred[tuple(slice(0, n) for n in x.shape)]
            x = x + (t_next - t) / 1000.0 * pred.to(x.dtype)
    return x


def _euler(model, args: tuple, kwargs: dict, steps: int):
    """``euler`` of a zoo model called as ``model(x, *args[1:], **kwargs)``."""
    import torch

    def predict(x, t):
        return model(x, *args[1:], **dict(kwargs, timestep=torch.full_like(kwargs["timestep"], t)))[0]

    return euler(predict, args[0], steps)


def measure(name: str, *, device: str = "cpu", size: str = "tiny", steps: int = 3,
            shape: dict[str, int] | None = None, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures of one model (see the module docstring); ``shape`` overrides zoo sizes."""
    import torch

    import vdopt
    from vdopt.models import zoo

    shape = dict(TINY_SHAPES.get(name, {}) if size == "tiny" else {}, **(shape or {}))
    fp8_dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def build(dtype):
        model, args, kwargs = zoo.build(name, size, dtype=dtype, device=device, **shape)
        # inputs from the fp32 build, rounded: every variant sees the same values
        return model, args, kwargs

    ref_model, args, kwargs = build(torch.float32)

    def cast(dtype):
        convert = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        return tuple(convert(a) for a in args), {k: (v if k == "timestep" else convert(v)) for k, v in kwargs.items()}

    result: dict[str, Any] = {"model": name, "size": size, "shape": shape, "steps": steps,
                              "fp8_model_dtype": str(fp8_dtype).removeprefix("torch.")}
    with torch.no_grad():
        ref = ref_model(*args, **kwargs)[0].float()
        ref_steps = _euler(ref_model, args, kwargs, steps).float()
        del ref_model
        bf16_model, _, _ = build(torch.bfloat16)
        a16, k16 = cast(torch.bfloat16)
        bf16 = bf16_model(*a16, **k16)[0].float()
        bf16_steps = _euler(bf16_model, a16, k16, steps).float()
        del bf16_model
        fp8_model, _, _ = build(fp8_dtype)
        a8, k8 = cast(fp8_dtype)
        opt = vdopt.optimize(fp8_model, kernels="fp8", compile=False)
        start = time.perf_counter()
        fp8 = opt(*a8, **k8)[0].float()
        result["fp8_first_call_s"] = time.perf_counter() - start
        fp8_steps = _euler(opt, a8, k8, steps).float()
    stats = [r.stats for plan in opt.plans for r in plan.passes if r.name == "sdpa_to_triton" and r.graph == "main"]
    result["sites"] = {"lowered": stats[0].get("lowered", 0), "lowered_fp8": stats[0].get("lowered_fp8", 0)} if stats else {}
    result["denoiser"] = {"bf16": harness.relative_error(bf16, ref), "fp8": harness.relative_error(fp8, ref),
                          "fp8_vs_bf16": harness.relative_error(fp8, bf16)}
    result["steps_final_latent"] = {"bf16": harness.relative_error(bf16_steps, ref_steps),
                                    "fp8": harness.relative_error(fp8_steps, ref_steps),
                                    "fp8_vs_bf16": harness.relative_error(fp8_steps, bf16_steps)}
    log.info("%s: denoiser %s; %d steps %s; sites %s", name,
             {k: f"{v:.2e}" for k, v in result["denoiser"].items()}, steps,
             {k: f"{v:.2e}" for k, v in result["steps_final_latent"].items()}, result["sites"])
    return result


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# fp8 attention accuracy ({env['device']}, {env['date']})", "",
             f"torch {env['versions']['torch']}, triton {env['versions']['triton']}, diffusers "
             f"{env['versions']['diffusers']}. Relative L2 error against the fp32 eager model; fp8 model in "
             f"{report['rows'][0]['fp8_model_dtype'] if report['rows'] else '-'}.", "",
             "| model | sites fp8 / lowered | denoiser bf16 | denoiser fp8 | fp8 vs bf16 | steps | final latent bf16 | final latent fp8 | fp8 vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        d, s = r["denoiser"], r["steps_final_latent"]
        lines.append(f"| {r['model']} ({r['size']}) | {r['sites'].get('lowered_fp8', 0)} / {r['sites'].get('lowered', 0)} "
                     f"| {d['bf16']:.2e} | {d['fp8']:.2e} | {d['fp8_vs_bf16']:.2e} | {r['steps']} "
                     f"| {s['bf16']:.2e} | {s['fp8']:.2e} | {s['fp8_vs_bf16']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    rows = report["rows"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["model"] for r in rows]
    series = [("denoiser", "bf16"), ("denoiser", "fp8"), ("steps_final_latent", "bf16"), ("steps_final_latent", "fp8")]
    harness.grouped_bars(ax, names, {f"{group} {key}": [r[group][key] for r in rows] for group, key in series})
    ax.set_yscale("log")
    ax.set_ylabel("relative error vs fp32 eager")
    ax.legend(fontsize=7)
    ax.set_title(f"fp8 attention accuracy, {report['environment']['device']}", fontsize=9)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_out_argument(parser)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated zoo models (default {','.join(MODELS)})")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--steps", type=int, default=3, help="Euler steps of the multi-step comparison (default 3)")
    for dim in ("frames", "height", "width", "text_len"):
        parser.add_argument(f"--{dim.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    harness.configure_logging()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    torch.manual_seed(0)
    shape = {k: getattr(args, k) for k in ("frames", "height", "width", "text_len") if getattr(args, k) is not None}
    rows = [measure(name, device=args.device, size=args.size, steps=args.steps, shape=shape)
            for name in args.models.split(",")]
    report = {"benchmark": "fp8_accuracy", "environment": harness.stamp(args.device), "rows": rows}
    harness.write_results(args.out, "fp8_accuracy" + ("" if args.device == "cuda" else "_cpu"), report,
                          markdown=markdown(report), plot=plot)
    print(markdown(report), end="")  # noqa: T201  a benchmark script's table
    return report


if __name__ == "__main__":
    main()
