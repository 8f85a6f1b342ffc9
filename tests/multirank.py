"""Run a function on several real gloo ranks (separate processes) and collect the results.

Each rank initializes the default process group over gloo (TCP on localhost), calls
``fn(rank, world_size, *args)`` and sends back its return value (moved to CPU). An exception
on any rank fails the caller with that rank's traceback; a hung rank fails after ``timeout``.

Every rank seeds torch and ``random`` from the calling test's seed (``$VDOPT_TEST_SEED``, set
by conftest.py for the test's duration), the same value on every rank: ranks must draw the
same random inputs, as every rank receives the full inputs; and replaying a failed test's
seed replays its ranks too.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import random
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEED_ENV = "VDOPT_TEST_SEED"
"""The calling test's seed (see conftest.py)."""


def rank_seed(test_seed: int) -> int:
    """The seed of every rank of a test: derived from the test's, identical across ranks
    (offset so a rank's draws differ from the parent's draws after the same seed)."""
    return (test_seed * 1_000_003 + 17) % 2**63


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, pg_timeout: float,
            seed: int | None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    if seed is not None:
        random.seed(seed)
        torch.manual_seed(seed)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        report = (rank, "ok", fn(rank, world_size, *args))
    except BaseException:  # report everything, including assertion failures
        report = (rank, "error", traceback.format_exc())
    try:
        queue.put(report)
        # Flush before tearing down: destroying a group whose peer failed can block while
        # holding the GIL, which would starve the queue's feeder thread and lose the report.
        queue.close()
        queue.join_thread()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _silent_failures(procs: list, reported: dict[int, Any], deadline: float, timeout: float) -> list[str]:
    """Ranks that died without reporting (a crash in native code), or all of them past the deadline."""
    dead = [f"rank {r} exited with code {p.exitcode} without reporting (a crash in native code?)"
            for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
    if dead:
        return dead
    if time.monotonic() > deadline:
        return [f"ranks {sorted(set(range(len(procs))) - set(reported))} did not finish within {timeout:.0f} s"]
    return []


def run_on_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 240.0,
                 pg_timeout: float = 60.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    test_seed = os.environ.get(SEED_ENV)
    seed = rank_seed(int(test_seed)) if test_seed is not None else None
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, pg_timeout, seed), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                errors.extend(_silent_failures(procs, results, deadline, timeout))
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        seed_note = f" (ranks seeded with {seed}, from {SEED_ENV}={test_seed})" if seed is not None else ""
        raise AssertionError("\n".join(errors) + seed_note)
    return [results[r] for r in range(world_size)]
