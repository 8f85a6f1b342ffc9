"""Attention kernels on the attention shapes of published video DiTs, measured in one run.

    python benchmarks/attention.py                 # GPU: every shape below, bf16
    python benchmarks/attention.py --quick         # CPU toy sizes under the Triton interpreter (alias --smoke)

For every shape it times vdopt's kernel against SDPA's cuDNN, flash and memory-efficient
backends and, when installed, the ``flash_attn`` wheel (FlashAttention-2) and its CuTe
interface (FlashAttention-4). Compute-bound
shapes report TFLOP/s (4*B*N*Sq*Skv*D / time), short-sequence shapes also GB/s of Q, K, V and
O moved. Each backend's relative error is ``||out - ref|| / ||ref||`` against an fp32
reference on a slice of heads and query rows (all keys). Results go to ``--out`` (default
``./vdopt-results``) as ``attention.json`` and ``attention.png`` with device, versions and date.
Each shape row also keeps reference figures measured on an H100 (``anchor``).

``--fp8`` adds vdopt's approximate fp8 kernel (``kernels="fp8"``; Hopper and newer): ``vdopt_fp8``
(Q, K, P and V in e4m3, what ``kernels="fp8"`` runs) and ``vdopt_fp8_qk`` (Q and K in e4m3,
P @ V in bf16), with SageAttention 1's H100 figures (``anchor["sage"]``) as the bar.
``--backends`` and ``--only`` (comma-separated) narrow the run (the gpu-check's fp8 stage).

Inputs are (B, S, N, D) tensors viewed as (B, N, S, D), the layout the models produce.
``--smoke`` shrinks every shape, runs on CPU (SDPA's math backend stands in for the GPU
backends) and writes ``attention_smoke.*``, so CPU timings are never mistaken for GPU numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

log = logging.getLogger("vdopt.benchmarks.attention")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    model: str
    anchor: dict
    """Reference figures measured on an H100 (TFLOP/s, or ms for the short-sequence shapes)."""

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim

    def bytes_moved(self, element_size: int) -> float:
        q_and_out = 2 * self.batch * self.heads * self.q_len * self.head_dim
        k_and_v = 2 * self.batch * self.heads * self.kv_len * self.head_dim
        return float((q_and_out + k_and_v) * element_size)

    @property
    def memory_bound(self) -> bool:
        return self.kv_len <= 64

    def shrunk(self) -> "Shape":
        """A toy version for --smoke: same head dim, small everything else."""
        if self.memory_bound:
            return dataclasses.replace(self, batch=min(self.batch, 24), heads=2)
        return dataclasses.replace(
            self, batch=1, heads=2, q_len=min(self.q_len, 77), kv_len=min(self.kv_len, 96)
        )


ANCHOR_SHAPES = [
    Shape(1, 40, 32760, 32760, 128, "Wan2.1-14B 480p self", {"cudnn": 579, "flash": 320, "fa4": 689, "sage": 445}),
    Shape(1, 12, 32760, 32760, 128, "Wan2.1-1.3B 480p self", {"cudnn": 568, "flash": 353, "fa4": 677, "sage": 428}),
    Shape(1, 24, 67576, 67576, 128, "HunyuanVideo 544p joint", {"cudnn": 563, "flash": 363, "fa4": 694, "sage": 455}),
    Shape(1, 48, 17776, 17776, 64, "CogVideoX-5B 49f joint", {"cudnn": 418, "flash": 321, "fa4": 531, "sage": 393}),
    Shape(1, 40, 32760, 512, 128, "Wan cross-attention to text", {"cudnn": 498, "flash": 306, "fa4": 376, "sage": 258}),
    Shape(32, 16, 1024, 1024, 72, "Latte 512px spatial (CFG)", {"cudnn": 309, "flash": 203, "fa4": 238, "sage": 92}),
    Shape(60, 16, 3600, 3600, 72, "Open-Sora 1.2 720p spatial", {"cudnn": 308, "flash": 233, "fa4": 412, "sage": 175}),
    Shape(2048, 16, 16, 16, 72, "Latte temporal (16 frames)", {"cudnn_ms": 0.71, "flash_ms": 0.62, "fa4_ms": 1.53, "sage_ms": 2.16}),
    Shape(7200, 16, 30, 30, 72, "Open-Sora 720p temporal", {"cudnn_ms": 2.44, "flash_ms": 2.21, "fa4_ms": 4.74}),
]


def make_inputs(shape: Shape, dtype, device, seed: int = 0):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def one(length):
        t = torch.randn(shape.batch, length, shape.heads, shape.head_dim, generator=gen, device=device, dtype=dtype)
        return t.transpose(1, 2)

    return one(shape.q_len), one(shape.kv_len), one(shape.kv_len)


def backends(device: str, *, fp8: bool = False) -> dict[str, Callable]:
    """name -> fn(q, k, v) -> out, for the backends this machine has (``fp8``: vdopt's fp8 too)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vdopt.kernels.dispatch import attention_forward

    def ours(q, k, v):
        return attention_forward(q, k, v, q.shape[-1] ** -0.5)[0]

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    found = {"vdopt": ours}
    if fp8:
        from vdopt.kernels.dispatch import attention_fp8_forward
        from vdopt.kernels.fp8_attention import check_fp8_device, fp8_attention

        def ours_fp8(q, k, v):  # what kernels="fp8" runs (a ValueError on GPUs without fp8)
            return attention_fp8_forward(q, k, v, q.shape[-1] ** -0.5)[0]

        def ours_fp8_qk(q, k, v):
            check_fp8_device(q.device)
            return fp8_attention(q, k, v, q.shape[-1] ** -0.5, pv="native")[0]

        found["vdopt_fp8"] = ours_fp8
        found["vdopt_fp8_qk"] = ours_fp8_qk
    if device == "cuda":
        found["sdpa_cudnn"] = sdpa_with(SDPBackend.CUDNN_ATTENTION)
        found["sdpa_flash"] = sdpa_with(SDPBackend.FLASH_ATTENTION)
        found["sdpa_efficient"] = sdpa_with(SDPBackend.EFFICIENT_ATTENTION)
        try:
            from flash_attn import flash_attn_func as fa2_func  # FlashAttention-2 wheel

            def fa2(q, k, v):
                return fa2_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

            found["flash_attn"] = fa2
        except ImportError:
            log.warning("flash_attn is not installed: FlashAttention-2 is not measured")
        try:
            from flash_attn.cute.interface import flash_attn_func  # FlashAttention-4 (CuTe DSL)

            def fa4(q, k, v):
                out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                out = out[0] if isinstance(out, tuple) else out
                return out.transpose(1, 2)

            found["fa4"] = fa4
        except ImportError:
            log.warning("flash_attn.cute is not installed: FlashAttention-4 is not measured")
    else:
        found["sdpa_math"] = sdpa_with(SDPBackend.MATH)
    return found


def time_ms(fn: Callable, device: str, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, reps * 10), return_mode="median"))
    return 1e3 * harness.median_seconds(fn, calls=reps, device=device)


