"""``vdopt demo``: optimize a small zoo model, run a denoising loop, compare with eager.

With ``--nproc N`` the demo runs on N local gloo ranks (one process each), as torchrun would,
and every rank checks its output against the single-device eager model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

MESH_AXES = ("cfg", "pipefusion", "ulysses", "ring", "dsp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="optimize a small model on the CPU and check it against eager")
    p.add_argument("--model", default="latte", help="zoo model (default latte)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--nproc", type=int, default=None, help="local gloo ranks (default: product of the degrees)")
    # The default mesh shows both kinds of split: cond/uncond over 2 ranks, tokens over 2.
    defaults = {"cfg": 2, "ulysses": 2}
    for axis in MESH_AXES:
        default = defaults.get(axis, 1)
        p.add_argument(f"--{axis}", type=int, default=default, help=f"{axis} degree (default {default})")
    p.add_argument("--pab", action="store_true", help="also run with Pyramid Attention Broadcast")
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


def demo_rank(args: argparse.Namespace) -> dict:
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


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        summary = demo_rank(args)
        queue.put((rank, summary))
    finally:
        dist.destroy_process_group()


def run_ranks(args: argparse.Namespace, world: int) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise SystemExit(f"vdopt demo: ranks {failed} failed (see their tracebacks above)")
    results = dict(queue.get() for _ in range(world))
    return [results[r] for r in range(world)]


def run(args: argparse.Namespace) -> int:
    degrees = {axis: getattr(args, axis) for axis in MESH_AXES}
    world = 1
    for d in degrees.values():
        world *= d
    nproc = args.nproc or world
    if nproc != world:
        raise SystemExit(f"vdopt demo: --nproc {nproc} but the mesh degrees {degrees} need {world} ranks")
    summaries = run_ranks(args, world) if world > 1 else [demo_rank(args)]
    first = summaries[0]
    print(first["report"])
    print()
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
