"""PipeFusion: displaced patch pipeline parallelism over the ``pipefusion`` mesh axis.

The graph, marked by ``StageSplit``, is cut into stages of consecutive blocks when the plan is
built (``vdopt.passes.pipefusion.stage_graphs``, through the pass runner); rank k of the
pipefusion group keeps stage k only (its blocks' parameters, the prologue its stage needs,
and on the last rank the epilogue). The latent tokens are split into M patches along one
axis of the token grid (H, else T, else W: the first with at least M entries). This module
holds what happens per call: the schedule, the K/V caches and the transfers between stages.

Per call (one denoising step, or one call slot of a step, e.g. cond and uncond):

* *exact* (the first ``warmup_steps`` steps): each stage runs on the whole latent, receives
  the activations from the previous stage, sends its own to the next, and fills its K/V
  cache (the K/V of every self-attention whose keys span the patched axis) with fresh values;
* *pipelined* (afterwards): patch i goes through the stages one after another, so stage k
  works on patch i while stage k+1 works on patch i-1. At each such attention the patch's
  fresh K/V replace its slot in the cache, and the patch attends to the cache: fresh K/V for
  patches already processed in this step, one-step-stale K/V for the others (xDiT's
  PipeFusion). Attention over an axis the patch keeps whole (Latte's temporal attention when
  patching along H) stays exact. Activations move between stages with ``isend``/``irecv``
  on the pipefusion group.

The last stage reassembles the patches, runs the epilogue and broadcasts the output, so every
rank returns the full output. Each rank keeps the K/V cache of its own layers only.

With PAB (``vdopt.runtime.pab``), each stage graph (the exact one, and each patch's) has a
variant per pattern of reused kinds, as the single-device graph has. A call takes one decision (from its
timestep and call slot, so the same on every rank) for every stage graph it runs; caches are
kept per call slot and per stage graph, so a patch replays its own rows. A reused attention
site with stale K/V still computes its K/V projections, since PipeFusion's K/V cache takes
them: that cache then holds this step's K/V as without PAB, and only the query, the attention
and the output projection are skipped.

What is approximate: pipelined calls (by design). What is not done: the pipeline is filled
and drained within each call (the scheduler step between calls is outside the model), so
there is a bubble of (N-1)/(M+N-1) per call, unlike xDiT which keeps the pipeline full across
steps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.fx._pytree as fx_pytree
from torch.utils import _pytree as pytree

from vdopt.compile import compile_graph, compile_summary
from vdopt.config import PipeFusionConfig
from vdopt.mesh import Mesh
from vdopt.passes.pab.variants import PABGraphs
from vdopt.passes.pipefusion.patches import PatchDim, PatchGraph, write_patch
from vdopt.passes.pipefusion.stage_graphs import EXACT_GRAPH, StageGraphs, patch_key
from vdopt.passes.pipefusion.stage_split import parameter_bytes
from vdopt.runtime.failures import Step, collective_groups
from vdopt.runtime.pab import PABState, SlotState, StepTracker, Variant, read_timestep

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slot:
    """K/V caches of one call slot (cond, uncond, ...)."""

    kv: list[torch.Tensor] | None = None


@dataclasses.dataclass(kw_only=True)
class StagePAB:
    """PAB over one rank's stage graphs: the shared decision and caches, and the variants of
    each stage graph by key (``EXACT_GRAPH``, ``patch_key(i)``)."""

    state: PABState
    """The decision per call and the caches, per call slot and stage graph."""
    variants: dict[str, dict[frozenset[str], Variant]]
    """Stage graph key -> reuse pattern -> runnable variant."""

    @classmethod
    def build(cls, graphs: PABGraphs, device: torch.device, *, compile: bool | None) -> StagePAB:
        variants = {
            key: {
                reuse: Variant.runnable(v, device, compile=compile, name=f"pab {key} {v.name}")
                for reuse, v in by_reuse.items()
            }
            for key, by_reuse in graphs.variants.items()
        }
        return cls(state=PABState(graphs.schedule, graphs.regions, graphs.skipped), variants=variants)

    def summary(self) -> dict[str, Any]:
        lines = {
            "pab stage graphs": f"{len(self.variants)} ({', '.join(self.variants)}); regions and counts of this "
            "stage, caches per call slot and stage graph",
        }
        lines.update(self.state.summary(v for by_reuse in self.variants.values() for v in by_reuse.values()))
        return lines


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagePeers:
    """Where this rank sits in the pipeline."""

    group: dist.ProcessGroup | None
    """The pipefusion process group (None with one stage)."""
    group_name: str
    """Its name (for error messages); empty with one stage."""
    ranks: tuple[int, ...]
    """Global rank of each stage, in stage order."""
    stage: int
    """This rank's stage."""

    @classmethod
    def of(cls, mesh: Mesh, device: torch.device) -> StagePeers:
        if mesh.pipefusion == 1:
            # one stage: the patches run one after another on this device
            return cls(group=None, group_name="", ranks=(0,), stage=0)
        from torch.distributed.distributed_c10d import _resolve_process_group

        axis = mesh.axis_groups(device)["pipefusion"]
        me = mesh.coordinates(dist.get_rank())
        ranks = tuple(mesh.rank_of({**me, "pipefusion": i}) for i in range(axis.size))
        return cls(group=_resolve_process_group(axis.group_name), group_name=axis.group_name, ranks=ranks, stage=axis.rank)


