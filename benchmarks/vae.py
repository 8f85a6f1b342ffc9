"""Patch-parallel VAE decode: per-rank peak memory and time against one device and tiling.

    python benchmarks/vae.py                       # mid-size Wan VAE, 9x128x128 video, 1/2/4 ranks
    python benchmarks/vae.py --ranks 2 4 --latent 3 24 24 --out benchmarks/results

Methods, each in fresh processes with one thread per process:

* ``eager``: ``vae.decode(z)`` on one process (the one-device baseline, and the reference);
* ``tiled``: diffusers' tiled decode (``vae.enable_tiling`` with tiles of half the image and
  a quarter overlap), one process: less memory, an approximate output (its error is reported);
* ``vdopt_<n>``: ``vdopt.optimize_vae(vae, Mesh(ulysses=n)).decode(z)`` on ``n`` gloo ranks
  (``n = 1``: the captured graph, no rewrite). Every rank returns the full video.

Per method and rank: seconds of a decode after a first untimed one (which captures and
rewrites for vdopt), the peak resident memory *during* that decode above the resident memory
before it (sampled every millisecond from ``/proc/self/statm``: activations, halos and
gathers, kernel workspaces; the parameters are resident before; tensors above 64 KiB are mapped on their own
through ``MALLOC_MMAP_THRESHOLD_``, so freed memory leaves the resident set), the process's
lifetime peak RSS, the peak of the rank graph's live tensors (``graph_activation_peak``), and
the relative error of the output against ``eager``.

``--quick``: a tiny VAE and latent, a smoke run, not a measurement. Results: ``--out``
(default ``./vdopt-results``) gets ``vae_<config>_cpu.{json,md,png}``. Benchmarks never gate CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

MID = {"base_dim": 32, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
       "temperal_downsample": [False, True, True]}
"""A mid-size Wan 2.1 VAE: the real layout (4 levels, causal 3-D convs, mid attention) with a
third of the channels and one block per level."""
QUICK = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [True],
         "scale_factor_spatial": 2}


def _build(config: dict, latent: tuple[int, int, int]):
    import diffusers

    torch.manual_seed(0)
    z_dim = config["z_dim"]
    vae = diffusers.AutoencoderKLWan(**config, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()
    z = torch.randn(1, z_dim, *latent)
    return vae, z


class PeakResident:
    """Peak resident set size (bytes) while the block runs, above the size at its start."""

    def __enter__(self) -> "PeakResident":
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def above_start(self) -> int:
        return self.peak - self.start


def _measure(decode, barrier=lambda: None) -> dict[str, Any]:
    import resource

    with torch.no_grad():
        decode()  # capture and rewrite (vdopt), lazy allocations (all)
        barrier()
        with PeakResident() as mem:
            start = time.perf_counter()
            out = decode()
            seconds = time.perf_counter() - start
    return {"seconds": seconds, "decode_peak_bytes": mem.above_start,
            "lifetime_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "out": out.numpy()}


_VIEWS = {"aten.view.default", "aten.slice.Tensor", "aten.permute.default", "aten.select.int",
          "aten.unsqueeze.default", "aten.squeeze.dim", "aten.alias.default", "aten.expand.default",
          "aten.transpose.int", "aten.movedim.int", "aten.reshape.default"}


def graph_activation_peak(gm: torch.fx.GraphModule) -> int:
    """Peak bytes of the graph's live tensors in graph order, each freed after its last use
    (views counted free; kernel workspaces not counted): what the rewrite itself decides."""
    nodes = list(gm.graph.nodes)
    last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    live = peak = 0
    alive: dict[torch.fx.Node, int] = {}
    for i, n in enumerate(nodes):
        vals = n.meta.get("val")
        vals = vals if isinstance(vals, (list, tuple)) else [vals]
        if n.op == "call_function" and str(n.target) not in _VIEWS:
            alive[n] = sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor))
            live += alive[n]
        peak = max(peak, live)
        for a in n.all_input_nodes:
            if last.get(a) == i and a in alive:
                live -= alive.pop(a)
    return peak


def _one_process(rank: int, world: int, method: str, config: dict, latent: tuple) -> dict[str, Any]:
    vae, z = _build(config, latent)
    if method == "tiled":
        h, w = (vae.spatial_compression_ratio * s for s in latent[1:])
        vae.enable_tiling(tile_sample_min_height=h // 2, tile_sample_min_width=w // 2,
                          tile_sample_stride_height=3 * h // 8, tile_sample_stride_width=3 * w // 8)
    return _measure(lambda: vae.decode(z).sample)


def _rank(rank: int, world: int, config: dict, latent: tuple) -> dict[str, Any]:
    import torch.distributed as dist

    import vdopt

    vae, z = _build(config, latent)
    opt = vdopt.optimize_vae(vae, vdopt.Mesh(ulysses=world) if world > 1 else None)
    result = _measure(lambda: opt.decode(z).sample, barrier=dist.barrier if world > 1 else lambda: None)
    plan = opt.plans[0]
    result["stats"] = plan.passes[0].stats if plan.passes else {}
    result["graph_peak_bytes"] = graph_activation_peak(plan.program.gm)
    if rank:
        result.pop("out")
    return result


def run(method: str, config: dict, latent: tuple, world: int = 1) -> list[dict[str, Any]]:
    """``method`` in fresh processes, one thread each: ``world`` gloo ranks for vdopt (no group for one)."""
    from vdopt.runtime.local_ranks import run_local_ranks

    if method.startswith("vdopt"):
        return run_local_ranks(world, _rank, config, latent, group=world > 1, backend="gloo", timeout=1800,
                               pg_timeout=900)
    return run_local_ranks(1, _one_process, method, config, latent, group=False, timeout=1800)


def _markdown(report: dict[str, Any]) -> str:
    mib = 1 / 2**20
    lines = [
        f"# Patch-parallel VAE decode ({report['config_name']}, latent {report['latent']} -> video {report['video']})",
        "",
        f"{report['date']}, {report['device']}, torch {report['versions'].get('torch')}, "
        f"diffusers {report['versions'].get('diffusers')}; one thread per process.",
        "",
        "| method | ranks | seconds (max over ranks) | decode peak per rank, MiB | graph activation peak per rank, MiB "
        "| lifetime peak RSS per rank, MiB | rel. error vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ranks in report["methods"].items():
        peaks = " / ".join(f"{r['decode_peak_bytes'] * mib:.0f}" for r in ranks)
        rss = " / ".join(f"{r['lifetime_peak_rss_bytes'] * mib:.0f}" for r in ranks)
        seconds = max(r["seconds"] for r in ranks)
        graph = " / ".join(f"{r['graph_peak_bytes'] * mib:.0f}" for r in ranks) if "graph_peak_bytes" in ranks[0] else "-"
        lines.append(f"| {name} | {len(ranks)} | {seconds:.2f} | {peaks} | {graph} | {rss} | {ranks[0]['rel_error']:.1e} |")
    lines += ["", "Decode peak: resident memory during the timed decode above the resident memory before it "
              "(activations, halos, gathers, and the CPU kernels' own workspaces; parameters excluded). "
              "Graph activation peak: the live tensors of the rank's graph in graph order (vdopt rows only; "
              "no kernel workspaces). CPU conv3d picks its kernel by shape, and some slab shapes get a "
              "kernel with a large workspace, so the decode peak does not always fall with the rank count "
              "while the graph peak does. The machine may be shared: times are one run.", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    names = list(report["methods"])
    peaks = [max(r["decode_peak_bytes"] for r in report["methods"][n]) / 2**20 for n in names]
    secs = [max(r["seconds"] for r in report["methods"][n]) for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.bar(names, peaks)
    a.set_ylabel("decode peak per rank (MiB)")
    b.bar(names, secs, color="tab:orange")
    b.set_ylabel("seconds")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Patch-parallel VAE decode, {report['config_name']}, video {report['video']}")
    harness.save_figure(fig, path, dpi=80)


def main(argv: list[str] | None = None) -> Path:
    # Tensors above 64 KiB get their own mappings, returned to the system when freed, so the
    # resident set follows the live tensors (otherwise the heap keeps the first call's peak).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="vdopt world sizes")
    parser.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                        help="latent frames, height, width (default 3 16 16)")
    parser.add_argument("--quick", action="store_true", help="a tiny VAE and latent: a smoke run")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    harness.configure_logging()
    config, name = (QUICK, "wan-tiny") if args.quick else (MID, "wan-mid")
    latent = tuple(args.latent or ((2, 6, 6) if args.quick else (3, 16, 16)))
    methods: dict[str, list[dict[str, Any]]] = {"eager": run("eager", config, latent)}
    reference = torch.from_numpy(methods["eager"][0]["out"])
    methods["tiled"] = run("tiled", config, latent)
    for n in args.ranks:
        methods[f"vdopt_{n}"] = run("vdopt", config, latent, world=n)
    for ranks in methods.values():
        out = torch.from_numpy(ranks[0].pop("out"))
        for r in ranks:
            r["rel_error"] = harness.relative_error(out, reference)
    report = {**harness.stamp("cpu"), "config_name": name, "config": config, "latent": list(latent),
              "video": list(reference.shape[2:]), "methods": methods}
    stem = f"vae_{name}_{'x'.join(map(str, reference.shape[2:]))}_cpu"
    path = harness.write_results(args.out, stem, report, markdown=_markdown(report), plot=_plot)
    print(_markdown(report))
    return path


if __name__ == "__main__":
    main()
