"""``vdopt generate PIPELINE --prompt ... --out video.mp4``: text to video with an optimized pipeline.

PIPELINE is a diffusers pipeline directory (``save_pretrained``) or a Hub id. Its denoisers
are optimized for ``--mesh`` (the VAE patch-parallel, text encoders unchanged) with
``vdopt.optimize(pipe, mesh)``; the video is written with diffusers' ``export_to_video``
(imageio and its ffmpeg). With a mesh of several ranks, run it under torchrun; every rank
runs the pipeline and rank 0 alone writes the file and prints the summary::

    torchrun --nproc-per-node 4 $(which vdopt) generate Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --prompt "a cat walking in the snow" --frames 33 --height 480 --width 832 \\
        --mesh ulysses=2,cfg=2 --out cat.mp4

The summary splits the time into text encoding (the call until the first denoiser call),
denoising (until the last step ends; the first call also captures and rewrites the
denoisers, reported apart) and decoding (the VAE and writing out frames), and gives the peak
memory (CUDA allocator on a GPU, the process's peak resident set on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import time
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video from a text prompt with an optimized diffusers pipeline")
    p.add_argument("pipeline", help="diffusers pipeline directory (save_pretrained) or Hub id")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default=None, help="what the video avoids (default: the pipeline's)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (default: the pipeline's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial noise, the same on every rank (default 0)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--mesh", default=None,
                   help="parallel degrees as axis=degree pairs, e.g. ulysses=2,cfg=2 (axes: cfg, pipefusion, ring, "
                        "ulysses, dsp; their product is the number of torchrun ranks); default: one device")
    p.add_argument("--pab", action="store_true", help="add Pyramid Attention Broadcast (approximate by design)")
    p.add_argument("--out", default="video.mp4", help="video file to write, on rank 0 (default video.mp4)")
    p.add_argument("--fps", type=int, default=16, help="frames per second of the written video (default 16)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype: auto is bfloat16 on CUDA and float32 on the CPU (default auto)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=JSON",
                   help="one more pipeline call argument, its value as JSON, e.g. max_sequence_length=226 (repeatable)")
    p.set_defaults(func=run)


@dataclasses.dataclass
class Timings:
    """Wall-clock marks of one pipeline call (``time.perf_counter`` seconds)."""

    start: float = 0.0
    first_denoise: float | None = None
    last_step: float | None = None
    end: float = 0.0
    steps: int = 0


def parse_call_args(pairs: list[str]) -> dict[str, Any]:
    """``["max_sequence_length=226"]`` -> ``{"max_sequence_length": 226}`` (values are JSON, else text)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--arg {pair!r}: write KEY=VALUE, e.g. --arg max_sequence_length=226")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def call_arguments(pipe: Any, args: argparse.Namespace, generator: Any) -> dict[str, Any]:
    """The pipeline call's keyword arguments: the options given, those the pipeline takes."""
    wanted = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "num_frames": args.frames,
        "height": args.height, "width": args.width, "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {k: v for k, v in wanted.items() if v is not None and k in accepted}
    ignored = [k for k, v in wanted.items() if v is not None and k not in accepted]
    if ignored:
        raise ValueError(f"{type(pipe).__name__} takes no {', '.join(ignored)}: drop the matching options")
    extra = parse_call_args(args.arg)
    unknown = [k for k in extra if k not in accepted]
    if unknown:
        raise ValueError(f"--arg {', '.join(unknown)}: {type(pipe).__name__} takes no such argument")
    kwargs.update(extra, generator=generator, output_type="np")
    return kwargs


def peak_memory(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocator, this rank)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak resident set, this rank's process)"


def optimized_denoisers(pipe: Any) -> list[Any]:
    """The pipeline's components vdopt made from its denoisers (modules; the patch-parallel VAE is not one)."""
    import torch

    return [c for c in pipe.components.values()
            if type(c).__module__.startswith("vdopt.") and isinstance(c, torch.nn.Module) and hasattr(c, "plans")]


def run_pipeline(pipe: Any, kwargs: dict[str, Any]) -> tuple[Any, Timings]:
    """Run the pipeline once, timing its phases from its own step callback and a pre-hook on
    each optimized denoiser (vdopt's own modules: the pipeline's code is unchanged). The step
    bar is vdopt's progress reporter (rank 0 only)."""
    from vdopt.progress import progress

    marks = Timings()
    denoisers = optimized_denoisers(pipe)

    def first_call(module: Any, args: Any) -> None:
        if marks.first_denoise is None:
            marks.first_denoise = time.perf_counter()

    hooks = [d.register_forward_pre_hook(first_call) for d in denoisers]
    accepted = inspect.signature(pipe.__call__).parameters
    steps = kwargs.get("num_inference_steps") or accepted["num_inference_steps"].default
    try:
        with progress(steps, "denoising") as bar:
            if "callback_on_step_end" in accepted:
                def step_end(pipeline: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
                    marks.last_step = time.perf_counter()
                    marks.steps += 1
                    bar.update(1)
                    return callback_kwargs

                kwargs = {**kwargs, "callback_on_step_end": step_end}
            marks.start = time.perf_counter()
            output = pipe(**kwargs)
            marks.end = time.perf_counter()
    finally:
        for h in hooks:
            h.remove()
    return output, marks


def summary_lines(marks: Timings, capture_s: float, memory: str) -> list[str]:
    total = marks.end - marks.start
    if marks.first_denoise is None or marks.last_step is None:
        return [f"  total           {total:8.2f} s", f"  peak memory     {memory}"]
    text = marks.first_denoise - marks.start
    denoise = marks.last_step - marks.first_denoise
    decode = marks.end - marks.last_step
    per_step = (denoise - capture_s) / max(marks.steps, 1)
    return [
        f"  text encoding   {text:8.2f} s",
        f"  denoising       {denoise:8.2f} s   {marks.steps} steps, {per_step:.3f} s/step after vdopt's capture "
        f"and rewrite ({capture_s:.2f} s, first call only)",
        f"  decoding        {decode:8.2f} s   (VAE and frames)",
        f"  total           {total:8.2f} s",
        f"  peak memory     {memory}",
    ]


def run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import export_to_video

    import vdopt
    from vdopt.mesh import as_mesh

    mesh = as_mesh(args.mesh)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype)
    except (OSError, EnvironmentError) as e:
        raise ValueError(f"cannot load a diffusers pipeline from {args.pipeline!r}: {e}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # vdopt's bar below: one per run, rank 0 only
    vdopt.optimize(pipe, mesh, pab=vdopt.PABConfig() if args.pab else None)
    generator = torch.Generator("cpu").manual_seed(args.seed)  # CPU: the same noise on every rank and device
    kwargs = call_arguments(pipe, args, generator)
    output, marks = run_pipeline(pipe, kwargs)
    frames = output.frames[0]
    capture_s = sum(p.capture_s + p.passes_s for c in optimized_denoisers(pipe) for p in c.plans)
    if rank == 0:
        path = export_to_video(list(frames), args.out, fps=args.fps, macro_block_size=1)
        count, height, width = len(frames), frames[0].shape[0], frames[0].shape[1]
        where = f"Mesh({mesh.describe()})" if mesh is not None else "one device"
        print(f"vdopt generate: {type(pipe).__name__}, {count} frames {width}x{height}, {where}, wrote {path}")
        for line in summary_lines(marks, capture_s, peak_memory(device)):
            print(line)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves while rank 0 still writes
        torch.distributed.destroy_process_group()
    return 0
