"""When each PAB kind reuses its cache: the schedule, as data.

The rule is diffusers' ``PyramidAttentionBroadcastHook``: on the i-th call since reset, with
timestep t, a region of PAB kind k computes when ``i == 0``, or t is not strictly inside k's
window, or ``i % range_k == 0``; otherwise it returns the output cached at its last
computation. ``patterns()`` lists every set of reused kinds some call can need, so the
variant graphs are all specialized when the plan is built; the runtime takes the decision
per call (``vdopt.runtime.pab``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from vdopt.config import PABConfig
from vdopt.passes.pab.regions import PAB_KINDS


@dataclasses.dataclass(frozen=True, kw_only=True)
class KindRule:
    """When regions of one PAB kind compute."""

    range: int
    """Compute on every ``range``-th call of a slot (and reuse in between)."""
    window: tuple[float, float]
    """Reuse is allowed only for timesteps strictly inside this open interval."""

    def computes(self, index: int, timestep: float) -> bool:
        """Whether the ``index``-th call since reset (0-based) at ``timestep`` computes."""
        low, high = self.window
        return index == 0 or not (low < timestep < high) or index % self.range == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PABSchedule:
    """The rule of every PAB kind that can reuse (range > 1); other kinds always compute."""

    rules: Mapping[str, KindRule]
    """PAB kind -> rule, for the kinds that may reuse."""

    @classmethod
    def from_config(cls, config: PABConfig) -> PABSchedule:
        settings = {
            "spatial": (config.spatial_range, config.spatial_window),
            "temporal": (config.temporal_range, config.temporal_window),
            "cross": (config.cross_range, config.cross_window),
            "mlp": (config.mlp_range, config.mlp_window),
        }
        rules = {
            kind: KindRule(range=r, window=(float(w[0]), float(w[1])))
            for kind, (r, w) in settings.items()
            if r is not None and r > 1  # range 1 computes every call: nothing to cache
        }
        return cls(rules=MappingProxyType(rules))

    def only(self, kinds: Iterable[str]) -> PABSchedule:
        """The schedule restricted to ``kinds`` (those the model has regions of)."""
        kinds = set(kinds)
        return PABSchedule(rules=MappingProxyType({k: r for k, r in self.rules.items() if k in kinds}))

    def reused(self, index: int, timestep: float) -> frozenset[str]:
        """PAB kinds that reuse their cache on the ``index``-th call of a slot at ``timestep``."""
        return frozenset(k for k, rule in self.rules.items() if not rule.computes(index, timestep))

    def patterns(self) -> list[frozenset[str]]:
        """Every set of reused kinds some call can need, compute-everything first.

        The decision depends on ``index % range`` (periodic with the ranges' lcm) and on which
        windows hold t (constant between window ends), so trying those points is exhaustive.
        """
        ends = sorted({e for rule in self.rules.values() for e in rule.window})
        probes = set(ends)
        probes.update((a + b) / 2 for a, b in itertools.pairwise(ends))
        if ends:
            probes.update((ends[0] - 1, ends[-1] + 1))
        period = math.lcm(*(rule.range for rule in self.rules.values())) if self.rules else 1
        found = {frozenset()}
        for t in probes:
            for index in range(1, period + 1):
                found.add(self.reused(index, t))
        return sorted(found, key=lambda p: (len(p), [PAB_KINDS.index(k) for k in sorted(p, key=PAB_KINDS.index)]))

    def as_dict(self) -> dict[str, Any]:
        return {k: {"range": r.range, "window": list(r.window)} for k, r in self.rules.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PABSchedule:
        rules = {k: KindRule(range=int(v["range"]), window=tuple(float(x) for x in v["window"])) for k, v in data.items()}
        return cls(rules=MappingProxyType(rules))


def variant_name(reuse: Iterable[str]) -> str:
    """``compute_all`` or ``reuse_<kinds>`` (kinds in ``PAB_KINDS`` order)."""
    kinds = sorted(reuse, key=PAB_KINDS.index)
    return "reuse_" + "_".join(kinds) if kinds else "compute_all"
