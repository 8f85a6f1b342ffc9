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

What is approximate: pipelined calls (by design). Called step by step (``opt(...)``), the
pipeline is filled and drained within each call, since the scheduler step between calls is
outside the model: a bubble of (N-1)/(M+N-1) per call.

Across steps (``opt.denoise(latents, timesteps, update, ...)``, ``PipeFusionProgram.denoise``)
the program owns the loop, as xDiT does, and the pipeline stays full: the last stage applies
the update to a patch's region of the latent as soon as that patch leaves the epilogue and
sends the region to the other stages, so stage 0 starts patch 0 of step s+1 while the later
stages still work on step s. The pipeline fills and drains once per generation. Every patch
sees the same K/V as in the step-by-step loop (fresh for the patches before it in this step,
one step stale for the others), so both loops give the same latents; the per-call path stays
as it is. This needs what xDiT's loop needs: an ``update`` that acts per latent element
(Euler and flow-matching steps do), and a prologue and epilogue that act per patch (patch
embedding, per-token norms and projections, unpatchify). Both are checked once per
generation by probing with NaN (the region of the latent each patch feeds and reads must be
disjoint and cover the latent); where a check fails, or with PAB or other mesh axes, the
loop runs step by step with a warning. The cost: prologue and epilogue run once per patch
rather than once per step.
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
    body_out: list[Any] | None = None
    """Last stage: the stage's outputs on the whole latent at the last call (what the
    epilogue read); the loop across steps writes each patch's outputs into it."""


