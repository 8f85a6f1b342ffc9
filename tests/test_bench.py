"""Smoke run of the end-to-end benchmark harness at a toy size (it never gates on speed)."""

from __future__ import annotations

import json

import torch

from vdopt.cli import main


def test_bench_smoke_writes_json_markdown_and_plot(tmp_path):
    argv = [
        "bench", "--layers", "1", "--frames", "5", "--height", "32", "--width", "32", "--text-len", "8",
        "--steps", "3", "--repeats", "1", "--threads", "1", "--meshes", "none", "--artifact", "none",
        "--methods", "diffusers_eager,diffusers_pab,vdopt_pab,vdopt_pab_triton", "--out", str(tmp_path),
    ]
    assert main(argv) == 0
    stem = tmp_path / "e2e_wan-mid1_5x32x32_cpu"
    report = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    md = stem.with_suffix(".md").read_text()

    assert report["versions"]["torch"] == torch.__version__ and report["date"] and "CPU" in report["device"]
    assert report["config"]["steps"] == 3 and report["tokens_per_call"] == 2 * 2 * 2
    methods = report["methods"]
    assert list(methods) == ["diffusers_eager", "diffusers_pab", "vdopt_pab", "vdopt_pab_triton"]
    if not torch.cuda.is_available():
        assert methods["vdopt_pab_triton"] == {"method": "vdopt_pab_triton", "skipped": "skipped: no GPU"}
        assert "| vdopt_pab_triton | skipped: no GPU |" in md
    for name in ("diffusers_eager", "diffusers_pab", "vdopt_pab"):
        r = methods[name]
        assert r["seconds"] > 0 and len(r["seconds_all"]) == 1 and r["peak_memory_bytes"] > 0
        assert r["time_to_first_output_s"] > 0 and f"| {name} | {r['seconds']:.2f} |" in md
    assert methods["diffusers_eager"]["final_latent_rel_err_vs_eager"] == 0.0
    assert methods["diffusers_eager"]["speedup_vs_diffusers_eager"] == 1.0
    # Three steps at t = 999, 857, 600 (shift 3): only 600 is inside (100, 800), as call 2 of
    # its slot (cond and uncond each): spatial (range 2) computes, cross (range 6) reuses.
    # The counts cover both generations (warm-up and timed): 12 calls.
    summary = methods["vdopt_pab"]["summary"]
    assert "computed 12, reused 0" in summary["pab spatial"]
    assert "computed 8, reused 4" in summary["pab cross"]
    assert 0 < methods["vdopt_pab"]["final_latent_rel_err_vs_eager"] < 0.1
