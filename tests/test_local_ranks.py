"""``run_local_ranks``: results in rank order, and every way a rank can fail is one clear error, never a hang.

Real spawned processes over gloo; the functions are cheap, so each test costs the start-up
of its processes.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from vdopt.runtime.local_ranks import LocalRanksError, run_local_ranks


def _sum_of_ranks(rank: int, world_size: int, offset: float) -> dict:
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return {"rank": rank, "env": (os.environ["RANK"], os.environ["WORLD_SIZE"]), "sum": t,
            "threads": torch.get_num_threads()}


def test_results_come_back_in_rank_order_by_value():
    got = run_local_ranks(2, _sum_of_ranks, 10.0, backend="gloo")
    assert [g["rank"] for g in got] == [0, 1]
    assert [g["env"] for g in got] == [("0", "2"), ("1", "2")]
    assert all(torch.equal(g["sum"], torch.tensor([21.0])) and g["threads"] == 1 for g in got)


def _each_fails_its_own_way(rank: int, world_size: int) -> str:
    if rank == 1:
        raise ValueError("rank 1 rejects its input")
    if rank == 2:
        os._exit(3)  # no report, no traceback: like a crash in native code
    return "fine"


def test_a_raising_and_a_dying_rank_are_one_error_with_the_others_results():
    with pytest.raises(LocalRanksError) as info:
        run_local_ranks(3, _each_fails_its_own_way, backend="gloo")
    error = info.value
    assert error.results == {0: "fine"}
    assert error.failures[1].line == "ValueError: rank 1 rejects its input"
    assert "in _each_fails_its_own_way" in error.failures[1].traceback
    assert error.failures[2].line.startswith("exited with code 3 without reporting") and not error.failures[2].traceback
    message = str(error)
    assert "rank 1: ValueError: rank 1 rejects its input" in message and "rank 2: exited with code 3" in message
    assert "traceback of rank 1:\nTraceback (most recent call last)" in message


def _hangs_after_rank_0_fails(rank: int, world_size: int) -> None:
    if rank == 0:
        raise RuntimeError("rank 0 gives up")
    time.sleep(600)


def _hangs(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_a_rank_that_hangs_is_stopped_after_the_grace_or_the_timeout():
    # after another rank's failure: killed once the grace is over
    with pytest.raises(LocalRanksError) as info:
        run_local_ranks(2, _hangs_after_rank_0_fails, group=False, grace=1.0)
    assert list(info.value.failures) == [0, 1]  # the cause first
    assert info.value.failures[1].line.startswith("no report 1 s after rank 0 failed")
    # alone: killed at the run's timeout
    with pytest.raises(LocalRanksError) as info:
        run_local_ranks(1, _hangs, group=False, timeout=2.0)
    assert str(info.value).startswith("rank 0: did not finish within 2 s; stopped")


def _rejects(rank: int, world_size: int) -> None:
    raise ValueError("every rank checks the same arguments")


def _message_only(error: BaseException) -> str:
    return str(error)


def test_ranks_that_fail_alike_are_reported_once():
    with pytest.raises(LocalRanksError) as info:
        run_local_ranks(2, _rejects, group=False, describe=_message_only)
    assert info.value.summary() == "every rank: every rank checks the same arguments"
    assert str(info.value).count("Traceback (most recent call last)") == 1
