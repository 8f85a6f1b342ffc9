"""``vdopt calibrate --out FILE``: measure this machine's device and link rows for ``vdopt plan``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure this device (matmul, attention, memory bandwidth) and the link "
                                         "between local ranks; write a row vdopt plan --device/--link FILE reads")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--ranks", type=int, default=2, help="local processes for the all-to-all link measurement (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank while measuring a CPU (default: the cores shared out among "
                        "the ranks; use what each rank will run with)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vdopt.planning.calibrate import calibrate

    data = calibrate(args.out, device=args.device, ranks=args.ranks, threads=args.threads, quick=args.quick)
    dev, link = data["device"], data["link"]
    print(f"device: {dev['name']}: matmul {dev['matmul_tflops']['float32'] * 1e3:.1f} GFLOP/s (float32), "
          f"{dev['matmul_tflops']['bfloat16'] * 1e3:.1f} (bfloat16); attention {dev['attention_tflops']['float32'] * 1e3:.1f} "
          f"GFLOP/s (float32); memory {dev['memory_bandwidth_gbps']:.1f} GB/s; {dev['op_overhead_us']:.1f} us per op")
    print(f"link: {link['name']}: {link['bandwidth_gbps']:.2f} GB/s, {link['latency_us']:.0f} us per collective")
    print(f"wrote {args.out}: use vdopt plan MODEL --device {args.out} --link {args.out}")
    return 0
