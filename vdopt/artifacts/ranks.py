"""The collectives that saving and loading use to keep every rank in step.

Without a process group (one rank) each is the identity. They use the default group: it
exists whenever there are several ranks, before any mesh group is built.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank, on every rank."""
    if not _several_ranks():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def exchange_outcomes(value: Any, error: Exception | None) -> tuple[list[Any], dict[int, str]]:
    """Every rank's result of the step just done, and the failures of that step by rank.

    Every rank calls it, failed (``error`` set) or not. A rank that raised without taking part
    would leave the others blocked in their next collective until the group's timeout; with
    this exchange they all learn of the failure at once and fail together.
    """
    sent = ("failed", f"{type(error).__name__}: {error}") if error is not None else ("ok", value)
    received = gather(sent)
    failures = {rank: payload for rank, (status, payload) in enumerate(received) if status == "failed"}
    return [payload if status == "ok" else None for status, payload in received], failures


def describe_failures(failures: dict[int, str]) -> str:
    """``"rank 1: OSError: ...; rank 3: ..."`` for an error message."""
    return "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failures.items()))
