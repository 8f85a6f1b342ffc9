"""Smoke run of the end-to-end benchmark (``vdopt bench --quick``); it never gates on speed.

Expected figures are derived from what the run wrote (its configuration, timesteps and PAB
setting), not copied from a previous run.
"""

from __future__ import annotations

import json
import pathlib
import re

import torch

from vdopt.cli import main
from vdopt.cli.benchmark_source import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pab_calls(report: dict, kind: str) -> tuple[int, int]:
    """(computed, reused) calls of one region of ``kind`` over the run, from the PAB rule:
    call i of a slot at timestep t reuses when i > 0, t is strictly inside the window and
    i % range != 0. Slots: cond (and uncond with CFG); generations: warm-up + repeats."""
    cfg, pab = report["config"], report["pab"]
    rng, (low, high) = pab[f"{kind}_range"], pab[f"{kind}_window"]
    reused = sum(1 for i, t in enumerate(report["timesteps"]) if i > 0 and low < t < high and i % rng != 0)
    calls = len(report["timesteps"])
    slots = 2 if cfg["guidance"] > 1 else 1
    generations = 1 + cfg["repeats"]
    return slots * generations * (calls - reused), slots * generations * reused


def test_bench_quick_writes_json_markdown_and_plot_to_out(tmp_path, monkeypatch):
    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").iterdir()}
    monkeypatch.chdir(tmp_path)  # a run without --out writes to ./vdopt-results
    argv = ["bench", "--quick", "--threads", "1",
            "--methods", "diffusers_eager,diffusers_pab,vdopt_pab,vdopt_pab_triton"]
    assert main(argv) == 0
    (json_path,) = (tmp_path / "vdopt-results").glob("e2e_*.json")
    report = json.loads(json_path.read_text())
    cfg = report["config"]
    stem = json_path.with_suffix("")
    assert stem.name == f"e2e_wan-mid{cfg['layers']}_{cfg['frames']}x{cfg['height']}x{cfg['width']}_cpu"
    assert stem.with_suffix(".png").stat().st_size > 0
    md = stem.with_suffix(".md").read_text()
    # the committed results of the checkout are never touched
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").iterdir()} == committed

    assert report["versions"]["torch"] == torch.__version__ and report["date"] and "CPU" in report["device"]
    quick = load_benchmark("e2e", "vdopt bench").QUICK  # --quick's documented preset
    assert {k: cfg[k] for k in ("layers", "frames", "height", "width", "text_len", "steps", "repeats")} == {
        k: quick[k] for k in ("layers", "frames", "height", "width", "text_len", "steps", "repeats")}
    assert len(report["timesteps"]) == cfg["steps"]
    latent_frames = (cfg["frames"] - 1) // 4 + 1  # Wan's VAE: 4x in time, 8x in space; patches 1x2x2
    assert report["tokens_per_call"] == latent_frames * (cfg["height"] // 16) * (cfg["width"] // 16)
    methods = report["methods"]
    assert list(methods) == ["diffusers_eager", "diffusers_pab", "vdopt_pab", "vdopt_pab_triton"]
    if not torch.cuda.is_available():
        assert methods["vdopt_pab_triton"] == {"method": "vdopt_pab_triton", "skipped": "skipped: no GPU"}
        assert "| vdopt_pab_triton | skipped: no GPU |" in md
    for name in ("diffusers_eager", "diffusers_pab", "vdopt_pab"):
        r = methods[name]
        assert "skipped" not in r, r
        assert len(r["seconds_all"]) == cfg["repeats"] and r["seconds"] == min(r["seconds_all"])
        assert r["seconds_per_step"] == r["seconds"] / cfg["steps"] and r["peak_memory_bytes"] > 0
        assert f"| {name} | {r['seconds']:.2f} |" in md
    assert methods["diffusers_eager"]["final_latent_rel_err_vs_eager"] == 0.0
    assert methods["diffusers_eager"]["speedup_vs_diffusers_eager"] == 1.0
    # PAB counts are region calls: each block holds one region of each kind.
    summary = methods["vdopt_pab"]["summary"]
    for kind in ("spatial", "cross"):
        line = summary[f"pab {kind}"]
        regions = int(re.match(r"(\d+) regions", line).group(1))
        assert regions == cfg["layers"]
        computed, reused = pab_calls(report, kind)
        assert f"computed {regions * computed}, reused {regions * reused}" in line
    assert 0 < methods["vdopt_pab"]["final_latent_rel_err_vs_eager"] < 0.1


def test_bench_out_names_the_results_directory(tmp_path):
    out = tmp_path / "mine"
    assert main(["bench", "--quick", "--threads", "1", "--methods", "diffusers_eager", "--out", str(out)]) == 0
    (json_path,) = out.glob("e2e_*.json")
    report = json.loads(json_path.read_text())
    assert list(report["methods"]) == ["diffusers_eager"] and report["methods"]["diffusers_eager"]["seconds"] > 0


def test_bench_model_family_and_the_uncompiled_executable(tmp_path):
    """``--model`` picks the family; ``vdopt_eager`` (no compilation) runs beside diffusers
    eager, with the speed-up over what it replaces and the same latent."""
    out = tmp_path / "families"
    argv = ["bench", "--quick", "--threads", "1", "--model", "cogvideox", "--methods", "diffusers_eager,vdopt_eager",
            "--out", str(out)]
    assert main(argv) == 0
    (json_path,) = out.glob("e2e_*.json")
    report = json.loads(json_path.read_text())
    cfg = report["config"]
    assert cfg["model"] == "cogvideox" and cfg["clock"] == "cpu"  # one thread on the CPU: the workers' CPU time
    assert json_path.stem == f"e2e_cogvideox-mid{cfg['layers']}_{cfg['frames']}x{cfg['height']}x{cfg['width']}_cpu"
    assert report["model"].startswith("CogVideoX-2B")
    latent_frames = (cfg["frames"] - 1) // 4 + 1
    assert report["tokens_per_call"] == latent_frames * (cfg["height"] // 16) * (cfg["width"] // 16)
    r = report["methods"]["vdopt_eager"]
    assert r["speedup_vs_diffusers_eager"] == report["methods"]["diffusers_eager"]["seconds"] / r["seconds"]
    assert r["final_latent_rel_err_vs_eager"] <= 1e-6  # the same ATen ops, uncompiled
    assert len(r["wall_seconds_all"]) == cfg["repeats"] and r["clock"] == "CPU time of the process"
    md = json_path.with_suffix(".md").read_text()
    assert f"x diffusers_eager |" in md and "| vdopt_eager |" in md
