"""Measure this machine's device and link rows (``vdopt calibrate --out FILE``).

Device, in the dtypes the row lists: the rate of a large matrix product, of SDPA at one
mid-size shape (rescaled to the long-sequence rate the row states, with the cost model's
shape curve), a device memory copy, and the fixed cost of a tiny op run through an FX graph
(what an uncompiled graph pays per node). Link: all-to-alls between ``ranks`` local
processes (gloo on the CPU, NCCL between GPUs), each timed between matrix products less the products
alone (the wait for skewed ranks is part of a collective's cost): latency from 1 KiB
messages, bandwidth from the slope up to 16 MiB. Medians of repeated runs; other processes on a shared machine still
show up in them.
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
        return {"matmul": 8192, "copy_mb": 1024, "seq": 8192, "heads": 16, "dim": 128, "repeats": 10}
    if quick:
        return {"matmul": 384, "copy_mb": 32, "seq": 512, "heads": 2, "dim": 64, "repeats": 3}
    return {"matmul": 1024, "copy_mb": 128, "seq": 1024, "heads": 4, "dim": 64, "repeats": 5}


def measure_device(device: torch.device | str, *, quick: bool = False) -> DeviceSpec:
    """The device row of ``device`` (``cpu`` measures at the current ``torch.get_num_threads()``)."""
    device = torch.device(device)
    s = _sizes(device, quick)
    matmul, attention = {}, {}
    n = s["matmul"]
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
        q = torch.randn(1, s["heads"], s["seq"], s["dim"], device=device, dtype=dtype)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        seconds = _median_seconds(lambda: sdpa(q, q, q), device, s["repeats"])
        flops = 4 * s["heads"] * s["seq"] ** 2 * s["dim"]
        attention[name] = flops / seconds / attention_efficiency(s["seq"], s["dim"]) / 1e12
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
    return DeviceSpec(
        key="calibrated", name=name, memory_gb=memory, peak_tflops=dict(matmul), matmul_tflops=matmul,
        attention_tflops=attention, memory_bandwidth_gbps=bandwidth, op_overhead_us=overhead,
        view_overhead_us=view_overhead if device.type == "cpu" else 0.0,
        sources={
            "peak_tflops": f"no datasheet: the measured matmul rate ({how})",
            "matmul_tflops": f"{n}^3, {4 * n}x{n // 4}x{n} and {4 * n}x{n}x{n // 4} matrix products, medians of "
                             f"{s['repeats']}, total FLOPs over total time ({how})",
            "attention_tflops": f"SDPA (1, {s['heads']}, {s['seq']}, {s['seq']}, {s['dim']}), rescaled to the "
                                f"long-sequence rate by the cost model's shape curve ({how})",
            "memory_bandwidth_gbps": f"bytes read + written per second by the memory-bound ops of a block (copy, add, "
                                     f"mul, GELU, layer norm, softmax) on {s['copy_mb']} MiB tensors ({how})",
            "op_overhead_us": f"an add on a 64x64 tensor through an FX GraphModule, per node ({how})",
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


def _memory_bound_gbps(device: torch.device, megabytes: int, repeats: int) -> float:
    """What memory-bound ops reach, as bytes read and written per second: a copy, add, mul,
    GELU, layer norm and softmax in turn (on a CPU the transcendental ones are slower than
    their bytes, and they are what a block runs)."""
    x = torch.randn(megabytes << 12, 64, device=device)  # float32: megabytes MiB
    y = torch.empty_like(x)
    f = torch.nn.functional
    ops = [(lambda: y.copy_(x), 2), (lambda: x + x, 2), (lambda: x * 0.5, 2), (lambda: f.gelu(x), 2),
           (lambda: f.layer_norm(x, (64,)), 2), (lambda: torch.softmax(x, -1), 2)]
    seconds = sum(_median_seconds(op, device, repeats) for op, _ in ops)
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

def all_to_all_samples(device: torch.device, repeats: int = 10) -> dict[str, dict[str, float]]:
    """Seconds a 1 KiB and a 16 MiB all-to-all (bytes each rank sends) add to a loop of
    compute, over the initialized default group; every rank calls it.

    In a graph, collectives sit between compute: ranks reach each one with the skew their
    own compute and scheduling gave them, and that wait is part of what a collective costs
    (small between GPUs, large between processes sharing CPU cores). So each collective is
    timed between matrix products, less the time of the products alone (medians of 3
    rounds of ``repeats``).
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    a = torch.randn(256, 256, device=device)

    def work() -> None:
        for _ in range(4):
            a @ a

    def per_iteration(step) -> float:
        rounds = []
        for _ in range(3):
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            _sync(device)
            rounds.append((time.perf_counter() - start) / repeats)
        return statistics.median(rounds)

    alone = per_iteration(work)
    out = {}
    for label, sent in (("small", 1024), ("large", 16 << 20)):
        numel = max(world, (sent * world // (world - 1)) // 4 // world * world)
        x = torch.randn(numel, device=device)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)

        def both() -> None:
            work()
            dist.all_to_all_single(y, x)

        seconds = max(per_iteration(both) - alone, 1e-7)
        out[label] = {"bytes_sent": numel * 4 * (world - 1) // world, "seconds": seconds}
    return out


def _link_rank(rank: int, world: int) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return all_to_all_samples(device)


def link_from_samples(samples: dict[str, dict[str, float]], *, name: str, how: str) -> LinkSpec:
    """Latency and bandwidth from a small and a large all-to-all (bytes sent per rank, seconds)."""
    small, big = samples["small"], samples["large"]
    bandwidth = (big["bytes_sent"] - small["bytes_sent"]) / max(big["seconds"] - small["seconds"], 1e-9)
    latency = max(small["seconds"] - small["bytes_sent"] / bandwidth, 0.0)
    return LinkSpec(key="calibrated", name=name, bandwidth_gbps=bandwidth / 1e9, latency_us=latency * 1e6,
                    sources={"bandwidth_gbps": f"slope of all-to-all time from 1 KiB to 16 MiB sent per rank ({how})",
                             "latency_us": f"1 KiB all-to-all time less its bytes at that bandwidth ({how})"})


def measure_link(ranks: int = 2, backend: str | None = None) -> LinkSpec:
    """All-to-all latency and bandwidth between ``ranks`` local processes."""
    from vdopt.runtime.local_ranks import LocalRanksError, default_backend, run_local_ranks

    if ranks < 2:
        raise ValueError(f"measuring a link needs at least 2 ranks, got {ranks}")
    backend = backend or default_backend(ranks)
    try:
        payload = run_local_ranks(ranks, _link_rank, backend=backend, timeout=600)[0]
    except LocalRanksError as error:
        raise RuntimeError(f"link calibration failed: {error}") from error
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    how = f"{backend}, {ranks} local processes, measured by vdopt calibrate on {when}"
    return link_from_samples(payload, name=f"{backend} between {ranks} local ranks", how=how)


def calibrate(out: str | Path, *, device: str | None = None, ranks: int = 2, threads: int | None = None,
              quick: bool = False) -> dict[str, Any]:
    """Measure the device and link rows and write them to ``out`` (JSON); returns what was written.

    ``threads``: torch threads while measuring a CPU (match what each rank will use).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device_row = measure_device(device, quick=quick)
    finally:
        torch.set_num_threads(previous)
    link_row = measure_link(ranks)
    data = {"device": as_row(device_row), "link": as_row(link_row)}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    log.info("wrote %s", path)
    return data
