"""Pyramid Attention Broadcast: a full denoising schedule with and without PAB, in one run.

    python benchmarks/pab.py                                  # CPU: mid-size Latte, 50 steps
    python benchmarks/pab.py --model wan --size full --frames 81 --height 480 --width 832 \\
        --steps 20 --device cuda --dtype bfloat16              # GPU: Wan2.1-1.3B
    python benchmarks/pab.py --model latte --size full --frames 16 --height 512 --width 512 \\
        --batch 2 --device cuda --dtype bfloat16               # GPU: Latte-1, batched CFG

Methods, each timed over the same schedule (linear 999 -> 0, one call per step, the latent
updated from the prediction) after a short warm-up, in this order:

* ``eager``: the model as is;
* ``diffusers_pab``: a copy of the model with diffusers' ``apply_pyramid_attention_broadcast``
  (diffusers models only; Latte's temporal blocks are named explicitly so the hook classifies
  them right);
* ``vdopt``: ``vdopt.optimize(model)``;
* ``vdopt_pab``: ``vdopt.optimize(model, pab=...)`` with the same ranges and windows.

The default CPU model, ``latte-mid``, is the zoo's Latte-1 architecture (every switch of the
published config) at 4 layers of width 256 (4 heads x 64) with 512-dim captions, on an
8x128x128 video (8 x 16 x 16 latent, 512 tokens per sample) with a batched CFG pair: big
enough that projections and attention, not Python overhead, dominate a step; small enough
to time 4 methods x 50 steps a few times on 2 CPU cores.

Timing: generations are interleaved (every method once per round, ``--repeats`` rounds) so
load from other processes hits all methods alike; the JSON keeps every time, the median and
the minimum, and speed-ups are computed from the minimum (the least-disturbed run). On the
CPU the default clock is this process's CPU time with one thread (``time.process_time``):
on a shared machine wall time mostly measures the other processes; wall times are kept too.

``--quick``: 8 steps, one timed round, a 4x64x64 video: a smoke run, not a measurement.

Results: ``--out`` (default ``./vdopt-results``) gets ``pab_<model>_<device>.json`` and
``.png`` with device, versions and date. The final latents of ``vdopt_pab`` and ``diffusers_pab`` are compared
(relative error), so a speed-up never comes from computing something else.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

log = logging.getLogger("vdopt.benchmarks.pab")

# PAB settings, by name: "anchors" is the diffusers-hook baseline (spatial every 2nd, temporal
# every 4th, cross every 6th call over (100, 800)); "paper" is the model's default
# (vdopt.models.pab_defaults).
PAB_SETTINGS = ("anchors", "paper")

QUICK = {"steps": 8, "warmup_steps": 1, "repeats": 1, "frames": 4, "height": 64, "width": 64}
"""``--quick``: a smoke run (seconds, not a measurement); explicit options override it."""


def build_model(args) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and the keyword inputs of one call."""
    from vdopt.models import build

    from vdopt.capture import bind_call

    dtype = getattr(torch, args.dtype)
    if args.model == "latte-mid":
        from diffusers import LatteTransformer3DModel
        from vdopt.models.diffusers_models import LATTE_CONFIGS

        T, H, W = args.frames, args.height // 8, args.width // 8
        torch.manual_seed(args.seed)
        config = {
            **LATTE_CONFIGS["full"], "num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 64,
            "cross_attention_dim": 256, "caption_channels": 512, "video_length": T,
        }
        model = LatteTransformer3DModel(**config).to(device=args.device, dtype=dtype).eval()
        g = torch.Generator().manual_seed(args.seed + 1)
        inputs = {
            "hidden_states": torch.randn(args.batch, 4, T, H, W, generator=g),
            "timestep": torch.full((args.batch,), 999.0),
            "encoder_hidden_states": torch.randn(args.batch, args.text_len, 512, generator=g),
            "return_dict": False,
        }
        inputs = {k: v.to(args.device, dtype if v.is_floating_point() and k != "timestep" else v.dtype)
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return model, inputs
    shape = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
    model, a, kw = build(args.model, args.size, batch=args.batch, seed=args.seed, dtype=dtype, device=args.device, **shape)
    return model, bind_call(model, a, kw)


def pab_config(args):
    from vdopt.models.pab_defaults import default_pab_config

    import vdopt

    if args.pab == "paper":
        return default_pab_config("latte" if args.model == "latte-mid" else args.model)
    return vdopt.PABConfig(spatial_range=2, temporal_range=4, cross_range=6)


def diffusers_hooked(model: torch.nn.Module, config, clock: dict) -> torch.nn.Module | None:
    """A copy of ``model`` with diffusers' PAB hook, or None if diffusers cannot hook it."""
    from diffusers import apply_pyramid_attention_broadcast
    from diffusers.models.modeling_utils import ModelMixin

    if not isinstance(model, ModelMixin) or type(model).__module__.startswith("vdopt"):
        return None
    names = [n for n, _ in model.named_modules()]
    has_temporal = any(n.startswith("temporal_transformer_blocks.") for n in names)
    identifiers = {}
    if has_temporal:  # diffusers' default spatial identifiers also match "temporal_transformer_blocks"
        identifiers = {
            "spatial_attention_block_identifiers": (r"^transformer_blocks\.",),
            "temporal_attention_block_identifiers": (r"^temporal_transformer_blocks\.",),
            "cross_attention_block_identifiers": (r"^transformer_blocks\.",),
        }
    hooked = copy.deepcopy(model)
    apply_pyramid_attention_broadcast(hooked, config.to_diffusers(lambda: clock["t"], **identifiers))
    return hooked


def generate(fn: Callable, inputs: dict, timesteps: list[float], clock: dict, device: str) -> tuple[float, float, torch.Tensor]:
    """Wall seconds and this process's CPU seconds for one generation, and the final latent."""
    x = inputs["hidden_states"]
    batch = x.shape[0]
    harness.sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for t in timesteps:
            clock["t"] = t
            ts = torch.full((batch,), t, device=x.device)
            out = fn(**{**inputs, "hidden_states": x, "timestep": ts})[0]
            x = x - 0.02 * out.narrow(1, 0, x.shape[1]).to(x.dtype)
    harness.sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu, x


def plot(result: dict, path: Path) -> None:
    plt = harness.pyplot()

    methods = list(result["methods"])
    per_step = [result["methods"][m]["seconds_per_step"] * 1e3 for m in methods]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.bar(methods, per_step, color=["#888888", "#d98c3f", "#5b8bd9", "#2f5fb3"][: len(methods)])
    eager = result["methods"]["eager"]["seconds_per_step"]
    for bar, m in zip(bars, methods):
        speedup = eager / result["methods"][m]["seconds_per_step"]
        ax.annotate(f"{speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(f"{result['clock']} ms per step (best generation / steps)")
    ax.set_title(f"PAB, {result['model']} {result['shape']}, {result['steps']} steps\n{result['device']}", fontsize=9)
    harness.save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds: 8 steps, one round, 4x64x64 video")
    parser.add_argument("--model", default="latte-mid", help="latte-mid (the CPU default: Latte-1 at 4 layers of width 256) or a zoo name")
    parser.add_argument("--size", default="full", help="zoo configuration for zoo models: tiny or full (default full)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (latte-mid default 8)")
    parser.add_argument("--height", type=int, default=None, help="video height in pixels (latte-mid default 128)")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (latte-mid default 128)")
    parser.add_argument("--text-len", type=int, default=32, help="caption tokens of latte-mid (default 32)")
    parser.add_argument("--batch", type=int, default=2, help="batch size; 2 is a batched cond/uncond pair (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per generation (default 50)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per method before timing (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds: generations timed per method (default 3)")
    parser.add_argument("--pab", choices=PAB_SETTINGS, default="anchors",
                        help="anchors: spatial 2, temporal 4, cross 6 over (100, 800); paper: the model's published setting")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", help="weights and activations (default float32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="what speed-ups are computed from; auto: CPU time on the CPU, wall time on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    defaults = {"steps": 50, "warmup_steps": 3, "repeats": 3}
    for key in ("steps", "warmup_steps", "repeats", "frames", "height", "width"):
        if getattr(args, key) is None:
            setattr(args, key, (QUICK if args.quick else defaults).get(key))
    if args.model == "latte-mid":
        args.frames, args.height, args.width = args.frames or 8, args.height or 128, args.width or 128
    torch.set_num_threads(args.threads)
    harness.configure_logging()

    from diffusers.hooks import HookRegistry

    import vdopt

    model, inputs = build_model(args)
    config = pab_config(args)
    timesteps = [float(t) for t in torch.linspace(999, 0, args.steps).round()]
    warmup = timesteps[: args.warmup_steps]
    clock = {"t": 0.0}
    example = ((), inputs)

    methods: dict[str, tuple[Callable, Callable[[], None]]] = {"eager": (model, lambda: None)}
    hooked = diffusers_hooked(model, config, clock)
    if hooked is not None:
        methods["diffusers_pab"] = (hooked, lambda: HookRegistry.check_if_exists_or_initialize(hooked).reset_stateful_hooks())
    plain = vdopt.optimize(model, example_inputs=example)
    methods["vdopt"] = (plain, plain.reset)
    opt = vdopt.optimize(model, pab=config, example_inputs=example)
    opt.plans[0].program.variants()  # build every variant now, not inside the timed loop
    methods["vdopt_pab"] = (opt, opt.reset)

    result: dict[str, Any] = {
        "benchmark": "pab",
        **harness.stamp(args.device),
        "threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "model": args.model,
        "shape": f"batch {inputs['hidden_states'].shape[0]}, latent {tuple(inputs['hidden_states'].shape[1:])}",
        "dtype": args.dtype,
        "steps": args.steps,
        "schedule": "linear 999 -> 0, one call per step",
        "pab_config": {k: v for k, v in vars(config).items()},
        "methods": {},
    }
    clock_kind = args.clock if args.clock != "auto" else ("wall" if args.device.startswith("cuda") else "cpu")
    result["clock"] = clock_kind
    finals: dict[str, torch.Tensor] = {}
    walls: dict[str, list[float]] = {name: [] for name in methods}

    def generation(name: str, steps: list[float], record: bool) -> Callable[[], float]:
        fn, reset = methods[name]

        def run() -> float:
            reset()
            wall, cpu, final = generate(fn, inputs, steps, clock, args.device)
            if record:
                finals[name] = final
                walls[name].append(wall)
            return cpu if clock_kind == "cpu" else wall

        return run

    harness.warm_up({name: generation(name, warmup, record=False) for name in methods})
    times = harness.timing_rounds(
        {name: generation(name, timesteps, record=True) for name in methods}, repeats=args.repeats,
        on_time=lambda r, name, t: log.info("round %d %-14s %8.2f s %s (%.2f s wall)", r, name, t, clock_kind, walls[name][-1]),
    )
    for name, all_times in times.items():
        entry = harness.summary(all_times)
        entry.update(seconds_per_step=entry["seconds"] / args.steps, wall_seconds_all=walls[name])
        result["methods"][name] = entry
        log.info("%-14s %8.2f %s s  (%.1f ms/step, best of %d)", name, entry["seconds"], clock_kind,
                 1e3 * entry["seconds_per_step"], len(all_times))

    eager = result["methods"]["eager"]["seconds"]
    for name, entry in result["methods"].items():
        entry["speedup_vs_eager"] = eager / entry["seconds"]
    if "diffusers_pab" in result["methods"]:
        result["vdopt_pab_vs_diffusers_pab"] = result["methods"]["diffusers_pab"]["seconds"] / result["methods"]["vdopt_pab"]["seconds"]
        result["final_latent_rel_err_vdopt_pab_vs_diffusers_pab"] = harness.relative_error(finals["vdopt_pab"], finals["diffusers_pab"])
    result["final_latent_rel_err_vdopt_vs_eager"] = harness.relative_error(finals["vdopt"], finals["eager"])
    result["final_latent_rel_err_vdopt_pab_vs_eager"] = harness.relative_error(finals["vdopt_pab"], finals["eager"])
    result["vdopt_pab_summary"] = opt.plans[0].program.summary()
    result["load_average_at_end"] = list(os.getloadavg())

    stem = f"pab_{args.model}_{args.device.split(':')[0]}"
    harness.write_results(args.out, stem, result, plot=plot)
    return result


if __name__ == "__main__":
    main()
