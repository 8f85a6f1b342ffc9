"""CFG parallelism: the cond/uncond halves of a batched classifier-free-guidance call on two ranks.

Every batch-major input (dim 0 equal to the call's batch) is cut to this rank's half right
at the graph's entry; the halves flow through the whole model (``ShardPropagator`` rewrites
the batch sizes baked into reshapes) and the outputs are all-gathered along the batch on the
``cfg`` axis, so every rank returns the full batch.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx

from vdopt import meta
from vdopt.collectives import comm_stats, records
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.dims.propagation import ShardPropagator
from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape, Split
from vdopt.passes.graph_utils import eliminate_dead_code


def find_batch_inputs(graph: torch.fx.Graph, batch: int) -> list[torch.fx.Node]:
    """Tensor inputs whose leading dim is the batch."""
    found = []
    for p in graph.find_nodes(op="placeholder"):
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and int(val.shape[0]) == batch:
            found.append(p)
    return found


def latent_batch(graph: torch.fx.Graph) -> int | None:
    """Leading dim of the largest floating point input (the latent), when analysis found no grid."""
    vals = [p.meta.get("val") for p in graph.find_nodes(op="placeholder")]
    vals = [v for v in vals if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2]
    return int(max(vals, key=lambda v: v.numel()).shape[0]) if vals else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CFGParallel:
    """Split the batch of a call over the ``cfg`` mesh axis; see the module doc."""

    name: ClassVar[str] = "cfg_parallel"
    tier: ClassVar[str] = "exact"

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        mesh = ctx.mesh
        group = mesh.axis_groups(ctx.device)["cfg"]
        batch = ctx.layout.batch if ctx.layout is not None else latent_batch(gm.graph)
        if batch is None or batch % group.size:
            raise ValueError(
                f"Mesh({mesh.describe()}): CFG parallel splits a call's batch into its cond and uncond "
                f"halves, but this call has batch {batch}: call the model with both halves in one "
                "batch (batch 2), or use cfg=1"
            )
        split = Split.balanced(batch, (group,))
        prop = ShardPropagator(gm, created_by=self.name)
        inputs = find_batch_inputs(gm.graph, batch)
        for p in inputs:
            shape = tuple(int(s) for s in p.meta["val"].shape)
            layout = ShardedShape((Dim((Factor("B", batch, split),)),) + tuple(Dim.plain(s) for s in shape[1:]))
            # the export guards check the caller's full inputs
            prop.shard(p, layout, skip=lambda u: u.op == "call_module")
        prop.run()
        eliminate_dead_code(gm.graph)
        comms = records(n for n in gm.graph.nodes if n.meta.get(meta.CREATED_BY) == self.name)
        stats = {
            "inputs_split": len(inputs),
            **comm_stats(comms),
            "gathers": prop.counts["gathers"],
            "per_site": {s.name: f"cfg (batch {split.length} of {batch})" for s in ctx.sites},
        }
        return PassResult(gm=gm, modified=bool(inputs), stats=stats)
