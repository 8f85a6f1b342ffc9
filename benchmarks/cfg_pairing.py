"""CFG parallel for separate cond/uncond calls (pairing) against the batch split, on 2 ranks.

    python benchmarks/cfg_pairing.py                         # CPU: 2 gloo ranks, mid-size Wan
    python benchmarks/cfg_pairing.py --out benchmarks/results

The loop is WanPipeline's (``e2e_workload.generate``: per step a cond and an uncond call at
the same timestep, guidance 5.0, diffusers' UniPC scheduler). Methods, every one on the same
2 ranks, timed per generation (wall clock, the slower rank), generations interleaved:

* ``one_device``: ``vdopt.optimize(model, mesh, disable_passes=("cfg_parallel",))``: each rank
  runs both calls of a step whole, alone, with no communication (one device's work with
  vdopt's graph: the reference time);
* ``batch_split``: ``vdopt.optimize(model, Mesh(cfg=2))`` called once per step with cond and
  uncond concatenated in one batch of 2 (the loop CogVideoX's pipeline has): the CFG pass
  splits the batch, one half per rank;
* ``pairing``: ``vdopt.api.optimize_denoiser(model, Mesh(cfg=2))`` (what ``vdopt.optimize(pipe)``
  puts in a pipeline) with the loop unchanged, two calls per step: the first step runs its
  calls one half at a time, every later step runs both at once (``vdopt.runtime.cfg_pairing``).

The final latents of every method are compared with ``one_device`` (relative error), so a
speed-up never comes from computing something else. Each rank runs one thread.

Results: ``--out`` (default ``./vdopt-results``) gets ``cfg_pairing_<config>_cpu.json``,
``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import e2e_workload as workload  # noqa: E402

log = logging.getLogger("vdopt.benchmarks.cfg_pairing")

METHODS = ("one_device", "batch_split", "pairing")


def _batched_generate(fn, cfg, latents, prompt, negative):
    """The same loop with cond and uncond in one call (batch 2)."""
    import time

    import torch

    sched = workload.scheduler()
    sched.set_timesteps(cfg.steps, device=latents.device)
    x = latents.clone()
    text = torch.cat([prompt, negative])
    start = time.perf_counter()
    with torch.no_grad():
        for t in sched.timesteps:
            both = fn(hidden_states=torch.cat([x, x]), timestep=t.expand(2), encoder_hidden_states=text,
                      return_dict=False)[0]
            cond, uncond = both.chunk(2)
            x = sched.step((uncond + cfg.guidance * (cond - uncond)).float(), t, x, return_dict=False)[0]
    return time.perf_counter() - start, x


def _rank(rank: int, world: int, cfg: workload.BenchConfig, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    import vdopt
    from vdopt.api import optimize_denoiser
    from vdopt.passes.parallel.cfg_parallel import CFGParallel

    model, latents, prompt, negative = workload.build(cfg)
    mesh = vdopt.Mesh(cfg=2)
    times = {name: [] for name in METHODS}
    # cfg_parallel off: every rank runs each call whole, alone (one device's work, vdopt's graph)
    fns = {"one_device": vdopt.optimize(model, mesh, disable_passes=(CFGParallel.name,)),
           "batch_split": vdopt.optimize(model, mesh),
           "pairing": optimize_denoiser(model, mesh, dict(disable_passes=()))}

    def run(name):
        fn = fns[name]
        fn.reset()
        dist.barrier()
        if name == "batch_split":
            seconds, x = _batched_generate(fn, cfg, latents, prompt, negative)
        else:
            seconds, _, x = workload.generate(fn, cfg, latents, prompt, negative, {}, lambda: None)
        slowest = torch.tensor([seconds])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest), x

    finals = {name: run(name)[1] for name in fns}  # warm-up: captures
    for _ in range(repeats):
        for name in fns:
            times[name].append(run(name)[0])
    errors = {name: harness.relative_error(finals[name], finals["one_device"]) for name in METHODS}
    return {"times": times, "errors": errors, "pairing_stats": vars(fns["pairing"].stats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the mid-size Wan")
    parser.add_argument("--frames", type=int, default=17, help="video frames (pixel space)")
    parser.add_argument("--height", type=int, default=128, help="video height in pixels")
    parser.add_argument("--width", type=int, default=128, help="video width in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per method")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    harness.configure_logging()

    from vdopt.runtime.local_ranks import run_local_ranks

    cfg = workload.BenchConfig(layers=args.layers, frames=args.frames, height=args.height, width=args.width,
                               steps=args.steps)
    got = run_local_ranks(2, _rank, cfg, args.repeats, backend="gloo", timeout=3600, pg_timeout=600)[0]
    rows = {name: harness.summary(got["times"][name]) for name in METHODS}
    base = rows["one_device"]["seconds"]
    for name, row in rows.items():
        row["speedup_vs_one_device"] = base / row["seconds"]
        row["rel_err_vs_one_device"] = got["errors"][name]
    report = {
        **harness.stamp("cpu"),
        "config": dataclasses.asdict(cfg),
        "ranks": 2,
        "threads_per_rank": 1,
        "tokens_per_call": workload.tokens_per_call(cfg),
        "methods": rows,
        "pairing_stats": got["pairing_stats"],
    }
    lines = [
        f"# CFG pairing vs batch split: {cfg.name}, {cfg.steps} steps, 2 gloo ranks",
        "",
        f"{report['date']}, {report['device']}, torch {report['versions']['torch']}, "
        f"diffusers {report['versions']['diffusers']}; one thread per rank; wall clock, the slower rank, "
        f"best of {args.repeats} interleaved generations.",
        "",
        "| method | s / generation | median | speed-up vs one device | rel. error vs one device |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['seconds']:.3f} | {row['seconds_median']:.3f} | "
                     f"{row['speedup_vs_one_device']:.2f}x | {row['rel_err_vs_one_device']:.1e} |")
    s = got["pairing_stats"]
    lines += ["", f"pairing: {s['paired']} step(s) paired, {s['serial']} call(s) one half at a time, "
                  f"{s['misses']} miss(es), over the warm-up and timed generations."]
    markdown = "\n".join(lines) + "\n"

    def plot(report, path):
        plt = harness.pyplot()
        fig, ax = plt.subplots(figsize=(5, 3))
        names = list(report["methods"])
        ax.bar(names, [report["methods"][n]["seconds"] for n in names], color=["gray", "tab:blue", "tab:orange"])
        ax.set_ylabel("seconds per generation")
        ax.set_title(f"CFG on 2 ranks: {cfg.name}, {cfg.steps} steps", fontsize=9)
        harness.save_figure(fig, path, dpi=100)

    path = harness.write_results(args.out, f"cfg_pairing_{cfg.name}_cpu", report, markdown=markdown, plot=plot)
    print(markdown)
    print(f"wrote {path}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
