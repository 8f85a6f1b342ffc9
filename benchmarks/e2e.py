"""End to end: one full denoising schedule per method, side by side in one run.

    vdopt bench                    # CPU default: mid-size Wan, 50 steps, a few minutes
    vdopt bench --full             # GPU: Wan2.1-T2V-1.3B at 81x480x832, bf16 (ANCHORS.md)
    python benchmarks/e2e.py ...   # the same without the CLI

The loop is WanPipeline's: the timesteps of diffusers' ``UniPCMultistepScheduler`` (flow
prediction, shift 3.0, as Wan2.1 ships it), per step a cond and an uncond call (each inside
``cache_context("cond"/"uncond")``), classifier-free guidance 5.0, ``scheduler.step``.

Methods, each in a fresh worker process (clean memory figures, no shared compile state):

==========================  =============================================================
``diffusers_eager``         the diffusers model as is
``diffusers_compile``       ``torch.compile(model)``
``diffusers_pab``           diffusers' ``apply_pyramid_attention_broadcast``
``vdopt``                   ``vdopt.optimize(model, compile=True)`` (Inductor, CPU too)
``vdopt_pab``               ``vdopt.optimize(model, pab=..., compile=True)``, same PAB settings
``vdopt_pab_triton``        ... and ``kernels="triton"`` (CUDA only)
``vdopt_mesh_<axes>``       a parallel mesh: gloo ranks on the CPU, NCCL ranks on GPUs
``vdopt_artifact``          ``vdopt.load`` of AOTInductor artifacts in a fresh process
==========================  =============================================================

PAB settings are ANCHORS.md's for Wan2.1: spatial range 2, cross range 6, window (100, 800).

Per method: the first generation (warm-up: capture, compilation; methods warm up one at a
time) and ``--repeats`` timed ones (the best is reported; on the CPU every worker stays up
and the timed generations go round by round, so load from other processes on a shared
machine hits all methods alike), time from process start to the first model output, peak
memory (CUDA: ``max_memory_allocated``; CPU: the worker's peak resident set), and the
final latent's relative error against ``diffusers_eager``. ``vdopt_artifact`` also reports
the ahead-of-time compile (``opt.save``) and the start-up (``vdopt.load`` + first call).

Results go to ``benchmarks/results/e2e_<config>_<device>.{json,md,png}`` with the device,
the versions and the date. Benchmarks never gate CI.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("vdopt.benchmarks.e2e")

RESULTS_DIR = Path(__file__).resolve().parent / "results"

METHODS = ("diffusers_eager", "diffusers_compile", "diffusers_pab", "vdopt", "vdopt_pab", "vdopt_pab_triton")
"""The single-process methods, in table order."""

MID_WAN = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, ffn_dim=512, text_dim=256, freq_dim=256)
"""Overrides of Wan2.1-1.3B's config for the CPU default: every switch of the published
config (rotary 3D attention, qk RMS norm, cross-attention norm) at 4 layers of width 128."""

PAB_ANCHORS = dict(spatial_range=2, temporal_range=None, cross_range=6,
                   spatial_window=(100, 800), cross_window=(100, 800))
"""ANCHORS.md's PAB setting for Wan2.1 (the diffusers-hook baseline)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark run (every worker gets the same one)."""

    full: bool = False
    """Wan2.1-T2V-1.3B's published config instead of the mid-size one."""
    layers: int = 4
    """Transformer blocks of the mid-size config."""
    frames: int = 17
    """Video frames (pixel space; the Wan VAE makes (frames - 1) / 4 + 1 latent frames)."""
    height: int = 128
    """Video height in pixels (latent / 8, tokens / 16)."""
    width: int = 128
    """Video width in pixels."""
    text_len: int = 64
    """Prompt tokens."""
    steps: int = 50
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale; 1.0 makes one call per step."""
    repeats: int = 2
    """Timed generations per method after the warm-up one (the best is reported)."""
    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    dtype: str = "float32"
    """Weights and activations."""
    threads: int = 0
    """CPU threads per process (0: every core; divided among the ranks of a mesh)."""
    seed: int = 0
    """Weights and latents."""

    @property
    def name(self) -> str:
        if self.full:
            return f"wan1.3b_{self.frames}x{self.height}x{self.width}"
        return f"wan-mid{self.layers}_{self.frames}x{self.height}x{self.width}"


# -- the model and the loop ------------------------------------------------------------------

def wan_config(cfg: BenchConfig) -> dict[str, Any]:
    from vdopt.models.diffusers_models import WAN_CONFIGS

    config = dict(WAN_CONFIGS["full"])
    if not cfg.full:
        config.update(MID_WAN, num_layers=cfg.layers)
    return config


def make_inputs(cfg: BenchConfig):
    """``(latents, prompt_embeds, negative_embeds)``, seeded, on ``cfg.device``."""
    import torch

    from vdopt.models.diffusers_models import wan_latent_size

    config = wan_config(cfg)
    dtype = getattr(torch, cfg.dtype)
    T, H, W = wan_latent_size(cfg.frames, cfg.height, cfg.width)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    latents = torch.randn(1, config["in_channels"], T, H, W, generator=g).to(cfg.device)
    prompt = torch.randn(1, cfg.text_len, config["text_dim"], generator=g).to(cfg.device, dtype)
    negative = torch.randn(1, cfg.text_len, config["text_dim"], generator=g).to(cfg.device, dtype)
    return latents, prompt, negative


def build(cfg: BenchConfig):
    """``(model, latents, prompt_embeds, negative_embeds)``, seeded, on ``cfg.device``."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = WanTransformer3DModel(**wan_config(cfg))  # created on the CPU: same weights on every device
    model = model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)).eval()
    return (model, *make_inputs(cfg))


