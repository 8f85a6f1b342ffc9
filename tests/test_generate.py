"""``vdopt generate``: a tiny random pipeline saved offline, turned into a video file.

The pipeline is written with ``save_pretrained`` (a locally built tokenizer; nothing is
downloaded) and loaded by the command with ``DiffusionPipeline.from_pretrained``, as a
downloaded one would be. The written file is decoded with imageio's ffmpeg reader.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from vdopt.models.pipelines import save_tiny_pipeline

    return save_tiny_pipeline("wan", tmp_path_factory.mktemp("pipelines") / "wan")


def decoded(path) -> tuple[int, tuple[int, ...]]:
    import imageio

    reader = imageio.get_reader(path, "ffmpeg")
    frames = [frame for frame in reader]
    reader.close()
    return len(frames), frames[0].shape


GENERATE = ("--prompt", "a cat walking in the snow", "--frames", "9", "--height", "32", "--width", "48",
            "--steps", "3", "--seed", "7", "--arg", "max_sequence_length=16")


def test_generate_under_torchrun_rank_0_writes_once(wan_dir, tmp_path):
    out = tmp_path / "cat.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "vdopt.cli", "generate", str(wan_dir), *GENERATE, "--mesh", "cfg=2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert decoded(out) == (9, (32, 48, 3))
    assert result.stdout.count("vdopt generate: WanPipeline, 9 frames 48x32") == 1  # rank 0 alone reports
    assert "Mesh(cfg=2" in result.stdout
    for phase in ("text encoding", "denoising", "decoding", "peak memory"):
        assert re.search(rf"^  {phase} ", result.stdout, re.M), result.stdout
    assert "3 steps" in result.stdout
    assert "denoising: 3/3 done" in result.stderr  # the per-step progress, rank 0's


def test_the_call_takes_only_what_the_pipeline_accepts():
    import argparse

    import torch

    from vdopt.cli.generate import call_arguments
    from vdopt.models.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan")
    args = argparse.Namespace(prompt="a cat", negative_prompt=None, frames=9, height=None, width=None, steps=2,
                              guidance_scale=None, arg=["max_sequence_length=16", "attention_kwargs={}"])
    kwargs = call_arguments(pipe, args, torch.Generator())
    assert {k: v for k, v in kwargs.items() if k != "generator"} == {
        "prompt": "a cat", "num_frames": 9, "num_inference_steps": 2, "max_sequence_length": 16,
        "attention_kwargs": {}, "output_type": "np"}
    with pytest.raises(ValueError, match="--arg strength: WanPipeline takes no such argument"):
        call_arguments(pipe, argparse.Namespace(**{**vars(args), "arg": ["strength=0.5"]}), None)
