"""Scaling projection for meshes larger than this machine, checked against gloo ranks.

    python benchmarks/scaling.py           # Wan2.1-1.3B 81x480x832: projection for 2-8 GPUs
                                           # + a 2-rank gloo check at the mid-size CPU config

THIS IS A PROJECTION, not a measurement. Per call of the model on one rank of an N-rank mesh:

    time(N) = compute per rank + sum over the graph's collectives of (latency + bytes / bandwidth)

* per-rank compute: on CUDA, measured: rank 0's rewritten graph of each mesh runs on this
  one GPU over a fake process group (its collectives move nothing, so the time is the
  rank's compute alone, padding and layout changes included). Without a GPU it is
  compute(1) / N with compute(1) = a measured diffusers eager call of Wan2.1-1.3B on one
  H100 (633 ms, bf16; ``ANCHOR_STEP_S``).
* ``bytes``: exact, read off the rewritten per-rank graph (``vdopt.collectives``: the bytes
  each collective node sends from this rank per call), built for each mesh by the planner
  (``vdopt.planning.rank_graphs``: no process group, the model on the meta device, nothing
  allocated or run).
* the link model: the planner's link rows (``vdopt/planning/hardware.json``, each figure
  with its source) and its ``comm_seconds``: latency per collective plus bytes over
  bandwidth; ring attention's point-to-point steps pay the latency once per hop. No overlap
  of communication with compute is assumed here (ring attention does overlap, and
  ``vdopt.plan`` models that: these rows are pessimistic for ring).

The check: on the CPU, the same formula for ulysses=2 at the mid-size config, with the
per-rank compute measured on a fake group (one thread) and the link measured with gloo
all-to-alls between two local processes, against the measured per-call time of a real
2-rank gloo run.

``--quick``: a small video, two meshes and 2 timed calls in the check: a smoke run.

Results: ``--out`` (default ``./vdopt-results``) gets
``scaling_wan1-3b_<frames>x<height>x<width>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import e2e_workload  # noqa: E402  (the mid-size config and its inputs)
from e2e_workload import MID_WAN, BenchConfig  # noqa: E402

log = logging.getLogger("vdopt.benchmarks.scaling")

LINK_ROWS = {"NVLink 4 (H100 SXM, NVSwitch)": "nvlink", "PCIe Gen5 x16": "pcie5",
             "InfiniBand NDR (400 Gb/s per GPU)": "infiniband"}
"""The links projected: label -> the planner's link row."""


def links() -> dict[str, Any]:
    """label -> ``vdopt.planning.LinkSpec`` (bandwidth per GPU, latency per collective, sources)."""
    from vdopt.planning import get_link

    return {label: get_link(row) for label, row in LINK_ROWS.items()}

ANCHOR_STEP_S = 0.633
"""Measured reference: diffusers eager Wan2.1-1.3B, 81x480x832, bf16, one H100, seconds per call."""

QUICK = {"frames": 17, "height": 128, "width": 128, "meshes": "ulysses=2;ring=2", "check_calls": 2,
         "check_config": {"layers": 1, "frames": 5, "height": 32, "width": 32, "text_len": 8}}
"""``--quick``: a smoke run; explicit options override it."""

MESHES = ({"ulysses": 2}, {"ring": 2}, {"ulysses": 4}, {"ring": 4}, {"ulysses": 2, "ring": 2},
          {"ulysses": 8}, {"ring": 8}, {"ulysses": 4, "ring": 2})


def mesh_name(degrees: dict[str, int]) -> str:
    return "+".join(f"{a}{d}" for a, d in degrees.items())


# -- bytes from the graph --------------------------------------------------------------------

