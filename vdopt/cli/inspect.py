"""``vdopt inspect MODEL``: the attention-site table of a zoo model."""

from __future__ import annotations

import argparse
from collections import Counter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list the attention sites of a zoo model and their kinds")
    p.add_argument("model", help="zoo model name: latte, wan, cogvideox, opensora or opensora_plan")
    p.add_argument("--size", default="tiny", choices=("tiny", "full"),
                   help="zoo configuration: tiny (for tests) or full (the published model; analysed on the "
                        "meta device, so it needs no memory) (default tiny)")
    p.add_argument("--frames", type=int, help="video frames, in pixel space (default: the configuration's)")
    p.add_argument("--height", type=int, help="video height in pixels (default: the configuration's)")
    p.add_argument("--width", type=int, help="video width in pixels (default: the configuration's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vdopt
    from vdopt.models import build
    from vdopt.runtime.report import table

    shape = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
    # Analysis needs shapes only: on the meta device even full configurations cost no memory.
    model, margs, mkwargs = build(args.model, args.size, device="meta", **shape)
    sites = vdopt.inspect(model, *margs, **mkwargs)
    rows = [[s.name, s.kind, s.block or "-", s.heads, s.head_dim, s.batch, s.q_len, s.kv_len, "yes" if s.has_mask else "no"] for s in sites]
    print(table(rows, ["site", "kind", "block", "heads", "head_dim", "batch", "q_len", "kv_len", "mask"]))
    counts = Counter(s.kind for s in sites)
    print(f"\n{len(sites)} attention sites: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
