"""The collectives vdopt inserts into graphs, and how many bytes each rank moves per call.

Collectives are ``torch.distributed._functional_collectives`` ops (``_c10d_functional.*`` in
the exported graph, each followed by ``wait_tensor``) plus ``vdopt::ring_attention``, which
passes K/V blocks rank to rank with point-to-point sends. Every such node a pass creates
carries a ``CommRecord`` under ``node.meta[vdopt.meta.COMM]``, so the traffic of a rewritten
graph is read off the graph itself (``communication``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable

import torch

from vdopt import meta

c10d = torch.ops._c10d_functional
ALL_TO_ALL = c10d.all_to_all_single.default
ALL_GATHER = c10d.all_gather_into_tensor.default
ALL_REDUCE = c10d.all_reduce.default
WAIT = c10d.wait_tensor.default

KINDS = ("all_to_all", "all_gather", "all_reduce", "p2p")


@dataclasses.dataclass(frozen=True)
class CommRecord:
    kind: str
    """``all_to_all``, ``all_gather``, ``all_reduce`` (partial sums over split tokens) or ``p2p``
    (ring attention's K/V hand-over)."""
    bytes: int
    """Bytes this rank sends to other ranks per call."""
    purpose: str
    """The attention site it serves, or what else it is for (``output gather``, ...)."""
    axis: str
    """The mesh axis (process group) it runs on."""


def all_reduce_bytes(nbytes: int, ranks: int) -> int:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: reduce-scatter then all-gather,
    ``(ranks - 1) / ranks`` of the tensor each."""
    return 2 * nbytes * (ranks - 1) // ranks


def records(nodes: Iterable[torch.fx.Node]) -> list[CommRecord]:
    return [n.meta[meta.COMM] for n in nodes if meta.COMM in n.meta]


def communication(gm: torch.fx.GraphModule) -> list[CommRecord]:
    """Every collective a pass inserted into ``gm``, in graph order."""
    return records(gm.graph.nodes)


def bytes_by_kind(comms: Iterable[CommRecord]) -> dict[str, int]:
    """Bytes each rank sends per call, by collective type."""
    total: dict[str, int] = defaultdict(int)
    for c in comms:
        total[c.kind] += c.bytes
    return dict(total)


def count_by_kind(comms: Iterable[CommRecord]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for c in comms:
        total[c.kind] += 1
    return dict(total)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def per_purpose_notes(comms: Iterable[CommRecord]) -> dict[str, str]:
    """``{site: "all_to_all x4 36.0 KiB, ..."}`` for the report's site table."""
    grouped: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for c in comms:
        grouped[c.purpose][c.kind].append(c.bytes)
    return {
        purpose: ", ".join(f"{kind} x{len(b)} {format_bytes(sum(b))}" for kind, b in kinds.items())
        for purpose, kinds in grouped.items()
    }


def comm_stats(comms: list[CommRecord]) -> dict[str, int]:
    """Counts and bytes per collective type, as pass stats: ``all_to_all=8 all_to_all_bytes=...``."""
    stats: dict[str, int] = {}
    counts, sizes = count_by_kind(comms), bytes_by_kind(comms)
    for kind in KINDS:
        if kind in counts:
            stats[kind] = counts[kind]
            stats[f"{kind}_bytes"] = sizes[kind]
    return stats
