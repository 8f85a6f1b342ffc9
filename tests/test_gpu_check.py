"""``vdopt gpu-check --tiny``: every stage of the GPU check rehearsed on the CPU.

The rehearsal runs the stages' own code (pytest on the CUDA-only tests, the small Wan checks,
``attention.py --smoke``, ``e2e.py`` per method) at toy sizes, so the device script cannot
rot between device sessions. It never gates on speed: figures only have to be positive.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from vdopt.cli.benchmark_source import load_benchmark


def positive_numbers(figures: dict) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in figures.values())


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One ``vdopt gpu-check --tiny`` run (a few minutes on 2 cores): its output and JSON."""
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, "-m", "vdopt.cli", "gpu-check", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    return proc, out


def test_tiny_rehearsal_runs_every_stage_ok_and_prints_the_table_last(rehearsal):
    proc, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    module = load_benchmark("gpu_check", "vdopt gpu-check")
    assert list(report["stages"]) == [stage.name for stage in module.stages()]
    for name, record in report["stages"].items():
        assert record["status"] == "ok", (name, record)
        assert record["figures"] and positive_numbers(record["figures"]), (name, record["figures"])
        assert 0 < record["seconds"] <= record["limit_s"] + module.TERMINATE_GRACE_S
    env = report["environment"]
    assert env["date"] and "CPU" in env["device"] and env["versions"]["torch"] == torch.__version__
    assert env["versions"]["triton"] and env["versions"]["diffusers"]
    assert report["config"]["tiny"] is True

    stages = report["stages"]
    if not torch.cuda.is_available():
        # NCCL cannot run on a CPU: the same path runs on gloo, and the record says so.
        assert stages["nccl_mesh"]["details"]["backend"] == "gloo"
        assert stages["nccl_mesh"]["details"]["nccl"].startswith("skipped: needs CUDA")
        assert stages["attention"]["details"]["smoke"] is True
    assert stages["cuda_tests"]["details"]["failures"] == 0
    assert stages["compiled"]["details"]["artifact_rel_err_vs_eager"] < 1e-4
    assert {"load_s", "first_call_s", "aot_compile_s"} <= set(stages["e2e_vdopt_artifact"]["figures"])
    assert set(report["speedups"]) == {name for name in stages if name.startswith("e2e_")}
    assert (out / "gpu_check.png").stat().st_size > 0

    table = (out / "gpu_check.txt").read_text()
    assert proc.stdout.endswith(table)  # the table is the last output
    for name in stages:
        assert name in table


def test_a_stage_past_its_limit_is_stopped_and_recorded(tmp_path):
    module = load_benchmark("gpu_check", "vdopt gpu-check")
    (stage,) = [s for s in module.stages() if s.name == "e2e_vdopt"]
    record = module.run_stage(stage, module.CheckConfig(tiny=True), tmp_path, limit_s=1.0)
    assert record["status"] == "timeout: stopped after 1 s"
    assert record["seconds"] < 1.0 + module.TERMINATE_GRACE_S + 5


def test_a_failing_stage_is_recorded_with_its_log(tmp_path):
    module = load_benchmark("gpu_check", "vdopt gpu-check")
    (stage,) = [s for s in module.stages() if s.name == "e2e_vdopt_artifact"]
    cfg = module.CheckConfig(tiny=True, artifact_of="diffusers_eager")  # not a vdopt method: e2e.py refuses it
    record = module.run_stage(stage, cfg, tmp_path, limit_s=120.0)
    assert record["status"].startswith("failed: ValueError: --artifact 'diffusers_eager'")
    assert "Traceback" in record["log_tail"]


def test_stages_past_the_budget_are_skipped_not_started(tmp_path):
    module = load_benchmark("gpu_check", "vdopt gpu-check")
    records = module.run_all(module.CheckConfig(tiny=True, budget_s=module.MIN_STAGE_S / 2), tmp_path)
    assert all(r["status"].startswith("skipped: the run's") for r in records.values())
    assert not (tmp_path / "stages").exists()