def scheduler():
    """Wan2.1's scheduler as diffusers ships it (flow prediction, shift 3.0 for 480p)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=3.0)


def _context(fn: Any, name: str):
    ctx = getattr(fn, "cache_context", None)
    return ctx(name) if ctx is not None else contextlib.nullcontext()


def generate(fn: Callable, cfg: BenchConfig, latents, prompt, negative, clock: dict, on_first: Callable[[], None]):
    """One generation: ``(seconds, final latents)``. ``on_first`` runs after the first output."""
    import torch

    sched = scheduler()
    sched.set_timesteps(cfg.steps, device=latents.device)
    x = latents.clone()
    dtype = prompt.dtype
    _sync(cfg.device)
    start = time.perf_counter()
    with torch.no_grad():
        for t in sched.timesteps:
            clock["t"] = int(t)
            ts = t.expand(x.shape[0])
            with _context(fn, "cond"):
                cond = fn(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=prompt, return_dict=False)[0]
            on_first()
            if cfg.guidance > 1.0:
                with _context(fn, "uncond"):
                    uncond = fn(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=negative, return_dict=False)[0]
                cond = uncond + cfg.guidance * (cond - uncond)
            x = sched.step(cond.float(), t, x, return_dict=False)[0]
    _sync(cfg.device)
    return time.perf_counter() - start, x


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pab_config():
    import vdopt

    return vdopt.PABConfig(**PAB_ANCHORS)


def diffusers_pab(model, clock: dict):
    """``model`` with diffusers' PAB hook (in place) and the hook registry's reset."""
    from diffusers import apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    apply_pyramid_attention_broadcast(model, pab_config().to_diffusers(lambda: clock["t"]))
    return model, lambda: HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()


# -- workers ---------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _post(path: Path, text: str) -> None:
    """Write ``path`` whole: the other process polls for it and must never read it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _wait_for(path: Path, poll_s: float = 0.02) -> str:
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
            fn, reset = diffusers_pab(model, clock)
        elif method.startswith("vdopt"):
            mesh = vdopt.Mesh(**extra.get("mesh", {}))
            pab = pab_config() if "pab" in method else None
            kernels = "triton" if method.endswith("triton") else "auto"
            # compiled everywhere, like diffusers_compile (vdopt's own default compiles on CUDA only)
            fn = vdopt.optimize(model, mesh, pab=pab, kernels=kernels, compile=True)
            reset = fn.reset
        else:
            raise ValueError(f"unknown method {method!r}")
    result["setup_s"] = time.perf_counter() - setup_start
    # From torchrun's environment: the process group may only start on the first call.
    rank = int(os.environ.get("RANK", 0))
    first: dict[str, float] = {}

    def on_first() -> None:
        if not first:
            _sync(cfg.device)
            first["t"] = time.time() - spawn_time
            first["call"] = time.perf_counter()

    times: list[float] = []
    final = None
    for n in itertools.count():
        command = _wait_for(out / f"cmd{n}")
        answer: dict[str, Any] = {}
        if command == "warmup":
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            result["rss_before_first_call_bytes"] = _rss_bytes()
            call_start = time.perf_counter()
            reset()
            answer["seconds"], _ = generate(fn, cfg, latents, prompt, negative, clock, on_first)
            result.update(first_generation_s=answer["seconds"], time_to_first_output_s=first["t"],
                          first_call_s=first["call"] - call_start)
        elif command == "run":
            if dist.is_initialized():
                dist.barrier()
            reset()
            answer["seconds"], final = generate(fn, cfg, latents, prompt, negative, clock, lambda: None)
            times.append(answer["seconds"])
        elif command == "stop":
            break
        if rank == 0:
            _post(out / f"done{n}", json.dumps(answer))
    result.update(seconds_all=times, seconds=min(times))
    if cfg.device.startswith("cuda"):
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        result["memory_kind"] = "CUDA max_memory_allocated"
    else:
        result["peak_memory_bytes"] = _peak_rss_bytes()
        result["memory_kind"] = "peak resident set of the worker process"
    plans = getattr(fn, "plans", None)
    if plans:
        result["summary"] = {k: str(v) for k, v in plans[0].program.summary().items()}
        if hasattr(plans[0], "capture_s"):
            result["capture_s"] = plans[0].capture_s
    if rank == 0:
        torch.save(final.cpu(), out / "final.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        _post(out / f"done{n}", "{}")


def save_worker(method: str, cfg: BenchConfig, out: Path, artifact: str) -> None:
    """Compile ``method``'s vdopt executable ahead of time to ``artifact``; times into ``out``."""
    import torch

    import vdopt

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, latents, prompt, negative = build(cfg)
    pab = pab_config() if "pab" in method else None
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


# -- the parent: run every method, write the results -----------------------------------------

class Worker:
    """A method's worker process (or torchrun group of processes), driven by command files."""

    def __init__(self, method: str, cfg: BenchConfig, scratch: Path, *, ranks: int = 1,
                 extra: dict | None = None, timeout: float = 3600) -> None:
        self.method = method
        self.dir = scratch / method
        self.dir.mkdir(parents=True)
        self.timeout = timeout
        self.commands = 0
        per_rank = cfg if ranks == 1 or not cfg.threads else dataclasses.replace(cfg, threads=max(1, cfg.threads // ranks))
        argv = ["--worker", method, "--worker-config", json.dumps(dataclasses.asdict(per_rank)),
                "--worker-out", str(self.dir), "--worker-extra", json.dumps(extra or {}),
                "--spawn-time", repr(time.time())]
        self.proc = _launch(argv, ranks, per_rank.threads, self.dir / "log.txt")

    def command(self, command: str) -> dict[str, Any]:
        """Send ``command``; its answer once rank 0 has written it."""
        n = self.commands
        self.commands += 1
        _post(self.dir / f"cmd{n}", command)
        deadline = time.monotonic() + self.timeout
        done = self.dir / f"done{n}"
        while not done.exists():
            if self.proc.poll() is not None and not done.exists():
                raise RuntimeError(f"{self.method} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.method}: no answer to {command!r} in {self.timeout:.0f} s")
            time.sleep(0.02)
        return json.loads(done.read_text())

    def stop(self) -> dict[str, Any]:
        self.command("stop")
        self.proc.wait(timeout=120)
        return json.loads((self.dir / "result.json").read_text())

    def kill(self) -> None:
        """Kill the worker and, under torchrun, every rank it started (its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        """The last Python traceback in the worker's log (torchrun prints its own summary
        after it, which names no cause), else the log's last lines; the cause comes last."""
        path = self.dir / "log.txt"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
        if starts:
            tb = lines[starts[-1]:]
            end = next((i for i, line in enumerate(tb) if i and line and not line[0].isspace()), len(tb) - 1)
            return "\n".join(tb[: end + 1][-30:])
        return "\n".join(lines[-12:]) or "no output"


def _launch(argv: list[str], ranks: int, threads: int, log_path: Path) -> subprocess.Popen:
    script = str(Path(__file__).resolve())
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", script, *argv]
    else:
        cmd = [sys.executable, script, *argv]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log_file:
        return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def _run_one_shot(argv: list[str], threads: int, log_path: Path, timeout: float) -> tuple[bool, str]:
    proc = _launch(argv, 1, threads, log_path)
    try:
        ok = proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        ok = False
    lines = log_path.read_text(errors="replace").strip().splitlines()
    return ok, "\n".join(lines[-12:])


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def versions() -> dict[str, str | None]:
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


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parse_meshes(text: str) -> list[dict[str, int]]:
    meshes = []
    for item in filter(None, (m.strip() for m in text.split(";"))):
        degrees = {}
        for part in item.split(","):
            axis, _, value = part.partition("=")
            degrees[axis.strip()] = int(value)
        meshes.append(degrees)
    return meshes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vdopt bench`` / ``python benchmarks/e2e.py``."""
    p.add_argument("--full", action="store_true", help="Wan2.1-1.3B, 81x480x832, bf16 on CUDA (ANCHORS.md)")
    p.add_argument("--layers", type=int, default=None, help="blocks of the mid-size model (default 4)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default 17; --full 81)")
    p.add_argument("--height", type=int, default=None, help="video height (default 128; --full 480)")
    p.add_argument("--width", type=int, default=None, help="video width (default 128; --full 832)")
    p.add_argument("--text-len", type=int, default=None, help="prompt tokens (default 64; --full 512)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale; 1 = one call per step (default 5)")
    p.add_argument("--repeats", type=int, default=2, help="timed generations after the warm-up (default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --full, else cpu)")
    p.add_argument("--dtype", default=None, help="default float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: every core)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--meshes", default=None,
                   help="parallel meshes, ';'-separated (e.g. 'ulysses=2;ring=2'); default ulysses=2 when 2 ranks fit, 'none' for none")
    p.add_argument("--artifact", default=None,
                   help="method to save and load as AOT artifacts (default: vdopt_pab on the CPU, vdopt_pab_triton on CUDA; 'none' to skip)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the methods round by round with every worker up (default: on the CPU only)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    # internal: a worker process runs one method
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-extra", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--spawn-time", type=float, default=None, help=argparse.SUPPRESS)


def config_from(args: argparse.Namespace) -> BenchConfig:
    import torch

    device = args.device or ("cuda" if args.full else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (run without --full for the CPU benchmark)")
    full = {"frames": 81, "height": 480, "width": 832, "text_len": 512}
    mid = {"frames": 17, "height": 128, "width": 128, "text_len": 64}
    shape = {k: getattr(args, k) if getattr(args, k) is not None else (full if args.full else mid)[k] for k in mid}
    return BenchConfig(
        full=args.full, layers=args.layers or 4, steps=args.steps, guidance=args.guidance, repeats=args.repeats,
        device=device, dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
        threads=args.threads, **shape,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark (or one worker, when ``--worker`` is given)."""
    if args.worker:
        cfg = BenchConfig(**json.loads(args.worker_config))
        extra = json.loads(args.worker_extra)
        if args.worker == "save_artifact":
            save_worker(extra["method"], cfg, Path(args.worker_out), extra["artifact"])
        else:
            worker(args.worker, cfg, Path(args.worker_out), args.spawn_time or time.time(), extra)
        return {}
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)  # also under the CLI, whose root logger shows warnings only
    cfg = config_from(args)
    cuda = cfg.device.startswith("cuda")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    ranks_available = torch.cuda.device_count() if cuda else 2  # gloo ranks on the CPU
    if args.meshes is None:
        meshes = [{"ulysses": 2}] if ranks_available >= 2 else []
    else:
        meshes = [] if args.meshes == "none" else parse_meshes(args.meshes)
    artifact_of = args.artifact or ("vdopt_pab_triton" if cuda else "vdopt_pab")

    # (name, ranks, extra) of every method to run; skipped ones get their reason now.
    results: dict[str, dict[str, Any]] = {}
    plan: list[tuple[str, int, dict[str, Any]]] = []
    for method in methods:
        if method == "vdopt_pab_triton" and not cuda:
            results[method] = {"method": method, "skipped": "skipped: no GPU"}
        else:
            plan.append((method, 1, {}))
    for degrees in meshes:
        name = "vdopt_mesh_" + "_".join(f"{a}{d}" for a, d in degrees.items())
        ranks = math.prod(degrees.values())
        if ranks > ranks_available:
            results[name] = {"method": name, "skipped": f"skipped: needs {ranks} ranks, {ranks_available} available"}
        else:
            plan.append((name, ranks, {"mesh": degrees}))
    interleave = not cuda if args.interleave is None else args.interleave

    with tempfile.TemporaryDirectory(prefix="vdopt-bench-") as tmp:
        scratch = Path(tmp)
        saved: dict[str, Any] = {}
        if artifact_of != "none":
            saved = _save_artifact(artifact_of, cfg, scratch, args.timeout)
            if "skipped" in saved:
                results["vdopt_artifact"] = {"method": "vdopt_artifact", **saved}
            else:
                plan.append(("vdopt_artifact", 1, {"artifact": saved["path"]}))
        results.update(_run_all(plan, cfg, scratch, args.timeout, interleave))
        if "vdopt_artifact" in results and "skipped" not in results["vdopt_artifact"]:
            results["vdopt_artifact"].update(saved)
        latents = {m: torch.load(scratch / m / "final.pt") for m in results if (scratch / m / "final.pt").exists()}
    results = {name: results[name] for name in [*methods, *(n for n in results if n not in methods)] if name in results}
    report = _result(cfg, results, latents, interleave)
    write(report, args.out)
    return report


def _run_all(plan, cfg: BenchConfig, scratch: Path, timeout: float, interleave: bool) -> dict[str, dict[str, Any]]:
    """Warm every method up one at a time, then time ``cfg.repeats`` generations each.

    Interleaved (the CPU default), every worker stays up and the timed generations go round
    by round (each method once per round), so load from other processes on a shared
    machine hits every method alike; otherwise (CUDA) one method runs at a time.
    """
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, Worker] = {}

    def fail(name: str, error: Exception) -> None:
        log.warning("%s failed: %s", name, error)
        results[name] = {"method": name, "skipped": f"failed: {str(error).strip().splitlines()[-1]}"}
        if name in live:
            live.pop(name).kill()

    def finish(name: str) -> None:
        w = live.pop(name)
        try:
            results[name] = w.stop()
            log.info("%-22s %8.2f s per generation (best of %d)", name, results[name]["seconds"], cfg.repeats)
        except Exception as e:  # noqa: BLE001  a failed method is a row, not the end of the run
            w.kill()
            results[name] = {"method": name, "skipped": f"failed: {str(e).strip().splitlines()[-1]}"}

    try:
        for name, ranks, extra in plan:
            log.info("warming up %s%s", name, f" on {ranks} ranks" if ranks > 1 else "")
            try:
                live[name] = Worker(name, cfg, scratch, ranks=ranks, extra=extra, timeout=timeout)
                warm = live[name].command("warmup")
                log.info("%-22s warm-up generation %.1f s", name, warm["seconds"])
                if not interleave:
                    for _ in range(cfg.repeats):
                        live[name].command("run")
                    finish(name)
            except Exception as e:  # noqa: BLE001
                fail(name, e)
        for round_ in range(cfg.repeats if interleave else 0):
            for name in list(live):
                try:
                    t = live[name].command("run")["seconds"]
                    log.info("round %d %-22s %8.2f s", round_, name, t)
                except Exception as e:  # noqa: BLE001
                    fail(name, e)
        for name in list(live):
            finish(name)
    finally:
        for w in live.values():
            w.kill()
    return results


