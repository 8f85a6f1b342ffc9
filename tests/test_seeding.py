"""Random test inputs: a fresh seed per test, printed on failure, replayable, passed to ranks."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import torch

from multirank import rank_seed, run_on_ranks

TESTS = pathlib.Path(__file__).resolve().parent

FAILING_TEST = '''
import torch

def test_draws_and_fails():
    print("drew", torch.rand(1).item())
    assert False
'''


def _run_inner_pytest(folder: pathlib.Path, seed: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VDOPT_TEST_SEED"}
    if seed is not None:
        env["VDOPT_TEST_SEED"] = seed
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder), str(folder)],
        capture_output=True, text=True, timeout=300, env=env, cwd=folder,
    )


def test_a_failure_prints_its_seed_and_the_seed_replays_it(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(FAILING_TEST)
    first = _run_inner_pytest(tmp_path, None)
    assert first.returncode == 1, first.stdout + first.stderr
    seed = re.search(r"replay with VDOPT_TEST_SEED=(\d+) pytest", first.stdout)
    assert seed, first.stdout
    drew = re.search(r"drew (\S+)", first.stdout).group(1)
    replay = _run_inner_pytest(tmp_path, seed.group(1))
    assert f"drew {drew}" in replay.stdout and f"VDOPT_TEST_SEED={seed.group(1)}" in replay.stdout


def test_the_global_generator_is_seeded_with_the_printed_seed(vdopt_seed):
    draw = torch.rand(3)
    torch.manual_seed(vdopt_seed)
    assert torch.equal(draw, torch.rand(3))
    assert os.environ["VDOPT_TEST_SEED"] == str(vdopt_seed)


def _draw(rank: int, world_size: int) -> torch.Tensor:
    return torch.rand(4)


def test_ranks_get_the_same_seed_derived_from_the_test(vdopt_seed):
    ranks = run_on_ranks(2, _draw)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(rank_seed(vdopt_seed)))
    assert torch.equal(ranks[0], expected) and torch.equal(ranks[1], expected)
