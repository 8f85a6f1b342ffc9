"""The end-to-end benchmark's worker process: one method, driven by command files.

The parent (``e2e_driver``) starts ``e2e.py --worker METHOD ...`` once per method (under
torchrun for a mesh) and writes commands to ``<dir>/cmd<n>``; rank 0 answers each with
``<dir>/done<n>``. Files, not pipes, so that every rank of a torchrun group reads the same
commands and the parent needs no channel into torchrun's children.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import harness
from e2e_workload import BenchConfig, build, diffusers_pab, generate, make_inputs, pab_config, scheduler

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def post(path: Path, text: str) -> None:
    """Write ``path`` whole: the other process polls for it and must never read it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for(path: Path, poll_s: float = 0.02) -> str:
    while not path.exists():
        time.sleep(poll_s)
    return path.read_text()


def worker(method: str, cfg: BenchConfig, out: Path, spawn_time: float, extra: dict[str, Any]) -> None:
    """Set ``method`` up in this process, then run the parent's commands from ``out``/cmd<n>.

    Commands: ``warmup`` (the first generation), ``run`` (one timed generation), ``stop``
    (write ``result.json`` and the final latents ``final.pt``). Rank 0 answers each with
    ``done<n>``. Every rank of a mesh reads the same commands, so they stay in step.
    """
    import torch
    import torch.distributed as dist

    import vdopt

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank of a mesh
    clock = {"t": 0}
    reset: Callable[[], None] = lambda: None  # noqa: E731
    result: dict[str, Any] = {"method": method}
    setup_start = time.perf_counter()
    if method == "vdopt_artifact":
        fn = vdopt.load(extra["artifact"])
        reset = fn.reset
        result["load_s"] = fn.startup_s
        latents, prompt, negative = make_inputs(cfg)
    else:
        model, latents, prompt, negative = build(cfg)
        if method == "diffusers_eager":
            fn = model
        elif method == "diffusers_compile":
            fn = torch.compile(model)
        elif method == "diffusers_pab":
            fn, reset = diffusers_pab(model, cfg, clock)
        elif method.startswith("vdopt"):
            mesh = vdopt.Mesh(**extra.get("mesh", {}))
            pab = pab_config(cfg) if "pab" in method else None
            kernels = "triton" if method.endswith("triton") else "auto"
            # compiled everywhere like diffusers_compile (vdopt's own default compiles on CUDA
            # only), except vdopt_eager, the uncompiled executable beside diffusers_eager
            fn = vdopt.optimize(model, mesh, pab=pab, kernels=kernels, compile=method != "vdopt_eager")
            reset = fn.reset
        else:
            raise ValueError(f"unknown method {method!r}")
    result["setup_s"] = time.perf_counter() - setup_start
    # From torchrun's environment: the process group may only start on the first call.
    rank = int(os.environ.get("RANK", 0))
    first: dict[str, float] = {}

    def on_first() -> None:
        if not first:
            harness.sync(cfg.device)
            first["t"] = time.time() - spawn_time
            first["call"] = time.perf_counter()

    times: list[float] = []
    wall: list[float] = []
    # CPU time only in one process: a mesh's rank 0 would not count its waits on the others
    cpu_clock = cfg.clock == "cpu" and "mesh" not in extra
    final = None
    for n in itertools.count():
        command = wait_for(out / f"cmd{n}")
        answer: dict[str, Any] = {}
        if command == "warmup":
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            result["rss_before_first_call_bytes"] = rss_bytes()
            call_start = time.perf_counter()
            reset()
            wall_s, cpu_s, _ = generate(fn, cfg, latents, prompt, negative, clock, on_first)
            answer["seconds"] = cpu_s if cpu_clock else wall_s
            result.update(first_generation_s=answer["seconds"], time_to_first_output_s=first["t"],
                          first_call_s=first["call"] - call_start)
        elif command == "run":
            if dist.is_initialized():
                dist.barrier()
            reset()
            wall_s, cpu_s, final = generate(fn, cfg, latents, prompt, negative, clock, lambda: None)
            answer["seconds"] = cpu_s if cpu_clock else wall_s
            times.append(answer["seconds"])
            wall.append(wall_s)
        elif command == "stop":
            break
        if rank == 0:
            post(out / f"done{n}", json.dumps(answer))
    result.update(seconds_all=times, seconds=min(times), wall_seconds_all=wall,
                  clock="CPU time of the process" if cpu_clock else "wall")
    if cfg.device.startswith("cuda"):
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        result["memory_kind"] = "CUDA max_memory_allocated"
    else:
        result["peak_memory_bytes"] = peak_rss_bytes()
        result["memory_kind"] = "peak resident set of the worker process"
    plans = getattr(fn, "plans", None)
    if plans:
        result["summary"] = {k: str(v) for k, v in plans[0].program.summary().items()}
        if hasattr(plans[0], "capture_s"):
            result["capture_s"] = plans[0].capture_s
    if rank == 0:
        torch.save(final.cpu(), out / "final.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        post(out / f"done{n}", "{}")


def save_worker(method: str, cfg: BenchConfig, out: Path, artifact: str) -> None:
    """Compile ``method``'s vdopt executable ahead of time to ``artifact``; times into ``out``."""
    import torch

    import vdopt

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, latents, prompt, negative = build(cfg)
    pab = pab_config(cfg) if "pab" in method else None
    kernels = "triton" if method.endswith("triton") else "auto"
    sched = scheduler()
    sched.set_timesteps(cfg.steps)
    example = {"hidden_states": latents.to(prompt.dtype), "timestep": sched.timesteps[:1].to(cfg.device),
               "encoder_hidden_states": prompt, "return_dict": False}
    start = time.perf_counter()
    opt = vdopt.optimize(model, pab=pab, kernels=kernels, example_inputs=((), example), compile=False)
    opt.save(artifact)
    seconds = time.perf_counter() - start
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    size = sum(f["bytes"] for p in manifest["plans"] for v in p["variants"].values() for f in v["packages"])
    size += sum(w["bytes"] for w in manifest["weights"])
    out.with_suffix(".json").write_text(json.dumps({
        "aot_compile_s": seconds, "artifact_bytes": size, "artifact_of": method,
        "variants": [v for p in manifest["plans"] for v in p["variants"]],
    }, indent=1))
