"""Run passes in order: lint and recompile after each, record what each did."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable, Sequence

import torch

from vdopt.passes.base import GraphPass, PassContext

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


def _check_graph(gm: torch.fx.GraphModule) -> None:
    gm.graph.lint()
    missing = [
        n.name for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta
    ]
    if missing:
        raise AssertionError(f"nodes without meta['val'] (every new node needs one): {missing[:5]}")
    gm.recompile()


def run_passes(
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    passes: Sequence[GraphPass],
    *,
    disabled: Iterable[str] = (),
    progress: Any = None,
) -> tuple[torch.fx.GraphModule, list[PassRecord]]:
    """Apply ``passes`` to ``gm``; passes named in ``disabled`` are skipped.

    ``progress`` is an optional tqdm-like bar advanced once per pass.
    """
    disabled = set(disabled)
    unknown = disabled - {p.name for p in passes}
    if unknown:
        log.warning("disabled passes %s are not in this pipeline (%s)", sorted(unknown), [p.name for p in passes])
    records: list[PassRecord] = []
    for p in passes:
        if progress is not None:
            progress.set_postfix_str(p.name)
        if p.name in disabled:
            if progress is not None:
                progress.update(1)
            continue
        start = time.perf_counter()
        try:
            result = p(gm, ctx)
            gm = result.gm
            _check_graph(gm)
        except ValueError as e:
            # a user mistake the pass detected (a degree the model cannot take): keep the type
            raise ValueError(f"pass '{p.name}': {e}") from e
        except Exception as e:
            ran = ", ".join(r.name for r in records) or "no other pass"
            raise PassError(f"pass '{p.name}' ({p.tier}) failed after {ran}: {type(e).__name__}: {e}") from e
        records.append(
            PassRecord(
                name=p.name,
                tier=p.tier,
                modified=result.modified,
                stats=dict(result.stats),
                seconds=time.perf_counter() - start,
            )
        )
        log.debug("pass %s: modified=%s %s", p.name, result.modified, result.stats)
        if progress is not None:
            progress.update(1)
    return gm, records
