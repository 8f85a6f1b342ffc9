"""How well ``vdopt.plan`` predicts: measured meshes on this CPU, and published GPU results.

    python benchmarks/plan_validation.py --out benchmarks/results           # both parts
    python benchmarks/plan_validation.py --part cpu --quick                 # a smoke run

(a) ``cpu``: ``--world`` gloo ranks on this machine (default 2; 1 thread each), calibrated in
    the same processes (every rank measures the device while the others do, as they will
    share the machine while running; the link is the ranks' own all-to-all; the prediction
    uses the median row over all ranks and runs). With more ranks than cores the ranks
    time-share the cores (and so did the calibration): such a run is written under its own
    name, labelled oversubscribed. The whole measurement runs ``--repeats`` times (fresh
    processes, fresh calibration) to show how far it reproduces. For two models (Wan and
    Latte at mid sizes, batch 2 so CFG parallel is a candidate) every mesh the planner costs
    is run for real (``compile=False``) and timed per call, step by step as a denoising
    loop calls the model (``opt(...)``, a new timestep each; PipeFusion calls after the
    first are pipelined and fill and drain the pipeline each, as the planner predicts), the
    meshes in turn one call each per round, so that load from other jobs falls on all
    alike. First sanity check: the model on one device (each of ``--world`` processes at
    once, no collectives) against the 1-device prediction. Reported: Spearman's rank
    correlation of predicted against measured seconds (median calls; also fastest calls),
    whether the predicted best is the measured best, run-to-run reproducibility (Spearman
    between runs, spread per mesh), the predicted breakdown per mesh, and the load average
    of the machine while it ran.

(b) ``published``: the planner at the published models' full configs (meta device), with
    the device and link rows of the hardware the numbers were measured on, against
    published multi-GPU results of xDiT, VideoSys and Open-Sora-Plan and the project's own
    H100 measurements (ANCHORS.md). Published numbers are end-to-end (text encoder and VAE
    included, their own kernels); the comparison is of speed-ups where they are given, and
    of seconds per denoiser call where a per-step figure is published or derivable.

Results: ``--out`` gets ``plan_validation_cpu.{json,md,png}`` (``plan_validation_cpu_<N>ranks_
oversubscribed.*`` with more ranks than cores) and
``plan_validation_published.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

log = logging.getLogger("vdopt.benchmarks.plan_validation")

WORLD = 2
"""Default ranks: one per core of this 2-core machine, so that no two ranks share a core."""

CPU_MODELS: dict[str, dict[str, Any]] = {
    "wan-mid": {"kind": "wan", "frames": 17, "height": 128, "width": 128, "text_len": 64, "batch": 2},
    "latte-mid": {"kind": "latte", "frames": 8, "height": 128, "width": 128, "text_len": 32, "batch": 2},
}
"""The two CPU models: Wan2.1 at 4 layers of width 128 (4 heads), Latte-1 at 4 layers of
width 256 (4 heads); 320 and 512 video tokens per sample."""

QUICK_MODELS = {
    "wan-mid": {"kind": "wan", "frames": 5, "height": 64, "width": 64, "text_len": 16, "batch": 2, "layers": 2},
}


# -- the CPU models --------------------------------------------------------------------------

def build_cpu_model(spec: dict[str, Any], device: str = "cpu"):
    """``(model, inputs)`` seeded alike in every process; ``device="meta"`` allocates nothing."""
    layers = spec.get("layers", 4)
    batch = spec["batch"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec["kind"] == "wan":
            from diffusers import WanTransformer3DModel
            from vdopt.models.diffusers_models import WAN_CONFIGS

            config = {**WAN_CONFIGS["full"], "num_layers": layers, "num_attention_heads": 4, "attention_head_dim": 32,
                      "ffn_dim": 512, "text_dim": 256, "freq_dim": 256}
            with torch.device("meta" if device == "meta" else "cpu"):
                model = WanTransformer3DModel(**config).eval()
            latent = ((spec["frames"] - 1) // 4 + 1, spec["height"] // 8, spec["width"] // 8)
            shapes = {"hidden_states": (batch, 16, *latent), "encoder_hidden_states": (batch, spec["text_len"], 256)}
        else:
            from diffusers import LatteTransformer3DModel
            from vdopt.models.diffusers_models import LATTE_CONFIGS

            config = {**LATTE_CONFIGS["full"], "num_layers": layers, "num_attention_heads": 4, "attention_head_dim": 64,
                      "cross_attention_dim": 256, "caption_channels": 512, "video_length": spec["frames"]}
            with torch.device("meta" if device == "meta" else "cpu"):
                model = LatteTransformer3DModel(**config).eval()
            shapes = {"hidden_states": (batch, 4, spec["frames"], spec["height"] // 8, spec["width"] // 8),
                      "encoder_hidden_states": (batch, spec["text_len"], 512)}
        g = torch.Generator().manual_seed(1)
        inputs: dict[str, Any] = {
            k: (torch.empty(s, device="meta") if device == "meta" else torch.randn(s, generator=g))
            for k, s in shapes.items()
        }
    inputs["timestep"] = torch.full((batch,), 999.0, device="meta" if device == "meta" else "cpu")
    inputs["return_dict"] = False
    return model, inputs


def _rank_main(rank: int, world: int, spec: dict[str, Any], meshes: list[dict[str, int]], calls: int,
               calibrate_quick: bool) -> dict[str, Any]:
    import torch.distributed as dist

    import vdopt
    from vdopt.planning.calibrate import all_to_all_samples, measure_device
    from vdopt.planning.devices import as_row

    dist.barrier()
    device_row = as_row(measure_device("cpu", quick=calibrate_quick))  # every rank at once
    link_samples = all_to_all_samples(torch.device("cpu"))
    model, inputs = build_cpu_model(spec)
    measured, opts = {}, {}
    for degrees in meshes:  # every mesh built and called once (capture, PipeFusion's warm-up step) first
        pipefusion = vdopt.PipeFusionConfig() if degrees["pipefusion"] > 1 else None
        opt = vdopt.optimize(model, vdopt.Mesh(**degrees), pipefusion=pipefusion, compile=False)
        key = "+".join(f"{a}{d}" for a, d in degrees.items() if d > 1)
        try:  # a mesh optimize refuses is refused alike on every rank, at the first call
            with torch.no_grad():
                opt(**inputs)
        except ValueError as e:
            measured[key] = {"degrees": degrees, "error": str(e).split("\n")[0]}
            continue
        opts[key] = (degrees, opt)
    times: dict[str, list[float]] = {key: [] for key in opts}
    with torch.no_grad():
        # round-robin over the meshes, a call each: the load of other jobs, which comes in
        # bursts of seconds on a shared machine, falls on every mesh alike
        for i in range(1, calls + 1):
            call = {**inputs, "timestep": torch.full_like(inputs["timestep"], 999.0 - 20 * i)}
            for key, (_, opt) in opts.items():
                dist.barrier()
                start = time.perf_counter()
                opt(**call)
                dist.barrier()
                times[key].append(time.perf_counter() - start)
    for key, (degrees, _) in opts.items():
        measured[key] = {"degrees": degrees, "seconds": statistics.median(times[key]), "seconds_all": times[key]}
    return {"device_row": device_row, "link_samples": link_samples, "measured": measured}


def _single_rank(rank: int, world: int, spec: dict[str, Any], calls: int) -> dict[str, Any]:
    """The model on one device (no process group), in each of ``world`` processes at once:
    the 1-device sanity check of the prediction, with the cores shared as the ranks share them."""
    import vdopt

    os.environ["WORLD_SIZE"] = "1"  # this process is a world of its own (the launcher set the count of them)
    model, inputs = build_cpu_model(spec)
    opt = vdopt.optimize(model, None, compile=False)
    times = []
    with torch.no_grad():
        for i in range(calls + 1):
            call = {**inputs, "timestep": torch.full_like(inputs["timestep"], 999.0 - 20 * i)}
            start = time.perf_counter()
            opt(**call)
            if i:
                times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "seconds_all": times}


def run_ranks(world: int, spec, meshes, calls: int, quick: bool) -> dict[str, Any]:
    from vdopt.runtime.local_ranks import run_local_ranks

    ranks = run_local_ranks(world, _rank_main, spec, meshes, calls, quick, backend="gloo", timeout=3600,
                            pg_timeout=1800)
    single = run_local_ranks(world, _single_rank, spec, calls, group=False, timeout=1800)
    return {**ranks[0], "device_rows": [r["device_row"] for r in ranks], "single": single}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / den if den else float("nan")


def oversubscribed(world: int) -> bool:
    """Whether ``world`` single-thread ranks share cores on this machine."""
    return world > (os.cpu_count() or 1)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_part(models: dict[str, dict[str, Any]], calls: int, quick: bool, world: int = WORLD,
             repeats: int = 2) -> dict[str, Any]:
    import vdopt
    from vdopt.planning.calibrate import link_from_samples, median_row
    from vdopt.planning.devices import DeviceSpec

    out: dict[str, Any] = {"world_size": world, "repeats": repeats,
                           "cores": os.cpu_count(), "oversubscribed": oversubscribed(world),
                           "load_average_1_5_15min": {"start": _load()}, "models": {}}
    for name, spec in models.items():
        meta_model, meta_inputs = build_cpu_model(spec, device="meta")
        first = vdopt.plan(meta_model, world, device="cpu", link="gloo_local", **meta_inputs)
        meshes = [dict(c.degrees) for c in first.candidates]
        log.info("%s: %d meshes to run on %d gloo ranks, %d times: %s", name, len(meshes), world, repeats,
                 [c.name for c in first.candidates])
        runs = []
        for i in range(repeats):
            runs.append(run_ranks(world, spec, meshes, calls, quick))
            out["load_average_1_5_15min"][f"{name} run {i + 1}"] = _load()
        raw = Path(tempfile.gettempdir()) / f"plan_validation_{name}_{world}ranks_runs.json"
        raw.write_text(json.dumps(runs))  # the measurements outlive a failure of what follows
        log.info("%s: measurements of the %d runs in %s", name, repeats, raw)
        ran = runs[0]
        # one prediction from every calibration of every run: the median over all ranks' rows
        device = DeviceSpec(key="calibrated", **median_row([row for r in runs for row in r["device_rows"]]))
        link_samples = {label: {"bytes_sent": ran["link_samples"][label]["bytes_sent"],
                                "seconds": statistics.median(r["link_samples"][label]["seconds"] for r in runs)}
                        for label in ran["link_samples"]}
        link = link_from_samples(link_samples, name=f"gloo between {world} local ranks",
                                 how="measured in the benchmark's own ranks, median over the runs")
        plan = vdopt.plan(meta_model, world, device=device, link=link, **meta_inputs)
        single_plan = vdopt.plan(meta_model, 1, device=device, link=link, **meta_inputs)
        single_measured = [statistics.median(rank["seconds"] for rank in r["single"]) for r in runs]
        rows = []
        for c in plan.candidates:
            key = "+".join(f"{a}{d}" for a, d in c.degrees.items() if d > 1)
            per_run = [r["measured"].get(key) for r in runs]
            if any(m is None or "error" in m for m in per_run):
                continue
            measured = [m["seconds"] for m in per_run]
            rows.append({"mesh": c.name, "predicted_s": c.seconds, "measured_s": statistics.mean(measured),
                         "measured_per_run_s": measured, "measured_all_s": [m["seconds_all"] for m in per_run],
                         "run_spread": (max(measured) - min(measured)) / statistics.mean(measured),
                         "fastest_s": statistics.mean(min(m["seconds_all"]) for m in per_run),
                         "dominant": c.dominant, "breakdown": c.cost.breakdown, "comm_bytes": c.cost.comm_bytes})
        pred = [r["predicted_s"] for r in rows]
        meas = [r["measured_s"] for r in rows]
        best_pred = min(rows, key=lambda r: r["predicted_s"])["mesh"]
        best_meas = min(rows, key=lambda r: r["measured_s"])["mesh"]
        per_run = [[r["measured_per_run_s"][i] for r in rows] for i in range(repeats)]
        out["models"][name] = {
            "spec": spec, "device_row": dataclasses.asdict(device), "link_row": dataclasses.asdict(link),
            "rows": rows, "spearman": spearman(pred, meas),
            "spearman_fastest": spearman(pred, [r["fastest_s"] for r in rows]),
            "fastest_best": min(rows, key=lambda r: r["fastest_s"])["mesh"],
            "spearman_per_run": [spearman(pred, m) for m in per_run],
            "run_to_run_spearman": [spearman(per_run[0], m) for m in per_run[1:]],
            "run_spread_median": statistics.median(r["run_spread"] for r in rows) if rows else None,
            "measured_best_per_run": [rows[min(range(len(rows)), key=m.__getitem__)]["mesh"] for m in per_run],
            "predicted_best": best_pred, "measured_best": best_meas,
            "predicted_best_is_measured_best": best_pred == best_meas,
            "measured_of_predicted_best_vs_measured_best": (
                next(r["measured_s"] for r in rows if r["mesh"] == best_pred) / min(meas)),
            "excluded": {c.name: c.reason for c in plan.excluded},
            "refused_when_run": {k: m["error"] for k, m in ran["measured"].items() if "error" in m},
            "calibrations": [r["device_rows"] for r in runs],
            "single": {"predicted_s": single_plan.best.seconds, "breakdown": single_plan.best.cost.breakdown,
                       "measured_s": statistics.mean(single_measured), "measured_per_run_s": single_measured},
        }
    out["load_average_1_5_15min"]["end"] = _load()
    return out


# -- published results ------------------------------------------------------------------------

PUBLISHED: list[dict[str, Any]] = [
    {
        "id": "anchor-wan", "model": "wan", "shape": {"frames": 81, "height": 480, "width": 832, "batch": 1},
        "device": "h100", "link": "nvlink", "world": 1, "meshes": ["single"],
        "published": {"single": 0.633}, "unit": "seconds per denoiser call",
        "what": "Wan2.1-1.3B 81x480x832, batch 1, diffusers eager bf16, one H100",
        "source": "vdopt ANCHORS.md (measured 2026-11-23, torch 2.11, one H100 80GB HBM3)",
    },
    {
        "id": "anchor-latte", "model": "latte", "shape": {"frames": 16, "height": 512, "width": 512, "batch": 2},
        "device": "h100", "link": "nvlink", "world": 1, "meshes": ["single"],
        "published": {"single": 0.214}, "unit": "seconds per denoiser call",
        "what": "Latte-1 16x512x512, CFG batch 2, diffusers eager bf16, one H100",
        "source": "vdopt ANCHORS.md (measured 2026-11-23)",
    },
    {
        "id": "anchor-cogvideox", "model": "cogvideox", "shape": {"frames": 49, "height": 480, "width": 720, "batch": 2},
        "device": "h100", "link": "nvlink", "world": 1, "meshes": ["single"],
        "published": {"single": 0.643}, "unit": "seconds per denoiser call",
        "what": "CogVideoX-2B 49x480x720, CFG batch 2, diffusers eager bf16, one H100",
        "source": "vdopt ANCHORS.md (measured 2026-11-23)",
    },
    {
        "id": "xdit-cogvideox-2b-l40", "model": "cogvideox",
        "shape": {"frames": 49, "height": 480, "width": 720, "batch": 2},
        "device": "l40", "link": "pcie", "world": 4, "meshes": ["single", "all"],
        "published": {"single": 0.49 * 4.29, "best": 0.49 * 4.29 / 3.1}, "unit": "seconds per step",
        "what": "xDiT CogVideoX-2b, 49 frames 720x480, L40 (PCIe), CFG pair per step: one GPU 2.10 s per step "
                "(derived: best 0.49 s per step at 4.29x); on 4 GPUs (cfg x USP) up to 3.1x over one GPU",
        "source": "xDiT docs/performance/cogvideo.md (https://github.com/xdit-project/xDiT/blob/main/docs/performance/cogvideo.md): "
                  "0.49 s per iteration at 4.29x; 3.1x on up to 4 L40 in the version of commit a354858 (2024-10-12)",
    },
    {
        "id": "videosys-dsp-opensora", "model": "opensora",
        "shape": {"frames": 80, "height": 512, "width": 512, "batch": 2},
        "device": "h800", "link": "nvlink_h800", "world": 8, "meshes": ["single", "ulysses=8", "dsp=8"],
        "published": {"single": 106.0, "ulysses=8": 45.0, "dsp=8": 22.0}, "unit": "seconds per video (end to end)",
        "what": "VideoSys DSP: Open-Sora 1.2, 80 frames 512x512, 1x H800 vs 8x H800 with DeepSpeed-Ulysses and with DSP",
        "source": "VideoSys README (https://github.com/NUS-HPC-AI-Lab/VideoSys), DSP section; seed /work/shared/seeds/000_26bbc84b29f8731e.txt",
    },
    {
        "id": "opensora-plan-sp", "model": "opensora_plan",
        "shape": {"frames": 93, "height": 720, "width": 1280, "batch": 2},
        "device": "h100", "link": "nvlink", "world": 8, "meshes": ["single", "ulysses=8"],
        "published": {"single": 3400.0, "ulysses=8": 450.0}, "unit": "seconds per video (end to end)",
        "what": "Open-Sora-Plan v1.3, 93x720p, 1 H100 vs 8 H100 with its own (Ulysses-style) sequence parallel",
        "source": "Open-Sora-Plan v1.3 README (https://github.com/PKU-YuanGroup/Open-Sora-Plan), as quoted in vdopt ANCHORS.md",
    },
]
"""Published figures: per entry, the meshes compared and their numbers (``single`` = 1 GPU;
``best`` = the publication's best configuration, compared to the planner's best)."""


def published_part(entries: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for e in entries:
        try:
            rows.append(_published_row(e))
        except Exception as error:  # noqa: BLE001  one model that cannot be planned is a row, not the end
            log.warning("%s: %s", e["id"], error)
            rows.append({**e, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})
    return {"rows": rows}


def _published_row(e: dict[str, Any]) -> dict[str, Any]:
    import vdopt
    from vdopt.models import build

    model, args, kwargs = build(e["model"], "full", device="meta", dtype=torch.bfloat16, **e["shape"])
    predicted: dict[str, float] = {}
    start = time.perf_counter()
    if "single" in e["meshes"]:
        predicted["single"] = vdopt.plan(model, 1, *args, device=e["device"], link=e["link"], **kwargs).best.seconds
    multi = [m for m in e["meshes"] if m != "single"]
    best_name = None
    if e["world"] > 1 and multi:
        only = None if "all" in multi else multi
        plan = vdopt.plan(model, e["world"], *args, device=e["device"], link=e["link"], meshes=only, **kwargs)
        for c in plan.candidates:
            predicted[c.name] = c.seconds
        for c in plan.excluded:
            if c.reason != "not asked for (meshes=)":
                predicted[c.name] = None
        best_name = plan.best.name
        if "best" in e["published"]:
            predicted["best"] = plan.best.seconds
    row = {k: v for k, v in e.items()}
    row.update(predicted=predicted, predicted_best_mesh=best_name, planning_s=time.perf_counter() - start)
    pub = e["published"]
    if "single" in pub:
        row["published_speedup"] = {k: pub["single"] / v for k, v in pub.items() if k != "single"}
        row["predicted_speedup"] = {k: predicted["single"] / predicted[k] for k in pub
                                    if k != "single" and predicted.get(k)}
    log.info("%s: predicted %s, published %s", e["id"], predicted, pub)
    return row


# -- output ------------------------------------------------------------------------------------

def cpu_markdown(report: dict[str, Any]) -> str:
    cpu = report["cpu"]
    world, repeats = cpu["world_size"], cpu["repeats"]
    title = f"# Planner validation on this CPU: {world} gloo ranks"
    lines = [title + (f" (OVERSUBSCRIBED: {world} ranks on {cpu['cores']} cores)" if cpu["oversubscribed"] else ""), ""]
    if cpu["oversubscribed"]:
        lines += [f"> Oversubscribed: {world} single-thread ranks time-share {cpu['cores']} cores. The calibration ran "
                  "with every rank busy at once, so the device row holds the time-shared per-rank rates; the measured "
                  "times still mix in scheduling (a rank waiting in a collective gives its core to another), see the "
                  "run-to-run figures before reading the correlations.", ""]
    load = cpu["load_average_1_5_15min"]
    lines += [f"{report['date']}; {report['device']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
              "", f"Predicted: `vdopt.plan` with the device row and gloo link measured in the same {world} rank "
              f"processes, every rank calibrating at once (the median over all ranks and runs). Measured: the median "
              f"seconds per call of `vdopt.optimize(model, mesh, compile=False)` on {world} real gloo ranks (1 thread "
              f"each), called step by step as a denoising loop calls the model (`opt(...)` per step, a new timestep "
              f"each), the meshes in turn, one call each per round (load from other jobs falls on all alike); the whole measurement ran {repeats} times in fresh processes, and \"measured\" is the mean of "
              f"the runs' medians. Both describe the same thing: seconds per denoiser call, step by step. With "
              f"PipeFusion that call fills and drains the pipeline (K/V one step stale after the warm-up call): the "
              f"prediction charges the fill/drain per call, as measured; `opt.denoise(...)`, which keeps the pipeline "
              f"full across steps as xDiT does, is faster than both by up to the bubble (N-1)/(M+N-1).",
              "", "Load average of the machine (1, 5, 15 min; it is shared with other jobs): "
              + "; ".join(f"{k} {v}" for k, v in load.items()) + ".", ""]
    for name, m in cpu["models"].items():
        dev, link = m["device_row"], m["link_row"]
        runs_head = " | ".join(f"run {i + 1} ms" for i in range(repeats))
        lines += [f"## {name}", "",
                  f"Calibrated: matmul {dev['matmul_tflops']['float32'] * 1e3:.1f} GFLOP/s, attention "
                  f"{dev['attention_tflops']['float32'] * 1e3:.1f} GFLOP/s (long-sequence rate), memory "
                  f"{dev['memory_bandwidth_gbps']:.1f} GB/s, {dev['op_overhead_us']:.1f} us per op; link "
                  f"{link['bandwidth_gbps']:.2f} GB/s, {link['latency_us']:.0f} us.", "",
                  _single_line(m["single"]), "",
                  f"| mesh | predicted ms | measured ms | {runs_head} | run spread | predicted / measured | predicted "
                  f"breakdown, ms |",
                  "|---|---|---|" + "---|" * repeats + "---|---|---|"]
        for r in sorted(m["rows"], key=lambda r: r["measured_s"]):
            per = " | ".join(f"{x * 1e3:.1f}" for x in r["measured_per_run_s"])
            lines.append(f"| {r['mesh']} | {r['predicted_s'] * 1e3:.1f} | {r['measured_s'] * 1e3:.1f} | {per} | "
                         f"{r['run_spread']:.0%} | {r['predicted_s'] / r['measured_s']:.2f} | "
                         f"{_breakdown_text(r['breakdown'])} |")
        per_run = ", ".join(f"{x:.2f}" for x in m["spearman_per_run"])
        fastest = (f" Against each mesh's fastest call (the least disturbed by other jobs; mean over runs): "
                   f"Spearman {m['spearman_fastest']:.2f}, fastest mesh {m['fastest_best']}.")
        between = ", ".join(f"{x:.2f}" for x in m["run_to_run_spearman"]) or "-"
        lines += ["", f"Spearman rank correlation, predicted against measured: **{m['spearman']:.2f}** over "
                      f"{len(m['rows'])} meshes (per run: {per_run}). Predicted best {m['predicted_best']}, measured "
                      f"best {m['measured_best']} (per run: {', '.join(m['measured_best_per_run'])}): "
                      f"{'the same' if m['predicted_best_is_measured_best'] else 'different'}; the predicted best "
                      f"measures {m['measured_of_predicted_best_vs_measured_best']:.2f}x the measured best." + fastest, "",
                  f"Reproducibility: Spearman between run 1 and the later runs {between}; median spread of a mesh's "
                  f"time between runs {m['run_spread_median']:.0%}.", "",
                  "Excluded: " + ("; ".join(f"{k}: {v}" for k, v in m["excluded"].items()) or "none"), ""]
    return "\n".join(lines) + "\n"


BREAKDOWN_SHORT = {"matmul": "mm", "attention": "attn", "memory-bound ops": "mem", "op overhead": "ops",
                   "communication": "comm", "pipeline fill/drain": "fill"}


def _breakdown_text(breakdown: dict[str, float]) -> str:
    return " ".join(f"{BREAKDOWN_SHORT.get(k, k)} {v * 1e3:.1f}" for k, v in breakdown.items() if v * 1e3 >= 0.05)


def _single_line(single: dict[str, Any]) -> str:
    per = ", ".join(f"{x * 1e3:.1f}" for x in single["measured_per_run_s"])
    return (f"One device (sanity check of the device row: every rank runs the whole model alone, at once, no "
            f"collectives): predicted {single['predicted_s'] * 1e3:.1f} ms ({_breakdown_text(single['breakdown'])}), "
            f"measured {single['measured_s'] * 1e3:.1f} ms (per run: {per}), predicted / measured "
            f"{single['predicted_s'] / single['measured_s']:.2f}.")


def published_markdown(report: dict[str, Any]) -> str:
    lines = ["# Planner predictions against published multi-GPU results", "",
             f"{report['date']}; planned on {report['device']} (meta device, full configs, bf16); "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), "",
             "Published end-to-end times include the text encoder, the VAE and the systems' own kernels; "
             "the planner predicts one denoiser call. Compare speed-ups; absolute seconds only where the "
             "publication's unit is per call or per step.", "",
             "| result | device, link | configuration | published | predicted | source |", "|---|---|---|---|---|---|"]
    for r in report["published"]["rows"]:
        if "error" in r:
            lines.append(f"| {r['what']} | {r['device']}, {r['link']} | - | {r['published']} | not planned: "
                         f"{r['error'][:120]} | {r['source']} |")
            continue
        for key, value in r["published"].items():
            pred = r["predicted"].get(key)
            if key == "single" and r["unit"].startswith("seconds per video"):
                pub_text, pred_text = f"{value:g} s ({r['unit']})", (f"{pred * 1e3:.0f} ms per call" if pred else "-")
            elif key == "single":
                pub_text, pred_text = f"{value * 1e3:.0f} ms", (f"{pred * 1e3:.0f} ms" if pred else "-")
            else:
                ps = r.get("published_speedup", {}).get(key)
                qs = r.get("predicted_speedup", {}).get(key)
                pub_text = f"{value:g} s" + (f" ({ps:.2f}x)" if ps else "")
                pred_text = (f"{pred * 1e3:.0f} ms" if pred else "excluded") + (f" ({qs:.2f}x)" if qs else "")
            label = key if key != "best" else f"best (planner: {r['predicted_best_mesh']})"
            lines.append(f"| {r['what']} | {r['device']}, {r['link']} | {label} | {pub_text} | {pred_text} | {r['source']} |")
    return "\n".join(lines) + "\n"


def cpu_plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    models = report["cpu"]["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        pred = [r["predicted_s"] * 1e3 for r in m["rows"]]
        meas = [r["measured_s"] * 1e3 for r in m["rows"]]
        ax.scatter(meas, pred)
        for r, x, y in zip(m["rows"], meas, pred):
            ax.annotate(r["mesh"], (x, y), fontsize=6)
        hi = max(pred + meas) * 1.1
        ax.plot([0, hi], [0, hi], ":", color="#999999")
        ax.set_xlabel(f"measured ms per call ({report['cpu']['world_size']} gloo ranks)")
        ax.set_ylabel("predicted ms per call")
        ax.set_title(f"{name}: Spearman {m['spearman']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def published_plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    labels, pub, pred = [], [], []
    for r in report["published"]["rows"]:
        for key, ps in r.get("published_speedup", {}).items():
            qs = r.get("predicted_speedup", {}).get(key)
            if qs:
                labels.append(f"{r['id']}\n{key}")
                pub.append(ps)
                pred.append(qs)
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], pub, 0.4, label="published")
    ax.bar([i + 0.2 for i in x], pred, 0.4, label="predicted (vdopt.plan)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("speed-up over one GPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("cpu", "published", "both"), default="both")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per mesh on the CPU (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one small model, 2 timed calls, 2 published rows")
    parser.add_argument("--world", type=int, default=WORLD,
                        help=f"gloo ranks on this machine (default {WORLD}; more than the cores is labelled oversubscribed)")
    parser.add_argument("--models", nargs="+", choices=sorted(CPU_MODELS), default=None,
                        help="CPU models to run (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="times the whole CPU measurement runs, for reproducibility (default 2; 1 with --quick)")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    harness.configure_logging()
    calls = args.calls or (2 if args.quick else 5)
    out: dict[str, Any] = {}
    if args.part in ("cpu", "both"):
        report = {"benchmark": "planner validation, CPU", **harness.stamp("cpu")}
        repeats = args.repeats or (1 if args.quick else 2)
        models = QUICK_MODELS if args.quick else {k: v for k, v in CPU_MODELS.items() if k in (args.models or CPU_MODELS)}
        report["cpu"] = cpu_part(models, calls, args.quick, args.world, repeats)
        name = (f"plan_validation_cpu_{args.world}ranks_oversubscribed" if oversubscribed(args.world)
                else "plan_validation_cpu")
        harness.write_results(args.out, name, report, markdown=cpu_markdown(report), plot=cpu_plot)
        out["cpu"] = report
    if args.part in ("published", "both"):
        report = {"benchmark": "planner validation, published", **harness.stamp("cpu")}
        report["published"] = published_part(PUBLISHED[:2] if args.quick else PUBLISHED)
        harness.write_results(args.out, "plan_validation_published", report, markdown=published_markdown(report),
                              plot=published_plot)
        out["published"] = report
    return out


if __name__ == "__main__":
    main()
