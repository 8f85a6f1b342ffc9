"""End to end: one full denoising schedule per method, side by side in one run.

    vdopt bench                    # CPU default: mid-size Wan, 50 steps, a few minutes
    vdopt bench --quick            # CPU smoke run: a 1-block Wan, 3 steps, under a minute
    vdopt bench --full             # GPU: Wan2.1-T2V-1.3B at 81x480x832, bf16
    vdopt bench --model latte      # another family: wan (default), latte, cogvideox
    python benchmarks/e2e.py ...   # the same without the CLI

Methods, each in a fresh worker process (clean memory figures, no shared compile state):

==========================  =============================================================
``diffusers_eager``         the diffusers model as is
``diffusers_compile``       ``torch.compile(model)``
``diffusers_pab``           diffusers' ``apply_pyramid_attention_broadcast``
``vdopt_eager``             ``vdopt.optimize(model, compile=False)`` (no compilation)
``vdopt``                   ``vdopt.optimize(model, compile=True)`` (Inductor, CPU too)
``vdopt_pab``               ``vdopt.optimize(model, pab=..., compile=True)``, same PAB settings
``vdopt_pab_triton``        ... and ``kernels="triton"`` (CUDA only)
``vdopt_mesh_<axes>``       a parallel mesh: gloo ranks on the CPU, NCCL ranks on GPUs
``vdopt_artifact``          ``vdopt.load`` of AOTInductor artifacts in a fresh process
==========================  =============================================================

The concepts live in their own files: the model, inputs and denoising loop in
``e2e_workload.py``, the worker process in ``e2e_worker.py``, the parent that starts and
times the workers in ``e2e_driver.py``, the report (JSON, table, plot) in ``e2e_report.py``;
what every benchmark shares (timing rounds, the stamp, writing results) in ``harness.py``.

Per method: the first generation (warm-up: capture, compilation; methods warm up one at a
time) and ``--repeats`` timed ones (the best is reported; on the CPU every worker stays up
and the timed generations go round by round, so load from other processes on a shared
machine hits all methods alike), time from process start to the first model output, peak
memory (CUDA: ``max_memory_allocated``; CPU: the worker's peak resident set), and the
final latent's relative error against ``diffusers_eager``. ``vdopt_artifact`` also reports
the ahead-of-time compile (``opt.save``) and the start-up (``vdopt.load`` + first call).

Results go to ``--out`` (default ``./vdopt-results``) as ``e2e_<config>_<device>.{json,md,png}``
with the device, the versions and the date. Benchmarks never gate CI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The sibling modules are imported by their bare names: this file runs as a script (workers),
# as ``python benchmarks/e2e.py`` and from ``vdopt bench`` (loaded by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from e2e_driver import log, run_all, save_artifact  # noqa: E402
from e2e_report import assemble, write  # noqa: E402
from e2e_worker import save_worker, worker  # noqa: E402
from e2e_workload import FAMILIES, METHODS, BenchConfig  # noqa: E402

MID_SHAPE = {"layers": 4, "frames": 17, "height": 128, "width": 128, "text_len": 64, "steps": 50, "repeats": 2}
"""The CPU default: the mid-size Wan, 17x128x128, 50 steps, best of 2."""

FULL_SHAPE = {"layers": None, "frames": 81, "height": 480, "width": 832, "text_len": 512, "steps": 50, "repeats": 2}
"""``--full``: Wan2.1-T2V-1.3B's published configuration at 480p (81 frames)."""

QUICK = {"layers": 1, "frames": 5, "height": 32, "width": 32, "text_len": 8, "steps": 3, "repeats": 1,
         "methods": "diffusers_eager,diffusers_pab,vdopt_pab", "meshes": "none", "artifact": "none"}
