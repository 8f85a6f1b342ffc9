"""``vdopt plan MODEL --world 8 --device h100 --link nvlink``: rank every mesh for a zoo model.

The model is built on the ``meta`` device at its full (published) configuration by default,
so planning a large model needs neither its memory nor a GPU nor a process group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="rank every parallel mesh for a zoo model by predicted time per call")
    p.add_argument("model", help="zoo model name (vdopt.models.list_models(): wan, latte, cogvideox, opensora, opensora_plan)")
    p.add_argument("--world", type=int, required=True, help="number of ranks (GPUs) to plan for")
    p.add_argument("--device", default="h100",
                   help="device row (h100, h200, a100, l40, l20, h20, h800, cpu) or a file from `vdopt calibrate` (default h100)")
    p.add_argument("--link", default="nvlink",
                   help="link row (nvlink, nvlink3, nvlink_h800, pcie, pcie5, infiniband, ethernet) or a file from "
                        "`vdopt calibrate` (default nvlink)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory per rank in GB (default: the device's)")
    p.add_argument("--pab", action="store_true", help="cost calls with the zoo model's Pyramid Attention Broadcast settings")
    p.add_argument("--size", default="full", choices=("tiny", "full"),
                   help="zoo configuration (default full: the published model, on the meta device)")
    p.add_argument("--batch", type=int, default=2,
                   help="batch of one call (default 2: a CFG step's cond/uncond pair, which cfg=2 splits; "
                        "vdopt.optimize(pipe) pairs a pipeline's separate cond and uncond calls the same way); "
                        "1 for a model run without CFG")
    for flag, text in {"frames": "video frames",
                       "height": "video height in pixels", "width": "video width in pixels",
                       "text-len": "prompt length in text tokens"}.items():
        p.add_argument(f"--{flag}", type=int, help=text + " (default: the configuration's)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="dtype of weights and activations (default bfloat16)")
    p.add_argument("--json", type=Path, default=None, help="also write every candidate as JSON to this file")
    p.add_argument("--no-reuse-blocks", dest="reuse_blocks", action="store_false",
                   help="capture and rewrite every transformer block for every mesh instead of costing identical "
                        "blocks once (slow; for checking the fast plan)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import vdopt
    from vdopt.models import build
    from vdopt.models.pab_defaults import default_pab_config

    shape = {k: getattr(args, k.replace("-", "_")) for k in ("batch", "frames", "height", "width", "text_len")
             if getattr(args, k.replace("-", "_")) is not None}
    model, margs, mkwargs = build(args.model, args.size, device="meta", dtype=getattr(torch, args.dtype), **shape)
    pab = default_pab_config(args.model) if args.pab else None
    plan = vdopt.plan(model, args.world, *margs, device=args.device, link=args.link, memory_gb=args.memory_gb,
                      pab=pab, reuse_blocks=args.reuse_blocks, **mkwargs)
    print(plan)
    print()
    print(plan.table())
    print(f"\nbest: vdopt.Mesh({', '.join(f'{a}={d}' for a, d in plan.degrees.items() if d > 1) or ''})"
          f"  (--mesh {plan.best.name})")
    if args.json is not None:
        args.json.write_text(json.dumps(plan_json(plan), indent=1))
    return 0


def plan_json(plan) -> dict:
    """Every candidate of ``plan`` as plain data."""
    def one(c) -> dict:
        out = {"mesh": c.name, "degrees": c.degrees, "seconds": c.seconds, "peak_memory_gb": c.peak_memory_gb,
               "dominant": c.dominant, "reason": c.reason}
        if c.cost is not None:
            out.update(breakdown=c.cost.breakdown, comm_bytes=c.cost.comm_bytes, flops=c.cost.flops)
        return out

    return {"model": plan.model, "world_size": plan.world_size, "device": plan.device.key, "link": plan.link.key,
            "degrees": plan.degrees, "candidates": [one(c) for c in plan.candidates],
            "excluded": [one(c) for c in plan.excluded]}
