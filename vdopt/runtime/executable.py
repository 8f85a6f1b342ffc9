"""The executable ``optimize`` returns: capture per input signature, rewrite, run.

One ``Plan`` exists per input signature (shapes, dtypes and non-tensor arguments). A plan
holds the rewritten graph(s) inside a ``Program``; a program runs one call and keeps step
state (PAB caches, pipeline buffers) until ``reset()``. Every graph of a plan is made by
passes through the runner (``build_program``); programs only run them. A collective that
fails during a call is re-raised as ``CollectiveError`` naming the call, the program's step
and the mesh group it waited on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vdopt.capture import bind_call, capture_guarded, needs_concrete_size
from vdopt.compile import EagerGraph, compile_graph, compile_summary, original_graph
from vdopt.config import PipeFusionConfig
from vdopt.mesh import Mesh
from vdopt.passes.analysis.attention import analyze
from vdopt.passes.base import PassContext
from vdopt.passes.order import PipelineOptions, build_pipeline, check_disabled
from vdopt.passes.parallel.skiparse import check_pipefusion
from vdopt.passes.pab.specialize import PABSpecialize
from vdopt.passes.pab.variants import specialize_graphs
from vdopt.passes.pipefusion.stage_cut import StageCut
from vdopt.passes.pipefusion.stage_graphs import build_stage_graphs, specialize_stage_graphs
from vdopt.passes.pipefusion.stage_split import StageSplit
from vdopt.passes.runner import PassError, PassRecord, run_passes
from vdopt.progress import progress
from vdopt.runtime.report import render_report
from vdopt.runtime.failures import Step, collective_error, graph_step, is_collective_failure
from vdopt.runtime.pab import MAIN_GRAPH, PABProgram
from vdopt.runtime.pipefusion import PipeFusionProgram, StagePeers
from vdopt.runtime.plan import Plan, Program
from vdopt.runtime.training import training_program

log = logging.getLogger(__name__)

# Captures of one input signature (data-dependent values changed) past which a warning says so.
_MANY_SPECIALIZATIONS = 8


class GraphProgram:
    """The plain program: one rewritten graph run on every call."""

    def __init__(self, gm: Callable[..., Any]) -> None:
        """``gm``: the graph, or a runner with its call convention (``compile_graph``'s, or loaded)."""
        self._run = gm
        graph = original_graph(gm)
        self.gm = graph if isinstance(gm, EagerGraph) else gm
        """The graph, or its compiled or loaded runner."""
        self.step = graph_step("graph main", graph) if isinstance(graph, torch.fx.GraphModule) else Step(what="graph main")
        """What the program runs (for errors raised during a call)."""

    def __call__(self, inputs: dict[str, Any]) -> Any:
        return self._run(**inputs)

    def reset(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return compile_summary([self._run])


def _pipefusion_program(
    gm: torch.fx.GraphModule, ctx: PassContext, options: PipelineOptions, disabled: Collection[str], after: list[str]
) -> tuple[Program, list[PassRecord]]:
    """This rank's stage of the marked graph, its patch graphs and (with PAB) their variants."""
    config = options.pipefusion or PipeFusionConfig()
    peers = StagePeers.of(ctx.mesh, ctx.device)
    graphs, records = build_stage_graphs(gm, ctx, config, peers.stage, disabled=disabled, after=after)
    pab = None
    if options.pab is not None and PABSpecialize.name not in disabled:
        ran = list(dict.fromkeys(after + [r.name for r in records]))
        pab = specialize_stage_graphs(graphs, ctx, options.pab, after=ran)
        records += pab.records
    program = PipeFusionProgram.build(
        gm, graphs, peers=peers, device=ctx.device, config=config, compile=options.compile, pab=pab
    )
    return program, records


def build_program(
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    options: PipelineOptions,
    *,
    disabled: Collection[str] = (),
    after: Sequence[str] = (),
) -> tuple[Program, list[PassRecord]]:
    """The program that runs a rewritten graph: plain, or with step state (PAB, PipeFusion).

    The graphs a feature derives from ``gm`` (PipeFusion's stage and patch graphs, PAB's
    variants) are made here by their passes, through the runner; their records are returned.
    A feature whose pass is disabled by name is off (with a warning).
    """
    after = list(after)
    if options.training:
        return training_program(gm, ctx, checkpoint_blocks=options.checkpoint_blocks), []
    if options.pab is not None and PABSpecialize.name in disabled:
        log.warning("PAB is off: its pass %s is disabled", PABSpecialize.name)
    if ctx.mesh.pipefusion > 1:
        if StageSplit.name in disabled or StageCut.name in disabled:
            # the markers (if any) copy: the whole graph runs on every rank, exactly
            log.warning("PipeFusion is off (pass %s or %s disabled): every rank runs every stage",
                        StageSplit.name, StageCut.name)
        else:
            return _pipefusion_program(gm, ctx, options, disabled, after)
    if options.pab is not None and PABSpecialize.name not in disabled:
        graphs = specialize_graphs({MAIN_GRAPH: gm}, ctx, options.pab, after=after)
        return PABProgram.build(gm, graphs, ctx.device, compile=options.compile), graphs.records
    return GraphProgram(compile_graph(gm, ctx.device, enabled=options.compile, name="main")), []


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type)
    try:
        hash(leaf)
        return ("const", type(leaf).__name__, leaf)
    except TypeError:
        return ("const", type(leaf).__name__, repr(leaf))


def input_key(inputs: dict[str, Any]) -> tuple:
    """Cache key of a call: structure, tensor shapes/dtypes/devices and non-tensor values."""
    leaves, spec = pytree.tree_flatten(inputs)
    return (str(spec), tuple(_leaf_key(x) for x in leaves))


class CallBinder:
    """``vdopt.capture.bind_call`` with the model's signature read once per ``forward``.

    A call by keywords only, each naming a parameter of ``forward`` and every required one
    given (what diffusers pipelines make), is bound by looking the names up in signature
    order: the same mapping ``bind_call`` returns, without ``inspect`` on every call. Any
    other call goes through ``bind_call``. A ``forward`` replaced on the model (a hook) is
    read again.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._forward: Any = None
        self._order: tuple[str, ...] = ()
        self._names: frozenset[str] = frozenset()
        self._required: frozenset[str] = frozenset()

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        forward = self._model.forward
        forward = getattr(forward, "__func__", forward)
        if forward is not self._forward:
            self._read(forward)
        if args or not self._required <= kwargs.keys() or not kwargs.keys() <= self._names:
            return bind_call(self._model, args, kwargs)
        return {name: kwargs[name] for name in self._order if name in kwargs}

    def _read(self, forward: Any) -> None:
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = [p for p in inspect.signature(self._model.forward).parameters.values() if p.kind in keyword]
        self._forward = forward
        self._order = tuple(p.name for p in params)
        self._names = frozenset(self._order)
        self._required = frozenset(p.name for p in params if p.default is inspect.Parameter.empty)


def describe_inputs(inputs: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            return f"{dtype}{list(value.shape)}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in value.items()) + "}"
        return repr(value)

    return ", ".join(f"{name}={one(value)}" for name, value in inputs.items())


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class Executable(torch.nn.Module):
    """Drop-in replacement for the model: same call signature, same output structure.

    ``vdopt.optimize`` returns it with ``save`` added (``vdopt.api.OptimizedModel``): writing
    artifacts sits above the runtime.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mesh: Mesh,
        *,
        options: PipelineOptions,
        disable_passes: Iterable[str] = (),
    ) -> None:
        super().__init__()
        # Held by plain reference, not as a submodule: vdopt never owns or changes the model.
        object.__setattr__(self, "_model", model)
        self.mesh = mesh
        self.options = options
        self.disable_passes = tuple(disable_passes)
        self._plans: dict[tuple, Plan] = {}
        """Plans valid for every call of their input signature (the ones artifacts can save)."""
        self._guarded: dict[tuple, list[Plan]] = {}
        """Plans specialized on data-dependent values, per input signature, checked by their guards."""
        self._built: list[Plan] = []
        """Every plan, in the order built (``plans``, the report)."""
        self._model_name = type(model).__name__
        self._calls = 0
        self._bind = CallBinder(model)
        # Fail on bad options now rather than at the first call.
        build_pipeline(options)
        check_disabled(options, self.disable_passes)

    # -- the call ------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self._bind(args, kwargs)
        plan = self._plan_for(inputs)
        self._calls += 1
        # training: the caller's grad mode (the graph is differentiable); otherwise no autograd
        with contextlib.nullcontext() if self.options.training else torch.no_grad():
            try:
                return plan.program(inputs)
            except Exception as e:
                if self.mesh.size == 1 or not is_collective_failure(e):
                    raise
                number = self._built.index(plan) + 1
                call = f"call {self._calls} of {self._model_name} (input signature {number}: {plan.signature})"
                device = model_device(self._model)
                raise collective_error(e, mesh=self.mesh, device=device, call=call, step=plan.program.step) from e

    def _plan_for(self, inputs: dict[str, Any]) -> Plan:
        key = input_key(inputs)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        specialized = self._guarded.get(key, [])
        for plan in specialized:
            if plan.guards.hold(inputs):
                return plan
        if specialized:
            log.info("%s: data-dependent guards of %d plan(s) fail for this call (%s): capturing again",
                     self._model_name, len(specialized), specialized[-1].guards.describe())
        elif self._built:
            log.info("new input signature for %s: capturing again", self._model_name)
        plan = self._build(inputs)
        if plan.guards is None:
            self._plans[key] = plan
        else:
            specialized.append(plan)
            self._guarded[key] = specialized
            if len(specialized) == _MANY_SPECIALIZATIONS:
                log.warning(
                    "%s was captured %d times for one input signature because data-dependent values "
                    "changed (%s): pass such values as Python arguments, or make them sizes of inputs",
                    self._model_name, len(specialized), plan.guards.describe(),
                )
        self._built.append(plan)
        return plan

    def _build(self, inputs: dict[str, Any]) -> Plan:
        device = model_device(self._model)
        passes = build_pipeline(self.options)
        # Sizes from tensor values stay symbolic (one plan for every length) unless a step needs
        # a concrete value: then this plan is specialized on the call's values, and says why.
        symbolic, why = not self.options.training, None
        with progress(3 + len(passes), f"vdopt {self._model_name}") as bar:
            while True:
                bar.set_postfix_str("capture")
                start = time.perf_counter()
                captured = capture_guarded(self._model, inputs, training=self.options.training,
                                           symbolic=symbolic, why_specialized=why)
                gm = captured.gm
                capture_s = time.perf_counter() - start
                bar.update(1)
                step = "analysis"
                try:
                    bar.set_postfix_str("analyze")
                    sites, layout = analyze(gm)
                    check_pipefusion(sites, layout, self.mesh)
                    bar.update(1)
                    ctx = PassContext(
                        mesh=self.mesh, device=device, sites=sites, layout=layout, kernels=self.options.kernels
                    )
                    step = "the passes"
                    gm, records = run_passes(gm, ctx, passes, disabled=self.disable_passes, progress=bar)
                    bar.set_postfix_str("program")
                    step = "building the program"
                    program, program_records = build_program(
                        gm, ctx, self.options, disabled=self.disable_passes, after=[r.name for r in records]
                    )
                    break
                except Exception as e:
                    if not (symbolic and captured.symbols) or isinstance(e, ValueError):
                        raise  # a ValueError is the user's to fix, whatever the sizes
                    # any failure with symbolic sizes: the specialized graph is the exact fallback
                    # (and a failure that is not about sizes is raised again from it)
                    step = str(e).split(" failed after ")[0] if isinstance(e, PassError) else step
                    needed = needs_concrete_size(e) or f"{type(e).__name__}: {str(e).strip()[:200]}"
                    names = ", ".join(s.split(" ")[0] for s in captured.symbols)
                    symbolic, why = False, f"{step} needs a concrete value of {names} ({needed})"
                    log.info("%s: %s: captured again, specialized on this call's values", self._model_name, why)
            bar.update(1)
        return Plan(
            signature=describe_inputs(inputs),
            layout=layout,
            sites=sites,
            passes=records + program_records,
            capture_s=capture_s,
            passes_s=time.perf_counter() - start - capture_s,
            program=program,
            guards=captured.guards,
        )

    # -- a whole denoising loop ---------------------------------------------------------
    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: Sequence[Any],
        update: Callable[[int, torch.Tensor, Any], torch.Tensor],
        *,
        latent_arg: str = "hidden_states",
        **kwargs: Any,
    ) -> torch.Tensor:
        """The final latent of ``for s, t in enumerate(timesteps): x = update(s, x, self(**kwargs,
        <latent_arg>=x, timestep=t))``, starting from ``latents``; a new generation.

        ``update(s, x, out)`` is the scheduler step on the model's output ``out`` (as the model
        returns it); it must be a pure function acting per latent element (Euler and
        flow-matching steps do). Owning the loop lets PipeFusion keep its pipeline full across
        steps, as xDiT does, with the latents of the step-by-step loop; any other program runs
        the loop call by call. Every rank returns the full latent.
        """
        if not timesteps:
            return latents
        inputs = self._bind((), {**kwargs, latent_arg: latents, "timestep": timesteps[0]})
        if latent_arg not in inputs or "timestep" not in inputs:
            raise ValueError(f"denoise: {self._model_name}.forward takes no `{latent_arg}` or `timestep` argument; "
                             "pass latent_arg= naming its latent input")
        program = self._plan_for(inputs).program
        if isinstance(program, PipeFusionProgram):
            self._calls += len(timesteps)
            with torch.no_grad():
                return program.denoise(inputs, latent_arg, timesteps, update)
        self.reset()
        x = latents
        for s, t in enumerate(timesteps):
            x = update(s, x, self(**{**kwargs, latent_arg: x, "timestep": t}))
        return x

    # -- step state ----------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: clears step state (PAB caches, call counters)."""
        for plan in self._built:
            plan.program.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str, **context: Any):
        """Accepted for diffusers pipelines that wrap each call in ``cache_context``.

        vdopt keys step state by the timestep and the call order within a step, so neither
        the name nor the step details (``step_index=``, ``sigma=``) are needed.
        """
        yield

    # -- introspection -------------------------------------------------------------------
    @property
    def plans(self) -> list[Plan]:
        """The plans built so far, one per input signature seen."""
        return list(self._built)

    def report(self) -> str:
        return render_report(self._model_name, self.mesh, self.plans)

    def __getattr__(self, name: str) -> Any:
        # nn.Module resolves parameters/submodules first; anything else (config, dtype,
        # device, ...) is read from the wrapped model so pipelines keep working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def extra_repr(self) -> str:
        return f"model={self._model_name}, mesh=({self.mesh.describe()}), plans={len(self._built)}"
