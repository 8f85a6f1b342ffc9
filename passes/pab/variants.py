"""Every PAB variant of a plan's graphs, specialized through the pass runner.

PAB works on the final per-rank graph(s), after every other pass: the one graph of a plain
plan, or each stage graph of a PipeFusion rank (the exact one and one per patch). For each
graph this finds its regions (``find_pab_regions``), then runs ``PABSpecialize`` once per
pattern of reused kinds the schedule can need, so every variant exists, with its record,
before the first call. The runtime (``vdopt.runtime.pab``) only chooses among them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Hashable, Mapping, Sequence

import torch
import torch.fx

from vdopt.config import PABConfig
from vdopt.passes.base import PassContext
from vdopt.passes.pab.regions import PABRegion, find_pab_regions
from vdopt.passes.pab.schedule import PABSchedule, variant_name
from vdopt.passes.pab.specialize import PABSpecialize, flat_copy
from vdopt.passes.runner import PassRecord, run_pass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariantGraph:
    """One graph specialized for one pattern of reused kinds."""

    name: str
    """``compute_all`` or ``reuse_<kinds>``."""
    reuse: frozenset[str]
    """PAB kinds read from the cache."""
    gm: torch.fx.GraphModule
    """``gm(*input_leaves, *cache_inputs) -> (*output_leaves, *cache_outputs)``."""
    cache_inputs: tuple[str, ...]
    """Cache keys of the extra inputs, in order."""
    cache_outputs: tuple[str, ...]
    """Cache keys of the extra outputs, in order."""
    record: PassRecord
    """What the specialization did (removed nodes, linears, attention ops, collectives)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PABGraphs:
    """The regions and variants of every graph PAB applies to."""

    schedule: PABSchedule
    """The rules of the kinds some graph has regions of."""
    regions: Mapping[Hashable, tuple[PABRegion, ...]]
    """Graph key -> that graph's broadcastable regions."""
    skipped: Mapping[str, str]
    """Sites not broadcast, and why."""
    variants: Mapping[Hashable, Mapping[frozenset[str], VariantGraph]]
    """Graph key -> reuse pattern -> variant, for every pattern of ``schedule.patterns()``."""

    @property
    def records(self) -> list[PassRecord]:
        """Every specialization's record, graph by graph."""
        return [v.record for by_reuse in self.variants.values() for v in by_reuse.values()]


def find_graph_regions(
    graphs: Mapping[Hashable, torch.fx.GraphModule],
    config: PABConfig,
    ctx: PassContext,
    *,
    side_outputs: Mapping[Hashable, Collection[torch.fx.Node]] | None = None,
) -> tuple[PABSchedule, dict[Hashable, tuple[PABRegion, ...]], dict[str, str]]:
    """The schedule (kinds some graph has regions of), each graph's regions, and the sites
    not broadcast and why. ``side_outputs``: per graph, see ``region_outputs``."""
    schedule = PABSchedule.from_config(config)
    regions: dict[Hashable, tuple[PABRegion, ...]] = {}
    skipped: dict[str, str] = {}
    for key, gm in graphs.items():
        found, why = find_pab_regions(
            gm.graph, ctx.sites, mlp=config.mlp_range is not None, side_outputs=(side_outputs or {}).get(key, ())
        )
        # Kinds with range None or 1 compute on every call: nothing to specialize or cache.
        regions[key] = tuple(r for r in found if r.kind in schedule.rules)
        for site, reason in why.items():
            skipped.setdefault(site, reason)
    schedule = schedule.only(r.kind for found in regions.values() for r in found)
    if not any(regions.values()):
        names = ", ".join(type(gm).__name__ for gm in graphs.values())
        log.warning("PAB: no attention site of %s is broadcastable (%s)", names, skipped or "no sites")
    return schedule, regions, skipped


def specialize_graphs(
    graphs: Mapping[Hashable, torch.fx.GraphModule],
    ctx: PassContext,
    config: PABConfig,
    *,
    side_outputs: Mapping[Hashable, Collection[torch.fx.Node]] | None = None,
    after: Sequence[str] = (),
) -> PABGraphs:
    """Regions of ``graphs`` and their variants for every pattern the schedule can need.

    ``after`` names the passes that made ``graphs`` (for the runner's error message).
    """
    schedule, regions, skipped = find_graph_regions(graphs, config, ctx, side_outputs=side_outputs)
    cached = frozenset(schedule.rules)
    variants: dict[Hashable, dict[frozenset[str], VariantGraph]] = {}
    for key, gm in graphs.items():
        base = flat_copy(gm)
        variants[key] = {}
        for reuse in schedule.patterns():
            spec = PABSpecialize(regions=regions[key], reuse=reuse, cache=cached)
            name = variant_name(reuse)
            label = name if len(graphs) == 1 else f"{key} {name}"
            result, record = run_pass(spec, flat_copy(base), ctx, after=after, graph=label)
            variants[key][reuse] = VariantGraph(
                name=name, reuse=reuse, gm=result.gm, cache_inputs=spec.cache_inputs(),
                cache_outputs=spec.cache_outputs(), record=record,
            )
    return PABGraphs(schedule=schedule, regions=regions, skipped=skipped, variants=variants)