def _save_artifact(method: str, cfg: BenchConfig, scratch: Path, timeout: float) -> dict[str, Any]:
    """Compile ``method`` ahead of time (a one-shot worker); what ``save_worker`` reports."""
    if method.endswith("triton") and not cfg.device.startswith("cuda"):
        return {"skipped": "skipped: no GPU"}
    path = scratch / "artifact"
    out = scratch / "save_artifact.json"
    argv = ["--worker", "save_artifact", "--worker-config", json.dumps(dataclasses.asdict(cfg)),
            "--worker-out", str(out), "--worker-extra", json.dumps({"method": method, "artifact": str(path)})]
    log.info("compiling %s ahead of time (opt.save)", method)
    ok, tail = _run_one_shot(argv, cfg.threads, scratch / "save_artifact.log", timeout)
    if not ok:
        log.warning("saving the artifact failed:\n%s", tail)
        return {"skipped": f"failed: {tail.splitlines()[-1] if tail else 'no output'}"}
    return {**json.loads(out.read_text()), "path": str(path)}


def _result(cfg: BenchConfig, results: dict[str, dict[str, Any]], latents: dict, interleave: bool) -> dict[str, Any]:
    from vdopt.models.diffusers_models import wan_latent_size

    eager = results.get("diffusers_eager", {}).get("seconds")
    reference = latents.get("diffusers_eager")
    for name, r in results.items():
        if "skipped" in r:
            continue
        r["seconds_per_step"] = r["seconds"] / cfg.steps
        r["warmup_s"] = r["first_generation_s"] - r["seconds"]
        if eager:
            r["speedup_vs_diffusers_eager"] = eager / r["seconds"]
        if reference is not None and name in latents:
            r["final_latent_rel_err_vs_eager"] = rel_err(latents[name], reference)
    T, H, W = wan_latent_size(cfg.frames, cfg.height, cfg.width)
    return {
        "benchmark": "e2e",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(cfg.device),
        "versions": versions(),
        "config": dataclasses.asdict(cfg),
        "model": "Wan2.1-T2V-1.3B (random weights)" if cfg.full else f"Wan2.1 architecture, mid-size {MID_WAN | {'num_layers': cfg.layers}}",
        "tokens_per_call": T * (H // 2) * (W // 2),
        "schedule": f"UniPCMultistepScheduler (flow, shift 3.0), {cfg.steps} steps, "
                    + (f"CFG {cfg.guidance} as separate cond/uncond calls" if cfg.guidance > 1 else "no CFG"),
        "pab": PAB_ANCHORS,
        "threads": cfg.threads or os.cpu_count(),
        "timing": "interleaved rounds (every method once per round), best of " + str(cfg.repeats)
                  if interleave else f"one method at a time, best of {cfg.repeats}",
        "methods": results,
    }


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
        f"PAB spatial 2, cross 6 over (100, 800). {report['date']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        "| method | s / generation | ms / step | vs diffusers eager | warm-up s | first output s | peak memory | latent rel. err vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | | | |")
            continue
        speed = f"{r['speedup_vs_diffusers_eager']:.2f}x" if "speedup_vs_diffusers_eager" in r else "-"
        err = f"{r['final_latent_rel_err_vs_eager']:.1e}" if "final_latent_rel_err_vs_eager" in r else "-"
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {1e3 * r['seconds_per_step']:.1f} | {speed} | {r['warmup_s']:.1f} | "
            f"{r['time_to_first_output_s']:.1f} | {_mib(r.get('peak_memory_bytes'))} | {err} |"
        )
    art = report["methods"].get("vdopt_artifact", {})
    notes = [
        "",
        f"- s / generation: {report['timing']}, after a warm-up generation; a step is "
        + ("one cond and one uncond call." if cfg["guidance"] > 1 else "one call."),
        "- warm-up: first generation minus the best one (capture, compilation, first-call costs). "
        "first output: seconds from the worker's process start to the first model output "
        "(imports, model construction, capture or compilation or artifact loading).",
        "- peak memory: " + ("CUDA max_memory_allocated." if cfg["device"].startswith("cuda")
                             else "peak resident set of the worker process (weights, activations, Python and torch)."),
        "- the vdopt rows run the rewritten graphs (per rank, per PAB variant) through Inductor, as "
        "diffusers_compile does; vdopt_artifact runs AOTInductor packages of the same graphs.",
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
            "they check that sequence parallelism runs end to end, not how it scales; see benchmarks/scaling.py."
        )
    return "\n".join(lines + notes) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if report["config"]["device"].startswith("cuda") else "cpu"
    stem = out / f"e2e_{BenchConfig(**report['config']).name}_{device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    log.info("wrote %s.{json,md,png}", stem)
    return stem


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
