"""Measure this machine's device and link rows (``vdopt calibrate --out FILE``).

Device, in the dtypes the row lists: the rate of a large matrix product; SDPA at a short
and a long key length, which fix the row's long-sequence rate and the key length at which
the kernel reaches half of it (``attention_half_kv``: GPU kernels lose much at short keys,
CPU ones little); the bytes per second of the memory-bound ops of a transformer block
(copy, add, broadcast mul, GELU, layer and RMS norm, softmax) on tensors of activation size
(a few MiB on a CPU: larger fresh tensors measure the allocator's page faults, not the ops);
and the fixed cost of a small op run through an FX graph (what an uncompiled graph pays per
node). Link: all-to-alls between ``ranks`` local processes (gloo on the CPU, NCCL between
GPUs), each timed between matrix products less the products alone, in alternating rounds
(the wait for skewed ranks is part of a collective's cost; alternating cancels a load that
drifts): latency from 1 KiB messages, bandwidth from the slope up to 16 MiB.

On a CPU the device is measured in every rank at once (``calibrate(ranks=N)``, and the
benchmarks' ranks): ranks that will share the cores while running share them while
measuring, and the row holds the median over the ranks. Medians of repeated runs; other
processes on a shared machine still show up in them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vdopt.planning.cost_model import attention_efficiency
from vdopt.planning.devices import DeviceSpec, LinkSpec, as_row

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
"""Dtypes a calibrated row lists (``float16`` copies ``bfloat16``)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _sizes(device: torch.device, quick: bool) -> dict[str, int]:
    if device.type == "cuda":
        return {"matmul": 8192, "copy_mb": 256, "seq": (1024, 8192), "heads": 16, "dim": 128, "repeats": 10}
    # a CPU at the sizes of the models it runs: products of a few hundred rows and columns
    if quick:
        return {"matmul": 256, "copy_mb": 1, "seq": (128, 512), "heads": 4, "dim": 64, "repeats": 3}
    return {"matmul": 512, "copy_mb": 2, "seq": (256, 1024), "heads": 4, "dim": 64, "repeats": 9}


def fit_attention(short: tuple[int, float], long: tuple[int, float], dim: int) -> tuple[float, float]:
    """``(long-sequence rate, half_kv)`` of ``cost_model.attention_efficiency`` through two
    measured ``(key length, FLOP/s)`` points at head dim ``dim``."""
    (kv1, r1), (kv2, r2) = short, long
    ratio = r1 / r2  # = kv1 (kv2 + h) / (kv2 (kv1 + h))
    if ratio >= 1.0:
        half = 0.0  # no loss at short keys (within noise)
    elif ratio * kv2 <= kv1:
        half = 8.0 * kv2  # steeper than the curve can say: its steepest within the measured range
    else:
        half = min(kv1 * kv2 * (1.0 - ratio) / (ratio * kv2 - kv1), 8.0 * kv2)
    return r2 / attention_efficiency(kv2, dim, half), half


