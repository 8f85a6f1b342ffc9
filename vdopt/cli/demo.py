"""``vdopt demo``: text to a video file with an optimized diffusers pipeline, checked against
the unoptimized pipeline.

By default it builds a tiny random Wan pipeline (``vdopt.models.pipelines``: text encoder,
tokenizer, transformer, VAE, scheduler; nothing downloaded), optimizes the whole pipeline
with ``vdopt.optimize(pipe, mesh)`` for ``cfg=2, ulysses=2`` on 4 local gloo ranks (one
process each, as torchrun would), generates a video from a prompt, and every rank compares
its frames with the unoptimized pipeline's; rank 0 writes the video (``--out``). The Wan
pipeline calls its transformer separately for cond and uncond, so ``cfg=2`` shows the CFG
pairing of ``vdopt.runtime.cfg_pairing``.

With ``--model NAME`` the demo instead optimizes a zoo transformer alone and runs a DDIM
denoising loop on it, compared with the eager model.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from vdopt.cli import CommandError, error_line

MESH_AXES = ("cfg", "pipefusion", "ulysses", "ring", "dsp")

PIPELINE_CHOICES = ("wan", "wan22", "cogvideox", "hunyuanvideo", "ltx")
"""The tiny pipelines of ``vdopt.models.pipelines`` (listed here: the parser must not import it)."""

DEMO_SIZES = {name: dict(height=32, width=32) for name in ("wan", "wan22", "hunyuanvideo")}
"""Sizes above the tiny pipeline's own: Ulysses splits more than a token or two, and the
patch-parallel VAE gets a latent row per rank on 4 ranks. CogVideoX's tiny transformer is
built for its own 16x16 (its position table), so run it on 2 ranks (``--ulysses 1``)."""

NEGATIVE_PROMPT = "blurry low quality"

AXIS_HELP = {
    "cfg": "ranks the cond/uncond pair of classifier-free guidance is split over (1 or 2)",
    "pipefusion": "PipeFusion pipeline stages",
    "ulysses": "Ulysses sequence-parallel degree (all-to-all between heads and tokens)",
    "ring": "ring-attention degree (keys and values passed around a ring of ranks)",
    "dsp": "dynamic sequence-parallel degree (spatial-temporal models)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="optimize a small model on the CPU and check it against eager")
    p.add_argument("--pipeline", default="wan", choices=PIPELINE_CHOICES,
                   help="tiny random text-to-video pipeline to run (default wan); cogvideox and ltx run on 2 ranks "
                        "(--ulysses 1): their tiny sizes leave too few tokens and VAE rows for 4")
    p.add_argument("--prompt", default="a cat walking in the snow", help="the video's prompt")
    p.add_argument("--out", default="vdopt-demo.mp4", help="video file rank 0 writes (default vdopt-demo.mp4)")
    p.add_argument("--model", default=None,
                   help="instead of a pipeline, a zoo transformer alone in a DDIM loop, tiny configuration, random "
                        "weights: latte, wan, cogvideox, opensora or opensora_plan")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 4 for a pipeline, 8 for --model)")
    p.add_argument("--nproc", type=int, default=None,
                   help="local processes (gloo ranks) to run; must equal the product of the degrees (default: that product)")
    # The default mesh shows both kinds of split: cond/uncond over 2 ranks, tokens over 2.
    defaults = {"cfg": 2, "ulysses": 2}
    for axis in MESH_AXES:
        default = defaults.get(axis, 1)
        p.add_argument(f"--{axis}", type=int, default=default, help=f"{AXIS_HELP[axis]} (default {default})")
    p.add_argument("--pab", action="store_true", help="also run with Pyramid Attention Broadcast (approximate by design: reports its deviation from eager)")
    p.set_defaults(func=run)


def denoise(model, latents: torch.Tensor, kwargs: dict, steps: int) -> tuple[torch.Tensor, float]:
    """A real diffusers scheduler loop; returns the final latents and the seconds it took."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    start = time.perf_counter()
    for t in scheduler.timesteps:
        timestep = t.expand(latents.shape[0])
        out = model(**{**kwargs, "hidden_states": latents, "timestep": timestep})[0]
        if out.shape != latents.shape:  # learned sigma: keep the noise half of the channels
            dim = next(i for i, (a, b) in enumerate(zip(out.shape, latents.shape)) if a != b)
            out = out.narrow(dim, 0, latents.shape[dim])
        latents = scheduler.step(out, t, latents).prev_sample
    return latents, time.perf_counter() - start


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def pipeline_video(pipe, args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    """The pipeline's frames (F, H, W, 3 in [0, 1]) for the demo prompt, and the seconds it took."""
    from vdopt.models.pipelines import TINY_CALLS

    call = {**TINY_CALLS[args.pipeline], **DEMO_SIZES.get(args.pipeline, {})}
    start = time.perf_counter()
    frames = pipe(prompt=args.prompt, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(0), output_type="pt", **call).frames[0]
    return frames.permute(0, 2, 3, 1).contiguous(), time.perf_counter() - start


def pipeline_demo_rank(args: argparse.Namespace) -> dict:
    """Text -> video: the unoptimized pipeline, then the same pipeline optimized; rank 0 writes it."""
    import torch.distributed as dist

    import vdopt
    from vdopt.models.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline(args.pipeline)
    with torch.no_grad():
        reference, eager_s = pipeline_video(pipe, args)
    mesh = vdopt.Mesh(**{axis: getattr(args, axis) for axis in MESH_AXES})
    vdopt.optimize(pipe, mesh)
    first, first_s = pipeline_video(pipe, args)  # the first call of each component captures and rewrites it
    frames, opt_s = pipeline_video(pipe, args)
    summary = {"eager_s": eager_s, "first_s": first_s, "vdopt_s": opt_s,
               "rel_err": max(relative_error(first, reference), relative_error(frames, reference)),
               "report": vdopt.report(pipe), "frames": tuple(frames.shape)}
    pairing = getattr(pipe.transformer, "stats", None)
    if pairing is not None:
        summary["pairing"] = vars(pairing)
    if args.pab:
        pab_pipe = vdopt.optimize(build_tiny_pipeline(args.pipeline), mesh, pab=vdopt.PABConfig())
        pipeline_video(pab_pipe, args)
        pab_frames, pab_s = pipeline_video(pab_pipe, args)
        summary.update(pab_s=pab_s, pab_rel_err=relative_error(pab_frames, reference))
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        from diffusers.utils import export_to_video

        summary["wrote"] = export_to_video(list(frames.numpy()), args.out, fps=8, macro_block_size=1)
    return summary


def demo_rank(args: argparse.Namespace) -> dict:
    if args.model is None:
        return pipeline_demo_rank(args)
    import vdopt
    from vdopt.models import build

    torch.manual_seed(0)
    model, margs, mkwargs = build(args.model, "tiny", batch=2 if args.cfg > 1 else None)
    kwargs = vdopt.capture.bind_call(model, margs, mkwargs)
    latents = kwargs.pop("hidden_states")
    with torch.no_grad():
        reference, eager_s = denoise(model, latents, kwargs, args.steps)
    mesh = vdopt.Mesh(**{axis: getattr(args, axis) for axis in MESH_AXES})
    opt = vdopt.optimize(model, mesh)
    result, _ = denoise(opt, latents, kwargs, 1)  # first call captures and rewrites
    opt.reset()
    result, opt_s = denoise(opt, latents, kwargs, args.steps)
    summary = {"eager_s": eager_s, "vdopt_s": opt_s, "rel_err": relative_error(result, reference), "report": opt.report()}
    if args.pab:
        pab_opt = vdopt.optimize(model, mesh, pab=vdopt.PABConfig())
        denoise(pab_opt, latents, kwargs, 1)
        pab_opt.reset()
        pab_result, pab_s = denoise(pab_opt, latents, kwargs, args.steps)
        summary.update(pab_s=pab_s, pab_rel_err=relative_error(pab_result, reference), pab_report=pab_opt.report())
    return summary


def _demo_on_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    return demo_rank(args)


RANK_GRACE_S = 15.0
"""After one rank fails, how long the others get to report before they are stopped (a rank
waiting in a collective for the failed one would otherwise sit out the group's timeout)."""

RUN_TIMEOUT_S = 1800.0
"""The whole demo on every rank (about a minute on two CPU cores)."""


def run_ranks(args: argparse.Namespace, world: int) -> list[dict]:
    """``demo_rank`` on ``world`` local gloo ranks; a failure is one ``CommandError`` for all."""
    from vdopt.runtime.local_ranks import LocalRanksError, run_local_ranks

    try:
        return run_local_ranks(world, _demo_on_rank, args, backend="gloo", timeout=RUN_TIMEOUT_S, grace=RANK_GRACE_S,
                               describe=functools.partial(error_line, verbose=True))
    except LocalRanksError as error:  # -v shows it, with each distinct failure's traceback
        raise CommandError(error.summary()) from error


def run(args: argparse.Namespace) -> int:
    degrees = {axis: getattr(args, axis) for axis in MESH_AXES}
    world = 1
    for d in degrees.values():
        world *= d
    nproc = args.nproc or world
    if nproc != world:
        raise ValueError(f"--nproc {nproc} but the mesh degrees {degrees} need {world} ranks (their product): "
                         f"drop --nproc or change the degrees")
    if args.steps is None:
        args.steps = 8 if args.model is not None else 4
    summaries = run_ranks(args, world) if world > 1 else [demo_rank(args)]
    first = summaries[0]
    print(first["report"])
    print()
    if args.model is None:
        return print_pipeline_summary(args, degrees, world, summaries)
    mesh = ", ".join(f"{a}={d}" for a, d in degrees.items() if d > 1) or "one device"
    print(f"vdopt demo: {args.model} (tiny), {args.steps} DDIM steps, mesh: {mesh}, {world} rank(s) over gloo")
    worst = max(s["rel_err"] for s in summaries)
    print(f"  eager           {first['eager_s']:.3f} s")
    print(f"  vdopt           {first['vdopt_s']:.3f} s   max relative error vs eager over ranks: {worst:.2e}")
    if args.pab:
        print(f"  vdopt + PAB     {first['pab_s']:.3f} s   relative deviation from eager (approximate by design): {first['pab_rel_err']:.2e}")
    ok = worst <= 1e-4
    print("  result: " + ("matches eager" if ok else "MISMATCH against eager"))
    return 0 if ok else 1


def print_pipeline_summary(args: argparse.Namespace, degrees: dict[str, int], world: int, summaries: list[dict]) -> int:
    first = summaries[0]
    mesh = ", ".join(f"{a}={d}" for a, d in degrees.items() if d > 1) or "one device"
    frames, height, width, _ = first["frames"]
    print(f"vdopt demo: text -> video, tiny random {args.pipeline} pipeline, {args.steps} steps, {frames} frames "
          f"{width}x{height}, mesh: {mesh}, {world} rank(s) over gloo")
    worst = max(s["rel_err"] for s in summaries)
    print(f"  unoptimized pipeline   {first['eager_s']:.3f} s")
    print(f"  vdopt, first call      {first['first_s']:.3f} s   (captures and rewrites each component)")
    print(f"  vdopt                  {first['vdopt_s']:.3f} s   max relative error vs unoptimized over ranks: {worst:.2e}")
    pairing = first.get("pairing")
    if pairing is not None:
        print(f"  CFG pairing: {pairing['paired']} step(s) ran cond and uncond at once on the two cfg-halves, "
              f"{pairing['serial']} call(s) one half at a time (each generation's first step), "
              f"{pairing['split']} batch split(s)")
    if args.pab:
        print(f"  vdopt + PAB            {first['pab_s']:.3f} s   relative deviation from unoptimized "
              f"(approximate by design): {first['pab_rel_err']:.2e}")
    print(f"  wrote {first['wrote']}")
    ok = worst <= 1e-4
    print("  result: " + ("matches the unoptimized pipeline" if ok else "MISMATCH against the unoptimized pipeline"))
    return 0 if ok else 1