def graph_comms(meshes, model_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each mesh, the collectives of rank 0's rewritten graph, built by the planner
    (model on the meta device, no process group)."""
    from vdopt.capture import bind_call
    from vdopt.collectives import communication
    from vdopt.mesh import AXES
    from vdopt.planning.rank_graphs import capture_model, rank_graphs

    model, kwargs = _model_and_call(model_spec, meta=True)
    captured = capture_model(model, bind_call(model, (), kwargs))
    out = {}
    for degrees in meshes:
        graphs = rank_graphs(captured, {a: degrees.get(a, 1) for a in AXES})
        out[mesh_name(degrees)] = {"comms": [{"kind": c.kind, "bytes": c.bytes, "axis": c.axis}
                                             for c in communication(graphs.main)]}
    return out


def _per_rank_child(rank: int, world_size: int, meshes, model_spec: dict[str, Any],
                    calls: int) -> dict[str, dict[str, Any]]:
    """For each mesh, rank 0's graph on a fake process group, run: the median seconds of one
    call on this one device (collectives of a fake group move nothing, so that is the rank's
    compute alone), and its collectives."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import vdopt
    from vdopt.collectives import communication

    out = {}
    for degrees in meshes:
        world = 1
        for d in degrees.values():
            world *= d
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        model, kwargs = _model_and_call(model_spec, meta=calls == 0)
        opt = vdopt.optimize(model, vdopt.Mesh(**degrees), example_inputs=((), kwargs), compile=model_spec.get("compile"))
        gm = opt.plans[0].program.gm
        comms = communication(getattr(gm, "gm", gm))
        entry: dict[str, Any] = {"comms": [{"kind": c.kind, "bytes": c.bytes, "axis": c.axis} for c in comms]}
        if calls:
            entry["compute_s"] = _timed(opt, kwargs, calls, sync=model_spec["device"] == "cuda")
        out[mesh_name(degrees)] = entry
        del opt, model
    return out


def _model_and_call(spec: dict[str, Any], *, meta: bool):
    """The model and one call's inputs: Wan2.1-1.3B (``full``) or the mid-size config."""
    if spec["kind"] == "full":
        from vdopt.capture import bind_call
        from vdopt.models import build

        model, args, kwargs = build("wan", "full", device="meta" if meta else spec["device"],
                                    dtype=getattr(torch, spec["dtype"]), **spec["shape"])
        return model, bind_call(model, args, kwargs)
    cfg = BenchConfig(**spec["config"])
    model, latents, prompt, _ = e2e_workload.build(cfg)
    return model, {"hidden_states": latents.to(prompt.dtype), "timestep": torch.tensor([500], device=cfg.device),
                   "encoder_hidden_states": prompt, "return_dict": False}


def per_rank_graphs(meshes, model_spec: dict[str, Any], calls: int = 0) -> dict[str, dict[str, Any]]:
    """``_per_rank_child`` in a fresh process (the fake group stays there)."""
    from vdopt.runtime.local_ranks import run_local_ranks

    return run_local_ranks(1, _per_rank_child, list(meshes), model_spec, calls, group=False, timeout=3600)[0]


def comm_seconds(comms: list[dict[str, Any]], degrees: dict[str, int], link) -> float:
    """Communication time per call over ``link`` (a ``LinkSpec``), no overlap: the planner's
    per-collective formula summed."""
    from vdopt.collectives import CommRecord
    from vdopt.planning.cost_model import comm_seconds as one

    return sum(one(CommRecord(kind=c["kind"], bytes=c["bytes"], purpose="", axis=c["axis"]), link, degrees)
               for c in comms)


def project(compute_1: float, graphs: dict[str, dict[str, Any]], meshes) -> list[dict[str, Any]]:
    """Rows of the projection; a mesh's measured per-rank compute replaces compute(1) / N."""
    rows = []
    for degrees in meshes:
        name = mesh_name(degrees)
        comms = graphs[name]["comms"]
        ranks = 1
        for d in degrees.values():
            ranks *= d
        compute = graphs[name].get("compute_s", compute_1 / ranks)
        row: dict[str, Any] = {
            "mesh": name, "ranks": ranks, "compute_per_rank_s": compute,
            "compute_per_rank_source": "measured (fake group)" if "compute_s" in graphs[name] else "compute(1) / N",
            "bytes_per_call": sum(c["bytes"] for c in comms),
            "collectives_per_call": len(comms),
            "by_link": {},
        }
        for link, spec in links().items():
            comm = comm_seconds(comms, degrees, spec)
            step = compute + comm
            row["by_link"][link] = {"comm_s": comm, "step_s": step, "speedup": compute_1 / step,
                                    "efficiency": compute_1 / step / ranks}
        rows.append(row)
    return rows


# -- the gloo check --------------------------------------------------------------------------

def _timed(fn, kwargs, calls: int, barrier=None, sync: bool = False) -> float:
    """Median seconds of ``calls`` calls after one untimed call."""
    with torch.no_grad():
        return harness.median_seconds(lambda: fn(**kwargs), calls=calls, device="cuda" if sync else "cpu",
                                      before_each=barrier)


def _gloo_rank(rank: int, world: int, cfg, calls: int) -> dict[str, Any]:
    import torch.distributed as dist

    import vdopt
    from vdopt.collectives import communication
    from vdopt.planning.calibrate import all_to_all_samples

    model, kwargs = _model_and_call({"kind": "mid", "config": dataclasses.asdict(cfg)}, meta=False)
    opt = vdopt.optimize(model, vdopt.Mesh(ulysses=world), compile=False)
    step = _timed(opt, kwargs, calls, dist.barrier)
    gm = opt.plans[0].program.gm
    comms = [{"kind": c.kind, "bytes": c.bytes, "axis": c.axis} for c in communication(getattr(gm, "gm", gm))]
    # The link as `vdopt calibrate` measures it: 1 KiB and 16 MiB all-to-alls.
    link = all_to_all_samples(torch.device("cpu"))
    return {"step_s": step, "comms": comms, "link": link}


def gloo_check(cfg, calls: int) -> dict[str, Any]:
    """The projection for ulysses=2 at ``cfg`` against a real 2-rank gloo run on this CPU."""
    import vdopt
    from vdopt.runtime.local_ranks import run_local_ranks

    spec = {"kind": "mid", "config": dataclasses.asdict(cfg), "device": "cpu", "compile": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, kwargs = _model_and_call(spec, meta=False)
        single = _timed(vdopt.optimize(model, compile=False), kwargs, calls)
    finally:
        torch.set_num_threads(threads)
    rank_graph = per_rank_graphs([{"ulysses": 2}], spec, calls)["ulysses2"]
    payload = run_local_ranks(2, _gloo_rank, cfg, calls, backend="gloo", timeout=1800, pg_timeout=1800)[0]
    from vdopt.planning.calibrate import link_from_samples

    gloo = link_from_samples(payload["link"], name="gloo, 2 local processes", how="scaling benchmark")
    bandwidth, latency = gloo.bandwidth_gbps * 1e9, gloo.latency_us * 1e-6
    comm = comm_seconds(payload["comms"], {"ulysses": 2}, gloo)
    return {
        "config": f"Wan mid-size {MID_WAN | {'num_layers': cfg.layers}}, video {cfg.frames}x{cfg.height}x{cfg.width}, float32",
        "mesh": "ulysses2 (2 gloo processes, 1 thread each, same CPU)",
        "compute_1_s": single, "compute_per_rank_s": rank_graph["compute_s"],
        "link_bandwidth_GBps": bandwidth / 1e9, "link_latency_us": latency * 1e6,
        "bytes_per_call": sum(c["bytes"] for c in payload["comms"]), "collectives_per_call": len(payload["comms"]),
        "comm_s": comm,
        "projected_step_s": rank_graph["compute_s"] + comm,
        "projected_step_ideal_split_s": single / 2 + comm,
        "measured_step_s": payload["step_s"],
        "projection_error": (rank_graph["compute_s"] + comm) / payload["step_s"] - 1,
    }


# -- output ----------------------------------------------------------------------------------

def markdown(report: dict[str, Any]) -> str:
    links = list(LINK_ROWS)
    lines = [
        f"# Scaling projection: {report['model']}",
        "",
        "**Projection, not a measurement.** time(N) = compute per rank + sum over the graph's collectives of "
        "(latency + bytes/bandwidth), no overlap. compute(1) = "
        f"{report['compute_1_s'] * 1e3:.0f} ms per call ({report['compute_1_source']}). Bytes per call are exact, "
        "read from each mesh's rewritten rank-0 graph. "
        f"{report['date']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        "| mesh | ranks | GiB sent / rank / call | collectives | " + " | ".join(f"{l}: speed-up (eff.)" for l in links) + " |",
        "|---|---|---|---|" + "---|" * len(links),
    ]
    for row in report["projection"]:
        cells = [f"{row['by_link'][l]['speedup']:.2f}x ({100 * row['by_link'][l]['efficiency']:.0f}%)" for l in links]
        lines.append(f"| {row['mesh']} | {row['ranks']} | {row['bytes_per_call'] / 2**30:.2f} | "
                     f"{row['collectives_per_call']} | " + " | ".join(cells) + " |")
    lines += ["", "Link models:"]
    lines += [f"- {name}: {s['bandwidth_gbps']:.0f} GB/s, {s['latency_us']:.0f} us per collective "
              f"({s['sources']['bandwidth_gbps']})" for name, s in report["links"].items()]
    check = report.get("gloo_check")
    if check:
        lines += [
            "",
            "## Check against a real 2-rank run (gloo, CPU)",
            "",
            f"{check['config']}; {check['mesh']}. One process, one thread: {check['compute_1_s'] * 1e3:.1f} ms per "
            f"call; rank 0's graph on a fake group (its compute alone): {check['compute_per_rank_s'] * 1e3:.1f} ms; gloo link measured with 1 KiB and 16 MiB "
            f"all-to-alls: {check['link_bandwidth_GBps']:.2f} GB/s, {check['link_latency_us']:.0f} us; "
            f"{check['bytes_per_call'] / 2**20:.2f} MiB in {check['collectives_per_call']} collectives per call.",
            "",
            "| | ms per call |",
            "|---|---|",
            f"| projected: measured per-rank compute + modelled gloo traffic ({check['comm_s'] * 1e3:.1f} ms) | {check['projected_step_s'] * 1e3:.1f} |",
            f"| projected with compute(1) / 2 instead | {check['projected_step_ideal_split_s'] * 1e3:.1f} |",
            f"| measured, 2 gloo ranks | {check['measured_step_s'] * 1e3:.1f} |",
            f"| projection error | {100 * check['projection_error']:+.0f}% |",
            "",
            "The two ranks share this machine's cores (and other processes' load), so this checks the "
            "formula's bookkeeping, not GPU link figures.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for link in LINK_ROWS:
        for kind, style in (("ulysses", "-o"), ("ring", "--s")):
            rows = [r for r in report["projection"] if r["mesh"] in {f"{kind}{n}" for n in (2, 4, 8)}]
            if rows:
                ax.plot([1] + [r["ranks"] for r in rows], [1] + [r["by_link"][link]["speedup"] for r in rows],
                        style, label=f"{kind}, {link.split(' (')[0]}")
    ax.plot([1, 8], [1, 8], ":", color="#999999", label="linear")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("projected speed-up per call")
    ax.set_title(f"PROJECTION: {report['model']}\ncompute(1) {report['compute_1_s'] * 1e3:.0f} ms "
                 f"({report['compute_1_source'][:60]})", fontsize=8)
    ax.legend(fontsize=7)
    harness.save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 17x128x128, meshes ulysses=2 and ring=2, a 1-block check with 2 timed calls")
    parser.add_argument("--frames", type=int, default=None, help="video frames of the projected Wan2.1-1.3B (default 81)")
    parser.add_argument("--height", type=int, default=None, help="video height in pixels (default 480)")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (default 832)")
    parser.add_argument("--meshes", default=None,
                        help="';'-separated meshes, e.g. 'ulysses=2;ring=4;ulysses=4,ring=2' (default: 2 to 8 ranks of ulysses and ring)")
    parser.add_argument("--no-check", action="store_true", help="skip the 2-rank gloo check")
    parser.add_argument("--check-calls", type=int, default=None, help="timed calls in the gloo check (default 5)")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    defaults = {"frames": 81, "height": 480, "width": 832, "check_calls": 5,
                "meshes": ";".join(",".join(f"{a}={d}" for a, d in m.items()) for m in MESHES)}
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    harness.configure_logging()

    shape = {"frames": args.frames, "height": args.height, "width": args.width}
    meshes = harness.parse_meshes(args.meshes)
    cuda = torch.cuda.is_available()
    spec = {"kind": "full", "shape": shape, "device": "cuda" if cuda else "cpu", "dtype": "bfloat16", "compile": None}
    log.info("rank 0's rewritten graph of %d meshes on a fake process group (%s)", len(meshes),
             "timed on this GPU" if cuda else "meta device: bytes only")
    graphs = per_rank_graphs(meshes, spec, calls=5) if cuda else graph_comms(meshes, spec)
    if cuda:
        compute_1 = per_rank_graphs([{}], spec, calls=5)[""]["compute_s"]
        source = f"measured here: vdopt compiled, bf16, {torch.cuda.get_device_name()}; per-rank compute measured per mesh"
    else:
        compute_1 = ANCHOR_STEP_S
        source = "diffusers eager, bf16, one H100, measured elsewhere (no GPU here); per-rank compute = compute(1) / N"
    report: dict[str, Any] = {
        "benchmark": "scaling projection",
        **harness.stamp("cuda" if cuda else "cpu"),
        "host": f"{platform.machine()} CPU, {os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if cuda else ""),
        "model": f"Wan2.1-1.3B, {args.frames}x{args.height}x{args.width}, batch 1",
        "compute_1_s": compute_1,
        "compute_1_source": source,
        "links": {label: dataclasses.asdict(link) for label, link in links().items()},
        "graphs": graphs,
        "projection": project(compute_1, graphs, meshes),
    }
    if not args.no_check:
        log.info("2-rank gloo check at the mid-size config")
        check_cfg = BenchConfig(**QUICK["check_config"]) if args.quick else BenchConfig()
        report["gloo_check"] = gloo_check(check_cfg, args.check_calls)
    harness.write_results(args.out, f"scaling_wan1-3b_{args.frames}x{args.height}x{args.width}", report,
                          markdown=markdown(report), plot=plot)
    return report


if __name__ == "__main__":
    main()
