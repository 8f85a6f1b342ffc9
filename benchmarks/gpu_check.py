"""The whole GPU check in one command: CUDA tests, attention timings, Wan2.1 end to end.

    vdopt gpu-check --out DIR          # one H100: at most 8 minutes, compilation included
    vdopt gpu-check --tiny --out DIR   # the same stages on the CPU at toy sizes (a test runs it)

Each stage runs in its own process with a time limit (its budget, cut to what is left of the
whole run's ``--budget-s``), so a stage that hangs or crashes is recorded and the next one
starts. A stage composes what exists: ``pytest`` on the CUDA-only tests, ``attention.py``,
``e2e.py``; the small checks of section (a) below are the only code of their own.

Stages, in order (most telling first, so a tight budget cuts the least telling):

================================  ======================================================
``cuda_tests``                    ``pytest tests/test_kernels.py -k gpu``: kernels (bf16,
                                  fp16) against an fp32 reference, opcheck, key masks
``kernels_auto``                  a 2-block Wan (1.3B head geometry) through
                                  ``optimize(kernels="auto")`` as shipped, against eager
``compiled``                      the same through Inductor, then ``opt.save`` +
                                  ``vdopt.load`` (AOTInductor), both against eager
``nccl_mesh``                     a 1-rank NCCL process group, ``vdopt.Mesh()``,
                                  ``optimize``, an all-reduce (gloo on the CPU)
``attention``                     ``attention.py``: our kernels, SDPA cuDNN / flash /
                                  efficient, flash-attn when importable, anchor shapes
``fp8``                           ``attention.py --fp8`` at 4 anchor shapes (our fp8
                                  kernel vs our bf16 one and cuDNN; SageAttention's
                                  428-455 TFLOP/s the bar), then a 2-block Wan:
                                  ``kernels="fp8"`` vs bf16 eager vs fp32, one call and
                                  2 Euler steps (``fp8_accuracy.py``)
``e2e_<method>``                  ``e2e.py --full`` one method each: diffusers eager,
                                  diffusers PAB hook, vdopt, vdopt + PAB,
                                  ``torch.compile``, the AOT artifact (load + first call)
================================  ======================================================

Time on one H100 (estimates, not yet measured; ``estimate_s`` of each stage): the CUDA
tests autotune the flash kernel per shape and dtype (12 shapes, 4-6 configs, ~40 s); the
small Wan checks compile 2 blocks (~20-40 s each); attention times 9 shapes x 4-6 backends
with ``triton.testing.do_bench`` (100 ms each) plus one autotune per shape (~60 s); the fp8
stage times 4 shapes x 4 backends and autotunes 5 fp8 configurations per shape and
variant, then runs the 2-block Wan 3 times (~45 s). End to
end, every Wan worker first builds the 1.3B model (~15 s on the CPU, then moved); eager is
~0.63 s per call (ANCHORS.md), and 2 steps with CFG are 4 calls, ~2.5 s per generation, one
warm-up and one timed generation per method. Compilation dominates: ``torch.compile`` took
101 s (ANCHORS.md); vdopt's Inductor compile of the same graph is assumed alike, PAB adds
one variant (2 steps use 2 of them: step 2 at t=750 reuses spatial and cross attention),
and the artifact is AOT-compiled once (of ``vdopt``, one variant). The on-disk Inductor and
Triton caches persist between the stages of one run, so later compiles reuse kernels.
Sum of the estimates: ~565 s, over the 470 s of ``--budget-s`` (its default), which bounds
the whole run whatever happens: a stage is killed when the run's time is spent, and stages
not started are recorded as skipped. If the estimates hold, ``torch.compile`` (last: its
figure is in ANCHORS.md) is the stage cut short; the first device run should replace these
estimates with measured seconds.

Results: ``DIR/gpu_check.json`` (device, versions, date, per stage its status, seconds,
figures and the tail of its log when it failed), ``DIR/gpu_check.png`` and
``DIR/gpu_check.txt`` (the table, also printed last); each stage's own output (logs, the
attention and e2e JSON) under ``DIR/stages/<name>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
"""The checkout (pytest runs from here)."""

STAGE_RESULT = "result.json"
"""What a stage's process writes into its folder: ``{"status", "figures", "details"}``."""