"""``--quick``: a smoke run in under a minute on a 2-core CPU (it shows the harness works,
the figures mean little). Options given explicitly override these."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vdopt bench`` / ``python benchmarks/e2e.py``."""
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in under a minute on the CPU: 1 block, 5x32x32 video, 3 steps, 1 timed "
                        "generation, methods diffusers_eager, diffusers_pab and vdopt_pab; no mesh, no artifact")
    p.add_argument("--full", action="store_true",
                   help="Wan2.1-T2V-1.3B's published configuration at 81x480x832 in bfloat16, on a CUDA GPU")
    p.add_argument("--model", default="wan", choices=sorted(FAMILIES),
                   help="model family: " + "; ".join(f"{k}: {v}" for k, v in FAMILIES.items()) + " (default wan)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks of the mid-size model (default 4)")
    p.add_argument("--frames", type=int, default=None, help="video frames in pixel space (default 17; --full 81)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (default 128; --full 480)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (default 128; --full 832)")
    p.add_argument("--text-len", type=int, default=None, help="prompt length in text tokens (default 64; --full 512)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per generation (default 50)")
    p.add_argument("--guidance", type=float, default=5.0,
                   help="classifier-free guidance scale; 1 makes one model call per step instead of two (default 5)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed generations per method after the warm-up one; the best is reported (default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --full, else cpu)")
    p.add_argument("--dtype", default=None, help="weights and activations (default float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per worker process (default: every core)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="seconds of a generation: wall time, or the worker's CPU time (robust to other load on a "
                        "shared machine; mesh rows stay wall). Default: cpu with --threads 1 on the CPU, else wall")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ", ".join(METHODS)
                        + ", or 'none' to run only --artifact (default: all)")
    p.add_argument("--meshes", default=None,
                   help="parallel meshes to run as extra methods, ';'-separated, e.g. 'ulysses=2;ring=2'; "
                        "'none' for none (default: ulysses=2 when 2 ranks fit)")
    p.add_argument("--artifact", default=None,
                   help="method to save and load as AOT artifacts, or 'none' "
                        "(default: vdopt_pab on the CPU, vdopt_pab_triton on CUDA)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the methods round by round with every worker up (default: on the CPU only)")
    harness.add_out_argument(p)
    p.add_argument("--timeout", type=float, default=3600, help="seconds a worker may take per command (default 3600)")
    # internal: a worker process runs one method
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-extra", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--spawn-time", type=float, default=None, help=argparse.SUPPRESS)


def resolved(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every option left unset filled in from ``--quick``, ``--full`` or the default."""
    if args.quick and args.full:
        raise ValueError("--quick and --full exclude each other: --quick is a CPU smoke run, --full the GPU benchmark")
    preset = QUICK if args.quick else {}
    shape = FULL_SHAPE if args.full else MID_SHAPE
    filled = dict(vars(args))
    for key in (*MID_SHAPE, "methods", "meshes", "artifact"):
        if filled.get(key) is None:
            filled[key] = preset.get(key, shape.get(key))
    filled["methods"] = filled["methods"] or ",".join(METHODS)
    return argparse.Namespace(**filled)


def config_from(args: argparse.Namespace) -> BenchConfig:
    import torch

    device = args.device or ("cuda" if args.full else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (run without --full for the CPU benchmark)")
    clock = args.clock or ("cpu" if device == "cpu" and args.threads == 1 else "wall")
    return BenchConfig(
        model=args.model, clock=clock,
        full=args.full, layers=args.layers or MID_SHAPE["layers"], steps=args.steps, guidance=args.guidance,
        repeats=args.repeats, device=device,
        dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"), threads=args.threads,
        frames=args.frames, height=args.height, width=args.width, text_len=args.text_len,
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

    harness.configure_logging()
    args = resolved(args)
    cfg = config_from(args)
    cuda = cfg.device.startswith("cuda")
    # 'none': only the artifact (``vdopt gpu-check`` runs each method as a stage of its own)
    methods = [] if args.methods == "none" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    ranks_available = torch.cuda.device_count() if cuda else 2  # gloo ranks on the CPU
    if args.meshes is None:
        meshes = [{"ulysses": 2}] if ranks_available >= 2 else []
    else:
        meshes = [] if args.meshes == "none" else harness.parse_meshes(args.meshes)
    artifact_of = args.artifact or ("vdopt_pab_triton" if cuda else "vdopt_pab")
    if artifact_of not in ("none", *METHODS) or artifact_of in ("diffusers_eager", "diffusers_compile", "diffusers_pab"):
        raise ValueError(f"--artifact {artifact_of!r}: choose a vdopt method ({', '.join(m for m in METHODS if m.startswith('vdopt'))}) or 'none'")

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
            saved = save_artifact(artifact_of, cfg, scratch, args.timeout)
            if "skipped" in saved:
                results["vdopt_artifact"] = {"method": "vdopt_artifact", **saved}
            else:
                plan.append(("vdopt_artifact", 1, {"artifact": saved["path"]}))
        results.update(run_all(plan, cfg, scratch, args.timeout, interleave))
        if "vdopt_artifact" in results and "skipped" not in results["vdopt_artifact"]:
            results["vdopt_artifact"].update(saved)
        latents = {m: torch.load(scratch / m / "final.pt") for m in results if (scratch / m / "final.pt").exists()}
    results = {name: results[name] for name in [*methods, *(n for n in results if n not in methods)] if name in results}
    report = assemble(cfg, results, latents, interleave)
    path = write(report, args.out)
    report["written_to"] = str(path)
    log.info("results: %s.json", path)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