def relative_error(out, q, k, v, max_heads: int = 2, max_rows: int = 1024) -> float:
    """``||out - ref|| / ||ref||`` on a slice of heads and query rows, all keys, fp32 reference."""
    import torch

    from vdopt.kernels.flash_attention import attention_reference

    heads, rows = min(max_heads, q.shape[1]), min(max_rows, q.shape[2])
    b = min(q.shape[0], 64)
    sl = (slice(0, b), slice(0, heads))
    ref, _ = attention_reference(
        q[sl][:, :, :rows], k[sl], v[sl], q.shape[-1] ** -0.5, compute_dtype=torch.float32
    )
    got = out[sl][:, :, :rows].float()
    return ((got - ref).norm() / ref.norm()).item()


def measure(shapes: list[Shape], device: str, dtype, reps: int, *, fp8: bool = False,
            only_backends: list[str] | None = None) -> list[dict]:
    import torch

    rows = []
    available = backends(device, fp8=fp8)
    if only_backends is not None:
        available = {name: fn for name, fn in available.items() if name in only_backends}
    for shape in shapes:
        q, k, v = make_inputs(shape, dtype, device)
        row = {**dataclasses.asdict(shape), "results": {}}
        for name, fn in available.items():
            try:
                out = fn(q, k, v)
                ms = time_ms(lambda: fn(q, k, v), device, reps)
                result = {
                    "ms": ms,
                    "tflops": shape.flops / (ms * 1e-3) / 1e12,
                    "gbps": shape.bytes_moved(q.element_size()) / (ms * 1e-3) / 1e9,
                    "rel_err": relative_error(out, q, k, v),
                }
            except Exception as e:  # a backend that cannot run a shape is a result, not a crash
                result = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            row["results"][name] = result
            log.info("%-28s %-11s %s", shape.model, name, _describe(result, shape))
        rows.append(row)
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _describe(result: dict, shape: Shape) -> str:
    if "error" in result:
        return result["error"]
    main = f"{result['gbps']:8.1f} GB/s" if shape.memory_bound else f"{result['tflops']:8.1f} TFLOP/s"
    return f"{result['ms']:9.3f} ms {main}  rel err {result['rel_err']:.2e}"


