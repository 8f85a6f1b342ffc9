"""PipeFusion: per-step time and per-rank memory, pipefusion=2 against one device, on this CPU.

    python benchmarks/pipefusion.py                 # mid-size Wan, 8 blocks, 20 steps, M = 2 and 4
    python benchmarks/pipefusion.py --patches 2 4 8 --steps 30

Methods, each in fresh processes:

* ``single``: ``vdopt.optimize(model)`` on one process (the one-device baseline), one thread;
  ``single_2threads``: the same with two threads (the cores the two pipefusion ranks use);
* ``pipefusion2_M<m>``: ``vdopt.optimize(model, Mesh(pipefusion=2), pipefusion=PipeFusionConfig(
  patches=m, warmup_steps=1))`` on two gloo ranks (two processes on this machine's cores).

On the same ranks, whole generations of the two loops, alternating: the model called step by
step (the pipeline filled and drained in every call) and ``opt.denoise`` (the pipeline full
across steps, drained once per generation); their gain and the difference of their latents.

The loop is a plain schedule (linear 999 -> 0, one call per step, an Euler update of the
latent from the prediction), so every step after the first is a pipelined PipeFusion step.
Per method: seconds per step (wall time of every step after the first two; min and median, the
machine may be shared), per rank: the parameter bytes the rank's graphs hold, the K/V cache
bytes and the peak resident set (which includes the caller's own copy of the model: vdopt
never frees the user's module), and the final latent's error against ``single``.

Then a projection, **not a measurement**, for Wan2.1-T2V-1.3B at 81x480x832 on GPUs: per call
``compute(1) * (M + N - 1) / (N * M)`` (balanced stages, the pipeline filled and drained in
every call) plus ``N - 1`` point-to-point hops of one patch's activations and the output
broadcast, each ``latency + bytes / bandwidth`` (scaling.py's link models), with
``compute(1)`` = a measured diffusers eager call on one H100 (``scaling.ANCHOR_STEP_S``). The same formula with this
CPU's measured single-process step and a measured gloo hop is checked against the measured
pipefusion=2 step.

``--quick``: 2 blocks, a 5x64x64 video, 4 steps, M = 2 only: a smoke run, not a measurement.

Results: ``--out`` (default ``./vdopt-results``) gets ``pipefusion_<config>_cpu.{json,md,png}``
with device, versions and date. Benchmarks never gate CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vdopt.runtime.local_ranks import run_local_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import scaling  # noqa: E402  (link models and the H100 anchor)
from e2e_worker import peak_rss_bytes  # noqa: E402
from e2e_workload import MID_WAN, BenchConfig, build  # noqa: E402  (the mid-size Wan and its inputs)

QUICK = {"layers": 2, "frames": 5, "height": 64, "width": 64, "steps": 4, "patches": [2], "repeats": 1}
"""``--quick``: a smoke run; explicit options override it."""

DEFAULTS = {"layers": 8, "frames": 17, "height": 256, "width": 256, "steps": 20, "patches": [2, 4], "repeats": 3}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    cfg: BenchConfig
    """Model and video size (``e2e``'s mid-size Wan)."""
    steps: int
    """Denoising steps per generation."""
    repeats: int = 3
    """Generations per mode in the across-steps comparison (alternating; the minimum is reported)."""


def _schedule(steps: int) -> list[float]:
    return [999.0 * (1 - i / steps) for i in range(steps)]


def _loop(opt, latents, prompt, steps: int, barrier=None) -> tuple[torch.Tensor, list[float]]:
    times = []
    x = latents
    ts = _schedule(steps)
    for i, t in enumerate(ts):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        out = opt(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=prompt, return_dict=False)[0]
        times.append(time.perf_counter() - start)
        dt = (t - (ts[i + 1] if i + 1 < steps else 0.0)) / 1000
        x = x - dt * out
    return x, times


def _euler(ts: list[float]):
    """The loop's update as ``opt.denoise`` takes it: ``update(s, x, out)``."""
    def update(s: int, x: torch.Tensor, out) -> torch.Tensor:
        dt = (ts[s] - (ts[s + 1] if s + 1 < len(ts) else 0.0)) / 1000
        return x - dt * out[0]
    return update


def _generations(opt, latents, prompt, steps: int, repeats: int, barrier) -> dict[str, Any]:
    """Whole generations, alternating: called step by step (``_loop``, the pipeline drained in every
    call) and ``opt.denoise`` (the pipeline full across steps). Wall seconds of each (rank 0's clock
    after a barrier), and the two final latents."""
    ts = _schedule(steps)
    update = _euler(ts)
    timesteps = [torch.tensor([t]) for t in ts]
    times: dict[str, list[float]] = {"step_by_step": [], "across_steps": []}
    latents_of = {}
    for _ in range(repeats):
        for mode in times:
            barrier()
            start = time.perf_counter()
            if mode == "step_by_step":
                opt.reset()
                x, _ = _loop(opt, latents, prompt, steps)
            else:
                x = opt.denoise(latents, timesteps, update, encoder_hidden_states=prompt, return_dict=False)
            barrier()
            times[mode].append(time.perf_counter() - start)
            latents_of[mode] = x
    return {"times": times, "latents": latents_of}


def _summary(times: list[float]) -> dict[str, float]:
    timed = times[2:] or times
    return {"step_s_min": min(timed), "step_s_median": statistics.median(timed), "first_step_s": times[0]}


def _single(rank: int, world: int, run: Run) -> dict[str, Any]:
    import vdopt

    model, latents, prompt, _ = build(run.cfg)
    opt = vdopt.optimize(model)
    x, times = _loop(opt, latents, prompt, run.steps)
    from vdopt.passes.pipefusion.stage_split import parameter_bytes

    params = parameter_bytes(model)
    return {"times": times, **_summary(times), "latent": x.numpy(), "param_bytes": params, "total_param_bytes": params,
            "peak_rss_bytes": peak_rss_bytes()}


def _rank(rank: int, world: int, run: Run, patches: int) -> dict[str, Any]:
    import torch.distributed as dist

    import vdopt

    model, latents, prompt, _ = build(run.cfg)
    opt = vdopt.optimize(model, vdopt.Mesh(pipefusion=world),
                         pipefusion=vdopt.PipeFusionConfig(patches=patches, warmup_steps=1))
    x, times = _loop(opt, latents, prompt, run.steps, barrier=dist.barrier)
    program = opt.plans[0].program
    counts = dict(program.counts)
    gens = _generations(opt, latents, prompt, run.steps, run.repeats, dist.barrier)
    hop = _measure_hop(rank, program)
    return {
        "times": times, **_summary(times), "latent": x.numpy(),
        "param_bytes": program.param_bytes(), "total_param_bytes": program.total_param_bytes,
        "kv_cache_bytes": program.cache_bytes(), "peak_rss_bytes": peak_rss_bytes(),
        "stage_blocks": program.figures["stage_blocks"], "axis": program.figures["axis"],
        "patch_sizes": program.figures["sizes"], "hop_s": hop, "counts": counts,
        "generation_s": gens["times"], "loops": dict(program.loops),
        "across_vs_step_by_step_err": harness.relative_error(gens["latents"]["across_steps"],
                                                             gens["latents"]["step_by_step"]),
    }


def _measure_hop(rank: int, program) -> dict[str, float]:
    """Seconds to send one patch's activations from stage 0 to stage 1 (gloo, this machine)."""
    import torch.distributed as dist

    shapes = [p.meta["val"] for p in list(program.graphs.patches[0].gm.graph.find_nodes(op="placeholder"))]
    if rank == 1:
        acts = [torch.empty(v.shape, dtype=v.dtype) for v in shapes[: program.graphs.received]]
    else:
        acts = None
    sizes = torch.zeros(1, dtype=torch.int64)
    if rank == 1:
        sizes[0] = sum(a.numel() * a.element_size() for a in acts)
    dist.broadcast(sizes, src=1)
    payload = torch.empty(int(sizes[0]) // 4, dtype=torch.float32)
    times = []
    for _ in range(10):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(payload, dst=1)
        else:
            dist.recv(payload, src=0)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return {"bytes": int(sizes[0]), "seconds": min(times)}


def run_single(run: Run, threads: int = 1) -> dict[str, Any]:
    return run_local_ranks(1, _single, run, group=False, threads_per_rank=threads, timeout=3600)[0]


def run_pipefusion(run: Run, patches: int, world: int = 2) -> list[dict[str, Any]]:
    return run_local_ranks(world, _rank, run, patches, backend="gloo", timeout=3600, pg_timeout=600)


# -- projection --------------------------------------------------------------------------------

WAN13 = {"tokens": 21 * 30 * 52, "hidden": 1536, "bytes": 2, "output_elems": 16 * 21 * 60 * 104}
"""Wan2.1-T2V-1.3B at 81x480x832, bf16: 32760 tokens of width 1536 cross each stage boundary
per call (plus a (1, 6, 1536) time embedding); the output latent is 16x21x60x104."""


def pipefusion_seconds(compute_1: float, stages: int, patches: int, hop_bytes: float, out_bytes: float,
                       bandwidth: float, latency: float) -> float:
    """Per-call time: pipeline fill and drain within the call, one patch per hop on the critical path."""
    compute = compute_1 * (patches + stages - 1) / (stages * patches)
    hops = (stages - 1) * (latency + hop_bytes / patches / bandwidth)
    broadcast = latency + out_bytes / bandwidth
    return compute + hops + broadcast


def project() -> list[dict[str, Any]]:
    rows = []
    links = scaling.links()
    boundary = WAN13["tokens"] * WAN13["hidden"] * WAN13["bytes"]
    out_bytes = WAN13["output_elems"] * WAN13["bytes"]
    for stages in (2, 4, 8):
        for patches in (stages, 2 * stages, 4 * stages):
            by_link = {}
            for link, spec in links.items():
                t = pipefusion_seconds(scaling.ANCHOR_STEP_S, stages, patches, boundary, out_bytes,
                                       spec.bandwidth_gbps * 1e9, spec.latency_us * 1e-6)
                by_link[link] = {"seconds": t, "speedup": scaling.ANCHOR_STEP_S / t}
            rows.append({"stages": stages, "patches": patches, "boundary_bytes": boundary,
                         "param_fraction_per_rank": 1 / stages, "by_link": by_link})
    return rows


# -- output ----------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    mib = 2**-20
    lines = [
        f"# PipeFusion on this CPU: {report['model']}",
        "",
        f"{report['device']}; {report['date']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        f"{report['shape']}, {report['steps']} steps (linear schedule, one call per step, warmup 1 exact step), "
        "one thread per pipefusion rank. Step times: every step after the first two; the machine may be shared "
        "with other work, so the minimum is the least-disturbed figure.",
        "",
        "| method | s/step (min) | s/step (median) | speed-up (min) | params held / rank | K/V cache / rank | peak RSS / rank | latent error vs single |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = report["methods"]["single"]["step_s_min"]
    for name, m in report["methods"].items():
        ranks = m.get("ranks", [m])
        held = " / ".join(f"{r['param_bytes'] * mib:.1f}" for r in ranks) + f" of {ranks[0]['total_param_bytes'] * mib:.1f} MiB"
        cache = " / ".join(f"{r.get('kv_cache_bytes', 0) * mib:.1f}" for r in ranks) + " MiB"
        rss = " / ".join(f"{r['peak_rss_bytes'] * mib:.0f}" for r in ranks) + " MiB"
        err = f"{m['latent_rel_err']:.1e}" if "latent_rel_err" in m else "-"
        lines.append(f"| {name} | {m['step_s_min']:.3f} | {m['step_s_median']:.3f} | {base / m['step_s_min']:.2f}x | "
                     f"{held} | {cache} | {rss} | {err} |")
    check = report.get("formula_check")
    if check:
        lines += ["", "Formula check on this CPU (pipefusion=2): "
                  + "; ".join(f"M={c['patches']}: projected {c['projected_s']:.3f} s, measured {c['measured_s']:.3f} s "
                              f"({100 * (c['projected_s'] / c['measured_s'] - 1):+.0f}%)" for c in check)
                  + f". Gloo hop: {check[0]['hop_bytes'] * mib:.2f} MiB in {check[0]['hop_s'] * 1e3:.2f} ms."]
    if report.get("across_steps"):
        lines += [
            "",
            "## The pipeline full across steps (`opt.denoise`) against drained in every call (`opt(...)` per step)",
            "",
            "Whole generations on the same two ranks, the two loops alternating (best of "
            f"{len(report['across_steps'][0]['across_steps_all'])} each, wall time of rank 0 between barriers); "
            "both run 1 exact warm-up step, then pipelined steps with the same stale K/V, so their latents agree.",
            "",
            "| patches M | step by step: s / generation | across steps: s / generation | gain | latent difference |",
            "|---|---|---|---|---|",
        ]
        for a in report["across_steps"]:
            lines.append(f"| {a['patches']} | {a['step_by_step_s']:.2f} | {a['across_steps_s']:.2f} | "
                         f"{a['gain']:.2f}x | {a['latent_rel_err']:.1e} |")
    lines += [
        "",
        "## Projection (not a measurement): Wan2.1-T2V-1.3B, 81x480x832, bf16, GPUs",
        "",
        f"compute(1) = {scaling.ANCHOR_STEP_S * 1e3:.0f} ms per call (diffusers eager, one H100); per call "
        "compute(1)(M+N-1)/(NM) + (N-1) hops of one patch + the output broadcast; no other overlap. "
        "Parameters per rank: about 1/N of the blocks (plus the small prologue/epilogue).",
        "",
        "| stages N | patches M | " + " | ".join(f"{l}: speed-up" for l in scaling.LINK_ROWS) + " |",
        "|---|---|" + "---|" * len(scaling.LINK_ROWS),
    ]
    for row in report["projection"]:
        lines.append(f"| {row['stages']} | {row['patches']} | "
                     + " | ".join(f"{row['by_link'][l]['speedup']:.2f}x" for l in scaling.LINK_ROWS) + " |")
    lines += ["", "These figures assume the pipeline is filled and drained inside every call (the model called "
              "step by step: the scheduler step between calls is outside the model), the (N-1)/(M+N-1) bubble; "
              "`opt.denoise` keeps it full across steps, as xDiT does (section above)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["methods"])
    ax1.bar(names, [report["methods"][n]["step_s_min"] for n in names], color="tab:blue")
    ax1.set_ylabel("seconds per step (min)")
    ax1.set_title("measured on this CPU", fontsize=10)
    ax1.tick_params(axis="x", rotation=20)
    link = next(iter(scaling.LINK_ROWS))
    for stages in (2, 4, 8):
        rows = [r for r in report["projection"] if r["stages"] == stages]
        ax2.plot([r["patches"] for r in rows], [r["by_link"][link]["speedup"] for r in rows], marker="o", label=f"N={stages}")
    ax2.set_xlabel("patches M")
    ax2.set_ylabel("projected speed-up per call")
    ax2.set_title(f"projection: Wan2.1-1.3B 81x480x832, {link}", fontsize=10)
    ax2.legend()
    harness.save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 blocks, 5x64x64 video, 4 steps, M = 2 only")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks of the mid-size Wan (default 8)")
    p.add_argument("--frames", type=int, default=None, help="video frames in pixel space (default 17)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (default 256)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (default 256)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20)")
    p.add_argument("--patches", type=int, nargs="+", default=None, help="patch counts M to run, one pipefusion=2 method each (default 2 4)")
    p.add_argument("--repeats", type=int, default=None,
                   help="generations per mode (step by step, across steps) on the pipefusion ranks, alternating (default 3)")
    harness.add_out_argument(p)
    args = p.parse_args(argv)
    for key in DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, (QUICK if args.quick else DEFAULTS)[key])
    harness.configure_logging()
    cfg = BenchConfig(layers=args.layers, frames=args.frames, height=args.height, width=args.width, guidance=1.0)
    run = Run(cfg=cfg, steps=args.steps, repeats=args.repeats)
    single = run_single(run)
    methods: dict[str, Any] = {"single": {k: v for k, v in single.items() if k != "latent"}}
    # the same cores as two one-thread ranks
    methods["single_2threads"] = {k: v for k, v in run_single(run, threads=2).items() if k != "latent"}
    check = []
    across: list[dict[str, Any]] = []
    for m in args.patches:
        ranks = run_pipefusion(run, m)
        err = harness.relative_error(torch.from_numpy(ranks[0]["latent"]), torch.from_numpy(single["latent"]))
        gens = ranks[0]["generation_s"]
        across.append({
            "patches": m, "step_by_step_s": min(gens["step_by_step"]), "across_steps_s": min(gens["across_steps"]),
            "step_by_step_all": gens["step_by_step"], "across_steps_all": gens["across_steps"],
            "gain": min(gens["step_by_step"]) / min(gens["across_steps"]),
            "latent_rel_err": ranks[0]["across_vs_step_by_step_err"], "loops": ranks[0]["loops"],
        })
        methods[f"pipefusion2_M{m}"] = {
            "step_s_min": ranks[0]["step_s_min"], "step_s_median": ranks[0]["step_s_median"],
            "latent_rel_err": err, "axis": ranks[0]["axis"], "patch_sizes": ranks[0]["patch_sizes"],
            "stage_blocks": ranks[0]["stage_blocks"], "counts": ranks[0]["counts"],
            "ranks": [{k: v for k, v in r.items() if k not in ("latent", "stage_blocks")} for r in ranks],
        }
        hop = ranks[0]["hop_s"]
        check.append({
            "patches": m, "hop_bytes": hop["bytes"], "hop_s": hop["seconds"],
            # the measured hop moves one patch's activations
            "projected_s": single["step_s_min"] * (m + 1) / (2 * m) + hop["seconds"],
            "measured_s": ranks[0]["step_s_min"],
        })
    from vdopt.models.diffusers_models import wan_latent_size

    latent = wan_latent_size(cfg.frames, cfg.height, cfg.width)
    T, H, W = latent[0], latent[1] // 2, latent[2] // 2  # Wan's patch size (1, 2, 2)
    report = {
        "benchmark": "pipefusion",
        **harness.stamp("cpu"),
        "model": f"Wan2.1 architecture, mid-size {MID_WAN | {'num_layers': cfg.layers}} (random weights)",
        "shape": f"video {cfg.frames}x{cfg.height}x{cfg.width}, token grid T={T} H={H} W={W} ({T * H * W} tokens)",
        "steps": run.steps,
        "methods": methods,
        "formula_check": check,
        "across_steps": across,
        "projection": project(),
    }
    text = markdown(report)
    harness.write_results(args.out, f"pipefusion_{cfg.name}_cpu", report, markdown=text, plot=plot)
    print(text)
    return report


if __name__ == "__main__":
    main()
