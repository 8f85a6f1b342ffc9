"""Run passes: lint and recompile after each, record what each did, name the one that failed.

``run_passes`` runs a pipeline over one graph. Features that derive several graphs from the
rewritten one (PAB's variants, PipeFusion's stage and patch graphs) run each of their passes
with ``run_pass``, so those get the same checks, records and errors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable, Sequence

import torch

from vdopt.passes.base import GraphPass, PassContext, PassResult

log = logging.getLogger(__name__)


class PassError(RuntimeError):
    """A pass raised or left a broken graph; the message names it and the passes before it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassRecord:
    name: str
    """The pass's name."""
    tier: str
    """``exact`` or ``approx``."""
    modified: bool
    """Whether the pass changed the graph."""
    stats: dict[str, Any]
    """The pass's rewrite counts."""
    seconds: float
    """Wall time of the pass, lint and recompile included."""
    graph: str = "main"
    """The graph the pass rewrote: ``main``, or one a feature derives from it (a PAB variant,
    a PipeFusion stage or patch graph)."""


def _check_graph(gm: torch.fx.GraphModule) -> None:
    gm.graph.lint()
    missing = [
        n.name for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta
    ]
    if missing:
        raise AssertionError(f"nodes without meta['val'] (every new node needs one): {missing[:5]}")
    gm.recompile()


def run_pass(
    p: GraphPass,
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    *,
    after: Sequence[str] = (),
    graph: str = "main",
) -> tuple[PassResult, PassRecord]:
    """Apply one pass to ``gm``, lint and recompile the result, and record what it did.

    ``after`` names the passes that ran before (for the error message); ``graph`` labels the
    graph in the record. A pass that yields more than a graph (PipeFusion's cut) returns a
    ``PassResult`` subclass, returned here as is.
    """
    start = time.perf_counter()
    try:
        result = p(gm, ctx)
        _check_graph(result.gm)
    except ValueError as e:
        # a user mistake the pass detected (a degree the model cannot take): keep the type
        raise ValueError(f"pass '{p.name}': {e}") from e
    except Exception as e:
        ran = ", ".join(after) or "no other pass"
        where = "" if graph == "main" else f" on graph '{graph}'"
        raise PassError(f"pass '{p.name}' ({p.tier}){where} failed after {ran}: {type(e).__name__}: {e}") from e
    record = PassRecord(
        name=p.name,
        tier=p.tier,
        modified=result.modified,
        stats=dict(result.stats),
        seconds=time.perf_counter() - start,
        graph=graph,
    )
    log.debug("pass %s on %s: modified=%s %s", p.name, graph, result.modified, result.stats)
    return result, record


def run_passes(
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    passes: Sequence[GraphPass],
    *,
    disabled: Iterable[str] = (),
    progress: Any = None,
) -> tuple[torch.fx.GraphModule, list[PassRecord]]:
    """Apply ``passes`` to ``gm`` in order; passes named in ``disabled`` are skipped.

    ``progress`` is an optional tqdm-like bar advanced once per pass.
    """
    disabled = set(disabled)
    records: list[PassRecord] = []
    for p in passes:
        if progress is not None:
            progress.set_postfix_str(p.name)
        if p.name not in disabled:
            result, record = run_pass(p, gm, ctx, after=[r.name for r in records])
            gm = result.gm
            records.append(record)
        if progress is not None:
            progress.update(1)
    return gm, records
