"""Pyramid Attention Broadcast at run time: per-call state, the reuse decision, the caches.

The schedule (``vdopt.passes.pab.schedule``) says which PAB kinds reuse on the i-th call of
a slot at timestep t. Decisions depend on (i, t) only, so every rank of a mesh takes the
same one.

State is kept per call *slot* within a step. A pipeline that calls the model twice per step
(cond then uncond at the same timestep) gets two slots, each with its own call counter and
caches; diffusers' hook keys its state per module only and so mixes them. A call whose
timestep equals the previous call's is the next slot of the same step; a lower timestep
starts the next step at slot 0; a higher one starts a new generation (as ``reset()`` does).

Every variant graph is specialized when the plan is built (``vdopt.passes.pab.variants``,
through the pass runner); here ``PABState`` takes the decision once per call and moves the
caches in and out of the variants; ``PABProgram`` runs one graph per call with it, and
PipeFusion (``vdopt.runtime.pipefusion``) runs its stage graphs with it (the whole latent,
or one graph per patch, each with its own caches).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
from torch.utils import _pytree as pytree

from vdopt.compile import compile_graph, compile_summary, is_flat_tuple, kwargs_leaf_names
from vdopt.passes.pab.regions import PAB_KINDS, PABRegion
from vdopt.passes.pab.schedule import PABSchedule, variant_name
from vdopt.passes.pab.variants import PABGraphs, VariantGraph
from vdopt.passes.runner import PassRecord
from vdopt.runtime.failures import Step, graph_step

log = logging.getLogger(__name__)

TIMESTEP_ARG = "timestep"
"""The model argument the timestep is read from."""

MAIN_GRAPH = "main"
"""Key of the one graph ``PABProgram`` runs (``PABState`` keys caches per graph)."""


def read_timestep(inputs: Mapping[str, Any], arg: str = TIMESTEP_ARG) -> float:
    """The call's timestep: the largest value of its ``timestep`` argument.

    With batched CFG every entry is the same t; with per-token timesteps (conditioning
    frames at 0) the largest entry is the step's t.
    """
    if arg not in inputs or inputs[arg] is None:
        raise ValueError(
            f"PAB reads the timestep from the model's `{arg}` argument, but this call has "
            f"none (arguments: {sorted(inputs)}); pass the timestep as `{arg}=...` or disable PAB"
        )
    value = inputs[arg]
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return float(value)
        return float(value.detach().max()) if value.numel() else 0.0
    return float(value)


# -- per-call state --------------------------------------------------------------------------

@dataclasses.dataclass
class SlotState:
    """State of one call slot (e.g. the cond or the uncond call of every step)."""

    calls: int = 0
    """Calls of this slot since reset (the rule's i)."""
    cache: dict[Hashable, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    """Graph key -> cache key (``PABRegion.cache_keys``) -> the region's output at its last
    computation in that graph."""


class StepTracker:
    """Maps each call to its slot from the timesteps: equal t = next slot, lower = next step,
    higher = new generation."""

    def __init__(self) -> None:
        self.last_timestep: float | None = None
        self.slot = 0

    def advance(self, timestep: float) -> tuple[int, bool]:
        """``(slot, new_generation)`` of a call at ``timestep``."""
        new_generation = self.last_timestep is None or timestep > self.last_timestep
        if new_generation or timestep < self.last_timestep:
            self.slot = 0
        else:
            self.slot += 1
        self.last_timestep = timestep
        return self.slot, new_generation

    def reset(self) -> None:
        self.last_timestep = None
        self.slot = 0


# -- variants --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """The executable for one pattern of reused kinds."""

    name: str
    """``compute_all`` or ``reuse_<kinds>``."""
    reuse: frozenset[str]
    """PAB kinds read from the cache."""
    run: Callable[..., Sequence[Any]]
    """``run(*input_leaves, *cache_inputs) -> (*output_leaves, *cache_outputs)``."""
    cache_inputs: tuple[str, ...]
    """Cache keys of the extra inputs, in order."""
    cache_outputs: tuple[str, ...]
    """Cache keys of the extra outputs, in order."""
    graph: torch.fx.GraphModule | None = None
    """The specialized graph (None for a variant loaded from an artifact)."""
    record: PassRecord | None = None
    """What the specialization did (removed nodes, linears, attention ops, collectives)."""

    @classmethod
    def runnable(cls, graph: VariantGraph, device: torch.device, *, compile: bool | None, name: str) -> Variant:
        """``graph`` run through ``vdopt.compile.compile_graph(enabled=compile)``."""
        return cls(
            name=graph.name, reuse=graph.reuse, run=compile_graph(graph.gm, device, enabled=compile, name=name),
            cache_inputs=graph.cache_inputs, cache_outputs=graph.cache_outputs, graph=graph.gm, record=graph.record,
        )


class PABState:
    """PAB's step state for a program that runs one or more graphs per call.

    The decision (which kinds reuse) is taken once per call, from the call slot and the
    timestep only, and holds for every graph the call runs; each graph keeps its own caches
    (a PipeFusion patch graph reuses its own rows). Counts are region calls: a region counts
    once per call, however many graphs (patches) of the call hold it.
    """

    def __init__(
        self,
        schedule: PABSchedule,
        regions: Mapping[Hashable, Sequence[PABRegion]],
        skipped: Mapping[str, str] | None = None,
    ) -> None:
        self.schedule = schedule
        self.regions = {key: tuple(found) for key, found in regions.items()}
        """Graph key -> that graph's broadcastable regions."""
        self.skipped = dict(skipped or {})
        self.slots: dict[int, SlotState] = {}
        self.counts = {k: {"computed": 0, "reused": 0} for k in PAB_KINDS}
        """Region calls per PAB kind since the state was built (not cleared by reset)."""
        self.variant_calls: dict[str, int] = {}
        """Calls per variant name (a pattern of reused kinds)."""
        self._kinds: dict[tuple[Hashable, ...], tuple[str, ...]] = {}
        """The PAB kind of each region of the graphs a call runs (one entry per region name)."""

    def decide(self, slot_index: int, timestep: float, graphs: Iterable[Hashable]) -> tuple[SlotState, frozenset[str]]:
        """The slot of a call and the kinds it reuses in every graph of ``graphs`` (those it runs)."""
        slot = self.slots.setdefault(slot_index, SlotState())
        reuse = self.schedule.reused(slot.calls, timestep)
        # Like diffusers' hook, never reuse an empty cache: e.g. PipeFusion's first pipelined
        # call has no patch caches yet, so it computes.
        graphs = list(graphs)
        return slot, frozenset(k for k in reuse if all(self._has_cache(slot, g, k) for g in graphs))

    def _has_cache(self, slot: SlotState, graph: Hashable, kind: str) -> bool:
        cache = slot.cache.get(graph, {})
        return all(key in cache for r in self.regions[graph] if r.kind == kind for key in r.cache_keys())

    def run(self, slot: SlotState, graph: Hashable, variant: Variant, leaves: Sequence[Any]) -> Sequence[Any]:
        """Runs ``graph``'s variant with its cache inputs, keeps its cache outputs, and returns
        the graph's own outputs."""
        cache = slot.cache.setdefault(graph, {})
        result = variant.run(*leaves, *(cache[key] for key in variant.cache_inputs))
        n_out = len(result) - len(variant.cache_outputs)
        cache.update(zip(variant.cache_outputs, result[n_out:]))
        return result[:n_out]

    def finish(self, slot: SlotState, reuse: frozenset[str], graphs: Iterable[Hashable]) -> None:
        """Ends a call that ran ``graphs``: advances its slot and counts its region calls."""
        slot.calls += 1
        graphs = tuple(graphs)
        kinds = self._kinds.get(graphs)
        if kinds is None:
            kinds = self._kinds[graphs] = tuple({r.name: r.kind for g in graphs for r in self.regions[g]}.values())
        for kind in kinds:
            self.counts[kind]["reused" if kind in reuse else "computed"] += 1
        name = variant_name(reuse)
        self.variant_calls[name] = self.variant_calls.get(name, 0) + 1

    def reset(self) -> None:
        """Start a new generation: clear every slot's counter and cache."""
        self.slots.clear()

    def cache_bytes(self) -> int:
        """Bytes of cached region outputs held now (all slots and graphs)."""
        return sum(
            t.numel() * t.element_size() for s in self.slots.values() for c in s.cache.values() for t in c.values()
        )

    def summary(self, variants: Iterable[Variant] = ()) -> dict[str, Any]:
        """Report lines: per kind regions and counts, sites left out, cache held, and the
        ``variants`` built (the first of each name shows what specializing removed)."""
        lines: dict[str, Any] = {}
        for kind in PAB_KINDS:
            sites = {r.name for found in self.regions.values() for r in found if r.kind == kind}
            if not sites:
                continue
            rule = self.schedule.rules.get(kind)
            c = self.counts[kind]
            how = f"range {rule.range}, window {rule.window}" if rule else "always computed"
            lines[f"pab {kind}"] = f"{len(sites)} regions ({how}): computed {c['computed']}, reused {c['reused']} region calls"
        if self.skipped:
            lines["pab not broadcast"] = "; ".join(f"{k} ({why})" for k, why in self.skipped.items())
        lines["pab cache held"] = f"{self.cache_bytes() / 2**20:.2f} MiB in {len(self.slots)} call slot(s)"
        variants = list(variants)
        first: dict[str, Variant] = {}
        for v in variants:
            first.setdefault(v.name, v)
        if first:
            parts = []
            for v in first.values():
                removed = {k: n for k, n in (v.record.stats if v.record else {}).items() if k.startswith("removed_") and n}
                parts.append(
                    f"{v.name} x{self.variant_calls.get(v.name, 0)}"
                    + (" (" + ", ".join(f"-{n} {k.removeprefix('removed_')}" for k, n in removed.items()) + ")" if removed else "")
                )
            lines["pab variants"] = "; ".join(parts)
            lines.update(compile_summary(v.run for v in variants))
        return lines


# -- the program -----------------------------------------------------------------------------

class PABProgram:
    """Runs a captured signature with PAB: picks the variant per call, keeps the caches."""

    def __init__(
        self,
        *,
        schedule: PABSchedule,
        regions: Sequence[PABRegion],
        variants: Mapping[frozenset[str], Variant],
        in_spec: pytree.TreeSpec | None,
        out_spec: pytree.TreeSpec | None,
        input_names: Sequence[str] = (),
        skipped: Mapping[str, str] | None = None,
    ) -> None:
        """Prefer ``build``; this form lets a loader plug in precompiled variants.

        Args:
            schedule: the per-kind rules.
            regions: broadcastable regions; only their kinds and cache keys are used here.
            variants: reuse pattern -> variant, for every pattern of ``schedule.patterns()``.
            in_spec / out_spec: the captured graph's pytree specs (``None``: inputs are passed
                flat in ``input_names`` order and the output leaves are returned as a tuple).
            skipped: sites not broadcast and why (for the report).
        """
        self.schedule = schedule
        self.regions = tuple(regions)
        self._variants = dict(variants)
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.input_names = tuple(input_names)
        self._keys = kwargs_leaf_names(in_spec)
        self._flat_output = is_flat_tuple(out_spec)
        self.tracker = StepTracker()
        self.state = PABState(schedule, {MAIN_GRAPH: self.regions}, skipped)
        # the step of each variant, its collectives' groups found once (loaded variants: unknown)
        self._steps = {
            reuse: graph_step(f"PAB variant {v.name}", v.graph) if v.graph is not None
            else Step(what=f"PAB variant {v.name}")
            for reuse, v in self._variants.items()
        }
        self.step = Step(what="no call yet")
        """What the program runs now (for errors raised during a call)."""

    @property
    def slots(self) -> dict[int, SlotState]:
        return self.state.slots

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Region calls per PAB kind since the program was built (not cleared by reset)."""
        return self.state.counts

    @property
    def skipped(self) -> dict[str, str]:
        return self.state.skipped

    @classmethod
    def build(
        cls, gm: torch.fx.GraphModule, graphs: PABGraphs, device: torch.device, *, compile: bool | None = None
    ) -> PABProgram:
        """PAB over the final per-rank graph ``gm``, whose variants ``graphs`` holds (its one
        graph keyed ``MAIN_GRAPH``); each runs through ``compile_graph(enabled=compile)``."""
        info = getattr(gm.graph._codegen, "pytree_info", None)
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        variants = {
            reuse: Variant.runnable(v, device, compile=compile, name=f"pab {v.name}")
            for reuse, v in graphs.variants[MAIN_GRAPH].items()
        }
        return cls(
            schedule=graphs.schedule, regions=graphs.regions[MAIN_GRAPH], variants=variants,
            in_spec=info.in_spec if info else None, out_spec=info.out_spec if info else None,
            input_names=names, skipped=graphs.skipped,
        )

    # -- running ---------------------------------------------------------------------------
    def _flatten(self, inputs: dict[str, Any]) -> list[Any]:
        if self._keys is not None:
            return [inputs[name] for name in self._keys]
        if self.in_spec is not None:
            return list(fx_pytree.tree_flatten_spec(([], dict(inputs)), self.in_spec))
        return [inputs[name] for name in self.input_names]

    def _unflatten(self, leaves: Sequence[Any]) -> Any:
        if self.out_spec is not None and not self._flat_output:
            return pytree.tree_unflatten(list(leaves), self.out_spec)
        return tuple(leaves)

    def decide(self, timestep: float) -> tuple[SlotState, frozenset[str]]:
        """Advance the step state for a call at ``timestep``: its slot and the kinds it reuses."""
        slot_index, new_generation = self.tracker.advance(timestep)
        if new_generation:
            self.state.reset()
        return self.state.decide(slot_index, timestep, [MAIN_GRAPH])

    def __call__(self, inputs: dict[str, Any]) -> Any:
        slot, reuse = self.decide(read_timestep(inputs))
        variant = self._variants[reuse]
        self.step = self._steps[reuse]
        outputs = self.state.run(slot, MAIN_GRAPH, variant, self._flatten(inputs))
        self.state.finish(slot, reuse, [MAIN_GRAPH])
        return self._unflatten(outputs)

    def reset(self) -> None:
        """Start a new generation: clear every slot's counter and cache."""
        self.tracker.reset()
        self.state.reset()

    # -- introspection and export -----------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of cached region outputs held now (all slots)."""
        return self.state.cache_bytes()

    def variants(self) -> dict[str, torch.fx.GraphModule]:
        """Specialized graphs by variant name, one per pattern the schedule can need.

        Each is flat: ``gm(*input_leaves, *cache_inputs) -> (*output_leaves, *cache_outputs)``
        with the cache keys listed per variant in ``schedule_spec()``.
        """
        out = {}
        for v in self._variants.values():
            assert v.graph is not None, "this program's variants were loaded, not built"
            out[v.name] = v.graph
        return out

    def schedule_spec(self) -> dict[str, Any]:
        """JSON-serializable description of the schedule, regions and variant signatures."""
        variants = {
            v.name: {
                "reuse": sorted(v.reuse, key=PAB_KINDS.index),
                "cache_inputs": list(v.cache_inputs),
                "cache_outputs": list(v.cache_outputs),
            }
            for v in self._variants.values()
        }
        return {
            "timestep_arg": TIMESTEP_ARG,
            "rules": self.schedule.as_dict(),
            "regions": [
                {"name": r.name, "kind": r.kind, "site_kind": r.site_kind, "cache_keys": list(r.cache_keys())}
                for r in self.regions
            ],
            "variants": variants,
            "in_spec": pytree.treespec_dumps(self.in_spec) if self.in_spec is not None else None,
            "out_spec": pytree.treespec_dumps(self.out_spec) if self.out_spec is not None else None,
            "input_names": list(self.input_names),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], runners: Mapping[str, Callable[..., Sequence[Any]]]) -> PABProgram:
        """A program over precompiled variants (e.g. AOTInductor packages), by variant name."""
        by_reuse: dict[frozenset[str], Variant] = {}
        for name, v in spec["variants"].items():
            if name not in runners:
                raise ValueError(f"PAB variant {name!r} has no runner; got {sorted(runners)}")
            reuse = frozenset(v["reuse"])
            by_reuse[reuse] = Variant(
                name=name, reuse=reuse, run=runners[name],
                cache_inputs=tuple(v["cache_inputs"]), cache_outputs=tuple(v["cache_outputs"]),
            )
        regions = [
            PABRegion(name=r["name"], kind=r["kind"], site_kind=r["site_kind"],
                      outputs=tuple(k for k in r["cache_keys"]), scope_nodes=0)
            for r in spec["regions"]
        ]
        loads = pytree.treespec_loads
        return cls(
            schedule=PABSchedule.from_dict(spec["rules"]), regions=regions, variants=by_reuse,
            in_spec=loads(spec["in_spec"]) if spec.get("in_spec") else None,
            out_spec=loads(spec["out_spec"]) if spec.get("out_spec") else None,
            input_names=spec.get("input_names", ()),
        )

    def summary(self) -> dict[str, Any]:
        return self.state.summary(self._variants.values())
