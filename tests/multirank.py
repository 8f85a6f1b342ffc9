"""Run a test function on several real gloo ranks (separate processes) and collect the results.

``run_on_ranks`` is ``vdopt.runtime.local_ranks.run_local_ranks`` over gloo, one thread per
rank, with the test-suite's timeouts, plus seeding: every rank seeds torch and ``random``
from the calling test's seed (``$VDOPT_TEST_SEED``, set by conftest.py for the test's
duration), the same value on every rank: ranks must draw the same random inputs, as every
rank receives the full inputs; and replaying a failed test's seed replays its ranks too. A
failing, lost or hung rank fails the test with an ``AssertionError`` naming the ranks, their
tracebacks and the seed.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable

import torch

from vdopt.runtime.local_ranks import LocalRanksError, run_local_ranks

SEED_ENV = "VDOPT_TEST_SEED"
"""The calling test's seed (see conftest.py)."""


def rank_seed(test_seed: int) -> int:
    """The seed of every rank of a test: derived from the test's, identical across ranks
    (offset so a rank's draws differ from the parent's draws after the same seed)."""
    return (test_seed * 1_000_003 + 17) % 2**63


def _seeded(rank: int, world_size: int, seed: int | None, fn: Callable, *args: Any) -> Any:
    if seed is not None:
        random.seed(seed)
        torch.manual_seed(seed)
    return fn(rank, world_size, *args)


def run_on_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 240.0,
                 pg_timeout: float = 60.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process."""
    test_seed = os.environ.get(SEED_ENV)
    seed = rank_seed(int(test_seed)) if test_seed is not None else None
    try:
        return run_local_ranks(world_size, _seeded, seed, fn, *args, backend="gloo", timeout=timeout,
                               pg_timeout=pg_timeout, grace=1.0)
    except LocalRanksError as error:
        seed_note = f"\n(ranks seeded with {seed}, from {SEED_ENV}={test_seed})" if seed is not None else ""
        raise AssertionError(f"{error}{seed_note}") from None