class PipeFusionProgram:
    """Runs one rank's stage of the pipeline; see the module docstring."""

    def __init__(
        self,
        graphs: StageGraphs,
        *,
        config: PipeFusionConfig,
        peers: StagePeers,
        in_spec: Any,
        out_spec: Any,
        output_metas: Sequence[Any],
        total_param_bytes: int,
        device: torch.device,
        compile: bool | None = None,
        pab: StagePAB | None = None,
    ) -> None:
        """Prefer ``build``. ``compile``: ``vdopt.compile.compile_graph``'s ``enabled`` for
        every stage graph (None: on CUDA only)."""
        assert graphs.stage == peers.stage, (graphs.stage, peers.stage)
        self.graphs = graphs
        self.config = config
        self.peers = peers
        self.stage = graphs.stage
        self.stages = len(peers.ranks)
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.output_metas = list(output_metas)
        self.figures = graphs.figures
        self.total_param_bytes = total_param_bytes
        self.tracker = StepTracker()
        self.steps = 0
        self.slots: dict[int, _Slot] = {}
        self.counts = {"exact": 0, "pipelined": 0}
        self.pab = pab
        """PAB over the stage graphs, or None."""

        def runner(gm: torch.fx.GraphModule, name: str) -> Callable[..., Any]:
            return compile_graph(gm, device, enabled=compile, name=f"stage {self.stage} {name}")

        self._prepare = runner(graphs.prepare, "prepare")
        self._post = runner(graphs.post, "post") if graphs.post is not None else None
        self._stage_runs = {key: runner(pg.gm, key) for key, pg in graphs.by_key().items()}
        where = f"PipeFusion stage {self.stage} of {self.stages}"
        # what each part waits on, found once: the stage graphs' own collectives (sequence
        # parallel inside a stage) and the pipefusion group for transfers between stages
        parts = {"prepare": graphs.prepare, **{key: pg.gm for key, pg in graphs.by_key().items()}}
        if graphs.post is not None:
            parts["post"] = graphs.post
        self._steps = {key: Step(what=f"{where}, {key} graph", groups=collective_groups(gm)) for key, gm in parts.items()}
        p2p = (peers.group_name,) if peers.group_name else ()
        self._recv_step = Step(what=f"{where}, receiving activations from rank {peers.ranks[self.stage - 1]}"
                               if self.stage > 0 else where, groups=p2p)
        self._send_step = Step(what=f"{where}, sending activations to rank {peers.ranks[self.stage + 1]}"
                               if self.stage + 1 < self.stages else where, groups=p2p)
        self._broadcast_step = Step(what=f"{where}, broadcasting the outputs from rank {peers.ranks[-1]}", groups=p2p)
        self.step = Step(what="no call yet")
        """What the program runs now (for errors raised during a call)."""

    @classmethod
    def build(
        cls,
        gm: torch.fx.GraphModule,
        graphs: StageGraphs,
        *,
        peers: StagePeers,
        device: torch.device,
        config: PipeFusionConfig,
        compile: bool | None = None,
        pab: PABGraphs | None = None,
    ) -> PipeFusionProgram:
        """The program over ``graphs`` (stage ``peers.stage`` of the marked graph ``gm``), with
        PAB over its stage graphs when ``pab`` holds their variants."""
        info = getattr(gm.graph._codegen, "pytree_info", None)
        output_node = next(iter(reversed(gm.graph.nodes)))
        metas = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in output_node.args[0]]
        return cls(
            graphs, config=config, peers=peers,
            in_spec=info.in_spec if info else None, out_spec=info.out_spec if info else None,
            output_metas=metas, total_param_bytes=parameter_bytes(gm), device=device, compile=compile,
            pab=StagePAB.build(pab, device, compile=compile) if pab is not None else None,
        )

    # -- communication ---------------------------------------------------------------------
    def _irecv(self, shapes_dtypes: Sequence[tuple[tuple[int, ...], torch.dtype]], device) -> list[tuple[torch.Tensor, Any]]:
        src = self.peers.ranks[self.stage - 1]
        out = []
        for shape, dtype in shapes_dtypes:
            buf = torch.empty(shape, dtype=dtype, device=device)
            out.append((buf, dist.irecv(buf, src=src, group=self.peers.group)))
        return out

    def _isend(self, tensors: Sequence[torch.Tensor], pending: list) -> None:
        dst = self.peers.ranks[self.stage + 1]
        for t in tensors:
            t = t.contiguous()
            pending.append((t, dist.isend(t, dst=dst, group=self.peers.group)))

    def _broadcast_outputs(self, leaves: list[Any] | None, device) -> list[Any]:
        if self.stages == 1:
            return leaves
        self.step = self._broadcast_step
        src = self.peers.ranks[-1]
        result = []
        for i, fake in enumerate(self.output_metas):
            if not isinstance(fake, torch.Tensor):
                result.append(fake if leaves is None else leaves[i])
                continue
            if leaves is not None:
                t = leaves[i].contiguous()
            else:
                t = torch.empty(tuple(fake.shape), dtype=fake.dtype, device=device)
            dist.broadcast(t, src=src, group=self.peers.group)
            result.append(t)
        return result

    def _wait(self, buf: torch.Tensor, work) -> torch.Tensor:
        self.step = self._recv_step
        work.wait()
        return buf

    # -- one call ----------------------------------------------------------------------------
    def __call__(self, inputs: dict[str, Any]) -> Any:
        if self.pab is not None:
            timestep = read_timestep(inputs)  # PAB needs it: a clear error when missing
        else:
            try:
                timestep = read_timestep(inputs)
            except ValueError:
                timestep = None
        if timestep is None:
            slot_index, new_generation = 0, False
            self.steps += 1
        else:
            slot_index, new_generation = self.tracker.advance(timestep)
            if new_generation:
                self.reset_state()
            if slot_index == 0:
                self.steps += 1
        slot = self.slots.setdefault(slot_index, _Slot())
        # no patch graphs (their rewrite disabled by name): every call is exact
        exact = self.steps <= self.config.warmup_steps or slot.kv is None or not self.graphs.patches
        if self.pab is None:
            return self.run(inputs, slot, exact=exact)
        graphs = [EXACT_GRAPH] if exact else [patch_key(i) for i in range(len(self.graphs.patches))]
        pab_slot, reuse = self.pab.state.decide(slot_index, timestep, graphs)
        out = self.run(inputs, slot, exact=exact, pab=(pab_slot, reuse))
        self.pab.state.finish(pab_slot, reuse, graphs)
        if not exact:  # a slot never runs exact again in this generation: free those caches
            pab_slot.cache.pop(EXACT_GRAPH, None)
        return out

    def run(
        self, inputs: dict[str, Any], slot: _Slot, *, exact: bool, pab: tuple[SlotState, frozenset[str]] | None = None
    ) -> Any:
        """One call: exact on the whole latent, or pipelined over the patches; with ``pab``
        (PAB's slot and reused kinds) the stage graphs run as PAB variants."""
        flat = list(fx_pytree.tree_flatten_spec(([], dict(inputs)), self.in_spec))
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))
        g = self.graphs
        self.step = self._steps["prepare"]
        prepared = list(self._prepare(*flat))
        post_prepared = prepared[len(prepared) - g.post_prepared :] if g.post_prepared else []
        body_prepared = prepared[: len(prepared) - g.post_prepared]
        first, last = self.stage == 0, self.stage == self.stages - 1
        pending: list = []
        if exact:
            self.counts["exact"] += 1
            graph = g.exact
            acts = []
            if not first:
                specs = self._recv_specs(graph)
                acts = [self._wait(b, w) for b, w in self._irecv(specs, device)]
            outs = self._run_stage_graph(EXACT_GRAPH, graph, pab, [*acts, *body_prepared])
            n_out = len(outs) - 2 * len(graph.cache_sites)
            slot.kv = [t.contiguous() for t in outs[n_out:]]
            stage_out = outs[:n_out]
            if not last:
                self.step = self._send_step
                self._isend(stage_out, pending)
        else:
            self.counts["pipelined"] += 1
            received = []
            if not first:
                # post every receive now: patch i+1 arrives while patch i computes
                received = [self._irecv(self._recv_specs(pg), device) for pg in g.patches]
            assembled: list[Any] | None = None
            extent = self.figures["extent"]
            start = 0
            for i, pg in enumerate(g.patches):
                acts = [self._wait(b, w) for b, w in received[i]] if not first else []
                outs = self._run_stage_graph(patch_key(i), pg, pab, [*acts, *body_prepared, *slot.kv])
                n_out = len(outs) - 2 * len(pg.cache_sites)
                slot.kv = outs[n_out:]
                stage_out = outs[:n_out]
                length = self.figures["sizes"][i]
                if not last:
                    self.step = self._send_step
                    self._isend(stage_out, pending)
                else:
                    assembled = self._assemble(assembled, stage_out, pg.output_dims, g.exact, extent, start, length)
                start += length
            stage_out = assembled
        leaves = None
        if last:
            self.step = self._steps["post"]
            leaves = list(self._post(*stage_out, *post_prepared))
        self.step = self._send_step
        for _, work in pending:
            work.wait()
        leaves = self._broadcast_outputs(leaves, device)
        if self.out_spec is not None:
            return pytree.tree_unflatten(leaves, self.out_spec)
        return tuple(leaves)

    def _run_stage_graph(
        self, key: str, pg: PatchGraph, pab: tuple[SlotState, frozenset[str]] | None, args: list[Any]
    ) -> list[Any]:
        """``pg``'s outputs and K/V, through its PAB variant when PAB decided this call."""
        self.step = self._steps[key]
        if pab is None or self.pab is None:
            return list(self._stage_runs[key](*args))
        pab_slot, reuse = pab
        return list(self.pab.state.run(pab_slot, key, self.pab.variants[key][reuse], args))

    def _recv_specs(self, pg: PatchGraph) -> list[tuple[tuple[int, ...], torch.dtype]]:
        placeholders = list(pg.gm.graph.find_nodes(op="placeholder"))[: self.graphs.received]
        return [(tuple(p.meta["val"].shape), p.meta["val"].dtype) for p in placeholders]

    @staticmethod
    def _assemble(assembled, outs, dims, exact: PatchGraph, extent: int, start: int, length: int) -> list[Any]:
        """Write patch outputs into whole-latent buffers (unpatched outputs: the last patch's)."""
        if assembled is None:
            out_node = next(iter(reversed(exact.gm.graph.nodes)))
            assembled = []
            for a, pd in zip(out_node.args[0], dims):
                val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
                if isinstance(pd, PatchDim) and isinstance(val, torch.Tensor):
                    assembled.append(torch.empty(tuple(val.shape), dtype=val.dtype, device=outs[0].device))
                else:
                    assembled.append(None)
        for i, (value, pd) in enumerate(zip(outs, dims)):
            if isinstance(pd, PatchDim):
                write_patch(assembled[i], value, pd, extent, start, length)
            else:
                assembled[i] = value
        return assembled

    # -- state and report --------------------------------------------------------------------
    def reset_state(self) -> None:
        self.slots.clear()
        self.steps = 0
        if self.pab is not None:
            self.pab.state.reset()

    def reset(self) -> None:
        self.tracker.reset()
        self.reset_state()

    def param_bytes(self) -> int:
        """Bytes of parameters this rank's graphs hold."""
        g = self.graphs
        modules = [g.prepare, g.exact.gm] + [p.gm for p in g.patches] + ([g.post] if g.post is not None else [])
        seen = {}
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.slots.values() for t in (s.kv or []))

    def summary(self) -> dict[str, Any]:
        f = self.figures
        mib = 1 / 2**20
        stage_params = f["stage_param_bytes"]
        held = self.param_bytes()
        ranges = "; ".join(
            f"{k}: {blocks[0]}..{blocks[-1]} ({len(blocks)} blocks, {b * mib:.2f} MiB)" if blocks else f"{k}: -"
            for k, (blocks, b) in enumerate(zip(f["stage_blocks"], stage_params))
        )
        lines = {
            "pipefusion": (
                f"{self.stages} stages, this rank runs stage {self.stage}; {self.config.patches} patches along "
                f"{f['axis']} (sizes {f['sizes']}); warmup {self.config.warmup_steps} exact steps"
            ),
            "pipefusion stages": ranges,
            "pipefusion parameters": (
                f"this rank holds {held * mib:.2f} MiB of the model's {self.total_param_bytes * mib:.2f} MiB "
                f"({held / max(1, self.total_param_bytes):.0%})"
            ),
            "pipefusion stale K/V sites": f"{len(f['stale_sites'])} on this stage ({', '.join(f['stale_sites']) or '-'})",
            "pipefusion calls": f"exact {self.counts['exact']}, pipelined {self.counts['pipelined']}; "
            f"K/V cache {self.cache_bytes() * mib:.2f} MiB",
        }
        if self.pab is not None:
            lines.update(self.pab.summary())
        runners = [self._prepare, *self._stage_runs.values()] + ([self._post] if self._post is not None else [])
        lines.update(compile_summary(runners))
        return lines