def environment(device: str) -> dict:
    """The harness stamp plus what attention timings depend on (cuDNN, the Triton interpreter)."""
    import torch

    return {
        **harness.stamp(device),
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def plot(rows: list[dict], path: Path, title: str, *, bandwidth_ceiling: float | None) -> None:
    plt = harness.pyplot()

    compute = [r for r in rows if r["kv_len"] > 64]
    memory = [r for r in rows if r["kv_len"] <= 64]
    names = sorted({n for r in rows for n in r["results"]})
    fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [max(len(compute), 1), max(len(memory), 1)]})
    for ax, group, key, unit in ((axes[0], compute, "tflops", "TFLOP/s"), (axes[1], memory, "gbps", "GB/s")):
        harness.grouped_bars(ax, [r["model"] for r in group],
                             {name: [r["results"].get(name, {}).get(key, 0.0) for r in group] for name in names},
                             rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
    if bandwidth_ceiling:
        axes[1].axhline(bandwidth_ceiling, color="gray", linestyle="--", linewidth=1, label="H100 copy ceiling (~3000 GB/s)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    harness.save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", "--quick", action="store_true",
                        help="CPU toy sizes under the Triton interpreter (a smoke run, not GPU figures)")
    harness.add_out_argument(parser)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of Q, K and V on the GPU (default bfloat16; CPU smoke runs use float32)")
    parser.add_argument("--only", default=None,
                        help="run only the shapes whose model name contains this text (comma-separated: any of them)")
    parser.add_argument("--fp8", action="store_true", help="also time vdopt's fp8 kernels (compute capability 8.9+)")
    parser.add_argument("--backends", default=None, help="comma-separated backends to time (default: every one found)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per backend on the CPU (default 5)")
    args = parser.parse_args(argv)
    harness.configure_logging()

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules load
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke for the CPU toy version")
    # The interpreter has no bf16 dot (triton-lang/triton#11584): CPU smoke runs use fp32.
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    wanted = None if args.only is None else [w.strip().lower() for w in args.only.split(",")]
    shapes = [s for s in ANCHOR_SHAPES if wanted is None or any(w in s.model.lower() for w in wanted)]
    if args.smoke:
        shapes = [s.shrunk() for s in shapes]

    stem = "attention_smoke" if args.smoke else "attention"
    rows = measure(shapes, device, dtype, args.reps, fp8=args.fp8,
                   only_backends=None if args.backends is None else [b.strip() for b in args.backends.split(",")])
    env = environment(device)
    report = {"environment": env, "dtype": str(dtype).removeprefix("torch."), "smoke": args.smoke, "shapes": rows}
    versions = env["versions"]
    title = (f"vdopt attention vs baselines, {env['device']}, torch {versions['torch']}, "
             f"triton {versions['triton']}, {report['dtype']}")
    if args.smoke:
        title += " (SMOKE: CPU toy sizes, not GPU numbers)"

    def draw(report: dict, path: Path) -> None:
        plot(report["shapes"], path, title, bandwidth_ceiling=None if args.smoke else 3000.0)

    harness.write_results(args.out, stem, report, plot=draw)
    failed = [(r["model"], n) for r in rows for n, res in r["results"].items()
              if "error" in res and n.startswith("vdopt")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
