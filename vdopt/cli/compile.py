"""``vdopt compile MODEL --mesh ... --out DIR``: write AOT artifacts from the command line.

MODEL is a zoo name (``wan``, ``latte``, ...; random weights) or ``module:factory``, where
``factory()`` returns ``(model, args, kwargs)`` like ``vdopt.models.build``: the model and
one call's inputs, whose shapes the artifact is compiled for. With a mesh of several ranks,
run it under torchrun, e.g.::

    torchrun --nproc-per-node 2 $(which vdopt) compile wan --mesh ulysses=2 --out artifacts/wan
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Any

from vdopt.api import KERNEL_CHOICES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model to AOTInductor artifacts (one per rank) and a manifest")
    p.add_argument("model", help="zoo model name (vdopt.models.list_models()) or module:factory returning (model, args, kwargs)")
    p.add_argument("--out", required=True, help="artifact directory to write (replaced if it holds an artifact)")
    p.add_argument("--mesh", default=None,
                   help="parallel degrees as axis=degree pairs, e.g. ulysses=2,cfg=2 (axes: cfg, pipefusion, "
                        "ring, ulysses, dsp; their product is the number of ranks); default: one device")
    p.add_argument("--pab", action="store_true",
                   help="add Pyramid Attention Broadcast: a zoo model gets its paper's settings, any other model PABConfig()")
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="attention kernels: auto uses vdopt's Triton kernels on CUDA where they are faster, "
                        "triton everywhere possible, fp8 the approximate fp8 kernel (Hopper-class GPUs), "
                        "sdpa never (default auto)")
    p.add_argument("--size", default="tiny", choices=("tiny", "full"),
                   help="zoo configuration: tiny (for tests) or full (the published model) (default tiny)")
    shape_help = {
        "batch": "zoo input batch size (2 for a batched cond/uncond pair)",
        "frames": "zoo input video frames, in pixel space",
        "height": "zoo input video height in pixels",
        "width": "zoo input video width in pixels",
        "text-len": "zoo input prompt length in text tokens",
    }
    for flag, text in shape_help.items():
        p.add_argument(f"--{flag}", type=int, help=text + " (default: the configuration's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the weights and inputs (default float32)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.set_defaults(func=run)


def load_model(spec: str, args: argparse.Namespace) -> tuple[Any, tuple, dict]:
    """``(model, args, kwargs)`` from a zoo name or ``module:factory``."""
    import torch

    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        sys.path.insert(0, ".")  # like `python -m`: modules in the working directory
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{spec}: cannot import {attr} from {module_name} ({e})") from None
        made = factory()
        if not (isinstance(made, tuple) and len(made) == 3):
            raise ValueError(f"{spec}() must return (model, args, kwargs), got {type(made).__name__}")
        model, margs, mkwargs = made
        return model.to(device=device), tuple(margs), dict(mkwargs)
    from vdopt.models import build

    shape = {k: getattr(args, k) for k in ("batch", "frames", "height", "width", "text_len") if getattr(args, k) is not None}
    return build(spec, args.size, dtype=dtype, device=device, **shape)


def run(args: argparse.Namespace) -> int:
    import vdopt
    from vdopt.mesh import as_mesh

    mesh = as_mesh(args.mesh)
    model, margs, mkwargs = load_model(args.model, args)
    pab = None
    if args.pab:
        from vdopt.models.pab_defaults import PAB_DEFAULTS

        # A zoo model gets its paper settings; any other model the PABConfig defaults.
        pab = PAB_DEFAULTS.get(args.model, vdopt.PABConfig())
    start = time.perf_counter()
    # compile=False: the artifacts are compiled ahead of time below, not by torch.compile.
    opt = vdopt.optimize(model, mesh, pab=pab, kernels=args.kernels, example_inputs=(margs, mkwargs), compile=False)
    path = opt.save(args.out)
    seconds = time.perf_counter() - start
    from vdopt.artifacts import read_manifest

    manifest = read_manifest(path)
    files = [v for plan in manifest["plans"] for var in plan["variants"].values() for v in var["packages"]]
    size = sum(f["bytes"] for f in files) + sum(w["bytes"] for w in manifest["weights"])
    if not _is_quiet_rank():
        variants = ", ".join(v for plan in manifest["plans"] for v in plan["variants"])
        print(f"wrote {path}: {len(files)} package(s) ({variants}) for {manifest['mesh']['world_size']} rank(s), "
              f"{size / 2**20:.1f} MiB, in {seconds:.1f} s")
        print(f"load it with vdopt.load({str(path)!r}) and call it with: {opt.plans[0].signature}")
    return 0


def _is_quiet_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