REGION_TAG = 1
"""Point-to-point tag of the latent regions the last stage sends in ``denoise`` (activations
between stages use the default tag 0)."""


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
    other_axes: tuple[str, ...] = ()
    """Mesh axes besides pipefusion with a degree above 1 (collectives inside the stages)."""

    @classmethod
    def of(cls, mesh: Mesh, device: torch.device) -> StagePeers:
        other_axes = tuple(a for a, d in mesh.degrees.items() if d > 1 and a != "pipefusion")
        if mesh.pipefusion == 1:
            # one stage: the patches run one after another on this device
            return cls(group=None, group_name="", ranks=(0,), stage=0, other_axes=other_axes)
        from torch.distributed.distributed_c10d import _resolve_process_group

        axis = mesh.axis_groups(device)["pipefusion"]
        me = mesh.coordinates(dist.get_rank())
        ranks = tuple(mesh.rank_of({**me, "pipefusion": i}) for i in range(axis.size))
        return cls(group=_resolve_process_group(axis.group_name), group_name=axis.group_name, ranks=ranks,
                   stage=axis.rank, other_axes=other_axes)


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
        self.loops = {"across_steps": 0, "step_by_step": 0}
        """``denoise`` generations by how they ran (the pipeline full across steps, or not)."""
        self._checked_regions: tuple[torch.Tensor, bool, bool] | None = None
        """The latent regions of the last ``denoise``, whether the prologue acts per region and
        whether this stage's graphs read no latent (the costly check, patch graph runs, is made
        once per regions)."""
        self._latent_free = False
        """This stage's graphs read nothing of the latent (a later stage): in ``denoise`` its
        prologue runs once per step and it waits for no latent region."""
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
            if last:
                slot.body_out = stage_out
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
        return self._unflatten(leaves)

    # -- a whole generation, the pipeline full across steps ----------------------------------
    def denoise(
        self,
        inputs: dict[str, Any],
        latent_arg: str,
        timesteps: Sequence[Any],
        update: Callable[[int, torch.Tensor, Any], torch.Tensor],
    ) -> torch.Tensor:
        """The final latent of the loop ``x = update(s, x, model(latent_arg=x, timestep=t_s))``.

        The first ``warmup_steps`` steps (at least one, which fills the K/V caches) run as
        calls; the others run with the pipeline full across steps (module docstring). Every
        rank returns the full final latent. Starts a new generation (like ``reset()``).
        """
        self.reset()
        try:
            return self._denoise(inputs, latent_arg, timesteps, update)
        finally:
            self.tracker.reset()  # the generation is over: the next call starts a new one

    def _denoise(
        self, inputs: dict[str, Any], latent_arg: str, timesteps: Sequence[Any], update: Callable
    ) -> torch.Tensor:
        x = inputs[latent_arg]
        steps = len(timesteps)
        warm = min(steps, max(1, self.config.warmup_steps))
        for s in range(warm):
            x = update(s, x, self({**inputs, latent_arg: x, "timestep": timesteps[s]}))
        if warm == steps:
            return x
        slot = self.slots[0]
        regions = self._latent_regions({**inputs, latent_arg: x, "timestep": timesteps[warm]}, latent_arg, slot, update, warm)
        self.loops["step_by_step" if regions is None else "across_steps"] += 1
        if regions is None:
            for s in range(warm, steps):
                x = update(s, x, self({**inputs, latent_arg: x, "timestep": timesteps[s]}))
            return x
        return self._across_steps(inputs, latent_arg, timesteps, update, warm, slot, x, regions)

    def _latent_regions(
        self, inputs: dict[str, Any], latent_arg: str, slot: _Slot, update: Callable, step: int
    ) -> list[torch.Tensor] | None:
        """Per patch, the mask of the latent elements it feeds and updates; None (with a
        warning, on every rank) when the loop cannot run across steps.

        The last stage finds the masks: patch i's body outputs set to NaN, the epilogue and
        ``update`` mark the elements that patch updates; they must be disjoint and cover the
        latent, and ``update`` on a latent that is NaN outside mask i must be finite inside it.
        Every stage then checks that its patch graph i, on a latent that is NaN outside mask i,
        gives finite outputs (the prologue acts per patch).
        """
        why = None
        if self.pab is not None:
            why = "PAB decides per call"
        elif self.peers.other_axes:
            why = f"mesh axes {', '.join(self.peers.other_axes)} besides pipefusion"
        elif not self.graphs.patches:
            why = "the patch rewrite is disabled"
        if why is not None:
            log.warning("PipeFusion runs the loop step by step (%s)", why)
            return None
        x = inputs[latent_arg]
        first, last = self.stage == 0, self.stage == self.stages - 1
        g = self.graphs
        region = torch.full(x.shape, -1, dtype=torch.int64, device=x.device)
        if last:
            flat = list(fx_pytree.tree_flatten_spec(([], dict(inputs)), self.in_spec))
            prepared = list(self._prepare(*flat))
            post_prepared = prepared[len(prepared) - g.post_prepared :] if g.post_prepared else []
            extent, start = self.figures["extent"], 0
            for i, pg in enumerate(g.patches):
                length = self.figures["sizes"][i]
                probe = [t.clone() if isinstance(t, torch.Tensor) else t for t in slot.body_out]
                out_node = next(n for n in reversed(pg.gm.graph.nodes) if n.op == "output")
                for k, (value, pd) in enumerate(zip(out_node.args[0], pg.output_dims)):
                    if isinstance(pd, PatchDim) and probe[k].is_floating_point():
                        nan = torch.full(tuple(value.meta["val"].shape), float("nan"), dtype=probe[k].dtype, device=x.device)
                        write_patch(probe[k], nan, pd, extent, start, length)
                start += length
                out = self._unflatten(list(self._post(*probe, *post_prepared)))
                marked = torch.isnan(update(step, x, out)) & ~torch.isnan(x)
                overlap = marked & (region >= 0)
                region[marked] = i
                if overlap.any() or not marked.any():
                    region.fill_(-2)  # not a partition
                    break
            if (region == -1).any():
                region.fill_(-2)
            if not bool((region < 0).any()):
                # ... and a region's update must read the latent inside that region only
                out = self._unflatten(list(self._post(*slot.body_out, *post_prepared)))
                for i in range(len(g.patches)):
                    inside = region == i
                    if torch.isnan(update(step, x.masked_fill(~inside, float("nan")), out)[inside]).any():
                        region.fill_(-2)
                        break
        if self.stages > 1:
            dist.broadcast(region, src=self.peers.ranks[-1], group=self.peers.group)
        ok = not bool((region < 0).any())
        masks = [region == i for i in range(len(g.patches))] if ok else []
        checked = self._checked_regions
        latent_free = not first
        if ok and checked is not None and checked[0].shape == region.shape and torch.equal(checked[0], region):
            ok, latent_free = checked[1], checked[2]  # checked for these regions (the same verdict on every rank)
        elif ok:
            # the prologue: patch i's graph must not read the latent outside mask i; a later
            # stage whose graphs read no latent at all runs the prologue once per step
            for i, pg in enumerate(g.patches):
                acts = [] if first else [torch.zeros(shape, dtype=dtype, device=x.device) for shape, dtype in self._recv_specs(pg)]
                probes = [x.masked_fill(~masks[i], float("nan"))]
                if latent_free:
                    probes.insert(0, torch.full_like(x, float("nan")))
                for probe_x in probes:
                    flat = list(fx_pytree.tree_flatten_spec(([], {**inputs, latent_arg: probe_x}), self.in_spec))
                    prepared = list(self._prepare(*flat))
                    body_prepared = prepared[: len(prepared) - g.post_prepared]
                    outs = self._stage_runs[patch_key(i)](*acts, *body_prepared, *slot.kv)
                    finite = not any(isinstance(t, torch.Tensor) and t.is_floating_point() and torch.isnan(t).any()
                                     for t in outs)
                    if finite:
                        break  # the first probe reads nothing of the latent: the second holds too
                    if probe_x is probes[0] and len(probes) == 2:
                        latent_free = False
                    else:
                        ok = False
                if not ok:
                    break
            if self.stages > 1:
                flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.peers.group)
                ok = bool(flag.item())
            self._checked_regions = (region, ok, latent_free)
        if not ok:
            log.warning(
                "PipeFusion runs the loop step by step: the update or the model's prologue/epilogue do not act "
                "per patch of the latent (each patch's region must be disjoint and its own inputs only)"
            )
            return None
        self._latent_free = latent_free
        return masks

    def _across_steps(
        self, inputs: dict[str, Any], latent_arg: str, timesteps: Sequence[Any], update: Callable,
        warm: int, slot: _Slot, x: torch.Tensor, masks: list[torch.Tensor],
    ) -> torch.Tensor:
        """Steps ``warm..`` with the pipeline full across steps (``denoise``)."""
        g = self.graphs
        first, last = self.stage == 0, self.stage == self.stages - 1
        x = x.clone()
        device = x.device
        others = [r for r in self.peers.ranks if r != self.peers.ranks[-1]]
        extent = self.figures["extent"]
        starts = [sum(self.figures["sizes"][:i]) for i in range(len(g.patches))]
        pending: list = []
        older: list = []  # sends of the step before: waited at the end of this one
        regions_in: list = []  # this rank's receives of the next step's latent regions
        steps = len(timesteps)
        for s in range(warm, steps):
            self.counts["pipelined"] += 1
            self.steps += 1
            received = []
            if not first:
                received = [self._irecv(self._recv_specs(pg), device) for pg in g.patches]
            next_regions = []
            if not last and s + 1 < steps:
                # sent by the last stage while it finishes this step
                src = self.peers.ranks[-1]
                for m in masks:
                    buf = torch.empty(int(m.sum()), dtype=x.dtype, device=device)
                    next_regions.append((buf, dist.irecv(buf, src=src, group=self.peers.group, tag=REGION_TAG)))
            step_inputs = {**inputs, "timestep": timesteps[s]}
            prepared = None
            for i, pg in enumerate(g.patches):
                if regions_in and not self._latent_free:
                    x[masks[i]] = self._wait(*regions_in[i])
                if prepared is None or not self._latent_free:
                    flat = list(fx_pytree.tree_flatten_spec(([], {**step_inputs, latent_arg: x}), self.in_spec))
                    self.step = self._steps["prepare"]
                    prepared = list(self._prepare(*flat))
                post_prepared = prepared[len(prepared) - g.post_prepared :] if g.post_prepared else []
                body_prepared = prepared[: len(prepared) - g.post_prepared]
                acts = [self._wait(b, w) for b, w in received[i]] if not first else []
                outs = self._run_stage_graph(patch_key(i), pg, None, [*acts, *body_prepared, *slot.kv])
                n_out = len(outs) - 2 * len(pg.cache_sites)
                slot.kv = outs[n_out:]
                stage_out = outs[:n_out]
                if not last:
                    self.step = self._send_step
                    self._isend(stage_out, pending)
                    continue
                slot.body_out = self._assemble(slot.body_out, stage_out, pg.output_dims, g.exact, extent,
                                               starts[i], self.figures["sizes"][i])
                self.step = self._steps["post"]
                out = self._unflatten(list(self._post(*slot.body_out, *post_prepared)))
                fresh = update(s, x, out)[masks[i]]
                x[masks[i]] = fresh
                if s + 1 < steps:
                    self.step = self._send_step
                    for dst in others:
                        pending.append((fresh, dist.isend(fresh, dst=dst, group=self.peers.group, tag=REGION_TAG)))
            if regions_in and self._latent_free:
                for i, (buf, work) in enumerate(regions_in):
                    x[masks[i]] = self._wait(buf, work)
            regions_in = next_regions
            # their receivers posted them a step ago: this frees the buffers without a drain
            self.step = self._send_step
            for _, work in older:
                work.wait()
            older, pending = pending, []
        for _, work in older:
            work.wait()
        if self.stages > 1:
            self.step = self._broadcast_step
            dist.broadcast(x, src=self.peers.ranks[-1], group=self.peers.group)
        return x

    def _unflatten(self, leaves: list[Any]) -> Any:
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
        if any(self.loops.values()):
            lines["pipefusion denoise"] = (f"{self.loops['across_steps']} generation(s) with the pipeline full across "
                                           f"steps, {self.loops['step_by_step']} step by step")
        if self.pab is not None:
            lines.update(self.pab.summary())
        runners = [self._prepare, *self._stage_runs.values()] + ([self._post] if self._post is not None else [])
        lines.update(compile_summary(runners))
        return lines