TERMINATE_GRACE_S = 15.0
"""After SIGTERM, how long a stage may take to stop its own workers before SIGKILL."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckConfig:
    """One run of the check (every stage process gets the same one, as JSON)."""

    tiny: bool = False
    """Rehearsal: CPU, toy sizes, Triton's interpreter; no GPU figures."""
    budget_s: float = 470.0
    """Seconds for all stages together (the H100 target is 8 minutes, with start-up)."""
    steps: int = 2
    """Denoising steps per end-to-end generation (2 steps: one full, one PAB-reused)."""
    repeats: int = 1
    """Timed generations per end-to-end method after its warm-up one."""
    artifact_of: str = "vdopt"
    """The e2e method saved and loaded as an AOTInductor artifact (one variant: cheapest)."""
    threads: int = 0
    """CPU threads per process (0: every core); the rehearsal uses 1 on a shared machine."""

    @property
    def device(self) -> str:
        return "cpu" if self.tiny else "cuda"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the check, run in its own process."""

    name: str
    """Key in the JSON, row in the table."""
    run: Callable[[CheckConfig, Path], dict[str, Any]]
    """``run(config, folder)`` -> ``{"status", "figures", "details"}``, in the stage process."""
    budget_s: float
    """The most seconds it may take on the H100 before it is killed."""
    estimate_s: float
    """Seconds it is expected to take on the H100 (the docstring's estimate adds these up)."""
    tiny_budget_s: float = 240.0
    """The most seconds it may take in the CPU rehearsal."""


def ok(figures: dict[str, float], **details: Any) -> dict[str, Any]:
    return {"status": "ok", "figures": figures, "details": details}


def failed(reason: str, figures: dict[str, float] | None = None, **details: Any) -> dict[str, Any]:
    return {"status": f"failed: {reason}", "figures": figures or {}, "details": details}


# -- (a) CUDA tests and the small Wan checks --------------------------------------------------

CUDA_TESTS = ("tests/test_kernels.py", "gpu")
"""The CUDA-only tests: file and ``-k`` expression (they skip without CUDA)."""

TINY_EXTRA_TESTS = "head_dim_split"
"""Added to ``-k`` in the rehearsal, so the CPU run sees a test pass (the GPU ones skip)."""


def stage_cuda_tests(cfg: CheckConfig, folder: Path) -> dict[str, Any]:
    """``pytest -k gpu`` on the kernel tests; counts from its JUnit XML."""
    path, expression = CUDA_TESTS
    if cfg.tiny:
        expression = f"{expression} or {TINY_EXTRA_TESTS}"
    junit = folder / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", expression, f"--junitxml={junit}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (folder / "pytest.log").write_text(proc.stdout + proc.stderr)
    if not junit.exists():
        return failed(f"pytest wrote no report (exit {proc.returncode})", tail=proc.stdout[-2000:])
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    details = {"command": " ".join(cmd[2:]), **counts, "passed": passed}
    if counts["failures"] or counts["errors"] or passed == 0:
        return failed(f"{counts['failures']} failed, {counts['errors']} errors, {passed} passed",
                      tail=proc.stdout[-2000:], **details)
    if not cfg.tiny and counts["skipped"]:
        return failed(f"{counts['skipped']} CUDA tests skipped on a GPU machine", **details)
    return ok({"passed": passed, "pytest_s": seconds}, **details)


SMOKE_LAYERS = 2
"""Blocks of the small Wan of the (a) checks: Wan2.1-1.3B's blocks, only fewer."""

SMOKE_VIDEO = {"gpu": (21, 240, 416, 64), "tiny": (5, 32, 32, 8)}
"""(frames, height, width, text tokens): 6x15x26 = 2340 tokens per call on the GPU."""

SMOKE_TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}
"""Relative error against eager the checks accept (bf16 rounding in a 2-block model)."""