def measure_device(device: torch.device | str, *, quick: bool = False) -> DeviceSpec:
    """The device row of ``device`` (``cpu`` measures at the current ``torch.get_num_threads()``)."""
    device = torch.device(device)
    s = _sizes(device, quick)
    matmul, attention, halves = {}, {}, {}
    n = s["matmul"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for name in DTYPES:
        dtype = getattr(torch, name)
        # a square product and the two skinny ones of a transformer's MLP (tokens x width x 4*width)
        shapes = [(n, n, n), (4 * n, n // 4, n), (4 * n, n, n // 4)]
        flops = seconds = 0.0
        for m, k, j in shapes:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, j, device=device, dtype=dtype)
            seconds += _median_seconds(lambda: a @ b, device, s["repeats"])
            flops += 2 * m * k * j
        matmul[name] = flops / seconds / 1e12
        points = []
        for seq in s["seq"]:
            heads = s["heads"] * max(1, s["seq"][-1] // seq)  # the same work at either length
            q = torch.randn(1, heads, seq, s["dim"], device=device, dtype=dtype)
            seconds = _median_seconds(lambda: sdpa(q, q, q), device, s["repeats"])
            points.append((seq, 4 * heads * seq ** 2 * s["dim"] / seconds))
        rate, halves[name] = fit_attention(points[0], points[-1], s["dim"])
        attention[name] = rate / 1e12
    for table in (matmul, attention):
        table["float16"] = table["bfloat16"]
    bandwidth = _memory_bound_gbps(device, s["copy_mb"], s["repeats"])
    overhead, view_overhead = _op_overhead_us(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 1e9
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        memory = _host_memory_gb()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    how = f"measured by vdopt calibrate on {when}, torch {torch.__version__}"
    sdpa_shapes = " and ".join(f"(1, {s['heads'] * max(1, s['seq'][-1] // q)}, {q}, {q}, {s['dim']})" for q in s["seq"])
    return DeviceSpec(
        key="calibrated", name=name, memory_gb=memory, peak_tflops=dict(matmul), matmul_tflops=matmul,
        attention_tflops=attention, attention_half_kv=halves["float32"], memory_bandwidth_gbps=bandwidth,
        op_overhead_us=overhead, view_overhead_us=view_overhead if device.type == "cpu" else 0.0,
        sources={
            "peak_tflops": f"no datasheet: the measured matmul rate ({how})",
            "matmul_tflops": f"{n}^3, {4 * n}x{n // 4}x{n} and {4 * n}x{n}x{n // 4} matrix products, medians of "
                             f"{s['repeats']}, total FLOPs over total time ({how})",
            "attention_tflops": f"SDPA {sdpa_shapes} (float32; bfloat16 alike), the long-sequence rate of the cost "
                                f"model's shape curve through both ({how})",
            "attention_half_kv": f"the same two SDPA shapes: the key length of half the long-sequence rate, float32 ({how})",
            "memory_bandwidth_gbps": f"bytes read + written per second by a transposing copy, add, broadcast mul, "
                                     f"tanh GELU, layer norm, RMS norm and softmax on {s['copy_mb']} MiB float32 tensors of width 256, fresh "
                                     f"outputs as a graph allocates them ({how})",
            "op_overhead_us": f"linear, layer norm, add, mul, GELU, cast on 8x64 tensors through an FX GraphModule, "
                              f"per node ({how})",
            "view_overhead_us": (f"a transpose through an FX GraphModule, per node ({how})" if device.type == "cpu"
                                 else "0: graphs are compiled on CUDA, views fuse away"),
        },
    )


def _fx_seconds_per_node(device: torch.device, make: Callable[..., torch.fx.Node], nodes: int = 240) -> float:
    """Seconds per node of a GraphModule of ``nodes`` nodes ``make(graph, value, weight, i)``
    on an 8x64 input and a 64x64 weight."""
    graph = torch.fx.Graph()
    value = graph.placeholder("x")
    weight = graph.placeholder("w")
    for i in range(nodes):
        value = make(graph, value, weight, i)
    graph.output(value)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    x = torch.zeros(8, 64, device=device)
    w = torch.zeros(64, 64, device=device)
    return _median_seconds(lambda: gm(x, w), device, 20) / nodes


def _memory_bound_gbps(device: torch.device, megabytes: float, repeats: int) -> float:
    """What the memory-bound ops of a transformer block reach, as the cost model counts them:
    bytes of the inputs and output per second. A layout-changing copy, add, broadcast mul,
    GELU (tanh, as DiT MLPs), layer norm (no affine, as adaLN), RMS norm and softmax in turn,
    each allocating its output as a graph does: on a CPU the transcendental and row-reducing
    ops take several times their bytes' worth (tanh GELU 5x erf GELU), and blocks run them. On a CPU at activation size: tensors of 100s of MiB measure fresh pages (the
    allocator maps and zeroes them on every op), at a fraction of the rate real activations get."""
    width = 256
    rows = max(1, int(megabytes * 2 ** 20) // (4 * width))
    x = torch.randn(rows, width, device=device)
    z = torch.randn(rows, width, device=device)
    y = torch.empty_like(x)
    scale = torch.randn(width, device=device)
    f = torch.nn.functional
    heads = x.view(rows, 4, width // 4)  # a layout change, as between heads and tokens
    ops = [(lambda: y.view(4, rows, width // 4).copy_(heads.transpose(0, 1)), 2), (lambda: x + z, 3),
           (lambda: x * scale, 2), (lambda: f.gelu(x, approximate="tanh"), 2),
           (lambda: f.layer_norm(x, (width,), eps=1e-6), 2), (lambda: f.rms_norm(x, (width,), scale, eps=1e-6), 2),
           (lambda: torch.softmax(x, -1), 2)]
    seconds = sum(_median_seconds(op, device, 4 * repeats) for op, _ in ops)  # short ops: more samples
    moved = sum(times * x.numel() * 4 for _, times in ops)
    return moved / seconds / 1e9


def _op_overhead_us(device: torch.device) -> tuple[float, float]:
    """Microseconds per node of an FX GraphModule run node by node (no compilation): the
    ops a transformer block is made of, on tensors too small to take time of their own
    (linear, layer norm, add, mul, GELU, a dtype cast, in turn), and a view (a transpose,
    twice, so shapes stay put)."""
    aten = torch.ops.aten
    ops = (
        lambda g, v, w: g.call_function(aten.linear.default, (v, w)),
        lambda g, v, w: g.call_function(aten.layer_norm.default, (v, [64])),
        lambda g, v, w: g.call_function(aten.add.Tensor, (v, v)),
        lambda g, v, w: g.call_function(aten.mul.Tensor, (v, 0.5)),
        lambda g, v, w: g.call_function(aten.gelu.default, (v,)),
        lambda g, v, w: g.call_function(aten.to.dtype, (v, torch.float32)),
    )
    op = _fx_seconds_per_node(device, lambda g, v, w, i: ops[i % len(ops)](g, v, w))
    view = _fx_seconds_per_node(device, lambda g, v, w, i: g.call_function(aten.transpose.int, (v, 0, 1)))
    return op * 1e6, view * 1e6


def _host_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0


# -- the link ------------------------------------------------------------------------------

def all_to_all_samples(device: torch.device, repeats: int = 10, rounds: int = 7) -> dict[str, dict[str, float]]:
    """Seconds a 1 KiB and a 16 MiB all-to-all (bytes each rank sends) add to a loop of
    compute, over the initialized default group; every rank calls it.

    In a graph, collectives sit between compute: ranks reach each one with the skew their
    own compute and scheduling gave them, and that wait is part of what a collective costs
    (small between GPUs, large between processes sharing CPU cores). So each collective is
    timed between matrix products, less the time of the products alone: ``rounds`` rounds
    of ``repeats`` iterations, alone, with the small and with the large all-to-all in turn,
    and the median over the rounds of each round's difference (a load that drifts while it
    runs shifts all three alike).
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    a = torch.randn(256, 256, device=device)

    def work() -> None:
        for _ in range(4):
            a @ a

    def per_iteration(step) -> float:
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(device)
        return (time.perf_counter() - start) / repeats

    buffers = {}
    for label, sent in (("small", 1024), ("large", 16 << 20)):
        numel = max(world, (sent * world // (world - 1)) // 4 // world * world)
        x = torch.randn(numel, device=device)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)
        buffers[label] = (x, y)

    def both(label: str) -> Callable[[], None]:
        x, y = buffers[label]

        def step() -> None:
            work()
            dist.all_to_all_single(y, x)
        return step

    diffs: dict[str, list[float]] = {label: [] for label in buffers}
    for _ in range(rounds):
        alone = per_iteration(work)
        for label in buffers:
            diffs[label].append(per_iteration(both(label)) - alone)
    return {label: {"bytes_sent": buffers[label][0].numel() * 4 * (world - 1) // world,
                    "seconds": max(statistics.median(diffs[label]), 1e-7)} for label in buffers}


def calibration_rank(rank: int, world: int, device: str, threads: int | None, quick: bool) -> dict[str, Any]:
    """What one of ``world`` local ranks measures (every rank calls it): its device, at
    once with the others (after a barrier), then the link; ``calibrate`` combines them."""
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    here = torch.device("cuda", rank) if device == "cuda" else torch.device(device)
    dist.barrier()
    row = as_row(measure_device(here, quick=quick))
    return {"device": row, "link": all_to_all_samples(here)}


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One device row from the rows several ranks measured at once: the median of every figure."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            out[key] = {k: statistics.median(r[key][k] for r in rows) for k in value}
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in rows)
    if len(rows) > 1:
        out["sources"] = {k: f"{v}; median over {len(rows)} ranks measuring at once" for k, v in rows[0]["sources"].items()}
    return out


def link_from_samples(samples: dict[str, dict[str, float]], *, name: str, how: str) -> LinkSpec:
    """Latency and bandwidth from a small and a large all-to-all (bytes sent per rank, seconds)."""
    small, big = samples["small"], samples["large"]
    bandwidth = (big["bytes_sent"] - small["bytes_sent"]) / max(big["seconds"] - small["seconds"], 1e-9)
    latency = max(small["seconds"] - small["bytes_sent"] / bandwidth, 0.0)
    return LinkSpec(key="calibrated", name=name, bandwidth_gbps=bandwidth / 1e9, latency_us=latency * 1e6,
                    sources={"bandwidth_gbps": f"slope of all-to-all time from 1 KiB to 16 MiB sent per rank ({how})",
                             "latency_us": f"1 KiB all-to-all time less its bytes at that bandwidth ({how})"})


def calibrate(out: str | Path, *, device: str | None = None, ranks: int = 2, threads: int | None = None,
              quick: bool = False) -> dict[str, Any]:
    """Measure the device and link rows and write them to ``out`` (JSON); returns what was written.

    ``ranks`` local processes (gloo on the CPU, NCCL between GPUs) measure the device at
    once (the row: the median over them), then the link between them. ``threads``: torch
    threads per rank while measuring a CPU (default: the cores shared out among the ranks;
    match what each rank will run with).
    """
    from vdopt.runtime.local_ranks import LocalRanksError, run_local_ranks

    if ranks < 2:
        raise ValueError(f"measuring a link needs at least 2 ranks, got {ranks}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    if threads is None and device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // ranks)
    try:
        payloads = run_local_ranks(ranks, calibration_rank, device, threads, quick, backend=backend,
                                   threads_per_rank=threads, timeout=1200)
    except LocalRanksError as error:
        raise RuntimeError(f"calibration failed: {error}") from error
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    how = f"{backend}, {ranks} local processes, measured by vdopt calibrate on {when}"
    link_row = link_from_samples(payloads[0]["link"], name=f"{backend} between {ranks} local ranks", how=how)
    data = {"device": median_row([p["device"] for p in payloads]), "link": as_row(link_row)}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    log.info("wrote %s", path)
    return data