def smoke_workload(cfg: CheckConfig, video: tuple[int, int, int, int] | None = None):
    """``(model, kwargs, dtype name)``: the small Wan and one call's inputs, seeded
    (``video``: (frames, height, width, text tokens) instead of ``SMOKE_VIDEO``'s)."""
    import torch
    from diffusers import WanTransformer3DModel

    from vdopt.models.diffusers_models import WAN_CONFIGS, wan_latent_size

    size = "tiny" if cfg.tiny else "full"
    config = dict(WAN_CONFIGS[size], num_layers=SMOKE_LAYERS)
    frames, height, width, text_len = video or SMOKE_VIDEO["tiny" if cfg.tiny else "gpu"]
    dtype = "float32" if cfg.tiny else "bfloat16"
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(cfg.device, getattr(torch, dtype)).eval()
    g = torch.Generator().manual_seed(1)
    latent = wan_latent_size(frames, height, width)
    kwargs = {
        "hidden_states": torch.randn(1, config["in_channels"], *latent, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, text_len, config["text_dim"], generator=g),
        "return_dict": False,
    }
    kwargs = {k: v.to(cfg.device, getattr(torch, dtype)) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    kwargs["timestep"] = kwargs["timestep"].float()
    return model, kwargs, dtype


def _call(fn, kwargs, device: str) -> tuple[Any, float]:
    """``(output sample, seconds)`` of one call under no_grad."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        out = fn(**kwargs)[0]
    harness.sync(device)
    return out, time.perf_counter() - start


def _checked(name: str, out, ref, dtype: str) -> float:
    error = harness.relative_error(out.float(), ref.float())
    if not error <= SMOKE_TOLERANCE[dtype]:
        raise AssertionError(f"{name}: relative error {error:.2e} against eager > {SMOKE_TOLERANCE[dtype]:.0e}")
    return error


def _lowering_stats(opt) -> dict[str, Any]:
    """The ``sdpa_to_triton`` pass's stats of the first plan (what ``auto`` chose per site)."""
    records = [r for r in opt.plans[0].passes if r.name == "sdpa_to_triton" and r.graph == "main"]
    return dict(records[0].stats) if records else {}


def stage_kernels_auto(cfg: CheckConfig, folder: Path) -> dict[str, Any]:
    """``optimize(kernels="auto")`` as shipped (choices measured fresh) against eager."""
    import vdopt

    model, kwargs, dtype = smoke_workload(cfg)
    ref, eager_s = _call(model, kwargs, cfg.device)
    opt = vdopt.optimize(model, kernels="auto", compile=False)
    out, first_s = _call(opt, kwargs, cfg.device)
    error = _checked("kernels=auto", out, ref, dtype)
    _, call_s = _call(opt, kwargs, cfg.device)
    stats = _lowering_stats(opt)
    return ok({"capture_and_first_call_s": first_s, "call_s": call_s, "eager_call_s": eager_s},
              rel_err_vs_eager=error, lowered_sites=stats.get("lowered", 0), choices=stats.get("per_site", {}))


def stage_compiled(cfg: CheckConfig, folder: Path) -> dict[str, Any]:
    """Inductor (``compile=True``) and the AOTInductor round trip, each against eager."""
    import vdopt

    model, kwargs, dtype = smoke_workload(cfg)
    ref, _ = _call(model, kwargs, cfg.device)
    opt = vdopt.optimize(model, compile=True)
    out, compile_s = _call(opt, kwargs, cfg.device)
    inductor_error = _checked("Inductor", out, ref, dtype)
    start = time.perf_counter()
    opt.save(folder / "artifact")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = vdopt.load(folder / "artifact")
    load_s = time.perf_counter() - start
    out, first_call_s = _call(loaded, kwargs, cfg.device)
    aot_error = _checked("AOTInductor artifact", out, ref, dtype)
    return ok({"inductor_first_call_s": compile_s, "aot_save_s": save_s, "load_s": load_s,
               "artifact_first_call_s": first_call_s},
              inductor_rel_err_vs_eager=inductor_error, artifact_rel_err_vs_eager=aot_error)


def stage_nccl_mesh(cfg: CheckConfig, folder: Path) -> dict[str, Any]:
    """A 1-rank process group (NCCL; gloo on the CPU), an all-reduce, then ``Mesh()`` + optimize."""
    import torch
    import torch.distributed as dist

    import vdopt
    from vdopt.runtime.local_ranks import free_port

    backend = "gloo" if cfg.tiny else "nccl"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    start = time.perf_counter()
    dist.init_process_group(backend, rank=0, world_size=1)
    init_s = time.perf_counter() - start
    try:
        x = torch.ones(4, device=cfg.device)
        dist.all_reduce(x)
        harness.sync(cfg.device)
        if not torch.equal(x.cpu(), torch.ones(4)):
            return failed(f"{backend} all_reduce on 1 rank changed the tensor: {x.tolist()}")
        model, kwargs, dtype = smoke_workload(cfg)
        ref, _ = _call(model, kwargs, cfg.device)
        opt = vdopt.optimize(model, vdopt.Mesh())  # vdopt's default: Inductor on CUDA, eager graphs on the CPU
        out, first_s = _call(opt, kwargs, cfg.device)
        error = _checked("Mesh()", out, ref, dtype)
    finally:
        dist.destroy_process_group()
    details = {"backend": backend, "rel_err_vs_eager": error}
    if cfg.tiny:
        details["nccl"] = "skipped: needs CUDA (the rehearsal runs the same path on gloo)"
    return ok({"init_process_group_s": init_s, "first_call_s": first_s}, **details)


# -- (b) attention ----------------------------------------------------------------------------

def _attention_module():
    import attention

    return attention


def _attention_figures(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """``attention.py``'s rows as figures ``"<shape> | <backend> | TFLOP/s"`` and errors."""
    figures: dict[str, float] = {}
    errors: dict[str, str] = {}
    for row in report["shapes"]:
        for backend, result in row["results"].items():
            key = f"{row['model']} | {backend}"
            if "error" in result:
                errors[key] = result["error"]
            else:
                figures[key + (" | GB/s" if row["kv_len"] <= 64 else " | TFLOP/s")] = (
                    result["gbps"] if row["kv_len"] <= 64 else result["tflops"])
    return figures, errors


def stage_attention(cfg: CheckConfig, folder: Path) -> dict[str, Any]:
    """``attention.py`` at the anchor shapes (``--smoke`` in the rehearsal); TFLOP/s per backend."""
    attention = _attention_module()
    argv = ["--out", str(folder)] + (["--smoke", "--reps", "1"] if cfg.tiny else [])
    code = attention.main(argv)
    report = json.loads((folder / ("attention_smoke.json" if cfg.tiny else "attention.json")).read_text())
    figures, errors = _attention_figures(report)
    details = {"backends": sorted({b for r in report["shapes"] for b in r["results"]}), "errors": errors,
               "smoke": report["smoke"], "dtype": report["dtype"]}
    if code != 0:
        return failed("vdopt's kernel failed on some shapes", figures, **details)
    return ok(figures, **details)


# -- (b2) fp8 attention ----------------------------------------------------------------------

FP8_SHAPES = {"gpu": ("Wan2.1-1.3B 480p self", "CogVideoX-5B", "Wan cross", "Latte 512px spatial"),
              "tiny": ("Wan2.1-1.3B 480p self",)}
"""Anchor shapes the fp8 stage times: head dims 128 and 64, short keys (text), 72 (a tail)."""

FP8_BACKENDS = ("vdopt", "vdopt_fp8", "vdopt_fp8_qk", "sdpa_cudnn", "sdpa_math")
"""vdopt's bf16 and fp8 kernels, cuDNN (the fastest SDPA on H100); math stands in on the CPU."""

FP8_VIDEO = {"gpu": SMOKE_VIDEO["gpu"], "tiny": (9, 64, 96, 8)}
"""The accuracy Wan's video: 2340 tokens on the GPU; 72 on the CPU (over the 64 up to which
unmasked sites keep the exact kernel)."""

FP8_STEPS = 2
"""Euler steps of the multi-step comparison."""

FP8_MAX_REL_ERR = 0.1
"""The stage fails when fp8's output is further than this from bf16's: a broken kernel
(garbage is ~1), not a quality bar (the tiny models measure ~5e-3)."""


def stage_fp8(cfg: CheckConfig, folder: Path) -> dict[str, Any]:
    """fp8 attention: TFLOP/s at anchor shapes, then Wan's accuracy against bf16 and fp32."""
    import torch

    import fp8_accuracy
    import vdopt

    attention = _attention_module()
    size = "tiny" if cfg.tiny else "gpu"
    argv = ["--out", str(folder), "--fp8", "--backends", ",".join(FP8_BACKENDS), "--only", ",".join(FP8_SHAPES[size])]
    code = attention.main(argv + (["--smoke", "--reps", "1"] if cfg.tiny else []))
    report = json.loads((folder / ("attention_smoke.json" if cfg.tiny else "attention.json")).read_text())
    figures, errors = _attention_figures(report)
    rel_errs = {f"{row['model']} | {b}": r["rel_err"] for row in report["shapes"] for b, r in row["results"].items()
                if "rel_err" in r}
    sage = {row["model"]: row["anchor"].get("sage") for row in report["shapes"]}

    # Accuracy: the 2-block Wan in fp32 (reference), bf16 eager and bf16 + kernels="fp8" (fp32 +
    # fp8 on the CPU, whose interpreter has no bf16 products for the exact kernel's short sites).
    model, kwargs, _ = smoke_workload(cfg, video=FP8_VIDEO[size])
    fp8_dtype = torch.float32 if cfg.tiny else torch.bfloat16
    cast = lambda dtype: {k: v.to(dtype) if isinstance(v, torch.Tensor) and k != "timestep" else v  # noqa: E731
                          for k, v in kwargs.items()}

    def run(fn, dtype):
        kw = cast(dtype)
        out, _ = _call(fn, kw, cfg.device)

        def predict(x, t):
            return fn(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0]

        return out.float(), fp8_accuracy.euler(predict, kw["hidden_states"], FP8_STEPS).float()

    ref, ref_steps = run(model.float(), torch.float32)
    # fp8 before bf16: on the CPU its model stays fp32, with weights not yet rounded to bf16.
    opt = vdopt.optimize(model.to(fp8_dtype), kernels="fp8", compile=False)
    fp8, fp8_steps = run(opt, fp8_dtype)
    bf16, bf16_steps = run(model.to(torch.bfloat16), torch.bfloat16)
    err = harness.relative_error
    accuracy = {"wan_denoiser_rel_err_bf16": err(bf16, ref), "wan_denoiser_rel_err_fp8": err(fp8, ref),
                "wan_denoiser_fp8_vs_bf16": err(fp8, bf16),
                f"wan_{FP8_STEPS}_steps_rel_err_bf16": err(bf16_steps, ref_steps),
                f"wan_{FP8_STEPS}_steps_rel_err_fp8": err(fp8_steps, ref_steps),
                f"wan_{FP8_STEPS}_steps_fp8_vs_bf16": err(fp8_steps, bf16_steps)}
    figures.update(accuracy)
    stats = _lowering_stats(opt)
    details = {"errors": errors, "attention_rel_err": rel_errs, "sage_anchor_tflops": sage, "smoke": report["smoke"],
               "dtype": report["dtype"], "fp8_model_dtype": str(fp8_dtype).removeprefix("torch."),
               "lowered_fp8": stats.get("lowered_fp8", 0), "choices": stats.get("per_site", {})}
    if code != 0:
        return failed("vdopt's fp8 or bf16 kernel failed on some shapes", figures, **details)
    if not accuracy["wan_denoiser_fp8_vs_bf16"] <= FP8_MAX_REL_ERR:
        return failed(f"fp8 Wan output {accuracy['wan_denoiser_fp8_vs_bf16']:.2e} from bf16's "
                      f"> {FP8_MAX_REL_ERR}", figures, **details)
    return ok(figures, **details)


# -- (c) end to end ---------------------------------------------------------------------------

E2E_TINY = {"layers": 1, "frames": 5, "height": 32, "width": 32, "text_len": 8}
"""The rehearsal's Wan (e2e.py's ``--quick`` sizes)."""

E2E_FIGURES = ("seconds", "seconds_per_step", "first_generation_s", "time_to_first_output_s",
               "aot_compile_s", "load_s", "first_call_s", "peak_memory_bytes")
"""What the check keeps of an e2e method's row (the rest stays in the stage's own JSON)."""


def _e2e_module():
    import e2e

    return e2e


def e2e_argv(cfg: CheckConfig, method: str, folder: Path, timeout_s: float) -> list[str]:
    """``e2e.py`` options for one method (``vdopt_artifact``: only the saved and loaded artifact)."""
    argv = ["--steps", str(cfg.steps), "--repeats", str(cfg.repeats), "--meshes", "none",
            "--out", str(folder), "--timeout", str(int(timeout_s)), "--threads", str(cfg.threads)]
    if cfg.tiny:
        argv += [f"--{key.replace('_', '-')}={value}" for key, value in E2E_TINY.items()]
    else:
        argv += ["--full"]
    if method == "vdopt_artifact":
        return argv + ["--methods", "none", "--artifact", cfg.artifact_of]
    return argv + ["--methods", method, "--artifact", "none"]


def e2e_stage(method: str, budget_s: float) -> Callable[[CheckConfig, Path], dict[str, Any]]:
    def run(cfg: CheckConfig, folder: Path) -> dict[str, Any]:
        report = _e2e_module().main(e2e_argv(cfg, method, folder, budget_s))
        row = report["methods"].get(method, {})
        details = {"model": report["model"], "tokens_per_call": report["tokens_per_call"],
                   "schedule": report["schedule"], "dtype": report["config"]["dtype"]}
        if "skipped" in row:
            return failed(row["skipped"], **details)
        figures = {key: row[key] for key in E2E_FIGURES if isinstance(row.get(key), (int, float))}
        return ok(figures, **details)

    return run


E2E_STAGES = (("diffusers_eager", 60, 25), ("diffusers_pab", 60, 25), ("vdopt", 150, 80),
              ("vdopt_pab", 150, 60), ("vdopt_artifact", 150, 60), ("diffusers_compile", 150, 115))
"""(method, H100 budget s, H100 estimate s) of the e2e stages, in order: ``torch.compile``
last, since its compile is the longest and ANCHORS.md already has its figure (1.20x)."""


def stages() -> tuple[Stage, ...]:
    """Every stage, in the order they run, with their H100 budgets and estimates (seconds)."""
    return (
        Stage("cuda_tests", stage_cuda_tests, budget_s=90, estimate_s=40),
        Stage("kernels_auto", stage_kernels_auto, budget_s=60, estimate_s=15),
        Stage("compiled", stage_compiled, budget_s=90, estimate_s=35),
        Stage("nccl_mesh", stage_nccl_mesh, budget_s=60, estimate_s=15),
        Stage("attention", stage_attention, budget_s=120, estimate_s=50),
        Stage("fp8", stage_fp8, budget_s=75, estimate_s=45),
        *(Stage(f"e2e_{m}", e2e_stage(m, budget), budget_s=budget, estimate_s=estimate)
          for m, budget, estimate in E2E_STAGES),
    )


# -- running the stages -----------------------------------------------------------------------

MIN_STAGE_S = 10.0
"""A stage is not started with less of the run's budget left than this."""

LOG_TAIL_LINES = 25
"""Lines of a failed stage's log kept in the JSON (the whole log stays in its folder)."""


def stage_env(cfg: CheckConfig, out: Path) -> dict[str, str]:
    """The stage processes' environment: the interpreter in the rehearsal, a fresh kernel
    choice cache (``kernels="auto"`` measures as shipped, nothing stale), unbuffered logs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", VDOPT_CACHE_DIR=str(out / "stages" / "vdopt-cache"))
    if cfg.tiny:
        env["TRITON_INTERPRET"] = "1"
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    return env


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-LOG_TAIL_LINES:])


def run_stage(stage: Stage, cfg: CheckConfig, out: Path, limit_s: float) -> dict[str, Any]:
    """Run ``stage`` in its own process for at most ``limit_s``; its record (never raises)."""
    folder = out / "stages" / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGE_RESULT).unlink(missing_ok=True)
    log_path = folder / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name,
           "--config", json.dumps(dataclasses.asdict(cfg)), "--stage-out", str(folder)]
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(cfg, out), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
            status = None
        except subprocess.TimeoutExpired:
            # SIGTERM first: the stage then stops the worker processes it started itself.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"timeout: stopped after {limit_s:.0f} s"
    seconds = time.perf_counter() - start
    result_path = folder / STAGE_RESULT
    if status is None and result_path.exists():
        record = json.loads(result_path.read_text())
    elif status is None:
        status = f"failed: exit status {proc.returncode}, no result"
        record = {"status": status, "figures": {}, "details": {}}
    else:
        record = {"status": status, "figures": {}, "details": {}}
    record["seconds"] = seconds
    record["limit_s"] = limit_s
    if record["status"] != "ok":
        record["log_tail"] = _tail(log_path)
    return record


def run_all(cfg: CheckConfig, out: Path, *, only: list[str] | None = None,
            on_stage: Callable[[str, dict[str, Any]], None] = lambda name, record: None) -> dict[str, dict[str, Any]]:
    """Every stage in turn within ``cfg.budget_s``; a record per stage, whatever happened."""
    deadline = time.monotonic() + cfg.budget_s
    records: dict[str, dict[str, Any]] = {}
    for stage in stages():
        if only is not None and stage.name not in only:
            continue
        left = deadline - time.monotonic()
        limit = min(stage.tiny_budget_s if cfg.tiny else stage.budget_s, left)
        if limit < MIN_STAGE_S:
            record = {"status": f"skipped: the run's {cfg.budget_s:.0f} s budget is spent", "figures": {},
                      "details": {}, "seconds": 0.0, "limit_s": 0.0}
        else:
            record = run_stage(stage, cfg, out, limit)
        record["budget_s"] = stage.tiny_budget_s if cfg.tiny else stage.budget_s
        record["estimate_h100_s"] = stage.estimate_s
        records[stage.name] = record
        on_stage(stage.name, record)
    return records


def stage_main(name: str, cfg: CheckConfig, folder: Path) -> int:
    """The stage process: run ``name`` and write its record (a raised error is its status)."""
    import traceback

    # On the parent's SIGTERM, unwind: ``finally`` blocks (e2e's worker cleanup) then run.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    harness.configure_logging()
    stage = {s.name: s for s in stages()}[name]
    try:
        record = stage.run(cfg, folder)
    except Exception as error:  # noqa: BLE001  a failed stage is a record, the run goes on
        traceback.print_exc()
        record = failed(f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
    (folder / STAGE_RESULT).write_text(json.dumps(record, indent=1, default=str))
    return 0


# -- the report -------------------------------------------------------------------------------

def environment(cfg: CheckConfig) -> dict[str, Any]:
    """The harness stamp, plus cuDNN and the GPU count."""
    import torch

    env = harness.stamp(cfg.device if torch.cuda.is_available() or cfg.tiny else "cpu")
    env["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    env["gpus"] = torch.cuda.device_count()
    return env


def speedups(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Seconds per generation of diffusers eager over each e2e method's (same run, same machine)."""
    eager = records.get("e2e_diffusers_eager", {}).get("figures", {}).get("seconds")
    if not eager:
        return {}
    return {name: eager / r["figures"]["seconds"] for name, r in records.items()
            if name.startswith("e2e_") and r.get("figures", {}).get("seconds")}


def headline(name: str, record: dict[str, Any], speedup: float | None) -> str:
    """The table's figure column: one or two numbers that say the most."""
    f, d = record.get("figures", {}), record.get("details", {})
    if record["status"] != "ok":
        return record["status"][:60]
    if name == "cuda_tests":
        return f"{d['passed']} passed, {d['skipped']} skipped"
    if name == "attention":
        ours = [v for k, v in f.items() if "| vdopt |" in k and k.endswith("TFLOP/s")]
        best = {}
        for k, v in f.items():
            shape, backend, unit = k.split(" | ")
            if backend != "vdopt" and unit == "TFLOP/s":
                best[shape] = max(best.get(shape, 0.0), v)
        return (f"vdopt up to {max(ours):.3g} TFLOP/s, others up to {max(best.values(), default=0):.3g}"
                if ours else "no vdopt figure")
    if name.startswith("e2e_"):
        text = f"{f['seconds']:.3g} s/gen"
        if speedup:
            text += f", {speedup:.2f}x vs eager"
        if "load_s" in f:
            text += f", load {f['load_s']:.3g} s, first call {f.get('first_call_s', 0):.3g} s"
        return text
    if name == "fp8":
        ours = {k.split(" | ")[0]: v for k, v in f.items() if "| vdopt_fp8 |" in k and k.endswith("TFLOP/s")}
        best = max(ours.items(), key=lambda kv: kv[1], default=None)
        text = (f"fp8 up to {best[1]:.3g} TFLOP/s (sage {d['sage_anchor_tflops'].get(best[0])})" if best
                else "no fp8 figure")
        return text + f", Wan rel err fp8 {f['wan_denoiser_rel_err_fp8']:.1e} vs bf16 {f['wan_denoiser_rel_err_bf16']:.1e}"
    if name == "kernels_auto":
        return f"rel err {d['rel_err_vs_eager']:.1e}, {d['lowered_sites']} of {len(d['choices']) or '-'} sites lowered"
    if name == "nccl_mesh":
        return f"rel err {d['rel_err_vs_eager']:.1e} on {d['backend']}"
    if "artifact_rel_err_vs_eager" in d:
        return f"rel err Inductor {d['inductor_rel_err_vs_eager']:.1e}, AOT {d['artifact_rel_err_vs_eager']:.1e}"
    return ""


def table(report: dict[str, Any]) -> str:
    env, records = report["environment"], report["stages"]
    v = env["versions"]
    lines = [f"vdopt gpu-check{' --tiny (CPU rehearsal: no GPU figures)' if report['config']['tiny'] else ''}: "
             f"{env['device']}, torch {v['torch']}, triton {v['triton']}, diffusers {v['diffusers']}, "
             f"{report['seconds']:.0f} s of {report['config']['budget_s']:.0f} s",
             f"{'stage':<24} {'status':<8} {'seconds':>8}  figures"]
    for name, r in records.items():
        status = r["status"].split(":")[0]
        lines.append(f"{name:<24} {status:<8} {r['seconds']:8.1f}  {headline(name, r, report['speedups'].get(name))}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: e2e seconds per generation per method; right: attention TFLOP/s per shape."""
    plt = harness.pyplot()
    records = report["stages"]
    e2e = {n.removeprefix("e2e_"): r["figures"]["seconds"] for n, r in records.items()
           if n.startswith("e2e_") and r.get("figures", {}).get("seconds")}
    attention = {k: v for k, v in records.get("attention", {}).get("figures", {}).items() if k.endswith("TFLOP/s")}
    if not e2e and not attention:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
    left.barh(list(e2e), list(e2e.values()))
    left.set_xlabel("seconds per generation (lower is better)")
    shapes = list(dict.fromkeys(k.split(" | ")[0] for k in attention))
    backends = list(dict.fromkeys(k.split(" | ")[1] for k in attention))
    harness.grouped_bars(right, shapes, {b: [attention.get(f"{s} | {b} | TFLOP/s", 0.0) for s in shapes] for b in backends},
                         rotation=30, ha="right", fontsize=7)
    right.set_ylabel("TFLOP/s")
    if backends:
        right.legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(f"vdopt gpu-check, {env['device']}, torch {env['versions']['torch']}"
                 + (" (TINY: CPU rehearsal, not GPU numbers)" if report["config"]["tiny"] else ""), fontsize=10)
    harness.save_figure(fig, path)


def run(cfg: CheckConfig, out: Path, *, only: list[str] | None = None,
        progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The whole check: every stage, then ``gpu_check.{json,png,txt}`` in ``out``."""
    out = harness.results_dir(out)
    start = time.perf_counter()

    def on_stage(name: str, record: dict[str, Any]) -> None:
        progress(f"gpu-check: {name}: {record['status'].splitlines()[0][:100]} ({record['seconds']:.1f} s)")

    records = run_all(cfg, out, only=only, on_stage=on_stage)
    report = {
        "benchmark": "gpu_check",
        "environment": environment(cfg),
        "config": dataclasses.asdict(cfg),
        "estimate_h100_s": sum(s.estimate_s for s in stages()),
        "seconds": time.perf_counter() - start,
        "stages": records,
        "speedups": speedups(records),
    }
    text = table(report)
    harness.write_results(out, "gpu_check", report, plot=plot)
    (out / "gpu_check.txt").write_text(text)
    report["table"] = text
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vdopt gpu-check`` / ``python benchmarks/gpu_check.py``."""
    defaults = CheckConfig()
    p.add_argument("--tiny", action="store_true",
                   help="rehearse every stage on the CPU at toy sizes (Triton interpreter), about two minutes")
    harness.add_out_argument(p)
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all stages together (default {defaults.budget_s:.0f}; the rehearsal {TINY_BUDGET_S:.0f})")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"denoising steps per e2e generation (default {defaults.steps})")
    p.add_argument("--repeats", type=int, default=defaults.repeats,
                   help=f"timed e2e generations per method after the warm-up one (default {defaults.repeats})")
    p.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    # internal: one stage in its own process
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", type=Path, help=argparse.SUPPRESS)


TINY_BUDGET_S = 900.0
"""The rehearsal's whole budget: generous, a slow shared CPU must not cut a stage short."""


def config_from(args: argparse.Namespace) -> CheckConfig:
    budget = args.budget_s if args.budget_s is not None else (TINY_BUDGET_S if args.tiny else CheckConfig.budget_s)
    return CheckConfig(tiny=args.tiny, budget_s=budget, steps=args.steps, repeats=args.repeats,
                       threads=1 if args.tiny else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.stage:
        return stage_main(args.stage, CheckConfig(**json.loads(args.config)), args.stage_out)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    """The check from parsed options (``vdopt gpu-check`` too): progress lines, then the
    table last; 1 when a stage did not end ``ok``."""
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or ()) - {s.name for s in stages()})
    if unknown:
        raise ValueError(f"--only: unknown stages {unknown}; choose from {', '.join(s.name for s in stages())}")
    report = run(config_from(args), args.out, only=only, progress=lambda line: print(line, flush=True))
    print(report["table"], end="", flush=True)
    return 0 if all(r["status"] == "ok" for r in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
